"""A failure inside an engine step fails only the request that caused it: the batch is
re-run request by request, the offender ends with an error, the rest go on with the very
tokens they would have produced without it."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.builtin_models import resolve_builtin

BAD_SEED = 666


class SamplerThatBreaksOnOneRequest:
    """The real sampler, except that any batch holding the request seeded BAD_SEED raises
    (as a sampler or kernel bug triggered by one request's parameters would)."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.calls = 0

    def __call__(self, logits, rows):
        self.calls += 1
        if any(r.seed == BAD_SEED for r in rows):
            raise RuntimeError("index out of bounds (injected)")
        return self.sampler(logits, rows)


@pytest.fixture(scope="module")
def llm():
    return LLM(str(resolve_builtin("tiny")), dtype="float32", device="cpu", num_blocks=128)


def run(engine, requests):
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    finished = {}
    while engine.has_unfinished_requests:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


def test_a_step_failure_fails_only_the_request_that_caused_it(llm):
    engine = llm.engine
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    good = [("a", "The quick brown fox", greedy), ("b", [5, 6, 7, 8, 9], greedy)]
    want = {rid: out.outputs[0].token_ids for rid, out in run(engine, good).items()}

    engine.sampler = SamplerThatBreaksOnOneRequest(engine.sampler)
    try:
        bad = ("bad", "A request that breaks the sampler", SamplingParams(temperature=0.8, seed=BAD_SEED, max_tokens=8))
        got = run(engine, [("a2", good[0][1], greedy), bad, ("b2", good[1][1], greedy)])
    finally:
        engine.sampler = engine.sampler.sampler
    assert got["bad"].error is not None and "injected" in got["bad"].error
    assert got["bad"].outputs[0].finish_reason == "error"
    assert got["a2"].error is None and got["a2"].outputs[0].token_ids == want["a"]
    assert got["b2"].error is None and got["b2"].outputs[0].token_ids == want["b"]
    assert engine.pool.num_free == engine.pool.num_blocks - engine.pool.num_cached  # nothing leaked
    assert not engine.has_unfinished_requests
