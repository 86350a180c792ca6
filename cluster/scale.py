"""`pdcluster scale --url URL prefill=N decode=M [colocated=K]`: change the topology of a
running cluster, then wait until it has that shape (new nodes healthy, leaving nodes
drained and stopped). The router's POST /cluster/scale does the work with the launcher
that supervises the cluster (see router/membership.py).

Sends `Authorization: Bearer $PDCLUSTER_API_KEY` when that variable is set. Exit codes:
0 done, 1 refused or not done in time, 2 bad arguments.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import httpx

ROLE_KEYS = ("prefill", "decode", "colocated")
_ROLE = {"prefill": "prefill", "decode": "decode", "colocated": "both"}


def parse_targets(items: list[str]) -> dict[str, int]:
    """["prefill=2", "decode=1"] -> {"prefill": 2, "decode": 1}; ValueError says what is wrong."""
    out: dict[str, int] = {}
    for item in items:
        role, sep, count = item.partition("=")
        role = role.strip().lower()
        if not sep or role not in ROLE_KEYS:
            raise ValueError(f"{item!r}: write ROLE=N with ROLE one of {', '.join(ROLE_KEYS)} (e.g. decode=2)")
        if not count.strip().isdigit():
            raise ValueError(f"{item!r}: {count!r} is not a replica count (0 or more)")
        out[role] = int(count)
    if not out:
        raise ValueError("nothing to scale: give e.g. prefill=1 decode=2")
    return out


def run_scale(url: str, targets: list[str], wait: bool = True, timeout_s: float = 300.0) -> int:
    try:
        want = parse_targets(targets)
    except ValueError as e:
        print(f"pdcluster scale: {e}", file=sys.stderr)
        return 2
    url = url.rstrip("/")
    key = os.environ.get("PDCLUSTER_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(headers=headers, timeout=httpx.Timeout(10.0, connect=3.0), trust_env=False) as http:
        try:
            r = http.post(f"{url}/cluster/scale", json=want)
        except httpx.HTTPError as e:
            print(f"pdcluster scale: cannot reach the router at {url}: {e or type(e).__name__}", file=sys.stderr)
            return 1
        if r.status_code != 200:
            print(f"pdcluster scale: {url} refused (HTTP {r.status_code}): {_message(r)}", file=sys.stderr)
            return 1
        view = r.json()
        leaving = [n["id"] for n in view["nodes"] if n["state"] == "draining"]
        print(f"target: {_shape(view['target'])}" + (f"; draining {', '.join(leaving)}" if leaving else ""))
        if not wait:
            return 0
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                view = http.get(f"{url}/cluster/membership").json()
            except (httpx.HTTPError, ValueError):
                view = None
            if view is not None and reached(view):
                print(f"done: {_shape(view['target'])}, every node healthy")
                return 0
            if time.monotonic() > deadline:
                print(f"pdcluster scale: not done after {timeout_s:.0f} s: {describe(view)}; the cluster keeps "
                      f"working on it (see pdcluster status --url {url})", file=sys.stderr)
                return 1
            time.sleep(0.5)


def reached(view: dict[str, Any]) -> bool:
    """Every role has its target of healthy serving nodes and nothing is still draining."""
    nodes = view["nodes"]
    if any(n["state"] != "serving" or not n["healthy"] for n in nodes):
        return False
    return all(sum(n["role"] == _ROLE[k] for n in nodes) == view["target"][k] for k in ROLE_KEYS)


def describe(view: dict[str, Any] | None) -> str:
    if view is None:
        return "the router does not answer"
    return ", ".join(f"{n['id']} {n['state']}{'' if n['healthy'] else ' (not healthy)'}" for n in view["nodes"])


def _shape(target: dict[str, int]) -> str:
    return " ".join(f"{k}={target[k]}" for k in ROLE_KEYS if target.get(k) or k != "colocated")


def _message(r: httpx.Response) -> str:
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return r.text[:200]
