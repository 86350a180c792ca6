"""RMSNorm, alone and fused with the residual add.

The reference follows transformers' LlamaRMSNorm exactly (square in float32, scale in the
input dtype last), which is what keeps greedy tokens equal to theirs; the Triton kernels
keep that order of operations step by step (mean of squares and rsqrt in float32, cast to
the input dtype, THEN the product with the weight, rounded once to the result dtype), so
they differ from the reference only by the float32 summation order: equal or 1 ulp apart.

x is (..., D): hidden states (T, 4096) or per-head q/k (T, H, 128) for Qwen3's q/k norm,
possibly a strided view (q and k are slices of the fused qkv projection). The kernel sees
x as (n0, n1, D) with arbitrary strides (no copy for 1-3 dims) and normalises BLOCK_R rows
of BLOCK_D = next_pow2(D) elements per program: one row per program at hidden sizes, a
tile of rows at head_dim sizes so a program still moves ~4k elements.

fused_add_rms_norm(x, residual) returns (rms_norm(x + residual), x + residual): the decoder
layer's "h = h + attn(...); n = norm(h)" in one pass over memory instead of three.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_utils import cast, emulate_bf16, pdl_launch, pdl_release, pdl_wait, use_pdl, use_triton


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # x: (..., D) in the model dtype; weight: (D,)
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    # -> (rms_norm(x + residual), x + residual)
    res = x + residual
    return rms_norm_ref(res, weight, eps), res


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr,
    n_rows, n1, eps,
    sx0, sx1, sxd, sr0, sr1, srd,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_RES: tl.constexpr,
    EMULATE: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    mask = rmask[:, None] & (d < D)[None, :]
    rows64 = rows.to(tl.int64)
    i0, i1 = rows64 // n1, rows64 % n1
    x = tl.load(x_ptr + (i0 * sx0 + i1 * sx1)[:, None] + d[None, :] * sxd, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    if HAS_RES:
        r = tl.load(r_ptr + (i0 * sr0 + i1 * sr1)[:, None] + d[None, :] * srd, mask=mask, other=0.0)
    pdl_release(PDL)
    if HAS_RES:
        res = cast(xf + r.to(tl.float32), res_out_ptr.dtype.element_ty, EMULATE)  # rounded like torch's add
        tl.store(res_out_ptr + rows64[:, None] * D + d[None, :], res, mask=mask)
        xf = res.to(tl.float32)
    var = tl.sum(xf * xf, 1) / D
    # IEEE-rounded sqrt and division: torch's rsqrt is correctly rounded on the CPU.
    inv = tl.math.div_rn(tl.full([BLOCK_R], 1.0, tl.float32), tl.math.sqrt_rn(var + eps))
    if HAS_RES:
        normed = cast(xf * inv[:, None], res_out_ptr.dtype.element_ty, EMULATE)
    else:
        normed = cast(xf * inv[:, None], x_ptr.dtype.element_ty, EMULATE)
    w = tl.load(w_ptr + d, mask=d < D, other=0.0)
    out = cast(w.to(tl.float32)[None, :] * normed.to(tl.float32), out_ptr.dtype.element_ty, EMULATE)
    tl.store(out_ptr + rows64[:, None] * D + d[None, :], out, mask=mask)


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() == 3:
        return x
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            block_r: int | None, num_warps: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    d = x.shape[-1]
    assert weight.shape == (d,), (weight.shape, x.shape)
    res_dtype = x.dtype if residual is None else torch.result_type(x, residual)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, res_dtype), device=x.device)
    res_out = None if residual is None else torch.empty(x.shape, dtype=res_dtype, device=x.device)
    n_rows = x.numel() // d if d else 0
    if n_rows == 0:
        return out, res_out
    x3 = _as_3d(x)
    r3 = x3 if residual is None else _as_3d(residual.expand_as(x))
    block_d = triton.next_power_of_2(d)
    block_r = block_r or max(1, min(16, 4096 // block_d))
    _rms_norm_kernel[(triton.cdiv(n_rows, block_r),)](
        x3, r3, weight, out, out if res_out is None else res_out,
        n_rows, x3.shape[1], eps,
        *x3.stride(), *r3.stride(),
        D=d, BLOCK_R=block_r, BLOCK_D=block_d, HAS_RES=residual is not None,
        EMULATE=emulate_bf16(x.dtype, res_dtype, out.dtype), PDL=use_pdl(x),
        num_warps=num_warps or (8 if block_r * block_d >= 4096 else 4), **pdl_launch(use_pdl(x)),
    )
    return out, res_out


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, *, block_r: int | None = None,
                    num_warps: int | None = None) -> torch.Tensor:
    return _launch(x, None, weight, eps, block_r, num_warps)[0]


def fused_add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                              block_r: int | None = None,
                              num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    out, res = _launch(x, residual, weight, eps, block_r, num_warps)
    return out, res


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), the sum rounded to the input dtype first."""
    if use_triton(x):
        return fused_add_rms_norm_triton(x, residual, weight, eps)
    return fused_add_rms_norm_ref(x, residual, weight, eps)
