"""The per-request prefill decision (router/disaggregation.py): remote or local by the
tokens the decode node lacks, the prefill queue, node health and the mode; and the
cluster.yaml settings that turn it on."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq.asyncio

from bench.cli import topology_config
from cluster.config import ClusterConfig, ClusterConfigError, load_cluster_config, parse_topology, topology_mode
from engine.hashing import prefix_block_hashes
from engine.kv_events import BlockStored
from router.disaggregation import DisaggregationPlanner, DisaggregationRule, PrefillQueue
from router.node_client import NodeClient
from router.policy import NoHealthyNode, RoutingPolicy
from router.spec import NodeAddress

BLOCK = 16
SHORT = list(range(100, 132))     # 2 blocks
LONG = list(range(1000, 1160))    # 10 blocks


@pytest.fixture
def ctx():
    c = zmq.asyncio.Context()
    yield c
    c.term()


def make_nodes(ctx, *roles: str) -> list[NodeClient]:
    counts: dict[str, int] = {}
    nodes = []
    for role in roles:
        i = counts[role] = counts.get(role, -1) + 1
        n = NodeClient(NodeAddress(f"{role}-{i}", role, f"tcp://127.0.0.1:{9000 + len(nodes)}"), ctx)
        n.healthy = True
        nodes.append(n)
    return nodes


def planner(mode: str | None = "conditional", policy: str = "least_loaded", share: bool = True,
            load_failure_policy: str = "recompute", **rule) -> DisaggregationPlanner:
    return DisaggregationPlanner(DisaggregationRule(mode, share, **{"max_local_prefill_tokens": 64, **rule}),
                                 RoutingPolicy(policy, BLOCK), load_failure_policy)


def cache(p: DisaggregationPlanner, node: NodeClient, prompt: list[int], blocks: int) -> None:
    hashes = prefix_block_hashes(prompt, BLOCK)[:blocks]
    p.policy.index.apply(node.id, [BlockStored(hashes, None, prompt[:blocks * BLOCK], BLOCK, None, "CPU", None)])


def test_conditional_prefills_a_short_prompt_locally_and_a_long_one_where_it_is_cheaper(ctx):
    a, b = make_nodes(ctx, "both", "both")
    p = planner()
    short = p.plan([a, b], SHORT, 16)
    assert (short.decision, short.reason, short.prefill, short.uncached_tokens) == ("local", "short_prompt", None, 32)
    # Two idle colocated nodes: lending would move the same prefill and add a transfer.
    long = p.plan([a, b], LONG, 16)
    assert (long.decision, long.reason, long.uncached_tokens) == ("local", "local_cheaper", 160)
    p.queue.enter("both-0", 500)  # a has a prefill ahead of this prompt; b has none
    plans = {plan.decode.id: plan for plan in (p.plan([a, b], LONG, 16) for _ in range(2))}
    assert (plans["both-0"].decision, plans["both-0"].prefill.id, plans["both-0"].reason) == ("remote", "both-1",
                                                                                                "long_prompt")
    assert plans["both-0"].prefill_tokens == 160
    assert (plans["both-1"].decision, plans["both-1"].reason) == ("local", "local_cheaper")


def test_a_decode_node_busier_than_the_other_lends_it_the_prefill(ctx):
    a, b = make_nodes(ctx, "both", "both")
    a.in_flight, b.in_flight = 6, 2   # round_robin: a decodes every other request, busy or not
    p = planner(policy="round_robin")
    plans = {plan.decode.id: plan for plan in (p.plan([a, b], LONG, 16) for _ in range(2))}
    assert (plans["both-0"].decision, plans["both-0"].prefill.id) == ("remote", "both-1")
    assert (plans["both-1"].decision, plans["both-1"].reason) == ("local", "local_cheaper")


def test_a_lender_must_be_no_dearer_on_either_count(ctx):
    a, b = make_nodes(ctx, "both", "both")
    p = planner(policy="round_robin")
    p.queue.enter("both-0", 500)
    b.in_flight = 3   # fewer prefill tokens ahead on b, but more streams to stall
    plans = {plan.decode.id: plan for plan in (p.plan([a, b], LONG, 16) for _ in range(2))}
    assert [(plans[n].decision, plans[n].reason) for n in ("both-0", "both-1")] == [("local", "local_cheaper")] * 2


def test_a_lender_holding_the_prompt_computes_less_and_lends(ctx):
    a, b = make_nodes(ctx, "both", "both")
    p = planner(policy="round_robin")
    cache(p, b, LONG, 8)  # b holds 128 of the 160 tokens; round_robin sends the decode to a first
    plan = p.plan([a, b], LONG, 16)
    assert (plan.decode.id, plan.decision, plan.prefill.id, plan.prefill_tokens) == ("both-0", "remote", "both-1", 32)
    assert plan.tokens_to_prefill(len(LONG)) == 32


def test_threshold_is_inclusive_of_max_local_prefill_tokens(ctx):
    a, b = make_nodes(ctx, "both", "both")
    assert planner(max_local_prefill_tokens=160).plan([a, b], LONG, 16).reason == "short_prompt"
    assert planner(max_local_prefill_tokens=159).plan([a, b], LONG, 16).reason == "local_cheaper"
    xpyd = make_nodes(ctx, "prefill", "decode")
    assert planner(share=False, max_local_prefill_tokens=160).plan(xpyd, LONG, 16).decision == "local"
    assert planner(share=False, max_local_prefill_tokens=159).plan(xpyd, LONG, 16).decision == "remote"


def test_prefix_cached_on_the_decode_node_is_credited(ctx):
    a, b = make_nodes(ctx, "both", "both")
    p = planner(policy="prefix_aware")
    cache(p, a, LONG, 8)  # the decode node (longest prefix) holds 128 of the 160 tokens
    plan = p.plan([a, b], LONG, 16)
    assert (plan.decode.id, plan.decision, plan.reason, plan.uncached_tokens) == ("both-0", "local", "short_prompt", 32)


def test_prefix_cached_elsewhere_earns_the_decode_node_no_credit(ctx):
    a, b = make_nodes(ctx, "both", "both")
    p = planner(policy="least_loaded")
    cache(p, b, LONG, 10)
    b.in_flight = 3  # a is less loaded: it decodes, and holds nothing of the prompt
    plan = p.plan([a, b], LONG, 16)
    assert (plan.decode.id, plan.uncached_tokens) == ("both-0", 160)
    b.in_flight = 0   # b computes one token where a computes 160: b lends
    plans = [p.plan([a, b], LONG, 16) for _ in range(2)]
    assert [(q.decode.id, q.uncached_tokens, q.prefill and q.prefill.id) for q in plans if q.decode is a] == [
        ("both-0", 160, "both-1")]


def test_a_whole_prompt_in_cache_still_computes_its_last_token(ctx):
    a, = make_nodes(ctx, "both")
    p = planner()
    cache(p, a, LONG, 10)
    assert p.cached_tokens(a, LONG) == len(LONG) - 1


def test_a_busy_prefill_candidate_means_local_prefill_until_its_queue_drains(ctx):
    nodes = make_nodes(ctx, "prefill", "decode")
    p = planner(share=False, max_prefill_queue=2)
    left = [p.queue.enter("prefill-0") for _ in range(2)]
    plan = p.plan(nodes, LONG, 16)
    assert (plan.decode.id, plan.decision, plan.reason) == ("decode-0", "local", "prefill_busy")
    left[0]()
    left[0]()  # leaving twice counts once
    assert p.queue["prefill-0"] == 1
    plan = p.plan(nodes, LONG, 16)
    assert (plan.decision, plan.prefill.id) == ("remote", "prefill-0")


def test_the_least_busy_prefill_node_below_the_queue_limit_lends(ctx):
    nodes = make_nodes(ctx, "prefill", "prefill", "decode")
    p = planner(share=False, max_prefill_queue=1)
    p.queue.enter("prefill-0")
    plan = p.plan(nodes, LONG, 16)
    assert (plan.decode.id, plan.prefill.id, plan.reason) == ("decode-0", "prefill-1", "long_prompt")


def test_an_unhealthy_both_lender_means_local_prefill_without_a_failover(ctx):
    a, b = make_nodes(ctx, "both", "both")
    b.healthy = False
    for mode in ("always", "conditional"):
        plan = planner(mode, load_failure_policy="fail").plan([a, b], LONG, 16)
        assert (plan.decode.id, plan.decision, plan.reason, plan.failover) == ("both-0", "local", "no_prefill_node",
                                                                               False)


def test_xpyd_with_every_prefill_node_down_recomputes_on_the_decode_node_or_fails(ctx):
    nodes = make_nodes(ctx, "prefill", "decode")
    nodes[0].healthy = False
    for mode in (None, "always", "conditional"):
        plan = planner(mode, share=False).plan(nodes, LONG, 16)
        assert (plan.decode.id, plan.decision, plan.reason, plan.failover) == ("decode-0", "local", "no_prefill_node",
                                                                               True)
        with pytest.raises(NoHealthyNode, match="no healthy prefill node"):
            planner(mode, share=False, load_failure_policy="fail").plan(nodes, LONG, 16)
    # A short prompt under conditional never needed the prefill node: served, no failover.
    plan = planner("conditional", share=False, load_failure_policy="fail").plan(nodes, SHORT, 16)
    assert (plan.reason, plan.failover) == ("short_prompt", False)


def test_no_healthy_decode_node_is_refused_before_any_prefill(ctx):
    nodes = make_nodes(ctx, "prefill", "decode")
    nodes[1].healthy = False
    with pytest.raises(NoHealthyNode):
        planner("always", share=False).plan(nodes, LONG, 16)


def test_always_splits_every_request_and_never_splits_none(ctx):
    a, b = make_nodes(ctx, "both", "both")
    for prompt in (SHORT, LONG):
        always = planner("always").plan([a, b], prompt, 16)
        assert (always.decision, always.reason) == ("remote", "always")
        assert always.prefill is not always.decode
        never = planner("never", share=False).plan([a, b], prompt, 16)
        assert (never.decision, never.reason) == ("local", "never")


def test_defaults_keep_xpyd_split_and_colocated_whole(ctx):
    xpyd = make_nodes(ctx, "prefill", "decode")
    plan = planner(None, share=False).plan(xpyd, SHORT, 16)
    assert (plan.prefill.id, plan.decode.id, plan.reason) == ("prefill-0", "decode-0", "always")
    colocated = make_nodes(ctx, "both", "both")
    assert planner(None, share=False).plan(colocated, LONG, 16).reason == "never"
    # Colocated nodes beside prefill/decode nodes serve nothing unless a mode is set.
    mixed = make_nodes(ctx, "prefill", "decode", "both")
    mixed[1].in_flight = 9
    plan = planner(None, share=False).plan(mixed, LONG, 16)
    assert (plan.prefill.id, plan.decode.id) == ("prefill-0", "decode-0")
    plan = planner("always", share=True).plan(mixed, LONG, 16)
    assert plan.decode.id == "both-0" and plan.prefill.id == "prefill-0"


def test_single_token_requests_are_served_whole(ctx):
    xpyd = make_nodes(ctx, "prefill", "decode")
    plan = planner("always", share=False).plan(xpyd, LONG, 1)
    assert (plan.decode.id, plan.prefill, plan.reason) == ("prefill-0", None, "single_token")
    a, b = make_nodes(ctx, "both", "both")
    assert planner("always").plan([a, b], LONG, 1).reason == "single_token"


def test_draining_nodes_get_no_part(ctx):
    a, b, c = make_nodes(ctx, "both", "both", "both")
    b.leaving = True
    c.in_flight = 4
    for _ in range(4):
        plan = planner("always").plan([a, b, c], LONG, 16)
        assert {plan.decode.id, plan.prefill.id} == {"both-0", "both-2"}


def test_prefill_queue_counts_per_node():
    q = PrefillQueue()
    leave_a = q.enter("a", 100)
    leave_a2 = q.enter("a", 30)
    q.enter("b")
    assert (q["a"], q["b"], q["c"], q.tokens("a"), q.tokens("c")) == (2, 1, 0, 130, 0)
    leave_a()
    leave_a()
    assert (q["a"], q.tokens("a")) == (1, 30)
    leave_a2()
    assert (q["a"], q.tokens("a")) == (0, 0)


def test_rule_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="use one of always, conditional, never"):
        DisaggregationRule("sometimes")


# --- cluster.yaml ---------------------------------------------------------------------
def _config(mode: str | None, **topology) -> ClusterConfig:
    router = {"disaggregation": {"mode": mode}} if mode else {}
    return ClusterConfig.model_validate({"router": router, **{k: {"replicas": v} for k, v in topology.items()}})


def test_both_nodes_get_a_kv_both_connector_only_when_a_mode_lets_them_share():
    colocated = dict(prefill=0, decode=0, colocated=2)
    for mode, kv_role in ((None, None), ("never", None), ("conditional", "kv_both"), ("always", "kv_both")):
        config = _config(mode, **colocated)
        roles = {s.name: s.kv_role for s in config.node_specs(num_gpus=0)}
        assert roles == {"both-0": kv_role, "both-1": kv_role}
        kv = config.kv_transfer_config(config.node_specs(num_gpus=0)[0])
        assert (kv.kv_role if kv else None) == kv_role
        assert config.node_spec("both", 5, num_gpus=0).kv_role == kv_role  # `pdcluster scale` too
    xpyd = _config("conditional", prefill=1, decode=1)
    assert [s.kv_role for s in xpyd.node_specs(num_gpus=0)] == ["kv_producer", "kv_consumer"]


def test_disaggregation_settings_are_checked(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("router: {disaggregation: {mode: sometimes, max_local_prefill_tokens: -1, max_prefill_queue: 0,"
                    " max_local_prefill_length: 5}}\n")
    with pytest.raises(ClusterConfigError) as e:
        load_cluster_config(path)
    text = str(e.value)
    assert "router.disaggregation.mode: 'sometimes' is not one of 'always', 'conditional', 'never'" in text
    assert "router.disaggregation.max_local_prefill_tokens:" in text
    assert "router.disaggregation.max_prefill_queue:" in text
    assert "router.disaggregation.max_local_prefill_length: unknown key (did you mean 'max_local_prefill_tokens'?)" \
        in text


def test_the_shipped_cluster_yaml_keeps_today_s_split():
    config = load_cluster_config(Path(__file__).resolve().parent.parent / "cluster.yaml")
    assert config.router.disaggregation.mode is None and not config.colocated_share_kv


def test_requests_take_every_prefill_and_decode_node_in_turn(ctx):
    nodes = make_nodes(ctx, "prefill", "prefill", "decode", "decode")
    for policy in ("round_robin", "least_loaded", "prefix_aware"):
        p = planner("always", policy=policy, share=False)
        pairs = {(plan.prefill.id, plan.decode.id) for plan in (p.plan(nodes, LONG, 16) for _ in range(4))}
        assert {a for a, _ in pairs} == {"prefill-0", "prefill-1"} and {b for _, b in pairs} == {"decode-0", "decode-1"}


def test_the_lender_among_both_nodes_is_the_cheapest_other_node(ctx):
    a, b, c = make_nodes(ctx, "both", "both", "both")
    p = planner("always", policy="round_robin")
    p.queue.enter("both-1")
    lenders = dict((plan.decode.id, plan.prefill.id) for plan in (p.plan([a, b, c], LONG, 16) for _ in range(3)))
    # both-1 has a prefill waiting: the others lend to each other, and to it.
    assert lenders["both-0"] == "both-2" and lenders["both-2"] == "both-0" and lenders["both-1"] != "both-1"
    cache(p, b, LONG, 4)  # a longer cached prefix outweighs the queue
    assert p.plan([a, b, c], LONG, 16).prefill.id == "both-1"


def test_a_bench_topology_may_name_its_disaggregation_mode():
    assert (parse_topology("colocated2@conditional"), topology_mode("colocated2@Conditional")) == ((0, 0, 2),
                                                                                                  "conditional")
    assert topology_mode("1P1D") is None
    with pytest.raises(ValueError, match="'sometimes' after @ is not a disaggregation mode"):
        parse_topology("colocated2@sometimes")
    split = topology_config(ClusterConfig(), "colocated2@conditional")
    assert split.router.disaggregation.mode == "conditional" and split.router.port == 0
    assert [s.kv_role for s in split.node_specs(num_gpus=0)] == ["kv_both", "kv_both"]
    static = topology_config(ClusterConfig(), "colocated2")
    assert static.router.disaggregation.mode is None
    assert [s.kv_role for s in static.node_specs(num_gpus=0)] == [None, None]
