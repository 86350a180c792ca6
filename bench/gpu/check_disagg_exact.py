"""On a 2-GPU machine: a 1P1D cluster (prefill on cuda:0, decode on cuda:1, NIXL moving
VRAM) answers exactly what one offline engine answers, greedy and seeded, for the built-in
tiny model in float32 and an 8B-shape model in bf16 (dummy weights, made on the GPU from
a fixed seed, so the nodes and the offline engine hold the same weights).

    PYTHONPATH=. python bench/gpu/check_disagg_exact.py

Prints one line per case and exits 1 on any mismatch.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import httpx

from cluster.config import ClusterConfig
from cluster.launcher import LocalCluster
from engine import LLM, SamplingParams
from engine.builtin_models import make_model, resolve_builtin

PROMPTS = ["The quick brown fox jumps over the lazy dog and", "def fibonacci(n):\n    return",
           "Numbers: 1, 2, 3, 5, 8, 13,", "In a hole in the ground there lived"]
DEVICES = os.environ.get("DEVICES", "cuda:0,cuda:1").split(",")  # DEVICES=cpu,cpu checks the script on a CPU
CASES = {"greedy": dict(temperature=0.0), "seeded": dict(temperature=0.8, top_p=0.95, top_k=50, seed=1234)}


def check(name: str, model_path: str, dtype: str, load_format: str, max_tokens: int) -> bool:
    config = ClusterConfig.model_validate({
        "model": {"path": model_path, "dtype": dtype, "load_format": load_format},
        "router": {"port": 0}, "kv_transfer": {"connector": os.environ.get("CONNECTOR", "nixl")},
        "engine": {"num_blocks": 2048, "block_size": 16, "max_model_len": 4096},
        "prefill": {"replicas": 1, "devices": [DEVICES[0]]}, "decode": {"replicas": 1, "devices": [DEVICES[1]]}})
    offline = LLM(model_path if not model_path.startswith("builtin:") else str(resolve_builtin(model_path[8:])),
                  dtype=dtype, device=DEVICES[0], load_format=load_format, num_blocks=2048, max_model_len=4096)
    ok = True
    # Closed at the end, so the next check's engines find this one's GPU memory free.
    with offline, LocalCluster(config) as cluster:
        for case, kw in CASES.items():
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw)
            want = [o.outputs[0].token_ids for o in offline.generate(PROMPTS, params)]
            got = []
            for p in PROMPTS:
                body = {"prompt": p, "max_tokens": max_tokens, "ignore_eos": True, "logprobs": 0, **kw}
                r = httpx.post(cluster.url + "/v1/completions", json=body, timeout=120).json()
                got.append(r["choices"][0]["logprobs"]["tokens"])
            # Compare token texts (the API returns tokens as text): decode the offline ids the same way.
            tok = offline.tokenizer
            want_text = [[tok.decode([t], skip_special_tokens=False) for t in ids] for ids in want]
            same = sum(g == w for g, w in zip(got, want_text))
            print(f"{name} {case}: {same}/{len(PROMPTS)} prompts token-for-token equal to the offline engine")
            for g, w, prompt in zip(got, want_text, PROMPTS):
                if g != w:  # where do they part, and was the offline engine's pick a near-tie there?
                    i = next(k for k, (a, b) in enumerate(zip(g, w)) if a != b)
                    alone = offline.generate([prompt], SamplingParams(max_tokens=i + 1, ignore_eos=True, logprobs=2,
                                                                      **kw))[0].outputs[0]
                    top = sorted(alone.logprobs[i].top.values(), reverse=True)
                    print(f"  parts at token {i}: top-2 logprob gap there {top[0] - top[1]:.4f} "
                          f"(offline alone picks {'the same' if alone.token_ids[i] == want[PROMPTS.index(prompt)][i] else 'differently'})")
            ok &= same == len(PROMPTS)
        # n=3 (seeded): choices 1 and 2 fork choice 0 on its decode node (a block copy on the
        # device), each equal to one request seeded seed + i.
        kw = CASES["seeded"]
        body = {"prompt": PROMPTS[0], "max_tokens": max_tokens, "ignore_eos": True, "n": 3, **kw}
        r = httpx.post(cluster.url + "/v1/completions", json=body, timeout=120).json()
        got_n = [c["text"] for c in sorted(r["choices"], key=lambda c: c["index"])]
        want_n = [offline.generate([PROMPTS[0]], SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                                                 **{**kw, "seed": kw["seed"] + i}))[0].outputs[0].text
                  for i in range(3)]
        same_n = sum(g == w for g, w in zip(got_n, want_n))
        print(f"{name} n=3 seeded: {same_n}/3 choices equal to single requests seeded s, s+1, s+2")
        ok &= same_n == 3
        stats = httpx.get(cluster.url + "/cluster").json()["nodes"]
        decode = next(n for n in stats if n["role"] == "decode")
        print(f"{name}: decode node kv_transfer {json.dumps(decode['kv_transfer'])}")
    return ok


def main() -> int:
    big = os.path.join(tempfile.mkdtemp(), "llama-3-8b")
    make_model(big, "llama-3-8b", with_weights=False)
    ok = check("tiny-fp32", "builtin:tiny", "float32", "auto", 32)
    if DEVICES[0] != "cpu" and not os.environ.get("SKIP_BIG"):
        ok &= check("llama3-8b-shape-bf16", big, "bfloat16", "dummy", 32)
    print("ALL EQUAL" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
