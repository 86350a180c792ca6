"""The router's connection to one serving node: submit requests and receive their
updates, abort, ask for stats. Health comes from those stats answers.

One zmq.asyncio DEALER per node. Sends never queue for an absent node (IMMEDIATE): a
request submitted to a node that is down fails at once instead of running later on a
restarted node that nobody waits for. When a node is declared down (its process is
gone, or it has not answered for `down_after_s`), every request in flight on it gets a
final 503 update, so no client waits on a dead node; those requests are remembered and
aborted on the node if it answers again (a frozen process that wakes up), so they do
not run on for nobody. Updates for requests this router no longer waits for are
answered with an abort (or, for a finished prefill that lent KV, a release).

With a cluster key in the environment the socket is a CURVE client (kv_connector/cluster_key.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque

import msgspec
import zmq
import zmq.asyncio

from engine import node_protocol as proto
from kv_connector.cluster_key import ClusterKey
from router.spec import NodeAddress

log = logging.getLogger(__name__)

PEAK_HISTORY_S = 60.0  # the longest window GET /cluster?peak_window_s= may ask about


class NodeUnavailable(RuntimeError):
    pass


class NodeClient:
    def __init__(self, node: NodeAddress, ctx: zmq.asyncio.Context, down_after_s: float = 5.0,
                 key: ClusterKey | None = None):
        self.id = node.id
        self.role = node.role
        self.address = node.address
        self.pid = node.pid
        self.down_after_s = down_after_s
        self._key = key
        self._abandoned: set[str] = set()  # failed here when the node went down; abort if it comes back
        self._ctx = ctx
        self._sock: zmq.asyncio.Socket | None = None
        self._queues: dict[str, asyncio.Queue[proto.RequestUpdate]] = {}
        self._stats_waiters: list[asyncio.Future[proto.NodeStats]] = []
        self._recv_task: asyncio.Task | None = None
        self.healthy = False
        self.last_stats: proto.NodeStats | None = None
        self.last_seen = 0.0
        self.in_flight = 0  # requests submitted by this router and not finished
        # Requests stopped before their end (client gone, failover), and lent KV freed unread.
        self.aborts_sent = 0
        self.kv_releases_sent = 0
        # (arrival, peak running, peak waiting) of each stats message of the last
        # PEAK_HISTORY_S: peaks over a window any number of readers can ask for.
        self._peaks: deque[tuple[float, int, int]] = deque()
        self.leaving = False  # draining out of the cluster: no new jobs (router/membership.py)
        self.draining = False  # the node itself said it is stopping (SIGTERM): unhealthy, its streams go on

    # --- connection -----------------------------------------------------------------
    def connect(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RCVHWM, 0)  # as the node's SNDHWM: updates wait, none is dropped
        # Nor an abort or a KV release to a node slow to read (a NOBLOCK send past the mark
        # fails, and _send_quietly would drop it): the work would run on, the KV stay held.
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if self._key is not None:
            self._key.connect(sock)
        sock.connect(self.address)
        self._sock = sock
        self._recv_task = asyncio.get_running_loop().create_task(self._recv_loop(sock))

    def _reconnect(self) -> None:
        """Drop the socket (and anything queued in it) and start afresh."""
        if self._recv_task is not None:
            self._recv_task.cancel()
        if self._sock is not None:
            self._sock.close(0)
        self.connect()

    async def _recv_loop(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            try:
                payload = await sock.recv()
            except (asyncio.CancelledError, zmq.ContextTerminated):
                return
            except zmq.ZMQError as e:
                log.warning("node %s: receive failed: %s", self.id, e)
                return
            try:
                msg = proto.decode_from_node(payload)
            except Exception as e:
                log.warning("node %s: undecodable message: %s", self.id, e)
                continue
            self.last_seen = time.monotonic()
            if isinstance(msg, proto.NodeStats):
                self._on_stats(msg)
            for update in proto.updates_in(msg):
                await self._on_update(update)

    async def _on_update(self, msg: proto.RequestUpdate) -> None:
        if msg.finished and msg.finish_reason == "abort" and msg.error is None:
            # The router's own aborts go unanswered (engine/node_server.py), so the
            # node stopped this itself (its drain ran out): lost like a node gone.
            msg.error, msg.error_code = f"node {self.id} aborted the request (it is stopping)", 503
        q = self._queues.get(msg.request_id)
        if q is None:  # a request this router already gave up on: stop it, free what it holds
            await self._forget(msg)
            return
        if msg.finished:
            del self._queues[msg.request_id]
            self.in_flight -= 1
        q.put_nowait(msg)

    def _on_stats(self, msg: proto.NodeStats, now: float | None = None) -> None:
        self.last_stats = msg
        self.pid = msg.pid
        now = time.monotonic() if now is None else now
        self._peaks.append((now, msg.engine.peak_running, msg.engine.peak_waiting))
        while self._peaks[0][0] < now - PEAK_HISTORY_S:
            self._peaks.popleft()
        waiters, self._stats_waiters = self._stats_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(msg)

    async def close(self) -> None:
        if self._recv_task is not None:
            self._recv_task.cancel()
        if self._sock is not None:
            self._sock.close(0)

    async def _forget(self, update: proto.RequestUpdate) -> None:
        if not update.finished:
            await self._send_quietly(proto.AbortRequest(update.request_id))
        elif (update.kv_transfer_params or {}).get("do_remote_prefill"):
            await self._send_quietly(proto.ReleaseKV(update.request_id))

    # --- requests -------------------------------------------------------------------
    async def submit(self, msg: proto.SubmitRequest) -> asyncio.Queue[proto.RequestUpdate]:
        """Send a request; its updates arrive on the returned queue, the last one finished.
        Raises NodeUnavailable, or ValueError for a message that cannot be encoded (a
        value the request validation should have refused)."""
        if not self.healthy:
            raise NodeUnavailable(f"node {self.id} is not healthy")
        try:
            payload = proto.encode(msg)
        except (OverflowError, TypeError, ValueError, msgspec.EncodeError) as e:
            raise ValueError(f"the request cannot be sent to a node: {e}") from None
        q: asyncio.Queue[proto.RequestUpdate] = asyncio.Queue()
        self._queues[msg.request_id] = q
        self.in_flight += 1
        try:
            await self._sock.send(payload, flags=zmq.NOBLOCK)
        except zmq.Again:
            self._queues.pop(msg.request_id, None)
            self.in_flight -= 1
            raise NodeUnavailable(f"node {self.id} at {self.address} is not connected") from None
        return q

    async def abort(self, request_id: str) -> None:
        """Stop a request on the node; no more updates are delivered for it here."""
        if self._queues.pop(request_id, None) is not None:
            self.in_flight -= 1
        self.aborts_sent += 1
        await self._send_quietly(proto.AbortRequest(request_id))

    async def release_kv(self, request_id: str) -> None:
        self.kv_releases_sent += 1
        await self._send_quietly(proto.ReleaseKV(request_id))

    async def producer_down(self, engine_id: str) -> None:
        """Tell this (consumer) node that the producer with this KV engine id is gone."""
        await self._send_quietly(proto.ProducerDown(engine_id))

    async def producer_up(self, engine_id: str) -> None:
        """Tell this (consumer) node that the producer with this KV engine id answers again."""
        await self._send_quietly(proto.ProducerUp(engine_id))

    async def _send_quietly(self, msg) -> None:
        try:
            await self._sock.send(proto.encode(msg), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the node is gone: it has nothing to abort or release any more

    # --- health ---------------------------------------------------------------------
    async def poll_stats(self, timeout_s: float = 2.0) -> proto.NodeStats | None:
        fut: asyncio.Future[proto.NodeStats] = asyncio.get_running_loop().create_future()
        # Drop the waiters of earlier polls that timed out (a dead node answers none).
        self._stats_waiters = [w for w in self._stats_waiters if not w.done()]
        self._stats_waiters.append(fut)
        try:
            await self._sock.send(proto.encode(proto.StatsRequest()), flags=zmq.NOBLOCK)
            return await asyncio.wait_for(fut, timeout_s)
        except (zmq.ZMQError, asyncio.TimeoutError):
            return None

    def _process_gone(self) -> bool:
        # A pid means something only on this machine (a Ray actor elsewhere has its own).
        if not self.pid or not self.address.startswith(("tcp://127.", "tcp://localhost:", "tcp://[::1]:")):
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    async def check_health(self) -> None:
        """One health tick: a stats answer makes the node healthy; a dead process or a
        silence longer than `down_after_s` makes it down, failing what was in flight there."""
        if self.healthy and self._process_gone():
            self.mark_down("process exited")
            return
        stats = await self.poll_stats(timeout_s=min(1.0, self.down_after_s / 2))
        if stats is not None and stats.draining:
            # Stopping (SIGTERM): no new jobs, but what runs there finishes there and its
            # updates still come here; if it exits first, the rest fail over below.
            if not self.draining:
                log.warning("node %s is draining: no new jobs; its %d requests in flight finish there", self.id,
                            len(self._queues))
            self.healthy, self.draining = False, True
            return
        if stats is not None:
            self.draining = False
            if not self.healthy:
                log.info("node %s is healthy (pid %d)", self.id, stats.pid)
            self.healthy = True
            if self._abandoned:  # it was frozen, not dead: stop what nobody waits for any more
                abandoned, self._abandoned = self._abandoned, set()
                log.warning("node %s answers again: aborting the %d requests given up on it", self.id, len(abandoned))
                for rid in abandoned:
                    await self._send_quietly(proto.AbortRequest(rid))
                    await self._send_quietly(proto.ReleaseKV(rid))
            return
        silent = time.monotonic() - self.last_seen > self.down_after_s
        if (self.healthy or self._queues) and (self._process_gone() or silent):
            self.mark_down("stopped answering" if silent else "process exited")

    def mark_down(self, why: str) -> None:
        log.warning("node %s %s: failing its %d requests in flight", self.id, why, len(self._queues))
        self.healthy = False
        queues, self._queues = self._queues, {}
        self._abandoned |= set(queues)
        self.in_flight = 0
        for rid, q in queues.items():
            q.put_nowait(proto.RequestUpdate(rid, finished=True, finish_reason="error", error_code=503,
                                             error=f"node {self.id} {why}"))
        self._reconnect()

    def peaks(self, window_s: float, now: float | None = None) -> tuple[int, int]:
        """The most requests the node ran and queued at any step of the last `window_s`
        seconds (as its stats, each covering the steps since the one before, reported
        them). Reading changes nothing, so a dashboard and the bench can both sample."""
        since = (time.monotonic() if now is None else now) - window_s
        recent = [(r, w) for t, r, w in self._peaks if t >= since]
        return (max((r for r, _ in recent), default=0), max((w for _, w in recent), default=0))

    @property
    def stats_current(self) -> bool:
        """Whether `last_stats` describes the node now: not once it is down (its last stats
        would show phantom load), still while it drains."""
        return self.last_stats is not None and (self.healthy or self.draining)

    @property
    def load(self) -> int:
        """Requests on the node, by this router's count (fresher than the last stats)."""
        return self.in_flight
