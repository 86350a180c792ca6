"""Unit contracts of the KV connector's building blocks, each without an engine:

* the producer service and its messages (the handshake a consumer does before any READ),
* KVCacheInfo.mismatch (the compatibility check),
* ProducerLedger (the leases on lent blocks), checksums, the connector registry, and
  KVTransferConfig.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from types import SimpleNamespace

import msgspec
import pydantic
import pytest
import torch

pytest.importorskip("zmq")
import zmq  # noqa: E402

from kv_connector import messages as m  # noqa: E402
from kv_connector import producer_ledger, registry  # noqa: E402
from kv_connector.base import ConnectorEvents, KVCacheInfo, KVConnectorBase  # noqa: E402
from kv_connector.checksum import block_checksums  # noqa: E402
from kv_connector.config import KVTransferConfig  # noqa: E402
from kv_connector.producer_service import ProducerService, ServiceError, call, call_struct  # noqa: E402

KV_INFO = KVCacheInfo(model="tiny", dtype="bfloat16", block_size=16, num_layers=4, num_kv_heads=2, head_dim=32,
                      layout="NL2BHD")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _handshake_answer() -> m.HandshakeResponse:
    return m.HandshakeResponse(engine_id="prefill-0", config_hash="abc", kv_info=KV_INFO, num_blocks=32,
                               block_bytes=16384, transport=b"opaque transport bytes")


@pytest.fixture
def service():
    svc = ProducerService("127.0.0.1", 0, {m.HandshakeRequest: lambda req: _handshake_answer()}).start()
    yield svc
    svc.close()


# ------------------------------------------------------------------ producer service + messages
def test_handshake_round_trip_returns_the_producers_answer(service):
    reply = call_struct("127.0.0.1", service.port, m.HandshakeRequest("decode-0", "abc"), m.HandshakeResponse,
                        timeout_s=5)
    assert reply == _handshake_answer()
    assert KV_INFO.mismatch(reply.kv_info) is None


def test_handshake_to_a_port_nobody_listens_on_fails_within_the_timeout():
    port = _free_port()
    start = time.monotonic()
    with pytest.raises(ServiceError, match=f"KV producer at 127.0.0.1:{port} did not answer HandshakeRequest "
                                           r"within 0.5s"):
        call_struct("127.0.0.1", port, m.HandshakeRequest("decode-0", "abc"), m.HandshakeResponse, timeout_s=0.5)
    assert time.monotonic() - start < 2.0


def _fake_producer(reply: bytes):
    """A ROUTER that answers one request with `reply` as the payload; returns (port, thread, socket)."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")

    def answer_once():
        if sock.poll(5000):
            ident, empty, tag, _ = sock.recv_multipart()
            sock.send_multipart([ident, empty, tag, reply])

    t = threading.Thread(target=answer_once)
    t.start()
    return port, t, sock


def test_handshake_reply_that_does_not_decode_raises_a_service_error_not_a_hang():
    port, t, sock = _fake_producer(b"\xc1 not msgpack")
    try:
        start = time.monotonic()
        with pytest.raises(ServiceError, match="unreadable answer"):
            call_struct("127.0.0.1", port, m.HandshakeRequest("decode-0", "abc"), m.HandshakeResponse, timeout_s=5)
        assert time.monotonic() - start < 5.0
    finally:
        t.join(6)
        sock.close(0)


def test_handshake_answered_with_the_wrong_message_or_an_error_raises_service_error():
    port, t, sock = _fake_producer(m.encode(m.ClaimResponse([True])))
    try:
        with pytest.raises(ServiceError, match="answered ClaimResponse to HandshakeRequest"):
            call_struct("127.0.0.1", port, m.HandshakeRequest("decode-0", "abc"), m.HandshakeResponse, timeout_s=5)
    finally:
        t.join(6)
        sock.close(0)
    port, t, sock = _fake_producer(m.encode(m.ErrorResponse("KV transfer settings differ")))
    try:
        with pytest.raises(ServiceError, match="refused HandshakeRequest: KV transfer settings differ"):
            call_struct("127.0.0.1", port, m.HandshakeRequest("decode-0", "abc"), m.HandshakeResponse, timeout_s=5)
    finally:
        t.join(6)
        sock.close(0)


def test_service_answers_bad_and_unserved_requests_with_errors_and_keeps_serving(service):
    port = service.port
    with pytest.raises(ServiceError, match="ClaimRequest is not served here"):
        call_struct("127.0.0.1", port, m.ClaimRequest(["r1"]), m.ClaimResponse, timeout_s=5)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"tcp://127.0.0.1:{port}")
        sock.send_multipart([b"", b"tag", b"\xc1 garbage"])
        assert sock.poll(5000), "the service did not answer an undecodable request"
        reply = m.decode_response(sock.recv_multipart()[-1])
    finally:
        sock.close(0)
    assert isinstance(reply, m.ErrorResponse) and reply.message.startswith("bad request")
    assert call("127.0.0.1", port, m.HandshakeRequest("decode-0", "abc"), timeout_s=5)  # still serving


def test_messages_round_trip_and_never_decode_as_another_type():
    for msg in (m.HandshakeRequest("d", "h"), m.ClaimRequest(["a", "b"]), m.ReleaseRequest("a"),
                m.ReadRequest("a", [1, 2])):
        assert m.decode_request(m.encode(msg)) == msg
    for msg in (_handshake_answer(), m.ClaimResponse([True, False]), m.ReleaseResponse(True, [1, 2]),
                m.ErrorResponse("no")):
        assert m.decode_response(m.encode(msg)) == msg
    with pytest.raises(msgspec.ValidationError):
        m.decode_request(m.encode(m.ClaimResponse([True])))  # a response is not a request


# ------------------------------------------------------------------ KVCacheInfo.mismatch
def test_kv_info_mismatch_names_each_differing_field_with_both_values():
    assert KV_INFO.mismatch(KV_INFO) is None
    theirs = msgspec.structs.replace(KV_INFO, block_size=32, dtype="float16")
    msg = KV_INFO.mismatch(theirs)
    assert msg is not None
    assert "block_size 32 on the producer but 16 here" in msg
    assert "dtype 'float16' on the producer but 'bfloat16' here" in msg
    assert "num_layers" not in msg and "model '" not in msg  # equal fields are not listed
    assert "same model, dtype and block_size" in msg  # says what to do
    msg = KV_INFO.mismatch(theirs, here="on decode-0", there="on prefill-0")
    assert "block_size 32 on prefill-0 but 16 on decode-0" in msg


# ------------------------------------------------------------------ ProducerLedger
@pytest.fixture
def clock(monkeypatch):
    """A settable monotonic clock for the ledger module only."""
    now = SimpleNamespace(t=1000.0)
    monkeypatch.setattr(producer_ledger, "time", SimpleNamespace(monotonic=lambda: now.t))
    return now


def test_ledger_claim_renews_the_lease(clock):
    ledger = producer_ledger.ProducerLedger(abort_timeout_s=10)
    ledger.hold("r1", [4, 5, 6], [11, 12, 13])
    clock.t += 8
    held = ledger.claim("r1")
    assert held is not None and held.block_ids == [4, 5, 6] and held.deadline == clock.t + 10
    assert ledger.take_expired_and_released(now=clock.t + 4) == []  # past the first lease, inside the renewed one
    assert len(ledger) == 1
    assert ledger.claim("never-held") is None


def test_ledger_release_returns_the_record_once_and_frees_its_blocks_once(clock):
    ledger = producer_ledger.ProducerLedger(abort_timeout_s=10)
    ledger.hold("r1", [4, 5], [11, 12])
    held = ledger.release("r1")
    assert held is not None and held.block_ids == [4, 5] and held.lent_block_ids == [11, 12]
    assert ledger.release("r1") is None
    assert ledger.take_expired_and_released() == [[4, 5]]
    assert ledger.take_expired_and_released() == []
    assert (len(ledger), ledger.released_count, ledger.expired_count) == (0, 1, 0)


def test_ledger_expiry_frees_unclaimed_blocks_and_voids_a_late_release(clock):
    ledger = producer_ledger.ProducerLedger(abort_timeout_s=10)
    ledger.hold("r1", [7], [1])
    ledger.hold("r2", [8], [2])
    clock.t += 5
    ledger.claim("r2")
    assert ledger.take_expired_and_released(now=clock.t + 5) == [[7]]  # r1's lease ran out, r2's was renewed
    assert ledger.expired_count == 1 and len(ledger) == 1
    assert ledger.claim("r1") is None
    assert ledger.release("r1") is None  # the consumer learns its read is void
    assert ledger.take_expired_and_released(now=clock.t + 5) == []


def test_ledger_hold_copies_the_block_list(clock):
    ledger = producer_ledger.ProducerLedger(abort_timeout_s=10)
    blocks = [1, 2]
    ledger.hold("r1", blocks, [0, 0])
    blocks.append(3)  # the engine reuses its list
    assert ledger.release("r1").block_ids == [1, 2]


# ------------------------------------------------------------------ checksums
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_checksums_equal_for_equal_bytes_and_differ_for_one_changed_element(dtype):
    g = torch.Generator().manual_seed(0)
    kv = torch.randn((6, 2, 2, 4, 2, 8), generator=g).to(dtype)  # (blocks, layers, 2, block_size, heads, dim)
    kv[4] = kv[1]  # same bytes in another block
    sums = block_checksums(kv, [0, 1, 2, 3, 4, 5])
    assert len(sums) == 6 and sums[1] == sums[4]
    assert len(set(sums[:4])) == 4
    assert block_checksums(kv.clone(), [3, 1]) == [sums[3], sums[1]]
    changed = kv.clone()
    changed[1, 1, 0, 3, 1, 7] += 1  # one element of block 1 (a value, not a no-op bit change)
    after = block_checksums(changed, [0, 1, 2])
    assert after[0] == sums[0] and after[2] == sums[2] and after[1] != sums[1]
    assert block_checksums(kv, []) == []


def test_checksums_see_swapped_elements_within_a_block():
    kv = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 64)
    swapped = kv.clone()
    swapped[0, [3, 9]] = swapped[0, [9, 3]]  # same values, other positions
    assert block_checksums(kv, [0]) != block_checksums(swapped, [0])


# ------------------------------------------------------------------ registry
class _ToyConnector(KVConnectorBase):
    def register_kv_cache(self, kv_cache):
        pass

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return 0

    def start_load(self, request, num_computed_tokens, num_external_tokens):
        pass

    def request_finished(self, request):
        return False

    def poll(self):
        return ConnectorEvents()


def test_registry_resolves_a_name_and_a_module_class_path():
    from kv_connector.tcp_connector import TcpConnector

    assert registry.resolve_connector_class("tcp") is TcpConnector
    assert registry.resolve_connector_class("kv_connector.tcp_connector:TcpConnector") is TcpConnector
    assert "nixl" in registry.registered_connectors() and "tcp" in registry.registered_connectors()


def test_registry_builds_a_class_object_passed_as_cloudpickle_bytes():
    def make_local_class():  # defined in a closure: not importable by name in another process
        class LocalConnector(_ToyConnector):
            marker = "local"
        return LocalConnector

    cls = make_local_class()
    assert registry.serialize_connector_spec("tcp") == "tcp"  # names travel as they are
    spec = registry.serialize_connector_spec(cls)
    assert isinstance(spec, bytes)
    resolved = registry.resolve_connector_class(spec)
    assert resolved.__name__ == "LocalConnector" and resolved.marker == "local"
    assert issubclass(resolved, KVConnectorBase)
    conn = registry.build_connector(KVTransferConfig(), KV_INFO, spec)
    assert isinstance(conn, KVConnectorBase) and conn.kv_info == KV_INFO


def test_registry_unknown_name_says_what_exists():
    with pytest.raises(ValueError, match=r"unknown KV connector 'nope': use one of \[.*'nixl'.*'tcp'.*\] or a "
                                         r"'module:Class' path"):
        registry.resolve_connector_class("nope")
    with pytest.raises(ValueError, match="kv_connector.tcp_connector has no class Nope"):
        registry.resolve_connector_class("kv_connector.tcp_connector:Nope")
    with pytest.raises(ImportError, match="cannot import no_such_module"):
        registry.resolve_connector_class("no_such_module:Thing")


def test_registry_rejects_classes_that_are_not_connectors(monkeypatch):
    with pytest.raises(TypeError, match="must subclass kv_connector.base.KVConnectorBase"):
        registry.resolve_connector_class("json:JSONDecoder")
    with pytest.raises(TypeError, match="must subclass"):
        registry.resolve_connector_class(dict)
    with pytest.raises(ValueError, match="must look like 'package.module:ClassName'"):
        registry.register_connector("toy", "tests.test_kv_connector_units._ToyConnector")
    monkeypatch.setitem(registry._REGISTRY, "toy", "tests.test_kv_connector_units:_ToyConnector")
    assert registry.resolve_connector_class("toy") is _ToyConnector


# ------------------------------------------------------------------ KVTransferConfig
@pytest.mark.parametrize("field,value", [
    ("kv_role", "decoder"),
    ("kv_port", 70000),
    ("abort_timeout_s", 0),
    ("transfer_timeout_s", -1.0),
    ("load_failure_policy", "retry"),
    ("kv_buffer_device", "tpu"),
    ("kv_rank", -1),
])
def test_config_validation_errors_name_the_field(field, value):
    with pytest.raises(pydantic.ValidationError) as err:
        KVTransferConfig(**{field: value})
    assert field in str(err.value)


def test_config_rejects_unknown_fields_empty_connector_and_bad_assignments():
    with pytest.raises(pydantic.ValidationError, match="kv_porrt"):
        KVTransferConfig(kv_porrt=5)
    with pytest.raises(pydantic.ValidationError, match="kv_connector is empty"):
        KVTransferConfig(kv_connector="  ")
    cfg = KVTransferConfig()
    with pytest.raises(pydantic.ValidationError, match="kv_port"):
        cfg.kv_port = -1  # validate_assignment


def test_config_hash_is_stable_and_ignores_local_only_fields():
    a = KVTransferConfig(kv_connector="nixl", kv_role="kv_producer", kv_ip="10.0.0.1", kv_port=5555,
                         abort_timeout_s=30, load_failure_policy="fail")
    b = KVTransferConfig(kv_connector="nixl", kv_role="kv_consumer", kv_ip="10.0.0.2", kv_port=0,
                         transfer_timeout_s=5, kv_buffer_device="cuda", kv_rank=3)
    assert a.engine_id != b.engine_id
    assert a.compute_hash() == b.compute_hash() == KVTransferConfig(kv_connector="nixl").compute_hash()
    assert a.compute_hash() == a.compute_hash()
    assert KVTransferConfig(kv_connector="tcp").compute_hash() != a.compute_hash()


def test_config_engine_id_defaults_to_a_fresh_uuid4():
    a, b = KVTransferConfig(), KVTransferConfig()
    assert uuid.UUID(a.engine_id).version == 4
    assert a.engine_id != b.engine_id
    assert KVTransferConfig(engine_id="prefill-0").engine_id == "prefill-0"
    assert (a.is_producer, a.is_consumer) == (True, True)
    assert (KVTransferConfig(kv_role="kv_consumer").is_producer, KVTransferConfig(kv_role="kv_producer").is_consumer) \
        == (False, False)


def test_cuda_ipc_connector_on_a_cpu_cache_says_to_use_nixl_or_tcp():
    from kv_connector.base import KVCacheInfo
    from kv_connector.registry import build_connector

    info = KVCacheInfo("m", "float32", 4, 2, 1, 8, "block-major")
    connector = build_connector(KVTransferConfig(kv_connector="cuda_ipc", kv_role="kv_producer"), info)
    with pytest.raises(ValueError, match="needs the KV cache on a CUDA GPU.*nixl or tcp"):
        connector.register_kv_cache(torch.zeros(4, 2, 2, 4, 1, 8))
    connector.close()


def test_cuda_ipc_copies_runs_consecutive_on_both_sides():
    from kv_connector.cuda_ipc_connector import _runs

    assert _runs([5, 6, 7, 9, 10], [1, 2, 3, 4, 5]) == [(5, 1, 3), (9, 4, 2)]
    assert _runs([3, 4], [8, 10]) == [(3, 8, 1), (4, 10, 1)]
    assert _runs([], []) == []


def test_checksum_kernel_equals_the_torch_formulation_bit_for_bit():
    """The GPU's Triton kernel (here in Triton's interpreter) and the CPU's torch code give
    the same integers: a consumer on one may check a producer on the other. Blocks wider
    than one tile, a ragged last tile, extreme int32 words, repeated and reordered ids."""
    from kv_connector.checksum import block_checksums_ref, block_checksums_triton

    g = torch.Generator().manual_seed(1)
    kv = torch.randint(-2**31, 2**31 - 1, (5, 3, 4100), generator=g, dtype=torch.int64).to(torch.int32)
    kv[2].fill_(2**31 - 1)
    kv[3].fill_(-2**31)
    ids = [4, 0, 2, 3, 2, 1]
    assert block_checksums_triton(kv, ids) == block_checksums_ref(kv, ids)
    half = kv.view(torch.bfloat16)
    assert block_checksums_triton(half, [1, 0]) == block_checksums_ref(half, [1, 0])
    assert block_checksums_triton(kv, []) == []
