"""Races at the KV connector's edges, with real engines in this process and real sockets
on 127.0.0.1 (the TCP connector; the pull protocol is the same for NIXL): a load that is
still in flight when its request ends, and what that must never do to the next request."""

from __future__ import annotations

import time

import pytest

from engine.sampling_params import SamplingParams
from tests.test_kv_pull_edges import GREEDY, engine, run

FIRST = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
PROMPT = [10, 11, 12, 13, 14, 15, 16, 17, 18]


def settle(engines, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for e in engines:
            e.step()
        if all(e.scheduler.pool.num_free == e.scheduler.pool.num_blocks for e in engines):
            return
        time.sleep(0.01)
    assert [e.scheduler.pool.num_free for e in engines] == [e.scheduler.pool.num_blocks for e in engines], \
        "KV blocks leaked"


def lend(producer, rid: str) -> dict:
    producer.add_request(rid, PROMPT, FIRST, kv_transfer_params={"do_remote_decode": True})
    return run([producer], {rid})[rid]


@pytest.fixture
def pair(checkpoints):
    producer = engine(checkpoints["tiny"], "kv_producer", abort_timeout_s=30)
    consumer = engine(checkpoints["tiny"], "kv_consumer", transfer_timeout_s=5,
                      kv_connector_extra_config={"fault_delay_s": 0.5})
    try:
        yield producer, consumer
    finally:
        consumer.close()
        producer.close()


def _abort_mid_load(producer, consumer, rid: str):
    out = lend(producer, rid + "-p")
    consumer.add_request(rid, out.prompt_token_ids, GREEDY, output_token_ids=list(out.outputs[0].token_ids),
                         kv_transfer_params=out.kv_transfer_params)
    consumer.step()  # admitted: its load is in flight (fault_delay_s)
    assert rid in consumer.scheduler.waiting_for_remote_kv
    consumer.abort_request(rid)
    return out


def test_a_request_reusing_the_id_of_an_aborted_load_still_in_flight_keeps_no_blocks(pair):
    """A request aborted mid-load keeps its blocks until the load ends. A new request of
    the same id that arrives meanwhile (a client's retry) must not be taken for it: its
    own blocks are freed when it ends, and the old load's blocks when that load ends."""
    producer, consumer = pair
    _abort_mid_load(producer, consumer, "r")
    consumer.add_request("r", PROMPT, GREEDY)  # computed here, no KV to pull
    assert run([consumer], {"r"})["r"].error is None
    settle([consumer, producer])


def test_a_pull_reusing_the_id_of_an_aborted_load_still_in_flight_is_refused_not_mixed_up(pair):
    """The old load's end must not be taken for the new request's (it would decode from
    blocks its own load is still writing): the new pull is refused with a 400 that says
    what to do, and a new id is served as usual."""
    producer, consumer = pair
    _abort_mid_load(producer, consumer, "s")
    out = lend(producer, "s2-p")
    job = dict(prompt=out.prompt_token_ids, params=GREEDY, output_token_ids=list(out.outputs[0].token_ids),
               kv_transfer_params=out.kv_transfer_params)
    with pytest.raises(ValueError, match="request id 's' is in use.*use a new id"):
        consumer.add_request("s", **job)
    consumer.add_request("s-retry", **job)
    got = run([consumer], {"s-retry"})["s-retry"]
    producer.add_request("ref", PROMPT, GREEDY)  # computed in one engine, nothing pulled
    assert got.error is None and got.outputs[0].token_ids == run([producer], {"ref"})["ref"].outputs[0].token_ids
    settle([consumer, producer])


def test_a_streamed_pull_with_a_short_transfer_timeout_waits_out_a_queued_prefill(checkpoints):
    """transfer_timeout_s bounds each long poll's answer, not the prefill: a producer that
    has the job queued for longer than the timeout, with no news to give, is still
    followed, and the KV arrives intact (no failed block, nothing recomputed)."""
    producer = engine(checkpoints["tiny"], "kv_producer", abort_timeout_s=30)
    consumer = engine(checkpoints["tiny"], "kv_consumer", transfer_timeout_s=0.4)
    try:
        handle = {"do_remote_prefill": True, "streamed": True, "remote_engine_id": producer.connector.config.engine_id,
                  "remote_host": "127.0.0.1", "remote_port": producer.connector.service.port,
                  "remote_request_id": "q-p", "num_tokens": len(PROMPT)}
        producer.add_request("q-p", PROMPT, FIRST, kv_transfer_params={"do_remote_decode": True})
        consumer.add_request("q", PROMPT, GREEDY, kv_transfer_params=handle)
        deadline = time.monotonic() + 1.5  # the prefill waits in the producer's queue meanwhile
        while time.monotonic() < deadline:
            consumer.step()
            time.sleep(0.01)
        assert run([producer, consumer], {"q"})["q"].error is None
        assert consumer.connector.stats()["blocks_failed"] == 0
        settle([consumer, producer])
    finally:
        consumer.close()
        producer.close()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_producer_that_does_not_answer_claims_does_not_let_another_producers_leases_lapse(checkpoints):
    """Requests wait in the decode queue with their KV lent by two producers; one of them
    stopped answering (dead, not yet reported). Renewing the claims on the live one must
    not wait behind the silent one's timeouts: its lease (1 s) never runs out."""
    producer = engine(checkpoints["tiny"], "kv_producer", abort_timeout_s=1.0)
    consumer = engine(checkpoints["tiny"], "kv_consumer", abort_timeout_s=1.0, transfer_timeout_s=5)
    try:
        out = lend(producer, "a-p")
        silent = {**out.kv_transfer_params, "remote_port": _free_port(), "remote_request_id": "gone-p"}
        for rid, handle in (("gone", silent), ("a", out.kv_transfer_params)):
            consumer.add_request(rid, out.prompt_token_ids, GREEDY, output_token_ids=list(out.outputs[0].token_ids),
                                 kv_transfer_params=handle)
        deadline = time.monotonic() + 2.5  # the consumer is busy: both wait in its queue, claimed
        while time.monotonic() < deadline:
            producer.step()
            time.sleep(0.05)
        assert producer.connector.stats()["holds_expired"] == 0
        consumer.abort_request("gone")
        assert run([consumer], {"a"})["a"].error is None
        assert consumer.connector.stats()["blocks_failed"] == 0
    finally:
        consumer.close()
        producer.close()
