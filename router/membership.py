"""Membership while serving: nodes join and leave a running router.

The router keeps the *target* topology (how many prefill, decode and colocated nodes the
operator asked for) and every node's state; the launcher that owns the processes or Ray
actors (cluster/launcher.py, cluster/ray_launcher.py) reconciles: it polls
`GET /cluster/membership`, starts nodes until each role has its target and registers them
(`POST /cluster/nodes`), and stops the nodes the router lists as `departed`. The router
decides who leaves because only it knows what runs where.

A node's life here:

    joining  --first healthy answer-->  serving  --scale down-->  draining  -->  departed
                                                                      (drained: nothing left)

* joining: registered, not yet healthy; routing skips it (it is not healthy).
* draining: routing gives it no new job, but what it runs goes on: its streams finish,
  and a prefill node keeps lending the KV a decode node still has to pull. It is drained
  when the router has nothing in flight on it and a stats answer taken *after* that shows
  no running or waiting request, no lent KV held (requests_held == 0) and every block free. Then the router
  forgets it and lists it under `departed` (with its last stats: the blocks it still held,
  which should be none), and the launcher stops it. A leaving node that is down (the
  health loop declared it so, or it never came up) cannot drain: it departs at once, `why`
  "down while draining" (a hung node would otherwise stay draining for ever).
* Make before break: a scale-in that would leave no serving path (1P1D -> colocated=1:
  the prefill and decode nodes are the only path until the new node serves) drains its
  nodes only once their replacements serve; meanwhile the view lists them under
  `leaving_once_replaced`.

`pdcluster scale --url URL prefill=N decode=M` is `POST /cluster/scale`. These routes take
the router's API key when one is set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

import msgspec
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily

from router.auth import WRONG_KEY, key_matches
from router.node_client import NodeClient
from router.spec import NodeAddress

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "both")
DRAIN_CHECK_INTERVAL_S = 0.25
SUPERVISOR_STALE_S = 30.0   # a launcher that has not polled for this long is not attached
IDLE_LEAK_GRACE_S = 10.0    # idle but holding blocks this long: depart anyway, reporting the leak
MAX_DEPARTED = 64           # departed nodes remembered for GET /cluster/membership
MAX_REPLICAS_PER_ROLE = 256  # a scale target beyond this is a typo, not a plan


class ScaleRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Target replicas per role; a role left out keeps its target."""
    prefill: int | None = None
    decode: int | None = None
    colocated: int | None = None


class NodeRegistration(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    role: str
    address: str
    pid: int = 0
    placement: dict[str, Any] = {}   # where the backend put it (Ray node, resources), for status


class MembershipError(ValueError):
    def __init__(self, message: str, code: int = 400):
        super().__init__(message)
        self.code = code


class Membership:
    """The router's side of joining and leaving. Mutates `router.nodes` in place: the
    orchestrator, the health loop and the metrics all read that same list."""

    def __init__(self, router):
        self.router = router
        self.nodes: list[NodeClient] = router.nodes
        self.target = {r: sum(n.role == r for n in self.nodes) for r in ROLES}
        self.states: dict[str, str] = {n.id: "joining" for n in self.nodes}
        self.placement: dict[str, dict[str, Any]] = {}
        self.departed: deque[dict[str, Any]] = deque(maxlen=MAX_DEPARTED)
        self._joined_at_runtime: set[str] = set()   # registered after start: their joins are counted
        self.supervisor_seen = 0.0
        self._drain_task: asyncio.Task | None = None
        # Nodes a scale-in picked that serve the only path left: they drain once their
        # replacements serve (scale() and _drain_loop).
        self._replaced: list[NodeClient] = []
        self._idle_since: dict[str, float] = {}     # draining node id -> when it was first seen idle
        r = router.metrics.registry
        self.changes = Counter("pdcluster_membership_changes", "Nodes that joined, started draining, "
                               "finished draining (departed) or were removed", ["role", "change"], registry=r)
        self.scale_requests = Counter("pdcluster_scale_requests", "Accepted POST /cluster/scale calls", registry=r)
        r.register(_MembershipCollector(self))

    # --- states -----------------------------------------------------------------------
    def state(self, node: NodeClient) -> str:
        """joining | serving | draining (a node that was serving and is down stays serving:
        it is expected back, e.g. restarted by its launcher)."""
        if node.leaving:
            return "draining"
        if self.states.get(node.id) == "joining" and node.healthy:
            self.states[node.id] = "serving"
            if node.id in self._joined_at_runtime:
                self.changes.labels(node.role, "joined").inc()
        return self.states.get(node.id, "joining")

    def members(self, role: str) -> list[NodeClient]:
        """Nodes of the role that count towards its target: joining or serving."""
        return [n for n in self.nodes if n.role == role and not n.leaving]

    def view(self) -> dict[str, Any]:
        return {
            "target": {"prefill": self.target["prefill"], "decode": self.target["decode"],
                       "colocated": self.target["both"]},
            "supervised": self.supervised,
            "nodes": [{"id": n.id, "role": n.role, "address": n.address, "pid": n.pid, "healthy": n.healthy,
                       "state": self.state(n), "in_flight": n.in_flight, "placement": self.placement.get(n.id, {})}
                      for n in self.nodes],
            "departed": list(self.departed),
            "leaving_once_replaced": [n.id for n in self._replaced],
        }

    @property
    def supervised(self) -> bool:
        return time.monotonic() - self.supervisor_seen < SUPERVISOR_STALE_S

    # --- changes ----------------------------------------------------------------------
    def scale(self, req: ScaleRequest) -> dict[str, Any]:
        """Set the target; pick the nodes that leave now (they start draining at once).
        A change needs a launcher attached, to start new nodes and stop drained ones."""
        want = dict(self.target)
        for field, role in (("prefill", "prefill"), ("decode", "decode"), ("colocated", "both")):
            value = getattr(req, field)
            if value is None:
                continue
            if not isinstance(value, int) or value < 0:
                raise MembershipError(f"{field}: {value!r} is not a replica count: give 0 or more")
            if value > MAX_REPLICAS_PER_ROLE:
                raise MembershipError(f"{field}: {value} nodes is more than this router manages per role "
                                      f"({MAX_REPLICAS_PER_ROLE}): give a smaller count")
            want[role] = value
        p, d, c = want["prefill"], want["decode"], want["both"]
        if bool(p) != bool(d):
            raise MembershipError(f"prefill={p} decode={d}: a disaggregated cluster needs at least one node of "
                                  "each role (or set both to 0 and serve with colocated nodes)")
        if not (p or c):
            raise MembershipError("that leaves no serving node: keep prefill and decode at 1 or more, "
                                  "or colocated at 1 or more")
        changes = any(want[r] != len(self.members(r)) for r in ROLES)
        if changes and not self.supervised:
            raise MembershipError("no launcher is attached to this router to start or stop nodes (start the "
                                  "cluster with `pdcluster up`, which supervises it)", 409)
        self.target = want
        leavers = [n for role in ROLES for n in self._leavers(role, len(self.members(role)) - want[role])]
        if self._serves_without(leavers):
            self._replaced = []
            for node in leavers:
                self.start_draining(node)
        else:  # make before break: e.g. 1P1D -> colocated=1 would drain every path first
            self._replaced = leavers
            log.info("scale: %s keep serving until the nodes replacing them serve",
                     ", ".join(n.id for n in leavers))
        self.scale_requests.inc()
        log.info("scale: target prefill=%d decode=%d colocated=%d", p, d, c)
        self._ensure_drain_task()
        return self.view()

    def _leavers(self, role: str, k: int) -> list[NodeClient]:
        """Who goes first: nodes not serving yet, then the least busy, newest first."""
        if k <= 0:
            return []
        def cost(n: NodeClient) -> tuple:
            return (self.state(n) != "joining", n.in_flight, -_index(n.id))
        return sorted(self.members(role), key=cost)[:k]

    def _serves_without(self, leaving: list[NodeClient]) -> bool:
        """Whether the nodes that stay serve every request: a healthy, serving `both` node,
        or a healthy, serving prefill node and decode node."""
        roles = {n.role for n in self.nodes
                 if n not in leaving and not n.leaving and n.healthy and self.state(n) == "serving"}
        return "both" in roles or {"prefill", "decode"} <= roles

    def start_draining(self, node: NodeClient) -> None:
        node.leaving = True
        self.changes.labels(node.role, "drain_started").inc()
        log.info("node %s is draining: no new jobs; %d requests in flight finish first", node.id, node.in_flight)

    def register(self, reg: NodeRegistration) -> dict[str, Any]:
        """A node the launcher started (or restarted elsewhere: same id, new address)."""
        if reg.role not in ROLES:
            raise MembershipError(f"role {reg.role!r}: use one of {', '.join(ROLES)}")
        if not reg.address.startswith("tcp://"):
            raise MembershipError(f"address {reg.address!r}: give the node's ZeroMQ endpoint, tcp://HOST:PORT")
        if reg.placement:
            self.placement[reg.id] = reg.placement
        node = next((n for n in self.nodes if n.id == reg.id), None)
        if node is not None:
            if node.role != reg.role:
                raise MembershipError(f"node {reg.id} is a {node.role} node, not {reg.role}", 409)
            if node.address != reg.address:
                log.info("node %s moved: %s -> %s", reg.id, node.address, reg.address)
                node.address = reg.address
                if node.healthy:
                    node.mark_down(f"moved to {reg.address}")  # also reconnects
                else:
                    node._reconnect()
            node.pid = reg.pid or node.pid
            return {"id": node.id, "state": self.state(node)}
        node = NodeClient(NodeAddress(reg.id, reg.role, reg.address, reg.pid), self.router.ctx,
                          self.router.spec.node_timeout_s, self.router.cluster_key)
        node.connect()
        self.nodes.append(node)
        self.states[node.id] = "joining"
        self._joined_at_runtime.add(node.id)
        log.info("node %s (%s) joins at %s", reg.id, reg.role, reg.address)
        return {"id": node.id, "state": "joining"}

    async def remove(self, node_id: str, why: str = "removed") -> dict[str, Any]:
        """Forget a node now (its launcher found it dead while it drained, or gave up on
        it). Anything still in flight there fails over as for a crashed node."""
        node = next((n for n in self.nodes if n.id == node_id), None)
        if node is None:
            raise MembershipError(f"no node {node_id!r} in this cluster", 404)
        if node.healthy or node.in_flight:
            node.mark_down(why)
        await self._forget(node, why)
        self.changes.labels(node.role, "removed").inc()
        return {"id": node_id, "state": "departed"}

    async def _forget(self, node: NodeClient, why: str) -> None:
        node.healthy = False  # a health check still in flight must not mark it down (and reconnect it)
        self.nodes.remove(node)
        self.states.pop(node.id, None)
        self.placement.pop(node.id, None)
        e = node.last_stats.engine if node.last_stats else None
        self.departed.append({"id": node.id, "role": node.role, "address": node.address, "pid": node.pid,
                              "why": why, "at": time.time(),
                              "kv_blocks_total": e.kv_blocks_total if e else None,
                              "kv_blocks_free": e.kv_blocks_free if e else None,
                              "kv_requests_held": int(e.kv_transfer.get("requests_held", 0)) if e else None})
        self.router.policy.node_left(node.id)
        await node.close()

    # --- draining -----------------------------------------------------------------------
    def _ensure_drain_task(self) -> None:
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = asyncio.get_running_loop().create_task(self._drain_loop())

    async def _drain_loop(self) -> None:
        while any(n.leaving for n in self.nodes) or self._replaced:
            if self._replaced and self._serves_without(self._replaced):
                replaced, self._replaced = self._replaced, []
                for node in replaced:
                    if node in self.nodes:
                        self.start_draining(node)
            for node in [n for n in self.nodes if n.leaving]:
                try:
                    why = await self._drained(node)
                    if why:
                        log.info("node %s %s: departing", node.id, why)
                        await self._forget(node, why)
                        self.changes.labels(node.role, "drained" if why == "drained" else "removed").inc()
                except Exception:  # never let one node's check stop the others' drains
                    log.exception("node %s: drain check failed", node.id)
            await asyncio.sleep(DRAIN_CHECK_INTERVAL_S)

    async def _drained(self, node: NodeClient) -> str | None:
        """Why the node may depart now, or None. `drained`: idle (nothing in flight from
        here, nothing running, waiting or lent) and every block back in the pool. Released
        blocks return at the node's next step, so an idle node briefly still holds some; one
        that keeps holding blocks is let go after IDLE_LEAK_GRACE_S, its departed record
        showing what it held. `down while draining`: the health loop declared it down (or it
        never came up) and it does not answer: nothing there can finish any more (what was in
        flight has failed over), and waiting for a hung node would keep it draining for ever."""
        if node.in_flight:
            self._idle_since.pop(node.id, None)
            return None
        stats = await node.poll_stats()  # asked after in_flight reached 0: fresh
        if stats is None and not node.healthy and not node.draining and not node.in_flight:
            log.warning("node %s does not answer and is down: letting it go without draining", node.id)
            self._idle_since.pop(node.id, None)
            return "down while draining"
        if stats is None or node.in_flight:
            return None
        e = stats.engine
        if e.running or e.waiting or e.waiting_for_remote_kv or e.kv_transfer.get("requests_held", 0):
            self._idle_since.pop(node.id, None)
            return None
        if e.kv_blocks_free == e.kv_blocks_total:
            self._idle_since.pop(node.id, None)
            return "drained"
        since = self._idle_since.setdefault(node.id, time.monotonic())
        if time.monotonic() - since < IDLE_LEAK_GRACE_S:
            return None
        log.warning("node %s is idle but holds %d KV blocks: letting it go anyway", node.id,
                    e.kv_blocks_total - e.kv_blocks_free)
        self._idle_since.pop(node.id, None)
        return "drained"


class _MembershipCollector:
    """Nodes per role and state, and the target, computed at scrape time."""

    def __init__(self, membership: Membership):
        self.membership = membership

    def collect(self):
        m = self.membership
        nodes = GaugeMetricFamily("pdcluster_nodes", "Nodes by role and membership state", labels=["role", "state"])
        counts = {(r, s): 0 for r in ROLES for s in ("joining", "serving", "draining")}
        for n in list(m.nodes):
            counts[(n.role, m.state(n))] += 1
        for (role, state), k in counts.items():
            nodes.add_metric([role, state], k)
        target = GaugeMetricFamily("pdcluster_scale_target", "Target replicas per role", labels=["role"])
        for role, k in m.target.items():
            target.add_metric([role], k)
        yield nodes
        yield target


def _index(node_id: str) -> int:
    tail = node_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def install_membership(app: FastAPI, router) -> Membership:
    """Add the membership routes to the router's app (behind its API key, when set)."""
    membership = Membership(router)
    router.membership = membership
    api_key = router.spec.api_key

    async def authorized(request: Request) -> None:
        if api_key and not key_matches(request.headers.get("authorization"), api_key):
            raise MembershipError(WRONG_KEY, 401)

    routes = APIRouter(dependencies=[Depends(authorized)])

    @routes.get("/cluster/membership")
    async def get_membership(supervisor: int = 0):
        if supervisor:
            membership.supervisor_seen = time.monotonic()
        return membership.view()

    @routes.post("/cluster/scale")
    async def post_scale(request: Request):
        req = _decode(await request.body(), ScaleRequest)
        return membership.scale(req)

    @routes.post("/cluster/nodes")
    async def post_node(request: Request):
        return membership.register(_decode(await request.body(), NodeRegistration))

    @routes.delete("/cluster/nodes/{node_id}")
    async def delete_node(node_id: str):
        return await membership.remove(node_id)

    @app.exception_handler(MembershipError)
    async def membership_error(request: Request, e: MembershipError):
        kind = {401: "authentication_error", 404: "not_found_error", 409: "conflict_error"}
        body = {"error": {"message": str(e), "type": kind.get(e.code, "invalid_request_error"), "code": e.code}}
        return JSONResponse(body, status_code=e.code)

    app.include_router(routes)
    return membership


def _decode(body: bytes, cls):
    try:
        return msgspec.json.decode(body or b"{}", type=cls)
    except msgspec.ValidationError as e:
        raise MembershipError(f"bad body: {e}") from None
    except msgspec.DecodeError as e:
        raise MembershipError(f"the body is not JSON: {e}") from None
