"""What the first sampled step after a node starts costs, with and without the sampler's
warm-up at start (Sampler(..., vocab_size)): Triton compiles a kernel variant for each
vocabulary size class on first use, and a step that waits for that waits seconds.

    PYTHONPATH=. python bench/gpu/first_sample.py [--vocab 128256] [--batch 64]

Each variant runs in a fresh process with an empty Triton cache (TRITON_CACHE_DIR), as on
a machine's first start: the sampler's construction, then its first and second call over
(batch, vocab) logits sampled with temperature 0.8, top_p 0.95 and min_p 0.05. Writes
$OUT/first_sample.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r'''
import json, sys, time
import torch
from engine.sampler import Sampler, SamplingRow
from engine.sampling_params import SamplingParams
vocab, batch, warm = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
torch.zeros(1, device="cuda")
t = time.perf_counter()
sampler = Sampler(batch, "cuda", vocab_size=vocab if warm else None)
torch.cuda.synchronize()
init = time.perf_counter() - t
logits = torch.randn(batch, vocab, device="cuda") * 3
params = SamplingParams(temperature=0.8, top_p=0.95, min_p=0.05)
calls = []
for step in range(3):
    rows = [SamplingRow(params, i, [1, 2], [3] * step) for i in range(batch)]
    t = time.perf_counter()
    sampler.sample(logits, rows).resolve()
    calls.append(time.perf_counter() - t)
print(json.dumps({"init_s": init, "calls_ms": [c * 1e3 for c in calls]}))
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=128_256)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    out = {"vocab": args.vocab, "batch": args.batch}
    for label, warm in (("no_warm_up", "0"), ("warm_up", "1")):
        env = {**os.environ, "TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="triton-cold-")}
        done = subprocess.run([sys.executable, "-c", CHILD, str(args.vocab), str(args.batch), warm], env=env,
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        out[label] = json.loads(done.stdout.strip().splitlines()[-1])
        r = out[label]
        print(f"{label:>10}: sampler start {r['init_s']:.2f} s, first call {r['calls_ms'][0]:.1f} ms, "
              f"then {r['calls_ms'][1]:.2f} / {r['calls_ms'][2]:.2f} ms", flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "first_sample.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
