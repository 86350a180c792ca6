"""Continuous batching with chunked prefill, prefix caching and preemption by recompute.

Every step the scheduler hands out a token budget (`max_num_batched_tokens`): first to
running requests (one token each when decoding, a chunk when still prefilling or
recomputing), then to waiting ones in arrival order. A request is admitted when the
blocks it newly needs are free; blocks found in the prefix cache need not be
(seed idea: prefix-cache-aware admission). When a running request needs a block and
none is free, the most recently admitted request is preempted: its blocks go back to
the pool and it will be computed again from its tokens (the prefix cache usually makes
that cheap).

The seams for a KV connector (see kv_connector/): a request that carries
`kv_transfer_params` asks the connector how many of its prompt tokens will arrive from
outside, gets blocks for them, and waits in `waiting_for_remote_kv` while they load,
without holding up the steps of others. `remote_kv_ready()` brings it back, told which
blocks failed so that only those are computed again. On a producer, the connector may
keep a finished request's blocks until the consumer has read them.

Forks (engine/forking.py): a request with `fork_of` is admitted sharing that request's
prompt blocks (a reference each, a copy of the block where they start to differ); it
waits while that request's KV is still on its way, and falls back to the prefix cache
when that request is gone.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from engine.block_pool import BlockPool
from engine.config import CacheConfig, SchedulerConfig
from engine.forking import ForkStats, fork_point, parent_ready
from engine.request import Request, RequestStatus


class SchedulerConnector(Protocol):
    """What the scheduler asks of a KV connector. All calls come from the engine thread."""

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        """Tokens after the first `num_computed_tokens` whose KV another node will provide."""

    def start_load(self, request: Request, num_computed_tokens: int, num_external_tokens: int) -> None:
        """Blocks are allocated (request.block_ids): begin filling tokens
        [num_computed_tokens, num_computed_tokens + num_external_tokens). Must not block;
        the engine later calls Scheduler.remote_kv_ready()."""

    def request_finished(self, request: Request) -> bool:
        """The request ended. True: the connector keeps its blocks (a consumer will read
        them) and returns them later with Scheduler.release_blocks()."""


@dataclass(slots=True)
class ScheduledChunk:
    request: Request
    start: int        # position of the first token computed this step
    num_tokens: int
    sample: bool      # the chunk reaches the last known token: sample the next one


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)


class Scheduler:
    def __init__(self, cache: CacheConfig, config: SchedulerConfig, pool: BlockPool,
                 connector: SchedulerConnector | None = None,
                 copy_blocks: Callable[[list[int], list[int]], None] | None = None):
        """`copy_blocks(src, dst)` copies KV blocks on the device (the engine's KV cache);
        without it, forks fall back to the prefix cache."""
        self.cache = cache
        self.config = config
        self.pool = pool
        self.block_size = cache.block_size
        self.connector = connector
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.waiting_for_remote_kv: dict[str, Request] = {}
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.copy_blocks = copy_blocks
        self.fork_stats = ForkStats()
        # Finished requests whose blocks the connector keeps (lent to a consumer): forks
        # may still share them. Keyed by id, and by last block id (unique to its request:
        # the block of a request's last token is never shared), which is how
        # release_blocks() recognises them when the blocks come back.
        self._lent: dict[str, Request] = {}
        self._lent_by_tail: dict[int, str] = {}
        # Whether a waiting request (by id) may be admitted (its grammar may still be compiling).
        self.ready: Callable[[str], bool] = lambda request_id: True

    # --- queue changes --------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        request.update_block_hashes(self.block_size, self.cache.prefix_hash_algo)
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.pool.workflow_started(request.cache_owner)

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        """End a request wherever it is and give back its blocks (or leave them with the
        connector, which then owns returning them)."""
        assert status.finished
        if request.status.finished:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(request)
        elif request.status == RequestStatus.WAITING_FOR_REMOTE_KV:
            del self.waiting_for_remote_kv[request.request_id]
        request.status = status
        del self.requests[request.request_id]
        # Told of every end, blocks or not: a producer stops streaming it, a consumer stops
        # renewing its claim. Only a request with blocks can have them kept.
        held = self.connector is not None and self.connector.request_finished(request) and bool(request.block_ids)
        if not held:
            self.pool.free(request.block_ids)
        elif status == RequestStatus.FINISHED_LENGTH and request.num_computed_tokens:
            # Kept because it ran to its length and is lent (not a load still writing).
            self._lent[request.request_id] = request
            self._lent_by_tail[request.block_ids[-1]] = request.request_id
        request.block_ids = [] if not held else request.block_ids
        self.pool.workflow_finished(request.cache_owner)

    def release_blocks(self, block_ids: list[int]) -> None:
        """Return blocks a connector kept after their request finished."""
        rid = self._lent_by_tail.pop(block_ids[-1], None) if block_ids else None
        if rid is not None:
            self._lent.pop(rid, None)
        self.pool.free(block_ids)

    def remote_kv_ready(self, request_id: str, failed_block_ids: Iterable[int] = ()) -> None:
        """The connector finished filling a request's external tokens. Blocks in
        `failed_block_ids` did not arrive intact: their tokens are computed again here,
        the rest is kept."""
        request = self.waiting_for_remote_kv.pop(request_id)
        failed = set(failed_block_ids)
        # A streamed pull that brought no first token: the last prompt token is computed
        # here after all, to sample it.
        end = min(request.num_computed_tokens + request.num_external_tokens, request.num_tokens - 1)
        ranges: list[tuple[int, int]] = []
        for i, block in enumerate(request.block_ids):
            if block not in failed:
                continue
            lo, hi = i * self.block_size, min((i + 1) * self.block_size, end)
            if lo >= end:
                continue
            if ranges and ranges[-1][1] == lo:
                ranges[-1] = (ranges[-1][0], hi)
            else:
                ranges.append((lo, hi))
        self.pool.uncache(failed)
        request.recompute_ranges = ranges
        request.num_computed_tokens = end
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    # --- the step -------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: set[str] = set()
        i = 0
        # Loads that landed join `running` whatever its size (remote_kv_ready): a step takes
        # the first max_num_seqs, and the rest wait for a slot in arrival order.
        while i < len(self.running) and budget > 0 and len(out.chunks) < self.config.max_num_seqs:
            req = self.running[i]
            chunk = self._next_chunk(req, budget)
            if not self._ensure_blocks(req, chunk.start + chunk.num_tokens, out):
                continue  # req itself was preempted; the list shifted
            out.chunks.append(chunk)
            scheduled.add(req.request_id)
            budget -= chunk.num_tokens
            i += 1
        if out.preempted:
            return out  # memory is short: admit nothing new this step
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[i]
            if not self.ready(req.request_id):
                i += 1  # its grammar compiles: the requests behind it go first
                continue
            parent = self._fork_parent(req) if req.fork_of else None
            if parent is not None and not parent_ready(req, parent):
                i += 1  # its parent's KV is on its way: let the requests behind it go first
                continue
            admitted = self._admit(req, budget, out, parent)
            if admitted is None:
                break
            del self.waiting[i]
            if admitted.num_tokens == 0:  # went to wait for remote KV
                continue
            out.chunks.append(admitted)
            budget -= admitted.num_tokens
        return out

    def _next_chunk(self, req: Request, budget: int) -> ScheduledChunk:
        if req.recompute_ranges:
            lo, hi = req.recompute_ranges[0]
            return ScheduledChunk(req, lo, min(hi - lo, budget), sample=False)
        n = min(req.num_tokens - req.num_computed_tokens, budget)
        return ScheduledChunk(req, req.num_computed_tokens, n,
                              sample=req.num_computed_tokens + n == req.num_tokens)

    def _ensure_blocks(self, req: Request, num_tokens: int, out: SchedulerOutput) -> bool:
        """Give `req` blocks for `num_tokens` tokens, preempting from the back of the
        running list. False when `req` itself had to go."""
        need = self._blocks_for(num_tokens) - len(req.block_ids)
        while need > self.pool.num_free:
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is req:
                return False
        if need > 0:
            req.block_ids += self.pool.allocate(need, req.cache_owner)
        return True

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.pool.free(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0
        req.num_cached_tokens = 0
        req.num_published_blocks = 0
        req.recompute_ranges = []
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)
        self.num_preemptions += 1
        out.preempted.append(req)

    def _fork_parent(self, req: Request) -> Request | None:
        """The request `req` forks, while its KV is here (running, queued, or finished
        and lent); None, and `req` becomes an ordinary request, once it is gone."""
        parent = self.requests.get(req.fork_of) or self._lent.get(req.fork_of)
        if parent is None or parent is req or self.copy_blocks is None:
            req.fork_of = None
            self.fork_stats.fallbacks += 1
        return parent if req.fork_of else None

    def _admit(self, req: Request, budget: int, out: SchedulerOutput,
               parent: Request | None = None) -> ScheduledChunk | None:
        """Blocks and a first chunk for a waiting request, or None if it must wait.
        With a `parent` (ready, see engine/forking.py) it shares the parent's blocks."""
        req.update_block_hashes(self.block_size, self.cache.prefix_hash_algo)
        # At least one token must be computed to produce logits, so a prompt that is all
        # cached still recomputes its last token.
        max_hit_blocks = (req.num_tokens - 1) // self.block_size
        hits = self.pool.find_cached_prefix(req.block_hashes[:max_hit_blocks])
        num_computed = len(hits) * self.block_size
        shared, copy_from = hits, None
        forked = parent is not None and (f := fork_point(req, parent)) > 0 and f >= num_computed
        if forked:
            # The parent's full blocks before the fork point, by reference; the block it
            # falls in, by copy (the fork writes there next).
            num_computed = f
            shared = parent.block_ids[:f // self.block_size]
            if f % self.block_size:
                copy_from = parent.block_ids[f // self.block_size]
        num_external = 0
        if self.connector is not None and req.kv_transfer_params and req.status == RequestStatus.WAITING:
            # The last known token is computed here, for its logits; a streamed pull brings
            # the whole prompt's KV and the producer's first token, which then is that token.
            num_external = min(self.connector.get_num_new_matched_tokens(req, num_computed),
                               req.num_tokens - (0 if req.awaits_remote_output else 1) - num_computed)
        if num_external > 0:
            n = num_external  # no compute this step; blocks for the loaded tokens
        else:
            n = min(req.num_tokens - num_computed, budget)
            if n < req.num_tokens - num_computed and not self.config.enable_chunked_prefill:
                return None
        new_blocks = self._blocks_for(num_computed + n) - len(shared)
        # Cache hits nobody holds sit in the free queue: touching them uses up free blocks too.
        hits_in_free = sum(1 for b in shared if self.pool.ref_counts[b] == 0)
        if new_blocks + hits_in_free > self.pool.num_free:
            return None
        self.pool.touch(shared, req.cache_owner)
        fresh = self.pool.allocate(new_blocks, req.cache_owner)
        req.block_ids = shared + fresh
        if forked:
            if copy_from is not None:
                self.copy_blocks([copy_from], fresh[:1])
            s = self.fork_stats
            s.forks += 1
            s.blocks_shared += len(shared)
            s.blocks_copied += copy_from is not None
            s.tokens_saved += num_computed
            req.fork_of = None  # from now on an ordinary request (preempted, it recomputes)
        else:
            self.pool.record_lookup(max_hit_blocks, len(hits), req.num_tokens, num_computed)
            if parent is not None:  # the prefix cache held more than the parent could give
                req.fork_of = None
                self.fork_stats.fallbacks += 1
        req.num_computed_tokens = num_computed
        req.num_cached_tokens = num_computed
        req.num_published_blocks = len(shared)
        if num_external > 0:
            req.status = RequestStatus.WAITING_FOR_REMOTE_KV
            req.num_external_tokens = num_external
            self.waiting_for_remote_kv[req.request_id] = req
            self.connector.start_load(req, num_computed, num_external)
            return ScheduledChunk(req, num_computed, 0, sample=False)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        return ScheduledChunk(req, num_computed, n, sample=num_computed + n == req.num_tokens)

    # --- after the step -------------------------------------------------------------
    def chunk_done(self, chunk: ScheduledChunk) -> None:
        """Record that a chunk's KV is now in the cache."""
        req = chunk.request
        end = chunk.start + chunk.num_tokens
        if req.recompute_ranges and req.recompute_ranges[0][0] == chunk.start:
            lo, hi = req.recompute_ranges[0]
            if end >= hi:
                req.recompute_ranges.pop(0)
            else:
                req.recompute_ranges[0] = (end, hi)
        else:
            req.num_computed_tokens = end
        if not req.recompute_ranges:
            self._publish_blocks(req)

    def _publish_blocks(self, req: Request) -> None:
        req.update_block_hashes(self.block_size, self.cache.prefix_hash_algo)
        n_full = min(req.num_computed_tokens // self.block_size, len(req.block_hashes))
        for i in range(req.num_published_blocks, n_full):
            self.pool.cache_block(req.block_ids[i], req.block_hashes[i], req.block_hashes[i - 1] if i else None,
                                  req.token_slice(i * self.block_size, (i + 1) * self.block_size))
        req.num_published_blocks = max(req.num_published_blocks, n_full)

    def _blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.waiting_for_remote_kv)
