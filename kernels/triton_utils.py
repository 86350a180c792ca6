"""Small pieces the Triton kernels share, mostly to stay exact under Triton's CPU interpreter.

The interpreter (TRITON_INTERPRET=1, how CI runs the kernels) models bfloat16 as raw
uint16 bits, and gets two things wrong that the GPU gets right: float32 -> bfloat16 casts
truncate instead of rounding to nearest even, and tl.dot multiplies bfloat16 bit patterns
as integers. The kernels take an EMULATE flag, True only when interpreting, that routes
those two operations through the helpers below; on the GPU the flag is False and the
plain operations compile unchanged.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def emulate_bf16(*dtypes: torch.dtype) -> bool:
    """The kernels' EMULATE flag: interpreting, with bfloat16 among the dtypes involved."""
    return interpreting() and torch.bfloat16 in dtypes


@triton.jit
def cast(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """x.to(dtype), rounding to nearest even for bfloat16 also under the interpreter."""
    if EMULATE:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            y = x.to(dtype)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def dot(a, b, DOT_PREC: tl.constexpr, EMULATE: tl.constexpr):
    """tl.dot with float32 accumulation. Under the interpreter, bfloat16 operands (already
    rounded to bfloat16) are widened first: the float32 product is what the tensor cores
    compute."""
    if EMULATE:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=DOT_PREC)
    return c
