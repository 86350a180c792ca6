"""The NIXL KV transport between real processes on 127.0.0.1, set up the way the product does it.

The producer runs in a spawned process with a ProducerService that answers the connector's
HandshakeRequest (its KVCacheInfo, and NixlPeerInfo inside `transport`); this test process
is the consumer: call_struct, KVCacheInfo.mismatch, add_peer, READ. KV tensors use the
engine's layout, (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim), in DRAM.
The handshake messages' own failure modes are tested in tests/test_kv_connector_units.py.
"""

from __future__ import annotations

import multiprocessing as mp
import contextlib
import os
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("zmq")
pytest.importorskip("kv_connector.nixl_compat", reason="nixl not installed")
import msgspec  # noqa: E402

from kv_connector import messages as m  # noqa: E402
from kv_connector.base import KVCacheInfo  # noqa: E402
from kv_connector.config import KVTransferConfig  # noqa: E402
from kv_connector.nixl_connector import NixlPeerInfo  # noqa: E402
from kv_connector.producer_service import call_struct  # noqa: E402

SHAPE = (32, 4, 2, 16, 2, 32)  # (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)
DTYPE = torch.bfloat16
BLOCK_BYTES = 4 * 2 * 16 * 2 * 32 * 2  # 16 KiB
SEED = 1234
KV_INFO = KVCacheInfo(model="tiny", dtype="bfloat16", block_size=16, num_layers=4, num_kv_heads=2, head_dim=32,
                      layout="NL2BHD")
CONFIG_HASH = KVTransferConfig(kv_connector="nixl").compute_hash()


def _producer_kv() -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    return torch.randn(SHAPE, generator=g, dtype=torch.float32).to(DTYPE)


def _run_producer(conn) -> None:
    """Spawned: register a random KV cache, answer handshakes, report notifications until b"bye"."""
    from kv_connector.nixl_transport import NixlTransport
    from kv_connector.producer_service import ProducerService

    transport = NixlTransport(f"test-producer-{os.getpid()}")
    service = None
    try:
        kv = _producer_kv()
        layout = transport.register_kv_cache(kv, BLOCK_BYTES)
        answer = m.HandshakeResponse(engine_id="prefill-test", config_hash=CONFIG_HASH, kv_info=KV_INFO,
                                     num_blocks=layout.num_blocks, block_bytes=layout.block_bytes,
                                     transport=msgspec.msgpack.encode(
                                         NixlPeerInfo(transport.agent_metadata(), layout)))
        # The service thread only returns bytes made on this thread; it never touches the agent.
        service = ProducerService("127.0.0.1", 0, {m.HandshakeRequest: lambda req: answer}).start()
        conn.send(("ready", service.port))
        received: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not any(msg == b"bye" for _, msg in received):
            for peer, msgs in transport.get_notifs().items():
                received += [(peer, msg) for msg in msgs]
            time.sleep(0.005)
        conn.send(("notifs", received))
    except BaseException as e:
        conn.send(("error", repr(e)))
        raise
    finally:
        if service is not None:
            service.close()
        transport.close()


def _recv(conn, timeout_s: float):
    assert conn.poll(timeout_s), f"the producer process sent nothing within {timeout_s} s"
    msg = conn.recv()
    assert msg[0] != "error", f"producer failed: {msg[1]}"
    return msg


def test_consumer_reads_scattered_blocks_bit_identical_and_producer_is_notified():
    from kv_connector.nixl_transport import NixlTransport

    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    producer = ctx.Process(target=_run_producer, args=(child_conn,), daemon=True)
    producer.start()
    consumer = split_consumer = None
    try:
        _, port = _recv(conn, 60)
        reply = call_struct("127.0.0.1", port, m.HandshakeRequest("decode-test", CONFIG_HASH), m.HandshakeResponse,
                            timeout_s=10)
        assert reply.engine_id == "prefill-test"
        assert KV_INFO.mismatch(reply.kv_info) is None
        info = msgspec.msgpack.decode(reply.transport, type=NixlPeerInfo)
        assert info.layout.num_blocks == SHAPE[0] == reply.num_blocks
        assert info.layout.block_bytes == BLOCK_BYTES == reply.block_bytes
        assert info.layout.mem_type == "DRAM"

        kv = torch.full(SHAPE, -7.0, dtype=DTYPE)  # poison: every unread block must keep it
        consumer = NixlTransport(f"test-consumer-{os.getpid()}")
        consumer.register_kv_cache(kv, BLOCK_BYTES)
        peer = consumer.add_peer(info.agent_metadata, info.layout)
        assert consumer.add_peer(info.agent_metadata, info.layout) == peer  # cached, not re-added

        remote_ids = [5, 0, 9, 3, 30, 7, 20, 21, 22, 23]  # non-contiguous, unsorted, with one run
        local_ids = [1, 2, 3, 10, 11, 4, 12, 13, 14, 15]
        handle = consumer.read_blocks(peer, remote_ids, local_ids, notif=b"req-1 done")
        assert handle.num_descs == 7 and handle.num_reads == 1  # the run 20..23 -> 12..15 is one descriptor
        consumer.wait(handle, timeout_s=20)
        assert consumer.poll(handle) == "DONE"
        consumer.release(handle)

        expected = _producer_kv()
        assert torch.equal(kv[local_ids].view(torch.int16), expected[remote_ids].view(torch.int16))
        untouched = [b for b in range(SHAPE[0]) if b not in local_ids]
        assert bool((kv[untouched] == -7.0).all())

        # The same request split into 3 READs, without NIXL's progress thread: lands exactly,
        # and the producer hears of it once, after all three.
        kv2 = torch.full(SHAPE, -7.0, dtype=DTYPE)
        split_consumer = NixlTransport(f"test-split-consumer-{os.getpid()}", reads_per_request=3,
                                       progress_thread=False)
        split_consumer.register_kv_cache(kv2, BLOCK_BYTES)
        split_peer = split_consumer.add_peer(info.agent_metadata, info.layout)
        handle = split_consumer.read_blocks(split_peer, remote_ids, local_ids, notif=b"req-2 done")
        assert handle.num_reads == 3 and handle.num_descs == 7
        split_consumer.wait(handle, timeout_s=20)
        split_consumer.release(handle)
        assert torch.equal(kv2[local_ids].view(torch.int16), expected[remote_ids].view(torch.int16))
        assert bool((kv2[untouched] == -7.0).all())

        consumer.send_notif(peer, b"bye")
        _, notifs = _recv(conn, 20)
        assert (consumer.name, b"req-1 done") in notifs
        assert notifs.count((split_consumer.name, b"req-2 done")) == 1
    finally:
        for t in (consumer, split_consumer):
            if t is not None:
                t.close()
        if producer.is_alive():
            producer.join(5)
        if producer.is_alive():
            producer.kill()
        producer.join(5)


@pytest.fixture
def two_transports():
    from kv_connector.nixl_transport import NixlTransport

    a = NixlTransport(f"test-a-{os.getpid()}")
    b = NixlTransport(f"test-b-{os.getpid()}")
    try:
        a.register_kv_cache(torch.zeros(SHAPE, dtype=DTYPE), BLOCK_BYTES)
        b.register_kv_cache(torch.zeros((8, *SHAPE[1:]), dtype=DTYPE), BLOCK_BYTES)
        peer = a.add_peer(b.agent_metadata(), b.local_layout())
        yield a, b, peer
    finally:
        a.close()
        b.close()


def test_read_blocks_rejects_bad_inputs_with_clear_errors(two_transports):
    a, _, peer = two_transports
    with pytest.raises(ValueError, match="3 remote block ids but 2 local"):
        a.read_blocks(peer, [0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match=r"remote block ids \[8\] are out of range.*8 blocks"):
        a.read_blocks(peer, [0, 8], [0, 1])
    with pytest.raises(ValueError, match=r"local block ids \[-1, 32\] are out of range"):
        a.read_blocks(peer, [0, 1], [-1, 32])
    with pytest.raises(ValueError, match=r"local block ids \[3\] appear more than once"):
        a.read_blocks(peer, [0, 1], [3, 3])
    with pytest.raises(ValueError, match="at least one block"):
        a.read_blocks(peer, [], [])
    with pytest.raises(ValueError, match="unknown peer 'nobody'"):
        a.read_blocks("nobody", [0], [0])
    with pytest.raises(TypeError, match="must be integers"):
        a.read_blocks(peer, [0.5], [0])
    with pytest.raises(TypeError, match="notif must be bytes"):
        a.read_blocks(peer, [0], [0], notif="done")


def test_setup_mistakes_raise_clear_errors(two_transports):
    from kv_connector.nixl_transport import KVRegionLayout, NixlTransport

    a, b, peer = two_transports
    with pytest.raises(ValueError, match="blocks are 1024 bytes on peer"):
        layout = b.local_layout()
        a.add_peer(b.agent_metadata(), KVRegionLayout(**{**{f: getattr(layout, f) for f in layout.__struct_fields__},
                                                        "block_bytes": 1024}))
    with pytest.raises(RuntimeError, match="already registered"):
        a.register_kv_cache(torch.zeros(SHAPE, dtype=DTYPE), BLOCK_BYTES)
    with pytest.raises(ValueError, match="reads_per_request must be an int >= 1"):
        NixlTransport(f"test-bad-{os.getpid()}", reads_per_request=0)
    c = NixlTransport(f"test-c-{os.getpid()}")
    try:
        with pytest.raises(ValueError, match=f"block_bytes=1000 does not fit.*must be {BLOCK_BYTES}"):
            c.register_kv_cache(torch.zeros(SHAPE, dtype=DTYPE), 1000)
        with pytest.raises(RuntimeError, match="register_kv_cache"):
            c.agent_metadata()
    finally:
        c.close()
    errors: list[BaseException] = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, a.get_notifs).value))
    t.start()
    t.join()
    assert "not thread-safe" in str(errors[0])


@contextlib.contextmanager
def _reader_and_source(name: str, **reader_options):
    """Two transports in this process: a reader with a poisoned cache (-7) and a source
    with random KV. Yields (reader, peer name, reader's cache, source's cache)."""
    from kv_connector.nixl_transport import NixlTransport

    reader = NixlTransport(f"test-{name}-reader-{os.getpid()}", **reader_options)
    source = NixlTransport(f"test-{name}-source-{os.getpid()}")
    try:
        mine = torch.full(SHAPE, -7.0, dtype=DTYPE)
        theirs = _producer_kv()
        reader.register_kv_cache(mine, BLOCK_BYTES)
        source.register_kv_cache(theirs, BLOCK_BYTES)
        yield reader, reader.add_peer(source.agent_metadata(), source.local_layout()), mine, theirs
    finally:
        reader.close()
        source.close()


def test_long_runs_travel_as_bounded_descriptors_and_land_exactly():
    with _reader_and_source("runs", max_desc_bytes=2 * BLOCK_BYTES, capture_telemetry=True) as (reader, peer, mine,
                                                                                                  theirs):
        # A run of 5 (pieces 2+2+1), a run of 2, and a run listed descending on both sides (2+1).
        remote_ids = [0, 1, 2, 3, 4, 20, 21, 13, 12, 11]
        local_ids = [5, 6, 7, 8, 9, 30, 31, 3, 2, 1]
        handle = reader.read_blocks(peer, remote_ids, local_ids)
        assert handle.num_descs == 6
        reader.wait(handle, timeout_s=20)
        assert reader.descs_sent(handle) == 6  # what NIXL really sent after its own merging
        reader.release(handle)
        assert torch.equal(mine[local_ids].view(torch.int16), theirs[remote_ids].view(torch.int16))
        untouched = [b for b in range(SHAPE[0]) if b not in local_ids]
        assert bool((mine[untouched] == -7.0).all())


def test_split_reads_keep_nixl_descriptors_whole_and_land_exactly():
    options = dict(max_desc_bytes=2 * BLOCK_BYTES, reads_per_request=4, capture_telemetry=True)
    with _reader_and_source("split", **options) as (reader, peer, mine, theirs):
        remote_ids = list(range(10, 26))  # one run of 16 blocks -> 8 descriptors of 2 blocks
        local_ids = list(range(0, 16))
        handle = reader.read_blocks(peer, remote_ids, local_ids)
        assert (handle.num_descs, handle.num_reads) == (8, 4)
        reader.wait(handle, timeout_s=20)
        assert reader.descs_sent(handle) == 8  # splitting into READs cut no descriptor
        reader.release(handle)
        assert torch.equal(mine[local_ids].view(torch.int16), theirs[remote_ids].view(torch.int16))
        assert bool((mine[16:] == -7.0).all())
        # Fewer descriptors than reads_per_request: one READ per descriptor.
        handle = reader.read_blocks(peer, [1, 2], [20, 21])
        assert (handle.num_descs, handle.num_reads) == (1, 1)
        reader.wait(handle, timeout_s=20)
        reader.release(handle)
        assert torch.equal(mine[[20, 21]].view(torch.int16), theirs[[1, 2]].view(torch.int16))


def test_read_groups_deal_descriptors_evenly_and_cover_every_pair():
    from kv_connector.nixl_transport import _read_groups

    starts = np.array([0, 2, 4, 6, 8, 9, 10])  # 7 descriptors over 12 pairs
    assert _read_groups(starts, 12, 1) == [(0, 12)]
    assert _read_groups(starts, 12, 3) == [(0, 6), (6, 9), (9, 12)]  # 3 + 2 + 2 descriptors
    assert _read_groups(starts, 12, 20) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9), (9, 10), (10, 12)]
    assert _read_groups(np.array([0]), 5, 4) == [(0, 5)]


def _cpu_share_of_idle_transport(**options) -> float:
    """Share of one core a process with a fresh, idle transport uses over a second (run in
    a spawned process, so nothing else of the test runner's counts)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_measure_idle, args=(child, options), daemon=True)
    proc.start()
    try:
        assert parent.poll(60), "the measuring process did not answer"
        return parent.recv()
    finally:
        proc.join(10)


def _measure_idle(conn, options) -> None:
    import resource

    from kv_connector.nixl_transport import NixlTransport

    transport = NixlTransport(f"idle-{os.getpid()}", num_threads=0, **options)
    transport.register_kv_cache(torch.zeros(SHAPE, dtype=DTYPE), BLOCK_BYTES)
    time.sleep(0.3)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    time.sleep(1.0)
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    conn.send((r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / (t1 - t0))
    transport.close()


def test_an_idle_transport_does_not_spin_a_core():
    """NIXL's progress thread polls without pause unless told to sleep between polls (its
    Python API says nothing of it): every node would burn a core while nothing moves."""
    assert _cpu_share_of_idle_transport() < 0.25
