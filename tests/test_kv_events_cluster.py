"""KV events in a running cluster, split (2P1D) and colocated: the router's prefix index
follows what the nodes say (also across a node's restart), prefix-aware routing uses it,
and the KV-cache metrics count a scripted workload exactly."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from cluster.config import ClusterConfig
from tests.test_cluster_e2e import start

PREFIX = list(range(200, 264))  # four blocks of 16


@pytest.fixture(scope="module", params=["colocated2", "2P1D"])
def cluster(request, tmp_path_factory):
    p, d, c = {"colocated2": (0, 0, 2), "2P1D": (2, 1, 0)}[request.param]
    config = ClusterConfig.model_validate({
        "model": {"path": "builtin:tiny", "dtype": "float32"},
        "router": {"port": 0, "policy": "prefix_aware"},
        "kv_transfer": {"connector": "tcp", "abort_timeout_s": 30, "transfer_timeout_s": 10},
        "engine": {"num_blocks": 128, "block_size": 16, "max_num_seqs": 8},
        "prefill": {"replicas": p, "devices": ["cpu"]}, "decode": {"replicas": d, "devices": ["cpu"]},
        "colocated": {"replicas": c, "devices": ["cpu"]},
    })
    c = start(config, tmp_path_factory)
    yield c
    c.stop()


def nodes(url: str) -> dict[str, dict]:
    return {n["id"]: n for n in httpx.get(url + "/cluster").json()["nodes"]}


def wait_for(cond, what: str, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def complete(url: str, prompt: list[int], **extra) -> dict:
    r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0,
                                                  "ignore_eos": True, **extra}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def cached_tokens(answer: dict) -> int:
    return (answer["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0


def in_sync(url: str) -> dict[str, dict] | None:
    """/cluster once the router's index holds exactly what every healthy node caches."""
    view = nodes(url)
    ok = all(n["kv_events_address"] and n["kv_blocks_indexed"] == n["kv_blocks_cached"]
             for n in view.values() if n["healthy"])
    return view if ok else None


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    assert m, f"{name}{{{want}}} not in /metrics"
    return float(m.group(1))


def test_every_node_publishes_and_the_router_index_matches_the_nodes(cluster):
    view = wait_for(lambda: in_sync(cluster.url), "KV event subscriptions")
    assert all(n["kv_events_address"].startswith("tcp://127.0.0.1:") and n["kv_events_replay_address"]
               for n in view.values())
    assert all(n["eviction_policy"] == "workflow" for n in view.values())


def test_kv_cache_metrics_count_a_scripted_workload(cluster):
    url = cluster.url
    tags = {"workflow_id": "wf-metrics", "agent_id": "agent-m"}
    first = complete(url, PREFIX + [1], **tags)
    assert cached_tokens(first) == 0
    wait_for(lambda: in_sync(url), "the first prompt's blocks in the index")
    second = complete(url, PREFIX + [2], **tags)
    assert cached_tokens(second) == 64  # four blocks: the node the prefix was on served it
    text = httpx.get(url + "/metrics").text
    assert metric(text, "pdcluster_agent_prompt_tokens_total", agent="agent-m") == 130
    assert metric(text, "pdcluster_agent_cached_tokens_total", agent="agent-m") == 64
    assert metric(text, "pdcluster_agent_reuse", agent="agent-m") == pytest.approx(64 / 130)
    # the first request found no prefix anywhere (not scored); the second landed on it
    assert metric(text, "pdcluster_workflow_prefix_requests_total", workflow="wf-metrics") == 1
    assert metric(text, "pdcluster_workflow_affinity", workflow="wf-metrics") == 1.0
    wait_for(lambda: sum(n["prefix_cache_hit_tokens"] for n in nodes(url).values()) >= 64,
             "the nodes' hit counters (stats are polled every 0.5 s)")
    assert "pdcluster_request_cached_tokens_bucket" in text
    assert "pdcluster_node_kv_evictions_per_second" in text and "pdcluster_node_prefix_cache_hit_rate" in text


def test_routing_by_events_finds_the_prefix_also_after_its_node_restarted(cluster):
    url = cluster.url
    prefix = list(range(300, 364))
    before = wait_for(lambda: in_sync(url), "a quiet index")
    complete(url, prefix + [1])
    view = wait_for(lambda: in_sync(url), "the prefix's blocks in the index")
    prompt_nodes = [c for c in cluster.nodes if c.role != "decode"]  # the nodes that compute prompts
    served = [c for c in prompt_nodes if view[c.name]["prefix_cache_query_tokens"]
              > before[c.name]["prefix_cache_query_tokens"]]
    assert len(served) == 1
    home = served[0]
    other = next(c for c in prompt_nodes if c is not home)
    assert cached_tokens(complete(url, prefix + [2])) == 64  # sent back to the node holding it

    home.proc.kill()
    home.proc.wait()
    wait_for(lambda: not nodes(url)[home.name]["healthy"], "the router to notice the dead node")
    assert cached_tokens(complete(url, prefix + [3])) == 0  # the other node computes it, and caches it
    old_address = view[home.name]["kv_events_address"]
    home.spawn()  # restarted on the same ports, with an empty cache
    wait_for(lambda: (n := nodes(url)[home.name])["healthy"] and n["pid"] == home.pid
             and n["kv_events_address"] != old_address, "the restarted node", timeout_s=60)
    view = wait_for(lambda: in_sync(url), "the index after the restart")
    assert view[home.name]["kv_blocks_indexed"] == 0 and view[other.name]["kv_blocks_indexed"] >= 4
    for i in range(3):  # a stale index would send some of these to the empty restarted node
        assert cached_tokens(complete(url, prefix + [10 + i])) == 64

