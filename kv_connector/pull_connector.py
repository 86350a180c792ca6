"""The pull protocol both built-in connectors share; subclasses only move bytes.

Producer: when a request that a decode node will continue finishes, its blocks are held
in the ProducerLedger (not freed) and `kv_transfer_params` tells the consumer where to
pull from. A KV service thread answers handshakes, claims and releases; a release
answers with the lent blocks' checksums, summed while the lease still holds them.

Consumer: a request carrying `do_remote_prefill` is claimed as soon as it arrives (the
lease keeps the producer from evicting while it waits here, renewed until its load
starts), and at admission its blocks are pulled on a worker thread: handshake (once per
producer, cached), read, release — the release answer says whether the blocks were held
through the read — then checksums. Whatever did not arrive intact is a failed block; the
load-failure policy turns failed blocks into "recompute these" or "fail the request".
The engine thread only ever polls a queue (and a pipe wakes the node loop when a load
ends, so a request whose KV landed joins the next step at once). When the router reports a producer dead
(`producer_down`), loads from it give up at once — mid-call, not after
transfer_timeout_s — and later ones fail before they start.

Streamed pulls (the router dispatches to both nodes at once; kv_transfer_params carry
`streamed`): the consumer gets the job while the producer still prefills it. It reserves
its blocks at admission and follows the producer's progress with long polls (WaitKV),
reading each block as soon as its KV is computed — the blocks of finished chunks move
while later chunks compute — and, when the producer lends the request, the last blocks
and the token the producer sampled, from which the consumer continues. Blocks read
under an older epoch (the producer preempted and recomputed the request) are read
again; the release's checksums cover every block as lent.

Options (kv_connector_extra_config): load_workers (consumer threads, default 4),
stream_workers (threads following streamed pulls, default 64),
verify_checksums (default true; a producer with it off sends no checksums and consumers
then skip the comparison).

Fault injection for tests (kv_connector_extra_config on the consumer):
  fault_drop_blocks: [i, ...]     request-relative block indices never read
  fault_corrupt_blocks: [i, ...]  overwritten after the read (caught by checksums)
  fault_delay_s: float            sleep before reading (a slow transfer)
  fault_read_delay_s: float       sleep before each read of a streamed pull (a slow link)
  fault_refuse_handshake: bool    act as if the producer refused the handshake
On the producer:
  fault_release_delay_s: float    sleep before answering a release (a slow service)
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import msgspec
import torch

from kv_connector import messages as m
from kv_connector.base import ConnectorEvents, KVCacheInfo, KVConnectorBase
from kv_connector.checksum import block_checksums
from kv_connector.config import KVTransferConfig
from kv_connector.producer_ledger import ProducerLedger
from kv_connector.producer_service import ProducerService, ServiceError, call_struct

log = logging.getLogger(__name__)


class TransferError(RuntimeError):
    pass


@dataclass(slots=True)
class Peer:
    """A producer this consumer has shaken hands with."""
    host: str
    port: int
    handshake: m.HandshakeResponse
    transport: object = None  # what the subclass's _connect returned


@dataclass(slots=True)
class LoadJob:
    request_id: str
    host: str
    port: int
    remote_request_id: str
    remote_engine_id: str
    remote_block_ids: list[int]
    local_block_ids: list[int]
    first_block: int            # index of remote_block_ids[0] among the request's blocks
    all_block_ids: list[int]    # the request's own block_ids list, to free if it is aborted mid-load
    streamed: bool = False      # remote_block_ids learnt while the producer computes
    cancelled: bool = False
    producer_dead: threading.Event = field(default_factory=threading.Event)  # set: stop waiting on the producer


@dataclass(slots=True)
class LoadResult:
    request_id: str
    failed: set[int] = field(default_factory=set)  # local block ids that did not arrive intact
    error: str | None = None                        # why (for the `fail` policy's message)
    output_token_ids: list[int] = field(default_factory=list)  # streamed: what the producer sampled


class PullConnector(KVConnectorBase):
    # --- what a transport subclass provides ---------------------------------------------
    def _register(self, kv_cache: torch.Tensor) -> None:
        """Register the KV tensor with the transport (once)."""

    def _transport_metadata(self) -> bytes:
        """Producer: bytes the consumer needs to reach this node's memory."""
        return b""

    def _connect(self, peer: Peer) -> object:
        """Consumer: prepare to read from a producer (once per producer)."""
        return None

    def _read(self, peer: Peer, job: LoadJob, remote_ids: list[int], local_ids: list[int], deadline: float) -> None:
        """Consumer: copy remote blocks into local blocks before `deadline` or raise."""
        raise NotImplementedError

    def _serve_read(self, msg: m.ReadRequest) -> list[bytes]:
        raise NotImplementedError

    # --- set-up ---------------------------------------------------------------------
    def __init__(self, config: KVTransferConfig, kv_info: KVCacheInfo):
        super().__init__(config, kv_info)
        self.kv_cache: torch.Tensor | None = None
        extra = config.kv_connector_extra_config
        self._faults = {k: v for k, v in extra.items() if k.startswith("fault_")}
        self._verify = bool(extra.get("verify_checksums", True))
        self._side_streams: dict[int, torch.cuda.Stream] = {}
        self.ledger = ProducerLedger(config.abort_timeout_s)
        self.service: ProducerService | None = None
        self._peers: dict[tuple[str, int], Peer] = {}
        self._peer_lock = threading.Lock()
        self._loads: dict[str, LoadJob] = {}
        self._done: queue.SimpleQueue[LoadResult] = queue.SimpleQueue()
        self._pool = ThreadPoolExecutor(max_workers=int(extra.get("load_workers", 4)),
                                        thread_name_prefix="kv-load") if config.is_consumer else None
        # A streamed pull waits on its producer for as long as the prefill takes: its own
        # threads, so that waiting never holds up loads that could run now.
        self._stream_pool = ThreadPoolExecutor(max_workers=int(extra.get("stream_workers", 64)),
                                               thread_name_prefix="kv-stream") if config.is_consumer else None
        self._wake_r, self._wake_w = os.pipe() if config.is_consumer else (None, None)
        self._wake_lock = threading.Lock()  # a load thread's write against close(): a closed fd may be reused
        if self._wake_r is not None:
            os.set_blocking(self._wake_r, False)
            os.set_blocking(self._wake_w, False)
        self._claims: dict[str, tuple[str, int, str]] = {}  # request id -> (host, port, remote id)
        self._claims_lock = threading.Lock()
        self._dead_engines: set[str] = set()  # producers the router saw die (engine ids are per start)
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._stats = {"loads": 0, "load_failures": 0, "blocks_loaded": 0, "blocks_failed": 0,
                       "bytes_loaded": 0, "load_seconds": 0.0, "requests_lent": 0,
                       "streamed_loads": 0, "stream_tail_seconds": 0.0, "stream_blocks_early": 0,
                       **{f"load_{p}_seconds": 0.0 for p in ("handshake", "claim", "follow", "read", "release",
                                                             "verify")}}

    def set_fault_injection(self, faults: dict) -> None:
        """Replace the fault-injection options (tests; see the module docstring)."""
        unknown = [k for k in faults if not k.startswith("fault_")]
        if unknown:
            raise ValueError(f"not fault-injection options: {unknown}")
        self._faults = dict(faults)

    def register_kv_cache(self, kv_cache: torch.Tensor) -> None:
        if self.kv_cache is not None:
            raise RuntimeError("register_kv_cache called twice")
        self.kv_cache = kv_cache
        self._register(kv_cache)
        if self.config.is_producer:
            self.service = ProducerService(self.config.kv_ip, self.config.kv_port, {
                m.HandshakeRequest: self._on_handshake,
                m.ClaimRequest: self._on_claim,
                m.ReleaseRequest: self._on_release,
                m.ReadRequest: self._serve_read,
            }, long_poll={m.WaitKV: self._on_wait_kv}).start()
            log.info("kv producer service engine_id=%s at %s:%d", self.config.engine_id, self.service.host,
                     self.service.port)
        if self.config.is_consumer:
            self._renewer = threading.Thread(target=self._renew_claims, name="kv-claims", daemon=True)
            self._renewer.start()

    @property
    def block_bytes(self) -> int:
        return self.kv_cache[0].numel() * self.kv_cache.element_size()

    # --- producer -------------------------------------------------------------------
    def _on_handshake(self, msg: m.HandshakeRequest) -> m.HandshakeResponse | m.ErrorResponse:
        if msg.config_hash != self.config.compute_hash():
            return m.ErrorResponse(f"KV transfer settings differ (connector or protocol version): consumer "
                                   f"{msg.config_hash[:8]}, producer {self.config.compute_hash()[:8]}; "
                                   f"use the same kv_connector ({self.config.kv_connector}) on both")
        return m.HandshakeResponse(self.config.engine_id, self.config.compute_hash(), self.kv_info,
                                   self.kv_cache.shape[0], self.block_bytes, self._transport_metadata())

    def _on_claim(self, msg: m.ClaimRequest) -> m.ClaimResponse:
        return m.ClaimResponse([self.ledger.claim(rid) is not None for rid in msg.request_ids])

    def _on_wait_kv(self, msg: m.WaitKV, final: bool) -> m.KVProgress | None:
        return self.ledger.progress(msg.request_id, msg.have_blocks, msg.epoch, final)

    def _on_release(self, msg: m.ReleaseRequest) -> m.ReleaseResponse:
        delay = self._faults.get("fault_release_delay_s")
        if delay:
            time.sleep(delay)
        # Renew first: the blocks cannot expire (and be reused) while they are summed.
        held = self.ledger.claim(msg.request_id)
        if held is None:
            return m.ReleaseResponse(False, [])
        checksums = self._checksums(held.lent_block_ids)
        return m.ReleaseResponse(self.ledger.release(msg.request_id) is not None, checksums)

    def _checksums(self, block_ids: list[int]) -> list[int]:
        """Per-block checksums, computed off the engine's stream: this runs on the service
        or a load thread, and must not queue behind (or delay) the engine's kernels."""
        if not self._verify:
            return []
        with self.side_stream():
            return block_checksums(self.kv_cache, block_ids)

    @contextlib.contextmanager
    def side_stream(self):
        """This thread's own CUDA stream (a no-op on CPU). Work on it neither waits for the
        engine's kernels nor delays them. What it reads must be complete already: lent
        blocks were written before their request finished, NIXL reads are complete when
        reported done, and a transport that writes on the stream itself (TCP) orders
        its writes before the checksums by using this same stream."""
        if not self.kv_cache.is_cuda:
            yield
            return
        stream = self._side_streams.get(threading.get_ident())
        if stream is None:
            stream = self._side_streams[threading.get_ident()] = torch.cuda.Stream(self.kv_cache.device)
        with torch.cuda.stream(stream):
            yield

    def _lend(self, request) -> bool:
        """Hold a finished prefill's blocks for the consumer and say where they are."""
        n_blocks = -(-request.num_computed_tokens // self.kv_info.block_size)
        blocks = request.block_ids[:n_blocks]
        self.ledger.hold(request.request_id, request.block_ids, blocks, request.num_computed_tokens,
                         request.output_token_ids)
        request.kv_transfer_params = {
            "do_remote_prefill": True,
            "remote_engine_id": self.config.engine_id,
            "remote_host": self.service.host,
            "remote_port": self.service.port,
            "remote_request_id": request.request_id,
            "remote_block_ids": blocks,
            "num_tokens": request.num_computed_tokens,
        }
        self._stats["requests_lent"] += 1
        return True

    @staticmethod
    def _lends(request) -> bool:
        p = request.kv_transfer_params
        return bool(p and p.get("do_remote_decode"))

    def kv_computed(self, requests, event=None) -> None:
        """Producer: these requests' KV is written up to num_computed_tokens once `event`
        completes: streamed consumers may read their whole blocks then."""
        if not self.config.is_producer:
            return
        bs = self.kv_info.block_size
        for r in requests:
            if self._lends(r):
                n = min(r.num_computed_tokens, r.num_prompt_tokens) // bs
                self.ledger.computed(r.request_id, r.block_ids[:n], n * bs, event)

    # --- consumer -------------------------------------------------------------------
    @staticmethod
    def _pull_params(request) -> dict | None:
        p = request.kv_transfer_params
        return p if p and p.get("do_remote_prefill") else None

    @property
    def wakeup_fd(self) -> int | None:
        return self._wake_r

    def drain_wakeup(self) -> None:
        if self._wake_r is None:
            return
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _finished_load(self, result: LoadResult) -> None:
        self._done.put(result)
        with self._wake_lock:
            if self._wake_w is not None:
                try:
                    os.write(self._wake_w, b"!")
                except (BlockingIOError, OSError):  # full: the loop is awake anyway
                    pass

    def check_request(self, request_id: str, kv_transfer_params: dict) -> None:
        if self.config.is_producer and kv_transfer_params.get("do_remote_decode") and self.ledger.holds(request_id):
            # Its record would be replaced: the held blocks never freed, and a consumer of
            # the first request reading the second's.
            raise ValueError(f"request id {request_id!r} is in use: this node still lends its KV (until a "
                             f"consumer reads it or abort_timeout_s passes); use a new id")
        if not (self.config.is_consumer and kv_transfer_params.get("do_remote_prefill")):
            return
        if request_id in self._loads:
            # An aborted request's load still writes into its blocks: a second load of the
            # same id would be mistaken for it when either ends (blocks leaked, KV half-read).
            raise ValueError(f"request id {request_id!r} is in use: an earlier request of that id is still loading "
                             f"its KV (it ends within transfer_timeout_s={self.config.transfer_timeout_s}s); "
                             "use a new id")
        try:
            msgspec.convert(kv_transfer_params, m.PullHandle)
        except msgspec.ValidationError as e:
            raise ValueError(f"kv_transfer_params: {e}") from None

    def on_request_added(self, request) -> None:
        if self.config.is_producer and self._lends(request):
            self.ledger.expect(request.request_id)
        p = self._pull_params(request) if self.config.is_consumer else None
        if p is None or p.get("streamed"):  # a streamed pull has nothing held to claim yet
            return
        with self._claims_lock:
            self._claims[request.request_id] = (p["remote_host"], p["remote_port"], p["remote_request_id"])
        self._pool.submit(self._claim_quietly, p["remote_host"], p["remote_port"], [p["remote_request_id"]])

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> int:
        p = self._pull_params(request) if self.config.is_consumer else None
        if p is None:
            return 0
        n = max(0, int(p["num_tokens"]) - num_computed_tokens)
        if n == 0:  # the local prefix cache has it all: let the producer free its copy now
            p["do_remote_prefill"] = False
            self._give_back_unread(request.request_id)
        return n

    def _give_back_unread(self, request_id: str) -> None:
        """A request that will never read its lent blocks: release them on the producer
        instead of letting them wait for abort_timeout_s."""
        with self._claims_lock:
            claim = self._claims.pop(request_id, None)
        if claim is not None:
            host, port, remote_id = claim
            self._pool.submit(self._release_quietly, host, port, remote_id)

    def _release_quietly(self, host: str, port: int, remote_id: str) -> None:
        try:
            call_struct(host, port, m.ReleaseRequest(remote_id), m.ReleaseResponse, min(5.0, self.config.transfer_timeout_s))
        except Exception as e:  # the producer's lease expiry frees them anyway
            log.debug("kv release at %s:%d failed: %s", host, port, e)

    def start_load(self, request, num_computed_tokens: int, num_external_tokens: int) -> None:
        p = self._pull_params(request)
        bs = self.kv_info.block_size
        first = num_computed_tokens // bs
        last = -(-(num_computed_tokens + num_external_tokens) // bs)
        streamed = bool(p.get("streamed"))
        remote = [] if streamed else list(p["remote_block_ids"][first:last])
        job = LoadJob(request.request_id, p["remote_host"], int(p["remote_port"]), p["remote_request_id"],
                      p["remote_engine_id"], remote, request.block_ids[first:last], first, request.block_ids, streamed)
        if not streamed and len(job.remote_block_ids) != len(job.local_block_ids):
            self._finished_load(LoadResult(job.request_id, set(job.local_block_ids),
                                           f"the producer lent {len(p['remote_block_ids'])} blocks for "
                                           f"{p['num_tokens']} tokens; {last} were expected"))
            self._loads[job.request_id] = job
            self._give_back_unread(job.request_id)  # nothing will be read: the producer frees its copy
            return
        self._loads[job.request_id] = job
        if job.remote_engine_id in self._dead_engines:
            job.producer_dead.set()
        # The claim stays (renewed) while the job waits for a worker: _load drops it.
        (self._stream_pool if streamed else self._pool).submit(self._load, job)

    def producer_up(self, engine_id: str) -> None:
        self._dead_engines.discard(engine_id)

    def producer_down(self, engine_id: str) -> None:
        self._dead_engines.add(engine_id)
        for job in self._loads.values():
            if job.remote_engine_id == engine_id:
                job.producer_dead.set()

    def _load(self, job: LoadJob) -> None:
        with self._claims_lock:
            self._claims.pop(job.request_id, None)  # held until now; the release below ends the lease
        t0 = time.monotonic()
        deadline = t0 + self.config.transfer_timeout_s
        result = LoadResult(job.request_id)
        released = False
        try:
            if self._faults.get("fault_refuse_handshake"):
                raise TransferError("handshake refused (fault injection)")
            if job.producer_dead.is_set():
                raise TransferError(f"the KV producer {job.remote_engine_id} at {job.host}:{job.port} is down")
            peer = self._peer(job.host, job.port, job.remote_engine_id, deadline, job.producer_dead)
            t_claim = time.monotonic()
            # No claim round trip here: the request was claimed when it arrived and renewed
            # while it waited, and the release below tells whether the blocks stayed held.
            if self._faults.get("fault_delay_s") and job.producer_dead.wait(float(self._faults["fault_delay_s"])):
                raise TransferError(f"the KV producer {job.remote_engine_id} at {job.host}:{job.port} is down")
            drop = {job.local_block_ids[i] for i in self._fault_indices("fault_drop_blocks", job)}
            t_read = time.monotonic()
            if job.streamed:
                # Reads happen as the producer computes; what follows its lending is the tail.
                read_failed, t_lent = self._follow(peer, job, drop, result)
                t_read, deadline = t_lent, t_lent + self.config.transfer_timeout_s
                drop |= read_failed
            pairs = [(r, l) for r, l in zip(job.remote_block_ids, job.local_block_ids) if l not in drop]
            if pairs and not job.streamed:
                remote_ids, local_ids = map(list, zip(*pairs))
                self._read(peer, job, remote_ids, local_ids, deadline)
            t_release = time.monotonic()
            with self.side_stream():
                for i in self._fault_indices("fault_corrupt_blocks", job):
                    self.kv_cache[job.local_block_ids[i]].view(-1)[:8].fill_(12345)
            release = call_struct(job.host, job.port, m.ReleaseRequest(job.remote_request_id), m.ReleaseResponse,
                                  max(deadline - time.monotonic(), 0.01), job.producer_dead)
            released = True
            t_verify = time.monotonic()
            if not release.was_held:
                raise TransferError(f"the producer no longer held request {job.remote_request_id}'s blocks when the "
                                    f"read finished (freed after abort_timeout_s={self.config.abort_timeout_s}s?)")
            result.failed = set(drop)
            if release.checksums:  # the producer verifies (verify_checksums on its side)
                want = release.checksums[job.first_block:job.first_block + len(job.local_block_ids)]
                got = self._checksums(job.local_block_ids)
                result.failed |= {b for b, w, g in zip(job.local_block_ids, want, got) if w != g}
                result.failed |= set(job.local_block_ids[len(want):])  # no checksum: unverified, recomputed
            if result.failed:
                result.error = (f"{len(result.failed)} of {len(job.local_block_ids)} KV blocks did not arrive intact "
                                f"from {job.host}:{job.port}")
            self._stats["bytes_loaded"] += len(pairs) * self.block_bytes
            t_end = time.monotonic()
            if job.streamed:
                self._stats["streamed_loads"] += 1
                self._stats["stream_tail_seconds"] += t_end - t_read
            # A streamed pull's "follow" is its wait for the prefill (reads included); its
            # "read" is the tail after the producer lent the request.
            for phase, a, b in (("handshake", t0, t_claim), ("follow" if job.streamed else "claim", t_claim, t_read),
                                ("read", t_read, t_release),
                                ("release", t_release, t_verify), ("verify", t_verify, t_end)):
                self._stats[f"load_{phase}_seconds"] += b - a
            log.debug("kv load request_id=%s blocks=%d handshake_ms=%.2f claim_ms=%.2f read_ms=%.2f release_ms=%.2f "
                      "verify_ms=%.2f", job.request_id, len(pairs), 1e3 * (t_claim - t0), 1e3 * (t_read - t_claim),
                      1e3 * (t_release - t_read), 1e3 * (t_verify - t_release), 1e3 * (t_end - t_verify))
        except (TransferError, ServiceError) as e:
            self._forget_peer(job.host, job.port)  # it may come back as a new engine
            result.failed, result.error = set(job.local_block_ids), str(e)
        except Exception as e:  # a transport bug must still end the load
            log.exception("kv load request_id=%s failed", job.request_id)
            result.failed, result.error = set(job.local_block_ids), f"KV transfer error: {e}"
        self._stats["load_seconds"] += time.monotonic() - t0
        self._finished_load(result)
        if not released and not job.producer_dead.is_set():  # gave up early: let the producer free its copy now
            self._release_quietly(job.host, job.port, job.remote_request_id)

    def _follow(self, peer: Peer, job: LoadJob, drop: set[int], result: LoadResult) -> tuple[set[int], float]:
        """A streamed pull: read each block once its KV is computed, until the producer
        lends the request. Sets job.remote_block_ids (as lent) and result.output_token_ids;
        returns the local blocks whose read failed, and when the lending was learnt.

        A producer that has not seen the prefill job yet gets transfer_timeout_s to show
        it; one that has it may take as long as its queue and the prefill take (it answers
        every long poll, so it is known alive; the router aborts this job if it dies)."""
        first, last = job.first_block, job.first_block + len(job.local_block_ids)
        read: dict[int, tuple[int, int]] = {}  # request-relative block index -> (remote id, epoch) read
        failed: set[int] = set()
        have, epoch = 0, 0
        unseen_until = time.monotonic() + self.config.transfer_timeout_s
        while True:
            if job.cancelled:
                raise TransferError("the request ended while its KV was streaming")
            # The producer answers a long poll with no news after wait_s: well inside the
            # call's timeout, or a prefill queued for longer than the timeout fails the load.
            wait = m.WaitKV(job.remote_request_id, have, epoch, wait_s=min(0.5, self.config.transfer_timeout_s / 2))
            prog = call_struct(job.host, job.port, wait, m.KVProgress, min(self.config.transfer_timeout_s, 10.0),
                               job.producer_dead)
            if prog.state == "gone":
                raise TransferError(f"the producer ended request {job.remote_request_id} without lending its KV "
                                    f"({prog.reason})")
            if prog.state == "unknown":
                if time.monotonic() > unseen_until:
                    raise TransferError(f"the producer at {job.host}:{job.port} never received prefill job "
                                        f"{job.remote_request_id} (within transfer_timeout_s="
                                        f"{self.config.transfer_timeout_s}s)")
                continue
            done = prog.state == "done"
            if done:
                t_lent = time.monotonic()
                result.output_token_ids = list(prog.output_token_ids)
                if len(prog.block_ids) < last:
                    raise TransferError(f"the producer lent {len(prog.block_ids)} blocks for {prog.num_tokens} "
                                        f"tokens; {last} were expected")
            have, epoch = len(prog.block_ids), prog.epoch
            todo = [i for i in range(first, min(last, len(prog.block_ids)))
                    if read.get(i) != (prog.block_ids[i], epoch) and job.local_block_ids[i - first] not in drop]
            if todo:
                remote_ids = [prog.block_ids[i] for i in todo]
                local_ids = [job.local_block_ids[i - first] for i in todo]
                if self._faults.get("fault_read_delay_s"):
                    time.sleep(float(self._faults["fault_read_delay_s"]))
                try:
                    self._read(peer, job, remote_ids, local_ids, time.monotonic() + self.config.transfer_timeout_s)
                except TransferError as e:  # these blocks are recomputed (or fail the request)
                    log.warning("kv stream request_id=%s: reading %d blocks failed: %s", job.request_id, len(todo), e)
                    failed |= set(local_ids)
                else:
                    failed -= set(local_ids)
                    read.update((i, (prog.block_ids[i], epoch)) for i in todo)
                    if not done:
                        self._stats["stream_blocks_early"] += len(todo)
            if done:
                job.remote_block_ids = list(prog.block_ids[first:last])
                return failed, t_lent

    def _fault_indices(self, key: str, job: LoadJob) -> list[int]:
        return [i - job.first_block for i in self._faults.get(key, ())
                if 0 <= i - job.first_block < len(job.local_block_ids)]

    def _peer(self, host: str, port: int, engine_id: str, deadline: float,
              give_up: threading.Event | None = None) -> Peer:
        with self._peer_lock:
            peer = self._peers.get((host, port))
        if peer is not None and peer.handshake.engine_id == engine_id:
            return peer
        hs = call_struct(host, port, m.HandshakeRequest(self.config.engine_id, self.config.compute_hash()),
                         m.HandshakeResponse, max(deadline - time.monotonic(), 0.01), give_up)
        if hs.engine_id != engine_id:
            raise TransferError(f"{host}:{port} is engine {hs.engine_id}, not {engine_id} that lent the KV "
                                "(the producer restarted?)")
        problem = self.kv_info.mismatch(hs.kv_info)
        if problem:
            raise TransferError(problem)
        peer = Peer(host, port, hs)
        peer.transport = self._connect(peer)
        with self._peer_lock:
            self._peers[(host, port)] = peer
        return peer

    def _forget_peer(self, host: str, port: int) -> None:
        with self._peer_lock:
            self._peers.pop((host, port), None)

    def _claim_quietly(self, host: str, port: int, remote_ids: list[str]) -> None:
        try:
            call_struct(host, port, m.ClaimRequest(remote_ids), m.ClaimResponse, min(5.0, self.config.transfer_timeout_s))
        except Exception as e:  # the load itself will find out and apply the policy
            log.debug("kv claim at %s:%d failed: %s", host, port, e)

    def _renew_claims(self) -> None:
        """Every abort_timeout_s / 3, renew each producer's claims. Producers are renewed
        side by side, each on a thread of its own: one that does not answer (dead, not yet
        reported) costs its own claim timeout, never the other producers' leases; and it
        gets no new claim while the last one waits."""
        period = max(self.config.abort_timeout_s / 3, 0.05)
        renewing: set[tuple[str, int]] = set()  # producers whose last claim is unanswered

        def renew(peer: tuple[str, int], rids: list[str]) -> None:
            try:
                self._claim_quietly(*peer, rids)
            finally:
                renewing.discard(peer)

        with ThreadPoolExecutor(max_workers=16, thread_name_prefix="kv-claims") as claims:
            while not self._stop.wait(period):
                with self._claims_lock:
                    by_peer: dict[tuple[str, int], list[str]] = {}
                    for host, port, rid in self._claims.values():
                        by_peer.setdefault((host, port), []).append(rid)
                for peer, rids in by_peer.items():
                    if peer not in renewing:
                        renewing.add(peer)
                        claims.submit(renew, peer, rids)

    # --- both -----------------------------------------------------------------------
    def request_finished(self, request) -> bool:
        if self.config.is_consumer:
            self._give_back_unread(request.request_id)  # finished before its load began
            job = self._loads.get(request.request_id)
            # Still being written into: keep the blocks until the load ends. Only this
            # request's own load: an aborted namesake's may still run (ids can be reused).
            if job is not None and job.all_block_ids is request.block_ids:
                job.cancelled = True
                return True
        p = request.kv_transfer_params
        # Lend only when the prefill ran to the length the router asked for: a request that
        # stopped for real (eos, stop string) or was aborted has no decode to come.
        if (self.config.is_producer and p and p.get("do_remote_decode") and request.block_ids
                and request.status.value == "finished_length"):
            return self._lend(request)
        if self.config.is_producer and self._lends(request):  # streamed consumers stop waiting
            self.ledger.forget(request.request_id, request.status.value)
        return False

    def release_lent(self, request_id: str) -> None:
        self.ledger.release(request_id)

    def poll(self) -> ConnectorEvents:
        ev = ConnectorEvents()
        if self.config.is_producer:
            ev.blocks_to_free += self.ledger.take_expired_and_released()
        while True:
            try:
                res = self._done.get_nowait()
            except queue.Empty:
                break
            job = self._loads.pop(res.request_id)
            self._stats["loads"] += 1
            self._stats["blocks_loaded"] += len(job.local_block_ids) - len(res.failed)
            self._stats["blocks_failed"] += len(res.failed)
            if job.cancelled:
                ev.blocks_to_free.append(job.all_block_ids)
                continue
            if res.output_token_ids:
                ev.remote_outputs[res.request_id] = res.output_token_ids
            if not res.failed:
                ev.loads_done.append((res.request_id, set()))
            else:
                self._stats["load_failures"] += 1
                log.warning("kv load request_id=%s: %s (policy %s)", res.request_id, res.error,
                            self.config.load_failure_policy)
                if self.config.load_failure_policy == "recompute":
                    ev.loads_done.append((res.request_id, res.failed))
                else:
                    ev.loads_failed.append((res.request_id, f"KV load failed: {res.error}"))
        return ev

    def stats(self) -> dict[str, float]:
        return {**self._stats, "requests_held": len(self.ledger), "holds_expired": self.ledger.expired_count}

    def close(self) -> None:
        self._stop.set()
        if self.service is not None:
            self.service.close()
            self.service = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._stream_pool is not None:
            for job in self._loads.values():
                job.cancelled = True
            self._stream_pool.shutdown(wait=False, cancel_futures=True)
        with self._wake_lock:
            for fd in (self._wake_r, self._wake_w):
                if fd is not None:
                    os.close(fd)
            self._wake_r = self._wake_w = None
