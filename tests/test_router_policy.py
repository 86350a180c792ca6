"""Routing policies pick healthy nodes: in turn, by load, or by cached prefix and workflow."""

from __future__ import annotations

import pytest
import zmq.asyncio

from engine.hashing import prefix_block_hashes
from engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from router.node_client import NodeClient
from router.policy import NoHealthyNode, RoutingPolicy
from router.prefix_index import PrefixIndex
from router.spec import NodeAddress


@pytest.fixture
def nodes():
    ctx = zmq.asyncio.Context()
    out = [NodeClient(NodeAddress(f"prefill-{i}", "prefill", f"tcp://127.0.0.1:{9000 + i}"), ctx) for i in range(3)]
    for n in out:
        n.healthy = True
    yield out
    ctx.term()


PROMPT = list(range(100, 164))  # four blocks of 16


def test_round_robin_takes_turns_and_skips_unhealthy_nodes(nodes):
    policy = RoutingPolicy("round_robin", 16)
    assert [policy.pick_prefill(nodes, PROMPT).id for _ in range(3)] == ["prefill-0", "prefill-1", "prefill-2"]
    nodes[1].healthy = False
    assert {policy.pick_prefill(nodes, PROMPT).id for _ in range(4)} == {"prefill-0", "prefill-2"}


def test_least_loaded_picks_the_node_with_fewest_requests(nodes):
    policy = RoutingPolicy("least_loaded", 16)
    nodes[0].in_flight, nodes[1].in_flight, nodes[2].in_flight = 5, 1, 3
    assert policy.pick_prefill(nodes, PROMPT).id == "prefill-1"
    assert policy.pick_decode(nodes).id == "prefill-1"


def _stored(hashes):
    return BlockStored(list(hashes), None, [0] * 16 * len(hashes), 16, None, "CPU", None)


def test_prefix_aware_sends_a_shared_prefix_to_the_node_whose_events_say_it_has_it(nodes):
    policy = RoutingPolicy("prefix_aware", 16)
    hashes = prefix_block_hashes(PROMPT, 16)
    policy.index.apply("prefill-1", [_stored(hashes[:3])])
    policy.index.apply("prefill-2", [_stored(hashes[:1])])
    nodes[1].in_flight = 2  # busier than the others, but it has the longest prefix cached
    follow_up = PROMPT[:48] + [7, 8, 9, 10]
    assert policy.pick_prefill(nodes, follow_up).id == "prefill-1"
    unrelated = list(range(500, 564))
    assert policy.pick_prefill(nodes, unrelated).id != "prefill-1"  # least loaded among non-matching
    # prefill-1 evicts the blocks, then restarts: the index follows what the node says.
    policy.index.apply("prefill-1", [BlockRemoved(hashes[1:3], "CPU")])
    assert policy.pick_prefill(nodes, follow_up).id in {"prefill-1", "prefill-2"}
    policy.index.apply("prefill-1", [AllBlocksCleared()])
    assert policy.pick_prefill(nodes, follow_up).id == "prefill-2"
    assert policy.index.num_blocks("prefill-1") == 0


def test_routing_does_not_guess_what_a_node_will_cache(nodes):
    policy = RoutingPolicy("prefix_aware", 16)
    policy.pick_prefill(nodes, PROMPT)
    assert len(policy.index) == 0  # only KV events fill the index


def test_prefix_aware_keeps_a_workflow_on_its_node_unless_that_node_is_swamped(nodes):
    policy = RoutingPolicy("prefix_aware", 16)
    home = policy.pick_prefill(nodes, [1, 2, 3], affinity_key="workflow-7")
    assert policy.pick_prefill(nodes, [9, 9, 9], affinity_key="workflow-7").id == home.id
    home.in_flight = 50
    assert policy.pick_prefill(nodes, [9, 9, 9], affinity_key="workflow-7").id != home.id


def test_no_healthy_node_is_a_clear_error(nodes):
    for n in nodes:
        n.healthy = False
    with pytest.raises(NoHealthyNode, match="no healthy prefill node"):
        RoutingPolicy("round_robin", 16).pick_prefill(nodes, PROMPT)


def test_prefix_index_matches_leading_blocks_and_forgets_restarted_nodes():
    index = PrefixIndex()
    hashes = prefix_block_hashes(PROMPT, 16)
    index.apply("a", [_stored(hashes[:3])])
    index.apply("b", [_stored(hashes[:1])])
    assert index.match(hashes) == {"a": 3, "b": 1}
    assert index.digest("a") == sum(hashes[:3]) % 2**64
    index.forget_node("a")
    assert index.match(hashes) == {"b": 1}
    index.apply("b", [BlockRemoved([hashes[0]], "CPU")])
    assert index.match(hashes) == {} and len(index) == 0


def test_workflow_affinity_is_scored_against_where_the_prefix_was(nodes):
    policy = RoutingPolicy("round_robin", 16)
    hashes = prefix_block_hashes(PROMPT, 16)
    policy.pick_prefill(nodes, PROMPT, affinity_key="wf")  # nothing cached anywhere: not scored
    assert "wf" not in policy.kv_stats.workflows
    policy.index.apply("prefill-0", [_stored(hashes[:2])])
    picks = [policy.pick_prefill(nodes, PROMPT, affinity_key="wf").id for _ in range(3)]
    counts = policy.kv_stats.workflows["wf"]
    assert counts.routed_with_prefix == 3 and counts.landed_on_prefix == picks.count("prefill-0") == 1
    aware = RoutingPolicy("prefix_aware", 16)
    aware.index.apply("prefill-0", [_stored(hashes[:2])])
    for _ in range(3):
        assert aware.pick_prefill(nodes, PROMPT, affinity_key="wf").id == "prefill-0"
    assert aware.kv_stats.workflows["wf"].landed_on_prefix == 3


def test_a_node_that_left_is_no_longer_followed_or_indexed():
    """A node that left the cluster: its KV-event subscription stops (a later process on
    its ports must not be indexed under its id) and what it held is forgotten."""
    import asyncio

    from router.kv_event_listener import KVEventListener

    async def main():
        ctx = zmq.asyncio.Context()
        policy = RoutingPolicy("prefix_aware", 16)
        listener = policy.listeners["decode-1"] = KVEventListener("decode-1", policy.index, ctx)
        listener.follow("tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
        hashes = prefix_block_hashes(PROMPT, 16)
        policy.index.apply("decode-1", [BlockStored(hashes, None, PROMPT, 16, None, "CPU", None)])
        await asyncio.sleep(0)
        task = listener._task
        assert task is not None and not task.done()
        policy.node_left("decode-1")
        await asyncio.sleep(0)
        following = task is not None and not task.done()
        policy.close()
        ctx.term()
        return following, "decode-1" in policy.listeners, policy.index.num_blocks("decode-1")

    assert asyncio.run(main()) == (False, False, 0)
