"""`backend: ray` on a real two-node Ray cluster on this machine (127.0.0.1 only): the
prefill actor on the Ray node that has `prefill_box`, the decode actors on the one that
has `decode_box`. `pdcluster up --detach` against it (`address: auto`), the official
`openai` client, `pdcluster scale`, a decode actor's process killed mid-stream, and
`pdcluster down` leaving no actor of ours behind.

One Ray cluster and one pdcluster for the whole module: Ray starts slowly on 2 cores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import httpx
import openai
import pytest

# Keep Ray on the loopback interface: without this it resolves 127.0.0.1 to the machine's
# network address. Read when Ray is imported (here and in the launcher it starts).
_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
ray = pytest.importorskip("ray")
from ray._private import ray_constants  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from cluster.scale import run_scale  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.builtin_models import resolve_builtin  # noqa: E402
from tests.scaling import check_scale_one_two_one, membership, wait_until  # noqa: E402
from tests.test_cluster_e2e import GREEDY, PROMPTS, assert_completions_equal_the_offline_engine  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def ray_cluster():
    with mock.patch.dict(os.environ, _LOOPBACK_ENV), mock.patch.object(ray_constants, "ENABLE_RAY_CLUSTER", False):
        cluster = Cluster(initialize_head=True, connect=False, head_node_args={
            "num_cpus": 1, "resources": {"prefill_box": 2}, "node_ip_address": "127.0.0.1",
            "include_dashboard": False})
        try:
            cluster.add_node(num_cpus=1, resources={"decode_box": 3}, node_ip_address="127.0.0.1")
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, namespace="pdcluster", log_to_driver=False)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


@pytest.fixture(scope="module")
def up(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray-up")
    yaml = tmp / "cluster-ray.yaml"
    yaml.write_text(
        "model: {path: 'builtin:tiny', dtype: float32}\n"
        "router: {host: 127.0.0.1, port: 0}\n"
        "kv_transfer: {connector: nixl, abort_timeout_s: 30, transfer_timeout_s: 10}\n"
        "engine: {num_blocks: 128, block_size: 16, max_num_seqs: 16}\n"
        "prefill: {replicas: 1, resources: {prefill_box: 1}}\n"
        "decode: {replicas: 1, resources: {decode_box: 1}}\n"
        "backend: ray\n"
        "ray: {address: auto, namespace: pdcluster, placement_strategy: STRICT_SPREAD}\n")
    env = {**os.environ, **_LOOPBACK_ENV, "RAY_ADDRESS": ray_cluster.address, "PDCLUSTER_STATE_DIR": str(tmp / "state"),
           "PDCLUSTER_RUN_DIR": str(tmp / "run")}
    env.pop("PDCLUSTER_API_KEY", None)
    cli = [sys.executable, "-m", "cluster.cli"]
    r = subprocess.run([*cli, "up", str(yaml), "--detach"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                       timeout=400)
    logs = "\n".join(p.read_text() for p in (tmp / "state").glob("*.log"))
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{logs}"
    url = next(line.split()[-1] for line in r.stdout.splitlines() if line.startswith("pdcluster is ready:"))
    launcher_pid = int(r.stdout.split("launcher pid ")[1].split(",")[0])
    yield {"url": url, "env": env, "cli": cli, "launcher_pid": launcher_pid, "tmp": tmp}
    subprocess.run([*cli, "down", "--url", url], cwd=REPO_ROOT, env=env, capture_output=True, timeout=120)
    if _alive(launcher_pid):
        os.kill(launcher_pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def offline():
    return LLM(str(resolve_builtin("tiny")), dtype="float32", device="cpu", num_blocks=256)


@pytest.fixture(scope="module")
def client(up):
    return openai.OpenAI(base_url=up["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def nodes_of(url: str) -> dict[str, dict]:
    return {n["id"]: n for n in httpx.get(url + "/cluster", timeout=5, trust_env=False).json()["nodes"]}


def our_actors() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("pdcluster-")]


def test_actors_land_on_the_ray_nodes_their_resources_name_and_status_shows_it(up):
    by_resource = {r: n["NodeID"] for n in ray.nodes() if n["Alive"] for r in ("prefill_box", "decode_box")
                   if r in n["Resources"]}
    nodes = nodes_of(up["url"])
    assert set(nodes) == {"prefill-0", "decode-0"} and all(n["healthy"] for n in nodes.values())
    assert nodes["prefill-0"]["placement"]["ray_node_id"] == by_resource["prefill_box"]
    assert nodes["decode-0"]["placement"]["ray_node_id"] == by_resource["decode_box"]
    assert by_resource["prefill_box"] != by_resource["decode_box"]
    groups = {n["placement"]["placement_group"] for n in nodes.values()}  # STRICT_SPREAD: one group
    assert len(groups) == 1 and [n["placement"]["bundle"] for n in nodes.values()] == [0, 1]
    assert all(n["address"].startswith("tcp://127.0.0.1:") for n in nodes.values())  # the Ray node's address
    r = subprocess.run([*up["cli"], "status", "--url", up["url"]], cwd=REPO_ROOT, env=up["env"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert by_resource["decode_box"][:12] in r.stdout and "decode_box=1" in r.stdout and "prefill_box=1" in r.stdout


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_outputs_equal_the_offline_engine_and_the_local_backend(client, offline, kind):
    assert_completions_equal_the_offline_engine(client, offline, kind)


def test_nodes_on_ray_refuse_a_stranger_without_the_cluster_key(up):
    """The cluster key reaches the actors (their runtime environment): a node's socket
    admits the router, and a client without the key gets nothing back."""
    import zmq

    from engine import node_protocol as proto

    nodes = httpx.get(up["url"] + "/cluster", timeout=10).json()["nodes"]
    ctx = zmq.Context()
    try:
        for n in nodes:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(n["address"])
            sock.send(proto.encode(proto.StatsRequest()))
            assert not sock.poll(1500), f"node {n['id']} answered a stranger"
            sock.close()
    finally:
        ctx.term()
    assert all(n["healthy"] for n in httpx.get(up["url"] + "/cluster", timeout=10).json()["nodes"])


def test_scale_decode_one_two_one_under_load_loses_nothing(up):
    gone = check_scale_one_two_one(up["url"], None)
    wait_until(lambda: f"{_prefix(up)}-{gone['id']}" not in our_actors(), 30, f"{gone['id']}'s actor to be removed")


def test_a_killed_decode_actor_hands_its_stream_over_and_ray_brings_it_back(up, offline):
    with mock.patch.dict(os.environ, {k: v for k, v in up["env"].items() if k.startswith("PDCLUSTER")}):
        assert run_scale(up["url"], ["decode=2"], timeout_s=180) == 0
    n_tokens = 500
    want = offline.generate(PROMPTS[1:2], SamplingParams(temperature=0.0, max_tokens=n_tokens, ignore_eos=True))
    body = {"prompt": PROMPTS[1], "max_tokens": n_tokens, "stream": True, "temperature": 0.0, "ignore_eos": True}
    text, killed = "", None
    with httpx.Client(timeout=120, trust_env=False) as http, \
            http.stream("POST", up["url"] + "/v1/completions", json=body) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = httpx.Response(200, content=line[6:]).json()
            assert "error" not in chunk, chunk
            text += chunk["choices"][0]["text"] if chunk["choices"] else ""
            if killed is None and len(text) > 20:
                busy = [n for n in nodes_of(up["url"]).values() if n["role"] == "decode" and n["running"] > 0]
                if busy:
                    killed = busy[0]
                    os.kill(killed["pid"], signal.SIGKILL)  # the actor's worker process
    assert killed is not None
    assert text == want[0].outputs[0].text  # the other decode actor recomputed the KV and went on
    assert 'pdcluster_failovers_total{stage="decode"} 1.0' in httpx.get(up["url"] + "/metrics", trust_env=False).text
    back = wait_until(lambda: (n := nodes_of(up["url"]).get(killed["id"])) and n["healthy"]
                      and n["pid"] != killed["pid"] and n, 120, f"{killed['id']} to be restarted by Ray and rejoin")
    assert _alive(back["pid"])
    got = openai.OpenAI(base_url=up["url"] + "/v1", api_key="unused", max_retries=0, timeout=120).completions.create(
        model="builtin:tiny", prompt=PROMPTS[0], **GREEDY).choices[0].text
    assert got == offline.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=12,
                                                               ignore_eos=True))[0].outputs[0].text


def test_down_stops_the_cluster_and_leaves_no_actor_of_ours(up):
    assert our_actors(), "the cluster's actors should be named in the namespace"
    r = subprocess.run([*up["cli"], "down"], cwd=REPO_ROOT, env=up["env"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "stopped" in r.stdout, r.stderr
    assert not _alive(up["launcher_pid"])
    wait_until(lambda: not our_actors(), 30, f"no actor of ours left (still: {our_actors()})")
    with pytest.raises(httpx.HTTPError):
        httpx.get(up["url"] + "/health", timeout=2, trust_env=False)


def _prefix(up) -> str:
    return "pdcluster-" + up["url"].rsplit(":", 1)[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_address_local_starts_a_private_ray_and_ctrl_c_stops_it(tmp_path, offline):
    """Also: a colocated actor under a disaggregation mode gets a kv_both connector."""
    yaml = tmp_path / "cluster-ray-local.yaml"
    yaml.write_text(
        "model: {path: 'builtin:tiny', dtype: float32}\n"
        "router: {host: 127.0.0.1, port: 0, disaggregation: {mode: conditional}}\n"
        "kv_transfer: {connector: tcp}\n"
        "engine: {num_blocks: 64}\n"
        "prefill: {replicas: 0}\n"
        "decode: {replicas: 0}\n"
        "colocated: {replicas: 1}\n"
        "backend: ray\n"
        "ray: {address: local}\n")
    env = {**os.environ, **_LOOPBACK_ENV, "PDCLUSTER_STATE_DIR": str(tmp_path / "state"),
           "PDCLUSTER_RUN_DIR": str(tmp_path / "run")}
    env.pop("RAY_ADDRESS", None)
    env.pop("PDCLUSTER_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "up", str(yaml)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("pdcluster is ready:"):
                break
        assert proc.poll() is None, "".join(lines)
        url = lines[-1].split()[-1]
        text = httpx.post(url + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0,
                                                         "ignore_eos": True}, timeout=60, trust_env=False)
        want = offline.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        assert text.json()["choices"][0]["text"] == want[0].outputs[0].text
        assert text.headers["x-pdcluster-prefill"] == "local"  # no other node to lend it KV
        (node,) = httpx.get(url + "/cluster", timeout=10, trust_env=False).json()["nodes"]
        assert "requests_lent" in node["kv_transfer"], node  # the actor's engine has its kv_both connector
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == 0 and out.rstrip().endswith("stopped"), out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
