"""Hostile and unlucky input against a real cluster (`pdcluster`'s processes on
127.0.0.1): fuzzed request bodies, out-of-range fields, junk on the nodes' sockets,
strangers without the cluster key, huge prompts and bodies, and the front door's
headers. Whatever arrives, no 5xx for bad input, no node crash or restart, and the
other clients' streams go on undisturbed.

One 1P1D cluster (TCP connector) serves the whole module, with an API key, the admin
endpoints behind it, a 4 MiB body limit and at most 4 requests in flight."""

from __future__ import annotations

import json
import os
import random
import socket
import string
import threading
import time

import httpx
import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.launcher import LocalCluster
from engine import node_protocol as proto
from kv_connector.cluster_key import ClusterKey
from tests.test_cluster_e2e import cluster_config, start

KEY = "sesame"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 4 << 20
MAX_IN_FLIGHT = 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    config = cluster_config("1P1D", "tcp", api_key=KEY, protect_admin_endpoints=True,
                            max_request_body_bytes=BODY_LIMIT, max_concurrent_requests=MAX_IN_FLIGHT)
    c = start(config, tmp_path_factory)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=cluster.url, headers=AUTH, timeout=60, trust_env=False) as client:
        yield client


def nodes(http) -> dict[str, dict]:
    return {n["id"]: n for n in http.get("/cluster").json()["nodes"]}


def assert_nodes_unharmed(cluster: LocalCluster, http) -> None:
    """Every node process is the one the cluster started (none died: nothing restarts them
    here), healthy, and idle again; the router counts nothing in flight."""
    for child in cluster.nodes:
        assert child.exit_code() is None, f"{child.name} died: {child.log_tail()}"
    deadline = time.monotonic() + 15
    while True:
        view = nodes(http)
        idle = all(n["healthy"] and n["running"] == 0 and n["waiting"] == 0 for n in view.values())
        idle = idle and "pdcluster_requests_in_flight 0.0" in http.get("/metrics").text
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {c.name: c.pid for c in cluster.nodes} == {i: n["pid"] for i, n in view.items()}
    assert idle, view


def completion(http, **body) -> httpx.Response:
    return http.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 6, "temperature": 0.0,
                                              "ignore_eos": True, **body})


# --- the property: no 5xx, whatever the body ---------------------------------------------

INTS = st.one_of(st.integers(-3, 40), st.integers(), st.sampled_from([2**31, 2**63, 2**64, 2**70, -(2**63) - 1]))
FLOATS = st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                   st.sampled_from([0.0, 1e-300, 5e-324, 1e-45, 1e-6, 0.5, 1.0, 2.0, 1e39, 1e308]))
TEXT = st.one_of(st.text(st.characters(codec=None), max_size=24),  # surrogates too: JSON escapes them
                 st.sampled_from(["\ud800", "ok \udfff", "\x00", "<s>", "</s>", "{{ raise_exception('x') }}",
                                  "x" * 300, "\u202e", "\n" * 40]))
JSON = st.recursive(st.none() | st.booleans() | INTS | FLOATS | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=6)
SMALL = st.integers(1, 6)


def field(plausible):
    """Mostly a value of the right kind, sometimes anything at all."""
    return st.one_of(plausible, plausible, JSON)


SAMPLING = {
    "temperature": field(FLOATS), "top_p": field(FLOATS), "top_k": field(INTS), "min_p": field(FLOATS),
    "seed": field(INTS), "presence_penalty": field(FLOATS), "frequency_penalty": field(FLOATS),
    "repetition_penalty": field(FLOATS), "min_tokens": field(st.integers(0, 8)), "n": field(INTS),
    "stop": field(st.one_of(TEXT, st.lists(TEXT, max_size=4))), "stop_token_ids": field(st.lists(INTS, max_size=4)),
    "bad_words": field(st.lists(TEXT, max_size=3)), "ignore_eos": field(st.booleans()),
    "include_stop_str_in_output": field(st.booleans()), "skip_special_tokens": field(st.booleans()),
    "stream": st.booleans(), "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "logit_bias": JSON, "user": field(TEXT), "workflow_id": field(TEXT), "model": field(st.just("builtin:tiny")),
}
# Never an absent or null length: the default would be "the rest of the context" (slow, not wrong).
NOT_NULL = JSON.filter(lambda v: v is not None)
COMPLETION = st.fixed_dictionaries(
    {"prompt": st.one_of(TEXT.filter(bool), st.lists(INTS, min_size=1, max_size=6), JSON),
     "max_tokens": st.one_of(SMALL, SMALL, NOT_NULL)},
    optional={**SAMPLING, "logprobs": field(st.integers(0, 6)), "echo": field(st.booleans()),
              "suffix": field(TEXT), "best_of": field(INTS)})
MESSAGE = st.fixed_dictionaries(
    {"role": field(st.sampled_from(["system", "developer", "user", "assistant", "tool"])),
     "content": field(st.one_of(TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
                                                max_size=2)))},
    optional={"name": field(TEXT), "tool_call_id": field(TEXT)})
CHAT = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(MESSAGE, min_size=1, max_size=4), st.lists(MESSAGE, min_size=1, max_size=4), JSON),
     "max_completion_tokens": st.one_of(SMALL, SMALL, NOT_NULL)},
    optional={**SAMPLING, "logprobs": field(st.booleans()), "top_logprobs": field(st.integers(0, 5)),
              "tools": JSON, "tool_choice": JSON, "response_format": JSON})

FUZZ = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def assert_not_a_server_error(http, path: str, body: dict) -> None:
    data = json.dumps(body)  # Python's json allows huge ints; surrogates become \\ud800 escapes
    r = http.post(path, content=data, headers={"content-type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text[:500], data[:500])
    if r.status_code != 200:
        error = r.json()["error"]  # OpenAI-shaped
        assert error["code"] == r.status_code and error["message"], r.text
    elif body.get("stream") is True:
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", r.text[-300:]
        for event in events[:-1]:
            assert json.loads(event).get("error", {}).get("code", 200) < 500, event


@FUZZ
@given(body=COMPLETION)
def test_fuzzed_completion_bodies_never_get_a_5xx(cluster, http, body):
    assert_not_a_server_error(http, "/v1/completions", body)


@FUZZ
@given(body=CHAT)
def test_fuzzed_chat_bodies_never_get_a_5xx(cluster, http, body):
    assert_not_a_server_error(http, "/v1/chat/completions", body)


def test_after_the_fuzzing_every_node_is_unharmed(cluster, http):
    assert_nodes_unharmed(cluster, http)
    assert completion(http).status_code == 200


# --- the field cases ----------------------------------------------------------------------

@pytest.mark.parametrize("body, message", [
    ({"top_k": 2**70}, "top_k="),
    ({"stop_token_ids": [1, 2**70]}, "stop_token_ids="),
    ({"seed": 3, "max_tokens": 2**64}, "max_tokens="),
    ({"repetition_penalty": 1e-300}, "repetition_penalty="),
    ({"temperature": 1e300}, "temperature="),
])
def test_out_of_range_fields_get_a_400_on_a_connection_that_stays_usable(cluster, http, body, message):
    r = completion(http, **body)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert completion(http).status_code == 200  # the same keep-alive client goes on
    assert "pdcluster_requests_in_flight 0.0" in http.get("/metrics").text


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "half a surrogate: \ud800", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udfff"}], "max_tokens": 2}),
])
def test_text_that_is_not_unicode_gets_a_400(cluster, http, path, body):
    r = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400 and ("surrogate" in r.text or "hex escape" in r.text), r.text


def test_huge_seeds_sample_as_their_value_modulo_2_to_the_64(cluster, http):
    body = {"temperature": 0.9, "max_tokens": 8}
    huge = completion(http, seed=2**70 + 12345, **body)
    assert huge.status_code == 200, huge.text
    assert huge.json()["choices"][0]["text"] == completion(http, seed=12345, **body).json()["choices"][0]["text"]


def test_a_vanishing_top_p_keeps_the_top_token_and_spares_its_batch_mates(cluster, http):
    """top_p=1e-300 is 0 in float32; it once raised inside the engine step and failed
    every request on the node. Now it means "the top token only" (greedy)."""
    greedy = completion(http, max_tokens=40).json()["choices"][0]["text"]
    results = {}

    def stream():
        with httpx.Client(base_url=cluster.url, headers=AUTH, timeout=60, trust_env=False) as own:
            r = own.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 40, "temperature": 0.0,
                                                  "ignore_eos": True, "stream": True})
            results["stream"] = "".join(json.loads(line[6:])["choices"][0]["text"] for line in r.text.splitlines()
                                        if line.startswith("data: {") and json.loads(line[6:])["choices"])

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.2)
    tiny = completion(http, max_tokens=40, temperature=1.0, top_p=1e-300, seed=7)
    t.join(60)
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy
    assert results["stream"] == greedy


# --- the nodes' sockets -------------------------------------------------------------------

def kv_ports(cluster: LocalCluster) -> list[int]:
    ports = []
    for child in cluster.nodes:  # consumers have no KV service
        if child.role == "decode":
            continue
        spec = json.loads(child.argv[child.argv.index("--spec") + 1])
        if (spec.get("kv_transfer") or {}).get("kv_port"):
            ports.append(spec["kv_transfer"]["kv_port"])
    return ports


def node_ports(cluster: LocalCluster) -> list[int]:
    return [int(c.address.rsplit(":", 1)[1]) for c in cluster.nodes]


def send_random_bytes(port: int, n: int = 4096) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        try:
            s.sendall(os.urandom(n))
            s.settimeout(0.5)
            s.recv(1024)
        except OSError:
            pass  # the peer hung up on us: as it should


def dealer(port: int, key: ClusterKey | None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    if key is not None:
        key.connect(sock)
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


def test_junk_on_every_node_port_while_a_stream_runs_changes_nothing(cluster, http):
    want = completion(http, max_tokens=200).json()["choices"][0]["text"]
    before = nodes(http)
    result = {}

    def stream():
        with httpx.Client(base_url=cluster.url, headers=AUTH, timeout=120, trust_env=False) as own:
            r = own.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 200, "temperature": 0.0,
                                                  "ignore_eos": True, "stream": True})
            result["events"] = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
            result["text"] = "".join(e["choices"][0]["text"] for e in result["events"] if e.get("choices"))

    t = threading.Thread(target=stream)
    t.start()
    ports = node_ports(cluster) + kv_ports(cluster)
    assert len(ports) == 3  # two nodes' request sockets, the prefill node's KV service
    insider = cluster.cluster_key
    for port in ports:
        send_random_bytes(port)
        send_random_bytes(port, 64)
        for key in (None, ClusterKey.generate(), insider):  # a stranger, a wrong key, a buggy insider
            sock = dealer(port, key)
            sock.send_multipart([b"one", b"two", b"three"])
            sock.send(os.urandom(256))
            sock.send(b"")
            sock.close(linger=2000 if key is insider else 0)  # the insider's junk is delivered before closing
    t.join(120)
    assert not [e for e in result["events"] if "error" in e], result["events"][-3:]
    assert result["text"] == want
    time.sleep(0.6)  # a fresh stats read
    after = nodes(http)
    # The insider's junk reached the request sockets (and was dropped and counted); nothing else did.
    for node_id in before:
        assert after[node_id]["messages_dropped"] - before[node_id]["messages_dropped"] == 3, after[node_id]
    assert_nodes_unharmed(cluster, http)


def test_a_stranger_without_the_cluster_key_is_refused_without_side_effects(cluster, http):
    prefill = next(c for c in cluster.nodes if c.role == "prefill")
    port = int(prefill.address.rsplit(":", 1)[1])
    lent_before = nodes(http)["prefill-0"]["kv_transfer"]["requests_lent"]
    submit = proto.encode(proto.SubmitRequest("stranger-1", [1, 2, 3, 4], {"max_tokens": 1},
                                              kv_transfer_params={"do_remote_decode": True}))
    for key in (None, ClusterKey.generate()):
        sock = dealer(port, key)
        sock.send(submit)
        sock.send(proto.encode(proto.StatsRequest()))
        assert not sock.poll(1500), "a node answered a stranger"
        sock.close()
    time.sleep(0.6)  # a fresh stats read
    assert nodes(http)["prefill-0"]["kv_transfer"]["requests_lent"] == lent_before
    # The same message with the key runs: the refusal above was the key, not the message.
    sock = dealer(port, cluster.cluster_key)
    sock.send(submit)
    assert sock.poll(10_000)
    update = proto.decode_from_node(sock.recv())
    assert update.request_id == "stranger-1" and update.finished and update.error is None, update
    sock.send(proto.encode(proto.ReleaseKV("stranger-1")))
    sock.close()


def test_no_secret_appears_in_any_childs_command_line(cluster):
    secret = cluster.cluster_key.secret.decode()
    for child in cluster.children:
        with open(f"/proc/{child.pid}/cmdline", "rb") as f:
            argv = f.read().decode()
        assert KEY not in argv and secret not in argv, child.name


# --- the front door -----------------------------------------------------------------------

def test_bearer_is_case_insensitive_and_a_wrong_key_is_a_json_401(cluster):
    body = {"prompt": "hi", "max_tokens": 2}
    with httpx.Client(base_url=cluster.url, timeout=60, trust_env=False) as anon:
        for scheme in ("Bearer", "bearer", "BEARER"):
            r = anon.post("/v1/completions", json=body, headers={"Authorization": f"{scheme} {KEY}"})
            assert r.status_code == 200, (scheme, r.text)
        for header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
            r = anon.post("/v1/completions", json=body, headers=header)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", header


def test_cluster_and_metrics_are_behind_the_key_when_asked_and_health_is_not(cluster):
    with httpx.Client(base_url=cluster.url, timeout=30, trust_env=False) as anon:
        assert anon.get("/cluster").status_code == 401
        assert anon.get("/metrics").status_code == 401
        assert anon.get("/health").status_code == 200
        assert anon.get("/cluster", headers=AUTH).status_code == 200
        assert anon.get("/metrics", headers=AUTH).status_code == 200


def test_the_membership_routes_take_the_key_as_every_other_route_does(cluster):
    with httpx.Client(base_url=cluster.url, timeout=30, trust_env=False) as anon:
        assert anon.get("/cluster/membership", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
        for header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            assert anon.get("/cluster/membership", headers=header).status_code == 401, header


def requests_ended(http, status: int) -> float:
    text = http.get("/metrics").text
    line = f'pdcluster_requests_total{{endpoint="completions",status="{status}"}} '
    return next((float(x[len(line):]) for x in text.splitlines() if x.startswith(line)), 0.0)


def test_a_client_that_hangs_up_on_a_non_streaming_request_stops_it(cluster, http):
    """Behind the API key too: the decode job stops, the slot comes back, counted as 499."""
    before = requests_ended(http, 499)
    body = json.dumps({"prompt": "Keep talking for a long while", "max_tokens": 3000, "temperature": 0.0,
                       "ignore_eos": True}).encode()
    host, port = cluster.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: pdcluster\r\nContent-Type: application/json\r\n"
                    + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while not any(n["role"] == "decode" and n["running"] for n in nodes(http).values()):
            assert time.monotonic() < deadline, "the request never reached the decode node"
            time.sleep(0.05)
    deadline = time.monotonic() + 10
    while requests_ended(http, 499) == before:
        assert time.monotonic() < deadline, "the router never noticed the client was gone"
        time.sleep(0.1)
    assert_nodes_unharmed(cluster, http)


def test_a_client_that_hangs_up_mid_stream_is_counted_499_not_as_a_server_error(cluster, http):
    before = (requests_ended(http, 499), requests_ended(http, 500))
    body = {"prompt": "Keep talking for a long while", "max_tokens": 3000, "temperature": 0.0, "ignore_eos": True,
            "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        chunks = 0
        for line in r.iter_lines():
            chunks += line.startswith("data: {")
            if chunks == 3:
                break  # and hang up
    deadline = time.monotonic() + 10
    while requests_ended(http, 499) == before[0]:
        assert time.monotonic() < deadline, "the hang-up was never counted as 499"
        time.sleep(0.1)
    assert requests_ended(http, 500) == before[1]
    assert_nodes_unharmed(cluster, http)


def test_requests_that_end_on_their_own_stop_nothing_on_their_nodes(cluster, http):
    sent = {i: (n["aborts_sent"], n["kv_releases_sent"]) for i, n in nodes(http).items()}
    assert completion(http).status_code == 200
    with http.stream("POST", "/v1/completions", json={"prompt": "Tell me", "max_tokens": 8, "stream": True}) as r:
        assert r.status_code == 200 and list(r.iter_lines())[-2:] == ["data: [DONE]", ""]
    assert {i: (n["aborts_sent"], n["kv_releases_sent"]) for i, n in nodes(http).items()} == sent


def test_a_body_over_the_limit_gets_413(cluster, http):
    r = http.post("/v1/completions", content=b'{"prompt": "' + b"x" * (BODY_LIMIT + 10) + b'"}',
                  headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_request_body_bytes" in r.json()["error"]["message"]
    assert completion(http).status_code == 200


def test_429_at_the_concurrency_limit_says_when_to_retry(cluster, http):
    stop = threading.Event()
    opened = threading.Semaphore(0)

    def hold():
        with httpx.Client(base_url=cluster.url, headers=AUTH, timeout=60, trust_env=False) as own:
            with own.stream("POST", "/v1/completions", json={"prompt": "Hold on", "max_tokens": 2000, "stream": True,
                                                              "temperature": 0.0, "ignore_eos": True}) as r:
                lines = r.iter_lines()
                next(lines)
                opened.release()
                stop.wait(60)

    threads = [threading.Thread(target=hold) for _ in range(MAX_IN_FLIGHT)]
    for t in threads:
        t.start()
    try:
        for _ in threads:
            assert opened.acquire(timeout=60)
        r = completion(http)
        assert r.status_code == 429 and r.headers["retry-after"] == "1", (r.status_code, r.headers)
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert_nodes_unharmed(cluster, http)  # the abandoned streams gave their slots back


def random_text(n_chars: int, seed: int) -> str:
    r = random.Random(seed)
    words, size = [], 0
    while size < n_chars:
        w = "".join(r.choice(string.ascii_lowercase) for _ in range(r.randint(2, 9)))
        words.append(w)
        size += len(w) + 1
    return " ".join(words)


def test_a_2mb_prompt_does_not_stall_a_concurrent_stream(cluster, http):
    big = json.dumps({"prompt": random_text(2 << 20, seed=1), "max_tokens": 4}).encode()
    arrivals: list[float] = []
    started = threading.Event()

    def stream():
        with httpx.Client(base_url=cluster.url, headers=AUTH, timeout=120, trust_env=False) as own:
            with own.stream("POST", "/v1/completions", json={"prompt": "Tell me", "max_tokens": 300, "stream": True,
                                                              "temperature": 0.0, "ignore_eos": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        arrivals.append(time.monotonic())
                        if len(arrivals) == 40:
                            started.set()

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(60)
    t0 = time.monotonic()
    r = http.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    t1 = time.monotonic()
    t.join(120)
    assert r.status_code == 400 and "tokens" in r.json()["error"]["message"], r.text[:300]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    typical = sorted(gaps)[len(gaps) // 2]
    during = [b - a for a, b in zip(arrivals, arrivals[1:]) if b >= t0 and a <= t1]
    assert during, "no token arrived while the big prompt was handled"
    assert max(during) < typical + 0.1, (f"the stream stalled {max(during) * 1e3:.0f} ms while a 2 MB prompt was "
                                         f"handled ({(t1 - t0) * 1e3:.0f} ms); typical gap {typical * 1e3:.1f} ms")
