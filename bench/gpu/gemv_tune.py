"""The fused decode GEMVs (kernels/gemv.py) against the unfused path, at Llama-3-8B shapes.

    PYTHONPATH=. python bench/gpu/gemv_tune.py [--budget-s 90] [--layers 16] [--batches 1,2,4,8]
    TRITON_INTERPRET=1 PYTHONPATH=. python bench/gpu/gemv_tune.py --dry-run   # CPU: tiny shapes, logic only
    PYTHONPATH=. python bench/gpu/gemv_tune.py --compile-only   # CPU: every shape through ptxas for sm_90

One H200, bf16, batch 1/2/4/8, the four projections of a decode step:

    qkv      4096 -> 6144   residual add + RMSNorm + GEMV   vs  norm kernel + cuBLAS
    o        4096 -> 4096   GEMV                            vs  cuBLAS
    gate_up  4096 -> 28672  residual add + RMSNorm + GEMV   vs  norm kernel + cuBLAS
    down    14336 -> 4096   SiLU-and-mul + GEMV             vs  SiLU kernel + cuBLAS

Every time is a CUDA-graph replay of one call per layer over `--layers` distinct weight
copies (as a decode step runs them: no launch overhead, no weight left in L2 from the call
before), divided by the layers. cuBLAS is timed both ways (x @ W^T and W @ x^T) and the
faster kept, as the engine does. Bandwidth = weight bytes / time, and its fraction of the
device copy rate (torch copy of 2 GiB, bytes read + written, as engine_smoke.py counts it).

Phase 1: each fused kernel in the launch shapes of kernels.gemv.CANDIDATES is checked
against its torch reference and timed against the unfused pair. Phase 2, while the time budget lasts: a wider
sweep of launch shapes on the plain GEMV (all shapes), then its best few per row bucket
with each kind's prologue. A shape that fails to compile or to check is reported and
skipped. Prints a table per phase; writes $OUT/gemv_tune.json (also when the budget ends
early). Imports on a CPU-only machine (`python -c "import bench.gpu.gemv_tune"`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

if "--dry-run" in sys.argv:  # the kernels run in Triton's interpreter, which must be chosen before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from kernels.activation import silu_and_mul  # noqa: E402
from kernels.gemv import (CANDIDATES, GemvConfig, gemv_ref, gemv_triton, rms_norm_gemv_ref,  # noqa: E402
                          rms_norm_gemv_triton, row_bucket, silu_mul_gemv_ref, silu_mul_gemv_triton)
from bench.gpu.timing import graph_time  # noqa: E402
from kernels.norm import fused_add_rms_norm  # noqa: E402


SHAPES: dict[str, tuple[int, int, str]] = {}  # the shapes this run measures (KINDS, or tiny ones in a dry run)


def kinds(hidden: int, qkv: int, inter: int) -> dict[str, tuple[int, int, str]]:
    """name -> (K of the product, N, prologue)."""
    return {"qkv": (hidden, qkv, "add_norm"), "o": (hidden, hidden, "plain"),
            "gate_up": (hidden, 2 * inter, "add_norm"), "down": (inter, hidden, "silu")}


KINDS = kinds(4096, 6144, 14336)  # Llama-3-8B
BATCHES = (1, 2, 4, 8)
EPS = 1e-5

# Phase 2's grid, most promising first (the budget may end it): tl.dot form (rows padded to
# 16, W loads pipelined over num_stages), broadcast-and-sum form (small BLOCK_N, long K steps).
SWEEP = ([GemvConfig(bn, bk, 4, ns, True) for bn, bk, ns in itertools.product((16, 32, 64), (128, 256), (3, 4, 5))] +
         [GemvConfig(bn, bk, nw, 1, False) for bn, bk, nw in itertools.product((4, 8, 16), (512, 1024), (4, 8))] +
         [GemvConfig(8, 512, 4, 2, False), GemvConfig(16, 256, 8, 4, True), GemvConfig(32, 256, 8, 3, True)])


RESERVE_S = 20.0  # of the budget, for phase 2's second half (prologues on the best plain shapes)


def fits(cfg: GemvConfig, rows: int) -> bool:
    """The broadcast form holds BLOCK_M x BLOCK_N x BLOCK_K float32 products in registers:
    skip shapes past ~128 a thread (they spill, and compile slowly)."""
    return cfg.use_dot or row_bucket(rows) * cfg.block_n * cfg.block_k <= 128 * 32 * cfg.num_warps


class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def copy_rate(dev: torch.device) -> float:
    """Bytes/s of a 2 GiB device copy, read + written (engine_smoke.py's copy_bandwidth)."""
    a = torch.empty(1 << (31 if dev.type == "cuda" else 24), dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    return 2 * a.numel() / graph_time(lambda i: b.copy_(a), 1)


class Case:
    """One projection at one batch: weights, inputs, the reference, and its timed paths."""

    def __init__(self, kind: str, batch: int, weights: list[torch.Tensor], norm_w: torch.Tensor):
        self.kind, self.batch, self.weights, self.norm_w = kind, batch, weights, norm_w
        k, n, self.prologue = SHAPES[kind]
        dev = weights[0].device
        in_k = 2 * k if self.prologue == "silu" else k
        self.x = torch.randn(batch, in_k, device=dev, dtype=torch.bfloat16)
        self.r = torch.randn(batch, k, device=dev, dtype=torch.bfloat16) * 4
        self.weight_bytes = n * k * 2

    def reference(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = self.weights[0]
        if self.prologue == "add_norm":
            return rms_norm_gemv_ref(self.x, self.r, self.norm_w, EPS, w)
        if self.prologue == "silu":
            return silu_mul_gemv_ref(self.x, w), None
        return gemv_ref(self.x, w), None

    def fused(self, cfg: GemvConfig, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = self.weights[i]
        if self.prologue == "add_norm":
            return rms_norm_gemv_triton(self.x, self.r, self.norm_w, EPS, w, config=cfg)
        if self.prologue == "silu":
            return silu_mul_gemv_triton(self.x, w, config=cfg), None
        return gemv_triton(self.x, w, config=cfg), None

    def plain(self, cfg: GemvConfig, i: int) -> torch.Tensor:
        """The GEMV alone on an activation of the kind's K (phase 2's sweep)."""
        return gemv_triton(self.r, self.weights[i], config=cfg)

    def prologue_kernel(self) -> None:
        if self.prologue == "add_norm":
            fused_add_rms_norm(self.x, self.r, self.norm_w, EPS)
        elif self.prologue == "silu":
            silu_and_mul(self.x)

    def cublas(self, i: int, flipped: bool, x: torch.Tensor) -> torch.Tensor:
        w = self.weights[i]
        return torch.mm(w, x.t()) if flipped else x @ w.t()

    def unfused_times(self) -> dict:
        """Seconds per call: prologue kernel, cuBLAS both ways, and prologue + faster cuBLAS."""
        L = len(self.weights)
        act = self.r if self.prologue != "plain" else self.x  # the matmul's input shape (T, K)
        out = {"cublas_xWt": graph_time(lambda i: self.cublas(i, False, act), L)}
        if self.batch == 1:
            out["cublas_Wxt"] = graph_time(lambda i: self.cublas(i, True, act), L)
        flipped = out.get("cublas_Wxt", 1e9) < out["cublas_xWt"] * 0.97  # the engine's rule
        if self.prologue == "plain":
            out["unfused"] = min(out.values())
            return out
        out["prologue"] = graph_time(lambda i: self.prologue_kernel(), L)

        def both(i: int) -> None:
            self.prologue_kernel()
            self.cublas(i, flipped, act)
        out["unfused"] = graph_time(both, L)
        return out


def check(case: Case, cfg: GemvConfig, want: tuple) -> float:
    got, got_res = case.fused(cfg, 0)
    err = float((got.float() - want[0].float()).norm() / want[0].float().norm())
    if want[1] is not None and not torch.equal(got_res, want[1]):
        raise AssertionError("residual sum differs from the reference")
    return err


def run_config(case: Case, cfg: GemvConfig, want: tuple, plain: bool = False) -> dict:
    row = {"config": str(cfg)}
    try:
        t0 = time.perf_counter()
        if plain:
            got = case.plain(cfg, 0)
            ref = gemv_ref(case.r, case.weights[0])
            row["rel_error"] = float((got.float() - ref.float()).norm() / ref.float().norm())
        else:
            row["rel_error"] = check(case, cfg, want)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        row["first_call_s"] = time.perf_counter() - t0  # mostly the compile
        if not row["rel_error"] < 1e-2:
            row["failed"] = f"relative error {row['rel_error']:.3g}"
            return row
        fn = (lambda i: case.plain(cfg, i)) if plain else (lambda i: case.fused(cfg, i))
        row["us"] = graph_time(fn, len(case.weights)) * 1e6
    except Exception as e:  # does not compile (registers, shared memory) or fails its check
        row["failed"] = repr(e)[:160]
    return row


def compile_only(arch: int = 90) -> None:
    """Pre-flight without a GPU: every launch shape the engine or the sweep may take, at each
    prologue and row bucket, compiled for sm_`arch` with Triton's bundled ptxas, specialised as
    the JIT specialises the 8B shapes (16-byte aligned pointers, sizes and strides multiples of
    16, one row a constant); prints registers, spill stack and shared memory per thread block."""
    import re
    import subprocess
    import tempfile

    import triton
    import triton.backends.nvidia
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.gemv import _gemv_kernel

    cuobjdump = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    names = _gemv_kernel.arg_names
    ints = ("M", "N", "K", "sxm", "srm", "swn", "som")
    aligned = ("x_ptr", "r_ptr", "nw_ptr", "w_ptr", "b_ptr", "out_ptr", "res_ptr") + ints[1:]
    jobs = {(p, b, cfg) for b, cfgs in CANDIDATES.items() for cfg in cfgs for p in (0, 1, 2, 3)}
    jobs |= {(0, b, cfg) for b in BATCHES for cfg in SWEEP if fits(cfg, b)}
    failed = 0
    for prologue, rows, cfg in sorted(jobs, key=lambda j: (j[1], str(j[2]), j[0])):
        k = KINDS["down" if prologue == 3 else "o"][0]
        const = dict(PROLOGUE=prologue, HAS_BIAS=False, BLOCK_M=16 if cfg.use_dot else row_bucket(rows),
                     BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NORM_BLOCK=min(triton.next_power_of_2(k), 8192),
                     EVEN=True, USE_DOT=cfg.use_dot, DOT_PREC="tf32", EMULATE=False)
        if rows == 1:
            const["M"] = 1
        sig = {n: ("*bf16" if n.endswith("_ptr") else "fp32" if n == "eps" else "i32") for n in names}
        sig.update({n: "constexpr" for n in const})
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        label = f"prologue {prologue} rows {rows} {cfg}"
        try:
            t0 = time.perf_counter()
            kernel = triton.compile(ASTSource(_gemv_kernel, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                                    options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            took = time.perf_counter() - t0
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(kernel.asm["cubin"])
                f.flush()
                usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
            m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
            regs, stack = m.groups() if m else ("?", "?")
            print(f"{label:<44} {took:5.1f} s  regs {regs:>3}  spill stack {stack:>3} B  "
                  f"shared {kernel.metadata.shared / 1024:5.1f} KiB", flush=True)
        except Exception as e:
            failed += 1
            print(f"{label:<44} FAILED {repr(e)[:200]}", flush=True)
    print(f"{len(jobs) - failed} of {len(jobs)} compiled")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-s", type=float, default=90.0,
                    help="stop sweeping after this long from the start (phase 1 always runs whole)")
    ap.add_argument("--layers", type=int, default=16, help="distinct weight copies per projection (L2 defeat)")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, Triton's interpreter, tiny shapes, two sweep shapes: checks this script's logic")
    ap.add_argument("--compile-only", action="store_true",
                    help="no GPU needed: compile every launch shape for sm_90 and report registers and spills")
    args = ap.parse_args()
    if args.compile_only:
        return compile_only()
    budget = Budget(args.budget_s)
    torch.manual_seed(0)
    global SHAPES, SWEEP, CANDIDATES
    if args.dry_run:
        SHAPES = kinds(64, 96, 80)
        SWEEP = [GemvConfig(16, 32, 4, 2, True), GemvConfig(8, 64, 4, 1, False)]
        CANDIDATES = {b: c[:2] for b, c in CANDIDATES.items()}
        args.layers = 2
        dev = torch.device("cpu")
    else:
        SHAPES = KINDS
        dev = torch.device("cuda")
    copy_bps = copy_rate(dev)
    batches = [int(b) for b in args.batches.split(",")]
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (dry run)"
    result = {"gpu": gpu, "copy_GBps": copy_bps / 1e9, "layers": args.layers,
              "phase1": {}, "phase2_plain": {}, "phase2": {}}
    out_dir = os.environ.get("OUT")

    def save() -> None:
        if out_dir:
            with open(os.path.join(out_dir, "gemv_tune.json"), "w") as f:
                json.dump(result, f, indent=2)

    weights = {kind: [torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5 for _ in range(args.layers)]
               for kind, (k, n, _) in SHAPES.items()}
    hidden = SHAPES["o"][0]
    norm_w = (1 + 0.1 * torch.randn(hidden, device=dev)).to(torch.bfloat16)
    cases = {(kind, b): Case(kind, b, weights[kind], norm_w) for kind in SHAPES for b in batches}
    print(f"{result['gpu']}: copy {copy_bps / 1e9:.0f} GB/s (read + written); {args.layers} weight copies per shape")

    def describe(case: Case, row: dict) -> str:
        if "us" not in row:
            return f"{row['config']:<22} FAILED {row.get('failed', '')}"
        gbps = case.weight_bytes / (row["us"] / 1e6) / 1e9
        return f"{row['config']:<22} {row['us']:8.2f} us {gbps:6.0f} GB/s {gbps * 1e9 / copy_bps:5.2f} of copy"

    # --- phase 1: the engine's candidates -------------------------------------------------
    print("\nphase 1: fused kernel in the engine's candidate shapes vs unfused (us per call)")
    print(f"{'kind':<8}{'rows':>5}{'unfused':>9}{'(cuBLAS':>9}{'+ prol.)':>9}{'best fused':>11}{'speed-up':>9}"
          f"{'GB/s':>7}{'of copy':>8}  best config / errors")
    for (kind, b), case in cases.items():
        want = case.reference()
        unf = {k: v * 1e6 for k, v in case.unfused_times().items()}
        rows = [run_config(case, cfg, want) for cfg in CANDIDATES.get(b, ())]
        ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        best = ok[0] if ok else None
        entry = result["phase1"][f"{kind}@{b}"] = {"unfused_us": unf, "fused": rows,
                                                   "weight_bytes": case.weight_bytes}
        cub = min(v for k, v in unf.items() if k.startswith("cublas"))
        if best:
            gbps = case.weight_bytes / (best["us"] / 1e6) / 1e9
            entry.update(best=best["config"], speedup=unf["unfused"] / best["us"], fused_GBps=gbps,
                         fused_fraction_of_copy=gbps * 1e9 / copy_bps,
                         cublas_fraction_of_copy=case.weight_bytes / (cub / 1e6) / copy_bps)
            print(f"{kind:<8}{b:>5}{unf['unfused']:>9.2f}{cub:>9.2f}{unf.get('prologue', 0):>9.2f}"
                  f"{best['us']:>11.2f}{entry['speedup']:>9.3f}{gbps:>7.0f}{entry['fused_fraction_of_copy']:>8.2f}"
                  f"  {best['config']}  max err {max(r['rel_error'] for r in ok):.1e}")
        else:
            print(f"{kind:<8}{b:>5}{unf['unfused']:>9.2f}{cub:>9.2f}{unf.get('prologue', 0):>9.2f}"
                  f"{'-':>11}  all candidates failed: {[r.get('failed') for r in rows]}")
        for r in rows:
            if "us" not in r:
                print(f"    {describe(case, r)}")
        save()
    step_saved = sum((e["unfused_us"]["unfused"] - min(r["us"] for r in e["fused"] if "us" in r)) * 32
                     for key, e in result["phase1"].items() if key.endswith("@1") and "best" in e
                     and e["speedup"] > 1.0)
    result["batch1_step_us_saved_estimate"] = step_saved
    print(f"\nbatch 1: fused kernels where faster would save ~{step_saved:.0f} us per 32-layer step "
          "(plus the graph gaps of the kernels removed)")
    save()

    # --- phase 2: wider sweep, plain GEMV on every shape, then prologues -----------------
    print(f"\nphase 2: sweep of {len(SWEEP)} launch shapes, plain GEMV ({budget.left():.0f} s of budget left)")
    for b in batches:
        scores: dict[str, list[float]] = {}
        by_name = {str(c): c for c in SWEEP}
        for cfg in SWEEP:
            if budget.left() < RESERVE_S:  # keep time for the best shapes with their prologues
                break
            if not fits(cfg, b):
                continue
            for kind in SHAPES:
                row = run_config(cases[(kind, b)], cfg, (None, None), plain=True)
                result["phase2_plain"].setdefault(f"{kind}@{b}", []).append(row)
                if "us" in row:
                    scores.setdefault(str(cfg), []).append(row["us"] / cases[(kind, b)].weight_bytes)
                else:
                    scores.pop(str(cfg), None)
                    break
        # rank by time summed over the shapes, in weight-byte units (the 8B step's mix)
        ranked = sorted((sum(v), name) for name, v in scores.items() if len(v) == len(SHAPES))
        if not ranked:
            print(f"rows {b}: no launch shape timed on every shape (budget spent, or all failed)")
            break
        print(f"rows {b}: best plain GEMV shapes (sum over the 4 shapes of us per byte):")
        for kind in SHAPES:
            rows = sorted((r for r in result["phase2_plain"][f"{kind}@{b}"] if "us" in r), key=lambda r: r["us"])
            if rows:
                print(f"  {kind:<8} best {describe(cases[(kind, b)], rows[0])}")
        top = [by_name[name] for _, name in ranked[:3]]
        result.setdefault("phase2_top", {})[b] = [str(c) for c in top]
        for kind in SHAPES:
            if budget.left() < 0:
                break
            case = cases[(kind, b)]
            want = case.reference()
            rows = [run_config(case, cfg, want) for cfg in top]
            result["phase2"][f"{kind}@{b}"] = rows
            unf = result["phase1"][f"{kind}@{b}"]["unfused_us"]["unfused"]
            for r in rows:
                tail = f"  speed-up {unf / r['us']:.3f}" if "us" in r else ""
                print(f"  {kind:<8} fused {describe(case, r)}{tail}")
        save()
    result["elapsed_budget_left_s"] = budget.left()
    save()
    print("\nCANDIDATES in kernels/gemv.py are what the engine tries at start: update them from the best "
          "phase-2 shapes per row bucket.")


if __name__ == "__main__":
    main()
