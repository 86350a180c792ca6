"""Programmatic dependent launch changes when kernels start, never what they compute: decode
graphs captured with PDL on must give bit-identical logprobs to the same kernels captured
with it off. A race (a kernel reading before its predecessor finished) would show here as
a changed number, so this checks every GEMV/PDL setting the A/B runs time.

    PYTHONPATH=. python bench/gpu/pdl_check.py [--gemv qkv,o] [--presets tiny:float32]

Batches of 1, 3 and 16 requests (graphs 1, 4 and 16), contexts from 5 to ~1,500 tokens
(one split program per sequence up to many), greedy and seeded, 5 top logprobs per token.
Prints one line per case and writes $OUT/pdl_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from engine.llm import LLM
from engine.sampling_params import SamplingParams


def run(device: str, preset: str, dtype: str, pdl: bool, gemv: str | None, batches: list[list[list[int]]]) -> list:
    os.environ["PDCLUSTER_PDL"] = "1" if pdl else "0"
    if gemv is not None:
        os.environ["PDCLUSTER_TRITON_GEMV"] = gemv
    out = []
    with LLM(f"builtin:{preset}", device=device, dtype=dtype, load_format="dummy", max_num_seqs=16,
             max_model_len=2048, num_blocks=4096) as llm:
        for prompts in batches:
            for params in (SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=5),
                           SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=24, ignore_eos=True,
                                          logprobs=5)):
                res = llm.generate(prompts, params)
                out.append([(o.outputs[0].token_ids, repr(o.outputs[0].logprobs)) for o in res])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gemv", default=None, help="PDCLUSTER_TRITON_GEMV for both runs (default: the engine's)")
    ap.add_argument("--device", default="cuda:0", help="cpu checks the script itself (no PDL there)")
    ap.add_argument("--presets", default="tiny:float32,tiny:bfloat16,llama-3-8b:bfloat16")
    args = ap.parse_args()
    vocab_cap = 2000  # inside every preset's vocabulary (tiny: 2048)

    def prompt(i: int, n: int) -> list[int]:
        return [(i * 7919 + j * 31) % vocab_cap + 10 for j in range(n)]

    batches = [[prompt(0, 5)], [prompt(1, 17), prompt(2, 700), prompt(3, 1500)],
               [prompt(10 + i, 5 + 97 * i) for i in range(16)]]
    result, ok = {}, True
    for item in args.presets.split(","):
        preset, dtype = item.split(":")
        off = run(args.device, preset, dtype, False, args.gemv, batches)
        on = run(args.device, preset, dtype, True, args.gemv, batches)
        equal = [a == b for a, b in zip(off, on)]
        result[item] = {"cases": len(equal), "identical": sum(equal)}
        ok &= all(equal)
        print(f"{item}: PDL on == off (tokens and logprobs, bit for bit) in {sum(equal)}/{len(equal)} cases "
              f"(GEMV {args.gemv or 'default'})", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    result["all_identical"] = ok
    print("ALL IDENTICAL" if ok else "DIFFERENCES FOUND")
    os.makedirs(os.environ.get("OUT", "bench-out"), exist_ok=True)
    with open(os.path.join(os.environ.get("OUT", "bench-out"), "pdl_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
