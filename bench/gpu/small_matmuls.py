"""A decode step's weight products at 1 and 16 rows, every way we can launch them, with the
weights out of L2: which one streams a weight nearest the HBM rate?

    PYTHONPATH=. python bench/gpu/small_matmuls.py      # -> $OUT/small_matmuls.json

At batch 1, qkv_proj and o_proj stream at 3.1-3.3 TB/s against 4.1-4.5 for gate_up, down
and lm_head (bench/results/2026-12-01-h200, the profile): about 0.2 ms of a 4.6 ms step.
Each variant is timed as a CUDA-graph replay over 16 distinct copies of the weight (16 x
33-235 MB: nothing stays in the 50 MB L2), per call: x @ W^T and W @ x^T through cuBLAS
(the engine's choice today, tuned per shape at start), the same with cuBLASLt preferred and
with reduced-precision split-K reductions disallowed, and kernels/gemv.py's Triton GEMV in
a few launch shapes. Prints GB/s against the copy rate measured in the same run.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from bench.gpu.engine_smoke import copy_bandwidth
from bench.gpu.timing import graph_time
from kernels.gemv import GemvConfig, gemv_triton

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
COPIES = 16
TRITON = [GemvConfig(32, 256, 4, 5, True), GemvConfig(32, 256, 4, 4, True), GemvConfig(64, 256, 4, 4, True),
          GemvConfig(16, 512, 4, 4, True), GemvConfig(8, 1024, 4, 1, False), GemvConfig(16, 512, 8, 3, True)]


def main() -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    bw = copy_bandwidth("cuda")
    print(f"copy {bw / 1e9:.0f} GB/s (read + written)")
    result: dict = {"copy_GBps": bw / 1e9, "cases": {}}
    for name, (n, k) in SHAPES.items():
        weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5 for _ in range(COPIES)]
        nbytes = n * k * 2
        for rows in (1, 16):
            x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
            ref = F.linear(x, weights[0]).float()
            variants = {"cublas x@W^T": lambda i: F.linear(x, weights[i])}
            if rows == 1:
                variants["cublas W@x^T"] = lambda i: torch.mm(weights[i], x.t())
            for cfg in TRITON:
                variants[f"triton {cfg}"] = lambda i, cfg=cfg: gemv_triton(x, weights[i], config=cfg)
            row = {}
            for label, fn in variants.items():
                try:
                    err = float((fn(0).float().view_as(ref) - ref).norm() / ref.norm())
                    row[label] = {"us": graph_time(lambda i: fn(i % COPIES), COPIES, replays=7) * 1e6, "rel_error": err}
                except Exception as e:  # a launch shape that does not compile
                    row[label] = {"failed": repr(e)[:120]}
            for label, setting in (("cublaslt x@W^T", "lt"), ("cublas x@W^T, fp32 split-K reductions", "no_reduced")):
                before_lib = torch.backends.cuda.preferred_blas_library()
                before_red = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
                try:
                    if setting == "lt":
                        torch.backends.cuda.preferred_blas_library("cublaslt")
                    else:
                        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
                    row[label] = {"us": graph_time(lambda i: F.linear(x, weights[i % COPIES]), COPIES, replays=7) * 1e6}
                except Exception as e:
                    row[label] = {"failed": repr(e)[:120]}
                finally:
                    torch.backends.cuda.preferred_blas_library(before_lib)
                    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = before_red
            for r in row.values():
                if "us" in r:
                    r["GBps"] = nbytes / (r["us"] * 1e-6) / 1e9
                    r["fraction_of_copy"] = r["GBps"] * 1e9 / bw
            result["cases"][f"{name}@{rows}"] = row
            best = sorted((r["us"], label) for label, r in row.items() if "us" in r)
            print(f"{name:>8} rows {rows:>2} ({nbytes / 2**20:.0f} MiB): " + "; ".join(
                f"{label} {us:.1f} us ({nbytes / us / 1e3:.0f} GB/s)" for us, label in best[:5]), flush=True)
        del weights
        torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "small_matmuls.json"), "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
