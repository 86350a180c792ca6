"""Streamed pulls: the decode engine gets its job while the prefill engine still computes
it (the router dispatches to both at once), reads each block as soon as its chunk is
computed, and continues from the first token the producer sampled — token for token what
one colocated engine answers. Real engines in separate processes, real transfers."""

from __future__ import annotations

import threading
import time

import pytest

from engine.sampling_params import SamplingParams
from kv_connector import messages as m
from kv_connector.producer_ledger import ProducerLedger
from kv_connector.producer_service import ProducerService, call_struct
from tests.engine_worker import EngineProcess
from tests.test_kv_connector_e2e import CONNECTORS, fresh, reference, reqs, settle

BLOCK = 4
# Long enough for several chunks of the producer's 8-token budget.
PROMPTS = [
    "Streaming prefill: the quick brown fox jumps over the lazy dog, again and again, until the dog wakes up.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\nprint(",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def colocated(checkpoints):
    proc = EngineProcess({"model": str(checkpoints["tiny"]), "block_size": BLOCK, "num_blocks": 128})
    yield proc
    proc.close()


def _kv(model, connector, role, **extra):
    return {"model": str(model), "block_size": BLOCK, "num_blocks": 128, "budget": 8,
            "kv_transfer": {"kv_connector": connector, "kv_role": role, "abort_timeout_s": 30,
                            "transfer_timeout_s": 10, **extra}}


@pytest.fixture(scope="module", params=CONNECTORS)
def pair(request, checkpoints):
    """A producer that prefills in 8-token chunks, and a consumer."""
    producer = EngineProcess(_kv(checkpoints["tiny"], request.param, "kv_producer"))
    consumer = EngineProcess(_kv(checkpoints["tiny"], request.param, "kv_consumer"))
    try:
        yield producer, consumer
    finally:
        producer.close()
        consumer.close()


def streamed_kv(producer, remote_id: str, num_tokens: int) -> dict:
    stats = producer.call(op="stats")["stats"]
    return {"do_remote_prefill": True, "streamed": True, "remote_engine_id": stats["kv_engine_id"],
            "remote_host": "127.0.0.1", "remote_port": stats["service_port"], "remote_request_id": remote_id,
            "num_tokens": num_tokens}


def dispatch_to_both(producer, consumer, prompts, params, prefix, producer_params=None, step_delay_s=0.01,
                     outputs=None):
    """Send the decode jobs first (they wait for KV), then run the prefill jobs. `outputs`:
    tokens the decode jobs already carry (a job the router sent again)."""
    ids = producer.call(op="tokenize", texts=prompts)["token_ids"]
    decode = [{"id": f"{prefix}-d-{i}", "prompt": p, "params": params.to_dict(),
               "output_token_ids": outputs[i] if outputs else None,
               "kv_transfer_params": streamed_kv(producer, f"{prefix}-p-{i}", len(p))} for i, p in enumerate(ids)]
    consumer.send(op="run", requests=decode, timeout_s=60)
    first = producer_params or SamplingParams.from_dict({**params.to_dict(), "max_tokens": 1})
    pre = producer.call(op="run", requests=reqs(ids, first, f"{prefix}-p", kv_transfer_params={"do_remote_decode": True}),
                        step_delay_s=step_delay_s)["results"]
    got = consumer.recv(timeout_s=90)
    return [pre[f"{prefix}-p-{i}"] for i in range(len(ids))], [got["results"][f"{prefix}-d-{i}"] for i in range(len(ids))], got["stats"]


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_streamed_pull_reads_blocks_during_the_prefill_and_equals_colocated(pair, colocated, params):
    producer, consumer = pair
    prompts = fresh(PROMPTS, f"stream-{params.temperature}")
    want = reference(colocated, prompts, params, f"ref-{params.temperature}")
    before = consumer.call(op="stats")["stats"]
    pre, got, stats = dispatch_to_both(producer, consumer, prompts, params, f"s{params.temperature}")
    assert [g["error"] for g in got] == [None] * len(prompts)
    assert [g["token_ids"] for g in got] == want
    # The consumer's tokens start with the producer's first token, and it computed no prompt token.
    assert [g["token_ids"][:1] for g in got] == [p["token_ids"] for p in pre]
    assert stats["num_tokens_computed"] - before["num_tokens_computed"] == len(prompts) * (params.max_tokens - 1)
    kv = stats["kv_transfer"]
    assert kv["streamed_loads"] - before["kv_transfer"]["streamed_loads"] == len(prompts)
    # Blocks of finished chunks moved while later chunks were computed.
    assert kv["stream_blocks_early"] > before["kv_transfer"]["stream_blocks_early"]
    assert kv["blocks_failed"] == 0
    settle(producer, consumer)


def test_a_slow_link_still_overlaps_the_prefill_and_gives_the_same_tokens(pair, colocated):
    """Every streamed read delayed (a slow transfer): the reads still start while later
    chunks compute, and the tokens are the colocated engine's."""
    producer, consumer = pair
    prompts = fresh(PROMPTS[:1], "stream-slow")
    want = reference(colocated, prompts, SEEDED, "ref-slow")
    consumer.call(op="set_faults", faults={"fault_read_delay_s": 0.03})
    try:
        before = consumer.call(op="stats")["stats"]["kv_transfer"]
        _, got, stats = dispatch_to_both(producer, consumer, prompts, SEEDED, "slow", step_delay_s=0.02)
    finally:
        consumer.call(op="set_faults", faults={})
    assert got[0]["error"] is None and got[0]["token_ids"] == want[0]
    assert stats["kv_transfer"]["stream_blocks_early"] > before["stream_blocks_early"]
    settle(producer, consumer)


def test_a_decode_job_that_already_carries_the_first_token_does_not_take_it_twice(pair, colocated):
    """The router resends a decode job with the first token (and the streamed handle) when
    its first submit failed: the producer's token, arriving with the KV, is not appended again."""
    producer, consumer = pair
    prompts = fresh(PROMPTS[:1], "stream-resent")
    want = reference(colocated, prompts, GREEDY, "ref-resent")
    _, got, _ = dispatch_to_both(producer, consumer, prompts, GREEDY, "resent", outputs=[want[0][:1]])
    assert got[0]["error"] is None and got[0]["token_ids"] == want[0]
    settle(producer, consumer)


def test_a_prefill_that_stops_on_its_first_token_leaves_the_consumer_to_compute_it(pair, colocated):
    """The producer ends without lending (here a stop token on its first token): the consumer
    hears `gone` and, under recompute, prefills and samples by itself — the same tokens."""
    producer, consumer = pair
    prompts = fresh(PROMPTS[:1], "stream-stop")
    want = reference(colocated, prompts, GREEDY, "ref-stop")
    stop_first = SamplingParams.from_dict({**GREEDY.to_dict(), "max_tokens": 1, "ignore_eos": False,
                                           "stop_token_ids": [want[0][0]]})
    pre, got, stats = dispatch_to_both(producer, consumer, prompts, GREEDY, "stop", producer_params=stop_first)
    assert pre[0]["finish_reason"] == "stop"
    assert got[0]["error"] is None and got[0]["token_ids"] == want[0]
    settle(producer, consumer)


# --- the producer's side, in-process -------------------------------------------------------
class _Event:
    """Stands for a CUDA event: complete once `done` is set."""

    def __init__(self):
        self.done = False

    def query(self) -> bool:
        return self.done


def test_ledger_reports_blocks_only_once_their_writes_complete_and_new_epochs_after_preemption():
    ledger = ProducerLedger(abort_timeout_s=30)
    assert ledger.progress("r", 0, 0) is None                      # not seen: no news yet
    assert ledger.progress("r", 0, 0, final=True).state == "unknown"
    ledger.expect("r")
    ev = _Event()
    ledger.computed("r", [5, 6], 8, ev)
    assert ledger.progress("r", 0, 0) is None                      # queued on the device, not written
    ev.done = True
    p = ledger.progress("r", 0, 0)
    assert (p.state, p.block_ids, p.num_tokens, p.epoch) == ("computing", [5, 6], 8, 0)
    assert ledger.progress("r", 2, 0) is None                      # nothing the consumer lacks
    ledger.computed("r", [], 0, None)                               # preempted: blocks taken back
    ledger.computed("r", [9], 4, None)
    p = ledger.progress("r", 2, 0)
    assert (p.epoch, p.block_ids) == (1, [9])
    ledger.hold("r", [9, 10, 11], [9, 10, 11], 10, [42])
    p = ledger.progress("r", 1, 1)
    assert (p.state, p.block_ids, p.output_token_ids, p.epoch) == ("done", [9, 10, 11], [42], 1)
    ledger.expect("q")
    ledger.forget("q", "finished_stopped")
    assert ledger.progress("q", 0, 0).state == "gone" and ledger.progress("q", 0, 0).reason == "finished_stopped"


def test_service_answers_a_long_poll_when_progress_arrives_and_serves_others_meanwhile():
    ledger = ProducerLedger(abort_timeout_s=30)
    ledger.expect("r")
    service = ProducerService("127.0.0.1", 0, {m.ClaimRequest: lambda msg: m.ClaimResponse([True])},
                              long_poll={m.WaitKV: lambda msg, final: ledger.progress(msg.request_id, msg.have_blocks,
                                                                                       msg.epoch, final)}).start()
    try:
        answer: list = []
        waiter = threading.Thread(target=lambda: answer.append(call_struct(
            "127.0.0.1", service.port, m.WaitKV("r", 0, 0, wait_s=4.0), m.KVProgress, 10.0)))
        t0 = time.monotonic()
        waiter.start()
        time.sleep(0.1)
        # Parked, yet the service answers other requests.
        assert call_struct("127.0.0.1", service.port, m.ClaimRequest(["x"]), m.ClaimResponse, 2.0).held == [True]
        assert not answer
        ledger.computed("r", [3], 4, None)
        waiter.join(5)
        assert answer and answer[0].block_ids == [3] and time.monotonic() - t0 < 2.0
        # No news within wait_s: the answer is the state as it stands.
        t1 = time.monotonic()
        again = call_struct("127.0.0.1", service.port, m.WaitKV("r", 1, 0, wait_s=0.2), m.KVProgress, 5.0)
        assert again.state == "computing" and again.block_ids == [3] and 0.15 < time.monotonic() - t1 < 2.0
    finally:
        service.close()
