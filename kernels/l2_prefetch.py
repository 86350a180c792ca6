"""Pull a weight into the GPU's L2 cache ahead of the matrix product that reads it.

Why: at small batch a decode step streams every weight once, and the DRAM sits idle while
latency-bound kernels run (attention over a short context, norms, rope): at batch 1 on an
H200, ~8 us per layer around attention. An H200's L2 holds 50 MB; o_proj's weight
(4096 x 4096 bf16, 33.5 MB) fits. Reading it into L2 on a second stream while attention
runs lets o_proj read from L2 instead of DRAM.

The kernel issues Hopper's bulk L2 prefetch (`cp.async.bulk.prefetch.L2.global`, PTX 8.0,
sm_90+): one instruction per CHUNK bytes, no registers or shared memory held while the
bytes move, so the few programs it takes barely compete with the kernels beside it.
Nothing is written and nothing is read back; a prefetch that is dropped or evicted costs
only the bandwidth. On CPU tensors, or on a GPU older than sm_90, `l2_prefetch` does
nothing (there is no interpreter path for inline PTX).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _l2_prefetch_kernel(base, n_bytes, CHUNK: tl.constexpr, PER_PROGRAM: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64) * PER_PROGRAM + tl.arange(0, PER_PROGRAM)
    off = chunk * CHUNK
    size = tl.where(off < n_bytes, tl.minimum(n_bytes - off, CHUNK), 0).to(tl.int32)
    tl.inline_asm_elementwise(
        asm="{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        constraints="=r,l,r", args=[base + off, size], dtype=tl.int32, is_pure=False, pack=1)


def supported(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9


def l2_prefetch(t: torch.Tensor, chunk: int = 1 << 16, per_program: int = 32) -> None:
    """Start moving t's bytes into L2 (asynchronously on the current stream); no-op where unsupported."""
    if not supported(t):
        return
    assert t.is_contiguous(), "l2_prefetch reads one contiguous range"
    n_bytes = t.numel() * t.element_size()
    assert n_bytes % 16 == 0 and t.data_ptr() % 16 == 0, "bulk prefetch moves 16-byte aligned multiples of 16 bytes"
    chunks = triton.cdiv(n_bytes, chunk)
    _l2_prefetch_kernel[(triton.cdiv(chunks, per_program),)](
        t.data_ptr(), n_bytes, CHUNK=chunk, PER_PROGRAM=per_program, num_warps=1)


class SideStreamPrefetch:
    """Fork a prefetch onto a side stream at `start`, join it back at `join`: between the
    two, the current stream's kernels run beside it (in a CUDA graph, as two branches)."""

    def __init__(self, device: torch.device, chunk: int = 1 << 16, per_program: int = 32):
        self.stream = torch.cuda.Stream(device)
        self.chunk, self.per_program = chunk, per_program

    def start(self, t: torch.Tensor) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self.stream):
            l2_prefetch(t, self.chunk, self.per_program)

    def join(self) -> None:
        torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
