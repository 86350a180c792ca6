"""KV events: every node tells the world which prefix blocks its cache holds.

The wire format is vLLM's (vllm/distributed/kv_events.py), so that routers written for
vLLM (Dynamo's KV router, vLLM's own subscriber example) read a pdcluster node unchanged:

* a ZeroMQ PUB socket sends multipart messages `[topic, seq, payload]`: `seq` is an
  8-byte big-endian batch number (0, 1, 2, ... from the node's start), `payload` a
  msgpack `KVEventBatch`, an array `[ts, events]` (`ts`: Unix seconds, float);
* each event is a tagged array (msgspec `array_like`, `tag=True`: the class name first):
  `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id,
  medium, lora_name]`, `["BlockRemoved", block_hashes, medium]`, `["AllBlocksCleared"]`.
  A BlockStored carries a chain of blocks: `parent_block_hash` is the key of the block
  before the first one (None: the first is a prompt's first block) and `token_ids` the
  blocks' tokens back to back (`block_size` per block). Keys are engine/hashing.py's
  contract (ints below 2**64; 16 bytes for the `sha256` algorithm). `lora_name` is
  newer vLLM's required field (always None here); older decoders ignore it;
* a ROUTER socket serves replays: a client (REQ, or DEALER sending an empty delimiter
  frame first) sends the 8-byte big-endian number of the first batch it lacks and gets
  `[seq, payload]` for each buffered batch from there, then `[-1 (8 bytes, signed), b""]`.
  Where vLLM can only send what its buffer still holds, a node whose buffer no longer
  reaches back that far sends one *snapshot* batch instead, numbered with the latest
  batch: `AllBlocksCleared` followed by a `BlockStored` for every block cached after
  that batch. A subscriber that applies it is exact again, however much it missed.

A node's first batch (seq 0) is `[AllBlocksCleared]`: a subscriber that sees the
sequence start again knows the node restarted with an empty cache.

Who calls what: the block pool reports changes to a `KVEventLog` from the engine
thread; the engine hands the log's events to `KVEventPublisher.publish` once per step;
the publisher's own thread sends them, keeps the replay buffer and a mirror of the
cached set for snapshots (so snapshots never touch the engine's state).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec
import zmq

from engine.hashing import external_block_hash, internal_block_hash

log = logging.getLogger(__name__)

DEFAULT_TOPIC = "kv-events"
END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)
ExternalBlockHash = int | bytes


# --- the wire format ------------------------------------------------------------------
class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Base of the KV cache events."""


class BlockStored(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def encode_batch(batch: KVEventBatch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(payload: bytes) -> KVEventBatch:
    return _decoder.decode(payload)


def seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=seq < 0)


# --- engine side: collect ---------------------------------------------------------------
class KVEventLog:
    """Collects the block pool's changes between two publishes, merging a request's
    consecutive blocks into one BlockStored (vLLM's shape) and removals into one
    BlockRemoved. Engine thread only."""

    def __init__(self, block_size: int, medium: str):
        self.block_size = block_size
        self.medium = medium
        self._events: list[KVCacheEvent] = []

    def stored(self, block_hash: int, parent_hash: int | None, token_ids: Sequence[int]) -> None:
        h = external_block_hash(block_hash)
        parent = None if parent_hash is None else external_block_hash(parent_hash)
        last = self._events[-1] if self._events else None
        if isinstance(last, BlockStored) and parent is not None and last.block_hashes[-1] == parent:
            last.block_hashes.append(h)
            last.token_ids.extend(token_ids)
        else:
            self._events.append(BlockStored([h], parent, list(token_ids), self.block_size, None, self.medium, None))

    def removed(self, block_hash: int) -> None:
        last = self._events[-1] if self._events else None
        if isinstance(last, BlockRemoved):
            last.block_hashes.append(external_block_hash(block_hash))
        else:
            self._events.append(BlockRemoved([external_block_hash(block_hash)], self.medium))

    def cleared(self) -> None:
        self._events = [AllBlocksCleared()]  # supersedes whatever came before it

    def drain(self) -> list[KVCacheEvent]:
        events, self._events = self._events, []
        return events


# --- the cached set, as a subscriber sees it -------------------------------------------------
class KVCacheMirror:
    """The set of blocks a node holds, rebuilt from its events: what a subscriber keeps.
    Stores each block's parent and tokens, enough to send a snapshot."""

    def __init__(self) -> None:
        self.blocks: dict[ExternalBlockHash, tuple[ExternalBlockHash | None, tuple[int, ...], int]] = {}

    def apply(self, events: Iterable[KVCacheEvent]) -> None:
        for e in events:
            if isinstance(e, BlockStored):
                parent = e.parent_block_hash
                for i, h in enumerate(e.block_hashes):
                    tokens = tuple(e.token_ids[i * e.block_size:(i + 1) * e.block_size])
                    self.blocks[h] = (parent, tokens, e.block_size)
                    parent = h
            elif isinstance(e, BlockRemoved):
                for h in e.block_hashes:
                    self.blocks.pop(h, None)
            elif isinstance(e, AllBlocksCleared):
                self.blocks.clear()

    @property
    def digest(self) -> int:
        """Same as the node's BlockPool.cached_digest when the mirror is in sync."""
        return sum(internal_block_hash(h) for h in self.blocks) & ((1 << 64) - 1)

    def snapshot(self, medium: str | None) -> list[KVCacheEvent]:
        """AllBlocksCleared, then every block as BlockStored chains (parents first where
        the order of storing allows)."""
        out: list[KVCacheEvent] = [AllBlocksCleared()]
        for h, (parent, tokens, block_size) in self.blocks.items():
            last = out[-1]
            if isinstance(last, BlockStored) and parent is not None and last.block_hashes[-1] == parent \
                    and last.block_size == block_size:
                last.block_hashes.append(h)
                last.token_ids.extend(tokens)
            else:
                out.append(BlockStored([h], parent, list(tokens), block_size, None, medium, None))
        return out


# --- engine side: publish ---------------------------------------------------------------
class KVEventPublisher:
    """PUB socket + ROUTER replay socket, served by one background thread.

    `publish()` is called from the engine thread and never blocks: the batch is queued
    and the thread woken through an inproc pair. A PUB socket drops messages for a
    subscriber that is too slow (beyond `hwm`); the subscriber sees the gap in `seq` and
    asks the replay socket. Binding port 0 picks a free port; `address` and
    `replay_address` say which."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, replay_port: int = 0, topic: str = DEFAULT_TOPIC,
                 medium: str = "CPU", buffer_steps: int = 10_000, hwm: int = 100_000):
        self.topic = topic.encode()
        self.medium = medium
        self._queue: queue.SimpleQueue[tuple[float, list[KVCacheEvent]] | None] = queue.SimpleQueue()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._mirror = KVCacheMirror()
        self._seq = -1
        self._hwm = hwm
        self._closed = False
        self._ctx = zmq.Context.instance()
        self._wake_addr = f"inproc://kv-events-wake-{id(self)}"
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.address = self.replay_address = ""
        self._thread = threading.Thread(target=self._run, args=(host, port, replay_port), name="kv-events",
                                        daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise RuntimeError(f"KV event publisher could not bind on {host}: {self._error}") from self._error
        self._wake = self._ctx.socket(zmq.PAIR)
        self._wake.setsockopt(zmq.LINGER, 0)
        self._wake.connect(self._wake_addr)
        self.publish([AllBlocksCleared()])  # seq 0: a (re)started node's cache is empty

    def publish(self, events: list[KVCacheEvent]) -> None:
        """Queue one batch (engine thread). Empty lists are not sent."""
        if events and not self._closed:
            self._queue.put((time.time(), events))
            try:
                self._wake.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass  # the thread has wake-ups pending already: it will find this batch too

    def close(self) -> None:
        """Send what is queued, then stop the thread and close the sockets."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        try:
            self._wake.send(b"", zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self._thread.join(timeout=5)
        self._wake.close(0)

    # --- the thread -----------------------------------------------------------------------
    def _run(self, host: str, port: int, replay_port: int) -> None:
        try:
            pub = self._ctx.socket(zmq.PUB)
            pub.setsockopt(zmq.SNDHWM, self._hwm)
            pub.setsockopt(zmq.LINGER, 0)
            replay = self._ctx.socket(zmq.ROUTER)
            replay.setsockopt(zmq.LINGER, 0)
            wake = self._ctx.socket(zmq.PAIR)
            wake.setsockopt(zmq.LINGER, 0)
            wake.bind(self._wake_addr)
            self.address = _bind(pub, host, port)
            self.replay_address = _bind(replay, host, replay_port)
        except BaseException as e:  # reported to the constructor
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(wake, zmq.POLLIN)
        poller.register(replay, zmq.POLLIN)
        running = True
        try:
            while running:
                ready = dict(poller.poll())
                if wake in ready:
                    while wake.poll(0):
                        wake.recv()
                    running = self._send_queued(pub)
                if replay in ready:
                    try:
                        self._serve_replay(replay)
                    except Exception:
                        log.exception("KV events: a replay request failed")
        except Exception:
            log.exception("KV event publisher stopped on an error: subscribers will see no more events")
            self._closed = True  # publish() stops queueing
        finally:
            for s in (pub, replay, wake):
                s.close(0)

    def _send_queued(self, pub: zmq.Socket) -> bool:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return True
            if item is None:
                return False
            ts, events = item
            self._seq += 1
            payload = encode_batch(KVEventBatch(ts, events))
            self._mirror.apply(events)
            self._buffer.append((self._seq, payload))
            pub.send_multipart((self.topic, seq_bytes(self._seq), payload))

    def _serve_replay(self, replay: zmq.Socket) -> None:
        frames = replay.recv_multipart()
        if len(frames) == 3 and not frames[1]:  # REQ, or DEALER with a delimiter (vLLM's form)
            envelope, start = [frames[0], b""], frames[2]
        elif len(frames) == 2:  # DEALER without a delimiter
            envelope, start = [frames[0]], frames[1]
        else:
            log.warning("KV events: malformed replay request of %d frames ignored", len(frames))
            return
        if len(start) != 8:
            replay.send_multipart(envelope + [END_OF_REPLAY, b""])
            return
        start_seq = int.from_bytes(start, "big")
        oldest = self._buffer[0][0] if self._buffer else self._seq + 1
        # Before the buffer, or past this publisher's batches (a subscriber of a previous
        # process on the same address): a snapshot of the cache now.
        if start_seq < oldest or start_seq > self._seq + 1:
            snapshot = KVEventBatch(time.time(), self._mirror.snapshot(self.medium))
            replay.send_multipart(envelope + [seq_bytes(self._seq), encode_batch(snapshot)])
        else:
            for seq, payload in self._buffer:
                if seq >= start_seq:
                    replay.send_multipart(envelope + [seq_bytes(seq), payload])
        replay.send_multipart(envelope + [END_OF_REPLAY, b""])


# Port 0 binds a random free port in this range, below Linux's ephemeral range (32768+):
# the launcher reserves the nodes' own ports from the ephemeral range and releases them
# just before the nodes bind them, and the kernel hands out ephemeral ports nearly in
# sequence, so an ephemeral bind here would take a port meant for the next node.
RANDOM_PORT_RANGE = (20000, 32767)


def _bind(sock: zmq.Socket, host: str, port: int) -> str:
    if port:
        sock.bind(f"tcp://{host}:{port}")
        return f"tcp://{host}:{port}"
    port = sock.bind_to_random_port(f"tcp://{host}", *RANDOM_PORT_RANGE, max_tries=500)
    return f"tcp://{host}:{port}"


# --- subscriber side --------------------------------------------------------------------
class KVEventSubscriber:
    """A blocking subscriber that keeps a `KVCacheMirror` of one node exact: it detects
    gaps and restarts by the sequence numbers and heals them through the replay socket.

    `on_batch(seq, batch)` sees every batch applied (replayed or snapshot ones too)."""

    def __init__(self, address: str, replay_address: str, topic: str = DEFAULT_TOPIC,
                 on_batch: Callable[[int, KVEventBatch], None] | None = None, replay_timeout_s: float = 2.0):
        self.mirror = KVCacheMirror()
        self.last_seq = -1
        self.on_batch = on_batch
        self.replay_timeout_s = replay_timeout_s
        self.gaps_healed = 0
        self._ctx = zmq.Context.instance()
        self.sub = self._ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.sub.connect(address)
        self.replay_address = replay_address
        self._synced = False

    def close(self) -> None:
        self.sub.close(0)

    def poll(self, timeout_s: float = 0.1) -> int:
        """Apply what arrived within `timeout_s`; returns the number of batches applied."""
        n = 0
        if not self._synced:  # missed the start (PUB drops what comes before we join)
            n += self.replay(0)
            self._synced = True
        deadline = time.monotonic() + timeout_s
        while self.sub.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            _, seq_b, payload = self.sub.recv_multipart()
            seq = int.from_bytes(seq_b, "big")
            if seq <= self.last_seq and seq != 0:
                continue  # already applied (a replay got ahead of the stream)
            if seq == 0 and self.last_seq >= 0 or seq > self.last_seq + 1:
                # A restart (seq 0 again) or a gap: fetch what we lack first.
                n += self.replay(0 if seq == 0 else self.last_seq + 1, restarted=seq == 0)
                if seq <= self.last_seq:
                    continue
            self._apply(seq, decode_batch(payload))
            n += 1
        return n

    def replay(self, start_seq: int, restarted: bool = False) -> int:
        """Ask the replay socket for batches from `start_seq` (or a snapshot)."""
        if restarted:
            self.mirror = KVCacheMirror()
            self.last_seq = -1
        req = self._ctx.socket(zmq.DEALER)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(self.replay_address)
        n = 0
        try:
            req.send_multipart([b"", seq_bytes(start_seq)])
            while req.poll(int(self.replay_timeout_s * 1000)):
                _, seq_b, payload = req.recv_multipart()
                if seq_b == END_OF_REPLAY:
                    break
                seq = int.from_bytes(seq_b, "big")
                batch = decode_batch(payload)
                is_snapshot = bool(batch.events) and isinstance(batch.events[0], AllBlocksCleared)
                if seq > self.last_seq or is_snapshot:
                    self._apply(seq, batch)
                    n += 1
        finally:
            req.close(0)
        if start_seq > 0 or restarted:
            self.gaps_healed += 1
        return n

    def _apply(self, seq: int, batch: KVEventBatch) -> None:
        self.mirror.apply(batch.events)
        self.last_seq = seq
        if self.on_batch is not None:
            self.on_batch(seq, batch)
