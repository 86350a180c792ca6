"""The engine's lean step: inputs staged in one buffer, the pipelined step (tokens read
one call late, stop strings ending a request one step late without leaking a token),
and the decode CUDA-graph batch sizes. CUDA graphs themselves run only on a GPU
(bench/gpu/engine_smoke.py checks graphs against eager and the CPU there)."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.model_runner import graph_batch_sizes, kv_splits_for
from engine.request import RequestStatus
from engine.scheduler import ScheduledChunk

PROMPTS = ["The quick brown fox", "def main():", "1, 2, 3,", "Hello there, how are"]


@pytest.fixture(scope="module")
def llm():
    return LLM("builtin:tiny", device="cpu", dtype="float32", num_blocks=512, max_num_seqs=8)


def test_graph_batch_sizes_cover_every_batch_up_to_max_num_seqs():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    for n in (3, 17, 100, 256):
        sizes = graph_batch_sizes(n)
        assert sizes[-1] == n and all(any(s >= b for s in sizes) for b in range(1, n + 1))


def test_decode_tokens_take_the_graphs_and_prompt_tokens_do_not(llm, monkeypatch):
    """Graphs run decode tokens; a prompt token computed alone (a fork's last prompt token,
    the last token of a prompt otherwise in the prefix cache) runs on the eager prefill
    kernels, so it gives what a prefill gives on a GPU, where the graphs' products round
    differently (engine/model_runner.py)."""
    runner, eng = llm.engine.runner, llm.engine
    monkeypatch.setattr(runner, "_graphs", {1: None, 2: None, 4: None})  # as if captured
    monkeypatch.setattr(runner, "_graph_sizes", [1, 2, 4])
    plain = eng.add_request("graph-plain", [5, 6, 7], SamplingParams(max_tokens=4))
    fork = eng.add_request("graph-fork", [5, 6, 7], SamplingParams(max_tokens=4), fork_of="graph-plain")
    try:
        decode = ScheduledChunk(plain, start=3, num_tokens=1, sample=True)
        assert runner.graph_size_for([decode]) == 1
        assert runner.graph_size_for([decode, ScheduledChunk(fork, start=3, num_tokens=1, sample=True)]) == 2
        assert runner.graph_size_for([decode, ScheduledChunk(fork, start=2, num_tokens=1, sample=True)]) == 0
        assert runner.graph_size_for([ScheduledChunk(plain, start=2, num_tokens=1, sample=True)]) == 0
        assert runner.graph_size_for([ScheduledChunk(plain, start=0, num_tokens=3, sample=True)]) == 0
        # Eager too, a prompt token alone takes the prefill kernel (decode_only picks the decode one).
        eng.step(), eng.step()  # the parent, then its fork, scheduled: their blocks exist
        assert runner.prepare([decode, ScheduledChunk(fork, start=3, num_tokens=1, sample=True)]).meta.decode_only
        assert not runner.prepare([decode, ScheduledChunk(fork, start=2, num_tokens=1, sample=True)]).meta.decode_only
    finally:
        for rid in ("graph-fork", "graph-plain"):
            eng.abort_request(rid)


def test_kv_splits_fill_the_gpu_at_small_batches_and_vanish_at_large_ones():
    cpu = torch.device("cpu")  # counted as 132 SMs, an H100/H200
    assert kv_splits_for(1, 8, 128, 16, cpu) == 1            # nothing to split
    assert kv_splits_for(1, 8, 8192, 16, cpu) == 32           # one sequence: split wide
    assert kv_splits_for(64, 8, 8192, 16, cpu) == 1           # 512 programs fill the GPU already
    assert kv_splits_for(16, 8, 8192, 16, cpu) == kv_splits_for(16, 8, 8192, 16, cpu) > 1


def test_staged_inputs_match_a_naive_build(llm):
    """Mixed step: a prefill chunk after a prefix hit, a decode row, a recompute chunk."""
    eng = llm.engine
    bs = eng.kv_spec.block_size
    reqs = []
    for i, n in enumerate((40, 9, 33)):
        req = eng.add_request(f"stage-{i}", list(range(5 + i, 5 + i + n)), SamplingParams(max_tokens=4))
        eng.scheduler.waiting.remove(req)
        req.block_ids = list(eng.pool.allocate((n + bs) // bs))[::-1]  # out of order on purpose
        req.status = RequestStatus.RUNNING
        eng.scheduler.running.append(req)
        reqs.append(req)
    chunks = [ScheduledChunk(reqs[0], 16, 24, True), ScheduledChunk(reqs[1], 8, 1, True),
              ScheduledChunk(reqs[2], 0, 17, False)]
    inputs = eng.runner.prepare(chunks)
    ids, pos, slots = [], [], []
    for c in chunks:
        ids += c.request.token_slice(c.start, c.start + c.num_tokens)
        for p in range(c.start, c.start + c.num_tokens):
            pos.append(p)
            slots.append(c.request.block_ids[p // bs] * bs + p % bs)
    assert inputs.input_ids.tolist() == ids
    assert inputs.positions.tolist() == pos
    assert inputs.meta.slot_mapping.tolist() == slots
    assert inputs.meta.seq_lens == [40, 9, 17] and inputs.meta.seq_lens_t.tolist() == [40, 9, 17]
    assert inputs.meta.query_start_loc == [0, 24, 25, 42]
    assert inputs.meta.query_start_loc_t.tolist() == [0, 24, 25, 42]
    assert inputs.logits_indices.tolist() == [23, 24]
    table = inputs.meta.block_tables.tolist()
    for row, c in zip(table, chunks):
        n = (c.start + c.num_tokens + bs - 1) // bs
        assert row[:n] == c.request.block_ids[:n]
    assert not inputs.meta.decode_only
    for r in reqs:
        eng.abort_request(r.request_id)
    eng.step()
    assert eng.pool.num_free == eng.pool.num_blocks


def test_a_stop_string_ends_the_request_without_the_token_computed_after_it(llm):
    """The stop string is found while the next step runs; that step's token for the
    request is dropped, so the answer is the unconstrained answer cut at the stop."""
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    full = llm.generate(PROMPTS, greedy)
    for out in full:
        text = out.outputs[0].text
        stop = text[len(text) // 3:len(text) // 3 + 2]
        if not stop.strip():
            continue
        cut = text[:text.index(stop)]
        got = llm.generate(out.prompt, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop]))[0]
        comp = got.outputs[0]
        assert comp.text == cut and comp.finish_reason == "stop" and comp.stop_reason == stop
        assert comp.token_ids == out.outputs[0].token_ids[:len(comp.token_ids)]
        # The token that completed the stop string is the last one reported, no more.
        assert len(comp.token_ids) < len(out.outputs[0].token_ids)
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks


def test_streamed_steps_report_every_token_once_and_end_with_finished(llm):
    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"stream-{i}", p, params)
    seen = {f"stream-{i}": [] for i in range(len(PROMPTS))}
    finished = set()
    while eng.has_unfinished_requests:
        for out in eng.step():
            assert out.request_id not in finished
            seen[out.request_id] += out.new_token_ids
            if out.finished:
                finished.add(out.request_id)
    assert [seen[f"stream-{i}"] for i in range(len(PROMPTS))] == want
    assert finished == set(seen)


def test_abort_while_a_step_is_in_flight_keeps_the_other_requests_exact(llm):
    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"abort-{i}", p, params)
    for _ in range(3):
        eng.step()  # leaves a step in flight
    gone = eng.abort_request("abort-1")
    assert gone is not None and gone.finished and gone.outputs[0].finish_reason == "abort"
    results = {}
    while eng.has_unfinished_requests:
        for out in eng.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
    assert "abort-1" not in results
    for i in (0, 2, 3):
        assert results[f"abort-{i}"] == want[i]
    assert eng.pool.num_free == eng.pool.num_blocks


def test_seeded_sampling_and_logprobs_survive_the_pipeline(llm):
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=8, logprobs=2, ignore_eos=True)
    a = llm.generate(PROMPTS, params)
    b = [llm.generate(p, params)[0] for p in PROMPTS]
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        lx, ly = x.outputs[0].logprobs, y.outputs[0].logprobs
        assert len(lx) == len(x.outputs[0].token_ids) == len(ly)
        for p, q in zip(lx, ly):
            assert p.token_id == q.token_id and abs(p.logprob - q.logprob) < 1e-4
            assert torch.isfinite(torch.tensor(p.logprob))


def test_decode_steps_queued_ahead_give_the_tokens_of_the_plain_loop(llm):
    """Async scheduling (a decode step queued before the previous step's tokens are read)
    must not change a token: greedy, seeded, logprobs, eos and max_tokens endings alike.
    On a CPU the run-ahead path runs with the host as the device."""
    eng = llm.engine
    cases = [SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
             SamplingParams(temperature=0.8, top_k=40, seed=3, max_tokens=7, logprobs=1),
             SamplingParams(temperature=1.0, seed=11, max_tokens=12),
             SamplingParams(temperature=0.0, max_tokens=5, repetition_penalty=1.3)]
    results = {}
    for async_scheduling in (True, False):
        eng.config.async_scheduling = async_scheduling
        before = eng.num_steps_run_ahead
        outs = llm.generate(PROMPTS * 2, cases * 2)
        results[async_scheduling] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason,
                                      [lp.token_id for lp in o.outputs[0].logprobs or []]) for o in outs]
        ran_ahead = eng.num_steps_run_ahead - before
        assert (ran_ahead > 0) == async_scheduling
    eng.config.async_scheduling = True
    assert results[True] == results[False]
    assert eng.pool.num_free == eng.pool.num_blocks


def test_min_tokens_lifts_its_ban_at_the_same_token_whether_steps_are_queued_ahead_or_not(llm):
    """A step queued ahead samples before the token in flight is appended: min_tokens is
    counted by the step, not by the output list, or eos and stop ids stay banned a token
    too long and async scheduling answers differently from sync."""
    eng = llm.engine
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    ref = llm.generate([PROMPTS[0]], free)[0].outputs[0].token_ids
    m = next(m for m in range(2, 10) if ref[m] not in ref[:m])  # token m is new: a stop id at m only
    params = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=m, stop_token_ids=[ref[m]])
    got = {}
    for async_scheduling in (False, True):
        eng.config.async_scheduling = async_scheduling
        got[async_scheduling] = llm.generate([PROMPTS[0]], params)[0].outputs[0]
    eng.config.async_scheduling = True
    for out in got.values():
        assert (out.token_ids, out.finish_reason, out.stop_reason) == (ref[:m + 1], "stop", ref[m])


def test_blocks_taken_by_steps_queued_ahead_belong_to_the_request_s_workflow():
    """An agent's output is part of its next turn's prompt: every block of a workflow's
    request is the workflow's (protected by the `workflow` eviction policy), including
    those a decode step queued ahead takes."""
    llm = LLM("builtin:tiny", device="cpu", dtype="float32", block_size=4, num_blocks=64, max_num_seqs=4)
    eng = llm.engine
    req = eng.add_request("turn", [5, 6, 7, 8, 9], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                          workflow_id="wf-1")
    blocks: list[int] = []
    while eng.has_unfinished_requests:
        blocks = list(req.block_ids) or blocks
        eng.step()
    assert eng.num_steps_run_ahead > 0 and len(blocks) == 6  # 24 tokens' KV: the last token's is never computed
    assert [eng.pool.block_workflow[b] for b in blocks] == ["wf-1"] * 6


def test_a_kv_load_failing_while_a_step_is_queued_ahead_leaves_the_other_requests_text_in_order(llm):
    """Under `fail`, a failed load ends its request between two queued steps: the step read
    first is detokenized first, so a request decoding beside it streams the plain text."""
    import select

    from engine.config import CacheConfig, EngineConfig
    from engine.llm_engine import LLMEngine
    from kv_connector.config import KVTransferConfig

    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    want = llm.generate([PROMPTS[1]], params)[0].outputs[0]
    kv = KVTransferConfig(kv_connector="tcp", kv_role="kv_consumer", load_failure_policy="fail",
                          transfer_timeout_s=1, kv_connector_extra_config={"fault_refuse_handshake": True})
    eng = LLMEngine(EngineConfig(model="builtin:tiny", dtype="float32", device="cpu",
                                 cache=CacheConfig(num_blocks=128), kv_transfer=kv))
    try:
        eng.add_request("plain", PROMPTS[1], params)
        text = ""
        for _ in range(4):
            text += "".join(o.new_text for o in eng.step())
        eng.add_request("pulled", [3, 4, 5, 6, 7, 8], SamplingParams(max_tokens=4), kv_transfer_params={
            "do_remote_prefill": True, "remote_engine_id": "gone", "remote_host": "127.0.0.1", "remote_port": 9,
            "remote_request_id": "gone-p", "remote_block_ids": [0], "num_tokens": 6})
        text += "".join(o.new_text for o in eng.step())  # admits it: its load starts and fails
        assert select.select([eng.wakeup_fd], [], [], 10)[0], "the failed load was never reported"
        before, errors = eng.num_steps_run_ahead, []
        while eng.has_unfinished_requests:
            for o in eng.step():
                if o.request_id == "pulled":
                    errors.append(o.error)
                    assert o.error_is_unavailable and not o.error_is_client_side  # the node answers 503
                else:
                    text += o.new_text
        assert eng.num_steps_run_ahead > before
        assert len(errors) == 1 and "handshake refused" in errors[0]
        assert text == want.text
    finally:
        eng.close()


def test_loads_that_land_together_never_put_more_than_max_num_seqs_in_a_step():
    """Requests waiting for remote KV hold no running slot; when their loads land beside a
    full batch, each step still takes at most max_num_seqs of them, the rest in turn."""
    from engine.block_pool import BlockPool
    from engine.config import CacheConfig, SchedulerConfig
    from engine.request import Request
    from engine.scheduler import Scheduler

    class RemotePrompts:  # the SchedulerConnector protocol: every prompt but its last token arrives
        def get_num_new_matched_tokens(self, req, num_computed):
            return req.num_tokens - 1 - num_computed

        def start_load(self, req, num_computed, num_external):
            pass

        def request_finished(self, req):
            return False

    sched = Scheduler(CacheConfig(block_size=4), SchedulerConfig(max_num_seqs=2), BlockPool(64), RemotePrompts())

    def request(rid, remote):
        return Request(rid, list(range(1, 10)), SamplingParams(), 0, 8,
                       kv_transfer_params={"do_remote_prefill": True} if remote else None)

    for rid in ("r1", "r2"):
        sched.add_request(request(rid, True))
    assert sched.schedule().chunks == [] and len(sched.waiting_for_remote_kv) == 2
    for rid in ("a", "b"):
        sched.add_request(request(rid, False))
    assert [c.request.request_id for c in sched.schedule().chunks] == ["a", "b"]
    sched.remote_kv_ready("r1")
    sched.remote_kv_ready("r2")
    assert [c.request.request_id for c in sched.schedule().chunks] == ["a", "b"]
    sched.finish_request(sched.requests["a"], RequestStatus.FINISHED_STOPPED)
    assert [c.request.request_id for c in sched.schedule().chunks] == ["b", "r1"]


def test_chunked_prefill_off_needs_a_step_budget_as_long_as_the_context():
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(8\) is smaller than max_model_len \(64\) with "
                                         "chunked prefill off"):
        LLM("builtin:tiny", device="cpu", dtype="float32", num_blocks=64, max_model_len=64,
            max_num_batched_tokens=8, enable_chunked_prefill=False)
    llm = LLM("builtin:tiny", device="cpu", dtype="float32", num_blocks=64, max_model_len=64,
              max_num_batched_tokens=64, enable_chunked_prefill=False)
    out = llm.generate([list(range(1, 61))], SamplingParams(max_tokens=2, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 2


def test_a_refused_duplicate_request_id_leaves_the_live_request_s_grammar_alone(llm):
    eng = llm.engine
    eng.add_request("dup", [5, 6, 7], SamplingParams(temperature=0, max_tokens=4))
    try:
        with pytest.raises(ValueError, match="request id 'dup' is already in use"):
            eng.add_request("dup", [5, 6, 7], SamplingParams(max_tokens=4, structured_outputs={"regex": "[0-9]+"}))
        assert "dup" not in eng.structured.states
    finally:
        eng.abort_request("dup")


def test_a_prefill_whose_first_token_completes_a_stop_string_lends_no_kv():
    """A prefill job (max_tokens=1, lending its KV) whose one token also completes a stop
    string ends with "stop": the router sends no decode job and releases nothing, so the
    KV must not stay lent until abort_timeout_s."""
    from engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from engine.llm_engine import LLMEngine
    from kv_connector.config import KVTransferConfig

    engine = LLMEngine(EngineConfig(model="builtin:tiny", device="cpu", dtype="float32",
                                    cache=CacheConfig(block_size=4, num_blocks=64),
                                    scheduler=SchedulerConfig(max_num_seqs=4),
                                    kv_transfer=KVTransferConfig(kv_connector="tcp", kv_role="kv_producer")))
    try:
        prompt, lend = list(range(100, 122)), {"do_remote_decode": True}

        def prefill(rid: str, stop: list[str] | None):
            engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, stop=stop),
                               kv_transfer_params=dict(lend))
            while engine.has_unfinished_requests:
                done = [o for o in engine.step() if o.finished]
                if done:
                    return done[0].outputs[0]

        first = prefill("plain", None)
        assert first.finish_reason == "length" and engine.connector.stats()["requests_held"] == 1
        engine.release_lent_kv("plain")
        engine.step()
        assert engine.pool.num_free == engine.pool.num_blocks
        text = engine.tokenizer.decode(first.token_ids)
        assert text.strip()
        stopped = prefill("stopped", [text.strip()[0]])
        assert stopped.finish_reason == "stop" and stopped.token_ids == first.token_ids
        engine.step()  # blocks released by the connector come back at the next poll
        assert engine.connector.stats()["requests_held"] == 0
        assert engine.pool.num_free == engine.pool.num_blocks and not engine.scheduler._lent
    finally:
        engine.close()


def test_a_growing_token_array_follows_its_list():
    from engine.request import GrowingArray
    tokens, arr = [5, 6], GrowingArray()
    assert arr.of(tokens).tolist() == [5, 6]
    for t in range(7, 40):
        tokens.append(t)
        assert arr.of(tokens).tolist() == tokens
    tokens += [1, 2, 3]
    first = arr.of(tokens)
    assert first.tolist() == tokens and first.dtype.name == "int64"
    tokens.append(99)
    assert arr.of(tokens)[-1] == 99 and first.tolist() == tokens[:-1]  # a view given out stays as it was
    kept = arr.of(tokens)
    assert arr.of([4, 4]).tolist() == [4, 4]                          # another list: a new copy
    assert kept.tolist() == tokens                                     # ... which leaves the old view alone
    assert arr.of([]).tolist() == []


def test_penalised_requests_sample_from_token_arrays_kept_across_steps_as_from_their_lists(llm, monkeypatch):
    """Rows with a penalty get their tokens as numpy arrays extended step by step (the
    sampler scatters every token each step); fresh copies of the lists give the same tokens."""
    import numpy as np
    from engine.request import Request

    cases = [SamplingParams(temperature=0.0, max_tokens=24, repetition_penalty=2.0),
             SamplingParams(temperature=0.0, max_tokens=24, frequency_penalty=1.5, presence_penalty=0.5),
             SamplingParams(temperature=0.9, seed=4, max_tokens=24, repetition_penalty=1.5, frequency_penalty=0.5)]
    kept = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:3], cases)]
    monkeypatch.setattr(Request, "token_arrays",
                        lambda self: (np.array(self.prompt_token_ids, dtype=np.int64),
                                      np.array(self.output_token_ids, dtype=np.int64)))
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:3], cases)] == kept
    plain = SamplingParams(temperature=0.0, max_tokens=24)
    assert llm.generate(PROMPTS[:1], plain)[0].outputs[0].token_ids != kept[0]  # the penalty mattered


def test_penalised_requests_run_ahead_with_the_tokens_of_the_plain_loop(llm):
    """A penalty counts the token still in flight on the device, so penalised requests
    take queued-ahead steps too, and sample what the unqueued loop samples."""
    eng = llm.engine
    cases = [SamplingParams(temperature=0.0, max_tokens=20, repetition_penalty=2.0, ignore_eos=True),
             SamplingParams(temperature=0.0, max_tokens=20, frequency_penalty=1.5, presence_penalty=0.7,
                            ignore_eos=True),
             SamplingParams(temperature=0.9, seed=5, max_tokens=20, repetition_penalty=1.4, frequency_penalty=0.4,
                            ignore_eos=True)]
    # Unpenalised, greedy repeats its last token on these prompts (487, 487, 487; 938, 938):
    # a penalty that missed the token in flight would let it repeat.
    prompts = ["0 0 0 0", "Hello there, how are", "0 0 0 0"]
    results = {}
    for async_scheduling in (True, False):
        eng.config.async_scheduling = async_scheduling
        before = eng.num_steps_run_ahead
        results[async_scheduling] = [o.outputs[0].token_ids for o in llm.generate(prompts, cases)]
        assert (eng.num_steps_run_ahead - before > 10) == async_scheduling
    eng.config.async_scheduling = True
    assert results[True] == results[False]
    plain = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    repeats = llm.generate(prompts[:2], plain)
    assert all(any(a == b for a, b in zip(o.outputs[0].token_ids, o.outputs[0].token_ids[1:])) for o in repeats)
