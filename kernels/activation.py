"""SwiGLU activation on the fused gate/up projection: (T, 2I) -> silu(gate) * up, (T, I).

Triton version: grid (T, cdiv(I, BLOCK)), each program reading BLOCK elements of the gate
half and the matching up half of one row. silu is computed in float32 and rounded to the
input dtype, then multiplied by `up` and rounded again, which is what torch does for a
half-precision `F.silu(gate) * up` (two ops, each in float32 "opmath"), so results match
the reference to the last bit up to exp() implementation differences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.triton_utils import cast, emulate_bf16, pdl_launch, pdl_release, pdl_wait, use_pdl, use_triton


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    # gate_up: (T, 2*I) -> (T, I)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_xt, stride_ot, I, BLOCK: tl.constexpr, EMULATE: tl.constexpr,
                         PDL: tl.constexpr):
    pdl_wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = j < I
    gate = tl.load(x_ptr + t * stride_xt + j, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * stride_xt + I + j, mask=mask, other=0.0).to(tl.float32)
    pdl_release(PDL)
    dt = out_ptr.dtype.element_ty
    act = cast(gate / (1.0 + tl.exp(-gate)), dt, EMULATE).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + j, cast(act * up, dt, EMULATE), mask=mask)


def silu_and_mul_triton(gate_up: torch.Tensor, *, block: int = 1024, num_warps: int = 4) -> torch.Tensor:
    t, two_i = gate_up.shape
    assert two_i % 2 == 0, gate_up.shape
    if gate_up.stride(1) != 1:
        gate_up = gate_up.contiguous()
    i = two_i // 2
    out = torch.empty((t, i), dtype=gate_up.dtype, device=gate_up.device)
    if t == 0 or i == 0:
        return out
    block = min(block, triton.next_power_of_2(i))
    _silu_and_mul_kernel[(t, triton.cdiv(i, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), i,
        BLOCK=block, EMULATE=emulate_bf16(gate_up.dtype), PDL=use_pdl(gate_up), num_warps=num_warps,
        **pdl_launch(use_pdl(gate_up)),
    )
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if use_triton(gate_up):
        return silu_and_mul_triton(gate_up)
    return silu_and_mul_ref(gate_up)
