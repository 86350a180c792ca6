"""The block pool: a free list, reference counts and a prefix cache with LRU eviction."""

from __future__ import annotations

import pytest

from engine.block_pool import BlockPool, NoFreeBlocksError
from engine.hashing import hash_block_tokens, prefix_block_hashes, root_block_hash, safe_hash


def test_allocate_and_free_return_every_block():
    pool = BlockPool(8)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert sorted(a + b) == list(range(8)) and pool.num_free == 0
    with pytest.raises(NoFreeBlocksError, match="asked for 1 KV blocks, 0 free"):
        pool.allocate(1)
    pool.free(a)
    pool.free(b)
    assert pool.num_free == 8 and all(rc == 0 for rc in pool.ref_counts)


def test_a_fresh_pool_hands_out_contiguous_blocks():
    # Contiguous runs make fewer, larger transfer descriptors.
    assert BlockPool(16).allocate(6) == [0, 1, 2, 3, 4, 5]


def test_cached_block_survives_free_and_is_found_again():
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    hashes = prefix_block_hashes(list(range(8)), 4)
    for b, h in zip(blocks, hashes):
        pool.cache_block(b, h)
    pool.free(blocks)
    assert pool.num_free == 4 and pool.num_cached == 2  # an unheld cached block counts as free
    assert pool.find_cached_prefix(hashes) == blocks
    pool.touch(blocks)
    assert pool.num_free == 2 and pool.ref_counts[blocks[0]] == 1


def test_uncached_free_blocks_are_reused_before_cached_ones():
    pool = BlockPool(4)
    cached, plain = pool.allocate(2), pool.allocate(2)
    pool.cache_block(cached[0], 111)
    pool.cache_block(cached[1], 222)
    pool.free(cached)
    pool.free(plain)
    assert sorted(pool.allocate(2)) == sorted(plain)
    assert pool.num_cached == 2
    pool.allocate(1)  # now a cached block must be evicted: the tail of the prefix first
    assert pool.find_cached_prefix([111]) == [cached[0]]
    assert pool.find_cached_prefix([111, 222]) == [cached[0]]


def test_lookup_stops_at_the_first_missing_block():
    pool = BlockPool(4)
    b = pool.allocate(3)
    pool.cache_block(b[0], 1)
    pool.cache_block(b[2], 3)
    assert pool.find_cached_prefix([1, 2, 3]) == [b[0]]


def test_double_free_is_an_error():
    pool = BlockPool(2)
    b = pool.allocate(1)
    pool.free(b)
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free(b)


def test_uncache_withdraws_untrusted_blocks():
    pool = BlockPool(2)
    b = pool.allocate(1)
    pool.cache_block(b[0], 42)
    pool.uncache(b)
    assert pool.find_cached_prefix([42]) == []


def test_prefix_hashes_chain_so_equal_blocks_after_different_prefixes_differ():
    a = prefix_block_hashes([1, 2, 3, 4, 9, 9, 9, 9], 4)
    b = prefix_block_hashes([5, 6, 7, 8, 9, 9, 9, 9], 4)
    assert a[1] != b[1]
    assert prefix_block_hashes([1, 2, 3, 4, 5], 4) == a[:1]  # a partial tail block has no key
    assert hash_block_tokens(root_block_hash("sha256"), [1, 2, 3, 4], "sha256") == prefix_block_hashes([1, 2, 3, 4], 4, "sha256")[0]


def test_safe_hash_is_stable_and_fast_md5_by_default():
    assert safe_hash(b"abc", usedforsecurity=False).hexdigest() == "900150983cd24fb0d6963f7d28e17f72"


def test_freed_plain_blocks_are_handed_out_lowest_id_first_so_requests_get_runs():
    pool = BlockPool(12)
    a, _, c = pool.allocate(4), pool.allocate(4), pool.allocate(4)
    pool.free(c)
    pool.free(a)  # free: 0-3 and 8-11, in that order of freeing
    assert pool.allocate(6) == [0, 1, 2, 3, 8, 9]


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _cache_and_free(pool: BlockPool, keys: list[int], workflow: str | None = None) -> list[int]:
    blocks = pool.allocate(len(keys), workflow)
    for b, k in zip(blocks, keys):
        pool.cache_block(b, k)
    pool.free(blocks)
    return blocks


def test_workflow_eviction_keeps_an_active_workflows_blocks_over_newer_anonymous_ones():
    clock = _Clock()
    for policy, survives in (("workflow", True), ("lru", False)):
        pool = BlockPool(4, eviction_policy=policy, workflow_ttl_s=10, clock=clock)
        pool.workflow_started("wf")
        _cache_and_free(pool, [1, 2], "wf")   # the agent's context, between two of its turns
        _cache_and_free(pool, [3, 4])          # someone else's, newer
        pool.allocate(2)                       # room needed: two cached blocks must go
        assert (pool.find_cached_prefix([1, 2]) != []) == survives, policy
        assert pool.stats.evictions == 2 and pool.stats.protected_evictions == 0


def test_a_workflow_idle_past_its_ttl_loses_its_protection():
    clock = _Clock()
    pool = BlockPool(4, eviction_policy="workflow", workflow_ttl_s=10, clock=clock)
    pool.workflow_started("wf")
    _cache_and_free(pool, [1, 2], "wf")
    pool.workflow_finished("wf")
    _cache_and_free(pool, [3, 4])
    clock.now = 5.0
    pool.allocate(1)  # within the TTL: the anonymous tail goes
    assert pool.find_cached_prefix([1, 2]) != [] and pool.find_cached_prefix([3]) != []
    clock.now = 20.0
    pool.allocate(1)  # past the TTL: the workflow's blocks are the oldest now
    assert pool.find_cached_prefix([1, 2]) == [pool.cached[1]] and 2 not in pool.cached


def test_when_only_protected_blocks_remain_the_least_recently_active_workflow_goes_first():
    clock = _Clock()
    pool = BlockPool(4, eviction_policy="workflow", workflow_ttl_s=100, clock=clock)
    for wf, keys in (("old", [1, 2]), ("new", [3, 4])):
        pool.workflow_started(wf)
        _cache_and_free(pool, keys, wf)
        clock.now += 1
        pool.workflow_finished(wf)
    pool.allocate(2)
    assert 1 not in pool.cached and 2 not in pool.cached and {3, 4} <= set(pool.cached)
    assert pool.stats.protected_evictions == 2 and pool.num_free == 2


def test_a_hit_takes_a_protected_block_out_of_its_queue():
    pool = BlockPool(3, eviction_policy="workflow")
    pool.workflow_started("wf")
    blocks = _cache_and_free(pool, [1, 2], "wf")
    assert pool.num_free == 3
    pool.touch(pool.find_cached_prefix([1, 2]), "wf")
    assert pool.num_free == 1 and pool.ref_counts[blocks[0]] == 1
    pool.free(blocks)
    pool.uncache(blocks)
    assert pool.num_free == 3 and pool.num_cached == 0 and pool.cached_digest == 0


@pytest.mark.parametrize("policy", ["workflow", "lru"])
def test_the_workflow_table_stays_bounded_however_many_ids_clients_send(policy):
    now = [0.0]
    pool = BlockPool(100_000, eviction_policy=policy, workflow_ttl_s=1.0, clock=lambda: now[0])
    for i in range(10_000):  # a cache that never has to evict: expiry alone never runs
        pool.workflow_started(f"wf-{i}")
        blocks = pool.allocate(2, f"wf-{i}")
        pool.free(blocks)
        pool.workflow_finished(f"wf-{i}")
        now[0] += 10.0  # each one long past its TTL
    assert len(pool._workflows) <= (1025 if policy == "workflow" else 0)
