"""Triton RMSNorm (plain and residual-fused), rotary embedding and SiLU-and-mul against
their torch references (TRITON_INTERPRET=1 on CPU)."""

from __future__ import annotations

import pytest
import torch

from kernels.norm import (fused_add_rms_norm, fused_add_rms_norm_ref, fused_add_rms_norm_triton, rms_norm,
                          rms_norm_ref, rms_norm_triton)

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
