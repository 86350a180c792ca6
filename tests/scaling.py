"""The scale-and-drain check both backends run (tests/test_scale_local.py,
tests/test_ray_backend.py): a role 1 -> 2 -> 1 under a steady stream of requests made
with the `openai` client. No request may fail or change its tokens, the new node must be
used, and the node that left must have released every block before it stopped."""

from __future__ import annotations

import os
import threading
import time
from unittest import mock

import httpx
import openai

from cluster.scale import run_scale
from tests.test_launcher import wait_until  # noqa: F401 - the scale tests take it from here

PROMPTS = ["The quick brown fox jumps over", "def fibonacci(n):", "Numbers: 1, 2, 3, 5, 8,", "Once upon a time"]
GREEDY = dict(temperature=0.0, max_tokens=24, extra_body={"ignore_eos": True})


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def membership(url: str, api_key: str | None) -> dict:
    return httpx.get(f"{url}/cluster/membership", headers=_headers(api_key), timeout=5, trust_env=False).json()


class SteadyLoad:
    """`workers` threads sending streamed greedy completions back to back until stopped."""

    def __init__(self, url: str, api_key: str | None, want: dict[str, str], workers: int = 2):
        self.client = openai.OpenAI(base_url=url + "/v1", api_key=api_key or "unused", max_retries=0, timeout=120)
        self.want = want
        self.done = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def _run(self, worker: int) -> None:
        i = worker
        while not self._stop.is_set():
            prompt = PROMPTS[i % len(PROMPTS)]
            i += 1
            try:
                chunks = self.client.completions.create(model="builtin:tiny", prompt=prompt, stream=True, **GREEDY)
                text = "".join(c.choices[0].text for c in chunks if c.choices)
                if text != self.want[prompt]:
                    self.errors.append(f"{prompt!r}: got {text!r}, want {self.want[prompt]!r}")
            except Exception as e:  # noqa: BLE001 - every failure is a finding
                self.errors.append(f"{prompt!r}: {type(e).__name__}: {e}")
            self.done += 1

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


def check_scale_one_two_one(url: str, api_key: str | None, role: str = "decode") -> dict:
    """Scale `role` 1 -> 2 -> 1 under load. Returns the departed node's record (for
    backend-specific checks of its process)."""
    used = "loads" if role == "decode" else "requests_lent"  # the new node pulled KV / lent KV
    client = openai.OpenAI(base_url=url + "/v1", api_key=api_key or "unused", max_retries=0, timeout=120)
    want = {p: client.completions.create(model="builtin:tiny", prompt=p, **GREEDY).choices[0].text for p in PROMPTS}
    env = {"PDCLUSTER_API_KEY": api_key} if api_key else {}
    load = SteadyLoad(url, api_key, want)
    try:
        with mock.patch.dict(os.environ, env):
            assert run_scale(url, [f"{role}=2"], timeout_s=180) == 0
        view = membership(url, api_key)
        of_role = [n for n in view["nodes"] if n["role"] == role]
        assert len(of_role) == 2 and all(n["state"] == "serving" and n["healthy"] for n in of_role), view
        new = next(n["id"] for n in of_role if n["id"] != f"{role}-0")

        def new_node_used():
            nodes = httpx.get(f"{url}/cluster", headers=_headers(api_key), timeout=5, trust_env=False).json()["nodes"]
            return any(n["id"] == new and n["kv_transfer"].get(used, 0) >= 1 for n in nodes)
        wait_until(new_node_used, 60, f"{new} to serve a request")
        done_before = load.done

        with mock.patch.dict(os.environ, env):
            assert run_scale(url, [f"{role}=1"], timeout_s=180) == 0
        wait_until(lambda: load.done >= done_before + 4, 60, "requests to keep completing after the drain")
    finally:
        load.stop()
    assert not load.errors, load.errors[:5]
    view = membership(url, api_key)
    assert [n["role"] for n in view["nodes"]].count(role) == 1, view
    departed = [d for d in view["departed"] if d["role"] == role]
    assert len(departed) == 1 and departed[0]["why"] == "drained", view["departed"]
    gone = departed[0]
    assert gone["kv_blocks_free"] == gone["kv_blocks_total"] and gone["kv_requests_held"] == 0, gone
    metrics = httpx.get(f"{url}/metrics", timeout=5, trust_env=False).text
    assert f'pdcluster_membership_changes_total{{change="joined",role="{role}"}} 1.0' in metrics
    assert f'pdcluster_membership_changes_total{{change="drained",role="{role}"}} 1.0' in metrics
    assert f'pdcluster_scale_target{{role="{role}"}} 1.0' in metrics
    return gone
