"""A whole model through the Triton kernels on CPU (Triton's interpreter), against the same
engine on the torch references: chunked prefill cut at odd places, prefix-cache hits,
decode batches, GQA, and Qwen3's q/k norm on strided per-head views."""

from __future__ import annotations

import pytest
import torch

import kernels.attention
import kernels.gemv
from engine import LLM, SamplingParams
from engine.model_runner import GEMV_PROJECTIONS, decode_gemv_configs
from kernels.triton_utils import force_triton

NEAR_TIE = 1e-3
SYSTEM = "You are terse. Answer in one word. "
PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=2)


def run(path: str, gemv: str = "") -> list:
    llm = LLM(model=path, dtype="float32", device="cpu", num_blocks=64, block_size=8, max_num_batched_tokens=13)
    llm.engine.runner.model.use_triton_gemv(decode_gemv_configs(torch.device("cpu"), gemv))
    first = llm.generate(SYSTEM + "Sky colour?", PARAMS)
    rest = llm.generate([SYSTEM + "Grass colour?", "1, 2, 3,", SYSTEM + "Snow colour?"], PARAMS)
    assert rest[0].num_cached_tokens > 0  # the shared prefix came from the cache
    return first + rest


def test_model_on_triton_kernels_matches_model_on_references(checkpoints, monkeypatch):
    path = str(checkpoints["tiny-qwen3"])  # GQA 4, q/k norm; float32
    ref = run(path)
    calls = {"decode": 0, "prefill": 0}
    for kind in calls:
        name = f"paged_{kind}_attention_triton"
        kernel = getattr(kernels.attention, name)

        def counted(*args, _kernel=kernel, _kind=kind, **kwargs):
            calls[_kind] += 1
            return _kernel(*args, **kwargs)
        monkeypatch.setattr(kernels.attention, name, counted)
    with force_triton():
        got = run(path)
    assert calls["decode"] > 0 and calls["prefill"] > 0
    assert_same_greedy_tokens(ref, got)


def test_decode_steps_on_the_triton_gemv_match_cublas_steps(checkpoints, monkeypatch):
    """What a Hopper GPU's decode graphs run: every weight product of <= 16 rows through
    kernels/gemv.py (here every step's, the decode steps and the short prefill chunks)."""
    path = str(checkpoints["tiny-qwen3"])
    ref = run(path)
    gemv_calls = []
    real = kernels.gemv.gemv_triton

    def counted(x, weight, *args, **kwargs):
        gemv_calls.append(weight.shape)
        return real(x, weight, *args, **kwargs)
    monkeypatch.setattr(kernels.gemv, "gemv_triton", counted)
    with force_triton():
        got = run(path, ",".join(GEMV_PROJECTIONS))
    assert len({shape for shape in gemv_calls}) == len(GEMV_PROJECTIONS)  # qkv, o, gate_up, down, lm_head
    assert_same_greedy_tokens(ref, got)


def test_which_products_take_the_gemv(monkeypatch):
    monkeypatch.delenv("PDCLUSTER_TRITON_GEMV", raising=False)
    assert decode_gemv_configs(torch.device("cpu")) == {}  # cuBLAS / torch off Hopper
    assert set(decode_gemv_configs(torch.device("cpu"), "o, down")) == {"o", "down"}
    monkeypatch.setenv("PDCLUSTER_TRITON_GEMV", "qkv")
    assert set(decode_gemv_configs(torch.device("cpu"))) == {"qkv"}
    monkeypatch.setenv("PDCLUSTER_TRITON_GEMV", "")
    assert decode_gemv_configs(torch.device("cpu")) == {}
    with pytest.raises(ValueError, match="unknown projection.*'up'"):
        decode_gemv_configs(torch.device("cpu"), "qkv,up")


def assert_same_greedy_tokens(ref: list, got: list) -> None:
    """Equal tokens up to the first near tie of the reference, equal logprobs where equal."""
    for r, g in zip(ref, got):
        r_out, g_out = r.outputs[0], g.outputs[0]
        checked = 0
        for i, (rt, gt) in enumerate(zip(r_out.token_ids, g_out.token_ids)):
            assert abs(g_out.logprobs[i].logprob - r_out.logprobs[i].logprob) < 1e-4 or rt != gt
            top = sorted(r_out.logprobs[i].top.values(), reverse=True)
            if top[0] - top[1] < NEAR_TIE:
                break
            assert gt == rt, f"token {i}: triton {gt}, reference {rt}"
            checked += 1
        assert checked >= 3
