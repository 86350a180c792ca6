"""`pdcluster up` with `backend: ray`: the nodes are Ray actors (cluster/ray_actor.py)
placed by each role's `resources`, on whatever machines the Ray cluster has; the router
runs here, as a child process of the launcher, exactly as with backend local.

Why the router is not an actor: it is the cluster's front door, and `router.host/port`
name an address on the machine where the operator runs `pdcluster up`; it needs no
accelerator, and keeping it a local child keeps one code path (and one log file) for
both backends. It reaches the nodes over ZeroMQ at the addresses they advertise.

    RayCluster(config)
        .start()      ray.init (auto: join; local: start a private Ray; HOST:PORT: checked to
                      answer first), one actor per node, wait for each to load its model,
                      start the router, wait until every node is healthy (following actors
                      Ray restarts meanwhile); every wait checks for Ctrl-C at least once a second
        .supervise()  Ray restarts a dead actor (max_restarts); the launcher sees its new
                      address in info() and re-registers it with the router; `pdcluster
                      scale` adds and retires actors (cluster/membership.py)
        .stop()       router first, then every actor drains and is killed (no_restart);
                      disconnect from Ray (a private Ray is shut down)

Every actor is named `<namespace>/pdcluster-<router port>-<node id>` in `ray.namespace`,
and owned by this launcher's Ray job: if the launcher dies, Ray removes its actors too.

Failures while serving, as the local backend handles them (cluster/launcher.py): the
cluster fails only when the router dies.
  * An actor Ray will not restart any more (max_restarts used up) leaves the router, and a
    fresh actor under the same node id replaces it after a backoff (RESTART_BACKOFF_S,
    doubling per replacement within RESTART_WINDOW_S, up to RESTART_BACKOFF_MAX_S): Ray
    already restarted it max_restarts times at once.
  * An actor that cannot start (its constructor failed, or it did not report within the
    start timeout: Ray could not place it, or it did not finish loading) is killed, and its
    role backs off the same way from the first failure: no node of that role starts before
    then, and the failed node is retried under the same id. A successful start resets it.
  * Nodes waiting for a fresh actor or still starting count towards their role's target;
    those beyond it (`pdcluster scale` lowered it) are cancelled, the waiting first, then
    the starting newest first. At most MAX_STARTS_PER_TICK actors are created per check.
  * With `ray.placement_strategy`, a node keeps its placement-group bundle across
    replacements; a bundle of a node that left (scale-down, or cancelled) goes to the next
    node of its role, so the group's reservation is used, not leaked.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import zmq
from rich.console import Console

from cluster import membership
from cluster.config import ClusterConfig, NodeSpec
from cluster.launcher import (DEFAULT_START_TIMEOUT_S, MAX_STARTS_PER_TICK, POLL_INTERVAL_S, RESTART_BACKOFF_MAX_S,
                              RESTART_BACKOFF_S, RESTART_WINDOW_S, STOP_GRACE_S, Child, ClusterFailed,
                              ClusterStartError, _block_size, _check_ports_free, _connect_host, _default_run_dir,
                              _died_message, _free_ports, resolve_model, router_launch_spec, router_secrets)
from kv_connector.cluster_key import ENV_VAR as CLUSTER_KEY_ENV
from kv_connector.cluster_key import ClusterKey

INFO_TIMEOUT_S = 2.0
WAIT_SLICE_S = 1.0          # the longest a blocking wait runs before it looks at the stop flag
CONNECT_TIMEOUT_S = 5.0     # ray.address HOST:PORT must accept a TCP connection within this
RAY_LOGS = "/tmp/ray/session_latest/logs"


@dataclass(slots=True)
class ActorNode:
    """One node, and its current actor (None while it waits for a fresh one)."""

    name: str
    role: str
    spec: NodeSpec
    handle: Any = None                           # ray.actor.ActorHandle
    info: dict[str, Any] = field(default_factory=dict)
    pending: Any = None                          # an info() call in flight (ObjectRef)
    registered_pid: int = 0                      # the incarnation the router knows
    bundle: int | None = None                    # its placement-group bundle (ray.placement_strategy)
    created_at: float = 0.0                      # monotonic: when its current actor was created
    start_deadline: float = 0.0                  # monotonic: a starting actor reports by then, or is killed
    replaced: deque[float] = field(default_factory=deque)  # monotonic times a fresh actor replaced a dead one
    retry_at: float = 0.0                        # monotonic: while waiting, its fresh actor comes then

    @property
    def pid(self) -> int:
        return int(self.info.get("pid", 0))

    @property
    def address(self) -> str:
        return self.info.get("address", "")


class RayCluster:
    """The Ray counterpart of LocalCluster, with the same start/supervise/stop contract."""

    def __init__(self, config: ClusterConfig, run_dir: Path | None = None, console: Console | None = None):
        if config.backend != "ray":
            raise ValueError(f"backend {config.backend!r}: RayCluster runs backend ray only")
        self.config = config
        self.run_dir = Path(run_dir) if run_dir else _default_run_dir()
        self.console = console or Console(stderr=True, soft_wrap=True, highlight=False)
        self.nodes: list[ActorNode] = []         # registered with the router (joining or serving)
        self.router: Child | None = None
        self.url = ""
        self._stop_requested = threading.Event()
        self._stopped = False
        self._ray_started_here = False
        self._names_used: set[str] = set()
        # Nodes the router does not list yet, which count towards their role's target:
        self._starting: list[ActorNode] = []     # an actor created (scale-up or replacement), not yet reporting
        self._waiting: list[ActorNode] = []      # no actor: dead for good, or a failed start; see retry_at
        self._role_failures: dict[str, deque[float]] = {}  # failed starts per role (monotonic times)
        self._role_retry_at: dict[str, float] = {}         # no actor of the role is created before this
        self._prefix = ""
        self._cluster_key_text = ""   # set by _connect()
        self._pg = None                          # the initial nodes' placement group (ray.placement_strategy)
        self._free_bundles: dict[str, list[int]] = {}      # role -> bundles of nodes that left, for the next
        self._start_timeout_s = DEFAULT_START_TIMEOUT_S

    @property
    def api_key(self) -> str | None:
        return self.config.router.api_key

    @property
    def children(self) -> list[Any]:
        return [*self.nodes, *([self.router] if self.router else [])]

    # --- start ----------------------------------------------------------------------
    def start(self, timeout_s: float | None = None) -> None:
        """Returns early, without error, when request_stop() is called meanwhile."""
        if timeout_s is None:
            timeout_s = float(os.environ.get("PDCLUSTER_START_TIMEOUT_S", DEFAULT_START_TIMEOUT_S))
        self._start_timeout_s = timeout_s
        self.run_dir.mkdir(parents=True, exist_ok=True)
        idle = self.config.idle_colocated_nodes()
        if idle:
            self.console.print(f"warning: {idle}", markup=False)
        atexit.register(self.stop)
        try:
            for step in (self._connect, lambda: self._start_nodes(timeout_s), self._start_router,
                         lambda: self._wait_ready(timeout_s)):
                if self._stop_requested.is_set():
                    return
                step()
        except BaseException:
            self.stop()
            raise

    def _connect(self) -> None:
        import ray

        # The cluster's key (kv_connector/cluster_key.py) reaches the actors through their
        # runtime environment, so nodes on every machine admit only the router and each
        # other. Whoever may inspect the Ray cluster's jobs can read it: they can run code
        # there anyway. Empty where libzmq has no CURVE: sockets stay plain.
        self._cluster_key_text = ClusterKey.generate().encode() if zmq.has("curve") else ""

        rc = self.config.ray
        address = rc.address  # "local" always starts a private Ray, whatever RAY_ADDRESS says
        self._ray_started_here = rc.address == "local"
        # ray.init retries an address that does not answer for minutes, deaf to Ctrl-C: ask first.
        if address not in ("auto", "local"):
            self._check_answers(address, f"ray.address {address}")
        elif address == "auto" and (env := os.environ.get("RAY_ADDRESS", "auto")) not in ("auto", "local", ""):
            self._check_answers(env, f"ray.address auto (RAY_ADDRESS={env})")
        if self._stop_requested.is_set():
            return
        # Node output stays in Ray's logs on each machine (/tmp/ray/session_latest/logs),
        # as local nodes write to the run folder: the terminal shows the launcher only.
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        ray.init(address=address, namespace=rc.namespace, log_to_driver=False, configure_logging=False,
                 include_dashboard=False if self._ray_started_here else None)
        for signum, handler in handlers.items():  # ray.init installs its own; ours stop the cluster in order
            if handler is not None:
                signal.signal(signum, handler)
        self.console.print(f"connected to Ray at {ray.get_runtime_context().gcs_address} "
                           f"(namespace {rc.namespace})", markup=False)

    def _check_answers(self, address: str, what: str) -> None:
        """Raise ClusterStartError unless HOST:PORT accepts a TCP connection within
        CONNECT_TIMEOUT_S (tried in WAIT_SLICE_S slices, so Ctrl-C is heard)."""
        host_port = address.split("://", 1)[-1].rstrip("/")
        host, sep, port = host_port.rpartition(":")
        if not sep or not port.isdigit():
            return  # not HOST:PORT: Ray's own message says what it makes of it
        host = host.strip("[]")
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            try:
                with socket.create_connection((host, int(port)), timeout=WAIT_SLICE_S):
                    return
            except OSError as e:
                error = e
            if self._stop_requested.is_set():
                return
            if time.monotonic() >= deadline or not isinstance(error, TimeoutError):
                break
        raise ClusterStartError(
            f"{what}: nothing answers at {host}:{port} ({getattr(error, 'strerror', None) or error}): is Ray "
            "running there (`ray start --head` on that machine; `ray status` there shows it) and is the port "
            "reachable from here? Or set ray.address to auto (the Ray cluster this machine belongs to) or local "
            "(a private one)")

    def _start_nodes(self, timeout_s: float) -> None:
        import ray
        from ray.exceptions import ActorUnavailableError

        cfg = self.config
        router_port = cfg.router.port or _free_ports(1)[0]
        if cfg.router.port:
            _check_ports_free([("router.port", router_port)], host=cfg.router.host)
        self._router_port = router_port
        self._prefix = f"pdcluster-{router_port}"
        specs = [self._node_spec(s.role, s.index) for s in cfg.node_specs(num_gpus=0)]
        if cfg.ray.placement_strategy:
            self._place_group(specs, timeout_s)
            if self._pg is None:  # stopped while waiting
                return
        self.nodes = [ActorNode(s.name, s.role, s, bundle=i if self._pg is not None else None)
                      for i, s in enumerate(specs)]
        for node in self.nodes:
            self._create_actor(node)
        self._names_used = {n.name for n in self.nodes}
        deadline = time.monotonic() + timeout_s
        while not self._stop_requested.is_set():
            waiting = [n for n in self.nodes if n.pending is not None]
            if not waiting:
                return
            refs = {n.pending: n for n in waiting}
            done, _ = ray.wait(list(refs), num_returns=1,
                               timeout=min(WAIT_SLICE_S, max(0.0, deadline - time.monotonic())))
            for node in (refs[ref] for ref in done):
                try:
                    node.info = ray.get(node.pending)
                except ActorUnavailableError:  # Ray is restarting it: ask the new one
                    node.pending = node.handle.info.remote()
                    continue
                except Exception as e:  # noqa: BLE001 - the actor could not start: say why
                    raise ClusterStartError(f"node {node.name} could not start as a Ray actor: {_first_line(e)}"
                                            f"\n(its log is in Ray's logs on its machine: {RAY_LOGS})") from None
                node.pending = None
                node.registered_pid = node.pid
                self.console.print(f"{node.name:<10} on Ray node {node.info['placement']['ray_node_id'][:12]} "
                                   f"({node.info['placement']['ip']}), {node.address}, pid {node.pid}, "
                                   f"{node.info['placement']['device']}", markup=False)
            if time.monotonic() > deadline and any(n.pending is not None for n in self.nodes):
                waiting = ", ".join(f"{n.name} ({self._start_problem(n)})" for n in self.nodes
                                    if n.pending is not None)
                raise ClusterStartError(
                    f"not every node started within {timeout_s:.0f} s: {waiting}. `ray status` shows what the Ray "
                    f"cluster has free; node logs are in Ray's logs on each machine ({RAY_LOGS}); set "
                    "PDCLUSTER_START_TIMEOUT_S to wait longer")

    def _place_group(self, specs: list[NodeSpec], timeout_s: float) -> None:
        """One placement group for the initial nodes, one bundle each (node order). Leaves
        self._pg None when stopped meanwhile."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        strategy = self.config.ray.placement_strategy
        bundles = [_bundle(dict(self.config.roles())[s.role].resources) for s in specs]
        pg = placement_group(bundles, strategy=strategy, name=self._prefix)
        ready = pg.ready()
        deadline = time.monotonic() + timeout_s
        while not self._stop_requested.is_set():
            done, _ = ray.wait([ready], timeout=min(WAIT_SLICE_S, max(0.0, deadline - time.monotonic())))
            if done:
                self._pg = pg
                return
            if time.monotonic() >= deadline:
                remove_placement_group(pg)
                raise ClusterStartError(f"Ray could not place the nodes as one {strategy} placement group within "
                                        f"{timeout_s:.0f} s (bundles {bundles}): does the Ray cluster have machines "
                                        "with those resources? `ray status` shows them")
        remove_placement_group(pg)

    def _node_spec(self, role: str, index: int) -> NodeSpec:
        """The node's engine settings; its device as the file gives it (auto or cpu), which
        the actor resolves against the GPUs Ray gave it (cluster/ray_actor.py)."""
        settings = dict(self.config.roles())[role]
        spec = self.config.node_spec(role, index, num_gpus=0)
        device = settings.devices[index % len(settings.devices)]
        return NodeSpec(role, index, device, spec.engine, shares_kv=spec.shares_kv)

    def _create_actor(self, node: ActorNode) -> None:
        """A fresh actor for the node (its bundle, if it has one); asks for its info()."""
        import ray

        from cluster.ray_actor import NodeActor
        from engine.node_server import _CACHE_KEYS, _ENGINE_KEYS, _SCHED_KEYS, NodeLaunchSpec  # imports torch

        cfg = self.config
        spec = node.spec
        settings = dict(cfg.roles())[spec.role]
        resources = _bundle(settings.resources) if node.bundle is not None else dict(settings.resources)
        num_cpus = resources.pop("CPU", 0.0)
        num_gpus = resources.pop("GPU", 0.0)
        kv = cfg.kv_transfer_config(spec)
        kv = None if kv is None else kv.model_dump(exclude={"kv_role", "engine_id", "kv_ip", "kv_port"})
        model = cfg.model.path if cfg.model.path.startswith("builtin:") else str(resolve_model(cfg.model.path))
        launch = NodeLaunchSpec(
            node_id=spec.name, role=spec.role, model=model, dtype=cfg.model.dtype, load_format=cfg.model.load_format,
            device=spec.device, port=0, engine={k: v for k, v in spec.engine.model_dump().items()
                                                if k in _CACHE_KEYS | _SCHED_KEYS | _ENGINE_KEYS},
            kv_transfer=kv, log_level=cfg.log_level.upper(), cpu_threads=max(1, int(num_cpus)))
        placement: dict[str, Any] = {"resources": settings.resources}
        options = dict(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources, max_restarts=cfg.ray.max_restarts,
                       runtime_env={"env_vars": {CLUSTER_KEY_ENV: self._cluster_key_text}},
                       max_task_retries=0, max_concurrency=4, name=f"{self._prefix}-{spec.name}",
                       namespace=cfg.ray.namespace)
        if node.bundle is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self._pg, node.bundle)
            placement |= {"placement_group": self._pg.id.hex(), "bundle": node.bundle}
        node.handle = ray.remote(NodeActor).options(**options).remote(
            msgspec.json.encode(launch).decode(), spec.kv_role, placement)
        node.info, node.registered_pid = {}, 0
        node.pending = node.handle.info.remote()
        node.created_at = time.monotonic()
        node.start_deadline = node.created_at + self._start_timeout_s

    def _start_router(self) -> None:
        from router.spec import NodeAddress

        cfg = self.config
        model_dir = resolve_model(cfg.model.path)
        spec = router_launch_spec(cfg, self._router_port, model_dir,
                                  [NodeAddress(n.name, n.role, n.address, n.pid) for n in self.nodes],
                                  _block_size(cfg.node_specs(0)))
        self.url = f"http://{_connect_host(cfg.router.host)}:{self._router_port}"
        argv = [sys.executable, "-m", "router", "--spec", msgspec.json.encode(spec).decode()]
        env = router_secrets(cfg, {CLUSTER_KEY_ENV: self._cluster_key_text})
        self.router = Child("router", "router", argv, self.run_dir / "router.log", address=self.url, secrets=env)
        self.router.spawn()

    def _wait_ready(self, timeout_s: float) -> None:
        """Until the router reports every node healthy, at the pid of its current actor. An
        actor Ray restarts meanwhile is followed (its new address goes to the router); one
        that is dead for good fails the start at once, naming it."""
        deadline = time.monotonic() + timeout_s
        with self._http() as http:
            registered = False
            while not self._stop_requested.is_set():
                if self.router.exit_code() is not None:
                    raise ClusterStartError(_died_message(self.router, "before the cluster was ready"))
                view = membership.read_membership(http, self.url)
                if view is not None and not registered:
                    for n in self.nodes:  # where each actor is, for `pdcluster status`
                        membership.register(http, self.url, n.name, n.role, n.address, n.pid, n.info["placement"])
                    registered = True
                for node in self.nodes:  # a new address reaches the router once it answers
                    self._follow(node, http, leaving=False, starting=True)
                in_router = {x["id"]: x for x in view["nodes"]} if view is not None else {}
                unready = [n.name for n in self.nodes if not (in_router.get(n.name, {}).get("healthy")
                                                               and in_router[n.name].get("pid") == n.pid)]
                if view is not None and not unready:
                    return
                if time.monotonic() > deadline:
                    what = "the router did not answer" if view is None else f"not healthy: {', '.join(unready)}"
                    raise ClusterStartError(f"the cluster was not ready after {timeout_s:.0f} s ({what}); node logs "
                                            f"are in Ray's logs on each machine ({RAY_LOGS}), the router's in "
                                            f"{self.router.log_path} (set PDCLUSTER_START_TIMEOUT_S to wait longer)")
                self._stop_requested.wait(POLL_INTERVAL_S)

    # --- supervise ----------------------------------------------------------------------
    def supervise(self) -> None:
        """Until request_stop(): follow restarted actors, replace dead ones, apply `pdcluster
        scale`. Raises ClusterFailed when the router dies."""
        with self._http() as http:
            while not self._stop_requested.wait(POLL_INTERVAL_S):
                if self.router.exit_code() is not None:
                    raise ClusterFailed(_died_message(self.router, then="stopping the cluster"))
                view = membership.read_membership(http, self.url)
                draining = {n["id"] for n in view["nodes"] if n["state"] == "draining"} if view else set()
                for node in list(self.nodes):
                    self._follow(node, http, leaving=node.name in draining)
                if view is not None:
                    self._apply(view, http)

    def _follow(self, node: ActorNode, http: httpx.Client, leaving: bool, starting: bool = False) -> None:
        """Poll the actor's info(); a new pid means Ray restarted it: tell the router. An
        actor dead for good leaves the router and waits for a fresh one (during start:
        ClusterStartError)."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError

        if node.pending is None:
            node.pending = node.handle.info.remote()
        done, _ = ray.wait([node.pending], timeout=0)
        if not done:
            return
        ref, node.pending = node.pending, None
        try:
            info = ray.get(ref, timeout=INFO_TIMEOUT_S)
        except ActorUnavailableError:
            return  # being restarted: ask again next tick
        except (ActorDiedError, RayActorError) as e:
            if _actor_state(node.handle).get("State") in ("ALIVE", "RESTARTING", "PENDING_CREATION"):
                return  # Ray is bringing it back: ask again next tick
            why = _first_line(e)
            if starting:
                raise ClusterStartError(
                    f"node {node.name}'s actor died before the cluster was ready, and Ray will not restart it "
                    f"(ray.max_restarts {self.config.ray.max_restarts}): {why}\n(its log is in Ray's logs on its "
                    f"machine: {RAY_LOGS})") from None
            self.nodes.remove(node)
            membership.remove(http, self.url, node.name)
            if leaving:
                self.console.print(f"node {node.name} died while draining: removing it", markup=False)
                self._release_bundle(node)
                return
            self._replace_later(node, why)
            return
        except GetTimeoutError:
            return
        node.info = info
        if node.pid != node.registered_pid:
            self.console.print(f"node {node.name} was restarted by Ray (pid {node.pid}, {node.address}): "
                               "it rejoins the router", markup=False)
            try:
                membership.register(http, self.url, node.name, node.role, node.address, node.pid, info["placement"])
                node.registered_pid = node.pid
            except (httpx.HTTPError, membership.MembershipUnavailable) as e:
                self.console.print(f"node {node.name}: the router did not take its new address yet ({e})",
                                   markup=False)

    def _replace_later(self, node: ActorNode, why: str) -> None:
        """A dead actor Ray will not restart: a fresh one under the same id after a backoff
        (Ray already restarted it max_restarts times at once)."""
        now = time.monotonic()
        while node.replaced and now - node.replaced[0] > RESTART_WINDOW_S:
            node.replaced.popleft()
        delay = min(RESTART_BACKOFF_S * 2 ** len(node.replaced), RESTART_BACKOFF_MAX_S)
        node.handle, node.pending, node.retry_at = None, None, now + delay
        self._waiting.append(node)
        self.console.print(f"node {node.name}'s actor is dead and Ray will not restart it (ray.max_restarts "
                           f"{self.config.ray.max_restarts} used up): {why}; it left the router, and a fresh actor "
                           f"replaces it in {delay:.0f} s (the other nodes keep serving; its log is in Ray's logs "
                           f"on its machine: {RAY_LOGS})", markup=False)

    def _apply(self, view: dict[str, Any], http: httpx.Client) -> None:
        """Reconcile with the router's target: stop the departed, cancel what the target no
        longer needs, register actors that started, start what is missing."""
        now = time.monotonic()
        changes = membership.plan(view, {n.name: n.role for n in self.nodes})
        for name in changes.stop:
            node = next((n for n in self.nodes if n.name == name), None)
            if node is None:
                continue
            self.console.print(f"node {name} left the cluster (drained): stopping its actor", markup=False)
            self.nodes.remove(node)
            self._release_bundle(node)
            self._kill([node])

        pending = [*self._waiting, *self._starting]
        in_router = {n["id"]: n for n in view.get("nodes", [])}
        for node in pending:
            if node.name in in_router:  # a dead node whose removal did not reach the router: again
                membership.remove(http, self.url, node.name)
        members = Counter(n["role"] for i, n in in_router.items()
                          if n.get("state") != "draining" and i not in {p.name for p in pending})
        target = {role: int(view.get("target", {}).get(key, 0)) for key, role in membership.ROLE_OF_TARGET.items()}
        short = {role: max(0, target[role] - members[role]) for role in target}

        # Beyond the target: the waiting go first (nothing runs), then starting actors, newest first.
        for role, want in short.items():
            mine = ([n for n in self._waiting if n.role == role]
                    + sorted((n for n in self._starting if n.role == role), key=lambda n: -n.created_at))
            for node in mine[:max(0, len(mine) - want)]:
                self._cancel(node, f"the target is {role if role != 'both' else 'colocated'}={target[role]}")

        joined: Counter[str] = Counter()
        for node in list(self._starting):
            if self._check_start(node, http, now):
                joined[node.role] += 1

        budget = MAX_STARTS_PER_TICK  # each actor loads a model: the rest at the next ticks
        for node in list(self._waiting):
            if budget and now >= max(node.retry_at, self._role_retry_at.get(node.role, 0.0)):
                if self._start(node, replacing=True):
                    budget -= 1
        for role, want in short.items():
            missing = want - joined[role] - sum(n.role == role for n in (*self._waiting, *self._starting))
            while missing > 0 and budget and now >= self._role_retry_at.get(role, 0.0):
                index = membership.next_index(role, self._names_used)
                node = ActorNode(f"{role}-{index}", role, self._node_spec(role, index))
                free = self._free_bundles.get(role)
                node.bundle = free.pop(0) if free else None
                self._names_used.add(node.name)
                if not self._start(node, replacing=False):
                    break
                missing -= 1
                budget -= 1

    def _start(self, node: ActorNode, replacing: bool) -> bool:
        """Create the node's actor; False when Ray refused (tried again next tick)."""
        try:
            self._create_actor(node)
        except ValueError as e:  # e.g. the dead actor's name is not released yet
            self.console.print(f"node {node.name}: Ray did not create its actor yet ({_first_line(e)})",
                               markup=False)
            if node not in self._waiting:
                self._waiting.append(node)
            return False
        if node in self._waiting:
            self._waiting.remove(node)
        if replacing:
            node.replaced.append(time.monotonic())
        self._starting.append(node)
        where = f" in placement-group bundle {node.bundle}" if node.bundle is not None else ""
        self.console.print(f"node {node.name}: creating its actor{where} (it joins the router once it has loaded "
                           f"its model; at most {self._start_timeout_s:.0f} s)", markup=False)
        return True

    def _check_start(self, node: ActorNode, http: httpx.Client, now: float) -> bool:
        """A starting actor: register it once it reports (True); a failed start or one past
        its deadline backs off its role."""
        import ray
        from ray.exceptions import ActorUnavailableError

        if node.pending is not None:
            done, _ = ray.wait([node.pending], timeout=0)
            if done:
                ref, node.pending = node.pending, None
                try:
                    node.info = ray.get(ref)
                except ActorUnavailableError:  # Ray restarts it: ask the new one
                    node.pending = node.handle.info.remote()
                except Exception as e:  # noqa: BLE001 - its constructor failed: reported, backed off
                    self._failed_start(node, _first_line(e))
                    return False
        if node.info:
            try:
                membership.register(http, self.url, node.name, node.role, node.address, node.pid,
                                    node.info["placement"])
            except (httpx.HTTPError, membership.MembershipUnavailable) as e:
                self.console.print(f"node {node.name}: the router did not take it yet ({e})", markup=False)
            else:
                self._starting.remove(node)
                node.registered_pid = node.pid
                self.nodes.append(node)
                self._role_failures.pop(node.role, None)
                self._role_retry_at.pop(node.role, None)
                self.console.print(f"node {node.name} joins from Ray node "
                                   f"{node.info['placement']['ray_node_id'][:12]} at {node.address} "
                                   f"(pid {node.pid}, {node.info['placement']['device']})", markup=False)
                return True
        if now > node.start_deadline:
            self._failed_start(node, f"not started {self._start_timeout_s:.0f} s after its actor was created: "
                                     f"{self._start_problem(node)}")
        return False

    def _failed_start(self, node: ActorNode, why: str) -> None:
        """Kill the actor; the node waits, and no node of its role starts, until the backoff ends."""
        self._kill_now([node])
        self._starting.remove(node)
        now = time.monotonic()
        failures = self._role_failures.setdefault(node.role, deque())
        while failures and now - failures[0] > RESTART_WINDOW_S:
            failures.popleft()
        failures.append(now)
        delay = min(RESTART_BACKOFF_S * 2 ** (len(failures) - 1), RESTART_BACKOFF_MAX_S)
        self._role_retry_at[node.role] = node.retry_at = now + delay
        self._waiting.append(node)
        self.console.print(f"node {node.name} could not start: {why}; trying again in {delay:.0f} s (no "
                           f"{node.role} node starts before then; the others keep serving; Ray's logs on its "
                           f"machine: {RAY_LOGS})", markup=False)

    def _start_problem(self, node: ActorNode) -> str:
        return _start_problem(node, dict(self.config.roles())[node.role].resources)

    def _cancel(self, node: ActorNode, why: str) -> None:
        if node in self._starting:
            self._kill_now([node])
            self._starting.remove(node)
        else:
            self._waiting.remove(node)
        self._release_bundle(node)
        self.console.print(f"node {node.name}: no longer needed ({why}): cancelling its start", markup=False)

    def _release_bundle(self, node: ActorNode) -> None:
        """A node that leaves for good hands its placement-group bundle to the next node of its role."""
        if node.bundle is not None:
            self._free_bundles.setdefault(node.role, []).append(node.bundle)
            self._free_bundles[node.role].sort()
            node.bundle = None

    # --- stop -----------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop_requested.set()

    def stop(self) -> None:
        """Router first (no new requests), then every actor drains and is killed. Idempotent."""
        self._stop_requested.set()
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        if self.router is not None:
            self.router.signal(signal.SIGTERM)
        try:
            import ray
            if ray.is_initialized():  # those that never reported have nothing to drain
                self._kill_now([*self._starting, *(n for n in self.nodes if not n.info)])
                self._kill([n for n in self.nodes if n.info])
        finally:
            if self.router is not None and self.router.proc is not None:
                try:
                    self.router.proc.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    self.router.signal(signal.SIGKILL)
                    self.router.proc.wait()
            import ray
            if ray.is_initialized():
                if self._pg is not None:
                    from ray.util.placement_group import remove_placement_group
                    remove_placement_group(self._pg)
                ray.shutdown()  # a private Ray (address: local) stops with it

    def _kill(self, nodes: list[ActorNode]) -> None:
        """Drain each node (as SIGTERM does to a local one), then remove its actor for good."""
        import ray

        refs = []
        for n in nodes:
            try:
                refs.append(n.handle.drain.remote(STOP_GRACE_S))
            except Exception:  # noqa: BLE001 - already gone
                pass
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=STOP_GRACE_S + 2)
        self._kill_now(nodes)

    @staticmethod
    def _kill_now(nodes: list[ActorNode]) -> None:
        """Remove the actors for good, without draining (they never served, or have drained)."""
        import ray

        for n in nodes:
            if n.handle is None:
                continue
            try:
                ray.kill(n.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
            n.handle, n.pending = None, None

    def cluster_view(self, http: httpx.Client) -> dict[str, dict[str, Any]] | None:
        try:
            r = http.get(f"{self.url}/cluster")
            r.raise_for_status()
            return {n["id"]: n for n in r.json().get("nodes", [])}
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(timeout=httpx.Timeout(5.0, connect=2.0), headers=headers, trust_env=False)

    def __enter__(self) -> RayCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _bundle(resources: dict[str, float]) -> dict[str, float]:
    """A role's resources as a placement-group bundle, which Ray wants non-empty."""
    bundle = {k: v for k, v in resources.items() if v > 0}
    return bundle or {"CPU": 0.01}


def _actor_state(handle: Any) -> dict[str, Any]:
    """Ray's record of an actor (State: PENDING_CREATION, ALIVE, RESTARTING, DEAD; Pid 0
    while Ray has not placed it), {} when it cannot be read. Ray-internal (there is no
    public call that works without the dashboard): used to explain, and to double-check a
    death before acting on it, never as the only evidence."""
    if handle is None:
        return {}
    try:
        from ray._private import state
        return state.actors(handle._actor_id.hex()) or {}
    except Exception:  # noqa: BLE001 - an older or newer Ray: no details
        return {}


def _start_problem(node: ActorNode, resources: dict[str, float]) -> str:
    """Why a starting actor has not reported: not placed (which resources), or still loading."""
    state = _actor_state(node.handle)
    if state.get("State") == "PENDING_CREATION" and not state.get("Pid"):
        bundle = f" in placement-group bundle {node.bundle}" if node.bundle is not None else ""
        return (f"Ray could not place it{bundle}: no Ray node has the resources its role asks for free"
                f"{' (' + str(resources) + ')' if resources else ''}")
    if state.get("Pid"):
        return f"placed (pid {state['Pid']}) but it did not finish loading its model"
    return "Ray did not report it placed"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    # Ray wraps the actor's exception: its last line is the one that says what went wrong.
    line = lines[-1] if lines else type(e).__name__
    # A dead worker's line goes on with Ray's generic advice (OOM killer, `ray stop`, ...).
    return line.split(" Some common causes include:")[0]
