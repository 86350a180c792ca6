"""The launcher's restart policy, on real (tiny) child processes: a node that keeps
dying after it became healthy is restarted with a growing delay while the rest of the
cluster serves; only a node that cannot start at all stops the cluster."""

from __future__ import annotations

import sys
import time

import pytest

from cluster.config import ClusterConfig
from cluster.launcher import MAX_RESTARTS, RESTART_BACKOFF_S, Child, ClusterFailed, LocalCluster


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


def test_a_node_that_dies_again_before_it_was_ever_healthy_stops_the_cluster(tmp_path):
    cluster = LocalCluster(ClusterConfig.default(), run_dir=tmp_path)
    node = exited_child(tmp_path)
    cluster._restart(node)
    node.proc.wait()
    with pytest.raises(ClusterFailed, match="again before it became healthy"):
        cluster._restart(node)
