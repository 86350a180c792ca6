"""A serving node: one engine driven by one loop, talking to the router over ZeroMQ.

The loop is the only thread that touches the engine: it drains incoming messages,
steps the engine, and sends each request's updates back to whoever submitted it. It
blocks on the socket only when the engine has nothing to do, so a node idles at no CPU
cost and reacts within one step when busy. This is what every node shares; what a role
adds (lending KV, continuing generations) lives in prefill_node/service.py and
decode_node/service.py, subclasses of NodeServer that both the local process and the
Ray actor run.

Shutdown: SIGTERM or SIGINT stops intake (new requests get a 503 update), lets running
requests finish (and, on a prefill node, lent KV be pulled) for up to `drain_timeout_s`,
aborts what is left, closes the connector (deregistering KV memory) and exits 0. The
router keeps relaying a draining node's streams while it sends it nothing new
(router/node_client.py). DRAIN_TIMEOUT_S stays below the launcher's grace before SIGKILL
(cluster/launcher.py STOP_GRACE_S), so a drain always ends with the connector closed.

Hostile input: the socket is CURVE-authenticated when the cluster has a key
(kv_connector/cluster_key.py), so strangers never get a message through; whatever does arrive
and is malformed (wrong frame count, undecodable, a handler that raises) is dropped with
a log line and counted in `NodeStats.messages_dropped`. Nothing a peer sends ends the loop.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import msgspec
import zmq

from engine import node_protocol as proto
from kv_connector.cluster_key import ClusterKey
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 10.0   # below cluster/launcher.py STOP_GRACE_S (15 s)

# Largest message a node accepts: a SubmitRequest of a million-token prompt is ~5 MB.
MAX_MESSAGE_BYTES = 256 << 20


class NodeServer:
    def __init__(self, node_id: str, role: str, engine_config: EngineConfig, host: str, port: int,
                 drain_timeout_s: float = DRAIN_TIMEOUT_S):
        self.node_id = node_id
        self.role = role
        self.engine = LLMEngine(engine_config)
        self.drain_timeout_s = drain_timeout_s
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        try:
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a vanished router: drop, don't raise
            # No high-water mark: past one a ROUTER socket drops silently, and a lost update
            # is a stream without its end. A router that lags only delays them (memory here).
            self._sock.setsockopt(zmq.SNDHWM, 0)
            self._sock.setsockopt(zmq.RCVHWM, 0)  # the router's jobs, aborts and releases likewise
            self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)  # larger: the peer is disconnected
            key = ClusterKey.from_env()
            if key is not None:
                key.serve(self._sock)
            self._sock.bind(f"tcp://{host}:{port}")
        except BaseException:
            # The garbage collector does not reclaim an engine (LLMEngine.close): free its
            # memory here, for a host that goes on after a failed start.
            self._sock.close(0)
            self.engine.close()
            raise
        self.address = f"tcp://{host}:{port}"
        self._owners: dict[str, bytes] = {}  # request id -> router identity
        self._draining = False
        self._stop = False
        self.messages_dropped = 0

    # --- the loop -------------------------------------------------------------------
    def serve_forever(self, handle_signals: bool = True) -> None:
        """Run until drained. `handle_signals=False` for a host that stops the node itself
        with `request_stop()` (a Ray actor, whose loop runs off the main thread)."""
        if handle_signals:
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        wake = self.engine.wakeup_fd  # readable when a KV load ends
        if wake is not None:
            poller.register(wake, zmq.POLLIN)
        drain_deadline = None
        log.info("node %s (%s) serving at %s", self.node_id, self.role, self.address)
        while True:
            if self._draining and drain_deadline is None:
                drain_deadline = time.monotonic() + self.drain_timeout_s
            if drain_deadline is not None and (not self.has_work() or time.monotonic() > drain_deadline):
                break
            busy = self.engine.has_unfinished_requests and not self.engine.idle
            # Idle: wait on the socket (and the connector's wake-up pipe, so a request whose
            # KV landed runs at once). Waiting for KV without that pipe: 1 ms at a time.
            waiting_kv = self.engine.has_unfinished_requests and wake is None
            ready = dict(poller.poll(0 if busy else (1 if waiting_kv else 50)))
            if wake is not None and wake in ready:
                self.engine.drain_wakeup()
            if self._sock in ready:
                self._drain_socket()
            self._step()
        for rid in list(self._owners):
            self._send(self.engine.abort_request(rid))
        self.engine.close()
        self._sock.close(0)
        log.info("node %s stopped", self.node_id)

    def _on_signal(self, signum, frame) -> None:
        self._draining = True

    def request_stop(self) -> None:
        """Drain as on SIGTERM: no new requests, running ones finish, lent KV is pulled."""
        self._draining = True

    # --- what a role adds (prefill_node/service.py, decode_node/service.py) ---------------
    def has_work(self) -> bool:
        """What a draining node waits for before it stops."""
        return self.engine.has_unfinished_requests

    def handle_role_message(self, ident: bytes, msg: proto.ToNode) -> None:
        """A message only one role acts on; the shared loop ignores it."""

    def accepted(self, ident: bytes, msg: proto.SubmitRequest) -> None:
        """Called once a submitted request is in the engine."""

    def _drain_socket(self) -> None:
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:  # identity + one payload frame, always
                self._drop(f"{len(frames) - 1} payload frames instead of 1")
                continue
            ident, payload = frames
            try:
                msg = proto.decode_to_node(payload)
            except Exception as e:
                self._drop(f"undecodable ({e})")
                continue
            try:
                self._handle(ident, msg)
            except Exception as e:  # a message this node cannot act on must not stop it
                log.exception("node %s: handling %s failed", self.node_id, type(msg).__name__)
                self._drop(f"{type(msg).__name__} failed ({e})")

    def _drop(self, why: str) -> None:
        self.messages_dropped += 1
        log.warning("node %s: message dropped: %s (%d dropped so far)", self.node_id, why, self.messages_dropped)

    def _handle(self, ident: bytes, msg: proto.ToNode) -> None:
        if isinstance(msg, proto.SubmitRequest):
            self._submit(ident, msg)
        elif isinstance(msg, proto.AbortRequest):
            # Unanswered: the router stopped listening when it sent this (NodeClient.abort),
            # and an answer could land on a later job it sends under the same id.
            self._owners.pop(msg.request_id, None)
            self.engine.abort_request(msg.request_id)
        elif isinstance(msg, proto.StatsRequest):
            self._sock.send_multipart([ident, proto.encode(self.stats())])
        elif isinstance(msg, proto.ProducerDown):
            self.engine.producer_down(msg.engine_id)
        elif isinstance(msg, proto.ProducerUp):
            self.engine.producer_up(msg.engine_id)
        else:
            self.handle_role_message(ident, msg)

    def _submit(self, ident: bytes, msg: proto.SubmitRequest) -> None:
        def refuse(message: str, code: int) -> None:
            update = proto.RequestUpdate(msg.request_id, finished=True, finish_reason="error", error=message,
                                         error_code=code, refused=True)
            self._sock.send_multipart([ident, proto.encode(update)])

        if self._draining:
            return refuse(f"node {self.node_id} is shutting down", 503)
        if msg.request_id in self._owners:
            return refuse(f"request id {msg.request_id} is already running on node {self.node_id}", 400)
        try:
            params = SamplingParams.from_dict(msg.params)
            self.engine.add_request(msg.request_id, msg.prompt_token_ids, params,
                                    output_token_ids=msg.output_token_ids, kv_transfer_params=msg.kv_transfer_params,
                                    workflow_id=msg.workflow_id, agent_id=msg.agent_id, fork_of=msg.fork_of)
        except (ValueError, TypeError) as e:  # the request is bad, the node is fine
            return refuse(str(e), 400)
        except Exception as e:  # a fault while queueing it: undo, and say so
            log.exception("node %s: request_id=%s could not be queued", self.node_id, msg.request_id)
            self.engine.abort_request(msg.request_id)
            return refuse(f"node {self.node_id} could not queue the request: {type(e).__name__}: {e}", 500)
        self._owners[msg.request_id] = ident
        self.accepted(ident, msg)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # never leave requests hanging on an engine fault
            log.exception("node %s: engine step failed; failing its requests", self.node_id)
            outputs = [o for rid in list(self._owners)
                       if (o := self.engine.fail_request(rid, f"engine error on node {self.node_id}: {e}"))]
        batches: dict[bytes, list[proto.RequestUpdate]] = {}
        for out in outputs:
            if (addressed := self._update(out)) is not None:
                batches.setdefault(addressed[0], []).append(addressed[1])
        for ident, updates in batches.items():
            batch = updates[0] if len(updates) == 1 else proto.UpdateBatch(updates)
            self._sock.send_multipart([ident, proto.encode(batch)])

    def _send(self, out: RequestOutput | None) -> None:
        if (addressed := self._update(out)) is not None:
            self._sock.send_multipart([addressed[0], proto.encode(addressed[1])])

    def _update(self, out: RequestOutput | None) -> tuple[bytes, proto.RequestUpdate] | None:
        """The update for `out` and the router it goes to; None when nobody waits for it."""
        if out is None:
            return None
        ident = self._owners.get(out.request_id)
        if ident is None:
            return None
        if out.finished:
            del self._owners[out.request_id]
        comp = out.outputs[0]
        logprobs = None
        if comp.logprobs is not None and out.new_token_ids:
            logprobs = [proto.LogprobEntry(lp.token_id, lp.logprob, lp.rank, lp.top)
                        for lp in comp.logprobs[-len(out.new_token_ids):]]
        update = proto.RequestUpdate(
            out.request_id, new_token_ids=out.new_token_ids, new_text=out.new_text, finished=out.finished,
            finish_reason=comp.finish_reason if out.finished else None, stop_reason=comp.stop_reason,
            error=out.error, error_code=(400 if out.error_is_client_side else 503 if out.error_is_unavailable else 500)
            if out.error else 0,
            kv_transfer_params=out.kv_transfer_params, num_prompt_tokens=len(out.prompt_token_ids),
            num_cached_tokens=out.num_cached_tokens, logprobs=logprobs,
            num_output_tokens=len(comp.token_ids))
        return ident, update

    def stats(self) -> proto.NodeStats:
        connector = self.engine.connector
        return proto.NodeStats(node_id=self.node_id, role=self.role, pid=os.getpid(),
                               model=self.engine.model_config.name, block_size=self.engine.kv_spec.block_size,
                               engine=self.engine.stats(), draining=self._draining,
                               kv_events_address=self.engine.kv_events.address if self.engine.kv_events else "",
                               kv_events_replay_address=(self.engine.kv_events.replay_address
                                                         if self.engine.kv_events else ""),
                               block_hash_algo=self.engine.config.cache.prefix_hash_algo,
                               messages_dropped=self.messages_dropped,
                               kv_engine_id=connector.config.engine_id if connector is not None else None,
                               kv_service=_service_address(connector))


def _service_address(connector) -> str:
    """host:port of a producer's KV service ("" when it lends no KV): the router hands it
    to decode nodes when it dispatches a request to both nodes at once."""
    service = getattr(connector, "service", None)
    return f"{service.host}:{service.port}" if service is not None else ""


# --- process entry ------------------------------------------------------------------------
class NodeLaunchSpec(msgspec.Struct, kw_only=True):
    """Everything a node process needs, passed by the launcher as JSON (`--spec`)."""

    node_id: str
    role: str                                # prefill | decode | both
    model: str                               # a model directory (builtin names resolved by the launcher)
    dtype: str = "auto"
    load_format: str = "auto"
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int
    engine: dict[str, Any] = {}              # CacheConfig / SchedulerConfig fields
    kv_transfer: dict[str, Any] | None = None  # KVTransferConfig fields, role filled in per node kind
    log_level: str = "INFO"
    cpu_threads: int = 0                     # torch intra-op threads on CPU (0: torch's default)
    kv_events: bool = True                   # publish KV events (engine/kv_events.py) on free ports of `host`


_CACHE_KEYS = {"block_size", "num_blocks", "memory_fraction", "cpu_kv_cache_gib", "enable_prefix_caching",
               "prefix_hash_algo", "eviction_policy", "workflow_ttl_s"}
_SCHED_KEYS = {"max_num_seqs", "max_num_batched_tokens", "max_model_len", "enable_chunked_prefill"}
_ENGINE_KEYS = {"enforce_eager"}


def engine_config_from_spec(spec: NodeLaunchSpec, kv_role: str | None) -> EngineConfig:
    from engine.config import CacheConfig, KVEventsConfig, SchedulerConfig

    unknown = set(spec.engine) - _CACHE_KEYS - _SCHED_KEYS - _ENGINE_KEYS
    if unknown:
        raise ValueError(f"unknown engine settings {sorted(unknown)}")
    kv = None
    if kv_role is not None and spec.kv_transfer is not None:
        from kv_connector.config import KVTransferConfig
        kv = KVTransferConfig(**{**spec.kv_transfer, "kv_role": kv_role})
    return EngineConfig(
        model=spec.model, dtype=spec.dtype, device=spec.device, load_format=spec.load_format,
        cache=CacheConfig(**{k: v for k, v in spec.engine.items() if k in _CACHE_KEYS}),
        scheduler=SchedulerConfig(**{k: v for k, v in spec.engine.items() if k in _SCHED_KEYS}),
        enforce_eager=bool(spec.engine.get("enforce_eager", False)), background_grammar_compile=True,
        kv_transfer=kv, kv_events=KVEventsConfig(enable=spec.kv_events, host=spec.host))


def run_node(argv: list[str] | None, kv_role: str | None, server_class: type[NodeServer] = NodeServer) -> int:
    """`python -m prefill_node --spec JSON` and friends land here, each with its role's
    NodeServer subclass."""
    import argparse
    import sys

    from engine.process import die_with_parent

    parser = argparse.ArgumentParser(description="a pdcluster serving node (started by `pdcluster up`)")
    parser.add_argument("--spec", required=True, help="NodeLaunchSpec as JSON")
    args = parser.parse_args(argv)
    spec = msgspec.json.decode(args.spec, type=NodeLaunchSpec)
    logging.basicConfig(level=spec.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s node={spec.node_id} %(name)s: %(message)s")
    die_with_parent()
    if spec.cpu_threads:
        import torch
        torch.set_num_threads(spec.cpu_threads)
    try:
        server = server_class(spec.node_id, spec.role, engine_config_from_spec(spec, kv_role), spec.host, spec.port)
    except Exception as e:
        log.exception("node %s failed to start", spec.node_id)
        print(f"node {spec.node_id} failed to start: {e}", file=sys.stderr)
        return 1
    server.serve_forever()
    return 0
