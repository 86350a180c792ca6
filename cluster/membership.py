"""The launcher's side of membership while serving (the router's side is
router/membership.py): read the router's target and node states, and work out which nodes
to start and which to stop. Both backends (local processes, Ray actors) use it from their
supervise loops, so `pdcluster scale` behaves the same on either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

ROLE_OF_TARGET = {"prefill": "prefill", "decode": "decode", "colocated": "both"}


class MembershipUnavailable(RuntimeError):
    pass


@dataclass(slots=True)
class MembershipPlan:
    start: list[str] = field(default_factory=list)     # roles of nodes to start, one entry per node
    stop: list[str] = field(default_factory=list)      # ids of nodes the router let go (drained or removed)
    draining: set[str] = field(default_factory=set)    # ids draining now: not restarted if they die


def read_membership(http: httpx.Client, url: str) -> dict[str, Any] | None:
    """GET /cluster/membership as the attached launcher (so the router accepts scale-ups);
    None when the router does not answer."""
    try:
        r = http.get(f"{url}/cluster/membership", params={"supervisor": 1}, timeout=5.0)
        r.raise_for_status()
        return r.json()
    except (httpx.HTTPError, ValueError):
        return None


def plan(view: dict[str, Any], live: dict[str, str]) -> MembershipPlan:
    """What to do so the launcher's nodes match the router's view. `live`: node id -> role
    of every node this launcher runs (alive or being restarted)."""
    out = MembershipPlan()
    in_router = {n["id"]: n for n in view.get("nodes", [])}
    out.draining = {i for i, n in in_router.items() if n.get("state") == "draining"}
    out.stop = [i for i in live if i not in in_router]
    for key, role in ROLE_OF_TARGET.items():
        members = sum(1 for n in in_router.values() if n["role"] == role and n.get("state") != "draining")
        out.start += [role] * max(0, int(view.get("target", {}).get(key, 0)) - members)
    return out


def register(http: httpx.Client, url: str, node_id: str, role: str, address: str, pid: int,
             placement: dict[str, Any] | None = None) -> None:
    """POST /cluster/nodes: the router connects to the node and uses it once healthy."""
    r = http.post(f"{url}/cluster/nodes", json={"id": node_id, "role": role, "address": address, "pid": pid,
                                                 "placement": placement or {}})
    if r.status_code != 200:
        raise MembershipUnavailable(f"the router refused node {node_id}: HTTP {r.status_code} {r.text[:200]}")


def remove(http: httpx.Client, url: str, node_id: str) -> None:
    """DELETE /cluster/nodes/ID (a draining node that died: nothing to wait for)."""
    try:
        http.delete(f"{url}/cluster/nodes/{node_id}")
    except httpx.HTTPError:
        pass


def next_index(role: str, used: set[str]) -> int:
    """The next unused index for a role's node names (names are never reused: a departed
    node's id must not be confused with a new one)."""
    taken = [int(i.rsplit("-", 1)[1]) for i in used if i.startswith(f"{role}-") and i.rsplit("-", 1)[1].isdigit()]
    return max(taken, default=-1) + 1
