"""min_p and top_p: which tokens a sampled row may still draw, without sorting the vocabulary.

The torch reference sorts each row's probabilities to find top_p's cut: on an H200 the sort
and cumsum over a 128k vocabulary were most of a sampled decode step's extra cost (0.84 ms
of a 1.45 ms sampler at batch 64, bench/results/2026-12-01g-h200). The cut is a threshold:
keep the tokens whose probability p is at least the smallest value v with mass(p > v) <
top_p. That value can be found without ordering anything: mass(p > t) only falls as t
rises, and non-negative float32 values order like their int32 bit patterns, so a search
over those patterns lands on it exactly. Each pass tries 16 thresholds spread over the
patterns still possible and keeps the seventeenth of the range between the last that holds
too much mass and the first that holds too little: 7 passes for top_p 0.95 (8 at most;
one when no row uses top_p).

Work is in q = exp(x - max) = p / p_max (the best token has q = 1): min_p keeps q >= min_p,
as the reference's p < min_p * p_max drops, and top_p's mass is compared with top_p times
the mass min_p kept (vLLM v1's order: top_p sees min_p's renormalised distribution).

Drawing with them (`draw_filtered`, what the sampler calls): a row is drawn first from
what min_p keeps, and top_p's passes then only matter for the rows whose token top_p would
rule out: the draw is argmax(x + G), and a token with the best score of a set has it in
every subset that holds it. Whether top_p keeps the token is measured in the first pass,
with the token's q as one of its thresholds; the rows that keep it (at least a top_p share
of the draws) skip the other passes, the mask and a second draw. Exactly the tokens of
filtering then drawing (see draw_filtered_triton).

Same function as the reference, so the kept set is the same up to float rounding: the
kernels' sums add in another order than torch's softmax and cumsum, so a token can differ
only where the mass ahead of it is within float32 rounding of top_p (a sum over up to the
whole vocabulary: ~1e-6 of the mass), which moves the cut by a token among tokens that
hold about that much. Every GPU runs the kernels, so nodes that share a request agree.
Before their first use on a device they are checked beside the reference on rows whose
cut is far from any such tie (`filter_kernel_verified`); if they cannot build or
disagree, that device filters with the reference, with a warning.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.host_copy import to_device
from kernels.sampling import (exponential_race, exponential_race_ref, exponential_race_triton, kernel_verified,
                              race_keys, race_triton)
from kernels.triton_utils import checked_once, use_triton



# --- the torch reference ------------------------------------------------------------------

def mask_min_p_ref(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Drop tokens less likely than min_p times the most likely one. `min_p`: (M, 1). In place."""
    probs = torch.softmax(logits, dim=-1)                                             # (M, V)
    floor = probs.amax(dim=-1, keepdim=True) * min_p                                  # (M, 1)
    logits.masked_fill_(probs < floor, float("-inf"))


def mask_top_p_ref(logits: torch.Tensor, top_p: torch.Tensor) -> None:
    """Keep the smallest set of most likely tokens whose mass reaches top_p: a token stays
    when the tokens strictly ahead of it in sorted order hold less than top_p. The cut is
    turned into a probability threshold, so tokens tied at the cut all stay and the
    result never depends on how the sort orders ties. The most likely token always
    stays, whatever top_p. `top_p`: (M, 1). In place."""
    probs = torch.softmax(logits, dim=-1)                                             # (M, V)
    ordered = probs.sort(dim=-1, descending=True).values                              # (M, V)
    ahead = F.pad(ordered.cumsum(dim=-1)[:, :-1], (1, 0))  # mass strictly ahead; monotone, [:, 0] == 0
    # >= 1 always: the top token stays even when top_p rounds to 0 in float32.
    n_keep = (ahead < top_p).sum(dim=-1, keepdim=True).clamp_(min=1)                  # (M, 1)
    cutoff = ordered.gather(1, n_keep - 1)                                            # (M, 1)
    logits.masked_fill_(probs < cutoff, float("-inf"))


def filter_ref(x: torch.Tensor, rows: list[int], min_p: list[float], top_p: list[float]) -> None:
    """min_p then top_p on rows `rows` of x, in place (min_p 0 / top_p 1: that filter off)."""
    for values, mask, off in ((min_p, mask_min_p_ref, 0.0), (top_p, mask_top_p_ref, 1.0)):
        on = [(r, v) for r, v in zip(rows, values) if v != off]
        if not on:
            continue
        idx = to_device([r for r, _ in on], torch.int64, x.device)
        sub = x[idx]
        mask(sub, to_device([v for _, v in on], torch.float32, x.device)[:, None])
        x[idx] = sub


# --- the kernel -----------------------------------------------------------------------------

# The kernels work in q = exp(x - max) = p / p_max: min_p keeps q >= min_p, and top_p keeps
# q >= the least value u with mass(q > u) < top_p * (the mass min_p kept). Each row is cut
# in slices of the vocabulary, one program each, so a small batch still fills the GPU
# (a program per row streamed ~30 GB/s and left most SMs idle: 0.44 ms at batch 1); what
# a row's slices must agree on passes between launches, and every program of a row
# reduces its row's partials in the same order, so all get the same bits.
SLICE = 4096          # tokens per program
SUB = 256             # tokens per step of a counting pass
CANDIDATES = 16       # thresholds tried per counting pass: (lo, hi] shrinks 17-fold a pass
Q_ONE_BITS = 0x3F800000  # bits of 1.0, the best token's q
_Q_ONE_BITS = tl.constexpr(Q_ONE_BITS)


def _passes(top_p: list[float], vocab: int) -> int:
    """Counting passes that narrow every row's first bracket (see _bracket) to one pattern:
    7 for top_p 0.95 at a 128k vocabulary, 8 at most, 1 when no row uses top_p. The
    largest top_p below 1 has the lowest floor, so the widest bracket."""
    return _passes_for(max((p for p in top_p if p < 1.0), default=1.0), vocab)


@functools.lru_cache(maxsize=256)
def _passes_for(top_p: float, vocab: int) -> int:
    if top_p >= 1.0:
        return 1
    floor = np.float32(0.5) * (np.float32(1.0) - np.float32(top_p)) / np.float32(vocab)
    lo = int(floor.view(np.int32)) - 1 if floor > 0 else -1
    widest = Q_ONE_BITS - lo + 64  # 64: the GPU's division may round otherwise
    passes = 0
    while widest > 1:  # the first pass spreads one threshold fewer (see _candidates)
        widest = -(-widest // (CANDIDATES if passes == 0 else CANDIDATES + 1))
        passes += 1
    return max(passes, 1)


@triton.jit(do_not_specialize=["V", "stride"])
def _slice_max_kernel(x_ptr, rows_ptr, part_max_ptr, V, stride, SLICE: tl.constexpr):
    prog, piece, slices = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    row = tl.load(rows_ptr + prog)
    v = piece * SLICE + tl.arange(0, SLICE)
    x = tl.load(x_ptr + row * stride + v, mask=v < V, other=float("-inf"))
    tl.store(part_max_ptr + prog * slices + piece, tl.max(x, 0))


@triton.jit
def _row_sum(ptr, n, S_POW2: tl.constexpr):
    """The sum of ptr[:n] in a fixed order: every program of a row gets the same bits."""
    i = tl.arange(0, S_POW2)
    return tl.sum(tl.load(ptr + i, mask=i < n, other=0.0), 0)


@triton.jit(do_not_specialize=["V", "stride"])
def _slice_q_kernel(x_ptr, rows_ptr, min_p_ptr, part_max_ptr, q_ptr, part_kept_ptr, V, stride,
                    SLICE: tl.constexpr, S_POW2: tl.constexpr, CUT_MIN_P: tl.constexpr):
    """q (or -1 where min_p rules the token out) into q_ptr; each slice's kept mass; with
    CUT_MIN_P, also -inf into x where min_p rules the token out."""
    prog, piece, slices = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    row = tl.load(rows_ptr + prog)
    i = tl.arange(0, S_POW2)
    mx = tl.max(tl.load(part_max_ptr + prog * slices + i, mask=i < slices, other=float("-inf")), 0)
    live = mx > float("-inf")  # a row with no token left: nothing to keep, nothing to filter
    v = piece * SLICE + tl.arange(0, SLICE)
    x = tl.load(x_ptr + row * stride + v, mask=v < V, other=float("-inf"))
    q = tl.exp(x - tl.where(live, mx, 0.0))
    q = tl.where(q >= tl.load(min_p_ptr + prog), q, -1.0)
    q = tl.where(live, q, -1.0)
    tl.store(q_ptr + prog.to(tl.int64) * V + v, q, mask=v < V)
    tl.store(part_kept_ptr + prog * slices + piece, tl.sum(tl.where(q > 0.0, q, 0.0), 0))
    if CUT_MIN_P:
        tl.store(x_ptr + row * stride + v, float("-inf"), mask=(v < V) & (q < 0.0))


@triton.jit
def _candidates(lo, hi, tok, first, drawn, K: tl.constexpr):
    """The K thresholds a pass tries in (lo, hi], as int32 bit patterns: spread evenly; in
    the first pass K - 1 of them, and as the last the drawn token's q (clamped into the
    bracket), whose mass says whether top_p keeps that token (see draw_filtered_triton);
    a pass without a drawn token repeats its last spread threshold there instead."""
    j = tl.arange(0, K)
    parts = K + 1 - first                                       # intervals the thresholds cut
    step = (hi - lo + parts - 1) // parts
    cand = tl.minimum(lo + step * (j + 1), hi)
    spread_last = tl.minimum(lo + step * (K - 1), hi)
    extra = tl.where(drawn != 0, tl.minimum(tl.maximum(tok, lo), hi), spread_last)
    return tl.where((j == K - 1) & (first != 0), extra, cand)


@triton.jit
def _bracket(top_p_ptr, part_kept_ptr, part_mass_ptr, state_ptr, tok_ptr, prog, slices, first, after_first,
             drawn, V, S_POW2: tl.constexpr, K: tl.constexpr):
    """The row's (lo, hi] after the pass whose partial masses part_mass_ptr holds (state_ptr
    holds the bracket that pass tried; `after_first`: that pass was the first), or the
    first bracket when `first`; and, after the first pass, whether the drawn token's q
    holds less mass above it than top_p asks for (top_p keeps the token)."""
    kept = _row_sum(part_kept_ptr + prog * slices, slices, S_POW2)
    top_p = tl.load(top_p_ptr + prog)
    target = top_p * kept
    lo = tl.load(state_ptr + prog * 2)
    hi = tl.load(state_ptr + prog * 2 + 1)
    j = tl.arange(0, K)
    tok = tl.load(tok_ptr + prog, mask=(after_first * drawn) != 0, other=0)  # the first pass's extra threshold
    cand = _candidates(lo, hi, tok, after_first, drawn, K)
    s = tl.arange(0, S_POW2)
    mass = tl.sum(tl.load(part_mass_ptr + prog * slices * K + s[:, None] * K + j[None, :],
                          mask=(s < slices)[:, None], other=0.0), 0)                  # (K,)
    below = mass < target
    # Any set of thresholds narrows the bracket alike: the highest holding too much mass
    # and the lowest holding too little.
    new_hi = tl.min(tl.where(below, cand, hi), 0)
    new_lo = tl.max(tl.where(below, lo, cand), 0)
    shrink = (hi - lo > 1).to(tl.int32) * (1 - first) > 0
    # The drawn token stands where its threshold holds too little mass; not at or below
    # the first bracket's floor (its threshold was clamped up to it, and the cut always
    # lies above: the floor's margin over top_p is within the sums' rounding as top_p nears
    # 1), and always where top_p is off (its set is min_p's, which the token came from).
    token_kept = tl.sum(tl.where(j == K - 1, below.to(tl.int32), 0), 0) * (tok > lo).to(tl.int32)
    token_kept = tl.maximum(token_kept, (top_p >= 1.0).to(tl.int32)) * after_first * drawn
    lo = tl.where(shrink, new_lo, lo)
    hi = tl.where(shrink, new_hi, hi)
    if first:
        # Tokens at or below `floor` hold at most V * floor = half the mass top_p leaves out
        # (the kept mass is >= 1: the best token's q), so the cut lies above it: a bracket
        # ~6x narrower than all of [0, 1], one pass fewer (_passes).
        floor = 0.5 * (1.0 - top_p) / V
        lo = tl.where(floor > 0.0, floor.to(tl.int32, bitcast=True) - 1, -1)
        hi = tl.where(top_p < 1.0, tl.where(kept > 0.0, _Q_ONE_BITS, 0), 0)  # top_p 1 / dead: keep all
    return lo, hi, token_kept


@triton.jit(do_not_specialize=["V", "first", "after_first", "drawn"])
def _count_kernel(q_ptr, top_p_ptr, part_kept_ptr, tok_ptr, accepted_ptr, mass_in_ptr, state_in_ptr, mass_out_ptr,
                  state_out_ptr, V, first, after_first, drawn, SLICE: tl.constexpr, SUB: tl.constexpr,
                  S_POW2: tl.constexpr, K: tl.constexpr):
    """One counting pass: the row's bracket from the pass before, then this slice's mass
    above each of K thresholds in it. Nothing to do for a row whose drawn token stands
    (decided after the first pass, written then by the row's first slice)."""
    prog, piece, slices = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    stands = tl.load(accepted_ptr + prog, mask=(first == 0) & (after_first == 0), other=0)
    if stands == 0:
        lo, hi, token_kept = _bracket(top_p_ptr, part_kept_ptr, mass_in_ptr, state_in_ptr, tok_ptr, prog, slices,
                                      first, after_first, drawn, V, S_POW2, K)
        if (piece == 0) & (after_first != 0):
            tl.store(accepted_ptr + prog, token_kept)
        if token_kept == 0:
            if piece == 0:
                tl.store(state_out_ptr + prog * 2, lo)
                tl.store(state_out_ptr + prog * 2 + 1, hi)
            j = tl.arange(0, K)
            tok = tl.load(tok_ptr + prog, mask=(first * drawn) != 0, other=0)
            cut = _candidates(lo, hi, tok, first, drawn, K).to(tl.float32, bitcast=True)  # (K,)
            acc = tl.zeros([SUB, K], tl.float32)
            base = q_ptr + prog.to(tl.int64) * V
            for start in range(0, SLICE, SUB):
                v = piece * SLICE + start + tl.arange(0, SUB)
                q = tl.load(base + v, mask=v < V, other=-1.0)
                acc += tl.where(q[:, None] > cut[None, :], q[:, None], 0.0)
            tl.store(mass_out_ptr + (prog * slices + piece) * K + j, tl.sum(acc, 0))


@triton.jit(do_not_specialize=["V", "stride", "after_first", "drawn"])
def _mask_kernel(x_ptr, rows_ptr, q_ptr, top_p_ptr, part_kept_ptr, tok_ptr, accepted_ptr, again_ptr, mass_ptr,
                 state_ptr, V, stride, after_first, drawn, SLICE: tl.constexpr, S_POW2: tl.constexpr,
                 K: tl.constexpr):
    """The last pass's bracket gives the cut: -inf where q falls below it (or min_p's -1).
    Nothing to do for a row whose drawn token stands; the others are drawn again
    (again_ptr, by batch row, when drawing)."""
    prog, piece, slices = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    row = tl.load(rows_ptr + prog)
    stands = tl.load(accepted_ptr + prog, mask=drawn != 0, other=0)  # drawing takes two passes or more
    if (piece == 0) & (drawn != 0):
        tl.store(again_ptr + row, 1 - stands)
    if stands == 0:
        lo, hi, _ = _bracket(top_p_ptr, part_kept_ptr, mass_ptr, state_ptr, tok_ptr, prog, slices, 0, after_first,
                             drawn, V, S_POW2, K)
        v = piece * SLICE + tl.arange(0, SLICE)
        q = tl.load(q_ptr + prog.to(tl.int64) * V + v, mask=v < V, other=0.0)
        live = _row_sum(part_kept_ptr + prog * slices, slices, S_POW2) > 0.0
        cut = tl.where(live, hi.to(tl.float32, bitcast=True), float("-inf"))  # a dead row: nothing goes
        tl.store(x_ptr + row * stride + v, float("-inf"), mask=(v < V) & (q < cut))


class _Filter:
    """One filter call's rows, arguments and scratch on the device."""

    def __init__(self, x: torch.Tensor, rows: list[int], min_p: list[float], top_p: list[float]):
        if x.stride(1) != 1:
            raise ValueError("the filter kernel edits rows in place: they must be contiguous")
        device, m, self.vocab = x.device, len(rows), x.shape[1]
        self.x, self.top_p = x, top_p
        self.slices = triton.cdiv(self.vocab, SLICE)
        self.s_pow2 = triton.next_power_of_2(self.slices)
        self.grid = (m, self.slices)
        # Buffers used in halves are padded to 4 rows: Triton compiles a kernel variant per
        # pointer alignment (16 bytes or not), and a half of an odd-sized buffer would
        # compile another one in a serving step.
        self.padded = -(-m // 4) * 4
        pad = [0.0] * (self.padded - m)
        self.idx = to_device(rows, torch.int64, device)
        self.args = to_device([min_p + pad, top_p + pad], torch.float32, device)        # (2, M)
        self.q = torch.empty(m, self.vocab, dtype=torch.float32, device=device)         # (M, V)
        self.part = torch.empty(2, self.padded, self.slices, dtype=torch.float32, device=device)  # max, kept mass
        self.accepted = torch.empty(m, dtype=torch.int32, device=device)                # drawn token stands

    def q_values(self, cut_min_p: bool) -> None:
        x, grid = self.x, self.grid
        _slice_max_kernel[grid](x, self.idx, self.part[0], self.vocab, x.stride(0), SLICE=SLICE, num_warps=4)
        _slice_q_kernel[grid](x, self.idx, self.args[0], self.part[0], self.q, self.part[1], self.vocab, x.stride(0),
                              SLICE=SLICE, S_POW2=self.s_pow2, CUT_MIN_P=cut_min_p, num_warps=4)

    def cut_top_p(self, tok: torch.Tensor | None = None, again: torch.Tensor | None = None) -> None:
        """The counting passes and the mask; `tok`: int32 (M,) bits of each row's drawn
        token's q, or None (filter every row); then `again`, int32 (R,) zeros, gets 1
        for the batch rows whose drawn token top_p rules out."""
        x, grid, m = self.x, self.grid, self.grid[0]
        drawn = int(tok is not None)
        tok = self.accepted if tok is None else tok  # neither read without a drawn token
        again = self.accepted if again is None else again
        mass = torch.empty(2, self.padded, self.slices, CANDIDATES, dtype=torch.float32, device=x.device)  # by parity
        state = torch.empty(2, self.padded, 2, dtype=torch.int32, device=x.device)             # (lo, hi] by parity
        passes = _passes(self.top_p, self.vocab)
        for k in range(passes):
            _count_kernel[grid](self.q, self.args[1], self.part[1], tok, self.accepted, mass[(k + 1) % 2],
                                state[(k + 1) % 2], mass[k % 2], state[k % 2], self.vocab, int(k == 0), int(k == 1),
                                drawn, SLICE=SLICE, SUB=SUB, S_POW2=self.s_pow2, K=CANDIDATES, num_warps=4)
        last = (passes - 1) % 2
        _mask_kernel[grid](x, self.idx, self.q, self.args[1], self.part[1], tok, self.accepted, again, mass[last],
                           state[last], self.vocab, x.stride(0), int(passes == 1), drawn, SLICE=SLICE,
                           S_POW2=self.s_pow2, K=CANDIDATES, num_warps=4)


def filter_triton(x: torch.Tensor, rows: list[int], min_p: list[float], top_p: list[float]) -> None:
    if not rows:
        return
    f = _Filter(x, rows, min_p, top_p)
    f.q_values(cut_min_p=False)
    f.cut_top_p()


def draw_filtered_triton(x: torch.Tensor, rows: list[int], min_p: list[float], top_p: list[float],
                         seeds: Sequence[int], steps: Sequence[int]) -> torch.Tensor:
    """filter_triton then exponential_race_triton, the same tokens, mostly without top_p's
    counting passes. Drawn first from what min_p keeps, a row's token t is the one drawn
    from top_p's set too whenever that set holds t: the draw is argmax(x + G) over the set,
    and t has the largest score of a superset. top_p keeps t exactly when the mass above
    q_t is below top_p's target, which the first pass measures with q_t as one of its
    thresholds, by the arithmetic every threshold gets (so it is the cut's own test: mass
    only falls as a threshold rises, in float32 sums too); the token then stands, and the
    row's later passes, mask and second draw do nothing. That is most rows: the first draw
    lands in top_p's set with probability at least top_p. Edits x (min_p's cut; top_p's in
    the rows drawn again)."""
    if not rows:
        return exponential_race_triton(x, seeds, steps)
    f = _Filter(x, rows, min_p, top_p)
    f.q_values(cut_min_p=True)
    keys = race_keys(seeds, steps, x.device)
    first = race_triton(x, keys)                                                      # (R,)
    if all(p >= 1.0 for p in top_p):
        return first  # min_p alone: its cut is in x already
    tok = f.q.gather(1, first[f.idx][:, None]).view(torch.int32)[:, 0]                # (M,) bits of q_t
    again = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)              # (R,)
    f.cut_top_p(tok, again)
    return race_triton(x, keys, only=again, otherwise=first)


_verified: dict[torch.device, bool] = {}


def _check_rows() -> tuple[torch.Tensor, list[float], list[float]]:
    """Rows with min_p and top_p cuts far from any float tie: top_p halfway between two
    consecutive sorted cumulative masses, min_p's floor halfway between two probabilities."""
    x = torch.randn(5, 5000, generator=torch.Generator().manual_seed(0)) * 3
    x[4, 40:] = float("-inf")
    probs = torch.softmax(x, dim=-1)
    ordered = probs.sort(dim=-1, descending=True).values.double()
    cum = ordered.cumsum(dim=-1)
    top_p = [float((cum[r, k] + cum[r, k + 1]) / 2) for r, k in enumerate((30, 300, 0, 4000, 10))]
    top_p[3] = 1.0
    min_p = [0.0, 0.0, 0.0, 0.0, 0.0]
    min_p[3] = float((ordered[3, 200] + ordered[3, 201]) / 2 / ordered[3, 0])
    min_p[4] = float((ordered[4, 20] + ordered[4, 21]) / 2 / ordered[4, 0])
    return x, min_p, top_p


def filter_kernel_verified(device: torch.device | str) -> bool:
    """Whether the kernel keeps the reference's tokens on `device` (checked once)."""
    def check(device: torch.device) -> str | None:
        x, min_p, top_p = _check_rows()
        rows = list(range(x.shape[0]))
        want = x.clone()
        filter_ref(want, rows, min_p, top_p)
        got = x.to(device)
        filter_triton(got, rows, min_p, top_p)
        return None if torch.equal(got.cpu().isinf(), want.isinf()) else "it kept other tokens than the reference"
    return checked_once(_verified, device, "min_p/top_p", "filtering with the torch reference", check)


def apply_min_p_top_p(x: torch.Tensor, rows: list[int], min_p: list[float], top_p: list[float]) -> None:
    """Set to -inf, in place, the tokens that min_p (0: off) and then top_p (1: off) rule out
    of rows `rows` of x (float32 (R, V): logits after temperature and top_k)."""
    if use_triton(x) and filter_kernel_verified(x.device):
        filter_triton(x, rows, min_p, top_p)
    else:
        filter_ref(x, rows, min_p, top_p)


_draw_verified: dict[torch.device, bool] = {}


def draw_kernel_verified(device: torch.device | str) -> bool:
    """Whether draw_filtered_triton draws the reference's tokens on `device` (checked once,
    after the two kernels it is made of), on the check rows each drawn with 4 seeds: most
    draws stand in some rows, most are drawn again in others."""
    def check(device: torch.device) -> str | None:
        if not (kernel_verified(device) and filter_kernel_verified(device)):
            return "the draw's or the filter's kernel is not used there"
        x, min_p, top_p = _check_rows()
        x, n = x.repeat_interleave(4, dim=0), x.shape[0] * 4
        rows, min_p, top_p = list(range(n)), [p for p in min_p for _ in range(4)], [p for p in top_p for _ in range(4)]
        seeds, steps = [3 * i + 1 for i in range(n)], [i % 5 for i in range(n)]
        want = x.clone()
        filter_ref(want, rows, min_p, top_p)
        want_tokens = exponential_race_ref(want, seeds, steps).tolist()
        got = draw_filtered_triton(x.to(device), rows, min_p, top_p, seeds, steps).tolist()
        return None if got == want_tokens else f"drew {got} where the reference draws {want_tokens}"
    return checked_once(_draw_verified, device, "min_p/top_p draw", "filtering, then drawing, apart", check)


def draw_filtered(x: torch.Tensor, rows: list[int], min_p: list[float], top_p: list[float],
                  seeds: Sequence[int], steps: Sequence[int]) -> torch.Tensor:
    """The token each row of x draws (exponential_race) once min_p (0: off) and top_p (1:
    off) ruled tokens out of rows `rows`. x: float32 (R, V), logits after temperature and
    top_k; edited in place. -> int64 (R,)."""
    if use_triton(x) and draw_kernel_verified(x.device):
        return draw_filtered_triton(x, rows, min_p, top_p, seeds, steps)
    apply_min_p_top_p(x, rows, min_p, top_p)
    return exponential_race(x, seeds, steps)
