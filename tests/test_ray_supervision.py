"""`backend: ray` when things go wrong: a GPU machine's node that asked Ray for no GPU, a
node that dies (while `up` waits, and for good while serving), a scale-down while actors
start, starts Ray cannot place, Ctrl-C in a placement-group wait, a Ray address where
nothing answers, scale-ups after a scale-down in a placement group, and the yaml settings
backend ray cannot honour.

One private Ray for the module: a head on 127.0.0.1 with 2 CPUs and 2 *declared* GPUs (this
machine needs none: no test touches CUDA), shared by the in-process checks and by one
`pdcluster up` (a subprocess, `address: auto`). Ray starts slowly on 2 cores; the actors
that must never start ask for a resource no Ray node has, so they cost no process."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import httpx
import pytest

# Keep Ray on the loopback interface (read when Ray is imported, here and in the launcher).
_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
ray = pytest.importorskip("ray")
from ray._private import ray_constants  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from rich.console import Console  # noqa: E402

from cluster.config import ClusterConfig, ClusterConfigError, load_cluster_config  # noqa: E402
from cluster.launcher import MAX_STARTS_PER_TICK, RESTART_BACKOFF_S, run_up  # noqa: E402
from cluster.ray_actor import device_for  # noqa: E402
from cluster.ray_launcher import RayCluster  # noqa: E402
from tests.scaling import wait_until  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "pdcluster-supervision-test"
pytestmark = pytest.mark.timeout(600)


# --- no Ray needed ----------------------------------------------------------------------
@pytest.mark.parametrize("body, problem", [
    ("nodes_base_port: 31000\n",
     "nodes_base_port: 31000: with backend ray every node picks free ports on the machine Ray places it on"),
    ("prefill: {replicas: 0}\ndecode: {replicas: 0}\ncolocated: {replicas: 1, devices: ['cuda:3']}\n",
     "colocated.devices: cuda:3: with backend ray, Ray gives each node its GPUs: ask for them with "
     "colocated.resources: {GPU: 1}"),
    ("decode: {devices: [cpu], resources: {GPU: 1}}\n",
     "decode.devices: cpu, but decode.resources asks Ray for GPU 1.0, which would sit idle"),
    ("ray: {namespace: ''}\n", "ray.namespace: empty: give a name"),
    ("prefill: {resources: {GPU: 1.5}}\n",
     "prefill.resources: GPU: 1.5: Ray takes amounts above 1 in whole units only: give 1 or 2"),
    ("decode: {resources: {decode_box: 0.00001}}\n",
     "decode.resources: decode_box: 1e-05 is below the smallest amount Ray counts (0.0001)"),
])
def test_backend_ray_refuses_what_it_cannot_honour_before_anything_starts(tmp_path, capsys, body, problem):
    path = tmp_path / "cluster.yaml"
    path.write_text("model: {path: 'builtin:tiny'}\nbackend: ray\n" + body)
    with pytest.raises(ClusterConfigError) as e:
        load_cluster_config(path)
    assert f"{path}: {problem}" in str(e.value)
    assert run_up(str(path)) == 2 and problem in capsys.readouterr().err


def test_a_node_runs_on_a_gpu_only_when_ray_reserved_it():
    assert device_for("auto", [], None) == "cpu"        # Ray 2.60 sets no CUDA_VISIBLE_DEVICES then
    assert device_for("auto", [], "0,1") == "cpu"
    assert device_for("cpu", ["0"], "0") == "cpu"
    assert device_for("auto", ["1"], "1") == "cuda:0"   # Ray narrowed CUDA_VISIBLE_DEVICES to its GPU
    assert device_for("auto", ["1"], None) == "cuda:1"  # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES
    assert device_for("auto", ["3"], "2,3") == "cuda:1"
    with pytest.raises(RuntimeError, match="Ray reserved no GPU for this node"):
        device_for("cuda:0", [], None)


def test_a_ray_address_where_nothing_answers_fails_at_once_and_says_so(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "cluster.yaml"
    path.write_text("model: {path: 'builtin:tiny'}\nprefill: {replicas: 0}\ndecode: {replicas: 0}\n"
                    f"colocated: {{replicas: 1}}\nbackend: ray\nray: {{address: '127.0.0.1:{port}'}}\n")
    env = {**os.environ, **_LOOPBACK_ENV, "PDCLUSTER_RUN_DIR": str(tmp_path / "run")}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "up", str(path)], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert f"ray.address 127.0.0.1:{port}: nothing answers at 127.0.0.1:{port}" in r.stderr
    assert time.monotonic() - t0 < 60  # imports included; ray.init alone retried for minutes


# --- one private Ray ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_head():
    with mock.patch.dict(os.environ, _LOOPBACK_ENV), mock.patch.object(ray_constants, "ENABLE_RAY_CLUSTER", False):
        cluster = Cluster(initialize_head=True, connect=False, head_node_args={
            "num_cpus": 2, "num_gpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False})
        try:
            ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


def test_on_a_gpu_machine_a_node_given_no_gpu_by_ray_sees_none_and_runs_on_cpu(ray_head):
    @ray.remote
    class Probe:
        def device(self, requested):
            from cluster.ray_actor import pick_device
            device, gpu_ids = pick_device(requested)
            return device, gpu_ids, os.environ.get("CUDA_VISIBLE_DEVICES")

    no_gpu = Probe.options(num_cpus=0, num_gpus=0).remote()
    one_gpu = Probe.options(num_cpus=0, num_gpus=1).remote()
    try:
        assert ray.get(no_gpu.device.remote("auto"), timeout=120) == ("cpu", [], "")
        device, gpu_ids, visible = ray.get(one_gpu.device.remote("auto"), timeout=120)
        assert device == "cuda:0" and len(gpu_ids) == 1 and visible == gpu_ids[0]
        with pytest.raises(ray.exceptions.RayTaskError, match="Ray reserved no GPU"):
            ray.get(no_gpu.device.remote("cuda:1"), timeout=60)
    finally:
        ray.kill(no_gpu)
        ray.kill(one_gpu)


def _bare_cluster(tmp_path: Path, out: io.StringIO, name: str, **sections) -> RayCluster:
    """A RayCluster on the module's Ray, not started: the tests drive its steps."""
    data = {"model": {"path": "builtin:tiny"}, "prefill": {"replicas": 0}, "decode": {"replicas": 0},
            "colocated": {"replicas": 1}, "backend": "ray", "ray": {"namespace": NAMESPACE}} | sections
    cluster = RayCluster(ClusterConfig.model_validate(data), run_dir=tmp_path / "run",
                         console=Console(file=out, width=400, soft_wrap=True, highlight=False))
    cluster._prefix = f"pdcluster-{name}"
    cluster.url = "http://router.invalid"
    return cluster


def _router_view(prefill: int, decode: int) -> dict:
    """What GET /cluster/membership says: both-0 serves, prefill/decode targets as given."""
    return {"target": {"prefill": prefill, "decode": decode, "colocated": 1},
            "nodes": [{"id": "both-0", "role": "both", "state": "serving", "healthy": True, "pid": 1}]}


def test_scale_down_cancels_starting_actors_newest_first_and_unplaceable_starts_time_out_and_back_off(
        ray_head, tmp_path):
    import engine.node_server  # noqa: F401 - torch, imported once before the timed part

    out = io.StringIO()
    nowhere = {"replicas": 0, "resources": {"nowhere": 1}}  # no Ray node has it: never placed
    cluster = _bare_cluster(tmp_path, out, "cancel", prefill=nowhere, decode=nowhere)
    cluster._start_timeout_s = 4.0
    router = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(200, json={})))
    starting = lambda: sorted(n.name for n in cluster._starting)  # noqa: E731
    try:
        cluster._apply(_router_view(3, 3), router)
        assert len(cluster._starting) == MAX_STARTS_PER_TICK  # the rest at the next check
        cluster._apply(_router_view(3, 3), router)
        assert starting() == ["decode-0", "decode-1", "decode-2", "prefill-0", "prefill-1", "prefill-2"]
        cancelled = {f"pdcluster-cancel-{n}" for n in ("prefill-1", "prefill-2", "decode-1", "decode-2")}

        cluster._apply(_router_view(1, 1), router)  # `pdcluster scale prefill=1 decode=1` while they start
        assert starting() == ["decode-0", "prefill-0"]
        assert "node prefill-2: no longer needed (the target is prefill=1): cancelling its start" in out.getvalue()
        wait_until(lambda: not cancelled & set(ray.util.list_named_actors()), 30, "the cancelled actors to go")

        time.sleep(max(0.0, max(n.start_deadline for n in cluster._starting) - time.monotonic()) + 0.1)
        cluster._apply(_router_view(1, 1), router)
        assert not cluster._starting and sorted(n.name for n in cluster._waiting) == ["decode-0", "prefill-0"]
        assert ("node prefill-0 could not start: not started 4 s after its actor was created: Ray could not place "
                "it: no Ray node has the resources its role asks for free ({'nowhere': 1.0}); trying again in "
                f"{RESTART_BACKOFF_S:.0f} s") in out.getvalue()

        names = set(cluster._names_used)
        cluster._apply(_router_view(1, 1), router)  # backing off: no actor, no new name
        assert not cluster._starting and cluster._names_used == names
        time.sleep(RESTART_BACKOFF_S)
        cluster._apply(_router_view(1, 1), router)
        assert starting() == ["decode-0", "prefill-0"] and cluster._names_used == names  # the same ids again
    finally:
        cluster._kill_now([*cluster._starting])
        router.close()


def test_ctrl_c_in_a_placement_group_wait_ray_cannot_satisfy_is_heard_within_a_second(ray_head, tmp_path):
    cluster = _bare_cluster(tmp_path, io.StringIO(), "pg", colocated={"replicas": 2},
                            ray={"namespace": NAMESPACE, "placement_strategy": "STRICT_SPREAD"})  # one Ray node
    specs = [cluster._node_spec("both", i) for i in range(2)]
    waiter = threading.Thread(target=cluster._place_group, args=(specs, 300.0), daemon=True)
    waiter.start()
    time.sleep(2.0)
    assert waiter.is_alive()
    stopped_at = time.monotonic()
    cluster.request_stop()
    waiter.join(10)
    assert not waiter.is_alive() and time.monotonic() - stopped_at < 2.5 and cluster._pg is None
    groups = [g for g in ray.util.placement_group_table().values() if g["name"] == "pdcluster-pg"]
    assert groups and all(g["state"] == "REMOVED" for g in groups)  # its reservation request is gone


# --- one `pdcluster up` on it ----------------------------------------------------------------
class Launcher:
    """`pdcluster up` as a subprocess, its output collected by a thread."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []

    def read_until(self, pattern: str, timeout_s: float, on_line=None) -> re.Match:
        """Read (in this thread) until a line matches; before pump() only."""
        deadline = time.monotonic() + timeout_s
        for line in self.proc.stdout:
            self.lines.append(line)
            if on_line:
                on_line(line)
            if m := re.search(pattern, line):
                return m
            assert time.monotonic() < deadline, f"no line matching {pattern!r}:\n{self.output}"
        raise AssertionError(f"the launcher exited ({self.proc.wait()}) before {pattern!r}:\n{self.output}")

    def pump(self) -> None:
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def wait_for(self, text: str, timeout_s: float) -> None:
        try:
            wait_until(lambda: text in self.output, timeout_s, f"the launcher to say {text!r}")
        except AssertionError as e:
            raise AssertionError(f"{e}; it said:\n{self.output}") from None

    @property
    def output(self) -> str:
        return "".join(self.lines)


@pytest.fixture(scope="module")
def up(ray_head, tmp_path_factory):
    """Two colocated nodes of {CPU: 1} packed in one placement group (all the Ray node's
    CPUs), max_restarts 1. both-0's actor is killed as soon as it reports, while `up` waits."""
    tmp = tmp_path_factory.mktemp("ray-supervision")
    yaml = tmp / "cluster.yaml"
    yaml.write_text(
        "model: {path: 'builtin:tiny', dtype: float32}\n"
        "router: {host: 127.0.0.1, port: 0}\n"
        "engine: {num_blocks: 64}\n"
        "prefill: {replicas: 0}\ndecode: {replicas: 0}\n"
        "colocated: {replicas: 2, resources: {CPU: 1}}\n"
        "backend: ray\n"
        f"ray: {{address: auto, namespace: {NAMESPACE}, max_restarts: 1, placement_strategy: STRICT_PACK}}\n")
    env = {**os.environ, **_LOOPBACK_ENV, "RAY_ADDRESS": ray_head.address, "PDCLUSTER_RUN_DIR": str(tmp / "run"),
           "PDCLUSTER_STATE_DIR": str(tmp / "state"), "PDCLUSTER_START_TIMEOUT_S": "300"}
    env.pop("PDCLUSTER_API_KEY", None)
    launcher = Launcher([sys.executable, "-m", "cluster.cli", "up", str(yaml)], env)
    killed = []

    def kill_both_0(line: str) -> None:
        if not killed and (m := re.match(r"both-0 +on Ray node .*, pid (\d+), cpu$", line.strip())):
            os.kill(int(m.group(1)), signal.SIGKILL)
            killed.append(int(m.group(1)))

    try:
        url = launcher.read_until(r"^pdcluster is ready: (\S+)", 400, kill_both_0).group(1)
        launcher.pump()
        yield {"url": url, "launcher": launcher, "killed_pid": killed[0] if killed else 0}
    finally:
        if launcher.proc.poll() is None:
            launcher.proc.send_signal(signal.SIGINT)
            try:
                launcher.proc.wait(120)
            except subprocess.TimeoutExpired:
                launcher.proc.kill()
                launcher.proc.wait()


def nodes_of(url: str) -> dict[str, dict]:
    return {n["id"]: n for n in httpx.get(url + "/cluster", timeout=10, trust_env=False).json()["nodes"]}


def test_a_node_killed_while_up_waits_is_followed_and_up_succeeds_on_cpu(up):
    assert up["killed_pid"], up["launcher"].output
    assert "node both-0 was restarted by Ray" in up["launcher"].output
    nodes = nodes_of(up["url"])
    assert set(nodes) == {"both-0", "both-1"} and all(n["healthy"] for n in nodes.values())
    assert nodes["both-0"]["pid"] != up["killed_pid"]
    # The Ray node declares 2 GPUs; these actors asked for none: they run on the CPU.
    assert all(n["placement"]["device"] == "cpu" and n["placement"]["gpu_ids"] == [] for n in nodes.values())


def test_a_node_whose_restarts_are_used_up_is_replaced_under_its_id_while_the_other_serves(up):
    url, launcher = up["url"], up["launcher"]
    dead = nodes_of(url)["both-0"]
    os.kill(dead["pid"], signal.SIGKILL)  # its one Ray restart went on the kill during `up`
    launcher.wait_for("node both-0's actor is dead and Ray will not restart it", 60)
    assert set(nodes_of(url)) == {"both-1"}  # it left the router
    r = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0},
                   timeout=60, trust_env=False)
    assert r.status_code == 200, r.text
    back = wait_until(lambda: (n := nodes_of(url).get("both-0")) and n["healthy"] and n["pid"] != dead["pid"] and n,
                      180, "both-0 to be replaced and rejoin")
    assert back["placement"]["bundle"] == dead["placement"]["bundle"]
    assert launcher.proc.poll() is None, launcher.output


def test_a_scale_up_after_a_scale_down_takes_the_departed_nodes_placement_group_bundle(up):
    """The group holds both CPUs of the Ray node: outside it, the new actor could never be placed."""
    url, launcher = up["url"], up["launcher"]
    scale = lambda n: httpx.post(url + "/cluster/scale", json={"colocated": n}, timeout=10,  # noqa: E731
                                 trust_env=False).raise_for_status()
    before = nodes_of(url)
    scale(1)
    left = wait_until(lambda: (m := httpx.get(url + "/cluster/membership", timeout=10, trust_env=False).json())
                      and len(m["nodes"]) == 1 and m["departed"] and m["departed"][-1]["id"], 120,
                      "a node to drain and leave")
    launcher.wait_for(f"node {left} left the cluster (drained): stopping its actor", 60)
    scale(2)
    new = wait_until(lambda: [n for i, n in nodes_of(url).items() if i not in before and n["healthy"]], 180,
                     f"a new node to join\n{launcher.output}")[0]
    assert new["id"] == "both-2" and new["placement"]["bundle"] == before[left]["placement"]["bundle"]
    assert f"node both-2: creating its actor in placement-group bundle {new['placement']['bundle']}" in \
        launcher.output


def test_ctrl_c_stops_the_launcher_and_leaves_no_actor_of_its_own(up):
    launcher = up["launcher"]
    launcher.proc.send_signal(signal.SIGINT)
    assert launcher.proc.wait(120) == 0, launcher.output
    prefix = "pdcluster-" + up["url"].rsplit(":", 1)[1] + "-"
    wait_until(lambda: not [a for a in ray.util.list_named_actors(all_namespaces=True)
                            if a["name"].startswith(prefix)], 30, "no actor of the launcher's left")
