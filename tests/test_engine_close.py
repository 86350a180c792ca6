"""Closing an engine frees its KV cache and weights even though the engine froze the
garbage collector's view of what it built (gc.freeze in LLMEngine.__init__), and a closed
engine refuses work with an error that says what to do."""

from __future__ import annotations

import gc
import weakref

import pytest

from engine import LLM, EngineClosedError, SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def tiny_llm() -> LLM:
    return LLM("builtin:tiny", device="cpu", dtype="float32", num_blocks=64, max_num_seqs=4)


def big_tensor_refs(llm: LLM) -> list[weakref.ref]:
    """Weak references to what a discarded engine must not keep: its KV cache and a weight."""
    eng = llm.engine
    return [weakref.ref(eng.kv_cache), weakref.ref(next(eng.model.parameters()))]


def test_closed_engine_frees_its_kv_cache_and_weights_though_frozen():
    llm = tiny_llm()
    llm.generate(["Hello"], PARAMS)
    assert gc.get_freeze_count() > 0  # the engine froze what it built
    refs = big_tensor_refs(llm)
    engine = weakref.ref(llm.engine)
    llm.engine.close()  # the engine's own close, as a node or a bench script calls it
    assert [r() for r in refs] == [None, None]  # at once: nothing else holds them
    del llm
    gc.collect()
    assert engine() is None  # close() broke the cycle through the engine, which froze it


def test_llm_close_and_the_end_of_a_with_block_free_the_kv_cache():
    llm = tiny_llm()
    refs = big_tensor_refs(llm)
    llm.close()
    del llm
    gc.collect()
    assert [r() for r in refs] == [None, None]

    with tiny_llm() as llm:
        assert llm.generate("Hello", PARAMS)[0].finished
        refs = big_tensor_refs(llm)
    assert llm.engine.closed
    del llm
    gc.collect()
    assert [r() for r in refs] == [None, None]


def test_work_after_close_raises_a_clear_error():
    llm = tiny_llm()
    llm.engine.add_request("pending", "Hello", PARAMS)  # dropped by close
    llm.close()
    assert not llm.engine.has_unfinished_requests
    for call in (lambda: llm.generate(["Hello"], PARAMS), llm.engine.step,
                 lambda: llm.engine.add_request("r", "Hello", PARAMS), lambda: llm.engine.abort_request("pending")):
        with pytest.raises(EngineClosedError, match="was closed.*build a new"):
            call()


def test_close_twice_is_a_no_op():
    with tiny_llm() as llm:
        llm.close()
        llm.close()
        llm.engine.close()
    assert llm.engine.closed
