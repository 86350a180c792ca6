"""The product as a user runs it: `pdcluster`'s processes on 127.0.0.1 and the official
`openai` client. Disaggregated topologies (1P1D, 2P2D) answer exactly what a colocated
node and the offline engine answer; streams, chat, token-id prompts, concurrency,
disconnects and bad input behave as the HTTP contract says."""

from __future__ import annotations

import asyncio
import re
import signal
import threading
import time

import httpx
import openai
import pytest

from cluster.config import ClusterConfig
from cluster.launcher import STOP_GRACE_S, LocalCluster
from engine import LLM, SamplingParams
from engine.builtin_models import resolve_builtin
from tests.test_kv_connector_e2e import CONNECTORS

PROMPTS = ["The quick brown fox jumps over", "def fibonacci(n):", "Numbers: 1, 2, 3, 5, 8,"]
TOKEN_PROMPT = [1, 17, 99, 400, 23, 5, 77, 1024, 8, 8, 300, 42]


def cluster_config(topology: str, connector: str = "tcp", **router) -> ClusterConfig:
    p, d, c = {"1P1D": (1, 1, 0), "2P2D": (2, 2, 0), "colocated1": (0, 0, 1)}[topology]
    return ClusterConfig.model_validate({
        "model": {"path": "builtin:tiny", "dtype": "float32"},
        "router": {"port": 0, **router},
        "kv_transfer": {"connector": connector, "abort_timeout_s": 30, "transfer_timeout_s": 10},
        "engine": {"num_blocks": 256, "block_size": 16, "max_num_seqs": 64},
        "prefill": {"replicas": p, "devices": ["cpu"]},
        "decode": {"replicas": d, "devices": ["cpu"]},
        "colocated": {"replicas": c, "devices": ["cpu"]},
    })


def start(config: ClusterConfig, tmp_path_factory) -> LocalCluster:
    cluster = LocalCluster(config, run_dir=tmp_path_factory.mktemp("run"))
    cluster.start(timeout_s=180)
    return cluster


@pytest.fixture(scope="module")
def offline():
    return LLM(str(resolve_builtin("tiny")), dtype="float32", device="cpu", num_blocks=256)


@pytest.fixture(scope="module", params=[
    pytest.param(("1P1D", "nixl"), id="1P1D-nixl", marks=CONNECTORS[0].marks),
    pytest.param(("2P2D", "tcp"), id="2P2D-tcp"),
    pytest.param(("colocated1", "tcp"), id="colocated1")])
def cluster(request, tmp_path_factory):
    topology, connector = request.param
    c = start(cluster_config(topology, connector), tmp_path_factory)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def all_blocks_free(url: str, timeout_s: float = 15.0) -> list[dict]:
    """Poll /cluster until no node runs anything and every block is free."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = httpx.get(url + "/cluster").json()["nodes"]
        if all(n["healthy"] and n["running"] == 0 and n["waiting"] == 0 and n["kv_blocks_free"] == n["kv_blocks_total"]
               for n in nodes) or time.monotonic() > deadline:
            return nodes
        time.sleep(0.2)


GREEDY = dict(temperature=0.0, max_tokens=12, extra_body={"ignore_eos": True})
SEEDED = dict(temperature=0.9, top_p=0.95, seed=1234, max_tokens=12, extra_body={"ignore_eos": True, "top_k": 40})


def assert_completions_equal_the_offline_engine(client, offline, kind: str) -> None:
    """Streamed and not, the cluster's completions are the offline engine's, token for token
    (as text). Shared by every backend's tests."""
    kw = GREEDY if kind == "greedy" else SEEDED
    params = SamplingParams(temperature=kw["temperature"], max_tokens=12, ignore_eos=True,
                            seed=kw.get("seed"), top_p=kw.get("top_p", 1.0), top_k=kw["extra_body"].get("top_k", 0))
    want = [o.outputs[0].text for o in offline.generate(PROMPTS, params)]
    got = [client.completions.create(model="builtin:tiny", prompt=p, **kw).choices[0].text for p in PROMPTS]
    assert got == want
    streamed = ["".join(c.choices[0].text for c in client.completions.create(
        model="builtin:tiny", prompt=p, stream=True, **kw) if c.choices) for p in PROMPTS]
    assert streamed == want


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_completions_equal_the_offline_engine(client, offline, kind):
    assert_completions_equal_the_offline_engine(client, offline, kind)


def test_min_tokens_holds_across_the_split(client, offline):
    """The prefill node samples one token, the decode node the rest: min_tokens bans eos on
    both, and a stop string the first token completes does not end the request early."""
    params = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=6)
    want = offline.generate(PROMPTS, params)
    for p, w in zip(PROMPTS, want):
        got = client.completions.create(model="builtin:tiny", prompt=p, max_tokens=8, temperature=0.0,
                                        extra_body={"min_tokens": 6})
        assert got.choices[0].text == w.outputs[0].text and got.usage.completion_tokens >= 6
    tok = offline.engine.tokenizer
    stops = [tok.decode(w.outputs[0].token_ids[:1]) for w in want]
    assert any(stops), "no prompt's first token has text to stop at"
    for p, stop in zip(PROMPTS, stops):
        if not stop:
            continue
        w = offline.generate([p], SamplingParams(temperature=0.0, max_tokens=8, min_tokens=6, stop=[stop]))[0]
        got = client.completions.create(model="builtin:tiny", prompt=p, max_tokens=8, temperature=0.0, stop=[stop],
                                        extra_body={"min_tokens": 6})
        assert (got.choices[0].text, got.choices[0].finish_reason) == (w.outputs[0].text, w.outputs[0].finish_reason)
        assert got.usage.completion_tokens >= 6


def test_token_id_prompt_and_usage(client, offline):
    want = offline.generate([TOKEN_PROMPT], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    resp = client.completions.create(model="builtin:tiny", prompt=TOKEN_PROMPT, **GREEDY)
    assert resp.choices[0].text == want.outputs[0].text
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == len(TOKEN_PROMPT) and resp.usage.completion_tokens == 12


def test_chat_streaming_and_not(client, offline):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    want = offline.chat(messages, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))[0].outputs[0].text
    resp = client.chat.completions.create(model="builtin:tiny", messages=messages, temperature=0.0, max_tokens=10,
                                          extra_body={"ignore_eos": True})
    assert resp.choices[0].message.content == want and resp.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="builtin:tiny", messages=messages, temperature=0.0, max_tokens=10,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == 10


def test_sixty_four_concurrent_streams_complete_and_free_every_block(cluster):
    async def one(client, i):
        stream = await client.completions.create(model="builtin:tiny", prompt=f"Request {i}: tell me", stream=True,
                                                 max_tokens=16, temperature=0.0, extra_body={"ignore_eos": True},
                                                 stream_options={"include_usage": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            usage = chunk.usage or usage
        return usage.completion_tokens

    async def run():
        client = openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        return await asyncio.gather(*(one(client, i) for i in range(64)))

    assert asyncio.run(run()) == [16] * 64
    nodes = all_blocks_free(cluster.url)
    assert all(n["kv_blocks_free"] == n["kv_blocks_total"] for n in nodes), nodes


def test_a_disconnected_client_frees_its_blocks(cluster):
    body = {"prompt": "Keep talking for a long while", "max_tokens": 3000, "stream": True,
            "temperature": 0.0, "ignore_eos": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", cluster.url + "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few tokens in, then hang up
            assert any(line.startswith("data: ") for line in got)
    nodes = all_blocks_free(cluster.url)
    assert all(n["running"] == 0 and n["kv_blocks_free"] == n["kv_blocks_total"] for n in nodes), nodes


def test_bad_requests_get_4xx_and_the_cluster_keeps_serving(client, cluster):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="builtin:tiny", prompt="x", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        client.completions.create(model="builtin:tiny", prompt=[10**9])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")
    r = httpx.post(cluster.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    assert client.completions.create(model="builtin:tiny", prompt="still fine?", max_tokens=2).choices[0].text is not None


def test_models_health_metrics_and_cluster_endpoints(client, cluster):
    assert [m.id for m in client.models.list().data] == ["builtin:tiny"]
    assert httpx.get(cluster.url + "/health").status_code == 200
    metrics = httpx.get(cluster.url + "/metrics").text
    assert "pdcluster_requests_total" in metrics and "pdcluster_node_kv_blocks_free" in metrics
    # Cumulative counts are counters (vLLM's vllm:prefix_cache_queries is one), levels gauges.
    assert "# TYPE pdcluster_node_prefix_cache_queries_total counter" in metrics
    assert "# TYPE pdcluster_node_num_preemptions_total counter" in metrics
    assert "# TYPE pdcluster_node_kv_blocks_free gauge" in metrics
    assert "# TYPE pdcluster_node_kv_transfer_total counter" in metrics
    assert 'le="2560.0"' in metrics  # vLLM's TTFT buckets: a long wait is not just "+Inf"
    nodes = httpx.get(cluster.url + "/cluster").json()["nodes"]
    for n in nodes:
        assert {"id", "role", "address", "pid", "healthy", "kv_blocks_total", "kv_blocks_free", "running",
                "waiting"} <= set(n)
        assert n["role"] in ("prefill", "decode", "both")
        assert n["kv_events_address"].startswith("tcp://")  # split and colocated nodes alike publish KV events


def test_api_key_is_enforced(tmp_path_factory):
    cluster = start(cluster_config("colocated1", api_key="sesame"), tmp_path_factory)
    try:
        bad = openai.OpenAI(base_url=cluster.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="builtin:tiny", prompt="hi", max_tokens=2)
        good = openai.OpenAI(base_url=cluster.url + "/v1", api_key="sesame", max_retries=0)
        assert good.completions.create(model="builtin:tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1
    finally:
        cluster.stop()


def test_decode_nodes_pull_the_prompt_kv_instead_of_recomputing(client, cluster):
    nodes = httpx.get(cluster.url + "/cluster").json()["nodes"]
    if not any(n["role"] == "decode" for n in nodes):
        pytest.skip("colocated topology: no KV transfer")
    for i in range(4):
        client.completions.create(model="builtin:tiny", prompt=f"A fresh prompt {i} " * 10, **GREEDY)
    time.sleep(1.2)  # the router polls node stats every 0.5 s
    nodes = httpx.get(cluster.url + "/cluster").json()["nodes"]
    lent = sum(n["kv_transfer"].get("requests_lent", 0) for n in nodes if n["role"] == "prefill")
    loads = sum(n["kv_transfer"].get("loads", 0) for n in nodes if n["role"] == "decode")
    failed = sum(n["kv_transfer"].get("blocks_failed", 0) for n in nodes if n["role"] == "decode")
    loaded = sum(n["kv_transfer"].get("blocks_loaded", 0) for n in nodes if n["role"] == "decode")
    streamed = sum(n["kv_transfer"].get("streamed_loads", 0) for n in nodes if n["role"] == "decode")
    assert lent >= 4 and loads >= 4 and loaded >= 4 * 4 and failed == 0
    assert streamed >= 4  # dispatched to both nodes at once (router.dispatch_to_both, the default)


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_a_dead_prefill_node_is_recomputed_on_the_decode_node_or_fails_clearly(tmp_path_factory, offline, policy):
    config = cluster_config("1P1D")
    config = config.model_copy(update={"kv_transfer": config.kv_transfer.model_copy(
        update={"load_failure_policy": policy})})
    cluster = start(config, tmp_path_factory)  # not supervised: a dead node stays dead
    try:
        client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        prefill = next(c for c in cluster.nodes if c.name.startswith("prefill"))
        prefill.proc.kill()
        prefill.proc.wait()
        deadline = time.monotonic() + 10
        while any(n["healthy"] for n in httpx.get(cluster.url + "/cluster").json()["nodes"] if n["role"] == "prefill"):
            assert time.monotonic() < deadline, "the router did not notice the dead prefill node"
            time.sleep(0.2)
        metrics = httpx.get(cluster.url + "/metrics").text  # a dead node's last stats are not its state
        assert 'pdcluster_node_healthy{node="prefill-0",role="prefill"} 0.0' in metrics
        assert 'pdcluster_node_running{node="prefill-0"' not in metrics
        dead = next(n for n in httpx.get(cluster.url + "/cluster").json()["nodes"] if n["id"] == "prefill-0")
        assert (dead["healthy"], dead["stats_current"], dead["running"], dead["kv_blocks_free"]) == (False, False, 0, 0)
        want = offline.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
        if policy == "recompute":
            got = client.completions.create(model="builtin:tiny", prompt=PROMPTS[0], **GREEDY)
            assert got.choices[0].text == want[0].outputs[0].text
        else:
            with pytest.raises(openai.APIStatusError) as err:
                client.completions.create(model="builtin:tiny", prompt=PROMPTS[0], **GREEDY)
            assert err.value.status_code == 503 and "prefill" in err.value.message
    finally:
        cluster.stop()


def test_a_prefill_node_dying_while_it_prefills_requests_hands_every_one_to_the_decode_node(tmp_path_factory,
                                                                                          offline):
    """Killed while it still owes first tokens: the decode jobs sent beside the prefill jobs
    are aborted and the decode node prefills each request itself, as a job of its own id
    (an answer to the abort must not end the new job)."""
    config = cluster_config("1P1D")
    config = config.model_copy(update={"engine": config.engine.model_copy(update={"max_num_batched_tokens": 32})})
    cluster = start(config, tmp_path_factory)  # 32 tokens a step: the prefills take ~170 steps
    try:
        prompts = [[(7 * i + 13 * j) % 1500 + 40 for j in range(900)] for i in range(6)]
        want = [o.outputs[0].text for o in offline.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4,
                                                                                     ignore_eos=True))]
        answers: list = [None] * len(prompts)

        def ask(i: int) -> None:
            answers[i] = httpx.post(cluster.url + "/v1/completions", timeout=120, json={
                "prompt": prompts[i], "max_tokens": 4, "temperature": 0.0, "ignore_eos": True})

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while sum(n["prefills_waiting"] for n in httpx.get(cluster.url + "/cluster").json()["nodes"]) < 3:
            assert time.monotonic() < deadline, "the requests never reached the prefill node"
            time.sleep(0.01)
        prefill = next(c for c in cluster.nodes if c.name.startswith("prefill"))
        prefill.proc.kill()
        for t in threads:
            t.join(120)
        assert [(a.status_code, a.json()["choices"][0]["text"]) for a in answers] == [(200, w) for w in want]
        text = httpx.get(cluster.url + "/metrics").text
        failovers = re.search(r'^pdcluster_failovers_total\{stage="prefill"\} (\S+)$', text, re.M)
        assert failovers and float(failovers.group(1)) >= 1  # some were still prefilling when it died
    finally:
        cluster.stop()


def sse_chunks(resp: httpx.Response):
    """The JSON chunks of a streamed answer, none of them an error."""
    for line in resp.iter_lines():
        if line.startswith("data: {"):
            chunk = httpx.Response(200, content=line[6:]).json()
            assert "error" not in chunk, chunk
            yield chunk


def test_a_decode_node_stopped_with_sigterm_finishes_its_streams_then_exits(tmp_path_factory, offline):
    """SIGTERM drains a node: the router sends it nothing new but keeps relaying what runs
    there (not failed over: nobody would read its answers), and it exits well inside the
    launcher's grace before SIGKILL."""
    cluster = start(cluster_config("1P1D"), tmp_path_factory)
    try:
        n_tokens = 300
        want = offline.generate(PROMPTS[2:3], SamplingParams(temperature=0.0, max_tokens=n_tokens,
                                                             ignore_eos=True))[0].outputs[0].text
        body = {"prompt": PROMPTS[2], "max_tokens": n_tokens, "stream": True, "temperature": 0.0, "ignore_eos": True}
        decode = next(c for c in cluster.nodes if c.name.startswith("decode"))
        text, stopped_at = "", None
        with httpx.Client(timeout=60) as http, http.stream("POST", cluster.url + "/v1/completions", json=body) as resp:
            for chunk in sse_chunks(resp):
                text += chunk["choices"][0]["text"] if chunk["choices"] else ""
                if stopped_at is None and len(text) > 20:
                    decode.proc.send_signal(signal.SIGTERM)
                    stopped_at = time.monotonic()
        assert stopped_at is not None and text == want
        assert decode.proc.wait(20) == 0 and time.monotonic() - stopped_at < STOP_GRACE_S
        metrics = httpx.get(cluster.url + "/metrics").text
        assert 'pdcluster_failovers_total{stage="decode"} 1.0' not in metrics
        refused = httpx.post(cluster.url + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 2}, timeout=30)
        assert refused.status_code == 503  # its only decode node is gone
    finally:
        cluster.stop()


@pytest.mark.parametrize("role", ["decode", "prefill"])
def test_under_fail_a_job_no_node_took_yet_goes_to_another_node(tmp_path_factory, role):
    """`fail` is about KV that cannot be loaded: a job a dead node never took (the router
    has not noticed yet) goes to the other node of its kind, whatever the policy."""
    config = cluster_config("1P1D").model_copy(update={role: cluster_config("2P2D").decode})
    config = config.model_copy(update={"kv_transfer": config.kv_transfer.model_copy(
        update={"load_failure_policy": "fail"})})
    cluster = start(config, tmp_path_factory)  # 1P2D or 2P1D, not supervised
    try:
        with httpx.Client(timeout=60) as http:
            for i in range(2):  # both nodes of the role in use
                assert http.post(cluster.url + "/v1/completions", json={"prompt": [5, 6, 7, i], "max_tokens": 4}
                                 ).status_code == 200
            dead = next(c for c in cluster.nodes if c.name == f"{role}-0")
            dead.proc.kill()
            dead.proc.wait()
            codes = [http.post(cluster.url + "/v1/completions", json={"prompt": [5, 6, 7, 100 + i], "max_tokens": 4}
                               ).status_code for i in range(8)]  # the first ones go out before the next health tick
        assert codes == [200] * 8
    finally:
        cluster.stop()


def test_a_decode_node_dying_mid_stream_hands_the_request_to_another(tmp_path_factory, offline):
    config = cluster_config("1P1D").model_copy(update={"decode": cluster_config("2P2D").decode})
    cluster = start(config, tmp_path_factory)  # 1P2D, not supervised: a dead node stays dead
    try:
        n_tokens = 1500
        params = SamplingParams(temperature=0.0, max_tokens=n_tokens, ignore_eos=True)
        want = offline.generate(PROMPTS[1:2], params)[0].outputs[0].text
        body = {"prompt": PROMPTS[1], "max_tokens": n_tokens, "stream": True, "temperature": 0.0, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        text, usage, killed = "", None, None
        with httpx.Client(timeout=60) as http, http.stream("POST", cluster.url + "/v1/completions", json=body) as resp:
            for chunk in sse_chunks(resp):
                if chunk["choices"]:
                    text += chunk["choices"][0]["text"]
                usage = chunk.get("usage") or usage
                if killed is None and len(text) > 20:  # some tokens in: kill the node decoding it
                    nodes = httpx.get(cluster.url + "/cluster").json()["nodes"]  # stats lag up to 0.5 s
                    busy = [n for n in nodes if n["role"] == "decode" and n["running"] > 0]
                    if busy:
                        killed = next(c for c in cluster.nodes if c.name == busy[0]["id"])
                        killed.proc.kill()
        assert killed is not None and killed.proc.wait(5) is not None
        assert text == want  # the other decode node recomputed the KV and went on, token for token
        assert usage["completion_tokens"] == n_tokens
        assert 'pdcluster_failovers_total{stage="decode"} 1.0' in httpx.get(cluster.url + "/metrics").text
    finally:
        cluster.stop()


def test_logprobs_come_back_for_completions_and_chat_streamed_or_not(client, offline):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)
    want = offline.generate(PROMPTS[:1], params)[0].outputs[0]
    want_lps = [lp.logprob for lp in want.logprobs]
    kw = dict(model="builtin:tiny", prompt=PROMPTS[0], temperature=0.0, max_tokens=6, logprobs=2,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].logprobs
    assert full.token_logprobs == pytest.approx(want_lps, abs=1e-4)
    assert all(len(top) >= 2 for top in full.top_logprobs)
    streamed = [lp for c in client.completions.create(stream=True, **kw) if c.choices and c.choices[0].logprobs
                for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(want_lps, abs=1e-4)
    messages = [{"role": "user", "content": PROMPTS[0]}]
    chat_want = offline.chat(messages, params)[0].outputs[0]
    chat = client.chat.completions.create(model="builtin:tiny", messages=messages, temperature=0.0, max_tokens=6,
                                          logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([lp.logprob for lp in chat_want.logprobs], abs=1e-4)
    assert all(len(c.top_logprobs) == 2 for c in content)


def settled_nodes(url: str, done=lambda nodes: True, timeout_s: float = 10.0) -> list[dict]:
    """/cluster's nodes once `done(nodes)` holds and no node runs or queues anything (the
    router polls node stats every 0.5 s: such a snapshot was taken after the work ended)."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = httpx.get(url + "/cluster").json()["nodes"]
        if done(nodes) and all(n["running"] == 0 and n["waiting"] == 0 for n in nodes):
            return nodes
        assert time.monotonic() < deadline, nodes
        time.sleep(0.2)


def by_role(nodes: list[dict], field: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for n in nodes:
        value = n["kv_transfer"].get(field, 0) if field == "loads" else n[field]
        out[n["role"]] = out.get(n["role"], 0) + value
    return out


def decisions_counted(url: str) -> float:
    """Every request's prefill plan, counted in pdcluster_router_prefill_decisions_total."""
    text = httpx.get(url + "/metrics").text
    return sum(float(v) for v in re.findall(r"^pdcluster_router_prefill_decisions_total\{[^}]*\} (\S+)$", text, re.M))


def test_n_choices_fork_choice_0_on_its_nodes_and_equal_single_requests(client, cluster, offline):
    """n=3 with seed s: the choices of three requests seeded s, s+1, s+2, while the node
    that decoded choice 0 forked it for the others (round robin would have spread them):
    the prompt was computed once and, split, its KV pulled once."""
    prompt = "Forked choices: " + "one two three four five six seven " * 6
    p = len(offline.tokenizer.encode(prompt))
    time.sleep(2.0)  # a stats snapshot after the earlier tests' last steps, even on a loaded machine
    before = settled_nodes(cluster.url)
    # 32 tokens: choice 0 still decodes when the others reach the decode node (a fork of a
    # finished choice 0 falls back to pulling, correct but not what is measured here).
    kw = dict(SEEDED, max_tokens=32)
    decisions = decisions_counted(cluster.url)
    many = client.completions.create(model="builtin:tiny", prompt=prompt, n=3, **kw)
    assert decisions_counted(cluster.url) == decisions + 1  # one request, however many choices
    forks_before = by_role(before, "forks")
    split = "prefill" in forks_before
    forking = "decode" if split else "both"  # the choices go whole to choice 0's decoding node
    after = settled_nodes(cluster.url, lambda nodes: by_role(nodes, "forks")[forking] > forks_before[forking])
    delta = {f: {r: by_role(after, f)[r] - by_role(before, f)[r] for r in by_role(after, f)}
             for f in ("forks", "fork_fallbacks", "fork_tokens_saved", "tokens_computed", "loads")}
    assert delta["forks"] == {r: 2 if r == forking else 0 for r in delta["forks"]}, delta
    assert set(delta["fork_fallbacks"].values()) == {0}, delta
    if split:  # the prefill node computed choice 0's prompt only; its KV moved once
        assert delta["tokens_computed"]["prefill"] == p and delta["loads"]["decode"] == 1, delta
        assert delta["fork_tokens_saved"] == {"prefill": 0, "decode": 2 * (p - 1)}, delta
    else:
        assert delta["tokens_computed"]["both"] == p + 2 + 3 * (32 - 1), delta
    params = [SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234 + i, max_tokens=32, ignore_eos=True)
              for i in range(3)]
    want = [o.outputs[0].text for o in offline.generate([prompt] * 3, params)]
    assert [c.text for c in sorted(many.choices, key=lambda c: c.index)] == want
    assert len(set(want)) > 1 and many.usage.completion_tokens == 96
