"""`pdcluster up` with `backend: ray`: the nodes are Ray actors (cluster/ray_actor.py)
placed by each role's `resources`, on whatever machines the Ray cluster has; the router
runs here, as a child process of the launcher, exactly as with backend local.

Why the router is not an actor: it is the cluster's front door, and `router.host/port`
name an address on the machine where the operator runs `pdcluster up`; it needs no
accelerator, and keeping it a local child keeps one code path (and one log file) for
both backends. It reaches the nodes over ZeroMQ at the addresses they advertise.

    RayCluster(config)
        .start()      ray.init (auto: join; local: start a private Ray), one actor per node,
                      wait for each to load its model, start the router, wait for /cluster
        .supervise()  Ray restarts a dead actor (max_restarts); the launcher sees its new
                      address in info() and re-registers it with the router; `pdcluster
                      scale` adds and retires actors (cluster/membership.py)
        .stop()       router first, then every actor drains and is killed (no_restart);
                      disconnect from Ray (a private Ray is shut down)

Every actor is named `<namespace>/pdcluster-<router port>-<node id>` in `ray.namespace`,
and owned by this launcher's Ray job: if the launcher dies, Ray removes its actors too.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import zmq
from rich.console import Console

from cluster import membership
from cluster.config import ClusterConfig, NodeSpec
from cluster.launcher import (DEFAULT_START_TIMEOUT_S, POLL_INTERVAL_S, STOP_GRACE_S, Child,
                              ClusterFailed, ClusterStartError, _block_size, _check_ports_free, _connect_host,
                              _default_run_dir, _died_message, _free_ports, resolve_model, router_launch_spec,
                              router_secrets)
from kv_connector.cluster_key import ENV_VAR as CLUSTER_KEY_ENV
from kv_connector.cluster_key import ClusterKey

INFO_TIMEOUT_S = 2.0


@dataclass(slots=True)
class ActorNode:
    """One node's actor, and what it last said about itself."""

    name: str
    role: str
    spec: NodeSpec
    handle: Any                                  # ray.actor.ActorHandle
    info: dict[str, Any] = field(default_factory=dict)
    pending: Any = None                          # an info() call in flight (ObjectRef)
    registered_pid: int = 0                      # the incarnation the router knows

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
        self.nodes: list[ActorNode] = []
        self.router: Child | None = None
        self.url = ""
        self._stop_requested = threading.Event()
        self._stopped = False
        self._ray_started_here = False
        self._names_used: set[str] = set()
        self._starting: list[ActorNode] = []     # actors created for `scale`, not yet registered
        self._prefix = ""
        self._cluster_key_text = ""   # set by _connect()
        self._pg = None                          # the initial nodes' placement group (ray.placement_strategy)

    @property
    def api_key(self) -> str | None:
        return self.config.router.api_key

    @property
    def children(self) -> list[Any]:
        return [*self.nodes, *([self.router] if self.router else [])]

    # --- start ----------------------------------------------------------------------
    def start(self, timeout_s: float | None = None) -> None:
        if timeout_s is None:
            timeout_s = float(os.environ.get("PDCLUSTER_START_TIMEOUT_S", DEFAULT_START_TIMEOUT_S))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        try:
            self._connect()
            self._start_nodes(timeout_s)
            self._start_router()
            self._wait_ready(timeout_s)
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

    def _start_nodes(self, timeout_s: float) -> None:
        import ray

        cfg = self.config
        router_port = cfg.router.port or _free_ports(1)[0]
        if cfg.router.port:
            _check_ports_free([("router.port", router_port)], host=cfg.router.host)
        self._router_port = router_port
        self._prefix = f"pdcluster-{router_port}"
        specs = [NodeSpec(s.role, s.index, "auto", s.engine, shares_kv=s.shares_kv)
                 for s in cfg.node_specs(num_gpus=0)]
        if cfg.ray.placement_strategy:
            self._place_group(specs, timeout_s)
        self.nodes = [self._create_actor(s, bundle=i if self._pg is not None else None) for i, s in enumerate(specs)]
        self._names_used = {n.name for n in self.nodes}
        refs = {n.handle.info.remote(): n for n in self.nodes}
        deadline = time.monotonic() + timeout_s
        pending = list(refs)
        while pending and not self._stop_requested.is_set():
            done, pending = ray.wait(pending, num_returns=1, timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            for ref in done:
                node = refs[ref]
                try:
                    node.info = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - the actor could not start: say why
                    raise ClusterStartError(f"node {node.name} could not start as a Ray actor: {_first_line(e)}"
                                            f"\n(its log is in Ray's logs on its machine: "
                                            f"/tmp/ray/session_latest/logs)") from None
                node.registered_pid = node.pid
                self.console.print(f"{node.name:<10} on Ray node {node.info['placement']['ray_node_id'][:12]} "
                                   f"({node.info['placement']['ip']}), {node.address}", markup=False)
            if pending and time.monotonic() > deadline:
                waiting = ", ".join(refs[r].name for r in pending)
                raise ClusterStartError(
                    f"not every node started within {timeout_s:.0f} s (waiting for {waiting}): does the Ray cluster "
                    "have the resources they ask for? `ray status` shows what is free; set "
                    "PDCLUSTER_START_TIMEOUT_S to wait longer")

    def _place_group(self, specs: list[NodeSpec], timeout_s: float) -> None:
        """One placement group for the initial nodes, one bundle each (node order)."""
        import ray
        from ray.util.placement_group import placement_group

        strategy = self.config.ray.placement_strategy
        bundles = [_bundle(dict(self.config.roles())[s.role].resources) for s in specs]
        self._pg = placement_group(bundles, strategy=strategy, name=self._prefix)
        done, _ = ray.wait([self._pg.ready()], timeout=timeout_s)
        if not done:
            raise ClusterStartError(f"Ray could not place the nodes as one {strategy} placement group within "
                                    f"{timeout_s:.0f} s (bundles {bundles}): does the Ray cluster have machines "
                                    "with those resources? `ray status` shows them")

    def _create_actor(self, spec: NodeSpec, bundle: int | None = None) -> ActorNode:
        import ray

        from cluster.ray_actor import NodeActor
        from engine.node_server import _CACHE_KEYS, _ENGINE_KEYS, _SCHED_KEYS, NodeLaunchSpec  # imports torch

        cfg = self.config
        settings = dict(cfg.roles())[spec.role]
        resources = _bundle(settings.resources) if bundle is not None else dict(settings.resources)
        num_cpus = resources.pop("CPU", 0.0)
        num_gpus = resources.pop("GPU", 0.0)
        kv = cfg.kv_transfer_config(spec)
        kv = None if kv is None else kv.model_dump(exclude={"kv_role", "engine_id", "kv_ip", "kv_port"})
        model = cfg.model.path if cfg.model.path.startswith("builtin:") else str(resolve_model(cfg.model.path))
        launch = NodeLaunchSpec(
            node_id=spec.name, role=spec.role, model=model, dtype=cfg.model.dtype, load_format=cfg.model.load_format,
            device="auto", port=0, engine={k: v for k, v in spec.engine.model_dump().items()
                                            if k in _CACHE_KEYS | _SCHED_KEYS | _ENGINE_KEYS},
            kv_transfer=kv, log_level=cfg.log_level.upper(), cpu_threads=max(1, int(num_cpus)))
        placement: dict[str, Any] = {"resources": settings.resources}
        options = dict(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources, max_restarts=cfg.ray.max_restarts,
                       runtime_env={"env_vars": {CLUSTER_KEY_ENV: self._cluster_key_text}},
                       max_task_retries=0, max_concurrency=4, name=f"{self._prefix}-{spec.name}",
                       namespace=cfg.ray.namespace)
        if bundle is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self._pg, bundle)
            placement |= {"placement_group": self._pg.id.hex(), "bundle": bundle}
        handle = ray.remote(NodeActor).options(**options).remote(
            msgspec.json.encode(launch).decode(), spec.kv_role, placement)
        return ActorNode(spec.name, spec.role, spec, handle)

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
                if view is not None and all(x["healthy"] for x in view["nodes"]):
                    return
                if time.monotonic() > deadline:
                    raise ClusterStartError(f"the cluster was not ready after {timeout_s:.0f} s; router log "
                                            f"{self.router.log_path}")
                self._stop_requested.wait(POLL_INTERVAL_S)

    # --- supervise ----------------------------------------------------------------------
    def supervise(self) -> None:
        """Until request_stop(): follow restarted actors, apply `pdcluster scale`. Raises
        ClusterFailed when the router dies or an actor is dead for good."""
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

    def _follow(self, node: ActorNode, http: httpx.Client, leaving: bool) -> None:
        """Poll the actor's info(); a new pid means Ray restarted it: tell the router."""
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
            if leaving:
                self.console.print(f"node {node.name} died while draining: removing it", markup=False)
                membership.remove(http, self.url, node.name)
                self.nodes.remove(node)
                return
            raise ClusterFailed(f"node {node.name}'s actor is dead and Ray will not restart it (max_restarts "
                                f"{self.config.ray.max_restarts} used up?): {_first_line(e)}\n"
                                "stopping the cluster") from None
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

    def _apply(self, view: dict[str, Any], http: httpx.Client) -> None:
        import ray

        live = {n.name: n.role for n in self.nodes}
        changes = membership.plan(view, live)
        for name in changes.stop:
            node = next((n for n in self.nodes if n.name == name), None)
            if node is None:
                continue
            self.console.print(f"node {name} left the cluster (drained): stopping its actor", markup=False)
            self.nodes.remove(node)
            self._kill([node])
        # Actors created for a scale-up count as members while they load.
        for node in self._starting:
            if node.role in changes.start:
                changes.start.remove(node.role)
        for role in changes.start:
            index = membership.next_index(role, self._names_used)
            spec = self.config.node_spec(role, index, num_gpus=0)
            node = self._create_actor(NodeSpec(role, index, "auto", spec.engine, shares_kv=spec.shares_kv))
            self._names_used.add(node.name)
            node.pending = node.handle.info.remote()
            self._starting.append(node)
            self.console.print(f"node {node.name}: creating its actor", markup=False)
        for node in list(self._starting):
            done, _ = ray.wait([node.pending], timeout=0)
            if not done:
                continue
            ref, node.pending = node.pending, None
            self._starting.remove(node)
            try:
                node.info = ray.get(ref)
                membership.register(http, self.url, node.name, node.role, node.address, node.pid,
                                    node.info["placement"])
            except Exception as e:  # noqa: BLE001 - reported; the next check tries again
                self.console.print(f"node {node.name} could not join: {_first_line(e)}", markup=False)
                self._kill([node])
                continue
            node.registered_pid = node.pid
            self.nodes.append(node)
            self.console.print(f"node {node.name} joins from Ray node {node.info['placement']['ray_node_id'][:12]} "
                               f"at {node.address}", markup=False)

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
            if ray.is_initialized():
                self._kill([*self.nodes, *self._starting])
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
        for n in nodes:
            try:
                ray.kill(n.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass

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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    # Ray wraps the actor's exception: its last line is the one that says what went wrong.
    return lines[-1] if lines else type(e).__name__
