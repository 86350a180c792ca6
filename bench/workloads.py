"""Benchmark traffic: which requests to send, and when.

A workload is a list of `BenchRequest`s (prompt token ids, output length, optional
workflow/agent metadata). Arrival times are laid on separately (`with_poisson_arrivals`),
so one request set can be replayed at every rate of a sweep, or in a closed loop of a
fixed concurrency (the client then ignores `arrival_s`).

Prompts are random token ids in [10, vocab_size - 10): the tokenizer is not what we
measure, and the low/high ids (special tokens in most vocabularies) stay out of the way.
Requests are sent with `ignore_eos`, so every output has exactly `max_tokens` tokens.

Repeatability: the same `WorkloadOptions` (seed included) give the same lengths and token
ids. `salt` changes only the token ids, keeping every length: a sweep gives each rate its
own salt so that no rate finds the previous rate's prompts in the prefix cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

WORKLOADS = ("fixed", "random-uniform", "random-lognormal", "sharegpt", "prefix-agents")
TOKEN_ID_MARGIN = 10   # ids drawn from [10, vocab_size - 10)

# --- ShareGPT-like lengths ----------------------------------------------------------------
# Synthesised, no download. Published statistics of ShareGPT (ShareGPT_V3_unfiltered_
# cleaned_split.json) as serving benchmarks use it, recalled rather than re-measured here:
#   * vLLM's benchmark_serving.py (first turn of each conversation; prompts of 4..1024
#     tokens, prompt + output <= 2048; Llama-2 tokenizer), 1000 sampled prompts: about
#     215k input and 198k output tokens, i.e. mean input ~215, mean output ~200 tokens;
#   * the vLLM paper (Kwon et al., SOSP 2023, Fig. 11a, OPT tokenizer, all turns): mean
#     input 161, mean output 338; both heavily right-skewed (a long tail up to the cap).
# We take log-normal lengths (median 150, sigma 1.0 -> mean ~250 input; median 130,
# sigma 0.9 -> mean ~195 output), clipped to vLLM's filter (4..1024 prompt, total <= 2048):
# after clipping, mean input ~230 (p99 1024) and mean output ~195 (p99 ~1100), between those two
# sources. `length_scale` shrinks everything for CPU runs.
SHAREGPT_INPUT_MEDIAN, SHAREGPT_INPUT_SIGMA = 150.0, 1.0
SHAREGPT_OUTPUT_MEDIAN, SHAREGPT_OUTPUT_SIGMA = 130.0, 0.9
SHAREGPT_MIN_LEN, SHAREGPT_MAX_INPUT, SHAREGPT_MAX_TOTAL = 4, 1024, 2048


@dataclass(slots=True)
class BenchRequest:
    """One request of a run. `arrival_s` is its send time, seconds after the run starts
    (open loop only). `after` is the index of a request that must finish before this one
    is sent (an agent's previous turn), or None."""

    index: int
    prompt_ids: list[int]
    max_tokens: int
    arrival_s: float = 0.0
    workflow_id: str | None = None
    agent_id: str | None = None
    after: int | None = None
    temperature: float = 0.0          # 0: greedy; above, sampled with the request's index as its seed

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@dataclass(slots=True)
class WorkloadOptions:
    """Every knob of every workload; each workload reads the ones it names.

    Lengths are in tokens. `length_scale` multiplies every length a workload draws
    (sharegpt's, prefix-agents' system prompts and turns, the fixed/random means), so a
    CPU run can keep a workload's shape at a small size."""

    num_requests: int = 200
    input_len: int = 1024             # fixed / random-*: prompt length (mean or median)
    output_len: int = 128             # fixed / random-*: output length (mean or median)
    range_ratio: float = 0.5          # random-uniform: lengths in [len*(1-r), len*(1+r)]
    lognormal_sigma: float = 0.6      # random-lognormal: sigma of log(length)
    length_scale: float = 1.0
    vocab_size: int = 32000
    max_model_len: int = 4096         # prompt + output never exceeds it
    seed: int = 0
    temperature: float = 0.0          # every request's; 0 is greedy (sampling costs the engine more per step)
    # prefix-agents
    num_agents: int = 8
    num_system_prompts: int = 2
    system_prompt_len: int = 1024     # shared by the agents of one system prompt
    turn_len: int = 64                # new user tokens each turn
    reply_len: int | None = None      # the synthetic earlier replies in the context (default output_len)
    background_share: float = 0.0     # share of one-off requests from outside the workflows (other tenants)

    def scaled(self, n: float) -> int:
        return max(1, int(round(n * self.length_scale)))


def make_workload(name: str, opts: WorkloadOptions, salt: int = 0) -> list[BenchRequest]:
    """The requests of workload `name`, all with arrival 0 (see with_poisson_arrivals)."""
    if name not in _BUILDERS:
        raise ValueError(f"workload {name!r}: choose one of {', '.join(WORKLOADS)}")
    if opts.num_requests < 1:
        raise ValueError(f"num_requests {opts.num_requests}: give 1 or more")
    if opts.vocab_size <= 2 * TOKEN_ID_MARGIN:
        raise ValueError(f"vocab_size {opts.vocab_size} leaves no ids in [{TOKEN_ID_MARGIN}, vocab_size - "
                         f"{TOKEN_ID_MARGIN}): is it the model's vocabulary?")
    lengths = np.random.default_rng(opts.seed)
    tokens = np.random.default_rng([opts.seed, salt, 0x70C])  # token ids only: lengths do not depend on salt
    requests = _BUILDERS[name](opts, lengths, tokens)
    return [replace(r, temperature=opts.temperature) for r in requests] if opts.temperature else requests


def with_poisson_arrivals(requests: list[BenchRequest], rate: float, seed: int = 0) -> list[BenchRequest]:
    """Copies of `requests` with Poisson arrivals at `rate` requests/s (exponential gaps,
    the first request at 0). `rate` inf (or <= 0 is refused): everything at time 0."""
    if not rate > 0:
        raise ValueError(f"request rate {rate}: give a positive rate, or inf to send everything at once")
    if math.isinf(rate):
        return [replace(r, arrival_s=0.0) for r in requests]
    gaps = np.random.default_rng([seed, 0xA881]).exponential(1.0 / rate, size=len(requests))
    gaps[0] = 0.0
    times = np.cumsum(gaps)
    return [replace(r, arrival_s=float(t)) for r, t in zip(requests, times)]


def parse_rates(value: str | float | list | None) -> list[float]:
    """`"1,2,4"`, `"inf"`, 4.0 or [1, 2] as a list of rates (floats, inf allowed)."""
    if value is None:
        return []
    if isinstance(value, (int, float)):
        items = [value]
    elif isinstance(value, str):
        items = [v for v in value.split(",") if v.strip()]
    else:
        items = list(value)
    rates = []
    for v in items:
        try:
            rate = float(v)
        except ValueError:
            raise ValueError(f"request rate {v!r}: give numbers, e.g. 1,2,4 or inf") from None
        if not rate > 0:
            raise ValueError(f"request rate {v!r}: give a positive rate, or inf")
        rates.append(rate)
    return rates


# --- the workloads ------------------------------------------------------------------------
def _random_ids(rng: np.random.Generator, n: int, vocab_size: int) -> list[int]:
    return rng.integers(TOKEN_ID_MARGIN, vocab_size - TOKEN_ID_MARGIN, size=n).tolist()


def _fit(prompt_len: int, output_len: int, opts: WorkloadOptions) -> tuple[int, int]:
    """Clip (prompt, output) so that both are >= 1 and their sum fits max_model_len."""
    output_len = max(1, min(output_len, opts.max_model_len - 1))
    prompt_len = max(1, min(prompt_len, opts.max_model_len - output_len))
    return prompt_len, output_len


def _from_lengths(opts: WorkloadOptions, tokens: np.random.Generator, ins, outs) -> list[BenchRequest]:
    out = []
    for i, (p, o) in enumerate(zip(ins, outs)):
        p, o = _fit(int(p), int(o), opts)
        out.append(BenchRequest(i, _random_ids(tokens, p, opts.vocab_size), o))
    return out


def _fixed(opts, lengths, tokens):
    n = opts.num_requests
    return _from_lengths(opts, tokens, [opts.scaled(opts.input_len)] * n, [opts.scaled(opts.output_len)] * n)


def _random_uniform(opts, lengths, tokens):
    def draw(mean: int) -> np.ndarray:
        m = opts.scaled(mean)
        lo, hi = max(1, int(m * (1 - opts.range_ratio))), max(1, int(m * (1 + opts.range_ratio)))
        return lengths.integers(lo, hi + 1, size=opts.num_requests)
    ins = draw(opts.input_len)
    return _from_lengths(opts, tokens, ins, draw(opts.output_len))


def _random_lognormal(opts, lengths, tokens):
    def draw(median: int) -> np.ndarray:
        x = lengths.lognormal(math.log(opts.scaled(median)), opts.lognormal_sigma, size=opts.num_requests)
        return np.maximum(1, np.rint(x)).astype(int)
    ins = draw(opts.input_len)
    return _from_lengths(opts, tokens, ins, draw(opts.output_len))


def _sharegpt(opts, lengths, tokens):
    n, s = opts.num_requests, opts.length_scale
    ins = lengths.lognormal(math.log(SHAREGPT_INPUT_MEDIAN), SHAREGPT_INPUT_SIGMA, size=n)
    outs = lengths.lognormal(math.log(SHAREGPT_OUTPUT_MEDIAN), SHAREGPT_OUTPUT_SIGMA, size=n)
    ins = np.clip(np.rint(ins), SHAREGPT_MIN_LEN, SHAREGPT_MAX_INPUT)
    outs = np.clip(np.rint(outs), SHAREGPT_MIN_LEN, None)
    outs = np.minimum(outs, SHAREGPT_MAX_TOTAL - ins)  # vLLM's filter: prompt + output <= 2048
    ins = np.maximum(1, np.rint(ins * s)).astype(int)
    outs = np.maximum(1, np.rint(outs * s)).astype(int)
    return _from_lengths(opts, tokens, ins, outs)


def _prefix_agents(opts, lengths, tokens):
    """Agents sharing a few system prompts, each with a growing conversation.

    Agent a uses system prompt a % num_system_prompts; the agents of one system prompt
    form one workflow (`workflow_id`, which the router may use for affinity). Its turn k prompt is the system
    prompt + its conversation so far (turn j's user message, then a synthetic reply of
    `reply_len` tokens, for j < k) + turn k's user message. Requests go turn by turn
    (every agent's turn 0, then every agent's turn 1, ...), and turn k waits for the
    agent's turn k-1 to finish (`after`), as a real agent would.

    The context holds a synthetic reply, not the model's actual output (which we do not
    know in advance), so a turn can reuse from the cache the agent's previous *prompt*
    and the shared system prompt, not the generated tokens: the hit rate measured is the
    reuse of prompts across turns and agents. A conversation that would no longer fit
    max_model_len starts again after its system prompt.

    `background_share` mixes in one-off prompts from outside the workflows (no
    workflow_id, nothing shared), as a cluster serving agents next to other traffic sees:
    the case workflow-aware eviction is for.
    """
    n, a = opts.num_requests, max(1, opts.num_agents)
    sys_len = opts.scaled(opts.system_prompt_len)
    turn_len = opts.scaled(opts.turn_len)
    reply_len = opts.scaled(opts.reply_len if opts.reply_len is not None else opts.output_len)
    out_len = opts.scaled(opts.output_len)
    _, out_len = _fit(1, out_len, opts)
    sys_len = min(sys_len, max(1, opts.max_model_len - out_len - turn_len))
    systems = [_random_ids(tokens, sys_len, opts.vocab_size) for _ in range(max(1, opts.num_system_prompts))]
    context: list[list[int]] = [[] for _ in range(a)]   # each agent's conversation after its system prompt
    last: list[int | None] = [None] * a                  # each agent's previous request
    out = []
    turns = 0
    for i in range(n):
        if opts.background_share > 0 and lengths.random() < opts.background_share:
            # Someone else's one-off prompt, as long as an agent's system prompt and turn.
            prompt_len, _ = _fit(sys_len + turn_len, out_len, opts)
            out.append(BenchRequest(i, _random_ids(tokens, prompt_len, opts.vocab_size), out_len))
            continue
        agent = turns % a
        turns += 1
        user = _random_ids(tokens, turn_len, opts.vocab_size)
        system = systems[agent % len(systems)]
        if len(system) + len(context[agent]) + turn_len + out_len > opts.max_model_len:
            context[agent] = []   # the conversation is full: start a new one
        prompt = system + context[agent] + user
        prompt_len, _ = _fit(len(prompt), out_len, opts)
        out.append(BenchRequest(i, prompt[:prompt_len], out_len, workflow_id=f"workflow-{agent % len(systems)}",
                                agent_id=f"agent-{agent}", after=last[agent]))
        context[agent] = context[agent] + user + _random_ids(tokens, reply_len, opts.vocab_size)
        last[agent] = i
    return out


_BUILDERS = {"fixed": _fixed, "random-uniform": _random_uniform, "random-lognormal": _random_lognormal,
             "sharegpt": _sharegpt, "prefix-agents": _prefix_agents}
