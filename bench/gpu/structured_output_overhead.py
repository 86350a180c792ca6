"""What structured output costs per decode step: the same batch decoded with and without
a grammar on every row (ARCHITECTURE §4: under 5% at batch 64 on the 8B shape).

    PYTHONPATH=. python bench/gpu/structured_output_overhead.py [--device cuda:0] [--batch-sizes 1,16,64]

Per batch size and backend: the median decode step (over windows of 8 steps) with no
grammar, with a grammar on every row, the overhead, and how much of the step the
host-side bitmask fill takes; sampling (temperature 0.8, top_p 0.95) against greedy; and
the same with repetition, frequency and presence penalties, running ahead and not. The
grammar is a JSON schema (a list of at least 64 objects) that no row can finish within
the measured steps, so every step computes a real mask. `--preset tiny --device cpu`
checks the script here. Writes $OUT/structured_output_overhead.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from engine import LLM, SamplingParams
from engine.builtin_models import make_model

SCHEMA = {"type": "array", "minItems": 64,
          "items": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                    "required": ["name", "age"]}}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def decode_steps(llm: LLM, prompts: list[list[int]], params: SamplingParams, steps: int) -> tuple[list[float], float]:
    """Median-ready step times (s) once every request decodes, and the host fill time per step."""
    eng = llm.engine
    fill = [0.0]
    inner = eng.structured.apply_bitmask

    def timed_apply(logits, ids):
        t = time.perf_counter()
        inner(logits, ids)
        fill[0] += time.perf_counter() - t
    eng.structured.apply_bitmask = timed_apply
    try:
        for i, p in enumerate(prompts):
            eng.add_request(f"r{time.monotonic_ns()}-{i}", p, params)
        while any(len(r.output_token_ids) == 0 for r in eng.scheduler.running) or eng.scheduler.waiting:
            eng.step()
        fill[0] = 0.0
        times = []
        # Steps are timed in windows of 8 with one sync at each end: the engine overlaps a
        # step's host work (the bitmask fill among it) with the device's previous step, and
        # a sync around every step would hide that overlap from both sides of the comparison.
        window = 8
        for _ in range(max(1, steps // window)):
            _sync()
            t = time.perf_counter()
            for _ in range(window):
                eng.step()
            _sync()
            times.append((time.perf_counter() - t) / window)
        fill_per_step = fill[0] / (max(1, steps // window) * window)
        for r in list(eng.scheduler.requests.values()):
            eng.abort_request(r.request_id)
        return times, fill_per_step
    finally:
        eng.structured.apply_bitmask = inner


def profile_steps(llm: LLM, prompts: list[list[int]], params: SamplingParams, steps: int) -> dict:
    """GPU busy ms per step (sum of kernel times) beside wall ms per step: the difference is
    host time the device waited for."""
    from torch.profiler import ProfilerActivity, profile

    eng = llm.engine
    for i, p in enumerate(prompts):
        eng.add_request(f"p{time.monotonic_ns()}-{i}", p, params)
    while any(len(r.output_token_ids) == 0 for r in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _sync()
        t = time.perf_counter()
        for _ in range(steps):
            eng.step()
        _sync()
        wall = (time.perf_counter() - t) / steps
    busy = sum(getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0) for e in prof.key_averages())
    for r in list(eng.scheduler.requests.values()):
        eng.abort_request(r.request_id)
    return {"gpu_busy_ms": busy / 1e3 / steps, "wall_ms": wall * 1e3}


def host_profile_steps(llm: LLM, prompts: list[list[int]], params: SamplingParams, steps: int) -> str:
    """Where the host's time per step goes (cProfile of engine.step, by own time)."""
    import cProfile
    import io
    import pstats

    eng = llm.engine
    for i, p in enumerate(prompts):
        eng.add_request(f"h{time.monotonic_ns()}-{i}", p, params)
    while any(len(r.output_token_ids) == 0 for r in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        eng.step()
    prof.disable()
    for r in list(eng.scheduler.requests.values()):
        eng.abort_request(r.request_id)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(22)
    return out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--backends", default="xgrammar,guidance")
    ap.add_argument("--profile", action="store_true",
                    help="also: GPU busy time against wall time per step, with and without a grammar")
    ap.add_argument("--host-profile", action="store_true",
                    help="also: cProfile of the engine's step at the largest batch: greedy, sampled, "
                         "penalised and with each backend")
    args = ap.parse_args()
    path = os.path.join(tempfile.mkdtemp(), args.preset)
    make_model(path, args.preset, with_weights=False)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    llm = LLM(path, load_format="dummy", dtype=dtype, device=args.device, max_num_seqs=max(sizes))
    vocab = llm.engine.model_config.vocab_size - 20
    result = {"device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
              "preset": args.preset, "rows": []}
    for bs in sizes:
        prompts = [[(b * 104729 + j) % vocab + 10 for j in range(128)] for b in range(bs)]
        base_params = SamplingParams(temperature=0.0, max_tokens=args.steps + 8, ignore_eos=True)
        decode_steps(llm, prompts, base_params, 4)  # warm-up
        base, _ = decode_steps(llm, prompts, base_params, args.steps)
        # Sampling (not greedy) beside it: its per-step host-to-device copies must not wait
        # for the forward in flight (engine/sampler.py to_device).
        sampled_params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=args.steps + 8, ignore_eos=True)
        decode_steps(llm, prompts, sampled_params, 4)
        sampled, _ = decode_steps(llm, prompts, sampled_params, args.steps)
        b, t = statistics.median(base), statistics.median(sampled)
        result.setdefault("sampled", []).append({"batch": bs, "step_ms": b * 1e3, "step_ms_sampled": t * 1e3,
                                                 "overhead": t / b - 1})
        print(f"batch {bs:>3}   sampled: {b * 1e3:7.2f} ms -> {t * 1e3:7.2f} ms per step ({100 * (t / b - 1):+.1f}%), "
              "temperature 0.8, top_p 0.95 against greedy", flush=True)
        # Penalties beside it, with the engine running ahead (the token still on the device
        # counted by the sampler) and with async scheduling off, which reads every step back
        # before queuing the next.
        pen_params = SamplingParams(temperature=0.8, top_p=0.95, repetition_penalty=1.1, frequency_penalty=0.2,
                                    presence_penalty=0.1, max_tokens=args.steps + 8, ignore_eos=True)
        pen = {}
        for label, run_ahead in (("run_ahead", True), ("sync", False)):
            llm.engine.config.async_scheduling = run_ahead
            decode_steps(llm, prompts, pen_params, 4)
            ahead_before = llm.engine.num_steps_run_ahead
            times, _ = decode_steps(llm, prompts, pen_params, args.steps)
            pen[label] = {"step_ms": statistics.median(times) * 1e3,
                          "steps_run_ahead": llm.engine.num_steps_run_ahead - ahead_before}
        llm.engine.config.async_scheduling = True
        if args.host_profile and bs == max(sizes):
            for label, params in (("greedy", base_params), ("sampled", sampled_params), ("penalised", pen_params)):
                print(f"host profile, {label}, batch {bs}, {args.steps} steps:\n"
                      + host_profile_steps(llm, prompts, params, args.steps), flush=True)
        b = statistics.median(base) * 1e3
        result.setdefault("penalised", []).append({"batch": bs, "step_ms": b, **pen,
                                                   "overhead": pen["run_ahead"]["step_ms"] / b - 1,
                                                   "overhead_sync": pen["sync"]["step_ms"] / b - 1})
        print(f"batch {bs:>3} penalised: {b:7.2f} ms -> {pen['run_ahead']['step_ms']:7.2f} ms running ahead "
              f"({100 * (pen['run_ahead']['step_ms'] / b - 1):+.1f}%, {pen['run_ahead']['steps_run_ahead']} steps ahead), "
              f"{pen['sync']['step_ms']:7.2f} ms synchronous ({100 * (pen['sync']['step_ms'] / b - 1):+.1f}%)", flush=True)
        for backend in args.backends.split(","):
            params = SamplingParams(temperature=0.0, max_tokens=args.steps + 8, ignore_eos=True,
                                    structured_outputs={"json": SCHEMA, "backend": backend})
            decode_steps(llm, prompts, params, 4)  # warm-up, compiles once
            with_grammar, fill = decode_steps(llm, prompts, params, args.steps)
            b, g = statistics.median(base), statistics.median(with_grammar)
            row = {"batch": bs, "backend": backend, "step_ms": b * 1e3, "step_ms_grammar": g * 1e3,
                   "overhead": g / b - 1, "fill_ms": fill * 1e3}
            if args.profile and args.device.startswith("cuda"):
                row["profile"] = {"plain": profile_steps(llm, prompts, base_params, args.steps),
                                  "grammar": profile_steps(llm, prompts, params, args.steps)}
                print(f"  profile: {row['profile']}", flush=True)
            if args.host_profile and bs == max(sizes):
                print(f"host profile, {backend}, batch {bs}, {args.steps} steps:\n"
                      + host_profile_steps(llm, prompts, params, args.steps), flush=True)
            result["rows"].append(row)
            print(f"batch {bs:>3} {backend:>9}: {b * 1e3:7.2f} ms -> {g * 1e3:7.2f} ms per step "
                  f"({100 * row['overhead']:+.1f}%), bitmask fill + apply {fill * 1e3:.2f} ms", flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "structured_output_overhead.json"), "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
