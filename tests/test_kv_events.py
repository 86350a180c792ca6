"""KV events in vLLM's wire format: what a subscriber rebuilds matches the node's pool
exactly, gaps and late joins are healed by replay or snapshot, and decoders written for
vLLM read the stream unchanged."""

from __future__ import annotations

import time

import msgspec
import pytest
import zmq

from engine import SamplingParams
from engine.config import CacheConfig, EngineConfig, KVEventsConfig, SchedulerConfig
from engine.hashing import internal_block_hash
from engine.kv_events import (END_OF_REPLAY, AllBlocksCleared, BlockRemoved, BlockStored, KVEventPublisher,
                              KVEventSubscriber, decode_batch)
from engine.llm_engine import LLMEngine


# vLLM's structs as its subscriber example declares them (an older release: six fields) and
# as its newest release does (lora_name required, more optional fields): both must decode us.
class _VEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class _OldStored(_VEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class _NewStored(_VEvent, tag="BlockStored"):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list | None = None
    group_idx: int | None = None


class _Removed(_VEvent, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None


class _Cleared(_VEvent, tag="AllBlocksCleared"):
    pass


class _Batch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list
    data_parallel_rank: int | None = None


class _OldBatch(_Batch):
    events: list[_OldStored | _Removed | _Cleared]


class _NewBatch(_Batch):
    events: list[_NewStored | _Removed | _Cleared]


def wait_until(cond, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def publisher():
    pub = KVEventPublisher(buffer_steps=4)
    yield pub
    pub.close()


def test_the_payload_decodes_with_vllm_structs_old_and_new():
    stored = BlockStored([11, 12], None, list(range(32)), 16, None, "CPU", None)
    payload = msgspec.msgpack.encode(_Batch(1.5, [AllBlocksCleared(), stored, BlockRemoved([11], "CPU")]))
    assert decode_batch(payload).events[1] == stored
    for cls in (_OldBatch, _NewBatch):
        batch = msgspec.msgpack.decode(payload, type=cls)
        assert batch.ts == 1.5 and isinstance(batch.events[0], _Cleared)
        assert batch.events[1].block_hashes == [11, 12] and batch.events[1].token_ids == list(range(32))
        assert batch.events[2].block_hashes == [11]
    assert msgspec.msgpack.decode(payload)[1][1][0] == "BlockStored"  # tagged arrays, as vLLM sends them


def test_a_subscriber_mirror_equals_the_engine_pool_after_a_burst_that_forces_eviction(checkpoints):
    engine = LLMEngine(EngineConfig(
        model=str(checkpoints["tiny"]), dtype="float32", device="cpu",
        cache=CacheConfig(block_size=4, num_blocks=24, eviction_policy="lru"),
        scheduler=SchedulerConfig(max_num_seqs=4), kv_events=KVEventsConfig(enable=True)))
    batches = []
    sub = KVEventSubscriber(engine.kv_events.address, engine.kv_events.replay_address,
                            on_batch=lambda seq, b: batches.append(b))
    try:
        sub.poll(0.2)
        params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        for i in range(12):  # 12 prompts of 5 blocks each through a 24-block cache
            engine.add_request(f"r{i}", [100 + 7 * i + j for j in range(20)], params)
            while engine.has_unfinished_requests:
                engine.step()
        assert engine.pool.stats.evictions > 0
        cached = set(engine.pool.cached)
        wait_until(lambda: sub.poll(0.05) >= 0 and {internal_block_hash(h) for h in sub.mirror.blocks} == cached,
                   what="the subscriber to catch up")
        assert sub.mirror.digest == engine.pool.cached_digest == engine.stats().kv_cache_digest
        events = [e for b in batches for e in b.events]
        assert any(isinstance(e, BlockRemoved) for e in events)
        stored = [e for e in events if isinstance(e, BlockStored)]
        assert all(len(e.token_ids) == 4 * len(e.block_hashes) and e.block_size == 4 and e.medium == "CPU"
                   for e in stored)
        assert any(len(e.block_hashes) > 1 for e in stored)  # a request's blocks travel as one chain
    finally:
        sub.close()
        engine.close()


def _stored(h: int, parent: int | None = None) -> BlockStored:
    return BlockStored([h], parent, [h] * 4, 4, None, "CPU", None)


def test_a_dropped_subscription_is_healed_by_replay_or_snapshot(publisher):
    sub = KVEventSubscriber(publisher.address, publisher.replay_address)
    try:
        publisher.publish([_stored(1)])
        wait_until(lambda: sub.poll(0.05) >= 0 and set(sub.mirror.blocks) == {1}, what="first event")
        sub.sub.setsockopt(zmq.UNSUBSCRIBE, b"kv-events")  # the subscription drops...
        time.sleep(0.1)
        publisher.publish([_stored(2, 1)])
        publisher.publish([BlockRemoved([1], "CPU")])
        time.sleep(0.2)
        sub.sub.setsockopt(zmq.SUBSCRIBE, b"kv-events")  # ...and comes back: the next batch shows a gap
        time.sleep(0.1)
        publisher.publish([_stored(3, 2)])
        wait_until(lambda: sub.poll(0.05) >= 0 and set(sub.mirror.blocks) == {2, 3}, what="replay of the gap")
        assert sub.gaps_healed >= 1

        late = KVEventSubscriber(publisher.address, publisher.replay_address)  # joins after the buffer (4) moved on
        try:
            for h in range(10, 16):
                publisher.publish([_stored(h)])
            wait_until(lambda: sub.poll(0.05) >= 0 and len(sub.mirror.blocks) == 8, what="the live subscriber")
            late.poll(0.2)  # its first poll asks from seq 0: too old, so it gets a snapshot
            assert late.mirror.blocks == sub.mirror.blocks and late.last_seq == sub.last_seq
        finally:
            late.close()
    finally:
        sub.close()


def test_the_replay_socket_speaks_vllms_request_reply_framing(publisher):
    publisher.publish([_stored(1)])
    publisher.publish([_stored(2, 1)])
    req = zmq.Context.instance().socket(zmq.DEALER)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(publisher.replay_address)
    try:
        req.send_multipart([b"", (1).to_bytes(8, "big")])  # what vLLM's REQ socket puts on the wire
        replies = []
        while req.poll(2000):
            replies.append(req.recv_multipart())
            if replies[-1][1] == (-1).to_bytes(8, "big", signed=True):
                break
        assert [int.from_bytes(r[1], "big") for r in replies[:-1]] == [1, 2]
        assert replies[-1][2] == b""
        assert decode_batch(replies[0][2]).events == [_stored(1)]
    finally:
        req.close(0)


def test_the_standalone_subscriber_example_follows_a_publisher(publisher):
    import subprocess
    import sys
    from pathlib import Path

    publisher.publish([_stored(1)])
    example = Path(__file__).parent.parent / "examples" / "kv_events_subscriber.py"
    proc = subprocess.Popen([sys.executable, str(example), "--address", publisher.address, "--replay-address",
                             publisher.replay_address, "--max-batches", "4"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # it joins, replays batches 0 and 1, then listens
        publisher.publish([_stored(2, 1)])
        publisher.publish([BlockRemoved([1], "CPU")])
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0
    lines = out.splitlines()
    assert lines[0] == "node: batch 0 (replayed): +0 -0 blocks, 0 cached"
    assert lines[1] == "node: batch 1 (replayed): +1 -0 blocks, 1 cached"
    assert lines[-1] == "node: batch 3: +0 -1 blocks, 1 cached"


def test_a_replay_asked_past_the_publishers_batches_gets_a_snapshot(publisher):
    """A subscriber of a previous process on the same address asks from its own last batch:
    the new publisher answers with a snapshot of what it holds now."""
    publisher.publish([_stored(1)])
    publisher.publish([_stored(2, 1)])
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(publisher.replay_address)
        sock.send_multipart([b"", (500).to_bytes(8, "big")])
        frames = []
        while sock.poll(5000):
            frames.append(sock.recv_multipart())
            if frames[-1][1] == END_OF_REPLAY:
                break
        stored = [e for e in decode_batch(frames[0][2]).events if isinstance(e, BlockStored)]
        assert len(frames) == 2 and sorted(h for e in stored for h in e.block_hashes) == [1, 2]
    finally:
        sock.close(0)


def test_a_subscription_a_bad_batch_ends_is_forgotten_and_taken_up_again():
    """The router's listener: after a batch it cannot decode, the node's entry is emptied
    (prefix routing falls back to load for it) and the next follow() subscribes afresh."""
    import asyncio

    import zmq.asyncio

    from engine.kv_events import KVEventBatch, encode_batch, seq_bytes
    from router.kv_event_listener import KVEventListener
    from router.prefix_index import PrefixIndex

    async def main():
        ctx = zmq.asyncio.Context()
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        address = f"tcp://127.0.0.1:{pub.bind_to_random_port('tcp://127.0.0.1')}"
        index, publisher = PrefixIndex(), KVEventPublisher(buffer_steps=4)  # a real replay socket
        listener = KVEventListener("n", index, ctx)
        try:
            async def until(cond, what):
                deadline = time.monotonic() + 10
                while not cond():
                    assert time.monotonic() < deadline, f"timed out waiting for {what}"
                    await asyncio.sleep(0.02)

            listener.follow(address, publisher.replay_address)
            batch = encode_batch(KVEventBatch(0.0, [_stored(1)]))
            seq = 0
            while index.match([1]) != {"n": 1}:  # a PUB socket drops what it sends before the SUB joined
                await pub.send_multipart([b"kv-events", seq_bytes(seq), batch])
                seq += 1
                await asyncio.sleep(0.05)
            await pub.send_multipart([b"kv-events", seq_bytes(listener.last_seq + 1), b"\xc1 not msgpack"])
            await until(lambda: listener.address == "", "the failed subscription to let go")
            assert index.match([1]) == {}
            listener.follow(address, publisher.replay_address)  # the next health tick
            assert listener._task is not None and not listener._task.done()
        finally:
            listener.stop()
            publisher.close()
            pub.close(0)
            ctx.term()

    asyncio.run(main())


def test_a_gap_the_replay_socket_does_not_fill_leaves_no_stale_blocks_in_the_router_index(monkeypatch):
    """The router's listener sees batch k+2 after k, and the replay socket does not answer
    for k+1 (which removed a block): the node's entry must not keep that block. It is
    forgotten (routing falls back to load) and the next follow() subscribes afresh."""
    import asyncio

    import zmq.asyncio

    from engine.kv_events import KVEventBatch, encode_batch, seq_bytes
    from router import kv_event_listener
    from router.kv_event_listener import KVEventListener
    from router.prefix_index import PrefixIndex

    monkeypatch.setattr(kv_event_listener, "REPLAY_TIMEOUT_S", 0.3)

    async def main():
        ctx = zmq.asyncio.Context()
        pub, replay = ctx.socket(zmq.PUB), ctx.socket(zmq.ROUTER)
        for s in (pub, replay):
            s.setsockopt(zmq.LINGER, 0)
        address = f"tcp://127.0.0.1:{pub.bind_to_random_port('tcp://127.0.0.1')}"
        replay_address = f"tcp://127.0.0.1:{replay.bind_to_random_port('tcp://127.0.0.1')}"
        index = PrefixIndex()
        listener = KVEventListener("n", index, ctx)

        answering = True

        async def serve_replay():  # nothing to replay; once `answering` is off, no answer at all
            while True:
                frames = await replay.recv_multipart()
                if answering:
                    await replay.send_multipart(frames[:2] + [END_OF_REPLAY, b""])

        server = asyncio.create_task(serve_replay())
        try:
            listener.follow(address, replay_address)
            seq = 0
            while index.match([1]) != {"n": 1}:  # a PUB socket drops what it sends before the SUB joined
                await pub.send_multipart([b"kv-events", seq_bytes(seq), encode_batch(KVEventBatch(0.0, [_stored(1)]))])
                seq += 1
                await asyncio.sleep(0.05)
            # Batch last+1 (BlockRemoved([1])) is lost on the way, and the replay socket
            # stops answering (an overloaded node); last+2 stores block 2.
            answering = False
            await pub.send_multipart([b"kv-events", seq_bytes(listener.last_seq + 2),
                                      encode_batch(KVEventBatch(0.0, [_stored(2)]))])
            deadline = time.monotonic() + 10
            while listener.address and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert index.match([1]) == {}, "a block the node removed is still indexed"
            assert listener.address == "", "the subscription went on past a gap it could not fill"
        finally:
            server.cancel()
            listener.stop()
            pub.close(0)
            replay.close(0)
            ctx.term()

    asyncio.run(main())
