"""Decode-time matrix-vector products (1 to 16 rows) with the step's small neighbours fused in.

At batch 1 a decode step is a chain of weight reads at the HBM rate with small kernels in
between (RMSNorm, SiLU-and-mul, cuBLAS's split-K reductions), each a few microseconds of
launch floor plus a gap in the graph. These kernels read a weight W (N, K), row-major, once,
and compute what the small kernel before it would have written on the fly:

* rms_norm_gemv:  (norm(x + residual) @ W^T + b, x + residual)  qkv_proj and gate_up_proj,
                  or norm(x) @ W^T + b when there is no residual (the first layer);
* silu_mul_gemv:  (silu(gate) * up) @ W^T + b from the (T, 2K) gate|up output  down_proj;
* gemv:           x @ W^T + b                                    o_proj.

Layout: one program per BLOCK_N rows of W, looping over K in BLOCK_K columns; every program
reads the whole activation rows (a few KB to ~56 KB a row, from L2) and W's tile once from
HBM. The norm needs the row's RMS before any product, so the norm prologue makes a first pass
over the rows for the sum of squares (a whole row per load, so the weight stream waits for one
L2 round trip per row) and normalises tile by tile in the second; the residual sum is
computed by every program (it needs it) and stored by program 0 only, into a new tensor (no
program reads what another writes). Two product forms, a launch choice (GemvConfig.use_dot):
a broadcast multiply-and-sum over BLOCK_M = next_pow2(rows) in registers, or tl.dot with the
rows padded to 16, whose W loads the compiler pipelines over num_stages.

Exactness: the prologues round exactly where the unfused kernels round (the residual sum,
the normalised row, its product with the norm weight, silu(gate), its product with up: each
to the activation dtype), so the product sees the same operand the unfused path materialises
(the norm's float32 sum of squares aside: equal or 1 ulp apart, as kernels/norm.py). The
product accumulates in float32 and rounds once, like cuBLAS, in another order.

What the engine uses: the plain `gemv` for every weight product of a graphed decode step at
up to 16 rows on Hopper (engine/model_runner.py decode_gemv_configs), launched
programmatically (kernels/triton_utils.py: pdl_wait before the loop, pdl_release after it),
so that a decoder layer is one chain of overlapping launches; 3% off a batch-1 step on an
H200 against cuBLAS (bench/results/2026-12-01d-h200). The prologue-fused forms are not used:
they reach 0.3-0.9x of norm/SiLU kernel + cuBLAS (bench/results/2026-12-01b-h200); a weight
prefetch into L2 before the wait was measured 8% slower and left out.
bench/gpu/gemv_tune.py sweeps tiles at Llama-3-8B shapes against the unfused pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.activation import silu_and_mul_ref
from kernels.norm import fused_add_rms_norm_ref, rms_norm_ref
from kernels.triton_utils import cast, dot, emulate_bf16, pdl_launch, pdl_release, pdl_wait, use_pdl, use_triton

MAX_ROWS = 16  # tl.dot pads the rows to 16; the broadcast form keeps BLOCK_M * BLOCK_N * BLOCK_K in registers

PLAIN, NORM, ADD_NORM, SILU = 0, 1, 2, 3  # the prologue, a constexpr of the kernel


@dataclass(frozen=True, slots=True)
class GemvConfig:
    """A launch shape: W rows per program, K columns per loop step, warps, software-pipeline
    stages, and the product form (tl.dot on rows padded to 16, or broadcast-and-sum)."""
    block_n: int = 16
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 3
    use_dot: bool = True

    def __str__(self) -> str:
        form = "dot" if self.use_dot else "sum"
        return f"{form}/n{self.block_n}/k{self.block_k}/w{self.num_warps}/s{self.num_stages}"


# A few launch shapes per row bucket (see row_bucket), each a Triton compile: gemv_tune.py's
# phase 1 checks and times them; its phase 2 sweeps wider.
CANDIDATES: dict[int, tuple[GemvConfig, ...]] = {
    1: (GemvConfig(8, 1024, 4, 1, False), GemvConfig(16, 256, 4, 4, True), GemvConfig(32, 256, 4, 3, True)),
    2: (GemvConfig(8, 512, 4, 1, False), GemvConfig(16, 256, 4, 4, True)),
    4: (GemvConfig(16, 256, 4, 4, True), GemvConfig(8, 256, 4, 1, False)),
    8: (GemvConfig(16, 256, 4, 4, True), GemvConfig(32, 256, 4, 3, True)),
}


def row_bucket(rows: int) -> int:
    """The row count a launch shape is chosen for: the next power of two (1, 2, 4, 8, 16);
    rows 3 run with the shape (and compiled kernel) measured at 4."""
    return 1 if rows <= 1 else 1 << (rows - 1).bit_length()


# --- references (the CPU path and the tests' oracle) -------------------------------------

def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: (T, K), weight: (N, K) -> (T, N)
    return F.linear(x, weight, bias)


def rms_norm_gemv_ref(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                      weight: torch.Tensor, bias: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    # x, residual: (T, K) -> (norm(x + residual) @ W^T + b (T, N), x + residual (T, K) or None)
    if residual is None:
        return F.linear(rms_norm_ref(x, norm_weight, eps), weight, bias), None
    normed, res = fused_add_rms_norm_ref(x, residual, norm_weight, eps)
    return F.linear(normed, weight, bias), res


def silu_mul_gemv_ref(gate_up: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    # gate_up: (T, 2K), weight: (N, K) -> (T, N)
    return F.linear(silu_and_mul_ref(gate_up), weight, bias)


# --- the kernel -----------------------------------------------------------------------------

@triton.jit
def _gemv_kernel(
    x_ptr, r_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, res_ptr,
    M, N, K, sxm, srm, swn, som, eps,
    PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, NORM_BLOCK: tl.constexpr, EVEN: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_PREC: tl.constexpr, EMULATE: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    rmask = rows < M
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    pdl_wait(PDL)
    kr = tl.arange(0, BLOCK_K)
    act_ty = x_ptr.dtype.element_ty  # the activation dtype every prologue step rounds to
    x_rows = x_ptr + rows[:, None] * sxm
    w_rows = w_ptr + n.to(tl.int64)[:, None] * swn

    if PROLOGUE == 1 or PROLOGUE == 2:  # pass 1: the rows' sums of squares (and the residual sum)
        # Row by row in NORM_BLOCK-wide loads (the whole row at hidden sizes up to 8192): one
        # L2 round trip per row before the weight stream starts, not one per BLOCK_K tile.
        ss = tl.zeros([BLOCK_M], tl.float32)
        kn = tl.arange(0, NORM_BLOCK)
        for m in range(M):
            sq = tl.zeros([NORM_BLOCK], tl.float32)
            for k0 in range(0, K, NORM_BLOCK):
                k = k0 + kn
                xf = tl.load(x_ptr + m * sxm + k, mask=k < K, other=0.0).to(tl.float32)
                if PROLOGUE == 2:
                    rf = tl.load(r_ptr + m * srm + k, mask=k < K, other=0.0).to(tl.float32)
                    s = cast(xf + rf, act_ty, EMULATE)  # rounded like torch's add
                    if pid == 0:  # program 0 stores the residual sum; every program uses it
                        tl.store(res_ptr + m * K + k, s, mask=k < K)
                    xf = s.to(tl.float32)
                sq += xf * xf
            ss = tl.where(rows == m, tl.sum(sq, 0), ss)
        # IEEE-rounded division and sqrt, as kernels/norm.py (torch's rsqrt is correctly rounded)
        inv = tl.math.div_rn(tl.full([BLOCK_M], 1.0, tl.float32),
                             tl.math.sqrt_rn(tl.math.div_rn(ss, tl.zeros([BLOCK_M], tl.float32) + K) + eps))

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kr
        kmask = k < K
        m2 = rmask[:, None] & kmask[None, :]
        if PROLOGUE == 3:  # silu(gate) * up, rounded as kernels/activation.py rounds it
            g = tl.load(x_rows + k[None, :], mask=m2, other=0.0).to(tl.float32)
            u = tl.load(x_rows + K + k[None, :], mask=m2, other=0.0).to(tl.float32)
            act = cast(g / (1.0 + tl.exp(-g)), act_ty, EMULATE).to(tl.float32)
            a = cast(act * u, act_ty, EMULATE)
        elif PROLOGUE == 0:
            a = tl.load(x_rows + k[None, :], mask=m2, other=0.0)
        else:
            xf = tl.load(x_rows + k[None, :], mask=m2, other=0.0).to(tl.float32)
            if PROLOGUE == 2:
                rf = tl.load(r_ptr + rows[:, None] * srm + k[None, :], mask=m2, other=0.0).to(tl.float32)
                xf = cast(xf + rf, act_ty, EMULATE).to(tl.float32)
            normed = cast(xf * inv[:, None], act_ty, EMULATE).to(tl.float32)
            nw = tl.load(nw_ptr + k, mask=kmask, other=0.0).to(tl.float32)
            a = cast(nw[None, :] * normed, act_ty, EMULATE)
        if EVEN:
            w = tl.load(w_rows + k[None, :])
        else:
            w = tl.load(w_rows + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        if USE_DOT:
            acc += dot(a, tl.trans(w), DOT_PREC, EMULATE)
        else:
            acc += tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], 2)

    pdl_release(PDL)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * som + n[None, :], cast(acc, out_ptr.dtype.element_ty, EMULATE),
             mask=rmask[:, None] & nmask[None, :])


def _launch(prologue: int, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            residual: torch.Tensor | None, norm_weight: torch.Tensor | None, eps: float,
            config: GemvConfig | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    cfg = config or CANDIDATES.get(row_bucket(x.shape[0]), CANDIDATES[8])[0]
    m = x.shape[0]
    n, k = weight.shape
    if x.dim() != 2 or m > MAX_ROWS:
        raise ValueError(f"fused GEMV takes (rows <= {MAX_ROWS}, K) inputs, got {tuple(x.shape)}: "
                         "use the unfused path for larger batches")
    want_k = 2 * k if prologue == SILU else k
    if x.shape[1] != want_k:
        raise ValueError(f"input has {x.shape[1]} columns, the weight {tuple(weight.shape)} needs {want_k}")
    if x.dtype != weight.dtype:
        raise ValueError(f"activation dtype {x.dtype} differs from the weight's {weight.dtype}")
    if cfg.use_dot and cfg.block_n < 16:
        raise ValueError(f"{cfg}: tl.dot needs block_n >= 16")
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    out = torch.empty((m, n), dtype=weight.dtype, device=x.device)
    res_out = None
    if prologue == ADD_NORM:
        assert residual is not None and residual.shape == x.shape, (None if residual is None else residual.shape)
        residual = residual if residual.stride(1) == 1 else residual.contiguous()
        res_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if m == 0 or n == 0:
        return out, res_out
    r = residual if residual is not None else x
    block_k = min(cfg.block_k, max(16, triton.next_power_of_2(k)))
    block_n = cfg.block_n if cfg.use_dot else min(cfg.block_n, triton.next_power_of_2(n))
    pdl = use_pdl(x)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, r, norm_weight if norm_weight is not None else weight, weight,
        bias if bias is not None else weight, out, res_out if res_out is not None else out,
        m, n, k, x.stride(0), r.stride(0), weight.stride(0), out.stride(0), eps,
        PROLOGUE=prologue, HAS_BIAS=bias is not None, BLOCK_M=16 if cfg.use_dot else row_bucket(m),
        BLOCK_N=block_n, BLOCK_K=block_k, NORM_BLOCK=min(triton.next_power_of_2(k), 8192),
        EVEN=k % block_k == 0 and n % block_n == 0, USE_DOT=cfg.use_dot,
        DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
        EMULATE=emulate_bf16(x.dtype, weight.dtype), PDL=pdl,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch(pdl),
    )
    return out, res_out


def gemv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                config: GemvConfig | None = None) -> torch.Tensor:
    return _launch(PLAIN, x, weight, bias, None, None, 0.0, config)[0]


def rms_norm_gemv_triton(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                         weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                         config: GemvConfig | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if norm_weight.dtype != x.dtype:
        raise ValueError(f"norm weight dtype {norm_weight.dtype} differs from the activations' {x.dtype}")
    return _launch(NORM if residual is None else ADD_NORM, x, weight, bias, residual, norm_weight, eps, config)


def silu_mul_gemv_triton(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                         config: GemvConfig | None = None) -> torch.Tensor:
    return _launch(SILU, gate_up, weight, bias, None, None, 0.0, config)[0]


# --- dispatch (CUDA: Triton; CPU: the reference, see kernels/triton_utils.py) ---------------

def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         config: GemvConfig | None = None) -> torch.Tensor:
    if use_triton(x):
        return gemv_triton(x, weight, bias, config=config)
    return gemv_ref(x, weight, bias)


def rms_norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                  weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  config: GemvConfig | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rms_norm(x + residual) @ W^T + b, x + residual); residual None: (rms_norm(x) @ W^T + b, None)."""
    if use_triton(x):
        return rms_norm_gemv_triton(x, residual, norm_weight, eps, weight, bias, config=config)
    return rms_norm_gemv_ref(x, residual, norm_weight, eps, weight, bias)


def silu_mul_gemv(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  config: GemvConfig | None = None) -> torch.Tensor:
    """(silu(gate) * up) @ W^T + b for gate_up = gate | up, (T, 2K)."""
    if use_triton(gate_up):
        return silu_mul_gemv_triton(gate_up, weight, bias, config=config)
    return silu_mul_gemv_ref(gate_up, weight, bias)
