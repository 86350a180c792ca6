"""The block pool: which KV-cache blocks are free, who holds the rest, which hold a
cached prefix.

A free list, a reference count per block and a hash -> block map (nano-vllm's shape).
A block that holds a cached prefix stays findable after its last holder lets go, so
"free" and "cached" overlap: a cached block with no holder counts as free (it can be
evicted at once). Free blocks wait in two places:

* plain blocks (no cached content) in a min-heap, handed out first and lowest id first:
  a request then gets runs of adjacent blocks, which the KV connector moves as few
  large transfers instead of many small ones;
* cached blocks in an LRU queue, evicted only when no plain block is left, oldest first,
  so the prefix cache lives as long as it can.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class NoFreeBlocksError(RuntimeError):
    pass


@dataclass(slots=True)
class PrefixCacheStats:
    queries: int = 0   # blocks looked up
    hits: int = 0      # blocks found


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # prefix hash -> block id
        self._free_plain: list[int] = list(range(num_blocks))  # a heap
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # LRU: the front is evicted first
        self.stats = PrefixCacheStats()

    # --- counters -------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    # --- allocation -----------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """Hand out `n` blocks with a reference count of one, evicting cached prefixes
        in LRU order when it must."""
        if n > self.num_free:
            raise NoFreeBlocksError(f"asked for {n} KV blocks, {self.num_free} free")
        take = min(n, len(self._free_plain))
        out = [heapq.heappop(self._free_plain) for _ in range(take)]
        for _ in range(n - take):
            block, _ = self._free_cached.popitem(last=False)
            self._evict(block)
            out.append(block)
        for b in out:
            self.ref_counts[b] = 1
        return out

    def touch(self, blocks: Iterable[int]) -> None:
        """Take another reference on blocks (a prefix-cache hit)."""
        for b in blocks:
            if self.ref_counts[b] == 0:
                del self._free_cached[b]  # only cached blocks can be hits
            self.ref_counts[b] += 1

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block. Pass a request's blocks in order: the tail
        is queued for eviction before the head, since a longer prefix is rarer to hit."""
        for b in reversed(blocks):
            rc = self.ref_counts[b] - 1
            if rc < 0:
                raise RuntimeError(f"block {b} freed more often than allocated")
            self.ref_counts[b] = rc
            if rc == 0:
                if self.block_hash[b] is None:
                    heapq.heappush(self._free_plain, b)
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
        self.stats.queries += len(hashes)
        self.stats.hits += len(out)
        return out

    def cache_block(self, block: int, block_hash: int) -> None:
        """Publish a full, computed block under its prefix hash. A block whose content is
        already cached elsewhere is left unpublished (the first copy wins)."""
        if not self.enable_caching or self.block_hash[block] is not None:
            return
        if block_hash in self.cached:
            return
        self.block_hash[block] = block_hash
        self.cached[block_hash] = block

    def uncache(self, blocks: Iterable[int]) -> None:
        """Withdraw blocks from the prefix cache (their content is not to be trusted:
        a failed KV load, say)."""
        for b in blocks:
            self._evict(b)
            if b in self._free_cached:  # free and now plain
                del self._free_cached[b]
                heapq.heappush(self._free_plain, b)

    def reset_prefix_cache(self) -> None:
        self.uncache(list(self.cached.values()))

    def _evict(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            self.block_hash[block] = None
            if self.cached.get(h) == block:
                del self.cached[h]
