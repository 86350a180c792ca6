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


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def tiny_matches_cpu(device: str) -> dict:
    prompts = ["The quick brown fox", "def main():", "1, 2, 3,", "Hello"]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    gpu = LLM("builtin:tiny", device=device, dtype="float32").generate(prompts, params)
    cpu = LLM("builtin:tiny", device="cpu", dtype="float32").generate(prompts, params)
    same = [g.outputs[0].token_ids == c.outputs[0].token_ids for g, c in zip(gpu, cpu)]
    return {"prompts": len(prompts), "greedy_equal_to_cpu": sum(same)}


def llama8b(device: str, batch_sizes: list[int], decode_tokens: int, prompt_len: int) -> dict:
    path = os.path.join(tempfile.mkdtemp(), "llama-3-8b")
    make_model(path, "llama-3-8b", with_weights=False)
    llm, load_s = timed(lambda: LLM(path, load_format="dummy", dtype="bfloat16", device=device,
                                    max_num_seqs=max(batch_sizes), max_num_batched_tokens=8192))
    eng = llm.engine
    out = {"load_s": load_s, "kv_blocks": eng.kv_spec.num_blocks, "block_bytes": eng.kv_spec.block_bytes}
    # Prefill: 4 prompts of prompt_len tokens, one token out.
    prompts = [[(i * 7919 + j) % 120000 + 10 for j in range(prompt_len)] for i in range(4)]
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm.generate(prompts[:1], one)  # warm-up
    eng.pool.reset_prefix_cache()
    _, t = timed(lambda: llm.generate(prompts, one))
    out["prefill_tokens_per_s"] = 4 * prompt_len / t
    out["decode"] = {}
    for bs in batch_sizes:
        eng.pool.reset_prefix_cache()
        ps = [[(b * 104729 + j) % 120000 + 10 for j in range(128)] for b in range(bs)]
        params = SamplingParams(temperature=0.0, max_tokens=decode_tokens, ignore_eos=True)
        llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
        eng.pool.reset_prefix_cache()
        _, t = timed(lambda: llm.generate(ps, params))
        # Includes the 128-token prefill of each prompt: a lower bound on decode speed.
        out["decode"][bs] = {"output_tokens_per_s": bs * decode_tokens / t, "seconds": t}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=2048)
    args = ap.parse_args()
    result = {"gpu": torch.cuda.get_device_name(args.device), "torch": torch.__version__}
    result["tiny"] = tiny_matches_cpu(args.device)
    result["llama_3_8b_dummy"] = llama8b(args.device, [int(b) for b in args.batch_sizes.split(",")],
                                         args.decode_tokens, args.prompt_len)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "engine_smoke.json"), "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    r = result["llama_3_8b_dummy"]
    print(f"\n{result['gpu']}: tiny greedy equal to CPU {result['tiny']['greedy_equal_to_cpu']}/{result['tiny']['prompts']}")
    print(f"8B dummy bf16: prefill {r['prefill_tokens_per_s']:.0f} tok/s ({args.prompt_len}-token prompts)")
    for bs, d in r["decode"].items():
        print(f"  decode batch {bs:>3}: {d['output_tokens_per_s']:.0f} output tok/s")


if __name__ == "__main__":
    main()
