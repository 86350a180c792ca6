"""Two colocated (`both`) nodes under `router.disaggregation.mode: conditional`, as
`pdcluster up` runs them: a short prompt is prefilled on its decode node, and so is a long
one while the other node is no cheaper (two idle nodes); a long prompt whose prefix the
other node holds is prefilled there, which lends its KV (kv_both); a prompt the decode
node already caches is local again. Every answer is the offline engine's, token for
token, greedy and seeded; every decision is counted in /metrics and named in the
x-pdcluster-prefill header. A second router on the same nodes shows `always` and
`never`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys

import httpx
import msgspec
import openai
import pytest

from bench.cli import per_request
from bench.client import run_load
from bench.metrics import summarize
from bench.workloads import BenchRequest
from cluster.config import ClusterConfig
from cluster.launcher import LocalCluster, _free_ports
from engine import LLM, SamplingParams
from engine.builtin_models import resolve_builtin
from tests.test_cluster_e2e import GREEDY, SEEDED, all_blocks_free, start
from tests.test_kv_events_cluster import in_sync, metric, wait_for

THRESHOLD = 48  # max_local_prefill_tokens
SHORT = [1, 17, 99, 400, 23, 5, 77, 1024, 8, 8, 300, 42]   # 12 tokens


def long_prompt(tag: int) -> list[int]:
    """Six blocks of 16 no other prompt here shares (tags apart mod 1900)."""
    return [(tag * 131 + i * 7) % 1900 + 50 for i in range(96)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    config = ClusterConfig.model_validate({
        "model": {"path": "builtin:tiny", "dtype": "float32"},
        "router": {"port": 0, "policy": "round_robin",  # the decode node in turn, whatever it holds
                   "disaggregation": {"mode": "conditional", "max_local_prefill_tokens": THRESHOLD}},
        "kv_transfer": {"connector": "tcp", "abort_timeout_s": 30, "transfer_timeout_s": 10},
        "engine": {"num_blocks": 256, "block_size": 16, "max_num_seqs": 16},
        "prefill": {"replicas": 0}, "decode": {"replicas": 0},
        "colocated": {"replicas": 2, "devices": ["cpu"]},
    })
    c = start(config, tmp_path_factory)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline():
    return LLM(str(resolve_builtin("tiny")), dtype="float32", device="cpu", num_blocks=256)


def offline_text(offline, prompt: list[int], kw: dict) -> str:
    params = SamplingParams(temperature=kw["temperature"], max_tokens=kw["max_tokens"], ignore_eos=True,
                            seed=kw.get("seed"), top_p=kw.get("top_p", 1.0), top_k=kw["extra_body"].get("top_k", 0))
    return offline.generate([prompt], params)[0].outputs[0].text


def complete(client, prompt: list[int], kw: dict, stream: bool) -> tuple[str, str, str]:
    """(text, x-pdcluster-prefill, x-pdcluster-prefill-reason) of one completion."""
    raw = client.completions.with_raw_response.create(model="builtin:tiny", prompt=prompt, stream=stream, **kw)
    answer = raw.parse()
    text = "".join(c.choices[0].text for c in answer if c.choices) if stream else answer.choices[0].text
    return text, raw.headers.get("x-pdcluster-prefill"), raw.headers.get("x-pdcluster-prefill-reason")


def lent(client, url: str, prompt: list[int], kw: dict, stream: bool) -> tuple[str, str, str]:
    """complete() of a long prompt whose first 96 tokens one node computed just before (two
    idle nodes: whole, on its decode node). round_robin sends the decode to the other node
    next; the holder, with only the rest to compute and nothing more in flight, is the
    cheaper prefill, and lends."""
    wait_for(lambda: idle(url), "the nodes to finish what came before")
    head = complete(client, prompt[:96], {**GREEDY, "max_tokens": 2}, False)
    assert head[1:] == ("local", "local_cheaper"), head
    wait_for(lambda: in_sync(url) and idle(url), "the router's prefix index to hold the head, and the nodes idle")
    return complete(client, prompt, kw, stream)


def idle(url: str) -> bool:
    """No request of this router on any node (the router's count: a lender's job ends
    once its KV is read)."""
    return all(n["in_flight"] == 0 for n in httpx.get(url + "/cluster").json()["nodes"])


def decisions(url: str) -> dict[tuple[str, str], float]:
    text = httpx.get(url + "/metrics").text
    return {(d, r): _metric_or_zero(text, d, r) for d, r in (("local", "short_prompt"), ("remote", "long_prompt"),
                                                              ("remote", "always"), ("local", "never"),
                                                              ("local", "local_cheaper"))}


def _metric_or_zero(text: str, decision: str, reason: str) -> float:
    try:
        return metric(text, "pdcluster_router_prefill_decisions_total", decision=decision, reason=reason)
    except AssertionError:
        return 0.0


def transfer(url: str) -> dict[str, dict[str, float]]:
    text = httpx.get(url + "/metrics").text
    return {node: {c: metric(text, "pdcluster_node_kv_transfer_total", counter=c, node=node, role="both")
                   for c in ("requests_lent", "loads", "blocks_failed")} for node in ("both-0", "both-1")}


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_short_prompts_prefill_locally_and_long_ones_where_it_is_cheaper_with_the_offline_engine_s_tokens(
        cluster, client, offline, kind):
    kw = GREEDY if kind == "greedy" else SEEDED
    before = decisions(cluster.url)
    for stream in (False, True):
        assert complete(client, SHORT, kw, stream) == (offline_text(offline, SHORT, kw), "local", "short_prompt")
        prompt = long_prompt(700 + 2 * stream + (kind == "seeded"))
        assert complete(client, prompt, kw, stream) == (offline_text(offline, prompt, kw), "local", "local_cheaper")
        # Greedy: the first token the lender samples ends mid-character (its text is
        # held back there, and sent whole by the decode node).
        # The node that computed the prompt just before lends it: one token left to compute.
        prompt = long_prompt({("greedy", False): 14, ("greedy", True): 4}.get((kind, stream), 2 + stream))
        assert lent(client, cluster.url, prompt, kw, stream) == (offline_text(offline, prompt, kw), "remote",
                                                                 "long_prompt")
    after = decisions(cluster.url)
    assert after[("local", "short_prompt")] - before[("local", "short_prompt")] == 2
    assert after[("local", "local_cheaper")] - before[("local", "local_cheaper")] == 4  # two of them lent() heads
    assert after[("remote", "long_prompt")] - before[("remote", "long_prompt")] == 2


def test_both_nodes_lend_and_pull_kv_and_free_every_block(cluster, client, offline):
    before = transfer(cluster.url)
    prompts = [long_prompt(2000 + i) + SHORT * 5 for i in range(4)]
    for i, p in enumerate(prompts):
        if i % 2:  # a lent() takes two turns: a short request between moves its head to the other node
            assert complete(client, SHORT, GREEDY, False)[1:] == ("local", "short_prompt")
        assert lent(client, cluster.url, p, GREEDY, False) == (offline_text(offline, p, GREEDY), "remote",
                                                               "long_prompt")
    after = wait_for(lambda: (lambda t: t if all(t[n]["loads"] - before[n]["loads"] >= 1 for n in t) else None)(
        transfer(cluster.url)), "node stats with the loads")
    for node in ("both-0", "both-1"):
        assert after[node]["requests_lent"] - before[node]["requests_lent"] >= 1, after
        assert after[node]["loads"] - before[node]["loads"] >= 1, after
        assert after[node]["blocks_failed"] == before[node]["blocks_failed"]
    nodes = all_blocks_free(cluster.url)
    assert all(n["kv_blocks_free"] == n["kv_blocks_total"] and n["prefills_waiting"] == 0 for n in nodes), nodes
    assert httpx.get(cluster.url + "/cluster").json()["disaggregation"] == {
        "mode": "conditional", "colocated_share_kv": True, "max_local_prefill_tokens": THRESHOLD,
        "max_prefill_queue": 4}


def test_a_long_prompt_the_decode_node_already_caches_is_prefilled_there(cluster, offline, tmp_path):
    with second_router(cluster, tmp_path, policy="prefix_aware") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        prompt = long_prompt(3000)
        assert complete(client, prompt, GREEDY, False)[1:] == ("local", "local_cheaper")
        wait_for(lambda: in_sync(url), "the router's prefix index to catch up")
        # prefix_aware sends it to the node holding the prompt: only its last tokens are left.
        follow_up = prompt + [5, 6, 7]
        assert complete(client, follow_up, GREEDY, False) == (offline_text(offline, follow_up, GREEDY), "local",
                                                              "short_prompt")


@contextlib.contextmanager
def second_router(cluster: LocalCluster, tmp_path, **changes):
    """Another router process on the same nodes, its spec changed by `changes`."""
    port = _free_ports(1)[0]
    spec = msgspec.structs.replace(cluster._router_spec, port=port, **changes)
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "router2.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "router", "--spec", msgspec.json.encode(spec).decode()],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **cluster._node_secrets})
    try:
        wait_for(lambda: _healthy(url), "the second router", timeout_s=60)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _healthy(url: str) -> bool:
    """Every node healthy in this router's view (/health answers 200 with one node of each
    kind up; a plan would then see no lender yet)."""
    try:
        nodes = httpx.get(url + "/cluster", timeout=2).json()["nodes"]
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    return bool(nodes) and all(n["healthy"] for n in nodes)


@pytest.mark.parametrize("mode, prompt, expected", [("always", SHORT, ("remote", "always")),
                                                    ("never", long_prompt(4000), ("local", "never"))])
def test_always_and_never_on_the_same_nodes(cluster, offline, tmp_path, mode, prompt, expected):
    with second_router(cluster, tmp_path, disaggregation_mode=mode, colocated_share_kv=True) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for kw in (GREEDY, SEEDED):
            assert complete(client, prompt, kw, False) == (offline_text(offline, prompt, kw), *expected)
        assert decisions(url)[expected] == 2


def test_a_decode_job_sent_after_the_prefill_answers_gives_the_same_tokens(cluster, offline, tmp_path):
    """router.dispatch_to_both false: the decode job follows the prefill's answer and pulls
    the lent KV whole (no streamed pull) — the tokens of the default dispatch, and the
    offline engine's."""
    def streamed_loads() -> float:
        text = httpx.get(cluster.url + "/metrics").text
        return sum(metric(text, "pdcluster_node_kv_transfer_total", counter="streamed_loads", node=n, role="both")
                   for n in ("both-0", "both-1"))

    with second_router(cluster, tmp_path, dispatch_to_both=False) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        before = (transfer(cluster.url), streamed_loads())
        for i, kw in enumerate((GREEDY, SEEDED)):
            prompt = long_prompt(6000 + i) + SHORT * 5
            assert lent(client, url, prompt, kw, False) == (offline_text(offline, prompt, kw), "remote",
                                                            "long_prompt")
        loads = lambda: sum(t["loads"] for t in transfer(cluster.url).values())  # noqa: E731
        wait_for(lambda: loads() - sum(t["loads"] for t in before[0].values()) >= 2, "the two whole pulls")
        assert streamed_loads() == before[1]


def test_the_bench_records_each_request_s_prefill_plan(cluster):
    requests = [BenchRequest(0, SHORT, 4), BenchRequest(1, long_prompt(5000), 4)]
    run = asyncio.run(run_load(cluster.url, requests, concurrency=1, metrics_settle_s=0.0))
    assert [(r.ok, r.prefill, r.prefill_reason) for r in run.results] == [(True, "local", "short_prompt"),
                                                                          (True, "local", "local_cheaper")]
    assert per_request(run.results[1])["prefill"] == "local"
    assert summarize(run.results, run.duration_s)["prefill_decisions"] == {
        "local": 2, "local:short_prompt": 1, "local:local_cheaper": 1}
