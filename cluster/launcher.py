"""`pdcluster up`: the local launcher. Every node and the router run as child processes
of this one, on 127.0.0.1.

    run_up(path)  ->  LocalCluster(config)
                        .start()      pick ports, spawn nodes + router, wait for /cluster
                        .supervise()  restart a node that dies, stop on a signal
                        .stop()       SIGTERM everything, SIGKILL what is left after 15 s

Nothing may outlive the launcher. Three layers make sure of it:
  * every child asks Linux to SIGTERM it when the launcher dies (engine/process.py's
    die_with_parent), which covers a launcher killed with SIGKILL;
  * `stop()` runs from a `finally` and from atexit;
  * children run in their own session, so a Ctrl-C in the terminal reaches only the
    launcher, which then stops them in order instead of racing their own handlers.

Caveat for programmatic use (tests, bench/): Linux ties the parent-death signal to the
*thread* that forked the child, so call `start()` (and `supervise()`, which may fork
replacements) from a thread that outlives the cluster, normally the main thread.

Output: children write to log files in a run folder ($PDCLUSTER_RUN_DIR, else a fresh
temp folder), so the terminal shows only the launcher's own lines.

Secrets: a fresh cluster key (kv_connector/cluster_key.py: CURVE on every internal socket) and
the router's API key reach the children in their environment, never in argv, which any
local user can read with `ps`.

Restarts: a node that dies is restarted at once, up to MAX_RESTARTS times within
RESTART_WINDOW_S; beyond that each further restart waits longer (RESTART_BACKOFF_S,
doubling) while the rest of the cluster keeps serving. A restarted or newly added node
that dies again, or is not healthy within the start timeout, counts as one more restart:
it backs off the same way. Only a node of the first start that never becomes healthy, or
a dead router, stops the cluster: neither a client crashing one node repeatedly nor a
scale-up that cannot start (no such GPU, out of memory) takes a serving cluster down.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import zmq
from rich.console import Console

from cluster import membership
from cluster.config import ClusterConfig, ClusterConfigError, NodeSpec, load_cluster_config
from engine.process import LAUNCHER_PID_ENV
from kv_connector.cluster_key import ENV_VAR as CLUSTER_KEY_ENV
from kv_connector.cluster_key import ClusterKey

LOCALHOST = "127.0.0.1"
DEFAULT_START_TIMEOUT_S = 300.0
STOP_GRACE_S = 15.0          # SIGTERM, then this long to drain, then SIGKILL
MAX_RESTARTS = 3             # per node, within RESTART_WINDOW_S, at once; then with backoff
RESTART_WINDOW_S = 600.0
RESTART_BACKOFF_S = 5.0      # the first delayed restart; doubles, up to RESTART_BACKOFF_MAX_S
RESTART_BACKOFF_MAX_S = 300.0
MAX_STARTS_PER_TICK = 4      # nodes a scale-up starts at once (each loads a model)
POLL_INTERVAL_S = 0.5
LOG_TAIL_LINES = 20

_NODE_MODULES = {"prefill": ["-m", "prefill_node"], "decode": ["-m", "decode_node"],
                 "both": ["-m", "decode_node", "--colocated"]}


class ClusterStartError(RuntimeError):
    """The cluster did not become ready; the message says which child and why (with the
    tail of its log). Everything has been stopped by the time this is raised."""


class ClusterFailed(RuntimeError):
    """A running cluster could not be kept up (router died, a node exceeded its restarts)."""


# --- one child process ------------------------------------------------------------------
@dataclass(slots=True)
class Child:
    """A node or the router: how to start it, where it logs, and its current process."""

    name: str                               # prefill-0, decode-0, both-0, router
    role: str                               # prefill | decode | both | router
    argv: list[str]
    log_path: Path
    address: str = ""                       # a node's ZeroMQ endpoint; the router's URL
    device: str = ""                        # a node's: cpu, cuda:N
    proc: subprocess.Popen | None = None
    restarts: deque[float] = field(default_factory=deque)  # monotonic times of restarts
    restarting: bool = False                # restarted and not yet seen healthy
    restart_deadline: float = 0.0           # monotonic; while restarting, healthy by then or give up
    restart_at: float = 0.0                 # monotonic; a backed-off restart waits until then
    secrets: dict[str, str] = field(default_factory=dict, repr=False)  # extra environment, never argv

    def spawn(self) -> None:
        # Append: a restarted node's log follows its previous life, with a marker between.
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name} ===\n".encode())
            log.flush()
            env = {**os.environ, **self.secrets, LAUNCHER_PID_ENV: str(os.getpid())}  # see die_with_parent
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, close_fds=True, env=env)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def exit_code(self) -> int | None:
        """None while running (or never started)."""
        return None if self.proc is None else self.proc.poll()

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signum)
            except ProcessLookupError:
                pass

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode("utf-8", "replace")
        except OSError as e:
            return f"(cannot read {self.log_path}: {e})"
        return "\n".join(text.splitlines()[-lines:])

    def describe_exit(self) -> str:
        code = self.exit_code()
        if code is not None and code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with code {code}"


# --- the cluster ---------------------------------------------------------------------------
def router_launch_spec(cfg: ClusterConfig, port: int, model_dir: Path, nodes: list, block_size: int):
    """The router's spec from cluster.yaml, for every backend. The API key is not in it
    (specs travel in argv, which every local user can read): see router_secrets()."""
    from router.spec import RouterLaunchSpec

    so = cfg.structured_outputs
    return RouterLaunchSpec(
        host=cfg.router.host, port=port, model_dir=str(model_dir), served_model_name=cfg.model.path,
        nodes=nodes, policy=cfg.router.policy,
        api_key=None, protect_admin_endpoints=cfg.router.protect_admin_endpoints,
        max_concurrent_requests=cfg.router.max_concurrent_requests,
        max_request_body_bytes=cfg.router.max_request_body_bytes, node_timeout_s=cfg.router.node_timeout_s,
        load_failure_policy=cfg.kv_transfer.load_failure_policy, block_size=block_size,
        max_model_len=cfg.engine.max_model_len, log_level=cfg.log_level, dispatch_to_both=cfg.router.dispatch_to_both,
        generation_config=cfg.model.generation_config,
        structured_outputs_backend=so.backend, disable_any_whitespace=so.disable_any_whitespace,
        disable_additional_properties=so.disable_additional_properties, reasoning_parser=so.reasoning_parser,
        enable_in_reasoning=so.enable_in_reasoning, tool_call_parser=cfg.router.tool_call_parser,
        disaggregation_mode=cfg.router.disaggregation.mode, colocated_share_kv=cfg.colocated_share_kv,
        max_local_prefill_tokens=cfg.router.disaggregation.max_local_prefill_tokens,
        max_prefill_queue=cfg.router.disaggregation.max_prefill_queue)


def router_secrets(cfg: ClusterConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """The router's extra environment: the cluster key (when nodes have it) and the API key."""
    from router.spec import API_KEY_ENV

    return {**(base or {}), **({API_KEY_ENV: cfg.router.api_key} if cfg.router.api_key else {})}


class LocalCluster:
    """A whole topology as local processes: nodes from `config.node_specs()` plus a router.

        with LocalCluster(config) as cluster:   # start(): returns once every node is healthy
            httpx.post(cluster.url + "/v1/completions", ...)

    `start()` raises ClusterStartError (after stopping everything) when a child exits or
    the timeout passes first. `supervise()` blocks until `request_stop()` or a failure.
    """

    def __init__(self, config: ClusterConfig, run_dir: Path | None = None, console: Console | None = None):
        if config.backend != "local":
            raise ValueError(f"backend {config.backend!r}: LocalCluster runs backend local only")
        self.config = config
        self.run_dir = Path(run_dir) if run_dir else _default_run_dir()
        self.console = console or Console(stderr=True, soft_wrap=True, highlight=False)
        self.nodes: list[Child] = []
        self.router: Child | None = None
        self.model_dir: Path | None = None
        self.url = ""                        # http://HOST:PORT of the router, set by start()
        self.cluster_key: ClusterKey | None = None   # set by start(); None where libzmq has no CURVE
        self._stop_requested = threading.Event()
        self._node_secrets: dict[str, str] = {}        # environment every node gets (the cluster key)
        self._retired: list[tuple[Child, float]] = []   # nodes stopped after draining: (child, kill deadline)
        self._names_used: set[str] = set()             # node ids ever used (never reused)
        self._stopped = False
        self._atexit_registered = False

    # --- public ---------------------------------------------------------------------------
    @property
    def children(self) -> list[Child]:
        return [*self.nodes, *([self.router] if self.router else [])]

    @property
    def api_key(self) -> str | None:
        return self.config.router.api_key

    def start(self, timeout_s: float | None = None) -> None:
        """Resolve the model, pick ports, spawn every node and the router, and wait until
        the router reports every node healthy. Stops everything before raising."""
        if timeout_s is None:
            timeout_s = _start_timeout_s()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.model_dir = resolve_model(self.config.model.path)
            self._plan()
            if not self._atexit_registered:
                atexit.register(self.stop)
                self._atexit_registered = True
            self._spawn_all()
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout_s: float) -> None:
        """Poll the router's /cluster until every node is healthy; fail as soon as a child
        exits. Returns early (without error) if `request_stop()` was called."""
        deadline = time.monotonic() + timeout_s
        with self._http() as http:
            while not self._stop_requested.is_set():
                dead = next((c for c in self.children if c.exit_code() is not None), None)
                if dead is not None:
                    raise ClusterStartError(_died_message(dead, "before the cluster was ready"))
                nodes = self.cluster_view(http)
                if nodes is not None and all(nodes.get(c.name, {}).get("healthy") for c in self.nodes):
                    return
                if time.monotonic() > deadline:
                    waiting = [c.name for c in self.nodes if not (nodes or {}).get(c.name, {}).get("healthy")]
                    what = "the router did not answer" if nodes is None else f"not healthy: {', '.join(waiting)}"
                    raise ClusterStartError(
                        f"the cluster was not ready after {timeout_s:.0f} s ({what}); logs are in {self.run_dir} "
                        "(set PDCLUSTER_START_TIMEOUT_S to wait longer)")
                self._stop_requested.wait(POLL_INTERVAL_S)

    def supervise(self) -> None:
        """Keep the cluster up until `request_stop()`: restart a node that dies (same spec,
        same ports; the router's sockets reconnect), at once up to MAX_RESTARTS times per
        node within RESTART_WINDOW_S, then with a growing delay. Raises ClusterFailed when
        the router dies. Does not stop anything: the caller does (run_up in its `finally`)."""
        with self._http() as http:
            while not self._stop_requested.wait(POLL_INTERVAL_S):
                assert self.router is not None
                if self.router.exit_code() is not None:
                    raise ClusterFailed(_died_message(self.router, then="stopping the cluster"))
                # Health first: a node that came up and died within one tick counts as up once.
                if any(n.restarting for n in self.nodes):
                    self._check_restarted(http)
                changes = self._membership_changes(http)
                for node in list(self.nodes):
                    if node.exit_code() is None:
                        continue
                    if changes is not None and (node.name in changes.draining or node.name in changes.stop):
                        # It was leaving anyway (or the router already let it go: a node down while
                        # draining departs without draining): let the router forget it; no restart.
                        self.console.print(f"node {node.name} {node.describe_exit()} while draining: "
                                           "removing it", markup=False)
                        membership.remove(http, self.url, node.name)
                        self.nodes.remove(node)
                    else:
                        self._restart(node)
                if changes is not None:
                    self._apply(changes, http)
                self._reap_retired()

    def request_stop(self) -> None:
        """Ask start()/supervise() to return soon (safe from a signal handler)."""
        self._stop_requested.set()

    def stop(self) -> None:
        """SIGTERM every child (router first: no new requests while nodes drain), wait up to
        STOP_GRACE_S, then SIGKILL whatever is left. Idempotent."""
        self._stop_requested.set()
        if self._stopped:
            return
        self._stopped = True
        if self._atexit_registered:
            atexit.unregister(self.stop)
            self._atexit_registered = False
        children = [*([self.router] if self.router else []), *self.nodes]
        for child in children:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._reap_retired(wait=True)
        for child in children:
            if child.proc is not None and child.exit_code() is None:  # None: never started (start() failed first)
                self.console.print(f"{child.name} (pid {child.pid}) did not stop within {STOP_GRACE_S:.0f} s: "
                                   "killing it", markup=False)
                child.signal(signal.SIGKILL)
                child.proc.wait()

    def cluster_view(self, http: httpx.Client) -> dict[str, dict[str, Any]] | None:
        """The router's GET /cluster as {node id: node}, or None when it does not answer."""
        try:
            r = http.get(f"{self.url}/cluster")
            r.raise_for_status()
            return {n["id"]: n for n in r.json().get("nodes", [])}
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- internals ------------------------------------------------------------------------
    def _plan(self) -> None:
        """Build every child's argv: ports picked, specs written as JSON."""
        from router.spec import NodeAddress

        cfg = self.config
        specs = cfg.node_specs()
        missing = cfg.devices_not_here(specs)
        if missing:
            raise ClusterConfigError(missing)
        specs = cfg.share_gpus(specs)
        secrets: dict[str, str] = {}
        if zmq.has("curve"):
            self.cluster_key = ClusterKey.generate()
            secrets[CLUSTER_KEY_ENV] = self.cluster_key.encode()
        else:
            self.console.print("warning: this libzmq has no CURVE support: the nodes' sockets are not "
                               "authenticated (any local process can send them requests)", markup=False)
        self._node_secrets = secrets
        idle = cfg.idle_colocated_nodes()
        if idle:
            self.console.print(f"warning: {idle}", markup=False)
        shared = cfg.kv_nodes_sharing_a_gpu(specs)
        if shared:
            self.console.print(f"warning: {shared}: NIXL (UCX) moves KV between processes of one GPU at about 0.5 "
                               "GB/s (a 4k-token 8B prompt: over a second); set kv_transfer.connector: cuda_ipc "
                               "for nodes that share a GPU", markup=False)
        # CPU nodes share the cores: without a limit each torch would start one thread per
        # core and they would thrash each other.
        cpu_threads = max(1, (os.cpu_count() or 1) // max(sum(s.device == "cpu" for s in specs), 1))
        _check_ports_free([(f"{s.name} port", s.port) for s in specs if s.port]
                          + [(f"{s.name} kv_port", s.kv_port) for s in specs if s.kv_port])
        free = iter(_free_ports(sum((s.port == 0) + (s.kv_role is not None and s.kv_port == 0) for s in specs)
                                + (cfg.router.port == 0)))
        self._cpu_threads = cpu_threads
        self.nodes = []
        for s in specs:
            port = s.port or next(free)
            kv_port = s.kv_port or (next(free) if s.kv_role is not None else 0)
            self.nodes.append(self._node_child(s, port, kv_port))

        self._names_used = {n.name for n in self.nodes}
        router_port = cfg.router.port or next(free)
        # Port 0 too: it checks that router.host is an address of this machine.
        _check_ports_free([("router.port", cfg.router.port)], host=cfg.router.host, host_field="router.host")
        spec = router_launch_spec(cfg, router_port, self.model_dir,
                                  [NodeAddress(n.name, n.role, n.address, 0) for n in self.nodes], _block_size(specs))
        self.url = f"http://{_connect_host(cfg.router.host)}:{router_port}"
        self.router = Child("router", "router", [], self.run_dir / "router.log", address=self.url,
                            secrets=router_secrets(cfg, secrets))
        self._router_spec = spec

    def _node_child(self, s: NodeSpec, port: int, kv_port: int) -> Child:
        """A node's Child: its NodeLaunchSpec as JSON on the command line."""
        from engine.node_server import _CACHE_KEYS, _ENGINE_KEYS, _SCHED_KEYS, NodeLaunchSpec  # imports torch

        cfg = self.config
        kv = cfg.kv_transfer_config(s, kv_ip=LOCALHOST, kv_port=kv_port)
        # The node fills in its role, and draws a fresh engine_id at every (re)start, so
        # consumers notice a restarted producer.
        kv = None if kv is None else kv.model_dump(exclude={"kv_role", "engine_id"})
        spec = NodeLaunchSpec(
            node_id=s.name, role=s.role, model=str(self.model_dir), dtype=cfg.model.dtype,
            load_format=cfg.model.load_format, device=s.device, host=LOCALHOST, port=port,
            engine={k: v for k, v in s.engine.model_dump().items() if k in _CACHE_KEYS | _SCHED_KEYS | _ENGINE_KEYS},
            kv_transfer=kv, log_level=cfg.log_level.upper(),
            cpu_threads=self._cpu_threads if s.device == "cpu" else 0)
        argv = [sys.executable, *_NODE_MODULES[s.role], "--spec", msgspec.json.encode(spec).decode()]
        return Child(s.name, s.role, argv, self.run_dir / f"{s.name}.log", address=f"tcp://{LOCALHOST}:{port}",
                     device=s.device, secrets=self._node_secrets)

    def _spawn_all(self) -> None:
        """Nodes first (their pids go into the router's spec for /cluster), then the router."""
        for node in self.nodes:
            node.spawn()
        self._router_spec.nodes = [msgspec.structs.replace(a, pid=n.pid)
                                   for a, n in zip(self._router_spec.nodes, self.nodes)]
        self.router.argv = [sys.executable, "-m", "router", "--spec", msgspec.json.encode(self._router_spec).decode()]
        self.router.spawn()

    # --- membership while serving (`pdcluster scale`) -------------------------------------
    def _membership_changes(self, http: httpx.Client) -> membership.MembershipPlan | None:
        view = membership.read_membership(http, self.url)
        return None if view is None else membership.plan(view, {n.name: n.role for n in self.nodes})

    def _apply(self, changes: membership.MembershipPlan, http: httpx.Client) -> None:
        """Start the nodes the target asks for and register them; stop the departed."""
        for name in changes.stop:
            node = next((n for n in self.nodes if n.name == name), None)
            if node is None:
                continue
            self.console.print(f"node {name} left the cluster (drained): stopping it (pid {node.pid})", markup=False)
            node.signal(signal.SIGTERM)
            self.nodes.remove(node)
            self._retired.append((node, time.monotonic() + STOP_GRACE_S))
        for role in changes.start[:MAX_STARTS_PER_TICK]:  # the rest at the next ticks
            index = membership.next_index(role, self._names_used)
            spec = self.config.node_spec(role, index, busy=[n.device for n in self.nodes])
            port, kv_port = _free_ports(2)
            node = self._node_child(spec, port, kv_port if spec.kv_role is not None else 0)
            self._names_used.add(node.name)
            node.spawn()
            self._expect_healthy(node, time.monotonic())
            self.nodes.append(node)
            try:
                membership.register(http, self.url, node.name, role, node.address, node.pid)
            except (httpx.HTTPError, membership.MembershipUnavailable) as e:
                self.console.print(f"node {node.name}: could not register it with the router ({e}): "
                                   "stopping it; the next check tries again", markup=False)
                node.signal(signal.SIGTERM)
                self.nodes.remove(node)
                self._retired.append((node, time.monotonic() + STOP_GRACE_S))
                continue
            self.console.print(f"node {node.name} starting (pid {node.pid}, {node.address}); the router uses it "
                               f"once it is healthy; log {node.log_path}", markup=False)

    def _reap_retired(self, wait: bool = False) -> None:
        """Collect stopped nodes; SIGKILL one that outlived its grace period."""
        for entry in list(self._retired):
            node, deadline = entry
            if wait and node.proc is not None:
                try:
                    node.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            if node.exit_code() is not None:
                self._retired.remove(entry)
            elif time.monotonic() > deadline:
                node.signal(signal.SIGKILL)
                node.proc.wait()
                self._retired.remove(entry)

    def _restart(self, node: Child) -> None:
        now = time.monotonic()
        while node.restarts and now - node.restarts[0] > RESTART_WINDOW_S:
            node.restarts.popleft()
        if len(node.restarts) >= MAX_RESTARTS:
            if node.restart_at == 0.0:
                delay = min(RESTART_BACKOFF_S * 2 ** (len(node.restarts) - MAX_RESTARTS), RESTART_BACKOFF_MAX_S)
                node.restart_at = now + delay
                self.console.print(f"node {node.name} {node.describe_exit()} after {len(node.restarts)} restarts in "
                                   f"the last {RESTART_WINDOW_S / 60:.0f} minutes: restarting it in {delay:.0f} s "
                                   f"(the other nodes keep serving); log {node.log_path}", markup=False)
            if now < node.restart_at:
                return
        node.restart_at = 0.0
        why = node.describe_exit() + (" before it became healthy" if node.restarting else "")
        node.restarts.append(now)
        node.spawn()
        self._expect_healthy(node, now)
        self.console.print(f"node {node.name} {why}: restarting it (pid {node.pid}, restart {len(node.restarts)} in "
                           f"the last {RESTART_WINDOW_S / 60:.0f} minutes; after {MAX_RESTARTS}, restarts back off; "
                           f"log {node.log_path})", markup=False)

    def _check_restarted(self, http: httpx.Client) -> None:
        view = self.cluster_view(http) or {}
        for node in self.nodes:
            if not node.restarting:
                continue
            entry = view.get(node.name, {})
            # The router learns the pid from the node's own stats: a healthy entry with the
            # old pid is the router not having noticed the death yet.
            if entry.get("healthy") and entry.get("pid") == node.pid:
                node.restarting = False
                self.console.print(f"node {node.name} is healthy again (pid {node.pid})", markup=False)
            elif time.monotonic() > node.restart_deadline and node.exit_code() is None:
                self.console.print(f"node {node.name} is not healthy {_start_timeout_s():.0f} s after it started: "
                                   f"killing it (it is restarted as if it had died); log {node.log_path}",
                                   markup=False)
                node.signal(signal.SIGKILL)
                node.proc.wait()

    @staticmethod
    def _expect_healthy(node: Child, now: float) -> None:
        """A node just (re)started: healthy within the start timeout, or it is restarted."""
        node.restarting = True
        node.restart_deadline = now + _start_timeout_s()

    def _http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(timeout=httpx.Timeout(2.0, connect=1.0), headers=headers, trust_env=False)


def run_up(config_path: str | None) -> int:
    """`pdcluster up [CLUSTER_YAML]`. 0: stopped by Ctrl-C/SIGTERM; 1: failed to start or
    could not be kept up; 2: this build cannot run the file (ray backend)."""
    try:
        config = load_cluster_config(config_path) if config_path else ClusterConfig.default()
    except ClusterConfigError as e:
        print(e, file=sys.stderr)
        return 2
    out = Console(soft_wrap=True, highlight=False)
    if config.backend == "ray":
        try:
            from cluster.ray_launcher import RayCluster
        except ImportError as e:
            print(f"pdcluster up: backend ray needs Ray on this machine ({e}): pip install 'pdcluster[ray]'",
                  file=sys.stderr)
            return 2
        cluster = RayCluster(config, console=out)
    else:
        cluster = LocalCluster(config, console=out)
    state_file: Path | None = None
    previous = {s: signal.signal(s, lambda signum, frame: cluster.request_stop())
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        n = len(config.node_specs())
        out.print(f"starting {n} node{'s' * (n != 1)} and the router; logs in {cluster.run_dir}", markup=False)
        spinner = out.status("waiting for the cluster to become healthy...") if out.is_terminal else nullcontext()
        try:
            with spinner:
                cluster.start()
        except (ClusterStartError, OSError, ValueError) as e:
            print(f"pdcluster up: {e}", file=sys.stderr)
            return 1
        if cluster._stop_requested.is_set():
            out.print("stopped before the cluster was ready", markup=False)
            return 0
        _print_ready(out, cluster)
        from cluster.detach import write_state
        state_file = write_state(cluster.url, config.backend, cluster.run_dir)  # for `pdcluster down`
        try:
            cluster.supervise()
        except ClusterFailed as e:
            print(f"pdcluster up: {e}", file=sys.stderr)
            return 1
        out.print("stopping the cluster...", markup=False)
        cluster.stop()
        out.print("stopped", markup=False)
        return 0
    finally:
        cluster.stop()
        if state_file is not None:
            state_file.unlink(missing_ok=True)
        for s, handler in previous.items():
            signal.signal(s, handler)


# --- helpers -----------------------------------------------------------------------------
def resolve_model(path: str) -> Path:
    """`builtin:NAME` -> its directory (made on first use); else the directory, absolute."""
    if path.startswith("builtin:"):
        from engine.builtin_models import resolve_builtin  # imports torch
        return resolve_builtin(path.removeprefix("builtin:"))
    return Path(path).expanduser().resolve()


def _start_timeout_s() -> float:
    return float(os.environ.get("PDCLUSTER_START_TIMEOUT_S", DEFAULT_START_TIMEOUT_S))


def _print_ready(out: Console, cluster) -> None:
    body = json.dumps({"model": cluster.config.model.path, "prompt": "Hello", "max_tokens": 16})
    # The key itself stays out of the output (a detached launcher's goes to a log file).
    auth = ' -H "Authorization: Bearer $PDCLUSTER_API_KEY"' if cluster.api_key else ""
    lines = [f"{c.name:<12} pid {c.pid:<8} {c.address}" for c in cluster.children]
    out.print("\n".join([
        f"pdcluster is ready: {cluster.url}",
        *lines,
        "try:",
        f"  curl {cluster.url}/v1/completions -H 'Content-Type: application/json'{auth} -d '{body}'",
        f"  pdcluster status --url {cluster.url}",
        f"  pdcluster scale --url {cluster.url} prefill=N decode=M",
        "Ctrl-C (or `pdcluster down`) stops the cluster.",
    ]), markup=False)


def _died_message(child: Child, when: str = "", then: str = "") -> str:
    """`decode-0 (pid 12) killed by SIGKILL <when>: <then>; last lines of LOG:` + the tail."""
    what = " ".join(filter(None, [f"{child.name} (pid {child.pid}) {child.describe_exit()}", when]))
    return f"{what}{': ' + then if then else ''}; last lines of {child.log_path}:\n{child.log_tail()}"


def _default_run_dir() -> Path:
    base = os.environ.get("PDCLUSTER_RUN_DIR")
    if base:
        return Path(base).expanduser()
    return Path(tempfile.mkdtemp(prefix="pdcluster-run-"))


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1. All sockets stay open until every port is
    picked, so the kernel cannot hand out the same one twice."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOCALHOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _check_ports_free(ports: list[tuple[str, int]], host: str = LOCALHOST, host_field: str = "") -> None:
    """Fail before spawning anything when a configured port is taken, or when `host` (the
    setting `host_field` names) is no address of this machine: a mistyped address is not
    a port to free."""
    for what, port in ports:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do
            try:
                s.bind((host, port))
            except OSError as e:
                if host_field and (e.errno == errno.EADDRNOTAVAIL or isinstance(e, socket.gaierror)):
                    raise OSError(f"{host_field}: cannot listen on {host}:{port} ({e.strerror or e}): give an "
                                  "address of this machine (127.0.0.1, or 0.0.0.0 for every interface)") from None
                raise OSError(f"{what}: {host}:{port} is not available ({e.strerror}): stop what uses it, "
                              "or set the port to 0 to pick a free one") from None


def _connect_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to `host`."""
    return {"0.0.0.0": LOCALHOST, "": LOCALHOST, "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)


def _block_size(specs: list[NodeSpec]) -> int:
    """The block size the router's prefix index hashes with: the decode nodes' (they hold
    the cache a prefix-aware pick wants to hit), else any node's."""
    serving = [s for s in specs if s.role != "prefill"] or specs
    return serving[0].engine.block_size
