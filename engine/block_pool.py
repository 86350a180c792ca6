"""The block pool: which KV-cache blocks are free, who holds the rest, which hold a
cached prefix.

A free list, a reference count per block and a hash -> block map (nano-vllm's shape).
A block that holds a cached prefix stays findable after its last holder lets go, so
"free" and "cached" overlap: a cached block with no holder counts as free (it can be
evicted at once). Free blocks wait in two places:

* plain blocks (no cached content) in a min-heap, handed out first and lowest id first:
  a request then gets runs of adjacent blocks, which the KV connector moves as few
  large transfers instead of many small ones;
* cached blocks in eviction queues, evicted only when no plain block is left.

Eviction policies (`eviction_policy`):

* `lru`: one queue, oldest first; a request's tail goes before its head, since a longer
  prefix is rarer to hit.
* `workflow` (the default): an LRU with workflow priority and a TTL. A cached block
  remembers the workflow (the request's `workflow_id`, else its `agent_id`) that last
  used it. Blocks of a workflow that has a request in flight, or had one within
  `workflow_ttl_s`, wait in that workflow's own queue and are evicted only after every
  other cached block: an agent's context survives the burst of someone else's traffic
  between two of its turns. Once a workflow has been idle for the TTL, its blocks join
  the plain LRU queue at the front (they are that old). When only protected blocks are
  left, the least recently active workflow loses its oldest blocks first.

Every change to the set of cached blocks can be logged (`event_log`, see
engine/kv_events.py) for subscribers that mirror this cache: a block stored, a block
removed, all cleared.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

EvictionPolicy = Literal["lru", "workflow"]
EVICTION_POLICIES = ("lru", "workflow")
_DIGEST_MASK = (1 << 64) - 1


class NoFreeBlocksError(RuntimeError):
    pass


class CacheEventLog(Protocol):
    """Where the pool reports changes of its cached set (engine/kv_events.py's KVEventLog)."""

    def stored(self, block_hash: int, parent_hash: int | None, token_ids: Sequence[int]) -> None: ...
    def removed(self, block_hash: int) -> None: ...
    def cleared(self) -> None: ...


@dataclass(slots=True)
class PrefixCacheStats:
    """Counted once per admitted request (a request waiting for room is not counted
    again at every retry)."""
    queries: int = 0          # blocks looked up
    hits: int = 0             # blocks found
    query_tokens: int = 0     # prompt tokens of the requests looked up
    hit_tokens: int = 0       # of those, served from the cache
    evictions: int = 0        # cached blocks evicted to make room
    protected_evictions: int = 0  # of those, blocks of an active workflow (workflow policy)


@dataclass(slots=True)
class _Workflow:
    in_flight: int = 0
    last_active: float = 0.0


_MIN_WORKFLOW_PRUNE = 1024  # workflows tracked before the first pruning pass


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True, eviction_policy: EvictionPolicy = "workflow",
                 workflow_ttl_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        if eviction_policy not in EVICTION_POLICIES:
            raise ValueError(f"eviction_policy {eviction_policy!r}: use {' or '.join(EVICTION_POLICIES)}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.eviction_policy = eviction_policy
        self.workflow_ttl_s = workflow_ttl_s
        self.clock = clock
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_workflow: list[str | None] = [None] * num_blocks  # who used the block last
        self.cached: dict[int, int] = {}  # prefix hash -> block id
        self._free_plain: list[int] = list(range(num_blocks))  # a heap
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # LRU: the front is evicted first
        # workflow policy: free cached blocks of (recently) active workflows, per workflow, LRU each
        self._free_protected: dict[str, OrderedDict[int, None]] = {}
        self._num_free_protected = 0
        self._workflows: dict[str, _Workflow] = {}
        self._prune_workflows_at = _MIN_WORKFLOW_PRUNE  # client-chosen ids: keep the table bounded
        self.stats = PrefixCacheStats()
        self.event_log: CacheEventLog | None = None
        self._digest = 0  # sum of cached keys mod 2**64: a cheap fingerprint of the cached set

    # --- counters -------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free_plain) + len(self._free_cached) + self._num_free_protected

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    @property
    def cached_digest(self) -> int:
        """(sum of the cached blocks' keys) mod 2**64. A subscriber that mirrors this
        cache from its KV events computes the same number from its own copy."""
        return self._digest

    # --- workflows ------------------------------------------------------------------
    def workflow_started(self, workflow: str | None) -> None:
        """A request of `workflow` entered the engine."""
        if workflow and self.eviction_policy == "workflow":  # lru: nothing looks at workflows
            self._workflows.setdefault(workflow, _Workflow()).in_flight += 1
            if len(self._workflows) > self._prune_workflows_at:
                self._forget_idle_workflows(self.clock())
                self._prune_workflows_at = max(_MIN_WORKFLOW_PRUNE, 2 * len(self._workflows))

    def workflow_finished(self, workflow: str | None) -> None:
        """A request of `workflow` left the engine: its TTL starts now."""
        w = self._workflows.get(workflow) if workflow else None
        if w is not None:
            w.in_flight = max(0, w.in_flight - 1)
            w.last_active = self.clock()

    def _protected(self, workflow: str, now: float) -> bool:
        w = self._workflows.get(workflow)
        return w is not None and (w.in_flight > 0 or now - w.last_active < self.workflow_ttl_s)

    # --- allocation -----------------------------------------------------------------
    def allocate(self, n: int, workflow: str | None = None) -> list[int]:
        """Hand out `n` blocks with a reference count of one, evicting cached prefixes
        (see the eviction policies above) when it must."""
        if n > self.num_free:
            raise NoFreeBlocksError(f"asked for {n} KV blocks, {self.num_free} free")
        take = min(n, len(self._free_plain))
        out = [heapq.heappop(self._free_plain) for _ in range(take)]
        if n > take:
            out += self._evict_for(n - take)
        for b in out:
            self.ref_counts[b] = 1
            self.block_workflow[b] = workflow
        return out

    def _evict_for(self, n: int) -> list[int]:
        out = []
        if self._free_protected:
            self._expire_workflows()
        while len(out) < n and self._free_cached:
            block, _ = self._free_cached.popitem(last=False)
            out.append(block)
        while len(out) < n:  # only blocks of active workflows are left
            victim = min(self._free_protected, key=self._eviction_rank)
            queue = self._free_protected[victim]
            block, _ = queue.popitem(last=False)
            self._num_free_protected -= 1
            if not queue:
                del self._free_protected[victim]
            self.stats.protected_evictions += 1
            out.append(block)
        for b in out:
            self._evict(b)
        self.stats.evictions += len(out)
        return out

    def _eviction_rank(self, workflow: str) -> tuple[bool, float]:
        """Among protected workflows: those without a request in flight first, the
        least recently active first."""
        w = self._workflows.get(workflow)
        return (w is not None and w.in_flight > 0, w.last_active if w is not None else 0.0)

    def _expire_workflows(self) -> None:
        """Move the blocks of workflows idle for longer than the TTL to the front of the
        plain LRU queue, keeping their order."""
        now = self.clock()
        for wf in [wf for wf in self._free_protected if not self._protected(wf, now)]:
            queue = self._free_protected.pop(wf)
            self._num_free_protected -= len(queue)
            for b in reversed(queue):
                self._free_cached[b] = None
                self._free_cached.move_to_end(b, last=False)
        self._forget_idle_workflows(now)

    def _forget_idle_workflows(self, now: float) -> None:
        """Drop workflows past their TTL that protect nothing (amortised: the table grows to
        twice its live size between calls from workflow_started)."""
        for wf in [wf for wf, w in self._workflows.items()
                   if w.in_flight == 0 and now - w.last_active >= self.workflow_ttl_s and wf not in self._free_protected]:
            del self._workflows[wf]

    def touch(self, blocks: Iterable[int], workflow: str | None = None) -> None:
        """Take another reference on blocks (a prefix-cache hit)."""
        for b in blocks:
            if self.ref_counts[b] == 0:
                self._take_free_cached(b)  # only cached blocks can be hits
            self.ref_counts[b] += 1
            if workflow:
                self.block_workflow[b] = workflow

    def _take_free_cached(self, b: int) -> None:
        queue = self._free_protected.get(self.block_workflow[b] or "")
        if queue is not None and b in queue:
            del queue[b]
            self._num_free_protected -= 1
            if not queue:
                del self._free_protected[self.block_workflow[b]]
        else:
            del self._free_cached[b]

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block. Pass a request's blocks in order: the tail
        is queued for eviction before the head, since a longer prefix is rarer to hit."""
        for b in reversed(blocks):
            rc = self.ref_counts[b] - 1
            if rc < 0:
                raise RuntimeError(f"block {b} freed more often than allocated")
            self.ref_counts[b] = rc
            if rc == 0:
                wf = self.block_workflow[b]
                if self.block_hash[b] is None:
                    heapq.heappush(self._free_plain, b)
                elif self.eviction_policy == "workflow" and wf:
                    self._free_protected.setdefault(wf, OrderedDict())[b] = None
                    self._num_free_protected += 1
                else:
                    self._free_cached[b] = None

    # --- prefix cache ---------------------------------------------------------------
    def find_cached_prefix(self, hashes: Sequence[int]) -> list[int]:
        """Block ids of the longest cached run of `hashes` from the start (no refs taken)."""
        if not self.enable_caching:
            return []
        out = []
        for h in hashes:
            b = self.cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def record_lookup(self, query_blocks: int, hit_blocks: int, query_tokens: int, hit_tokens: int) -> None:
        s = self.stats
        s.queries += query_blocks
        s.hits += hit_blocks
        s.query_tokens += query_tokens
        s.hit_tokens += hit_tokens

    def cache_block(self, block: int, block_hash: int, parent_hash: int | None = None,
                    token_ids: Sequence[int] = ()) -> None:
        """Publish a full, computed block under its prefix hash. A block whose content is
        already cached elsewhere is left unpublished (the first copy wins). `parent_hash`
        (None for a first block) and `token_ids` are for the event log."""
        if not self.enable_caching or self.block_hash[block] is not None:
            return
        if block_hash in self.cached:
            return
        self.block_hash[block] = block_hash
        self.cached[block_hash] = block
        self._digest = (self._digest + block_hash) & _DIGEST_MASK
        if self.event_log is not None:
            self.event_log.stored(block_hash, parent_hash, token_ids)

    def uncache(self, blocks: Iterable[int]) -> None:
        """Withdraw blocks from the prefix cache (their content is not to be trusted:
        a failed KV load, say)."""
        for b in blocks:
            if self.block_hash[b] is None:
                continue
            if self.ref_counts[b] == 0:  # free and now plain
                self._take_free_cached(b)
                heapq.heappush(self._free_plain, b)
            self._evict(b)

    def reset_prefix_cache(self) -> None:
        log, self.event_log = self.event_log, None  # one "all cleared", not a removal per block
        try:
            self.uncache(list(self.cached.values()))
        finally:
            self.event_log = log
        if log is not None:
            log.cleared()

    def _evict(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            self.block_hash[block] = None
            if self.cached.get(h) == block:
                del self.cached[h]
                self._digest = (self._digest - h) & _DIGEST_MASK
                if self.event_log is not None:
                    self.event_log.removed(h)
