"""What sampling costs on the device per decode step, by rule: greedy, temperature,
top_p, top_k, min_p, logprobs and a penalty, on (batch, vocab) logits of Llama-3's vocab.

    PYTHONPATH=. python bench/gpu/sampler_cost.py [--batch-sizes 16,64] [--vocab 128256]

Median of CUDA-event timings of Sampler.sample (device work, queued and waited for:
where the host is slower than the device, its time shows too), beside the device's busy
time per call from the profiler (kernels and copies alone) and the host's time to queue
a call (`--host-profile`: where it goes), and the top kernels of the
costliest rules. Writes $OUT/sampler_cost.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from engine.sampler import Sampler, SamplingRow, has_penalty
from engine.sampling_params import SamplingParams
from kernels.sampling import kernel_verified

RULES = {
    "greedy": dict(temperature=0.0),
    "temperature": dict(temperature=0.8),
    "top_p": dict(temperature=0.8, top_p=0.95),
    "top_k": dict(temperature=0.8, top_k=50),
    "min_p": dict(temperature=0.8, min_p=0.05),
    "top_p+top_k": dict(temperature=0.8, top_p=0.95, top_k=50),
    "logprobs": dict(temperature=0.0, logprobs=5),
    "penalty": dict(temperature=0.0, repetition_penalty=1.1),
}


def engine_row(params: SamplingParams, seed: int) -> SamplingRow:
    """A row as the engine builds it: 199 prompt and 100 output tokens, as int64 arrays
    where a penalty reads them all (engine/llm_engine.py _sampling_rows)."""
    prompt, output = list(range(1, 200)), list(range(300, 400))
    if has_penalty(params):
        prompt, output = np.array(prompt, dtype=np.int64), np.array(output, dtype=np.int64)
    return SamplingRow(params, seed, prompt, output)


def time_rule(sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow], reps: int = 30) -> float:
    for _ in range(3):
        sampler.sample(logits, rows).resolve()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        pending = sampler.sample(logits, rows)
        end.record()
        pending.resolve()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def host_ms(sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow], reps: int = 30) -> float:
    """Host time to queue one call (sample() without resolve): what a decode step's host
    work pays for sampling, hidden behind the forward while the host keeps ahead."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        pending = sampler.sample(logits, rows)
        times.append(time.perf_counter() - t)
        pending.resolve()
    return statistics.median(times) * 1e3


def host_profile(sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow], calls: int = 50) -> str:
    """Where the host time of sample() goes (cProfile, by cumulative time)."""
    import cProfile
    import io
    import pstats
    prof = cProfile.Profile()
    for _ in range(calls):
        torch.cuda.synchronize()
        prof.enable()
        pending = sampler.sample(logits, rows)
        prof.disable()
        pending.resolve()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(25)
    return out.getvalue()


def busy_ms(sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow], calls: int = 5) -> float:
    """Device time per call: the sum of the kernels' and copies' own times."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            sampler.sample(logits, rows).resolve()
    total_us = sum(getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
                   for e in prof.key_averages())
    return total_us / 1e3 / calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", default="16,64")
    ap.add_argument("--vocab", type=int, default=128_256)
    ap.add_argument("--host-profile", action="store_true", help="also: cProfile of the host side, per costly rule")
    args = ap.parse_args()
    result = {"device": torch.cuda.get_device_name(0), "vocab": args.vocab, "rows": [],
              "race_kernel": kernel_verified("cuda")}  # False: the torch reference draws
    print(f"the race kernel is {'used' if result['race_kernel'] else 'NOT used (see the warning)'}", flush=True)
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        logits = torch.randn(bs, args.vocab, device="cuda") * 3
        sampler = Sampler(bs, "cuda")
        for name, kw in RULES.items():
            rows = [engine_row(SamplingParams(**kw), i) for i in range(bs)]
            ms = time_rule(sampler, logits, rows)
            busy = busy_ms(sampler, logits, rows)
            host = host_ms(sampler, logits, rows)
            result["rows"].append({"batch": bs, "rule": name, "ms": ms, "device_busy_ms": busy, "host_ms": host})
            print(f"batch {bs:>3} {name:>12}: {ms:6.3f} ms (device busy {busy:6.3f} ms, host {host:6.3f} ms)",
                  flush=True)
        for name in ("top_p+top_k", "logprobs", "penalty"):
            rows = [engine_row(SamplingParams(**RULES[name]), i) for i in range(bs)]
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    sampler.sample(logits, rows).resolve()
            print(f"batch {bs} {name}, 5 calls:", flush=True)
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8), flush=True)
            if args.host_profile:
                print(host_profile(sampler, logits, rows), flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "sampler_cost.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
