"""The NIXL KV transport and its ZeroMQ handshake, between real processes on 127.0.0.1.

The producer runs in a spawned process; this test process is the consumer. KV tensors use
the engine's layout, (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim), in DRAM.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("zmq")
from kv_connector.handshake import (  # noqa: E402
    HandshakeError,
    HandshakeResponse,
    HandshakeServer,
    KVCompat,
    check_compat,
    fetch_handshake,
)

SHAPE = (32, 4, 2, 16, 2, 32)  # (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)
DTYPE = torch.bfloat16
BLOCK_BYTES = 4 * 2 * 16 * 2 * 32 * 2  # 16 KiB
SEED = 1234
COMPAT = KVCompat(model_name="tiny", dtype="bfloat16", block_size=16, num_layers=4, num_kv_heads=2, head_dim=32,
                  kv_layout="NL2BHD")


def _producer_kv() -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    return torch.randn(SHAPE, generator=g, dtype=torch.float32).to(DTYPE)


def _run_producer(conn) -> None:
    """Spawned: register a random KV cache, serve the handshake, report notifications until b"bye"."""
    from kv_connector.nixl_transport import NixlTransport

    transport = NixlTransport(f"test-producer-{os.getpid()}")
    server = None
    try:
        kv = _producer_kv()
        layout = transport.register_kv_cache(kv, BLOCK_BYTES)
        server = HandshakeServer(HandshakeResponse(engine_id="prefill-test", agent_metadata=transport.agent_metadata(),
                                                   layout=layout, compat=COMPAT, compat_hash=COMPAT.fingerprint()),
                                 "127.0.0.1", 0)
        conn.send(("ready", server.start()))
        received: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not any(m == b"bye" for _, m in received):
            for peer, msgs in transport.get_notifs().items():
                received += [(peer, m) for m in msgs]
            time.sleep(0.005)
        conn.send(("notifs", received))
    except BaseException as e:
        conn.send(("error", repr(e)))
        raise
    finally:
        if server is not None:
            server.stop()
        transport.close()


def _recv(conn, timeout_s: float):
    assert conn.poll(timeout_s), f"the producer process sent nothing within {timeout_s} s"
    msg = conn.recv()
    assert msg[0] != "error", f"producer failed: {msg[1]}"
    return msg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_consumer_reads_scattered_blocks_bit_identical_and_producer_is_notified():
    from kv_connector.nixl_transport import NixlTransport

    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    producer = ctx.Process(target=_run_producer, args=(child_conn,), daemon=True)
    producer.start()
    consumer = None
    try:
        _, port = _recv(conn, 60)
        reply = fetch_handshake("127.0.0.1", port, timeout_s=10, engine_id="decode-test")
        assert reply.engine_id == "prefill-test"
        assert check_compat(COMPAT, reply.compat) is None
        assert reply.layout.num_blocks == SHAPE[0] and reply.layout.block_bytes == BLOCK_BYTES
        assert reply.layout.mem_type == "DRAM"

        kv = torch.full(SHAPE, -7.0, dtype=DTYPE)  # poison: every unread block must keep it
        consumer = NixlTransport(f"test-consumer-{os.getpid()}")
        consumer.register_kv_cache(kv, BLOCK_BYTES)
        peer = consumer.add_peer(reply.agent_metadata, reply.layout)
        assert consumer.add_peer(reply.agent_metadata, reply.layout) == peer  # cached, not re-added

        remote_ids = [5, 0, 9, 3, 30, 7, 20, 21, 22, 23]  # non-contiguous, unsorted, with one run
        local_ids = [1, 2, 3, 10, 11, 4, 12, 13, 14, 15]
        handle = consumer.read_blocks(peer, remote_ids, local_ids, notif=b"req-1 done")
        assert handle.num_descs == 7  # the run 20..23 -> 12..15 travels as one descriptor
        consumer.wait(handle, timeout_s=20)
        assert consumer.poll(handle) == "DONE"
        consumer.release(handle)

        expected = _producer_kv()
        assert torch.equal(kv[local_ids].view(torch.int16), expected[remote_ids].view(torch.int16))
        untouched = [b for b in range(SHAPE[0]) if b not in local_ids]
        assert bool((kv[untouched] == -7.0).all())

        consumer.send_notif(peer, b"bye")
        _, notifs = _recv(conn, 20)
        assert (consumer.name, b"req-1 done") in notifs
    finally:
        if consumer is not None:
            consumer.close()
        if producer.is_alive():
            producer.join(5)
        if producer.is_alive():
            producer.kill()
        producer.join(5)


def test_handshake_to_a_port_nobody_listens_on_fails_within_the_timeout():
    port = _free_port()
    start = time.monotonic()
    with pytest.raises(HandshakeError, match="no KV handshake reply"):
        fetch_handshake("127.0.0.1", port, timeout_s=0.5)
    assert time.monotonic() - start < 2.0


def test_handshake_reply_that_does_not_decode_raises_handshake_error():
    import zmq

    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")

    def reply_garbage():
        if sock.poll(5000):
            ident, _ = sock.recv_multipart()
            sock.send_multipart([ident, b"\xc1 not msgpack"])

    t = threading.Thread(target=reply_garbage)
    t.start()
    try:
        with pytest.raises(HandshakeError, match="does not decode"):
            fetch_handshake("127.0.0.1", port, timeout_s=5)
    finally:
        t.join(6)
        sock.close(0)


def test_compat_mismatch_names_each_differing_field():
    assert check_compat(COMPAT, COMPAT) is None
    theirs = KVCompat(**{**{f: getattr(COMPAT, f) for f in COMPAT.__struct_fields__}, "block_size": 32,
                         "dtype": "float16"})
    msg = check_compat(COMPAT, theirs)
    assert msg is not None
    assert "block_size 32 on the producer but 16 here" in msg
    assert "dtype 'float16' on the producer but 'bfloat16' here" in msg
    assert "num_layers" not in msg
    assert theirs.fingerprint() != COMPAT.fingerprint()


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


def test_long_runs_travel_as_bounded_descriptors_and_land_exactly():
    from kv_connector.nixl_transport import NixlTransport

    reader = NixlTransport(f"test-reader-{os.getpid()}", max_desc_bytes=2 * BLOCK_BYTES, capture_telemetry=True)
    source = NixlTransport(f"test-source-{os.getpid()}")
    try:
        mine = torch.full(SHAPE, -7.0, dtype=DTYPE)
        theirs = _producer_kv()
        reader.register_kv_cache(mine, BLOCK_BYTES)
        source.register_kv_cache(theirs, BLOCK_BYTES)
        peer = reader.add_peer(source.agent_metadata(), source.local_layout())
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
    finally:
        reader.close()
        source.close()
