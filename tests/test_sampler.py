"""The sampler: vLLM v1's processing order, and randomness that is a pure function of
(seed, step, token) so seeded requests reproduce across batches, devices and nodes."""

from __future__ import annotations

import math
import subprocess
import sys

import msgspec
import pytest
import torch

from engine.sampler import Sampler, SamplingRow, apply_bans, apply_penalties
from kernels.sampling import exponential_noise, hash_to_uniform, mix32, uniform_noise
from engine.sampling_params import SamplingParams

NEG_INF = float("-inf")


def row(params: SamplingParams | None = None, seed: int = 0, prompt=(1, 2, 3), output=()) -> SamplingRow:
    return SamplingRow(params or SamplingParams(), seed, list(prompt), list(output))


def step_logits(step: int, vocab: int = 64) -> torch.Tensor:
    """A fixed, distinct (V,) logits vector per step, standing in for the model."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(vocab, generator=g) * 2


def many_seeds(params: SamplingParams, logits: torch.Tensor, n: int) -> torch.Tensor:
    """Sample the same (V,) logits once per seed 0..n-1, in one batch; returns (n,) ids."""
    out = Sampler()(logits.expand(n, -1).contiguous(), [row(params, seed=s) for s in range(n)])
    return torch.tensor(out.token_ids)


# --- greedy -----------------------------------------------------------------------------

def test_greedy_picks_argmax_and_breaks_ties_at_the_lowest_id():
    logits = torch.tensor([[0.1, 3.0, -1.0, 3.0],
                           [5.0, 5.0, 5.0, 5.0]])
    out = Sampler()(logits, [row(SamplingParams(temperature=0.0)), row(SamplingParams(temperature=0.0))])
    assert out.token_ids == [1, 0] and out.logprobs == [None, None]


def test_sampler_leaves_the_callers_logits_untouched():
    logits = torch.randn(3, 16)
    before = logits.clone()
    rows = [row(SamplingParams(repetition_penalty=1.5), output=[4]),
            row(SamplingParams(top_k=3, top_p=0.5, min_p=0.1)),
            row(SamplingParams(min_tokens=2), output=[])]
    rows[2].params.eos_token_ids = frozenset({0})
    Sampler()(logits, rows)
    assert torch.equal(logits, before)


# --- reproducible randomness --------------------------------------------------------------

def test_hash_is_lowbias32_computed_without_int64_overflow():
    def reference(v: int) -> int:  # Python ints never overflow
        v ^= v >> 16
        v = (v * 0x7FEB352D) & 0xFFFFFFFF
        v ^= v >> 15
        v = (v * 0x846CA68B) & 0xFFFFFFFF
        return v ^ (v >> 16)
    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF]
    assert mix32(torch.tensor(values)).tolist() == [reference(v) for v in values]


def test_uniforms_are_strictly_inside_zero_one():
    u = hash_to_uniform(torch.tensor([0, 1, 0xFFFFFFFF]))
    assert u.dtype == torch.float64
    assert u.tolist() == [2.0 ** -33, 3 * 2.0 ** -33, 1 - 2.0 ** -33]
    e = exponential_noise([7, 2**64 - 1, -3], [0, 5, 2**40], 1000, "cpu")
    assert e.dtype == torch.float32 and bool((e > 0).all()) and bool(torch.isfinite(e).all())


def test_seeded_noise_depends_only_on_seed_step_and_token():
    alone = uniform_noise([42], [7], 100, "cpu")                                    # (1, 100)
    among = uniform_noise([1, 42, 3], [0, 7, 9], 100, "cpu")                        # (3, 100)
    assert torch.equal(among[1], alone[0])
    wider = uniform_noise([42], [7], 300, "cpu")
    assert torch.equal(wider[0, :100], alone[0])  # a token's noise ignores the vocabulary size
    assert not torch.equal(uniform_noise([43], [7], 100, "cpu"), alone)
    assert not torch.equal(uniform_noise([42], [8], 100, "cpu"), alone)
    # seeds are taken modulo 2**64, so the engine's 63-bit draws and negative user seeds both work
    assert torch.equal(uniform_noise([-1], [7], 100, "cpu"), uniform_noise([2**64 - 1], [7], 100, "cpu"))


def test_noise_ignores_torch_global_random_state():
    torch.manual_seed(0)
    a = uniform_noise([5], [1], 50, "cpu")
    torch.manual_seed(1)
    torch.rand(10)
    assert torch.equal(uniform_noise([5], [1], 50, "cpu"), a)


def generate(sampler: Sampler, params: SamplingParams, seed: int, steps: range, output: list[int],
             others: int = 0) -> list[int]:
    """Run `steps` sampling steps for one request, optionally surrounded by `others`
    unrelated rows with their own params; returns the request's output tokens."""
    neighbours = [SamplingParams(temperature=0.0), SamplingParams(top_k=2, seed=9, logprobs=3),
                  SamplingParams(temperature=1.5, repetition_penalty=1.3, frequency_penalty=1.0),
                  SamplingParams(top_p=0.3, min_p=0.2)]
    output = list(output)
    for step in steps:
        assert len(output) == step
        rows = [row(neighbours[i % len(neighbours)], seed=100 + i, output=[step % 7]) for i in range(others)]
        logits = [torch.randn(64) * 3 for _ in range(others)]
        position = step % (others + 1)  # the request moves around the batch
        rows.insert(position, row(params, seed=seed, output=output))
        logits.insert(position, step_logits(step))
        output.append(sampler(torch.stack(logits), rows).token_ids[position])
    return output


SEEDED = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, repetition_penalty=1.1, presence_penalty=0.3,
                        seed=1234)


def test_seeded_sampling_is_independent_of_batch_composition():
    alone = generate(Sampler(), SEEDED, 1234, range(40), [])
    crowded = generate(Sampler(), SEEDED, 1234, range(40), [], others=5)
    assert crowded == alone
    assert len(set(alone)) > 5  # it really sampled, not a degenerate greedy walk


def test_generation_split_between_two_nodes_matches_one_node():
    one_node = generate(Sampler(), SEEDED, 1234, range(20), [])
    first = generate(Sampler(), SEEDED, 1234, range(1), [])                      # the prefill node
    wire = msgspec.msgpack.encode(SEEDED.to_dict())
    params = SamplingParams.from_dict(msgspec.msgpack.decode(wire))               # the decode node
    rest = generate(Sampler(), params, params.seed, range(1, 20), first, others=3)
    assert rest == one_node


def test_noise_is_the_same_in_another_process():
    code = ("import torch; torch.manual_seed(99); from kernels.sampling import uniform_noise; "
            "print(uniform_noise([2**63 + 11, 0], [3, 0], 4096, 'cpu').view(torch.int64).sum().item())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    here = uniform_noise([2**63 + 11, 0], [3, 0], 4096, "cpu").view(torch.int64).sum().item()
    assert int(other.stdout) == here


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_noise_is_bit_identical_on_cpu_and_cuda():
    seeds, steps = [0, 1, 2**63 + 7, -5, 123456789], [0, 1, 2, 1000, 2**33]
    cpu = uniform_noise(seeds, steps, 128_256, "cpu")
    cuda = uniform_noise(seeds, steps, 128_256, "cuda").cpu()
    assert torch.equal(cpu.view(torch.int64), cuda.view(torch.int64))
    logits = torch.randn(len(seeds), 128_256) * 4
    rows = [row(SamplingParams(temperature=0.8, top_k=100, top_p=0.9), seed=s, output=[0] * t)
            for s, t in zip(seeds, [0, 1, 2, 3, 4])]
    assert Sampler()(logits, rows).token_ids == Sampler()(logits.cuda(), rows).token_ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampling_queues_its_work_without_waiting_for_the_device():
    """The engine samples step n+1 while its forward still runs and does step n's text work
    meanwhile: a host list copied with torch.tensor(..., device="cuda") would make the host
    wait for every queued kernel first (one sync per sampled step; a grammar row's mask too)."""
    from engine.structured_output.manager import apply_token_bitmask

    params = [SamplingParams(temperature=0.0, logprobs=2),
              SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01),
              SamplingParams(temperature=1.0, repetition_penalty=1.2, frequency_penalty=0.1, presence_penalty=0.1,
                             seed=7),
              SamplingParams(temperature=0.7, min_tokens=4, stop_token_ids=[9])]
    rows = [row(p, seed=i, output=[5, 6]) for i, p in enumerate(params)]
    logits = torch.randn(len(rows), 4096, device="cuda")
    sampler = Sampler(len(rows), "cuda")
    mask = torch.full((2, 128), -1, dtype=torch.int32, device="cuda")

    def step():
        pending = sampler.sample(logits, rows)
        apply_token_bitmask(logits, mask, [1, 3])
        return pending

    # Warm, as a serving loop is: a kernel's first launch loads its module and a new pinned
    # staging block is allocated, and either may synchronize; a steady step does neither.
    for _ in range(3):
        torch.cuda._sleep(20_000_000)
        step().resolve()
    torch.cuda._sleep(2_000_000_000)  # a kernel that spins for about a second
    busy = torch.cuda.Event()
    busy.record()
    torch.cuda.set_sync_debug_mode("error")  # a synchronizing call raises where it is made
    try:
        pending = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not busy.query(), "sampling waited for the kernels queued before it"
    assert len(pending.resolve().token_ids) == len(rows)


# --- the distribution -------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_distribution_matches_probs(temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5])
    n = 6000
    counts = torch.bincount(many_seeds(SamplingParams(temperature=temperature), logits, n), minlength=8).double()
    expected = torch.softmax(logits.double() / temperature, dim=0) * n
    chi2 = float(((counts - expected) ** 2 / expected.clamp(min=1)).sum())
    assert chi2 < 40, f"chi-square {chi2:.1f} over 7 degrees of freedom (p=0.001 bound is 24.3)"


def test_successive_steps_are_independent_draws():
    # Joint counts of (token at step 0, token at step 1) over many seeds ~ p x p.
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    n = 6000
    sampler = Sampler()
    first = sampler(logits.expand(n, -1).contiguous(), [row(seed=s) for s in range(n)]).token_ids
    second = sampler(logits.expand(n, -1).contiguous(), [row(seed=s, output=[0]) for s in range(n)]).token_ids
    joint = torch.zeros(4, 4, dtype=torch.float64)
    for a, b in zip(first, second):
        joint[a, b] += 1
    expected = torch.outer(logits.exp(), logits.exp()).double() * n
    chi2 = float(((joint - expected) ** 2 / expected).sum())
    assert chi2 < 45, f"chi-square {chi2:.1f} over 15 degrees of freedom (p=0.001 bound is 37.7)"


PROBS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))


@pytest.mark.parametrize("params, allowed", [
    (SamplingParams(top_k=2), {0, 1}),
    (SamplingParams(top_k=4), {0, 1, 2, 3}),             # k >= V: no top-k
    (SamplingParams(top_p=0.75), {0, 1}),                # 0.5 ahead of token 1 < 0.75; 0.8 ahead of token 2 is not
    (SamplingParams(top_p=0.85), {0, 1, 2}),
    (SamplingParams(min_p=0.2), {0, 1, 2}),              # floor 0.2 * 0.5 = 0.1
    (SamplingParams(min_p=0.7), {0}),                    # floor 0.35
    (SamplingParams(top_k=3, top_p=0.8), {0, 1}),        # top_p sees top_k's renormalised mass: 0.84 ahead of 2
])
def test_filters_keep_exactly_the_allowed_tokens(params, allowed):
    assert set(many_seeds(params, PROBS, 2000).tolist()) == allowed


def test_top_p_keeps_every_token_tied_at_the_cut():
    logits = torch.zeros(6)  # six equal tokens: the cut at 0.4 lands inside the tie
    assert set(many_seeds(SamplingParams(top_p=0.4), logits, 500).tolist()) == set(range(6))


def test_top_p_always_keeps_the_most_likely_token_even_when_it_rounds_to_zero():
    # 1e-45 is the smallest float32 subnormal; below it top_p is 0.0 in float32. SamplingParams
    # clamps such values, but the mask must not depend on that: it keeps the top token regardless.
    params = SamplingParams(top_p=0.5)
    params.top_p = 1e-300                                   # as if the clamp were bypassed
    assert set(many_seeds(params, PROBS, 200).tolist()) == {0}
    assert set(many_seeds(SamplingParams(top_p=1e-300), PROBS, 200).tolist()) == {0}


def test_rows_with_different_filters_share_a_batch():
    logits = PROBS.expand(4, -1).contiguous()
    params = [SamplingParams(top_k=1), SamplingParams(temperature=0.0), SamplingParams(min_p=0.7),
              SamplingParams(top_p=0.4)]
    for seed in range(50):
        assert Sampler()(logits, [row(p, seed=seed) for p in params]).token_ids == [0, 0, 0, 0]


def test_the_kernels_draw_what_the_reference_draws_for_every_filter():
    """On a GPU min_p/top_p and the draw are Triton kernels (here under the interpreter)."""
    from kernels.triton_utils import force_triton
    logits = torch.randn(12, 300, generator=torch.Generator().manual_seed(7)) * 3
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m)
              for t, k, p, m in [(0.8, 0, 0.9, 0.0), (1.0, 20, 0.5, 0.0), (0.7, 0, 1.0, 0.1), (1.3, 50, 0.95, 0.05),
                                 (1.0, 0, 0.3, 0.0), (0.0, 0, 1.0, 0.0)]] * 2
    rows = [row(p, seed=i) for i, p in enumerate(params)]
    want = Sampler()(logits, rows).token_ids
    if torch.cuda.is_available():
        assert Sampler()(logits.cuda(), rows).token_ids == want
    else:
        with force_triton():
            assert Sampler()(logits, rows).token_ids == want


# --- bans and penalties -----------------------------------------------------------------

def banned(logits: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(r == NEG_INF).flatten().tolist() for r in logits]


def with_bad_words(token_ids: list[list[int]]) -> SamplingParams:
    p = SamplingParams()
    p.bad_words_token_ids = token_ids  # what update_from_tokenizer derives from bad_words
    return p


def test_bad_words_ban_the_completing_token_only_after_its_prefix():
    params = with_bad_words([[5], [7, 8], [1, 2, 3]])
    rows = [row(params, output=[]),                  # only the single-token word applies
            row(params, output=[4, 7]),              # 7 just generated: 8 would complete "7 8"
            row(params, output=[7, 4]),              # 7 not at the end: 8 is fine
            row(params, prompt=[9, 7], output=[]),   # the prompt does not count (as in vLLM)
            row(params, output=[0, 1, 2])]           # "1 2" ends the output: ban 3
    out = apply_bans(torch.zeros(5, 10), rows)
    assert banned(out) == [[5], [5, 8], [5], [5], [3, 5]]


def test_a_bad_word_ending_outside_the_vocabulary_bans_nothing_in_any_row():
    # A tokenizer with ids past the model's vocabulary (added tokens) can end a bad word on
    # an id the model cannot produce: nothing to ban, and never a token of the next row.
    params = with_bad_words([[12]])
    out = apply_bans(torch.zeros(3, 10), [row(), row(params), row()])
    assert banned(out) == [[], [], []]


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    params = SamplingParams(min_tokens=2, stop_token_ids=[4, 99])  # 99: outside this model, ignored
    params.eos_token_ids = frozenset({1})
    rows = [row(params, output=[]), row(params, output=[6]), row(params, output=[6, 6])]
    assert banned(apply_bans(torch.zeros(3, 8), rows)) == [[1, 4], [1, 4], []]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5],
                           [2.0, -2.0, 1.0, -1.0, 0.5]])
    rows = [row(SamplingParams(repetition_penalty=2.0), prompt=[0, 1], output=[2, 2]),
            row(SamplingParams(), prompt=[0, 1], output=[2, 2])]           # no penalty: untouched
    out = apply_penalties(logits, rows)
    assert out.tolist() == [[1.0, -4.0, 0.5, -1.0, 0.5], [2.0, -2.0, 1.0, -1.0, 0.5]]


def test_presence_and_frequency_penalties_count_output_tokens_only():
    logits = torch.tensor([[1.0, 1.0, 1.0, -1.0, 0.0]])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, [row(params, prompt=[0, 0, 1], output=[2, 2, 3])])
    # token 2: 1 - 0.5 - 2 * 0.25; token 3: -1 - 0.5 - 0.25; prompt tokens 0 and 1 untouched
    assert out.tolist() == [[1.0, 1.0, 0.0, -1.75, 0.0]]


def test_all_penalties_compose_in_vllm_order():
    logits = torch.tensor([[3.0, -1.0, 2.0]])
    params = SamplingParams(repetition_penalty=1.5, presence_penalty=-1.0, frequency_penalty=0.5)
    out = apply_penalties(logits, [row(params, prompt=[1], output=[0, 0])])
    # token 0: 3 / 1.5 - 2 * 0.5 + 1 = 2; token 1 (prompt): -1 * 1.5; token 2 unseen
    assert out.tolist() == [[2.0, -1.5, 2.0]]


def test_penalties_count_the_token_still_on_the_device_as_one_of_the_output():
    """A step queued before the previous one's tokens were read passes them as in_flight:
    the same logits as when the token is already in output_token_ids, penalised rows
    anywhere in the batch."""
    logits = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(repetition_penalty=1.5, frequency_penalty=0.5), SamplingParams(),
              SamplingParams(presence_penalty=1.0), SamplingParams(frequency_penalty=2.0, presence_penalty=-0.5)]
    outputs = [[3, 3, 7], [1], [9, 2], [4]]
    full = apply_penalties(logits, [row(p, prompt=[5], output=o) for p, o in zip(params, outputs)])
    lagging = apply_penalties(logits, [row(p, prompt=[5], output=o[:-1]) for p, o in zip(params, outputs)],
                              in_flight=torch.tensor([o[-1] for o in outputs]))
    assert torch.equal(lagging, full)
    assert not torch.equal(full[3], logits[3])


def _penalised_by_definition(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """vLLM's penalties token by token, over the whole vocabulary of every row."""
    out = logits.clone()
    for i, r in enumerate(rows):
        p = r.params
        for t in range(logits.shape[1]):
            x = out[i, t]
            n = list(r.output_token_ids).count(t)
            if p.repetition_penalty != 1.0 and (n or t in r.prompt_token_ids):
                x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
            out[i, t] = x - torch.tensor(p.frequency_penalty) * n - torch.tensor(p.presence_penalty) * (n > 0)
    return out


def test_penalties_equal_their_definition_in_mixed_batches():
    """Only the seen tokens' logits are touched (a gather and a scatter): the result is the
    definition's, bit for bit, with repeated tokens, tokens in prompt and output, rows
    without penalties between penalised ones, and the in-flight token."""
    gen = torch.Generator().manual_seed(7)
    vocab = 23
    for trial in range(30):
        b = int(torch.randint(1, 6, (1,), generator=gen))
        logits = torch.randn(b, vocab, generator=gen) * 3
        logits[0, 5] = NEG_INF  # a banned token stays banned
        rows = []
        for _ in range(b):
            kind = int(torch.randint(0, 4, (1,), generator=gen))
            params = [SamplingParams(), SamplingParams(repetition_penalty=1.3),
                      SamplingParams(frequency_penalty=0.7, presence_penalty=-0.4),
                      SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.2, presence_penalty=1.1)][kind]
            prompt = torch.randint(0, vocab, (int(torch.randint(0, 8, (1,), generator=gen)),), generator=gen)
            output = torch.randint(0, vocab, (int(torch.randint(1, 10, (1,), generator=gen)),), generator=gen)
            rows.append(row(params, prompt=prompt.tolist(), output=output.tolist()))
        want = _penalised_by_definition(logits, rows)
        assert torch.equal(apply_penalties(logits, rows), want), trial
        lagging = [row(r.params, prompt=r.prompt_token_ids, output=r.output_token_ids[:-1]) for r in rows]
        in_flight = torch.tensor([r.output_token_ids[-1] for r in rows])
        assert torch.equal(apply_penalties(logits, lagging, in_flight=in_flight), want), trial


def test_bans_apply_before_greedy_argmax():
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    params = SamplingParams(temperature=0.0, min_tokens=1)
    params.eos_token_ids = frozenset({0})
    assert Sampler()(logits, [row(params, output=[])]).token_ids == [1]      # eos banned for now
    assert Sampler()(logits, [row(params, output=[2])]).token_ids == [0]     # min_tokens reached


# --- logprobs ---------------------------------------------------------------------------

def test_logprobs_are_raw_log_softmax_with_rank_and_top_n():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0],
                           [1.0, 3.0, 2.0, 0.0, -1.0],
                           [1.0, 3.0, 2.0, 0.0, -1.0]])
    raw = torch.log_softmax(logits[0], dim=0)
    penalised_best = SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=2.0, presence_penalty=2.0)
    rows = [row(penalised_best, prompt=[4], output=[1]),          # penalties push token 1 below token 2
            row(SamplingParams(temperature=0.0, logprobs=0)),
            row(SamplingParams(temperature=0.0))]
    out = Sampler()(logits, rows)
    assert out.token_ids == [2, 1, 1]
    first, second, third = out.logprobs
    assert (first.token_id, first.rank) == (2, 2)                  # rank among the RAW logprobs
    assert first.logprob == pytest.approx(raw[2].item())           # no penalty, no temperature
    assert first.top == pytest.approx({1: raw[1].item(), 2: raw[2].item()})
    assert list(first.top) == [1, 2]                               # most likely first
    assert (second.token_id, second.rank, second.top) == (1, 1, {})
    assert second.logprob == pytest.approx(raw[1].item())
    assert third is None


def test_logprobs_ignore_temperature():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    out = Sampler()(logits, [row(SamplingParams(temperature=0.3, logprobs=3, seed=1), seed=1)])
    lp = out.logprobs[0]
    raw = torch.log_softmax(logits[0], dim=0)
    assert lp.top == pytest.approx({2: raw[2].item(), 1: raw[1].item(), 0: raw[0].item()})
    assert lp.rank == 3 - lp.token_id and math.isclose(lp.logprob, raw[lp.token_id].item(), rel_tol=1e-6)


def test_logits_must_have_one_row_per_sampling_row():
    with pytest.raises(ValueError, match=r"logits of shape \(2, 8\) for 3 sampling rows"):
        Sampler()(torch.zeros(2, 8), [row(), row(), row()])


def test_the_warm_up_at_start_takes_every_kernel_path(monkeypatch):
    """On a GPU the sampler samples once at start with every rule, so the kernels compile
    for the model's vocabulary then, not in the first serving step that needs them."""
    from kernels import sampling_filters
    from kernels.triton_utils import force_triton
    called = []
    draw = sampling_filters.draw_filtered_triton
    monkeypatch.setattr(sampling_filters, "draw_filtered_triton",
                        lambda *args: called.append(args[1]) or draw(*args))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with force_triton(device.type == "cpu"):  # on a GPU the kernel path is the default
        Sampler().warm_up(300, device)
    assert called[-1] == [0]  # the sampled row (min_p and top_p) drew through the kernels
