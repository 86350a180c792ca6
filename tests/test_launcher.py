"""`pdcluster up` and `pdcluster status` against real processes on 127.0.0.1.

Each test starts its own cluster (builtin:tiny on cpu, tcp connector, a small KV cache) on
free ports, and checks at the end that no process of it is left: the launcher must stop
every child on Ctrl-C / SIGTERM and when it gives up.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from cluster.config import ClusterConfig
from cluster.launcher import ClusterStartError, LocalCluster

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, awaiting its reaper, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def children_of(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def get_cluster(url: str) -> dict[str, dict] | None:
    try:
        r = httpx.get(f"{url}/cluster", timeout=2.0, trust_env=False)
        return {n["id"]: n for n in r.json()["nodes"]} if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError):
        return None


class Launcher:
    """`python -m cluster.cli up YAML` as a child, its output collected by a thread (so the
    pipe never fills), and every process it started remembered for the final check."""

    def __init__(self, tmp_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        yaml = tmp_path / "cluster.yaml"
        yaml.write_text(
            "model: {path: 'builtin:tiny', dtype: float32}\n"
            f"router: {{host: 127.0.0.1, port: {self.port}}}\n"
            "kv_transfer: {connector: tcp}\n"
            "engine: {num_blocks: 128, block_size: 16}\n"
            "prefill: {replicas: 1, devices: [cpu]}\n"
            "decode: {replicas: 1, devices: [cpu]}\n")
        env = {**os.environ, "PDCLUSTER_RUN_DIR": str(tmp_path / "run"), "PDCLUSTER_START_TIMEOUT_S": "120"}
        env.pop("PDCLUSTER_API_KEY", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "up", str(yaml)], cwd=REPO_ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.pids: set[int] = set()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self) -> dict[str, dict]:
        def ready():
            assert self.proc.poll() is None, f"launcher exited {self.proc.returncode}:\n{self.output}"
            return any(line.lstrip().startswith("curl ") for line in self.lines)
        wait_until(ready, READY_TIMEOUT_S, "the launcher's curl line")
        nodes = get_cluster(self.url)
        assert nodes and all(n["healthy"] for n in nodes.values()), nodes
        self.remember_pids(nodes)
        return nodes

    def remember_pids(self, nodes: dict[str, dict] | None = None) -> None:
        """The cluster's processes: node pids from /cluster, plus the launcher's children."""
        self.pids |= {n["pid"] for n in (nodes or get_cluster(self.url) or {}).values() if n["pid"]}
        self.pids |= set(children_of(self.proc.pid))

    def router_pid(self) -> int:
        return next(p for p in children_of(self.proc.pid) if " -m router " in cmdline(p))

    def wait_exit(self, timeout_s: float = 30.0) -> int:
        code = self.proc.wait(timeout=timeout_s)
        self._reader.join(timeout=5)
        return code

    def assert_nothing_left(self, timeout_s: float = 5.0) -> None:
        assert self.pids, "no cluster process was recorded"
        wait_until(lambda: not any(alive(p) for p in self.pids), timeout_s,
                   f"every cluster process to exit (left: {[p for p in self.pids if alive(p)]})")

    def kill_everything(self) -> None:
        """Test clean-up: whatever the test left, by pid."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def launcher(tmp_path):
    started: list[Launcher] = []

    def start() -> Launcher:
        started.append(Launcher(tmp_path))
        return started[-1]

    yield start
    for launcher in started:
        launcher.kill_everything()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_up_prints_url_and_curl_then_a_signal_stops_every_process(launcher, signum):
    up = launcher()
    nodes = up.wait_ready()
    assert set(nodes) == {"prefill-0", "decode-0"}
    assert up.url in up.output
    curl = next(line.strip() for line in up.lines if line.lstrip().startswith("curl "))
    assert curl.startswith(f"curl {up.url}/v1/completions -H 'Content-Type: application/json' -d '")
    assert '"model": "builtin:tiny"' in curl and "Authorization" not in curl
    assert f"pdcluster status --url {up.url}" in up.output
    assert len(up.pids) == 3, up.pids  # two nodes and the router

    up.proc.send_signal(signum)
    assert up.wait_exit() == 0, up.output
    up.assert_nothing_left()


@pytest.mark.timeout(150)
def test_killed_node_is_restarted_and_the_cluster_serves_again(launcher, tmp_path):
    up = launcher()
    nodes = up.wait_ready()
    old_pid = nodes["prefill-0"]["pid"]
    os.kill(old_pid, signal.SIGKILL)

    back = wait_until(lambda: (n := (get_cluster(up.url) or {}).get("prefill-0")) and n["healthy"]
                      and n["pid"] != old_pid and n, 60, "prefill-0 to be healthy again with a new pid")
    assert alive(back["pid"]) and back["pid"] in children_of(up.proc.pid)
    assert any("prefill-0" in line and "restarting" in line for line in up.lines), up.output
    up.remember_pids()

    r = httpx.post(f"{up.url}/v1/completions", timeout=60, trust_env=False,
                   json={"model": "builtin:tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0,
                         "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4

    # `pdcluster status` on the same cluster: a table with both nodes.
    status = subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--url", up.url], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=30, env={**os.environ, "COLUMNS": "200"})
    assert status.returncode == 0, status.stderr
    for text in ("prefill-0", "decode-0", str(back["pid"]), "2/2 nodes healthy", "/128"):
        assert text in status.stdout, status.stdout

    up.proc.send_signal(signal.SIGTERM)
    assert up.wait_exit() == 0, up.output
    up.assert_nothing_left()


@pytest.mark.timeout(150)
def test_killed_router_stops_the_cluster_with_exit_1(launcher):
    up = launcher()
    up.wait_ready()
    os.kill(up.router_pid(), signal.SIGKILL)
    assert up.wait_exit() == 1, up.output
    assert "router" in up.output and "SIGKILL" in up.output
    up.assert_nothing_left()


def test_status_of_an_unreachable_router_is_one_line_and_exit_1():
    url = f"http://127.0.0.1:{free_port()}"
    status = subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--url", url], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=30)
    assert status.returncode == 1
    assert status.stdout == ""
    assert len(status.stderr.strip().splitlines()) == 1 and url in status.stderr, status.stderr


@pytest.mark.timeout(120)
def test_node_that_fails_to_start_is_named_with_its_log_and_nothing_is_left(tmp_path):
    from engine.builtin_models import resolve_builtin

    # The router (tokenizer, config.json) starts; the nodes find no weights.
    model = tmp_path / "no-weights"
    shutil.copytree(resolve_builtin("tiny"), model, ignore=shutil.ignore_patterns("*.safetensors"))
    config = ClusterConfig.model_validate({
        "model": {"path": str(model)}, "router": {"port": free_port()}, "kv_transfer": {"connector": "tcp"},
        "engine": {"num_blocks": 128}})
    cluster = LocalCluster(config, run_dir=tmp_path / "run")
    try:
        with pytest.raises(ClusterStartError) as e:
            cluster.start(timeout_s=90)
        message = str(e.value)
        assert message.startswith(("prefill-0 ", "decode-0 ")) and "before the cluster was ready" in message, message
        assert "failed to start" in message, message  # the tail of the node's log
        assert all(c.proc is not None and not alive(c.pid) for c in cluster.children)
    finally:
        cluster.stop()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_down_never_signals_a_process_that_took_over_a_dead_launchers_pid(tmp_path, monkeypatch):
    """A launcher killed with SIGKILL leaves its state file; its pid may then belong to
    anything, even a process whose command line says pdcluster. `down` checks the start
    time the file recorded and leaves that process alone."""
    from cluster import detach

    monkeypatch.setenv("PDCLUSTER_STATE_DIR", str(tmp_path / "state"))
    detach.write_state("http://127.0.0.1:1", "local", tmp_path)  # this test process as the launcher
    assert [c["pid"] for c in detach.running_clusters()] == [os.getpid()]
    assert (tmp_path / "state").stat().st_mode & 0o077 == 0  # the launcher logs in it may name the API key
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "pdcluster", "up"])
    try:
        state = tmp_path / "state" / f"launcher-{stranger.pid}.json"
        stale = {"pid": stranger.pid, "pid_started": detach.process_start_time(stranger.pid) - 1,
                 "url": "http://127.0.0.1:2", "backend": "local", "run_dir": str(tmp_path)}
        state.write_text(json.dumps(stale))
        assert detach.run_down("http://127.0.0.1:2") == 1  # "no running cluster"
        assert stranger.poll() is None and not state.exists()
    finally:
        stranger.kill()
        stranger.wait()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("host, port_given, why", [
    ("127.0.0.1", True, "router.port: 127.0.0.1:{port} is not available (Address already in use)"),
    ("192.0.2.1", True, "router.host: cannot listen on 192.0.2.1:{port}"),
    ("192.0.2.1", False, "router.host: cannot listen on 192.0.2.1:0"),
], ids=["port-taken", "host-not-here", "host-not-here-port-0"])
def test_router_address_that_cannot_be_used_is_one_line_and_starts_nothing(tmp_path, host, port_given, why):
    """router.port taken, or router.host not an address of this machine: `up` says so in
    one line, exit 1, before it starts a node (no traceback, no bogus "did not stop")."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        yaml = tmp_path / "cluster.yaml"
        yaml.write_text(f"router: {{host: '{host}', port: {port if port_given else 0}}}\n"
                        "kv_transfer: {connector: tcp}\nprefill: {devices: [cpu]}\ndecode: {devices: [cpu]}\n")
        env = {**os.environ, "PDCLUSTER_RUN_DIR": str(tmp_path / "run")}
        up = subprocess.run([sys.executable, "-m", "cluster.cli", "up", str(yaml)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=90)
    assert up.returncode == 1, (up.stdout, up.stderr)
    assert "Traceback" not in up.stderr and "did not stop" not in up.stdout + up.stderr, (up.stdout, up.stderr)
    error = [line for line in up.stderr.splitlines() if line.startswith("pdcluster up:")]
    assert len(error) == 1 and why.format(port=port) in error[0], up.stderr
    assert not list((tmp_path / "run").glob("*.log")), "a child was started"


@pytest.mark.timeout(120)
def test_a_gpu_this_machine_does_not_have_is_named_before_any_node_starts(tmp_path):
    import torch

    gpu = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"  # one past the last
    config = ClusterConfig.model_validate({
        "router": {"port": 0}, "kv_transfer": {"connector": "tcp"}, "engine": {"num_blocks": 64},
        "prefill": {"devices": ["cpu"]}, "decode": {"devices": [gpu]}})
    cluster = LocalCluster(config, run_dir=tmp_path / "run")
    try:
        with pytest.raises(ValueError) as e:
            cluster.start(timeout_s=90)
        assert str(e.value).startswith(f"decode.devices: {gpu} for decode-0: "), e.value
        assert all(c.proc is None for c in cluster.children), "a child was started"
    finally:
        cluster.stop()
