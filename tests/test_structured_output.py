"""The engine side of structured outputs: both grammar backends on a real engine, the
compile cache, the bitmask op, the reasoning gate, and the property the prefill/decode
split rests on: an engine handed the tokens another one produced continues the same
grammar state and samples what one engine alone would have."""

from __future__ import annotations

import json
import re
import threading

import pytest
import torch

from engine import LLM, SamplingParams
from engine.structured_output import manager as manager_module
from engine.structured_output.backends import closed_schema
from engine.structured_output.manager import StructuredOutputManager, apply_token_bitmask
from engine.structured_output.params import StructuredOutputsParams, backend_unavailable, resolve_backend

BACKENDS = ["xgrammar", "guidance"]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                            "maximum": 99}},
          "required": ["ok", "n"]}


@pytest.fixture(scope="module")
def llm():
    return LLM("builtin:tiny-chat", dtype="float32", device="cpu", num_blocks=128)


def constrained(backend: str, **kind) -> dict:
    return {"backend": backend, "disable_any_whitespace": True, "disable_additional_properties": True, **kind}


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_constrains_a_real_engine(llm, backend):
    greedy = SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=constrained(backend, json=SCHEMA))
    seeded = SamplingParams(temperature=1.0, seed=5, max_tokens=60, structured_outputs=constrained(backend, json=SCHEMA))
    for out in llm.generate(["Hello", "def f(x):"], greedy) + llm.generate(["Numbers:"], seeded):
        assert out.outputs[0].finish_reason == "stop"
        obj = json.loads(out.outputs[0].text)
        assert set(obj) == {"ok", "n"} and isinstance(obj["ok"], bool) and 0 <= obj["n"] <= 99
    regex = SamplingParams(temperature=1.0, seed=1, max_tokens=20,
                           structured_outputs={"backend": backend, "regex": r"[a-z]{2,4}\d"})
    assert re.fullmatch(r"[a-z]{2,4}\d", llm.generate(["Hi"], regex)[0].outputs[0].text)


def test_a_grammar_is_compiled_once_per_key(llm):
    structured = llm.engine.structured
    params = SamplingParams(temperature=0.0, max_tokens=8, structured_outputs=constrained("xgrammar", choice=["a b", "c"]))
    before = (structured.compile_misses, structured.compile_hits)
    llm.generate(["one", "two", "three"], params)
    assert (structured.compile_misses - before[0], structured.compile_hits - before[1]) == (1, 2)
    assert not structured.states  # finished requests leave nothing behind


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_engine_continuing_from_produced_tokens_samples_what_one_engine_would(llm, backend):
    """The decode node's view: prompt + tokens made elsewhere (first token from the prefill
    node, or everything before a failover) -> same tokens as an uninterrupted run."""
    for sampling in (dict(temperature=0.0), dict(temperature=0.9, seed=42)):
        params = SamplingParams(max_tokens=40, structured_outputs=constrained(backend, json=SCHEMA), **sampling)
        whole = llm.generate(["Tell me"], params)[0].outputs[0]
        for cut in (1, 5):
            engine = llm.engine
            engine.add_request(f"cont-{backend}-{cut}", "Tell me", SamplingParams(
                max_tokens=40 - cut, structured_outputs=constrained(backend, json=SCHEMA), **sampling),
                output_token_ids=whole.token_ids[:cut])
            tokens = None
            while engine.has_unfinished_requests:
                for out in engine.step():
                    if out.finished:
                        tokens = out.outputs[0].token_ids
            assert tokens == whole.token_ids


def test_tokens_that_break_the_grammar_are_refused_at_admission(llm):
    bad = llm.engine.tokenizer.encode("zzz", add_special_tokens=False)
    with pytest.raises(ValueError, match="breaks the request's json constraint"):
        llm.engine.add_request("bad", "Hi", SamplingParams(structured_outputs=constrained("xgrammar", json=SCHEMA)),
                               output_token_ids=bad)
    assert "bad" not in llm.engine.structured.states


@pytest.mark.parametrize("backend,spec", [("xgrammar", {"regex": "[a-"}), ("guidance", {"regex": "(a"}),
                                          ("xgrammar", {"grammar": "root ::= nothing"}),
                                          ("guidance", {"json": {"type": "nonsense"}})])
def test_a_constraint_that_does_not_compile_is_a_value_error(llm, backend, spec):
    with pytest.raises(ValueError, match=f"does not compile with {backend}"):
        llm.engine.add_request("x", "Hi", SamplingParams(structured_outputs={"backend": backend, **spec}))


@pytest.mark.parametrize("extra", [
    dict(min_tokens=6, structured_outputs={"backend": "xgrammar", "choice": ["yes"]}),  # eos needed, eos banned
    dict(structured_outputs={"backend": "xgrammar", "regex": "[^\\s\\S]"}),           # matches nothing
], ids=["min_tokens_against_the_grammar", "unsatisfiable"])
def test_a_constraint_that_allows_no_token_ends_the_request_without_a_forbidden_token(llm, extra):
    out = llm.generate(["Hello"], SamplingParams(max_tokens=10, temperature=0.0, **extra))[0]
    completion = out.outputs[0]
    assert completion.finish_reason == "error" and "allows no token here" in out.error
    assert all(0 <= t for t in completion.token_ids)
    allowed = "yes" if "choice" in extra["structured_outputs"] else ""
    assert allowed.startswith(completion.text)  # only what the grammar allowed, nothing after
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks


@pytest.mark.parametrize("spec, message", [
    ({"choice": "yes"}, "choice must be a non-empty list of strings"),  # not split into y|e|s
    ({"choice": ["x" * 40] * 2000}, "characters long: at most 65536"),
    ({"regex": "a" * 70000}, "characters long: at most 65536"),
])
def test_constraints_that_are_not_a_list_or_too_big_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams.from_dict(spec)


def test_a_node_compiles_a_new_grammar_off_its_loop_while_the_other_requests_run(monkeypatch):
    """Nodes compile grammars on a worker thread: a schema whose compile is held (a gate in
    front of the real compile stands in for a big one that takes seconds) waits in the
    queue while a plain request runs to its end; then it runs, and a constraint that does
    not compile ends its request with the compiler's message."""
    from engine.config import CacheConfig, EngineConfig
    from engine.llm_engine import LLMEngine

    eng = LLMEngine(EngineConfig(model="builtin:tiny-chat", dtype="float32", device="cpu",
                                 cache=CacheConfig(num_blocks=64), background_grammar_compile=True))
    release = threading.Event()
    try:
        schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(5)}}
        slow = SamplingParams(max_tokens=4, temperature=0.0, structured_outputs=constrained("xgrammar", json=schema))
        made_on = []
        real_build, real_compile = manager_module.build_backend, StructuredOutputManager._compile_with

        def held_compile(backends, params):
            if params.json is not None:
                assert release.wait(60), "the test never released the held compile"
            return real_compile(backends, params)

        monkeypatch.setattr(manager_module, "build_backend",
                            lambda *a: made_on.append(threading.current_thread().name) or real_build(*a))
        monkeypatch.setattr(StructuredOutputManager, "_compile_with", staticmethod(held_compile))
        eng.add_request("slow", "Hi", slow)
        eng.add_request("bad", "Hi", SamplingParams(max_tokens=4, structured_outputs={"backend": "xgrammar",
                                                                                      "regex": "[a-"}))
        eng.add_request("plain", "Hello", SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        done = {}
        while "plain" not in done:
            done.update((o.request_id, o) for o in eng.step() if o.finished)
        assert not eng.structured.ready("slow") and "slow" not in done
        release.set()
        while eng.has_unfinished_requests:
            done.update((o.request_id, o) for o in eng.step() if o.finished)
        assert done["plain"].error is None and len(done["plain"].outputs[0].token_ids) == 4
        assert done["slow"].error is None and done["slow"].outputs[0].text.startswith("{")
        assert "does not compile with xgrammar" in done["bad"].error and done["bad"].error_is_client_side
        # The backend itself (seconds for a big vocabulary) was made off the loop too.
        assert made_on and all(name.startswith("grammar-compile") for name in made_on), made_on
    finally:
        release.set()
        eng.close()


def test_the_grammar_waits_for_the_reasoning_to_end(llm):
    tok = llm.engine.tokenizer
    end = tok.token_to_id("</think>")
    manager = StructuredOutputManager(tok, llm.engine.model_config.vocab_size)
    params = StructuredOutputsParams(choice=["yes", "no"], backend="xgrammar", reasoning_end_token_id=end)
    manager.add_request("r", params, tok.encode("some thoughts", add_special_tokens=False))
    logits = torch.zeros(1, manager.vocab_size)
    manager.apply_bitmask(logits, ["r"])
    assert torch.isfinite(logits).all()            # still reasoning: free
    manager.accept_tokens(["r"], [end])
    manager.apply_bitmask(logits, ["r"])
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    assert allowed and all("yes".startswith(t) or "no".startswith(t) for t in map(lambda i: tok.decode([i]), allowed))
    # A request replayed with the end token already produced starts constrained.
    manager.add_request("s", params, tok.encode("x", add_special_tokens=False) + [end])
    assert manager.states["s"].active


def test_bitmask_op_matches_a_per_token_reference():
    g = torch.Generator().manual_seed(0)
    vocab, words = 70, 3
    bitmask = torch.randint(-2 ** 31, 2 ** 31 - 1, (2, words), dtype=torch.int32, generator=g)
    logits = torch.randn(4, vocab, generator=g)
    want = logits.clone()
    for j, row in enumerate([3, 1]):
        for v in range(vocab):
            if not (int(bitmask[j, v // 32]) >> (v % 32)) & 1:
                want[row, v] = float("-inf")
    apply_token_bitmask(logits, bitmask, [3, 1])
    assert torch.equal(logits, want)


def test_a_large_batch_advances_its_matchers_from_several_threads_as_one_thread_would(llm, monkeypatch):
    """xgrammar releases the GIL while it accepts a token: a step's matchers advance from a
    thread pool (4-5x less host time at batch 64), with the same states and refusals."""
    from engine.structured_output import backends

    vocab = llm.engine.model_config.vocab_size
    rids = [f"r{i}" for i in range(16)]
    so = StructuredOutputsParams(**constrained("xgrammar", json=SCHEMA))
    threads_seen: set[str] = set()
    accept = backends._XGrammarMatcher.accept
    monkeypatch.setattr(backends._XGrammarMatcher, "accept",
                        lambda self, t: threads_seen.add(threading.current_thread().name) or accept(self, t))
    managers = []
    for threads in (1, 4):
        monkeypatch.setattr(backends, "FILL_THREADS", threads)
        m = StructuredOutputManager(llm.engine.tokenizer, vocab)
        for rid in rids:
            m.add_request(rid, so, [])
        managers.append(m)
    g = torch.Generator().manual_seed(0)
    for step in range(12):
        logits = torch.randn(len(rids), vocab, generator=g)
        masked = [logits.clone() for _ in managers]
        for m, x in zip(managers, masked):
            m.apply_bitmask(x, rids)
        assert torch.equal(masked[0], masked[1])
        tokens = masked[0].argmax(dim=-1).tolist()
        tokens[3] = int(torch.isinf(masked[0][3]).nonzero()[0])  # a token row 3's grammar forbids
        assert [m.accept_tokens(rids, tokens) for m in managers] == [["r3"], ["r3"]]
    assert len({t for t in threads_seen if t.startswith("grammar-accept")}) > 1


def test_a_fill_that_fails_fails_the_step_without_reading_its_tokens_twice(llm, monkeypatch, caplog):
    """The node fails its requests when a step raises (fail_request settles what is in
    flight): the step whose tokens the failed step had already read is not read again,
    and the failure is raised once, not again by the next request's grammar work."""
    eng = llm.engine
    so = {"backend": "xgrammar", "regex": r"[a-z]{30,40}"}
    req = eng.add_request("flaky", "Hi", SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True,
                                                       structured_outputs=so))
    fill, fills = eng.structured._fill, []

    def flaky_fill(plan, vocab):
        fills.append(eng.num_steps_run_ahead)
        if len(fills) == 6:
            raise RuntimeError("the matcher's fill failed")
        return fill(plan, vocab)
    monkeypatch.setattr(eng.structured, "_fill", flaky_fill)
    with pytest.raises(RuntimeError, match="fill failed"):
        for _ in range(40):
            eng.step()
    tokens = list(req.output_token_ids)
    out = eng.fail_request("flaky", "engine error")
    assert fills[-1] > 0  # it failed in a step queued ahead
    assert out.finished and req.output_token_ids == tokens
    assert not eng.has_unfinished_requests
    monkeypatch.setattr(eng.structured, "_fill", fill)
    after = eng.add_request("after", "Hi", SamplingParams(max_tokens=4, structured_outputs=so))
    with caplog.at_level("WARNING", logger="engine.llm_engine"):
        while eng.has_unfinished_requests:
            eng.step()
    assert len(after.output_token_ids) == 4 and after.error is None
    assert "failed" not in caplog.text  # not retried one by one after the failure came back


def test_a_token_its_grammar_refuses_in_a_queued_ahead_step_ends_that_request_only(llm, monkeypatch):
    """A refused token in a run-ahead step (here forced past the mask once) ends its
    request with the grammar's error, and the rest of the batch goes on."""
    eng = llm.engine
    so = {"backend": "xgrammar", "regex": r"[a-z]{30,40}"}
    apply, calls = eng.structured.apply_bitmask, []

    def force_a_forbidden_token(logits, request_ids):
        apply(logits, request_ids)
        calls.append(eng.num_steps_run_ahead)
        if len(calls) == 6 and "victim" in request_ids:
            row = request_ids.index("victim")
            forbidden = int(torch.isinf(logits[row]).nonzero()[0])
            with torch.inference_mode():  # the runner's logits are inference tensors
                logits[row] = float("-inf")
                logits[row, forbidden] = 0.0
    monkeypatch.setattr(eng.structured, "apply_bitmask", force_a_forbidden_token)
    victim = eng.add_request("victim", "Hi", SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                                                            structured_outputs=so))
    other = eng.add_request("other", "Hi", SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                                                          structured_outputs=so))
    finals = {}
    while eng.has_unfinished_requests:
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out
    assert calls[5] > 0  # the forced step was one queued ahead
    assert "grammar forbids" in finals["victim"].error and finals["victim"].outputs[0].finish_reason == "error"
    assert finals["other"].error is None and len(other.output_token_ids) == 30
    assert all(c.isalpha() and c.islower() for c in finals["other"].outputs[0].text)
    assert not eng.structured.states and eng.pool.num_free == eng.pool.num_blocks
    assert len(victim.output_token_ids) < 30


def test_requests_without_a_grammar_leave_the_logits_alone(llm):
    manager = StructuredOutputManager(llm.engine.tokenizer, 64)
    logits = torch.randn(3, 64)
    before = logits.clone()
    manager.apply_bitmask(logits, ["a", "b", "c"])
    assert torch.equal(logits, before) and manager._host_bitmask is None


def test_backend_names_resolve_or_say_what_to_install():
    assert resolve_backend("auto") == "xgrammar" and resolve_backend("llguidance") == "guidance"
    with pytest.raises(ValueError, match="use one of auto, xgrammar, guidance"):
        resolve_backend("nope")
    for name in ("outlines", "lm-format-enforcer"):
        problem = backend_unavailable(name)
        if problem is not None:
            assert "pip install" in problem or "use xgrammar" in problem
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="whitespace_pattern is not supported"):
        StructuredOutputsParams(regex="a", whitespace_pattern=r"\s")


def test_sampling_params_carry_the_constraint_over_the_wire():
    params = SamplingParams(structured_outputs={"json": json.dumps(SCHEMA), "backend": "guidance"})
    back = SamplingParams.from_dict(json.loads(json.dumps(params.to_dict())))
    assert back.structured_outputs == params.structured_outputs and back.structured_outputs.json == SCHEMA


def test_disable_additional_properties_closes_every_object():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {}},
                                               "b": {"type": "object", "additionalProperties": True}}}
    closed = closed_schema(schema)
    assert closed["additionalProperties"] is False and closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["b"]["additionalProperties"] is True


def test_outlines_backend_constrains_where_installed(llm):
    pytest.importorskip("outlines_core", reason="outlines is an optional backend: pip install outlines-core")
    for spec in ({"json": SCHEMA, "disable_any_whitespace": True}, {"choice": ["yes", "no way"]}):
        out = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=60,
                                                     structured_outputs={"backend": "outlines", **spec}))[0].outputs[0]
        assert out.finish_reason == "stop"
        if "json" in spec:
            assert set(json.loads(out.text)) == {"ok", "n"}
        else:
            assert out.text in ("yes", "no way")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_complete_grammar_allows_only_eos_after_it(llm, backend):
    # ignore_eos keeps the request going past the grammar's end: nothing but eos may follow.
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                            structured_outputs={"backend": backend, "choice": ["yes", "no"]})
    out = llm.generate(["Hello"], params)[0].outputs[0]
    eos = llm.engine.tokenizer.eos_token_ids
    assert out.text in ("yes", "no") and out.finish_reason == "length" and out.token_ids[-1] in eos


def test_auto_takes_xgrammar_and_falls_back_to_guidance_for_what_xgrammar_cannot_compile(llm):
    manager = llm.engine.structured
    lark = StructuredOutputsParams(grammar='start: "a" "b"+', backend="auto")   # Lark: guidance's syntax
    ebnf = StructuredOutputsParams(grammar='root ::= "a" "b"+', backend="auto")  # GBNF: both read it
    assert manager.compile(lark)[0] == "guidance" and manager.compile(ebnf)[0] == "xgrammar"
    out = llm.generate(["Hi"], SamplingParams(temperature=1.0, seed=2, max_tokens=8, ignore_eos=True,
                                              structured_outputs=lark))[0].outputs[0]
    assert re.fullmatch(r"ab+", out.text)
    with pytest.raises(ValueError, match="xgrammar.*guidance"):
        manager.compile(StructuredOutputsParams(grammar="start: (", backend="auto"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_grammar_rows_run_ahead_with_the_tokens_of_the_plain_loop(llm, backend):
    """Async scheduling keeps grammar rows: the forward is queued before the previous token
    is read, the mask filled once it is accepted — the same tokens as the unqueued loop,
    grammars completing (eos) mid-batch included."""
    eng = llm.engine
    cases = [SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=constrained(backend, json=SCHEMA)),
             SamplingParams(temperature=1.0, seed=9, max_tokens=40, structured_outputs=constrained(backend, json=SCHEMA)),
             SamplingParams(temperature=0.8, seed=4, max_tokens=12, ignore_eos=True),  # no grammar, same batch
             SamplingParams(temperature=1.0, seed=2, max_tokens=20,
                            structured_outputs={"backend": backend, "regex": r"[a-z]{3,9}"}),
             SamplingParams(temperature=0.0, max_tokens=30, frequency_penalty=1.5,  # counts the token in flight
                            structured_outputs={"backend": backend, "regex": r"[0-9 ]{10,60}"})]
    results = {}
    for async_scheduling in (True, False):
        eng.config.async_scheduling = async_scheduling
        before = eng.num_steps_run_ahead
        outs = llm.generate(["Hello", "Numbers:", "def f(x):", "Hi", "0 0 0 0"], cases)
        results[async_scheduling] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]
        assert (eng.num_steps_run_ahead > before) == async_scheduling
    eng.config.async_scheduling = True
    assert results[True] == results[False]
    assert json.loads(llm.tokenizer.decode(results[True][0][0])) is not None
    assert not eng.structured.states and eng.pool.num_free == eng.pool.num_blocks
