"""Moves a request's KV blocks between two processes with one NIXL READ.

The engine keeps ONE contiguous KV tensor per node, (num_blocks, num_layers, 2, block_size,
num_kv_heads, head_dim), so one block's KV for every layer is one run of `block_bytes`
bytes at `base + block_id * block_bytes`. This module registers that tensor once and lets
the consumer pull any list of the producer's blocks into any list of its own blocks:

    producer                                  consumer
    t = NixlTransport("prefill-0")            t = NixlTransport("decode-0")
    t.register_kv_cache(kv, block_bytes)      t.register_kv_cache(kv, block_bytes)
    (send t.agent_metadata(), t.local_layout() over the handshake)
                                              peer = t.add_peer(metadata, layout)
                                              h = t.read_blocks(peer, their_ids, my_ids, b"req-7")
                                              while t.poll(h) == "PENDING": ...
                                              t.release(h)
    t.get_notifs() -> {"decode-0": [b"req-7"]}   (the producer may now free its blocks)

Descriptor granularity (the decision, and why). Measured with bench/gpu/kv_transfer_bench.py
on 2x H200 (NV18), one READ of 256 blocks x 2 MiB (a 4k-token Llama-3-8B request, 512 MiB),
against torch's peer copy cuda:0 -> cuda:1 at 394 GB/s:

                                          contiguous   16 runs of 16   256 lone blocks
    per-block list, NIXL merge, 1 worker     250 GB/s        245             163
    + runs cut at 32 MiB, 8 UCX threads   316-320 (0.81)  324-334 (0.84)  213-216 (0.55)
    + split_batch_size 1 (the default)    348 (0.88)      352 (0.89)      216 (0.55)

* Both descriptor lists are prepared ONCE (`prep_xfer_dlist`): the local one at
  registration, the remote one in `add_peer`. A transfer only passes two index arrays to
  `make_prepped_xfer`; nothing is built per request (building lists per transfer is what
  made 32 KiB descriptors crawl at 5 GB/s).
* One descriptor per block, and no second, coarser list: `make_prepped_xfer` itself merges
  consecutive index pairs whose addresses are adjacent on BOTH sides (nixl 1.5.1; the test
  checks NIXL's own descriptor count), so a run of blocks contiguous on both nodes already
  travels as large descriptors. `read_blocks` sorts the pairs by remote id first (the
  order of a READ's pieces is free), which also makes runs descending on both sides (a
  LIFO free list) mergeable.
* The measured problem was the opposite of too-small descriptors: one 512 MiB descriptor
  ran at 250 GB/s, though one in-process pull copy of the same bytes (cudaMemcpyAsync
  issued on cuda:1, as a READ over CUDA IPC is) reaches 393 GB/s. So `read_blocks` cuts
  runs into descriptors of at most `max_desc_bytes` (32 MiB) and the UCX backend gets
  `num_threads` worker threads (8). Sweeps: 8/16/32/64 MiB pieces gave 276/315/318/304
  GB/s contiguous; 4, 8 and 16 threads were within the run-to-run spread (about +-10 GB/s).
* How NIXL 1.5.1 spreads a READ over its threads (read from the UCX plugin's machine code,
  nixlUcxThreadPoolEngine::prepXfer): a READ of n >= `split_batch_size` descriptors is cut
  into chunks of max(n // num_threads, split_batch_size) descriptors, one chunk per
  thread; smaller READs go to the caller's shared worker. `split_batch_size` is NOT raised
  to num_threads. So with split 8 a 16-descriptor READ (512 MiB cut at 32 MiB) uses only
  2 of the 8 threads; `split_batch_size=1` (the default) uses all of them.
* Streams: UCX's cuda_ipc transport (uct_cuda_ipc_get_stream_and_event) picks the CUDA
  stream by the REMOTE GPU's index modulo UCX_CUDA_IPC_MAX_STREAMS, per worker: all copies
  one worker makes from one peer GPU share one stream, whatever MAX_STREAMS is. More
  streams for one peer only come from more workers (threads).
* Lone 2 MiB blocks stay at ~0.55 of peer copy: the copy engine's per-copy cost caps them
  (in one process, 256 x 2 MiB pulls reach 135 GB/s on one stream, 177 on eight; pushes
  266). Neither descriptor lists nor UCX settings fixed that; keeping a request's blocks in
  runs does (the block pool hands out contiguous runs), or a gather into a contiguous
  staging run on the producer before the READ (measured by the bench's `gathered` pattern).
* Measured 2026-11-23 on 2x H200 (bench/results/2026-11-23-h200x2/kv_transfer.json), one
  4k-token request, median of 30, torch peer copy 394 GB/s:

      variant                          contiguous     runs of 16     scattered     gathered
      8 threads, split 1, 32 MiB       348 (0.88)     352 (0.89)     216 (0.55)    283 (0.72)
      8 threads, split 8 (old)         334-342 (0.85-0.87)  341-346  220 (0.56)    287 (0.73)
      16 threads, split 1, 32 MiB      347 (0.88)     334 (0.85)     215 (0.54)    293 (0.74)
      K=2/4/8 READs per request        315-330        331-340        220           277-287
      NIXL_UCX_SGL_ENABLE=y            316 (0.80)     324            213           269

  So the defaults are 8 threads, split_batch_size 1, 32 MiB pieces, one READ: 0.88 of peer
  copy for a request whose blocks form runs (what the block pool hands out). Lone
  scattered blocks stay at 0.55; a producer-side gather into a staging run (0.29 ms for
  512 MiB) lifts them to 0.73 — not wired into the connector yet. The remaining gap to
  the in-process pull of the same pieces (361 GB/s) is NIXL/UCX posting overhead:
  `read_blocks` takes ~160-250 us of the ~1.5 ms.
* Other options, kept for the bench: `reads_per_request` posts one `read_blocks` as K NIXL
  READs back to back; `progress_thread=False` drops NIXL's progress thread (neither beat
  the defaults above; without the thread, READs from DRAM over UCX's emulated transports
  stall, as nobody progresses the producer). `progress_delay_us` lets that thread sleep
  between polls instead of spinning (DEFAULT_PROGRESS_DELAY_US).

Threading: NIXL agents are created unsynchronised (NIXL_THREAD_SYNC_NONE), so every method
must be called from the thread that constructed the transport (checked; RuntimeError
otherwise). UCX's own progress thread runs inside NIXL and needs nothing from the caller.
Values that other threads need — `agent_metadata()` bytes and `local_layout()` — are plain
immutable Python objects: fetch them on the owner thread and hand them to, e.g., the
handshake server thread.

Memory: the registered tensor must stay allocated until `close()` (the transport keeps a
reference). On CUDA it must come from a plain cudaMalloc: with PyTorch's
`expandable_segments:True` UCX cannot export it over CUDA IPC and silently falls back to a
path below 1 GB/s (a warning is logged).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec
import numpy as np

logger = logging.getLogger(__name__)

MemType = Literal["DRAM", "VRAM"]
PollState = Literal["DONE", "PENDING"]

# Chosen by bench/gpu/kv_transfer_bench.py on 2x H200 (see the module docstring).
DEFAULT_NUM_THREADS = 8  # UCX worker threads: each posts its share of a READ on its own CUDA stream
DEFAULT_SPLIT_BATCH_SIZE = 1  # every READ is spread over all the threads (measured best, 0.88)
DEFAULT_MAX_DESC_BYTES = 32 << 20  # longer contiguous runs are cut into descriptors of this size
DEFAULT_READS_PER_REQUEST = 1  # NIXL READs one read_blocks call is posted as
# Microseconds NIXL's progress thread sleeps between polls (NIXL's Python API uses 0: a busy
# spin that takes a core per node for as long as it lives). See nixl_compat.make_agent.
DEFAULT_PROGRESS_DELAY_US = 10


class KVRegionLayout(msgspec.Struct, frozen=True):
    """Where a node's KV blocks live, as a peer must know to address them (sent in the handshake).

    Block `i` occupies bytes [base_addr + i*block_bytes, base_addr + (i+1)*block_bytes) of
    memory `mem_type` on device `device_id` (0 for DRAM) of the process running NIXL agent
    `agent_name`.
    """

    agent_name: str
    base_addr: int
    num_blocks: int
    block_bytes: int
    mem_type: str  # "DRAM" or "VRAM"
    device_id: int


class TransferError(RuntimeError):
    """A NIXL transfer could not be started or ended in error."""


@dataclass(slots=True, eq=False)
class ReadHandle:
    """One in-flight READ from `read_blocks`. Poll it with `poll`, then `release` it."""

    peer: str
    num_blocks: int
    nbytes: int
    num_descs: int  # descriptors after merging adjacent runs (1 = one contiguous range)
    notif: bytes
    _xfers: list[Any] = field(repr=False)  # NIXL READs posted for this call (reads_per_request of them at most)
    _pending: list[Any] = field(repr=False)  # those not yet seen DONE
    done: bool = False
    released: bool = False

    @property
    def num_reads(self) -> int:
        """NIXL READs this call was posted as (see NixlTransport's reads_per_request)."""
        return len(self._xfers)


@dataclass(slots=True)
class _Peer:
    layout: KVRegionLayout
    metadata: bytes
    dlist: Any  # NIXL prepared descriptor list: one descriptor per remote block


def _block_descs(base_addr: int, num_blocks: int, block_bytes: int, device_id: int) -> np.ndarray:
    """(num_blocks, 3) uint64 rows of (address, length, device id): one descriptor per block."""
    descs = np.empty((num_blocks, 3), dtype=np.uint64)
    descs[:, 0] = np.uint64(base_addr) + np.arange(num_blocks, dtype=np.uint64) * np.uint64(block_bytes)
    descs[:, 1] = block_bytes
    descs[:, 2] = device_id
    return descs


def _as_block_ids(ids: Sequence[int] | np.ndarray, num_blocks: int, side: str) -> np.ndarray:
    """Validated int32 block ids (NIXL takes int32 indices)."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{side} block ids must be a flat sequence of ints, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{side} block ids must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= num_blocks):
        bad = arr[(arr < 0) | (arr >= num_blocks)]
        raise ValueError(f"{side} block ids {bad[:8].tolist()} are out of range: the {side} KV cache has "
                         f"{num_blocks} blocks (ids 0..{num_blocks - 1})")
    return arr.astype(np.int32, copy=False)


def _bounded_runs(remote: np.ndarray, local: np.ndarray, max_blocks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorder (remote, local) pairs, sorted by remote id, so NIXL's merge yields runs of at most `max_blocks`.

    NIXL merges consecutive pairs adjacent on both sides, however long the run. Runs are
    cut into pieces of `max_blocks` and the pieces listed in descending order: the next
    piece then starts before the previous one, so NIXL cannot glue them back together,
    while each piece's blocks stay ascending and merge into one descriptor. Returns the
    reordered ids and the ascending positions (in the new order) where NIXL's descriptors
    start: one entry per descriptor it will send.
    """
    n = remote.size
    run_start = np.empty(n, dtype=bool)
    run_start[0] = True
    np.not_equal(np.diff(remote), 1, out=run_start[1:])
    run_start[1:] |= np.diff(local) != 1
    starts = np.flatnonzero(run_start)
    if n - starts[-1] <= max_blocks and (starts.size == 1 or np.diff(starts).max() <= max_blocks):
        return remote, local, starts  # every run fits in one descriptor: keep the order
    idx = np.arange(n)
    pos_in_run = idx - np.maximum.accumulate(np.where(run_start, idx, 0))
    piece_starts = np.flatnonzero(pos_in_run % max_blocks == 0)[::-1]  # descending
    piece_lens = np.diff(np.append(piece_starts[::-1], n))[::-1]
    offsets = np.cumsum(piece_lens) - piece_lens  # where each piece lands in the new order
    order = np.repeat(piece_starts - offsets, piece_lens) + idx
    return remote[order], local[order], offsets


def _read_groups(desc_starts: np.ndarray, n: int, max_reads: int) -> list[tuple[int, int]]:
    """[start, end) ranges of the reordered pairs, one per NIXL READ: descriptors dealt into
    at most `max_reads` groups of consecutive descriptors, equal in count (+-1)."""
    if max_reads <= 1 or desc_starts.size <= 1:
        return [(0, n)]
    firsts = [int(g[0]) for g in np.array_split(desc_starts, min(max_reads, desc_starts.size))]
    return list(zip(firsts, firsts[1:] + [n]))


def _warn_if_expandable_segments() -> None:
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        if "expandable_segments:true" in os.environ.get(var, "").replace(" ", "").lower():
            logger.warning("%s enables expandable_segments: UCX cannot share such CUDA memory over CUDA IPC "
                           "and falls back to a path below 1 GB/s. Allocate the KV cache with "
                           "expandable_segments off (torch.cuda.memory._set_allocator_settings"
                           "('expandable_segments:False') around the allocation).", var)


class NixlTransport:
    """One NIXL agent (UCX backend) for this process, holding one registered KV cache.

    `num_threads` > 0 gives UCX that many worker threads; a READ of n >= `split_batch_size`
    descriptors is cut into chunks of max(n // num_threads, split_batch_size) descriptors,
    one per thread, each thread posting its chunk on its own CUDA stream (module
    docstring). `max_desc_bytes` caps the descriptors NIXL's merging builds from contiguous
    runs (None: no cap), so that a long run can be spread over the threads.
    `reads_per_request` > 1 posts each `read_blocks` as up to that many NIXL READs of
    consecutive descriptors, back to back (the notification then goes out once all have
    landed). `progress_thread=False` creates the agent without NIXL's progress thread: the
    caller's `poll` then drives its worker (and a producer must call `get_notifs` to
    receive notifications). `backend_params` passes further UCX backend options verbatim
    (strings). `capture_telemetry` enables `descs_sent` (tests, benches). The defaults are
    the measured best on 2x H200 (module docstring); threads block while no transfer is in
    flight and busy-poll while one is.
    """

    def __init__(self, agent_name: str, *, num_threads: int = DEFAULT_NUM_THREADS,
                 split_batch_size: int | None = DEFAULT_SPLIT_BATCH_SIZE,
                 max_desc_bytes: int | None = DEFAULT_MAX_DESC_BYTES,
                 reads_per_request: int = DEFAULT_READS_PER_REQUEST, progress_thread: bool = True,
                 progress_delay_us: int = DEFAULT_PROGRESS_DELAY_US,
                 backend_params: dict[str, str] | None = None, capture_telemetry: bool = False):
        from kv_connector.nixl_compat import make_agent, nixl_agent_config  # ImportError says what to install

        if not agent_name:
            raise ValueError("agent_name must be a non-empty string, unique among the cluster's NIXL agents")
        if max_desc_bytes is not None and max_desc_bytes <= 0:
            raise ValueError(f"max_desc_bytes must be positive or None (no limit), got {max_desc_bytes}")
        if isinstance(reads_per_request, bool) or not isinstance(reads_per_request, int) or reads_per_request < 1:
            raise ValueError(f"reads_per_request must be an int >= 1 (1: one NIXL READ per read_blocks), "
                             f"got {reads_per_request!r}")
        params = dict(backend_params or {})
        if num_threads:
            params["num_threads"] = str(int(num_threads))
            if split_batch_size is not None:
                params["split_batch_size"] = str(int(split_batch_size))
        self.name = agent_name
        self._owner = threading.get_ident()
        self._max_desc_bytes = max_desc_bytes
        self._max_desc_blocks = 1 << 30  # set from block_bytes at registration
        self._reads_per_request = reads_per_request
        self._telemetry = capture_telemetry
        # Backends are created explicitly so that every UCX option can be passed.
        self._agent = make_agent(agent_name, nixl_agent_config(enable_prog_thread=progress_thread, backends=[],
                                                               capture_telemetry=capture_telemetry),
                                 progress_delay_us)
        if "UCX" not in self._agent.get_plugin_list():
            raise RuntimeError(f"NIXL found no UCX plugin (has {self._agent.get_plugin_list()}): "
                               "reinstall the nixl wheel, which ships it")
        self._agent.create_backend("UCX", params)
        self._region: KVRegionLayout | None = None
        self._tensor = None  # the registered tensor, kept alive while NIXL points into it
        self._reg_descs = None
        self._local_dlist = None
        self._metadata: bytes | None = None
        self._peers: dict[str, _Peer] = {}
        self._in_flight: set[ReadHandle] = set()
        self._closed = False
        logger.info("nixl agent=%s created backend=UCX params=%s reads_per_request=%d progress_thread=%s "
                    "progress_delay_us=%d", agent_name, params, reads_per_request, progress_thread, progress_delay_us)

    # ------------------------------------------------------------------ local side
    def register_kv_cache(self, tensor, block_bytes: int) -> KVRegionLayout:
        """Register the whole KV tensor once and prepare the local per-block descriptor list.

        `tensor` is contiguous with blocks along dim 0 (shape (num_blocks, ...)) on CPU or one
        CUDA device; `block_bytes` is the size of one block. Returns `local_layout()`.
        """
        self._check_usable()
        if self._region is not None:
            raise RuntimeError(f"agent {self.name} already registered a KV cache; one transport serves one "
                               "cache: close() it and make a new transport to register another")
        if tensor.device.type not in ("cpu", "cuda"):
            raise ValueError(f"KV cache on {tensor.device} cannot be registered: NIXL moves CPU (DRAM) or CUDA "
                             "(VRAM) memory")
        if not tensor.is_contiguous():
            raise ValueError("the KV cache tensor must be contiguous: a block must be one run of bytes")
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.dim() == 0 or block_bytes <= 0 or tensor.shape[0] * block_bytes != nbytes:
            expected = nbytes // tensor.shape[0] if tensor.dim() and tensor.shape[0] else 0
            raise ValueError(f"block_bytes={block_bytes} does not fit a KV tensor of shape {tuple(tensor.shape)} "
                             f"({nbytes} bytes): blocks run along dim 0, so block_bytes must be {expected}")
        if tensor.is_cuda:
            _warn_if_expandable_segments()
            mem_type, device_id = "VRAM", tensor.device.index if tensor.device.index is not None else 0
        else:
            mem_type, device_id = "DRAM", 0
        num_blocks = int(tensor.shape[0])
        if self._max_desc_bytes is not None:
            self._max_desc_blocks = max(1, self._max_desc_bytes // block_bytes)
        self._reg_descs = self._agent.register_memory(tensor)
        self._tensor = tensor
        self._local_dlist = self._agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT", _block_descs(tensor.data_ptr(), num_blocks, block_bytes, device_id), mem_type)
        self._region = KVRegionLayout(agent_name=self.name, base_addr=int(tensor.data_ptr()),
                                      num_blocks=num_blocks, block_bytes=int(block_bytes),
                                      mem_type=mem_type, device_id=int(device_id))
        # Taken after registration: the metadata carries the region's remote keys.
        self._metadata = bytes(self._agent.get_agent_metadata())
        logger.info("nixl agent=%s registered mem=%s device=%d blocks=%d block_bytes=%d", self.name, mem_type,
                    device_id, num_blocks, block_bytes)
        return self._region

    def local_layout(self) -> KVRegionLayout:
        return self._require_registered()

    def agent_metadata(self) -> bytes:
        """This agent's NIXL metadata (connection info and memory keys) for peers' `add_peer`."""
        self._require_registered()
        assert self._metadata is not None
        return self._metadata

    # ------------------------------------------------------------------ peers
    def add_peer(self, metadata: bytes, layout: KVRegionLayout) -> str:
        """Add a remote agent and prepare its per-block descriptor list once; returns the peer name.

        Calling it again with the same metadata and layout is free; a peer that restarted
        (new metadata or layout under the same name) is replaced.
        """
        self._check_usable()
        region = self._require_registered()
        if layout.block_bytes != region.block_bytes:
            raise ValueError(f"blocks are {layout.block_bytes} bytes on peer {layout.agent_name} but "
                             f"{region.block_bytes} here: both nodes must run the same model with the same "
                             "dtype, block_size and KV layout (the handshake's compat check says which differs)")
        if layout.mem_type not in ("DRAM", "VRAM"):
            raise ValueError(f"peer {layout.agent_name} reports memory type {layout.mem_type!r}: expected DRAM or VRAM")
        if layout.agent_name == self.name:
            raise ValueError(f"peer {layout.agent_name!r} has this agent's own name: agent names must be unique "
                             "in the cluster")
        known = self._peers.get(layout.agent_name)
        if known is not None:
            if known.layout == layout and known.metadata == metadata:
                return layout.agent_name
            logger.info("nixl agent=%s peer=%s changed (restarted?): replacing it", self.name, layout.agent_name)
            self.remove_peer(layout.agent_name)
        name = self._agent.add_remote_agent(metadata)
        name = name.decode() if isinstance(name, bytes) else str(name)
        if name != layout.agent_name:
            self._agent.remove_remote_agent(name)
            raise ValueError(f"handshake mismatch: the metadata is agent {name!r}'s but the layout names "
                             f"{layout.agent_name!r}")
        dlist = self._agent.prep_xfer_dlist(
            name, _block_descs(layout.base_addr, layout.num_blocks, layout.block_bytes, layout.device_id),
            layout.mem_type)
        self._peers[name] = _Peer(layout=layout, metadata=bytes(metadata), dlist=dlist)
        logger.info("nixl agent=%s added peer=%s mem=%s blocks=%d", self.name, name, layout.mem_type,
                    layout.num_blocks)
        return name

    def remove_peer(self, peer: str) -> None:
        """Forget a peer: releases its descriptor list and disconnects. Release its reads first."""
        self._check_usable()
        p = self._peers.pop(peer, None)
        if p is None:
            raise ValueError(f"unknown peer {peer!r} (known: {sorted(self._peers)})")
        pending = [h for h in self._in_flight if h.peer == peer]
        for h in pending:
            self._release_quietly(h)
        p.dlist.release()
        self._agent.remove_remote_agent(peer)

    def peers(self) -> list[str]:
        return sorted(self._peers)

    # ------------------------------------------------------------------ transfers
    def read_blocks(self, peer: str, remote_block_ids: Sequence[int] | np.ndarray,
                    local_block_ids: Sequence[int] | np.ndarray, notif: bytes = b"") -> ReadHandle:
        """Start a READ of the peer's blocks `remote_block_ids[i]` into `local_block_ids[i]`.

        Posted as one NIXL READ, or as up to `reads_per_request` of them (constructor).
        `notif` (if not empty) reaches the peer's `get_notifs()` after all the bytes have
        landed; it is sent while `poll` drives the transfer, so poll until "DONE".
        Raises ValueError for bad ids (lengths differ, out of range, a local id repeated)
        and TransferError when NIXL refuses the transfer.
        """
        self._check_usable()
        region = self._require_registered()
        p = self._peers.get(peer)
        if p is None:
            raise ValueError(f"unknown peer {peer!r}: add_peer() it first (known: {sorted(self._peers)})")
        if not isinstance(notif, (bytes, bytearray)):
            raise TypeError(f"notif must be bytes, got {type(notif).__name__}")
        remote = _as_block_ids(remote_block_ids, p.layout.num_blocks, "remote")
        local = _as_block_ids(local_block_ids, region.num_blocks, "local")
        if remote.size != local.size:
            raise ValueError(f"{remote.size} remote block ids but {local.size} local ones: each remote block "
                             "needs exactly one local block")
        if remote.size == 0:
            raise ValueError("read_blocks needs at least one block")
        ordered = np.sort(local)
        if np.any(ordered[1:] == ordered[:-1]):
            vals, counts = np.unique(local, return_counts=True)
            raise ValueError(f"local block ids {vals[counts > 1][:8].tolist()} appear more than once: two remote "
                             "blocks would land in the same local block")
        if remote.size > 1 and np.any(remote[1:] < remote[:-1]):
            order = np.argsort(remote, kind="stable")  # helps NIXL merge runs; order of pieces is free
            remote, local = remote[order], local[order]
        remote, local, desc_starts = _bounded_runs(remote, local, self._max_desc_blocks)
        groups = _read_groups(desc_starts, int(remote.size), self._reads_per_request)
        # One READ carries the notification itself; split READs may finish in any order, so
        # poll() sends it once all of them are DONE.
        xfer_notif = bytes(notif) if len(groups) == 1 else b""
        posted: list[tuple[Any, bool]] = []  # (xfer, DONE at posting)
        try:
            for start, end in groups:
                posted.append(self._post_read(p, peer, local[start:end], remote[start:end], xfer_notif))
        except BaseException:
            for xfer, _ in posted:
                self._release_xfer_quietly(xfer, peer)
            raise
        handle = ReadHandle(peer=peer, num_blocks=int(remote.size), nbytes=int(remote.size) * region.block_bytes,
                            num_descs=int(desc_starts.size), notif=bytes(notif), _xfers=[x for x, _ in posted],
                            _pending=[x for x, done in posted if not done])
        self._in_flight.add(handle)
        if not handle._pending:
            self._finish(handle)
        return handle

    def _post_read(self, p: _Peer, peer: str, local: np.ndarray, remote: np.ndarray, notif: bytes) -> tuple[Any, bool]:
        """make_prepped_xfer + transfer for one NIXL READ; returns (xfer, already DONE)."""
        try:
            xfer = self._agent.make_prepped_xfer("READ", self._local_dlist, local, p.dlist, remote, notif)
        except Exception as e:  # nixl raises its own exception types (nixlInvalidParamError, ...)
            raise TransferError(f"NIXL refused a READ of {remote.size} blocks from peer {peer}: {e}") from e
        try:
            state = self._agent.transfer(xfer)
        except Exception as e:
            xfer.release()
            raise TransferError(f"NIXL could not post a READ of {remote.size} blocks from peer {peer}: {e}") from e
        if state == "ERR":
            xfer.release()
            raise TransferError(f"NIXL could not post a READ of {remote.size} blocks from peer {peer}: is the "
                                "peer still alive and its KV cache still registered?")
        return xfer, state == "DONE"

    def _finish(self, handle: ReadHandle) -> None:
        """Every READ of `handle` landed: send a split read's notification, mark it done."""
        if len(handle._xfers) > 1 and handle.notif:
            self._agent.send_notif(handle.peer, handle.notif)
        handle.done = True

    def poll(self, handle: ReadHandle) -> PollState:
        """"DONE" once every byte has landed, else "PENDING"; raises TransferError if the READ failed."""
        self._check_thread()
        if handle.released:
            raise ValueError("this read was already released")
        if handle.done:
            return "DONE"
        still: list[Any] = []
        for xfer in handle._pending:
            state = self._agent.check_xfer_state(xfer)
            if state == "PROC":
                still.append(xfer)
            elif state != "DONE":
                raise TransferError(
                    f"NIXL READ of {handle.num_blocks} blocks ({handle.nbytes / 2**20:.1f} MiB) from peer "
                    f"{handle.peer} failed: the peer may have exited or deregistered its KV cache. The local "
                    "blocks hold partial data: release the handle, then retry or recompute them")
        handle._pending = still
        if still:
            return "PENDING"
        self._finish(handle)
        return "DONE"

    def wait(self, handle: ReadHandle, timeout_s: float = 60.0) -> None:
        """Poll until DONE (busy: polling is what drives the transfer); TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while self.poll(handle) == "PENDING":
            if time.monotonic() > deadline:
                raise TimeoutError(f"NIXL READ of {handle.num_blocks} blocks from peer {handle.peer} did not finish "
                                   f"in {timeout_s:.1f} s")

    def release(self, handle: ReadHandle) -> None:
        """Free the READ's resources. Releasing one still in flight asks NIXL to cancel it;
        when NIXL cannot yet, TransferError, and the handle stays live with what is left:
        poll it, and release it again (its local blocks may still be written until then)."""
        self._check_thread()
        if handle.released:
            return
        kept, errors = [], []
        for xfer in handle._xfers:
            try:
                xfer.release()
            except Exception as e:
                kept.append(xfer)
                errors.append(e)
        handle._xfers = kept
        handle._pending = [x for x in handle._pending if any(x is k for k in kept)]
        if errors:
            raise TransferError(f"NIXL could not release a READ from peer {handle.peer} (still in flight and not "
                                f"cancellable yet): {errors[0]}") from errors[0]
        handle.released = True
        self._in_flight.discard(handle)

    def descs_sent(self, handle: ReadHandle) -> int:
        """Descriptors NIXL actually sent for a finished READ (needs capture_telemetry=True)."""
        self._check_thread()
        if not self._telemetry:
            raise RuntimeError("descs_sent needs NixlTransport(..., capture_telemetry=True)")
        return sum(int(self._agent.get_xfer_telemetry(x).descCount) for x in handle._xfers)

    # ------------------------------------------------------------------ notifications
    def send_notif(self, peer: str, msg: bytes) -> None:
        """Send a standalone notification (not tied to a transfer) to a known peer."""
        self._check_usable()
        if peer not in self._peers:
            raise ValueError(f"unknown peer {peer!r}: add_peer() it first (known: {sorted(self._peers)})")
        self._agent.send_notif(peer, bytes(msg))

    def get_notifs(self) -> dict[str, list[bytes]]:
        """Notifications received since the last call: {sender agent name: [messages in order]}."""
        self._check_usable()
        got = self._agent.get_new_notifs()
        return {(k.decode() if isinstance(k, bytes) else str(k)): list(v) for k, v in got.items()}

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Release every read, peer and descriptor list, deregister the KV cache. Idempotent."""
        if self._closed:
            return
        self._check_thread()
        for h in list(self._in_flight):
            self._release_quietly(h)
        for name in list(self._peers):
            try:
                self.remove_peer(name)
            except Exception:
                logger.exception("nixl agent=%s could not remove peer=%s while closing", self.name, name)
        if self._local_dlist is not None:
            self._local_dlist.release()
            self._local_dlist = None
        if self._reg_descs is not None:
            self._agent.deregister_memory(self._reg_descs)
            self._reg_descs = None
        self._tensor = None
        self._closed = True
        self._agent = None  # the C++ agent is destroyed with its last reference

    def __enter__(self) -> NixlTransport:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers
    def _release_quietly(self, h: ReadHandle) -> None:
        try:
            self.release(h)
        except Exception:
            logger.exception("nixl agent=%s could not release a read from peer=%s", self.name, h.peer)
            self._in_flight.discard(h)

    def _release_xfer_quietly(self, xfer: Any, peer: str) -> None:
        try:
            xfer.release()
        except Exception:
            logger.exception("nixl agent=%s could not release a READ from peer=%s", self.name, peer)

    def _check_thread(self) -> None:
        if threading.get_ident() != self._owner:
            raise RuntimeError(f"NixlTransport {self.name} was called from thread {threading.get_ident()} but belongs "
                               f"to thread {self._owner}: NIXL agents are not thread-safe; call it from the thread "
                               "that created it")

    def _check_usable(self) -> None:
        self._check_thread()
        if self._closed:
            raise RuntimeError(f"NixlTransport {self.name} is closed")

    def _require_registered(self) -> KVRegionLayout:
        if self._region is None:
            raise RuntimeError(f"agent {self.name} has no KV cache registered: call register_kv_cache() first")
        return self._region
