"""Membership while serving on the local backend: `pdcluster scale` adds a decode node
that takes work once healthy and drains one out without losing a request; the membership
routes take the API key."""

from __future__ import annotations

import os
import signal
import threading
from unittest import mock

import httpx
import pytest

from cluster.config import ClusterConfig
from cluster.launcher import LocalCluster
from tests.scaling import check_scale_one_two_one, wait_until

API_KEY = "scale-test-key"


@pytest.fixture(scope="module")
def supervised(tmp_path_factory):
    config = ClusterConfig.model_validate({
        "model": {"path": "builtin:tiny", "dtype": "float32"},
        "router": {"port": 0, "api_key": API_KEY},
        "kv_transfer": {"connector": "tcp", "abort_timeout_s": 30, "transfer_timeout_s": 10},
        "engine": {"num_blocks": 128, "block_size": 16, "max_num_seqs": 16},
        "prefill": {"replicas": 1, "devices": ["cpu"]},
        "decode": {"replicas": 1, "devices": ["cpu"]},
    })
    cluster = LocalCluster(config, run_dir=tmp_path_factory.mktemp("run"))
    cluster.start(timeout_s=180)
    # supervise() forks the new nodes: its thread lives as long as the cluster (their
    # parent-death signal is tied to it).
    failure: list[BaseException] = []
    def supervise():
        try:
            cluster.supervise()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            failure.append(e)
    thread = threading.Thread(target=supervise, daemon=True)
    thread.start()
    yield cluster
    cluster.request_stop()
    thread.join(timeout=30)
    cluster.stop()
    assert not failure, failure


def test_membership_routes_need_the_api_key(supervised):
    for method, path, body in [("POST", "/cluster/scale", {"decode": 2}), ("GET", "/cluster/membership", None),
                               ("POST", "/cluster/nodes", {"id": "x", "role": "decode", "address": "tcp://1.2.3.4:1"}),
                               ("DELETE", "/cluster/nodes/decode-0", None)]:
        r = httpx.request(method, supervised.url + path, json=body, trust_env=False)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"], (path, r.text)


@pytest.mark.parametrize("body, message", [
    ({"decode": 0}, "needs at least one node of each role"),
    ({"prefill": 0, "decode": 0}, "no serving node"),
    ({"decode": -1}, "0 or more"),
    ({"decode": 100000}, "decode: 100000 nodes is more than this router manages per role (256)"),
    ({"decoders": 2}, "decoders"),
])
def test_bad_scale_requests_are_refused_and_change_nothing(supervised, body, message):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(supervised.url + "/cluster/scale", json=body, headers=auth, trust_env=False)
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    view = httpx.get(supervised.url + "/cluster/membership", headers=auth, trust_env=False).json()
    assert view["target"] == {"prefill": 1, "decode": 1, "colocated": 0}


@pytest.mark.parametrize("role", ["decode", "prefill"])
def test_scale_one_two_one_under_load_loses_nothing(supervised, role):
    gone = check_scale_one_two_one(supervised.url, API_KEY, role)
    # The launcher stopped the drained node's process, and runs one node of each role.
    wait_until(lambda: not _alive(gone["pid"]), 30, f"{gone['id']} (pid {gone['pid']}) to exit")
    assert sorted(n.role for n in supervised.nodes) == ["decode", "prefill"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_frozen_node_scaled_away_departs_once_the_router_declares_it_down(supervised):
    """A node that stops answering (hung, SIGSTOP) cannot drain: once the router has declared
    it down (its requests failed over), scaling it away must still complete, not leave it
    `draining` for ever, and the launcher must stop its process."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    url = supervised.url

    def view():
        return httpx.get(url + "/cluster/membership", headers=auth, timeout=5, trust_env=False).json()

    wait_until(lambda: view()["supervised"], 30, "the launcher to attach")
    r = httpx.post(url + "/cluster/scale", json={"decode": 2}, headers=auth, timeout=10, trust_env=False)
    assert r.status_code == 200, r.text
    new = wait_until(lambda: next((n for n in view()["nodes"] if n["role"] == "decode" and n["id"] != "decode-0"
                                   and n["healthy"]), None), 180, "a second decode node to be healthy")
    os.kill(new["pid"], signal.SIGSTOP)
    try:
        wait_until(lambda: not next(n for n in view()["nodes"] if n["id"] == new["id"])["healthy"], 30,
                   f"the router to declare the frozen {new['id']} down")
        r = httpx.post(url + "/cluster/scale", json={"decode": 1}, headers=auth, timeout=10, trust_env=False)
        assert r.status_code == 200, r.text
        assert [n["id"] for n in r.json()["nodes"] if n["state"] == "draining"] == [new["id"]], r.json()
        gone = wait_until(lambda: next((d for d in view()["departed"] if d["id"] == new["id"]), None), 30,
                          f"{new['id']} to depart")
        assert gone["why"] == "down while draining", gone
        wait_until(lambda: not _alive(new["pid"]), 40, f"the launcher to stop {new['id']} (pid {new['pid']})")
        assert sorted(n.role for n in supervised.nodes) == ["decode", "prefill"]
    finally:
        if _alive(new["pid"]):
            os.kill(new["pid"], signal.SIGKILL)


def test_switching_between_split_and_colocated_under_load_loses_nothing(supervised):
    """1P1D -> one colocated node -> 1P1D under a steady stream: the nodes that leave are
    the only serving path until their replacements serve, so they drain only then (make
    before break), and no request fails or changes its tokens on the way."""
    import openai

    from cluster.scale import run_scale
    from tests.scaling import GREEDY, PROMPTS, SteadyLoad

    url = supervised.url
    client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    want = {p: client.completions.create(model="builtin:tiny", prompt=p, **GREEDY).choices[0].text for p in PROMPTS}
    load = SteadyLoad(url, API_KEY, want)
    try:
        with mock.patch.dict(os.environ, {"PDCLUSTER_API_KEY": API_KEY}):
            assert run_scale(url, ["prefill=0", "decode=0", "colocated=1"], timeout_s=180) == 0
            wait_until(lambda: sorted(n.role for n in supervised.nodes) == ["both"], 40,
                       "the launcher to stop the nodes that left")
            done_colocated = load.done
            wait_until(lambda: load.done >= done_colocated + 4, 60, "requests served by the colocated node")
            assert run_scale(url, ["prefill=1", "decode=1", "colocated=0"], timeout_s=180) == 0
    finally:
        load.stop()
    assert not load.errors, load.errors[:5]
    wait_until(lambda: sorted(n.role for n in supervised.nodes) == ["decode", "prefill"], 40,
               "the launcher to stop the colocated node")
