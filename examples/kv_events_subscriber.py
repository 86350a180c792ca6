"""Follow a pdcluster node's KV events: what a third-party router needs, in one file.

Depends on pyzmq and msgspec only (no pdcluster import): the structs below are the wire
format (README: KV events), declared the way vLLM's own subscriber example declares them,
so this script reads vLLM's stream as well, and vLLM's script reads ours.

    python examples/kv_events_subscriber.py --url http://127.0.0.1:8000          # every node, via /cluster
    python examples/kv_events_subscriber.py --address tcp://127.0.0.1:23456 --replay-address tcp://127.0.0.1:23457

It keeps, per node, the set of block hashes the node holds, heals gaps in the sequence
numbers through the replay socket (a batch too old for the node's buffer comes back as
a snapshot: AllBlocksCleared, then every cached block), and prints one line per batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from typing import Any

import msgspec
import zmq


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int | bytes]         # chained prefix keys (README: the block hash contract)
    parent_block_hash: int | bytes | None   # the key before the first one; None: a prompt's first block
    token_ids: list[int]                    # block_size tokens per block, back to back
    block_size: int
    lora_id: int | None
    medium: str | None                      # "GPU" or "CPU"


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int | bytes]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)


class NodeFollower:
    def __init__(self, name: str, address: str, replay_address: str, ctx: zmq.Context, topic: bytes = b"kv-events"):
        self.name = name
        self.blocks: set[int | bytes] = set()
        self.last_seq = -1
        self.decoder = msgspec.msgpack.Decoder(KVEventBatch)
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.sub.connect(address)
        self.replay = ctx.socket(zmq.DEALER)  # DEALER: a replay answers with many messages
        self.replay.connect(replay_address)

    def catch_up(self, start_seq: int) -> int:
        """Ask the replay socket for every batch from `start_seq` (or a snapshot)."""
        self.replay.send_multipart([b"", start_seq.to_bytes(8, "big")])
        n = 0
        while self.replay.poll(2000):
            _, seq_b, payload = self.replay.recv_multipart()
            if seq_b == END_OF_REPLAY:
                break
            seq = int.from_bytes(seq_b, "big")
            batch = self.decoder.decode(payload)
            if seq > self.last_seq or (batch.events and isinstance(batch.events[0], AllBlocksCleared)):
                self.apply(seq, batch, replayed=True)
                n += 1
        return n

    def on_message(self) -> int:
        _, seq_b, payload = self.sub.recv_multipart()
        seq = int.from_bytes(seq_b, "big")
        n = 0
        if seq == 0 and self.last_seq >= 0:
            print(f"{self.name}: restarted (sequence began again)")
            self.blocks.clear()
        elif seq <= self.last_seq:
            return 0
        elif seq > self.last_seq + 1:
            print(f"{self.name}: missed batches {self.last_seq + 1}..{seq - 1}: asking for a replay")
            n += self.catch_up(self.last_seq + 1)
            if seq <= self.last_seq:
                return n
        self.apply(seq, self.decoder.decode(payload))
        return n + 1

    def apply(self, seq: int, batch: KVEventBatch, replayed: bool = False) -> None:
        stored = removed = 0
        for e in batch.events:
            if isinstance(e, BlockStored):
                self.blocks.update(e.block_hashes)
                stored += len(e.block_hashes)
            elif isinstance(e, BlockRemoved):
                self.blocks.difference_update(e.block_hashes)
                removed += len(e.block_hashes)
            else:
                self.blocks.clear()
        self.last_seq = seq
        print(f"{self.name}: batch {seq}{' (replayed)' if replayed else ''}: +{stored} -{removed} blocks, "
              f"{len(self.blocks)} cached", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a pdcluster router: follow every node its GET /cluster lists")
    p.add_argument("--address", help="one node's PUB socket (kv_events_address)")
    p.add_argument("--replay-address", help="that node's replay socket (kv_events_replay_address)")
    p.add_argument("--max-batches", type=int, default=0, help="exit after this many batches (0: run until Ctrl-C)")
    a = p.parse_args(argv)
    if a.url:
        with urllib.request.urlopen(a.url.rstrip("/") + "/cluster", timeout=5) as r:
            nodes = [(n["id"], n["kv_events_address"], n["kv_events_replay_address"])
                     for n in json.load(r)["nodes"] if n.get("kv_events_address")]
    elif a.address and a.replay_address:
        nodes = [("node", a.address, a.replay_address)]
    else:
        p.error("give --url, or --address and --replay-address")
    ctx = zmq.Context.instance()
    followers = [NodeFollower(*n, ctx) for n in nodes]
    poller = zmq.Poller()
    for f in followers:
        poller.register(f.sub, zmq.POLLIN)
    seen = sum(f.catch_up(0) for f in followers)  # PUB sends nothing from before we joined: start from a replay
    try:
        while not a.max_batches or seen < a.max_batches:
            for sock, _ in poller.poll(1000):
                seen += next(f for f in followers if f.sub is sock).on_message()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
