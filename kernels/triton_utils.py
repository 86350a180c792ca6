"""What the Triton kernels share: the dispatch rule, and exactness under Triton's CPU interpreter.

Dispatch: every public kernel function runs its Triton kernel on CUDA tensors and its torch
reference on CPU tensors. `PDCLUSTER_KERNELS=triton` (or `force_triton()`) sends CPU
tensors to the Triton kernels too, which then run in Triton's interpreter (TRITON_INTERPRET=1
must be set before triton is imported): slow, but it runs a whole model through the
kernels on a machine without a GPU, e.g. `PDCLUSTER_KERNELS=triton TRITON_INTERPRET=1
pytest tests/test_engine_vs_transformers.py`.

The interpreter (TRITON_INTERPRET=1, how CI runs the kernels) models bfloat16 as raw
uint16 bits, and gets two things wrong that the GPU gets right: float32 -> bfloat16 casts
truncate instead of rounding to nearest even, and tl.dot multiplies bfloat16 bit patterns
as integers. The kernels take an EMULATE flag, True only when interpreting, that routes
those two operations through the helpers below; on the GPU the flag is False and the
plain operations compile unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_force = os.environ.get("PDCLUSTER_KERNELS", "").lower() == "triton"


def use_triton(x: torch.Tensor) -> bool:
    """Whether a kernel call on `x` takes the Triton path (see the module docstring)."""
    if x.is_cuda:
        return True
    if _force and not interpreting():
        raise RuntimeError("PDCLUSTER_KERNELS=triton on CPU tensors needs Triton's interpreter: "
                           "set TRITON_INTERPRET=1 before triton is first imported")
    return _force


@contextmanager
def force_triton(on: bool = True) -> Iterator[None]:
    """Within the block, CPU tensors take the Triton kernels too (under the interpreter)."""
    global _force
    before, _force = _force, on
    try:
        yield
    finally:
        _force = before


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
