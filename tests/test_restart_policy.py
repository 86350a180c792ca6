"""The launcher's restart policy, on real (tiny) child processes: a node that keeps
dying, or cannot come up again, is restarted with a growing delay while the rest of the
cluster serves; only a node of the first start that never becomes healthy stops the
cluster (tests/test_launcher.py)."""

from __future__ import annotations

import sys
import time

import httpx
import pytest

from cluster.config import ClusterConfig
from cluster.launcher import MAX_RESTARTS, RESTART_BACKOFF_S, Child, LocalCluster


def exited_child(tmp_path) -> Child:
    node = Child("prefill-0", "prefill", [sys.executable, "-c", "pass"], tmp_path / "prefill-0.log")
    node.spawn()
    node.proc.wait()
    return node


def test_a_node_that_keeps_dying_backs_off_instead_of_stopping_the_cluster(tmp_path):
    cluster = LocalCluster(ClusterConfig.default(), run_dir=tmp_path)
    node = exited_child(tmp_path)
    for _ in range(MAX_RESTARTS):
        cluster._restart(node)
        assert node.restarting
        node.restarting = False  # what supervise() does once the router reports it healthy
        node.proc.wait()
    pid = node.pid
    cluster._restart(node)  # one too many within the window: later, not ClusterFailed
    assert node.pid == pid and not node.restarting
    assert node.restart_at == pytest.approx(time.monotonic() + RESTART_BACKOFF_S, abs=1.0)
    cluster._restart(node)  # supervise() polls again before the delay is over: still waiting
    assert node.pid == pid
    node.restart_at = time.monotonic()  # the delay is over
    cluster._restart(node)
    assert node.pid != pid and node.restarting and node.restart_at == 0.0
    node.proc.wait()
    node.restarting = False
    cluster._restart(node)  # and the next delay is twice as long
    assert node.restart_at == pytest.approx(time.monotonic() + 2 * RESTART_BACKOFF_S, abs=1.0)


def test_a_node_that_dies_again_before_it_became_healthy_backs_off_too(tmp_path):
    """A restarted (or newly added) node that cannot come up is one more restart each time,
    with the same backoff, while the other nodes serve: it never stops the cluster."""
    cluster = LocalCluster(ClusterConfig.default(), run_dir=tmp_path)
    node = exited_child(tmp_path)
    for _ in range(MAX_RESTARTS):
        cluster._restart(node)
        assert node.restarting  # never reported healthy
        node.proc.wait()
    pid = node.pid
    cluster._restart(node)
    assert node.pid == pid and node.restart_at == pytest.approx(time.monotonic() + RESTART_BACKOFF_S, abs=1.0)


def test_a_node_not_healthy_within_the_start_timeout_is_killed_and_so_restarted(tmp_path, monkeypatch):
    monkeypatch.setenv("PDCLUSTER_START_TIMEOUT_S", "0.1")
    cluster = LocalCluster(ClusterConfig.default(), run_dir=tmp_path)
    cluster.url = "http://127.0.0.1:9"  # no router answers: nobody says it is healthy
    node = Child("decode-0", "decode", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "d.log")
    node.spawn()
    cluster._expect_healthy(node, time.monotonic())
    cluster.nodes = [node]
    time.sleep(0.2)
    with httpx.Client(timeout=1.0) as http:
        cluster._check_restarted(http)
    assert node.exit_code() is not None and node.restarting  # supervise() restarts it next
