"""The sampler's draw as one Triton kernel (kernels/sampling.py) against its torch
reference: the same token for every row (under TRITON_INTERPRET=1 on a CPU; on a GPU the
kernel runs there and the reference on the CPU)."""

from __future__ import annotations

import torch

from kernels.sampling import exponential_race_ref, exponential_race_triton, kernel_verified, row_keys, uniform_noise


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def race(x: torch.Tensor, seeds: list[int], steps: list[int]) -> list[int]:
    return exponential_race_triton(x.to(DEVICE), seeds, steps).tolist()


def _logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3


def test_the_kernel_draws_the_references_token_for_every_seed_and_step():
    vocab = 3000  # not a multiple of the kernel's tile
    x = _logits(1, vocab, 0).expand(48, -1).contiguous()
    seeds = list(range(40)) + [-1, 2**63 + 5, 2**64 - 1, 12345678901234, 7, 7, 7, 7]
    steps = list(range(40)) + [0, 3, 9, 2**33, 0, 1, 2, 3]
    got = race(x, seeds, steps)
    assert got == exponential_race_ref(x, seeds, steps).tolist()
    assert len(set(got)) > 10  # the seeds draw different tokens: noise, not argmax


def test_filtered_tokens_are_never_drawn_and_a_single_survivor_always_is():
    vocab = 2500
    x = _logits(6, vocab, 1)
    x[0, 100:] = float("-inf")                            # top-k-like: 100 left
    x[1] = float("-inf")
    x[1, 2049] = 0.0                                      # one token left, in the second tile
    x[2, ::2] = float("-inf")
    x[3] /= 0.05                                          # a low temperature: near greedy
    x[4] /= 20.0                                          # a high one: near uniform
    seeds, steps = [11, 12, 13, 14, 15, 16], [5, 6, 7, 8, 9, 10]
    got = race(x, seeds, steps)
    assert got == exponential_race_ref(x, seeds, steps).tolist()
    assert got[0] < 100 and got[1] == 2049 and got[2] % 2 == 1


def test_a_strided_batch_and_an_empty_one():
    x = _logits(4, 4200, 2)
    assert race(x.to(DEVICE)[::2], [1, 2], [3, 4]) == exponential_race_ref(x[::2], [1, 2], [3, 4]).tolist()
    assert race(x[:0], [], []) == []


def test_a_batch_of_llama3s_vocab():
    rows = 16 if DEVICE == "cuda" else 2  # the interpreter takes seconds per row
    x = _logits(rows, 128_256, 3)
    seeds, steps = list(range(100, 100 + rows)), list(range(rows))
    assert race(x, seeds, steps) == exponential_race_ref(x, seeds, steps).tolist()


def test_the_noise_is_the_function_running_nodes_compute():
    """Values pinned from the first release: a node on a new version must draw the same
    tokens for a seeded request as the nodes it shares the request with."""
    assert row_keys([0, 1, 2**63 + 7, -5], [0, 1, 2, 1000], "cpu").tolist() == [
        3210455839, 2307507581, 2103128665, 2418009425]
    assert uniform_noise([3, 2**64 - 1], [1, 77], 5, "cpu").view(torch.int64).tolist() == [
        [4600060590392606720, 4591231714872786944, 4600706530837266432, 4604989691080474624, 4592434029613023232],
        [4605575630844592128, 4596178853872795648, 4604705176493752320, 4596699520779157504, 4605081543859240960]]


def test_the_kernel_is_checked_against_the_reference_before_a_device_uses_it():
    assert kernel_verified(DEVICE)


def test_a_kernel_that_disagrees_is_not_used(monkeypatch, caplog):
    import kernels.sampling as sampling

    monkeypatch.setattr(sampling, "_verified", {})
    monkeypatch.setattr(sampling, "exponential_race_triton", lambda x, seeds, steps: torch.zeros(len(seeds)).long())
    assert not sampling.kernel_verified("cpu")
    assert "sampling with the torch reference" in caplog.text


def test_a_device_named_without_its_index_is_checked_once(monkeypatch, caplog):
    # An engine with device auto holds torch.device("cuda") and checks the kernel under it;
    # the logits it samples are on "cuda:0": that must not check (and sync) again mid-serving.
    import kernels.sampling as sampling

    monkeypatch.setattr(sampling, "_verified", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    sampling.kernel_verified("cuda")       # fails on a machine without CUDA: still checked once
    sampling.kernel_verified("cuda:0")
    assert list(sampling._verified) == [torch.device("cuda", 0)]
    assert caplog.text.count("sampling with the torch reference") <= 1


def test_equal_logits_at_a_low_temperatures_scale_are_drawn_evenly():
    """x = logit / temperature reaches 1e6 and more: the noise must not be rounded to the
    logits' ulp there (it was in float32, and ties went to the lower id)."""
    seeds = list(range(4000))
    x = torch.full((len(seeds), 2), 1e7)  # a logit of 10 at temperature 1e-6 (float32 sums: 1538)
    drawn = exponential_race_ref(x, seeds, [0] * len(seeds))
    assert 1850 < int(drawn.sum()) < 2150                              # ~2000 +- 5 sigma
    few = x[:300]
    assert race(few, seeds[:300], [0] * 300) == drawn[:300].tolist()
