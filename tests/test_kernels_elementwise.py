"""Triton RMSNorm (plain and residual-fused), rotary embedding and SiLU-and-mul against
their torch references (TRITON_INTERPRET=1 on CPU)."""

from __future__ import annotations

import pytest
import torch

from kernels.activation import silu_and_mul, silu_and_mul_ref, silu_and_mul_triton
from kernels.norm import (fused_add_rms_norm, fused_add_rms_norm_ref, fused_add_rms_norm_triton, rms_norm,
                          rms_norm_ref, rms_norm_triton)
from kernels.rope import (apply_rope, apply_rope_ref, apply_rope_triton, rope_and_write_kv, rope_and_write_kv_ref,
                          rope_and_write_kv_triton, rope_cos_sin, rope_inv_freq)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_close_ulp(got: torch.Tensor, want: torch.Tensor) -> None:
    """Half precision: at most 1 ulp apart (only the float32 summation order differs).
    float32: a relative 1e-6 (several ulps: the rounding steps compound)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    else:
        assert ulps_apart(got, want) <= 1


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units of the last place between two same-dtype tensors."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype == torch.float32:
        ia, ib = a.view(torch.int32).long(), b.view(torch.int32).long()
    else:
        ia, ib = a.view(torch.int16).long(), b.view(torch.int16).long()
    # map sign-magnitude bit patterns onto a monotone integer line
    bits = 32 if a.dtype == torch.float32 else 16
    ia = torch.where(ia < 0, -(ia & ((1 << (bits - 1)) - 1)), ia)
    ib = torch.where(ib < 0, -(ib & ((1 << (bits - 1)) - 1)), ib)
    return int((ia - ib).abs().max()) if a.numel() else 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 96), (3, 1000), (1, 4096)])
def test_rms_norm_kernel_matches_reference_within_one_ulp(shape, dtype):
    gen = torch.Generator().manual_seed(shape[1])
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[1], generator=gen)).to(dtype)
    want = rms_norm_ref(x, w, 1e-5)
    got = rms_norm_triton(x, w, 1e-5)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert_close_ulp(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_kernel_on_strided_per_head_views(dtype):
    """Qwen3's q/k norm: (T, H, head_dim) slices of the fused qkv output, not contiguous."""
    gen = torch.Generator().manual_seed(1)
    t, hq, hkv, d = 7, 4, 2, 64
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen).to(dtype)
    q = qkv[:, :hq * d].view(t, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(t, hkv, d)
    w = (1 + 0.1 * torch.randn(d, generator=gen)).to(dtype)
    for x in (q, k, q[:, 1]):
        assert_close_ulp(rms_norm_triton(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))
    x4 = torch.randn(2, 3, 5, d, generator=gen).to(dtype)  # more leading dims
    assert_close_ulp(rms_norm_triton(x4, w, 1e-6), rms_norm_ref(x4, w, 1e-6))
    assert rms_norm_triton(x4[:0], w, 1e-6).shape == (0, 3, 5, d)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_kernel_matches_reference(dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 320, generator=gen).to(dtype)
    res = (torch.randn(9, 320, generator=gen) * 4).to(dtype)
    w = (1 + 0.1 * torch.randn(320, generator=gen)).to(dtype)
    want_n, want_r = fused_add_rms_norm_ref(x, res, w, 1e-6)
    got_n, got_r = fused_add_rms_norm_triton(x, res, w, 1e-6)
    assert torch.equal(got_r, want_r)  # the add is rounded exactly as torch rounds it
    assert_close_ulp(got_n, want_n)
    assert want_r.data_ptr() != res.data_ptr() and got_r.data_ptr() != res.data_ptr()


def test_mixed_dtype_weight_follows_torch_promotion():
    """A float32 weight on bfloat16 activations gives a float32 result, as in torch."""
    x = torch.randn(3, 64).to(torch.bfloat16)
    w = torch.randn(64)
    want = rms_norm_ref(x, w, 1e-6)
    got = rms_norm_triton(x, w, 1e-6)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0, rtol=1e-6)


def test_norm_dispatch_on_cpu_is_the_reference():
    x, r, w = torch.randn(4, 32), torch.randn(4, 32), torch.randn(32)
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6))
    for a, b in zip(fused_add_rms_norm(x, r, w, 1e-6), fused_add_rms_norm_ref(x, r, w, 1e-6)):
        assert torch.equal(a, b)


# --- rotary embedding --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d,block_t", [(4, 4, 64, 1), (8, 2, 128, 3), (6, 1, 64, 8)])
def test_apply_rope_kernel_matches_reference(hq, hkv, d, block_t, dtype):
    gen = torch.Generator().manual_seed(hq * d)
    t = 11
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen).to(dtype)  # q, k: strided views like the model's
    q = qkv[:, :hq * d].view(t, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(t, hkv, d)
    positions = torch.randint(0, 5000, (t,), generator=gen)
    inv = rope_inv_freq(d, 500000.0, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})
    cos, sin = rope_cos_sin(positions, inv, dtype)
    want_q, want_k = apply_rope_ref(q, k, cos, sin)
    got_q, got_k = apply_rope_triton(q, k, cos, sin, block_t=block_t)
    if dtype == torch.float32:
        torch.testing.assert_close(got_q, want_q, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got_k, want_k, atol=1e-6, rtol=1e-6)
    else:  # rounded where torch rounds: identical
        assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


@pytest.mark.parametrize("dtype,block_t", [(torch.float32, 1), (torch.bfloat16, 4)])
def test_rope_and_write_kv_kernel_matches_reference(dtype, block_t):
    gen = torch.Generator().manual_seed(5)
    t, hq, hkv, d, bs = 9, 8, 2, 64, 8
    q = torch.randn(t, hq, d, generator=gen).to(dtype)
    k = torch.randn(t, hkv, d, generator=gen).to(dtype)
    v = torch.randn(t, hkv, d, generator=gen).to(dtype)
    cos, sin = rope_cos_sin(torch.arange(30, 30 + t), rope_inv_freq(d, 10000.0), dtype)
    cache = torch.randn(5, 2, 2, bs, hkv, d, generator=gen).to(dtype)
    slots = torch.randperm(5 * bs, generator=gen)[:t]
    slots[[0, 4]] = -1
    want_cache, got_cache = cache.clone(), cache.clone()
    want_q, want_k = rope_and_write_kv_ref(q, k, v, cos, sin, want_cache, 1, slots)
    got_q, got_k = rope_and_write_kv_triton(q, k, v, cos, sin, got_cache, 1, slots, block_t=block_t)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=0, rtol=0)
    torch.testing.assert_close(got_q, want_q, **tol)
    torch.testing.assert_close(got_k, want_k, **tol)
    torch.testing.assert_close(got_cache, want_cache, **tol)


def test_rope_dispatch_on_cpu_is_the_reference():
    q, k = torch.randn(3, 4, 64), torch.randn(3, 2, 64)
    cos, sin = rope_cos_sin(torch.arange(3), rope_inv_freq(64, 10000.0), torch.float32)
    for a, b in zip(apply_rope(q, k, cos, sin), apply_rope_ref(q, k, cos, sin)):
        assert torch.equal(a, b)
    c1, c2 = torch.zeros(2, 1, 2, 16, 2, 64), torch.zeros(2, 1, 2, 16, 2, 64)
    v = torch.randn(3, 2, 64)
    slots = torch.tensor([3, -1, 20])
    for a, b in zip(rope_and_write_kv(q, k, v, cos, sin, c1, 0, slots),
                    rope_and_write_kv_ref(q, k, v, cos, sin, c2, 0, slots)):
        assert torch.equal(a, b)
    assert torch.equal(c1, c2)


# --- SiLU and mul --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,i", [(5, 96), (2, 1500), (1, 7)])
def test_silu_and_mul_kernel_matches_reference(t, i, dtype):
    gen = torch.Generator().manual_seed(i)
    x = (torch.randn(t, 2 * i, generator=gen) * 4).to(dtype)
    want = silu_and_mul_ref(x)
    got = silu_and_mul_triton(x, block=256)
    assert_close_ulp(got, want)
    assert torch.equal(silu_and_mul(x), want)  # CPU dispatch is the reference
