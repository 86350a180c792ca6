"""GPU smoke run of the engine: the built-in tiny model, and a Llama-3-8B-shape model
with dummy weights. Not tuned: it proves nothing is CPU-only and records the speed of
the plain-torch reference path as a baseline for the Triton kernels.

    PYTHONPATH=. python bench/gpu/engine_smoke.py [--device cuda:0]

Prints a table last; writes $OUT/engine_smoke.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from engine import LLM, SamplingParams
from engine.builtin_models import make_model


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - t0


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus written."""
    a = torch.empty(1 << (30 if device.startswith("cuda") else 26), dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        _, t = timed(lambda: b.copy_(a))
        times.append(t)
    return 2 * a.numel() / sorted(times)[len(times) // 2]


def matmul_rate(device: str) -> float:
    """Measured bf16 matrix rate, FLOP/s (8192^3 products, fresh random inputs)."""
    n = 8192 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        _, t = timed(lambda: a @ b)
        times.append(t)
    return 2 * n ** 3 / sorted(times)[len(times) // 2]


def tiny_matches_cpu(device: str) -> dict:
    prompts = ["The quick brown fox", "def main():", "1, 2, 3,", "Hello"]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    gpu = LLM("builtin:tiny", device=device, dtype="float32").generate(prompts, params)
    cpu = LLM("builtin:tiny", device="cpu", dtype="float32").generate(prompts, params)
    same = [g.outputs[0].token_ids == c.outputs[0].token_ids for g, c in zip(gpu, cpu)]
    return {"prompts": len(prompts), "greedy_equal_to_cpu": sum(same)}


def llama8b(device: str, batch_sizes: list[int], decode_tokens: int, prompt_len: int,
            preset: str = "llama-3-8b") -> dict:
    path = os.path.join(tempfile.mkdtemp(), preset)
    make_model(path, preset, with_weights=False)
    llm, load_s = timed(lambda: LLM(path, load_format="dummy", dtype="bfloat16", device=device,
                                    max_num_seqs=max(batch_sizes), max_num_batched_tokens=max(8192, 128 * max(batch_sizes))))
    eng = llm.engine
    out = {"load_s": load_s, "kv_blocks": eng.kv_spec.num_blocks, "block_bytes": eng.kv_spec.block_bytes}
    # Prefill: 4 prompts of prompt_len tokens, one token out.
    vocab = eng.model_config.vocab_size - 20
    prompts = [[(i * 7919 + j) % vocab + 10 for j in range(prompt_len)] for i in range(4)]
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm.generate(prompts[:1], one)  # warm-up
    eng.pool.reset_prefix_cache()
    _, t = timed(lambda: llm.generate(prompts, one))
    out["prefill_tokens_per_s"] = 4 * prompt_len / t
    n_params = sum(p.numel() for p in eng.model.parameters())
    flops = 2 * n_params * 4 * prompt_len  # matmuls; attention adds a few percent at 2k
    out["prefill_tflops"] = flops / t / 1e12
    out["matmul_tflops"] = matmul_rate(device) / 1e12
    out["prefill_fraction_of_matmul_rate"] = out["prefill_tflops"] / out["matmul_tflops"]
    out["decode"] = {}
    weight_bytes = sum(p.numel() * p.element_size() for p in eng.model.parameters())
    copy_bw = copy_bandwidth(device)
    out["weight_bytes"], out["copy_GBps"] = weight_bytes, copy_bw / 1e9
    ctx = 128
    for bs in batch_sizes:
        ps = [[(b * 104729 + j) % vocab + 10 for j in range(ctx)] for b in range(bs)]
        llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
        eng.pool.reset_prefix_cache()
        _, t_prefill = timed(lambda: llm.generate(ps, one))
        eng.pool.reset_prefix_cache()
        params = SamplingParams(temperature=0.0, max_tokens=decode_tokens, ignore_eos=True)
        _, t = timed(lambda: llm.generate(ps, params))
        step_s = (t - t_prefill) / (decode_tokens - 1)
        # Roofline: every weight and every cached K/V byte read once per step.
        kv_bytes = bs * (ctx + decode_tokens // 2) * eng.kv_spec.block_bytes // eng.kv_spec.block_size
        roofline_s = (weight_bytes + kv_bytes) / copy_bw
        out["decode"][bs] = {"step_ms": step_s * 1e3, "roofline_ms": roofline_s * 1e3,
                             "ratio_to_roofline": step_s / roofline_s, "output_tokens_per_s": bs / step_s}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--batch-sizes", default="1,16,64,256")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--preset", default="llama-3-8b", help="a smaller preset (tiny) checks the script on CPU")
    args = ap.parse_args()
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    result = {"gpu": name, "torch": torch.__version__}
    result["tiny"] = tiny_matches_cpu(args.device)
    result["llama_3_8b_dummy"] = llama8b(args.device, [int(b) for b in args.batch_sizes.split(",")],
                                         args.decode_tokens, args.prompt_len, args.preset)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "engine_smoke.json"), "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    r = result["llama_3_8b_dummy"]
    print(f"\n{result['gpu']}: tiny greedy equal to CPU {result['tiny']['greedy_equal_to_cpu']}/{result['tiny']['prompts']}")
    print(f"8B dummy bf16: prefill {r['prefill_tokens_per_s']:.0f} tok/s ({args.prompt_len}-token prompts), "
          f"{r['prefill_tflops']:.0f} TFLOP/s = {r['prefill_fraction_of_matmul_rate']:.2f} of the measured "
          f"bf16 matmul rate {r['matmul_tflops']:.0f}")
    print(f"  weights {r['weight_bytes'] / 1e9:.1f} GB, device copy {r['copy_GBps']:.0f} GB/s")
    for bs, d in r["decode"].items():
        print(f"  decode batch {bs:>3}: {d['step_ms']:.2f} ms/step ({d['output_tokens_per_s']:.0f} tok/s), "
              f"roofline {d['roofline_ms']:.2f} ms, ratio {d['ratio_to_roofline']:.2f}")


if __name__ == "__main__":
    main()
