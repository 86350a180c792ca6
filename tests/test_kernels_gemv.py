"""The fused decode GEMV kernels (kernels/gemv.py) against their torch references under
Triton's interpreter: 1-8 rows, odd N and K (not multiples of the tiles), both product forms,
bfloat16 and float32."""

from __future__ import annotations

import pytest
import torch

from kernels.gemv import (GemvConfig, gemv_ref, gemv_triton, rms_norm_gemv_ref, rms_norm_gemv_triton, row_bucket,
                          silu_mul_gemv_ref, silu_mul_gemv_triton)

DOT = GemvConfig(block_n=16, block_k=32, num_warps=4, num_stages=2, use_dot=True)
SUM = GemvConfig(block_n=8, block_k=64, num_warps=4, num_stages=1, use_dot=False)
N, K = 37, 100  # neither a multiple of any tile


def inputs(rows: int, dtype: torch.dtype, k: int = K, n: int = N, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + rows)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    residual = (torch.randn(rows, k, generator=gen) * 3).to(dtype)
    norm_w = (1 + 0.1 * torch.randn(k, generator=gen)).to(dtype)
    weight = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    return x, residual, norm_w, weight, bias


def assert_product_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Same operands, float32 accumulation in another order, rounded once: float32 within a
    few ulps; bfloat16 equal or 1 ulp apart (a rounding boundary crossed)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
    else:
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=2 ** -7)


@pytest.mark.parametrize("config", [DOT, SUM], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_add_rms_norm_gemv_matches_norm_then_linear(rows, dtype, config):
    x, residual, norm_w, weight, bias = inputs(rows, dtype)
    keep = residual.clone()
    got, got_res = rms_norm_gemv_triton(x, residual, norm_w, 1e-5, weight, bias, config=config)
    want, want_res = rms_norm_gemv_ref(x, residual, norm_w, 1e-5, weight, bias)
    assert torch.equal(got_res, want_res)  # the residual sum, written once, rounded as torch rounds it
    assert torch.equal(residual, keep)  # a new tensor: the input residual is not overwritten
    assert_product_close(got, want)


@pytest.mark.parametrize("config", [DOT, SUM], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_gemv_without_residual_is_the_first_layer_path(dtype, config):
    x, _, norm_w, weight, _ = inputs(2, dtype)
    got, res = rms_norm_gemv_triton(x, None, norm_w, 1e-6, weight, config=config)
    want, _ = rms_norm_gemv_ref(x, None, norm_w, 1e-6, weight)
    assert res is None
    assert_product_close(got, want)


@pytest.mark.parametrize("config", [DOT, SUM], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 5])
def test_silu_mul_gemv_matches_silu_and_mul_then_linear(rows, dtype, config):
    gen = torch.Generator().manual_seed(rows)
    gate_up = (torch.randn(rows, 2 * K, generator=gen) * 2).to(dtype)
    _, _, _, weight, bias = inputs(rows, dtype)
    assert_product_close(silu_mul_gemv_triton(gate_up, weight, config=config), silu_mul_gemv_ref(gate_up, weight))
    assert_product_close(silu_mul_gemv_triton(gate_up, weight, bias, config=config),
                         silu_mul_gemv_ref(gate_up, weight, bias))


@pytest.mark.parametrize("config", [DOT, SUM], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [2, 7])
def test_gemv_matches_linear(rows, dtype, config):
    x, _, _, weight, bias = inputs(rows, dtype)
    assert_product_close(gemv_triton(x, weight, bias, config=config), gemv_ref(x, weight, bias))
    strided = torch.cat([x, x], 1)[:, ::2]  # a non-contiguous input is accepted
    assert_product_close(gemv_triton(strided, weight, config=config), gemv_ref(strided, weight))


@pytest.mark.parametrize("config", [DOT, SUM], ids=str)
def test_gemv_on_tile_multiples_takes_the_unmasked_loads(config):
    """N and K multiples of the tiles (the 8B shapes' case): the kernel drops the W masks."""
    x, residual, norm_w, weight, _ = inputs(4, torch.bfloat16, k=128, n=32)
    got, got_res = rms_norm_gemv_triton(x, residual, norm_w, 1e-5, weight, config=config)
    want, want_res = rms_norm_gemv_ref(x, residual, norm_w, 1e-5, weight)
    assert torch.equal(got_res, want_res)
    assert_product_close(got, want)


def test_gemv_rejects_what_it_cannot_run():
    x, residual, norm_w, weight, _ = inputs(17, torch.float32)
    with pytest.raises(ValueError, match="rows <= 16"):
        gemv_triton(x, weight)
    with pytest.raises(ValueError, match="columns"):
        silu_mul_gemv_triton(x[:2], weight)  # (T, K), not (T, 2K)
    with pytest.raises(ValueError, match="dtype"):
        gemv_triton(x[:2].to(torch.bfloat16), weight)
    with pytest.raises(ValueError, match="block_n >= 16"):
        gemv_triton(x[:2], weight, config=GemvConfig(8, 64, 4, 1, True))
    assert [row_bucket(r) for r in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
