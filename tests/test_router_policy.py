"""Routing policies pick healthy nodes: in turn, by load, or by cached prefix and workflow."""

from __future__ import annotations

import pytest
import zmq.asyncio

from engine.hashing import prefix_block_hashes
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


def test_prefix_aware_sends_a_shared_prefix_back_to_the_node_that_has_it(nodes):
    policy = RoutingPolicy("prefix_aware", 16)
    first = policy.pick_prefill(nodes, PROMPT)
    first.in_flight = 2  # busier than the others, but it has the prefix cached
    follow_up = PROMPT[:48] + [7, 8, 9, 10]
    assert policy.pick_prefill(nodes, follow_up).id == first.id
    unrelated = list(range(500, 564))
    assert policy.pick_prefill(nodes, unrelated).id != first.id  # least loaded among non-matching


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
    index = PrefixIndex(capacity_blocks=100)
    hashes = prefix_block_hashes(PROMPT, 16)
    index.insert("a", hashes[:3])
    index.insert("b", hashes[:1])
    assert index.match(hashes) == {"a": 3, "b": 1}
    index.forget_node("a")
    assert index.match(hashes) == {"b": 1}
    small = PrefixIndex(capacity_blocks=2)
    small.insert("a", hashes)
    assert len(small) == 2
