"""The sampler's draw: the exponential race with counter-based noise.

A row that samples takes token argmax_v(probs_v / E_v), E = -log(U), where U for (seed,
step, token v) is a function of those three integers only (engine/sampler.py says why: a
seeded request reproduces in any batch, on any device, split across nodes). Taking logs,
that is argmax_v(x_v + G_v) with G = -log(E), x the row's logits (softmax's max and sum
shift every token alike): the Gumbel-max form, which needs no softmax at all. So the draw
is computed that way, on every device, in float64: G from U, and x + G (a float32 sum
would round G to the logits' ulp, which at a low temperature's large x ties tokens that
the noise should separate). A CPU and a GPU draw the same token unless two tokens' scores
lie within float64's last bits (the two libraries' logs may differ there).

The torch formulation below is the reference and what CPUs run: int64 hashing,
bit-identical on CPU and CUDA. On a GPU it is some twenty elementwise kernels over (rows,
vocab) int64 and float64 tensors, 1.2-1.5 ms per decode step at batch 16-64 on an H200
for a 128k vocab, a quarter of the step (bench/gpu/sampler_cost.py). `exponential_race`
on CUDA tensors runs one Triton kernel instead, over (row, slice of the vocabulary)
programs: each hashes its slice, adds the noise and keeps its best token; one argmax over
the slices' bests picks the row's token (the lowest id among equals, as torch's argmax).
A program per row instead left most of the GPU idle: 0.25-0.34 ms at batch 1-64
(bench/results/2026-12-01h-h200).

Before its first use on a device the kernel draws a fixed batch beside the reference
(`kernel_verified`); if it fails to build or disagrees, that device samples with the
reference, with a warning: slower, never different tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels.host_copy import to_device
from kernels.triton_utils import checked_once, use_triton


MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1
# lowbias32 (C. Wellons, hash-prospector): x ^= x>>16; x *= A; x ^= x>>15; x *= B; x ^= x>>16.
# The multipliers are kept as signed 32-bit values: for x in [0, 2**32), |x * m| < 2**63,
# so no int64 product overflows, and `& MASK32` of the (two's complement) product is
# exactly x * m mod 2**32.
MUL_A = 0x7FEB352D
MUL_B = 0x846CA68B - (1 << 32)
TOKEN_SALT = 0x9E3779B9  # keeps token 0 off mix32's fixed point (mix32(0) == 0)
STEP_SALT = 0x85EBCA6B


# --- the torch reference ------------------------------------------------------------------

def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash. `x`: int64 values in [0, 2**32); same shape out."""
    x = x ^ (x >> 16)
    x.mul_(MUL_A).bitwise_and_(MASK32)
    x.bitwise_xor_(x >> 15)
    x.mul_(MUL_B).bitwise_and_(MASK32)
    x.bitwise_xor_(x >> 16)
    return x


def _key_parts(seeds: Sequence[int], steps: Sequence[int]) -> list[list[int]]:
    """[low seed words, high seed words, salted steps]: what a row's key is mixed from."""
    seeds64 = [s & MASK64 for s in seeds]
    return [[s & MASK32 for s in seeds64], [s >> 32 for s in seeds64], [(t + STEP_SALT) & MASK32 for t in steps]]


def row_keys(seeds: Sequence[int], steps: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """One 32-bit key per (seed, step): int64 (R,). Seeds are taken modulo 2**64.

    Chained bijections, so distinct steps of one seed, and distinct seeds at one step,
    always get distinct keys."""
    lo, hi, step = to_device(_key_parts(seeds, steps), torch.int64, device)            # (3, R)
    key = mix32(step)
    key = mix32(key ^ hi)
    return mix32(key ^ lo)


def uniform_noise(seeds: Sequence[int], steps: Sequence[int], vocab_size: int,
                  device: torch.device | str) -> torch.Tensor:
    """U[r, v] in (0, 1) strictly, float64 (R, V), a function of (seeds[r], steps[r], v) only."""
    keys = row_keys(seeds, steps, device)                                              # (R,)
    tokens = torch.arange(vocab_size, dtype=torch.int64, device=device)               # (V,)
    token_hash = mix32((tokens + TOKEN_SALT) & MASK32)                                 # (V,)
    return hash_to_uniform(mix32(token_hash[None, :] ^ keys[:, None]))                 # (R, V)


def hash_to_uniform(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes (int64) -> (h + 0.5) / 2**32, float64. Exact in float64, so the same
    bits on every device; never 0 or 1 (smallest 2**-33, largest 1 - 2**-33)."""
    return h.to(torch.float64).add_(0.5).mul_(2.0 ** -32)


def exponential_noise(seeds: Sequence[int], steps: Sequence[int], vocab_size: int,
                      device: torch.device | str) -> torch.Tensor:
    """E = -log(U) ~ Exp(1), float32 (R, V), never 0 (log is taken in float64)."""
    return uniform_noise(seeds, steps, vocab_size, device).log_().neg_().to(torch.float32)


def gumbel_noise(seeds: Sequence[int], steps: Sequence[int], vocab_size: int,
                 device: torch.device | str) -> torch.Tensor:
    """G = -log(-log(U)), Gumbel(0, 1), float64 (R, V)."""
    return uniform_noise(seeds, steps, vocab_size, device).log_().neg_().log_().neg_()


def exponential_race_ref(x: torch.Tensor, seeds: Sequence[int], steps: Sequence[int]) -> torch.Tensor:
    return (x.double() + gumbel_noise(seeds, steps, x.shape[1], x.device)).argmax(dim=-1)


# --- the kernel -----------------------------------------------------------------------------

_MASK32 = tl.constexpr(MASK32)
_MUL_A = tl.constexpr(MUL_A)
_MUL_B = tl.constexpr(MUL_B)
_TOKEN_SALT = tl.constexpr(TOKEN_SALT)


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = (x * _MUL_A) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL_B) & _MASK32
    return x ^ (x >> 16)


# Not specialized on the sizes: Triton compiles a variant per class of each int argument
# (== 1, divisible by 16, other), so a batch of one sampled row, or of 16, would each compile
# (~0.75 s on an H200) in a serving step, not in kernel_verified's check.
@triton.jit(do_not_specialize=["R", "V", "stride"])
def _race_kernel(x_ptr, parts_ptr, only_ptr, otherwise_ptr, best_ptr, best_at_ptr, R, V, stride,
                 BLOCK: tl.constexpr, ONLY: tl.constexpr):
    row = tl.program_id(0)
    piece = tl.program_id(1)
    slices = tl.num_programs(1)
    go = True
    if ONLY:  # rows to draw for; the others take their token from otherwise_ptr
        go = tl.load(only_ptr + row) != 0
    if go:
        lo = tl.load(parts_ptr + row)
        hi = tl.load(parts_ptr + R + row)
        step = tl.load(parts_ptr + 2 * R + row)
        key = _mix32(_mix32(_mix32(step) ^ hi) ^ lo)
        v = piece.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row.to(tl.int64) * stride + v, mask=v < V, other=float("-inf"))
        h = _mix32(_mix32((v + _TOKEN_SALT) & _MASK32) ^ key)
        u = (h.to(tl.float64) + 0.5) * (2.0 ** -32)
        score = x.to(tl.float64) - tl.log(-tl.log(u))
        top = tl.max(score, 0)
        # The slice's first best token (a slice with every token out: its first, as torch's argmax).
        tl.store(best_ptr + row * slices + piece, top)
        tl.store(best_at_ptr + row * slices + piece, tl.min(tl.where(score == top, v, V), 0))
    else:  # the first slice wins the row's argmax, with the given token
        tl.store(best_ptr + row * slices + piece, tl.where(piece == 0, 0.0, float("-inf")).to(tl.float64))
        tl.store(best_at_ptr + row * slices + piece, tl.load(otherwise_ptr + row))


_SLICE = 2048


def race_keys(seeds: Sequence[int], steps: Sequence[int], device: torch.device) -> torch.Tensor:
    """What race_triton mixes each row's key from: int64 (3, R) on `device`."""
    return to_device(_key_parts(seeds, steps), torch.int64, device)


def race_triton(x: torch.Tensor, keys: torch.Tensor, only: torch.Tensor | None = None,
                otherwise: torch.Tensor | None = None) -> torch.Tensor:
    """exponential_race_triton with the keys on the device already. `only`: int32 (R,),
    nonzero for the rows to draw; the others return their token in `otherwise` (int64 (R,))."""
    r, v = x.shape
    if r == 0:
        return torch.empty(0, dtype=torch.int64, device=x.device)
    if x.stride(1) != 1:
        x = x.contiguous()
    if only is not None and otherwise is None:
        raise ValueError("the rows not drawn (`only` 0) need their tokens in `otherwise`")
    slices = triton.cdiv(v, _SLICE)
    best = torch.empty(r, slices, dtype=torch.float64, device=x.device)               # (R, S)
    best_at = torch.empty(r, slices, dtype=torch.int64, device=x.device)              # (R, S)
    _race_kernel[(r, slices)](x, keys, keys if only is None else only, keys if otherwise is None else otherwise,
                              best, best_at, r, v, x.stride(0), BLOCK=_SLICE, ONLY=only is not None, num_warps=4)
    # argmax takes the first of equal slices: the lowest id, as the reference's argmax.
    return best_at.gather(1, best.argmax(dim=1, keepdim=True)).squeeze(1)            # (R,)


def exponential_race_triton(x: torch.Tensor, seeds: Sequence[int], steps: Sequence[int]) -> torch.Tensor:
    return race_triton(x, race_keys(seeds, steps, x.device))


_verified: dict[torch.device, bool] = {}


def kernel_verified(device: torch.device | str) -> bool:
    """Whether the kernel draws the reference's tokens on `device` (checked once)."""
    def check(device: torch.device) -> str | None:
        x = torch.randn(4, 5000, generator=torch.Generator().manual_seed(0)) * 3
        x[1, 100:] = float("-inf")
        seeds, steps = [0, 1, 2**63 + 3, -1], [0, 5, 9, 2**33]
        want = exponential_race_ref(x, seeds, steps).tolist()
        got = exponential_race_triton(x.to(device), seeds, steps).tolist()
        return None if got == want else f"drew {got} where the reference draws {want}"
    return checked_once(_verified, device, "sampling", "sampling with the torch reference", check)


def exponential_race(x: torch.Tensor, seeds: Sequence[int], steps: Sequence[int]) -> torch.Tensor:
    """The token each row draws: argmax(softmax(x) / E), as argmax(x + G). `x`: float32
    (R, V), the row's logits after temperature and filters (-inf where a token is out);
    -> int64 (R,)."""
    if use_triton(x) and kernel_verified(x.device):
        return exponential_race_triton(x, seeds, steps)
    return exponential_race_ref(x, seeds, steps)
