"""Failover that cleans up, on a real 1P2D cluster (TCP connector, `recompute`):

* a frozen (SIGSTOPped) decode node is declared down within `router.node_timeout_s`, its
  stream finishes on the other decode node, and when it wakes the request abandoned on
  it is aborted there (its blocks come back);
* a decode node killed while loading a request's KV: the router tells the prefill node
  to release the lent blocks at once (not after abort_timeout_s);
* a prefill node killed while a decode node loads from it: the router tells the decode
  node, which gives up on the load at once and recomputes (not after transfer_timeout_s).

Decode nodes wait `fault_delay_s` before each KV read, which holds each request in the
"loading" state long enough to kill a node there. The tests run in order and use the
nodes up: the last one leaves a cluster with no prefill node."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from cluster.config import ClusterConfig
from cluster.launcher import LocalCluster
from engine import LLM, SamplingParams
from engine.builtin_models import resolve_builtin

NODE_TIMEOUT_S = 2.0
LOAD_DELAY_S = 1.5
TRANSFER_TIMEOUT_S = 30.0
ABORT_TIMEOUT_S = 60.0
PROMPT = "The failover test prompt is long enough to fill a few KV blocks on the prefill node. " * 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    config = ClusterConfig.model_validate({
        "model": {"path": "builtin:tiny", "dtype": "float32"},
        "router": {"port": 0, "node_timeout_s": NODE_TIMEOUT_S},
        "kv_transfer": {"connector": "tcp", "load_failure_policy": "recompute", "abort_timeout_s": ABORT_TIMEOUT_S,
                        "transfer_timeout_s": TRANSFER_TIMEOUT_S, "extra": {"fault_delay_s": LOAD_DELAY_S}},
        "engine": {"num_blocks": 256, "block_size": 16, "max_num_seqs": 16},
        "prefill": {"replicas": 1, "devices": ["cpu"]},
        "decode": {"replicas": 2, "devices": ["cpu"]},
    })
    c = LocalCluster(config, run_dir=tmp_path_factory.mktemp("run"))
    c.start(timeout_s=180)  # not supervised: a killed node stays dead
    yield c
    for child in c.nodes:
        child.signal(signal.SIGCONT)
    c.stop()


@pytest.fixture(scope="module")
def offline():
    return LLM(str(resolve_builtin("tiny")), dtype="float32", device="cpu", num_blocks=256)


def greedy_text(offline, n_tokens: int) -> str:
    return offline.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=n_tokens, ignore_eos=True))[0] \
        .outputs[0].text


def view(cluster) -> dict[str, dict]:
    return {n["id"]: n for n in httpx.get(cluster.url + "/cluster", timeout=10).json()["nodes"]}


def wait_for(what: str, check, timeout_s: float, every_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(every_s)


class Stream:
    """A greedy streamed completion on its own thread: its text and token arrival times."""

    def __init__(self, cluster, n_tokens: int, hang_up_after: int | None = None):
        self.text, self.arrivals, self.errors, self.done_at = "", [], [], None
        body = {"prompt": PROMPT, "max_tokens": n_tokens, "stream": True, "temperature": 0.0, "ignore_eos": True}
        self.thread = threading.Thread(target=self._run, args=(cluster.url, body, hang_up_after))
        self.thread.start()

    def _run(self, url, body, hang_up_after):
        with httpx.Client(timeout=120, trust_env=False) as http, \
                http.stream("POST", url + "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if "error" in event:
                        self.errors.append(event)
                    elif event["choices"]:
                        self.text += event["choices"][0]["text"]
                        self.arrivals.append(time.monotonic())
                        if len(self.arrivals) == hang_up_after:
                            break
        self.done_at = time.monotonic()

    def join(self) -> Stream:
        self.thread.join(120)
        assert not self.thread.is_alive()
        return self


def child(cluster, node_id: str):
    return next(c for c in cluster.nodes if c.name == node_id)


def test_a_frozen_decode_node_is_failed_over_within_the_node_timeout_and_aborted_when_it_wakes(cluster):
    want = Stream(cluster, 200).join().text  # unfaulted (disaggregated = offline: test_cluster_e2e)
    # 2000 tokens: left alone after it wakes, the frozen node would decode for many seconds.
    # The client reads 200 tokens (the last ones from the other decode node) and hangs up.
    stream = Stream(cluster, 2000, hang_up_after=200)
    busy = wait_for("a decode node running the request",
                    lambda: next((i for i, n in view(cluster).items() if n["role"] == "decode" and n["running"]), None),
                    30)
    wait_for("some tokens", lambda: len(stream.arrivals) > 5, 30)
    frozen = child(cluster, busy)
    os.kill(frozen.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    assert len(stream.arrivals) < 150, "the stream was nearly over before the node froze"
    try:
        stream.join()
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    assert not stream.errors and want.startswith(stream.text) and len(stream.text) > len(want) // 2
    gap = max(b - a for a, b in zip(stream.arrivals, stream.arrivals[1:]) if b > stopped_at)
    assert gap < NODE_TIMEOUT_S + 3.0, f"the stream paused {gap:.1f} s with node_timeout_s={NODE_TIMEOUT_S}"
    # Awake again: the router aborts what it gave up on there, instead of letting it run on for nobody.
    wait_for(f"{busy} healthy again", lambda: view(cluster)[busy]["healthy"], 20)
    node = wait_for(f"{busy} idle with every block free",
                    lambda: (n := view(cluster)[busy])["running"] == 0 and n["kv_blocks_free"] == n["kv_blocks_total"]
                    and n, 3.0)
    assert node["pid"] == frozen.pid


def test_decode_failover_releases_the_lent_kv_on_the_prefill_node_at_once(cluster, offline):
    n_tokens = 30
    want = greedy_text(offline, n_tokens)
    stream = Stream(cluster, n_tokens)

    def loading():
        v = view(cluster)
        held = v["prefill-0"]["kv_blocks_free"] < v["prefill-0"]["kv_blocks_total"]
        return held and next((i for i, n in v.items() if n["role"] == "decode" and n["waiting_for_remote_kv"]), None)

    victim = child(cluster, wait_for("a decode node loading KV lent by the prefill node", loading, 30, 0.05))
    victim.proc.kill()
    victim.proc.wait()
    killed_at = time.monotonic()
    wait_for("the prefill node to free the lent blocks",
             lambda: (n := view(cluster)["prefill-0"])["kv_blocks_free"] == n["kv_blocks_total"], 3.0, 0.05)
    freed_after = time.monotonic() - killed_at
    stream.join()
    assert not stream.errors and stream.text == want
    assert freed_after < 3.0 < ABORT_TIMEOUT_S
    assert view(cluster)["prefill-0"]["kv_transfer"]["requests_held"] == 0


def test_a_frozen_prefill_node_that_answers_again_lends_again(cluster, offline):
    """Declared down while frozen (its consumers told so), it answers again: its consumers
    load from it again instead of failing every load (and leaving its lent KV held)."""
    failures = {i: n["kv_transfer"].get("load_failures", 0) for i, n in view(cluster).items() if n["role"] == "decode"}
    prefill = child(cluster, "prefill-0")
    os.kill(prefill.pid, signal.SIGSTOP)
    try:
        wait_for("prefill-0 declared down", lambda: not view(cluster)["prefill-0"]["healthy"], NODE_TIMEOUT_S + 10)
    finally:
        os.kill(prefill.pid, signal.SIGCONT)
    wait_for("prefill-0 healthy again", lambda: view(cluster)["prefill-0"]["healthy"], 20)
    time.sleep(0.5)  # the router's next health tick tells its consumers
    lent = view(cluster)["prefill-0"]["kv_transfer"].get("requests_lent", 0)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for i in range(3):  # fresh prompts: nothing in any prefix cache, so each one's KV is pulled
        prompt = f"Thawed producer {i}: " + PROMPT
        r = httpx.post(cluster.url + "/v1/completions", timeout=60,
                       json={"prompt": prompt, "max_tokens": 8, "temperature": 0.0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == offline.generate([prompt], params)[0].outputs[0].text
    v = wait_for("the three loads in the stats, and prefill-0 holding no lent KV",
                 lambda: (v := view(cluster))["prefill-0"]["kv_transfer"]["requests_lent"] >= lent + 3
                 and v["prefill-0"]["kv_transfer"]["requests_held"] == 0
                 and v["prefill-0"]["kv_blocks_free"] == v["prefill-0"]["kv_blocks_total"] and v, 10)
    assert {i: n["kv_transfer"].get("load_failures", 0) for i, n in v.items() if n["role"] == "decode"} == failures


def test_a_dead_producer_is_given_up_on_without_waiting_for_transfer_timeout(cluster, offline):
    n_tokens = 20
    want = greedy_text(offline, n_tokens)
    decode = next(i for i, n in view(cluster).items() if n["role"] == "decode" and n["healthy"])
    stream = Stream(cluster, n_tokens)
    wait_for(f"{decode} loading KV", lambda: view(cluster)[decode]["waiting_for_remote_kv"], 30, 0.05)
    prefill = child(cluster, "prefill-0")
    prefill.proc.kill()
    prefill.proc.wait()
    killed_at = time.monotonic()
    stream.join()
    assert not stream.errors and stream.text == want  # recomputed on the decode node, token for token
    took = stream.done_at - killed_at
    assert took < 8.0, f"the request took {took:.1f} s after its producer died (transfer_timeout_s={TRANSFER_TIMEOUT_S})"
    wait_for("the failed load in the decode node's stats",
             lambda: view(cluster)[decode]["kv_transfer"]["load_failures"] >= 1, 2.0)
    # No prefill node: /health says so, and when to ask again; requests still run (prefilled on the decode node).
    health = httpx.get(cluster.url + "/health", timeout=10)
    assert health.status_code == 503 and health.headers["retry-after"] == "2"
    r = httpx.post(cluster.url + "/v1/completions", timeout=60,
                   json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0.0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy_text(offline, 5)
