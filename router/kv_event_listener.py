"""The router's subscription to one node's KV events, feeding the PrefixIndex.

One asyncio task per node, on the router's event loop. The node reports its PUB and
replay addresses in its stats; `follow()` (called from the health loop) starts a
subscription, or a fresh one when the addresses change (a restarted node binds new
ports). A fresh subscription first asks the replay socket for everything from batch 0,
which is either the node's whole history or a snapshot (engine/kv_events.py), so the
index is exact from the start. Afterwards, a gap in the sequence numbers is filled by
replay (a replay socket that does not answer ends the subscription: the node's entry is
emptied until the next follow() subscribes afresh), and a sequence that starts again at 0
means the node restarted on the same address: its entry is emptied and rebuilt. (A
restarted node's batch 0 is often gone before the subscription reconnects; the router's
health loop also notices the new pid in the node's stats and resubscribes from a
snapshot, router/app.py.)
"""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio

from engine.kv_events import DEFAULT_TOPIC, END_OF_REPLAY, KVEventBatch, decode_batch, seq_bytes
from router.prefix_index import PrefixIndex

log = logging.getLogger(__name__)

REPLAY_TIMEOUT_S = 2.0


class KVEventListener:
    def __init__(self, node_id: str, index: PrefixIndex, ctx: zmq.asyncio.Context, topic: str = DEFAULT_TOPIC):
        self.node_id = node_id
        self.index = index
        self.ctx = ctx
        self.topic = topic.encode()
        self.address = self.replay_address = ""
        self.last_seq = -1
        self.batches = 0          # applied, for /cluster and tests
        self.gaps_healed = 0
        self._task: asyncio.Task | None = None
        self._sockets: set[zmq.asyncio.Socket] = set()
        # Which subscription may write the index: a cancelled one can still be handed a batch
        # in the loop turn it is cancelled in (asyncio.wait_for returns a finished result).
        self._generation = 0

    def follow(self, address: str, replay_address: str) -> None:
        """Subscribe to these addresses (no-op when already subscribed to them)."""
        if not address or (address, replay_address) == (self.address, self.replay_address):
            return
        self.stop()
        self.address, self.replay_address = address, replay_address
        self.index.forget_node(self.node_id)
        self.last_seq = -1
        self._generation += 1
        self._task = asyncio.get_running_loop().create_task(self._run(address, self._generation))

    def resync(self) -> None:
        """Rebuild from a snapshot (the node was unreachable for a while)."""
        address, replay = self.address, self.replay_address
        self.address = self.replay_address = ""
        self.follow(address, replay)

    def stop(self) -> None:
        """Cancel the subscription and close its sockets now (the router terminates its
        zmq context right after, which waits for every socket to be closed)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for sock in self._sockets:
            sock.close(0)
        self._sockets.clear()

    def _socket(self, kind: int) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        self._sockets.add(sock)
        return sock

    def _close(self, sock: zmq.asyncio.Socket) -> None:
        self._sockets.discard(sock)
        sock.close(0)

    async def _run(self, address: str, generation: int) -> None:
        sub = self._socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        sub.connect(address)
        try:
            await self._replay(0, generation)
            while True:
                _, seq_b, payload = await sub.recv_multipart()
                seq = int.from_bytes(seq_b, "big")
                if generation != self._generation:
                    return
                if seq == 0 and self.last_seq >= 0:  # the node restarted behind the same address
                    self.index.forget_node(self.node_id)
                    self.last_seq = -1
                elif seq <= self.last_seq:
                    continue  # a replay already brought it
                elif seq > self.last_seq + 1:
                    await self._replay(self.last_seq + 1, generation)
                    self.gaps_healed += 1
                    if seq <= self.last_seq:
                        continue
                self._apply(seq, decode_batch(payload), generation)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("node %s: KV event subscription failed; prefix routing falls back to load for it "
                          "until the next health check subscribes again", self.node_id)
            if generation == self._generation:  # what it held is unknown now; follow() starts afresh
                self.index.forget_node(self.node_id)
                self.address = self.replay_address = ""
        finally:
            self._close(sub)

    async def _replay(self, start_seq: int, generation: int) -> None:
        sock = self._socket(zmq.DEALER)
        sock.connect(self.replay_address)
        try:
            await sock.send_multipart([b"", seq_bytes(start_seq)])
            while True:
                try:
                    _, seq_b, payload = await asyncio.wait_for(sock.recv_multipart(), REPLAY_TIMEOUT_S)
                except asyncio.TimeoutError:
                    # The batches it should have brought are unknown (a BlockRemoved among
                    # them would leave a block indexed that the node no longer holds): the
                    # subscription lets go, and the next follow() starts afresh.
                    raise RuntimeError(f"no answer from the KV event replay socket {self.replay_address} "
                                       f"within {REPLAY_TIMEOUT_S} s") from None
                if seq_b == END_OF_REPLAY:
                    return
                seq = int.from_bytes(seq_b, "big")
                batch = decode_batch(payload)
                if seq > self.last_seq or (start_seq == 0 and self.last_seq < 0):
                    self._apply(seq, batch, generation)
        finally:
            self._close(sock)

    def _apply(self, seq: int, batch: KVEventBatch, generation: int) -> None:
        if generation != self._generation:  # a subscription replaced while this batch came in
            return
        self.index.apply(self.node_id, batch.events)
        self.last_seq = seq
        self.batches += 1
