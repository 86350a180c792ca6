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

Programmatic dependent launch (PDL, Hopper and later): inside `programmatic_launch()` the
kernels that take a PDL flag are launched with the programmatic-serialization attribute,
so the GPU may schedule a kernel's programs while the kernel before it still runs. Each
such kernel calls `pdl_wait` first, before it reads or writes anything (every program,
also those with nothing to do), and `pdl_release` after its loads, before its stores: its
successor's programs are then placed while its last loads arrive and start the moment it
ends, and they do not sit on the SMs, holding registers and shared memory, while it still
streams. What this hides is the gap between two kernels of a decode step, ~1-2 us each
(bench/results/2026-12-01d-h200). The wait covers all earlier kernels, not only the one
before: a kernel completes only after its own wait returned, so completion is transitive.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import triton
import triton.language as tl

log = logging.getLogger(__name__)

try:  # Triton >= 3.4 on NVIDIA; without it PDL stays off
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - depends on the Triton build
    gdc_launch_dependents = gdc_wait = None


def checked_once(cache: dict[torch.device, bool], device: torch.device | str, what: str, fallback: str,
                 check: Callable[[torch.device], str | None]) -> bool:
    """Whether a kernel gives its reference's results on `device`, asked once per device
    and kept in `cache`: `check(device)` returns None when it does, else what differed
    (raising counts as differing: a Triton or driver that cannot build it). Otherwise a
    warning names `what` and the `fallback` the caller takes on that device (its torch
    reference: slower, never different). "cuda" (device: auto) is checked as the
    tensors' "cuda:N"."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    ok = cache.get(device)
    if ok is None:
        try:
            why = check(device)
        except Exception as e:
            why = f"{type(e).__name__}: {e}"
        ok = why is None
        if not ok:
            log.warning("the %s kernel is not used on %s (%s): %s", what, device, why, fallback)
        cache[device] = ok
    return ok


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


_pdl = False


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch needs a compiled kernel (not the interpreter) on sm_90+."""
    return (device.type == "cuda" and gdc_wait is not None and not interpreting()
            and torch.cuda.get_device_capability(device)[0] >= 9)


def use_pdl(x: torch.Tensor) -> bool:
    """Whether a kernel launched on `x` now takes programmatic dependent launch."""
    return _pdl and x.is_cuda


@contextmanager
def programmatic_launch(on: bool = True) -> Iterator[None]:
    """Within the block, kernels with a PDL flag launch programmatically (see the module
    docstring). The model runner captures its decode graphs inside it where supported."""
    global _pdl
    before, _pdl = _pdl, on
    try:
        yield
    finally:
        _pdl = before


def pdl_launch(pdl: bool) -> dict:
    """The launch keyword for a kernel call: none unless PDL is on (the interpreter
    knows no such option)."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Block until every earlier kernel has finished and its writes are visible."""
    if PDL:
        gdc_wait()


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """Let the next kernel's programs be scheduled (they then wait in pdl_wait)."""
    if PDL:
        gdc_launch_dependents()


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
