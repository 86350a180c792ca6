"""The pull connector at its edges, with real engines and real sockets on 127.0.0.1: what
arrives over a socket is checked before it is used (a malformed decode job is refused, a
long poll always ends), a load waiting for a worker keeps its lease, a closed consumer
leaves no file descriptor behind, and a NIXL read its caller gave up on is never posted."""

from __future__ import annotations

import math
import os
import time

import msgspec
import pytest
import torch
import zmq

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kv_connector import messages as m
from kv_connector.config import KVTransferConfig
from kv_connector.producer_ledger import ProducerLedger
from kv_connector.producer_service import ProducerService
from kv_connector.pull_connector import TransferError

GREEDY = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)


def engine(model, role: str | None = None, **kv) -> LLMEngine:
    config = KVTransferConfig(kv_connector="tcp", kv_role=role, **kv) if role else None
    return LLMEngine(EngineConfig(model=str(model), dtype="float32", device="cpu",
                                  cache=CacheConfig(block_size=4, num_blocks=64),
                                  scheduler=SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=16),
                                  kv_transfer=config))


def run(engines, ids: set[str], timeout_s: float = 30) -> dict:
    done, deadline = {}, time.monotonic() + timeout_s
    while len(done) < len(ids):
        assert time.monotonic() < deadline, f"unfinished: {ids - set(done)}"
        for e in engines:
            done.update((o.request_id, o) for o in e.step() if o.finished and o.request_id in ids)
        time.sleep(0.002)
    return done


HANDLE = {"do_remote_prefill": True, "remote_engine_id": "e", "remote_host": "127.0.0.1", "remote_port": 5555,
          "remote_request_id": "x-p", "remote_block_ids": [0, 1], "num_tokens": 6}


@pytest.mark.parametrize("change,complaint", [
    ({"num_tokens": None}, "missing required field `num_tokens`"),
    ({"remote_port": 0}, "remote_port"),
    ({"remote_port": "5555"}, "Expected `int`, got `str` - at `$.remote_port`"),
    ({"remote_host": "bad host/"}, "remote_host"),
    ({"remote_block_ids": [0, -1]}, "remote_block_ids"),
    ({"remote_request_id": ""}, "remote_request_id"),
])
def test_a_malformed_decode_job_is_refused_before_it_is_queued_and_others_run_on(checkpoints, change, complaint):
    consumer = engine(checkpoints["tiny"], "kv_consumer")
    try:
        good = consumer.add_request("good", [1, 2, 3, 4, 5, 6], GREEDY)
        consumer.step()
        params = {k: v for k, v in {**HANDLE, **change}.items() if v is not None}
        with pytest.raises(ValueError, match="^kv_transfer_params: ") as refused:
            consumer.add_request("bad", [7, 8, 9, 10, 11], GREEDY, output_token_ids=[3], kv_transfer_params=params)
        assert complaint in str(refused.value)
        assert "bad" not in consumer.scheduler.requests
        out = run([consumer], {"good"})["good"]
        assert out.error is None and len(out.outputs[0].token_ids) == 3 and good.block_ids == []
    finally:
        consumer.close()


def test_a_prefill_job_reusing_the_id_of_kv_still_lent_is_refused_and_the_lent_kv_stays_intact(checkpoints):
    producer = engine(checkpoints["tiny"], "kv_producer")
    consumer = engine(checkpoints["tiny"], "kv_consumer")
    try:
        first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        lend = {"do_remote_decode": True}
        producer.add_request("p", [5, 6, 7, 8, 9, 10, 11, 12, 13], first, kv_transfer_params=lend)
        out = run([producer], {"p"})["p"]
        free = producer.scheduler.pool.num_free
        with pytest.raises(ValueError, match="request id 'p' is in use: this node still lends its KV"):
            producer.add_request("p", [40, 41, 42, 43, 44, 45, 46, 47, 48], first, kv_transfer_params=lend)
        assert producer.scheduler.pool.num_free == free  # nothing was taken
        # The consumer still reads the first request's KV: the offline engine's tokens.
        consumer.add_request("d", out.prompt_token_ids, GREEDY, output_token_ids=list(out.outputs[0].token_ids),
                             kv_transfer_params=out.kv_transfer_params)
        decoded = run([consumer, producer], {"d"})["d"]
        assert decoded.error is None
        whole = engine(checkpoints["tiny"])
        try:
            whole.add_request("w", out.prompt_token_ids, GREEDY)
            assert decoded.outputs[0].token_ids == run([whole], {"w"})["w"].outputs[0].token_ids
        finally:
            whole.close()
        # Once read and released, the id is free again.
        deadline = time.monotonic() + 10
        while producer.connector.ledger.holds("p"):
            assert time.monotonic() < deadline, "the lent KV was never released"
            producer.step()
            time.sleep(0.01)
        producer.add_request("p", [40, 41, 42, 43, 44, 45, 46, 47, 48], first, kv_transfer_params=lend)
        assert run([producer], {"p"})["p"].error is None
    finally:
        producer.close()
        consumer.close()


def test_a_long_poll_with_a_wait_that_never_ends_is_answered_with_an_error_at_once():
    ledger = ProducerLedger(abort_timeout_s=30)
    service = ProducerService("127.0.0.1", 0, {}, long_poll={
        m.WaitKV: lambda msg, final: ledger.progress(msg.request_id, msg.have_blocks, msg.epoch, final)}).start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        with pytest.raises(msgspec.ValidationError):
            m.decode_request(m.encode(m.WaitKV("nobody", wait_s=math.nan)))
        sock.connect(f"tcp://127.0.0.1:{service.port}")
        for bad in (math.nan, math.inf, -1.0):
            sock.send_multipart([b"", b"t", m.encode(m.WaitKV("nobody", wait_s=bad))])
            assert sock.poll(2000, zmq.POLLIN), f"wait_s={bad}: no answer"
            answer = m.decode_response(sock.recv_multipart()[-1])
            assert isinstance(answer, m.ErrorResponse) and "wait_s" in answer.message
    finally:
        sock.close(0)
        service.close()


def test_a_load_waiting_for_a_worker_keeps_its_lease(checkpoints):
    """One load worker, loads of 0.6 s each, leases of 1 s: the second load waits 0.6 s for
    the worker, then reads: its claim is renewed meanwhile, so nothing expires."""
    producer = engine(checkpoints["tiny"], "kv_producer", abort_timeout_s=1.0)
    consumer = engine(checkpoints["tiny"], "kv_consumer", abort_timeout_s=1.0, transfer_timeout_s=5,
                      kv_connector_extra_config={"load_workers": 1, "fault_delay_s": 0.6})
    try:
        first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        prompts = {f"p{i}": [10 + i, 11, 12, 13, 14, 15, 16, 17, 18] for i in range(2)}
        for rid, p in prompts.items():
            producer.add_request(rid, p, first, kv_transfer_params={"do_remote_decode": True})
        prefilled = run([producer], set(prompts))
        for rid, out in prefilled.items():
            consumer.add_request("d" + rid, out.prompt_token_ids, GREEDY, output_token_ids=list(out.outputs[0].token_ids),
                                 kv_transfer_params=out.kv_transfer_params)
        run([consumer, producer], {"dp0", "dp1"})
        assert producer.connector.stats()["holds_expired"] == 0
        assert consumer.connector.stats()["blocks_failed"] == 0
    finally:
        consumer.close()
        producer.close()


def test_a_closed_consumer_leaves_no_file_descriptor_open(checkpoints):
    consumer = engine(checkpoints["tiny"], "kv_consumer")
    wake = consumer.wakeup_fd  # the load threads' wake-up pipe for the node loop
    pipe = os.fstat(wake).st_ino
    consumer.close()
    try:
        assert os.fstat(wake).st_ino != pipe, "the wake-up pipe is still open"
    except OSError:
        pass  # closed


def test_a_nixl_read_given_up_before_it_was_posted_never_writes():
    pytest.importorskip("kv_connector.nixl_compat", reason="nixl not installed")
    from kv_connector.nixl_connector import NixlOwnerThread
    from kv_connector.nixl_transport import NixlTransport

    shape = (8, 2, 2, 4, 2, 16)
    block_bytes = 2 * 2 * 4 * 2 * 16 * 4
    mine = torch.zeros(shape)
    theirs = torch.randn(shape)
    source = NixlTransport(f"test-source-{os.getpid()}")
    owner = None
    try:
        source.register_kv_cache(theirs, block_bytes)
        owner = NixlOwnerThread(f"test-owner-{os.getpid()}", mine, block_bytes)
        peer = owner.call(lambda t: t.add_peer(source.agent_metadata(), source.local_layout()), 10)
        with pytest.raises(TransferError, match="not start|not posted"):
            owner.read(peer, [0, 1], [2, 3], deadline=time.monotonic() - 1)
        time.sleep(0.2)
        assert bool((mine == 0).all()), "a READ its caller gave up on wrote into the blocks"
        owner.read(peer, [0, 1], [2, 3], deadline=time.monotonic() + 10)
        assert torch.equal(mine[[2, 3]], theirs[[0, 1]])
    finally:
        if owner is not None:
            owner.close()
        source.close()
