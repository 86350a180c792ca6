"""Pick the next token of every row that samples this step.

The pipeline follows vLLM v1's order:

1. logprobs, when a row asks for them, are taken from the logits as they come (log_softmax
   before any ban, penalty or temperature; vLLM's default `raw_logprobs` mode), so they
   describe what the model thinks, not what the sampler was allowed to pick; a structured
   output's grammar mask is already in them (the engine applies it to the logits first,
   as vLLM does), so tokens it forbids read -inf;
2. bad words, then min_tokens (eos and stop ids banned until enough tokens exist);
3. penalties: repetition (HF-style, over prompt + output), frequency and presence
   (over output tokens only);
4. greedy rows take the argmax; the others: temperature, top_k, min_p, top_p, then one
   draw. vLLM v1 applies min_p before top_k; both keep the tokens above a threshold on the
   logits (min_p's depends only on ratios to the best token), so either order keeps the
   same tokens, and top_p, last in both, sees the mass the two left
   (kernels/sampling_filters.py: min_p and top_p in one kernel on a GPU, no sort).

Reproducible randomness. A seeded request must get the same tokens whatever else shares
its batch, on any device, and when its generation is split between a prefill node (first
token) and a decode node (the rest). So there is no generator state at all: the draw for
a row is the exponential race `argmax(probs / E)`, E = -log(U), where U for (seed, step,
token) comes from a counter-based integer hash, step = len(output_token_ids)
(kernels/sampling.py: the torch formulation, bit-identical on CPU and CUDA, and the
Triton kernel that computes the same function in one launch on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from engine.sampling_params import SamplingParams
from kernels.host_copy import host_to_device, to_device
from kernels.sampling import exponential_race, kernel_verified
from kernels.sampling_filters import draw_filtered, draw_kernel_verified, filter_kernel_verified

# --- the sampler ------------------------------------------------------------------------

@dataclass(slots=True)
class SamplingRow:
    """What the sampler needs about one request this step."""

    params: SamplingParams
    seed: int                            # always set: the engine draws one for unseeded requests
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]      # tokens generated before this step; its length is the step
    # The step when output_token_ids lags behind (a decode step queued before the previous
    # step's token was read back): then only rows without bad words or min_tokens still to
    # reach; a penalty counts the missing token from Sampler.sample's in_flight.
    step: int | None = None

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids) if self.step is None else self.step


@dataclass(slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float                       # raw: log_softmax of the model's logits
    rank: int                            # 1 = most likely; ties count against the token (as vLLM)
    top: dict[int, float]                # the params.logprobs most likely tokens -> logprob


NO_TOKEN = -1  # a row whose constraints left no token allowed (sampler output only, never an input id)


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]              # NO_TOKEN for a row with no allowed token
    logprobs: list[TokenLogprobs | None]  # None for rows that did not ask (params.logprobs None)


class Sampler:
    """Stateless: the same logits and rows give the same tokens, in any batch. A class
    rather than a function so that a GPU path can keep its buffers here.

    `sample()` only queues device work and returns a `PendingSample`; `resolve()` on it
    is the step's one device->host sync. The engine launches step n+1's model before it
    resolves step n's tokens' text work, so nothing here may read device values on the host."""

    def __init__(self, max_rows: int = 0, device: torch.device | str = "cpu", vocab_size: int | None = None):
        """`vocab_size`, on a GPU: sample once now with every rule, so that the kernels
        compile for this vocabulary at start (a second or more each on a cold Triton
        cache) instead of in the first serving step that needs them."""
        device = torch.device(device)
        # Pinned landing buffers for the sampled ids, so the copy runs behind the GPU's work;
        # two, used in turn, since a step's tokens are read after the next step is queued.
        self._host_tokens = ([torch.empty(max_rows, dtype=torch.int64, pin_memory=True) for _ in range(2)]
                             if device.type == "cuda" and max_rows > 0 else None)
        self._turn = 0
        if device.type == "cuda":
            kernel_verified(device)  # the kernels built and checked now, not in a serving step
            filter_kernel_verified(device)
            draw_kernel_verified(device)
            if vocab_size:
                self.warm_up(vocab_size, device)

    def warm_up(self, vocab_size: int, device: torch.device) -> None:
        """One call over (2, vocab_size) logits whose rows use every rule."""
        params = [SamplingParams(temperature=0.0, repetition_penalty=1.1, logprobs=2),
                  SamplingParams(temperature=0.8, top_k=20, min_p=0.01, top_p=0.5, frequency_penalty=0.1)]
        logits = torch.randn(len(params), vocab_size, generator=torch.Generator().manual_seed(0)).to(device)
        rows = [SamplingRow(p, 0, [0, min(1, vocab_size - 1)], [min(2, vocab_size - 1)]) for p in params]
        self.sample(logits, rows, in_flight=torch.zeros(len(rows), dtype=torch.int64, device=device)).resolve()

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        """`logits`: float32 (B, V), one row per entry of `rows`. Not modified."""
        return self.sample(logits, rows).resolve()

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
               in_flight: torch.Tensor | None = None) -> PendingSample:
        """`in_flight`: (B,) token ids on the device that each row's output_token_ids does
        not hold yet (a step queued before the previous one's tokens were read): the
        penalties count them too."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits of shape {tuple(logits.shape)} for {len(rows)} sampling rows: "
                             "the model runner must return (rows, vocab) logits, one row per sampling request")
        logits = logits.float()
        device = logits.device
        want_logprobs = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        raw_logprobs = None
        if want_logprobs:
            raw_logprobs = torch.log_softmax(logits[_index(want_logprobs, device)], dim=-1)  # (L, V)

        logits = apply_bans(logits, rows)
        logits = apply_penalties(logits, rows, in_flight)

        tokens = torch.empty(len(rows), dtype=torch.int64, device=device)                # (B,)
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        random = [i for i, r in enumerate(rows) if not r.params.greedy]
        if len(greedy) == len(rows):
            tokens = logits.argmax(dim=-1)
        elif greedy:
            g = _index(greedy, device)
            tokens[g] = logits[g].argmax(dim=-1)
        if len(random) == len(rows):
            tokens = _sample(logits, list(rows))
        elif random:
            r = _index(random, device)
            tokens[r] = _sample(logits[r], [rows[i] for i in random])

        reported = tokens
        constrained = [i for i, r in enumerate(rows) if r.params.structured_outputs is not None]
        if constrained:  # a grammar (with a ban) may allow no token at all: say so, pick nothing
            c = _index(constrained, device)
            dead = ~torch.isfinite(logits[c]).any(dim=-1)
            reported = tokens.clone()
            reported[c] = torch.where(dead, torch.full_like(tokens[c], NO_TOKEN), tokens[c])
        pending = PendingSample(tokens, len(rows), reported)
        if raw_logprobs is not None:
            picked = tokens[_index(want_logprobs, device)]
            pending.logprobs = _LogprobTensors.compute(raw_logprobs, picked,
                                                       [rows[i].params.logprobs for i in want_logprobs])
            pending.logprob_rows = want_logprobs
        if self._host_tokens is not None and len(rows) <= self._host_tokens[0].numel():
            self._turn ^= 1
            host = self._host_tokens[self._turn][:len(rows)]
            host.copy_(reported, non_blocking=True)
            pending.host_tokens = host
            pending.ready = torch.cuda.Event()
            pending.ready.record()
        return pending


@dataclass(slots=True)
class _LogprobTensors:
    """Logprob fields on the device, read back only when the step resolves."""

    picked: torch.Tensor                 # (L,) sampled ids
    picked_lp: torch.Tensor              # (L, 1)
    ranks: torch.Tensor                  # (L,)
    top_vals: torch.Tensor | None        # (L, n_max)
    top_ids: torch.Tensor | None
    top_n: list[int]

    @classmethod
    def compute(cls, raw: torch.Tensor, picked: torch.Tensor, top_n: list[int]) -> _LogprobTensors:
        """raw: log_softmax (L, V); picked: (L,) sampled ids."""
        picked_lp = raw.gather(1, picked[:, None])                                    # (L, 1)
        ranks = (raw >= picked_lp).sum(dim=-1)                                        # (L,)
        n_max = min(max(top_n), raw.shape[1])
        vals = ids = None
        if n_max > 0:
            vals, ids = raw.topk(n_max, dim=-1)                                       # (L, n_max)
        return cls(picked, picked_lp, ranks, vals, ids, top_n)

    def to_host(self) -> list[TokenLogprobs]:
        top_vals: list[list[float]] = [[] for _ in self.top_n]
        top_ids: list[list[int]] = [[] for _ in self.top_n]
        if self.top_vals is not None:
            top_vals, top_ids = self.top_vals.tolist(), self.top_ids.tolist()
        return [TokenLogprobs(tok, lp, rank, dict(zip(ids[:n], vals[:n])))
                for tok, lp, rank, ids, vals, n in zip(self.picked.tolist(), self.picked_lp[:, 0].tolist(),
                                                       self.ranks.tolist(), top_ids, top_vals, self.top_n)]


@dataclass(slots=True)
class PendingSample:
    """A step's sampled tokens, still on the device (or landing in pinned memory)."""

    tokens: torch.Tensor                 # (B,) on the logits' device: the next step's input ids
    num_rows: int
    reported: torch.Tensor                # what the host reads: `tokens`, NO_TOKEN where nothing was allowed
    host_tokens: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None
    logprobs: _LogprobTensors | None = None
    logprob_rows: list[int] = field(default_factory=list)

    def resolve(self) -> SamplerOutput:
        """Wait for the step's device work and read the results: the one sync per step."""
        if self.ready is not None:
            self.ready.synchronize()
            token_ids = self.host_tokens.tolist()
        else:
            token_ids = self.reported.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * self.num_rows
        if self.logprobs is not None:
            for i, lp in zip(self.logprob_rows, self.logprobs.to_host()):
                logprobs[i] = lp
        return SamplerOutput(token_ids, logprobs)


def _index(positions: list[int], device: torch.device) -> torch.Tensor:
    return to_device(positions, torch.int64, device)


def apply_bans(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """-inf for (a) the last token of a bad word whose other tokens end the OUTPUT so far
    (the prompt is not looked at, as in vLLM), (b) eos and stop ids while the output is
    shorter than min_tokens. Returns a new tensor when anything is banned."""
    vocab = logits.shape[1]
    ban_rows: list[int] = []
    ban_tokens: list[int] = []
    for i, row in enumerate(rows):
        params, output = row.params, row.output_token_ids
        for word in params.bad_words_token_ids:
            n_prefix = len(word) - 1
            if n_prefix > len(output):
                continue
            if word[-1] < vocab and (n_prefix == 0 or list(output[-n_prefix:]) == word[:-1]):
                ban_rows.append(i)  # not past the vocabulary: its flat index would be the next row's
                ban_tokens.append(word[-1])
        if row.num_output_tokens < params.min_tokens:  # the step, not the list: it lags in a run-ahead step
            for t in set(params.stop_token_ids) | params.eos_token_ids:
                if t < vocab:  # an id the model cannot produce needs no ban
                    ban_rows.append(i)
                    ban_tokens.append(t)
    if not ban_rows:
        return logits
    logits = logits.clone()
    flat = to_device([r * vocab + t for r, t in zip(ban_rows, ban_tokens)], torch.int64, logits.device)
    logits.view(-1).scatter_(0, flat, float("-inf"))  # not logits[rows, tokens] = ...: that synchronizes
    return logits


def has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow],
                    in_flight: torch.Tensor | None = None) -> torch.Tensor:
    """vLLM semantics. Repetition: every token seen in prompt or output has its logit
    divided by the penalty when positive, multiplied when not. Then
    logit -= frequency * count_in_output + presence * (count_in_output > 0).
    The output is each row's output_token_ids and, where given, its token in `in_flight`
    (B,), still on the device. Returns a new tensor when any row has a penalty.

    Only the logits of tokens a row has seen change, so only those are read and written:
    a gather and a scatter over the seen (row, token) positions, beside one count per
    vocabulary entry. Passes over the whole (rows, vocab) logits took 0.36 ms of an H200
    at batch 64 (bench/gpu/sampler_cost.py). A token seen twice has two positions; both
    compute the same value from the same logit and count, so either write lands."""
    penalised = [i for i, r in enumerate(rows) if has_penalty(r.params)]
    if not penalised:
        return logits
    device, vocab = logits.device, logits.shape[1]
    logits = logits.clone()
    prows = [rows[i] for i in penalised]
    out_rows, out_tokens = _flat_token_ids([r.output_token_ids for r in prows], device)
    seen = out_rows * vocab + out_tokens                                              # (N,) into (P, V)
    if in_flight is not None:  # one more output token per row, known only to the device
        extra = in_flight if len(penalised) == len(rows) else in_flight[_index(penalised, device)]
        seen = torch.cat([seen, torch.arange(len(prows), device=device) * vocab + extra])
    counts = torch.zeros(len(prows) * vocab, dtype=logits.dtype, device=device)    # (P * V,)
    counts.scatter_add_(0, seen, torch.ones_like(seen, dtype=counts.dtype))
    rep = [r.params.repetition_penalty for r in prows]
    if any(p != 1.0 for p in rep):  # prompt tokens only where they matter
        prompt_rows, prompt_tokens = _flat_token_ids(
            [r.prompt_token_ids if p != 1.0 else () for r, p in zip(prows, rep)], device)
        seen = torch.cat([seen, prompt_rows * vocab + prompt_tokens])
    row = seen // vocab                                                               # (N,) in 0..P-1
    at = seen if len(penalised) == len(rows) else _index(penalised, device)[row] * vocab + seen % vocab
    factors = to_device([rep, [r.params.frequency_penalty for r in prows],
                         [r.params.presence_penalty for r in prows]], logits.dtype, device)  # (3, P)
    x = logits.view(-1)[at]
    n = counts[seen]
    penalty = factors[0][row]  # 1.0 leaves x as it is either way
    x = torch.where(x > 0, x / penalty, x * penalty)
    x = x - factors[1][row] * n - factors[2][row] * (n > 0)
    logits.view(-1).scatter_(0, at, x)
    return logits


def _flat_token_ids(token_lists: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged token lists (or int64 arrays, as the engine passes them) -> (row, token) index
    tensors (N,), N = total length. numpy.fromiter is ~8x faster than torch.tensor on long
    Python lists; arrays are only joined."""
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    tokens = np.concatenate([t if isinstance(t, np.ndarray) else np.fromiter(t, dtype=np.int64, count=len(t))
                             for t in token_lists]) if token_lists else np.empty(0, dtype=np.int64)
    row_ids = np.repeat(np.arange(len(token_lists), dtype=np.int64), lengths)
    return host_to_device(torch.from_numpy(row_ids), device), host_to_device(torch.from_numpy(tokens), device)


class _RowSubset:
    """`with _RowSubset(x, positions) as sub:` edit rows `positions` of x in place via sub.
    When the positions are every row (the common, uniform batch), sub is x itself: no
    gather, no scatter."""

    def __init__(self, x: torch.Tensor, positions: list[int]):
        self.x = x
        self.idx = None if len(positions) == x.shape[0] else _index(positions, x.device)
        self.sub = x if self.idx is None else x[self.idx]

    def __enter__(self) -> torch.Tensor:
        return self.sub

    def __exit__(self, *exc) -> None:
        if self.idx is not None and exc[0] is None:
            self.x[self.idx] = self.sub


def _sample(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Temperature, top_k, min_p, top_p, then the exponential race. (R, V) -> (R,).
    Does not modify `logits`.

    Every filter only sets logits to -inf, and only on the rows that use it, so a row's
    result never depends on the other rows' params."""
    device = logits.device
    vocab = logits.shape[1]
    temperature = to_device([r.params.temperature for r in rows], torch.float32, device)
    x = logits / temperature[:, None]                                                 # (R, V)

    top_k = [(j, r.params.top_k) for j, r in enumerate(rows) if 0 < r.params.top_k < vocab]
    if top_k:
        with _RowSubset(x, [j for j, _ in top_k]) as sub:
            _mask_top_k(sub, _column([k for _, k in top_k], torch.int64, device), max(k for _, k in top_k))
    filtered = [j for j, r in enumerate(rows) if r.params.min_p > 0 or r.params.top_p < 1.0]
    seeds, steps = [r.seed for r in rows], [r.num_output_tokens for r in rows]
    if filtered:
        return draw_filtered(x, filtered, [rows[j].params.min_p for j in filtered],
                             [rows[j].params.top_p for j in filtered], seeds, steps)       # (R,)
    return exponential_race(x, seeds, steps)                                              # (R,)


def _column(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return to_device(values, dtype, device)[:, None]                                 # (M, 1)


def _mask_top_k(logits: torch.Tensor, k: torch.Tensor, k_max: int) -> None:
    """Keep the k largest logits (and any tied with the k-th). In place."""
    kth = logits.topk(k_max, dim=-1).values.gather(1, k - 1)                         # (K, 1)
    logits.masked_fill_(logits < kth, float("-inf"))
