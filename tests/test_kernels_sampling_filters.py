"""min_p and top_p as one Triton kernel (kernels/sampling_filters.py) against the torch
reference that sorts: the same tokens kept in every row (under TRITON_INTERPRET=1 on a CPU;
on a GPU the kernel runs there and the reference on the CPU)."""

from __future__ import annotations

import pytest
import torch

from kernels import sampling_filters
from kernels.sampling_filters import filter_kernel_verified, filter_ref, filter_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INF = float("-inf")


def kept(x: torch.Tensor, rows: list[int], min_p: list[float], top_p: list[float], kernel: bool) -> torch.Tensor:
    """Which tokens stay finite after the filters: bool (R, V) on the CPU."""
    x = x.clone().to(DEVICE if kernel else "cpu")
    (filter_triton if kernel else filter_ref)(x, rows, min_p, top_p)
    return torch.isfinite(x).cpu()


def _logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def _between_cumulative_masses(x: torch.Tensor, positions: list[int]) -> list[float]:
    """top_p halfway between the mass of the k+1 and k+2 most likely tokens (k+2 stay: the
    last one is the token whose mass ahead is still below top_p); a cut no rounding moves."""
    ordered = torch.softmax(x, dim=-1).double().sort(dim=-1, descending=True).values
    cum = ordered.cumsum(dim=-1)
    return [float((cum[r, k] + cum[r, k + 1]) / 2) for r, k in enumerate(positions)]


def test_top_p_keeps_the_references_tokens_at_cuts_from_one_token_to_nearly_all():
    x = _logits(6, 3000, 0)  # not a multiple of the kernel's tile
    positions = [0, 1, 7, 150, 600, 1500]
    top_p = _between_cumulative_masses(x, positions)
    rows = list(range(6))
    got = kept(x, rows, [0.0] * 6, top_p, kernel=True)
    assert torch.equal(got, kept(x, rows, [0.0] * 6, top_p, kernel=False))
    assert got.sum(dim=-1).tolist() == [k + 2 for k in positions]


def test_min_p_then_top_p_over_the_mass_min_p_left():
    x = _logits(4, 2500, 1)
    ordered = torch.softmax(x, dim=-1).double().sort(dim=-1, descending=True).values
    # min_p's floor halfway between the 400th and 401st probability: 400 tokens pass it.
    min_p = [float((ordered[r, 399] + ordered[r, 400]) / 2 / ordered[r, 0]) for r in range(4)]
    renormalised = ordered[:, :400] / ordered[:, :400].sum(dim=-1, keepdim=True)
    cum = renormalised.cumsum(dim=-1)
    top_p = [float((cum[0, 99] + cum[0, 100]) / 2), 1.0, float((cum[2, 9] + cum[2, 10]) / 2), 0.999999]
    rows = [0, 1, 2, 3]
    got = kept(x, rows, min_p, top_p, kernel=True)
    assert torch.equal(got, kept(x, rows, min_p, top_p, kernel=False))
    assert got.sum(dim=-1).tolist()[:3] == [101, 400, 11]  # top_p over min_p's 400, not the vocab


@pytest.mark.filterwarnings("ignore:.*encountered in divide:RuntimeWarning")  # the interpreter on the dead row
def test_only_the_named_rows_change_and_masked_tokens_stay_out():
    x = _logits(5, 2100, 2)
    x[1, ::3] = INF                                       # top_k / bans ran before
    x[3] = INF                                            # a row a grammar left nothing
    x[4, :] = INF
    x[4, 2050] = 1.0                                      # one token left, in the last tile
    rows = [1, 3, 4]
    top_p = [0.5, 0.5, 0.1]
    got = kept(x, rows, [0.0, 0.1, 0.0], top_p, kernel=True)
    assert torch.equal(got, kept(x, rows, [0.0, 0.1, 0.0], top_p, kernel=False))
    assert got[0].all() and got[2].all()                  # rows not named: untouched
    assert not got[1, ::3].any() and got[1].any()
    assert not got[3].any()                               # nothing to keep, nothing broken
    assert got[4].tolist().count(True) == 1 and got[4, 2050]


def test_ties_at_the_cut_all_stay_and_the_best_token_always_does():
    x = torch.zeros(3, 1000)
    x[0, :10] = 5.0                                       # ten tied favourites
    x[1] = torch.linspace(0, 1, 1000)
    x[2, 17] = 50.0                                       # one token holds ~all the mass
    rows = [0, 1, 2]
    top_p = [0.05, 1e-30, 0.5]                            # within the tie; rounds to ~0; below the favourite
    got = kept(x, rows, [0.0] * 3, top_p, kernel=True)
    assert torch.equal(got, kept(x, rows, [0.0] * 3, top_p, kernel=False))
    assert got[0].sum() == 10 and got[1].sum() == 1 and got[1, 999] and got[2].tolist().count(True) == 1
    zero = kept(x[1:2], [0], [0.0], [0.0], kernel=True)  # top_p 0 (SamplingParams clamps it; the kernel need not)
    assert zero.sum() == 1 and zero[0, 999]


def test_a_peaked_row_and_a_flat_one_at_llama3s_vocab():
    vocab = 128_256 if DEVICE == "cuda" else 20_000  # the interpreter takes ~15 s per row of 128k
    x = _logits(2, vocab, 3, scale=8.0)
    x[1] = _logits(1, vocab, 4, scale=0.05)
    top_p = _between_cumulative_masses(x[:1], [12]) + [0.8]
    got = kept(x, [0, 1], [0.0, 0.0], top_p, kernel=True)
    assert torch.equal(got[0], kept(x, [0, 1], [0.0, 0.0], top_p, kernel=False)[0])
    # A flat row's cut sits among ~100k tokens a few ulps of mass apart, where the
    # reference's float32 cumsum is itself off by more than that: check what top_p means
    # instead, in float64: less than top_p is held by the tokens above the least kept
    # one, at least top_p by them and it.
    probs = torch.softmax(x[1].double(), dim=-1)
    least = probs[got[1]].min()
    assert probs[probs > least].sum() < top_p[1] + 1e-5 and probs[probs >= least].sum() >= top_p[1] - 1e-5
    assert 0.7 * vocab < got[1].sum() < 0.9 * vocab


def test_the_kernel_is_checked_against_the_reference_before_a_device_uses_it():
    assert filter_kernel_verified(DEVICE)


def test_a_kernel_that_disagrees_is_not_used(monkeypatch, caplog):
    from kernels.triton_utils import force_triton
    monkeypatch.setattr(sampling_filters, "_verified", {})
    monkeypatch.setattr(sampling_filters, "filter_triton", lambda x, rows, min_p, top_p: None)
    assert not filter_kernel_verified(DEVICE)
    assert "not used" in caplog.text
    x = _logits(2, 500, 5).to(DEVICE)
    want = x.clone()
    filter_ref(want, [0, 1], [0.0, 0.0], [0.5, 0.5])
    with force_triton(DEVICE == "cpu"):  # on a GPU the kernel path is the default
        sampling_filters.apply_min_p_top_p(x, [0, 1], [0.0, 0.0], [0.5, 0.5])
    assert torch.equal(x.isinf(), want.isinf())          # the reference filtered instead


def test_rows_must_be_contiguous_for_the_kernel():
    x = _logits(4, 300, 6).t().contiguous().t()
    with pytest.raises(ValueError, match="contiguous"):
        filter_triton(x, [0], [0.0], [0.5])


def test_as_many_counting_passes_as_the_widest_row_needs():
    from kernels.sampling_filters import _passes
    assert _passes([0.95, 0.5], 128_256) == 7
    assert _passes([1.0, 1.0], 128_256) == 1                             # min_p only: nothing to search
    assert max(_passes([p], v) for p in (0.0, 1e-30, 0.5, 0.999999, 1 - 2**-24) for v in (2, 300, 128_256)) <= 8
    # from the largest top_p alone (the widest bracket): the same as asking every row
    ps = (0.0, 1e-30, 0.1, 0.5, 0.9, 0.95, 0.999999, 1 - 2**-24, 1.0)
    for v in (2, 300, 128_256):
        assert _passes(list(ps), v) == max(_passes([p], v) for p in ps)


# --- drawing with the filters: the first draw stands where top_p keeps it ----------------

def _draw_apart(x, rows, min_p, top_p, seeds, steps):
    """The kernels one after the other: filter, then draw."""
    from kernels.sampling import exponential_race_triton
    x = x.clone().to(DEVICE)
    filter_triton(x, rows, min_p, top_p)
    return exponential_race_triton(x, seeds, steps).cpu()


def _draw_at_once(x, rows, min_p, top_p, seeds, steps, monkeypatch=None):
    """draw_filtered_triton; with monkeypatch, also the rows it drew a second time."""
    from kernels import sampling_filters as sf
    again = []
    if monkeypatch is not None:
        race = sf.race_triton

        def recording(x, keys, only=None, otherwise=None):
            if only is not None:
                again.append(only.bool().cpu())
            return race(x, keys, only=only, otherwise=otherwise)
        monkeypatch.setattr(sf, "race_triton", recording)
    tokens = sf.draw_filtered_triton(x.clone().to(DEVICE), rows, min_p, top_p, seeds, steps).cpu()
    return (tokens, again[0] if again else torch.zeros(x.shape[0], dtype=torch.bool)) if monkeypatch else tokens


def test_drawing_with_the_filters_at_once_draws_what_filtering_then_drawing_does(monkeypatch):
    """Exactly the same tokens, cut anywhere (not only far from ties): whether a first
    draw stands is decided by the very threshold arithmetic the cut is found with. Rows
    not named, min_p alone, top_p 1 and a dead row share the batch; most first draws
    stand in wide cuts, most are drawn again in narrow ones."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, 2000, generator=g) * 3
    x[1] = torch.randn(2000, generator=g) * 0.3              # flat: ties at the cut within rounding
    x[3] = INF                                                # nothing left to draw
    x = x.repeat_interleave(4, dim=0)                         # 16 rows, four seeds each
    rows = [r for r in range(16) if r % 4 != 3]               # one row in four not filtered
    top_p = [[0.9, 0.37, 0.999, 0.5][r // 4] if r % 4 != 2 else 1.0 for r in rows]
    min_p = [0.05 if r % 4 in (1, 2) else 0.0 for r in rows]
    seeds, steps = [7 * r + 2 for r in range(16)], [r % 3 for r in range(16)]
    tokens, again = _draw_at_once(x, rows, min_p, top_p, seeds, steps, monkeypatch)
    assert torch.equal(tokens, _draw_apart(x, rows, min_p, top_p, seeds, steps))
    assert 0 < int(again.sum()) < len(rows)                  # both ways were taken
    assert not again[[r for r in range(16) if r % 4 == 3]].any()  # rows not named: drawn once
    assert not again[[r for r in range(16) if r % 4 == 2]].any()  # top_p off: min_p's set is the draw's


def test_drawing_with_the_filters_at_once_draws_the_references_tokens():
    from kernels.sampling import exponential_race_ref
    x, min_p, top_p = sampling_filters._check_rows()
    rows = list(range(x.shape[0]))
    for seed in range(2):
        seeds, steps = [seed * 10 + r for r in rows], [seed] * len(rows)
        want = x.clone()
        filter_ref(want, rows, min_p, top_p)
        assert torch.equal(_draw_at_once(x, rows, min_p, top_p, seeds, steps),
                           exponential_race_ref(want, seeds, steps))


def test_the_draw_is_checked_against_the_reference_before_a_device_uses_it():
    from kernels.sampling_filters import draw_kernel_verified
    assert draw_kernel_verified(DEVICE)


def test_a_first_draw_below_top_ps_floor_is_drawn_again_even_when_sums_round_past_the_margin():
    """The first bracket starts at a floor no token below can pass; as top_p nears 1, the
    floor's margin is within the rounding of the two sums compared, so a token below it
    is drawn again outright rather than by the test (a review's case: the threshold sums
    lose the small tokens beside 1.0)."""
    from kernels.sampling import exponential_race_ref
    q = torch.empty(512, dtype=torch.float64)
    q[0], q[1:256], q[256:] = 1.0, 4.7e-8, 1.1e-8          # the last 256 below the floor, 1.17e-8
    x = q.log().float()[None]
    top_p, seed = [1 - 1.2e-5], 41756
    assert int(exponential_race_ref(x, [seed], [0])) >= 256  # the first draw is one of them
    tokens = _draw_at_once(x, [0], [0.0], top_p, [seed], [0])
    assert torch.equal(tokens, _draw_apart(x, [0], [0.0], top_p, [seed], [0]))
    assert int(tokens) < 256
