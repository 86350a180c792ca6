"""The sampler's Triton kernels beside their torch references, on the device alone:
min_p/top_p (kernels/sampling_filters.py) against the sort, and the exponential race
(kernels/sampling.py) against its ~20 elementwise kernels, and the draw with top_p at once
(draw_filtered_triton) against filtering then drawing. Also whether they agree: how
many rows keep other tokens than the reference, by how many tokens at most (float
rounding at the cut: the reference's cumsum and the kernel's sums add in other orders).

    PYTHONPATH=. python bench/gpu/sampler_kernels.py [--batch-sizes 1,16,64,128] [--vocab 128256]

Rows of two kinds: logits*3 (as sampler_cost.py: a few thousand tokens in top_p 0.95)
and logits*0.3 (flat, as random weights give: most of the vocabulary in the nucleus).
Median of CUDA-event timings. Writes $OUT/sampler_kernels.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from kernels.sampling import exponential_race_ref, exponential_race_triton
from kernels.sampling_filters import draw_filtered_triton, filter_ref, filter_triton


def device_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", default="1,16,64,128")
    ap.add_argument("--vocab", type=int, default=128_256)
    args = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(0), "vocab": args.vocab, "filter": [], "race": []}
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        for kind, scale in (("peaked", 3.0), ("flat", 0.3)):
            g = torch.Generator(device="cuda").manual_seed(bs)
            x = torch.randn(bs, args.vocab, device="cuda", generator=g) * scale
            rows = list(range(bs))
            for name, min_p, top_p in (("top_p", [0.0] * bs, [0.95] * bs), ("min_p+top_p", [0.05] * bs, [0.95] * bs)):
                want = x.clone()
                filter_ref(want, rows, min_p, top_p)
                ref_ms = device_ms(lambda: filter_ref(x.clone(), rows, min_p, top_p))
                clone_ms = device_ms(lambda: x.clone())
                got = x.clone()
                filter_triton(got, rows, min_p, top_p)
                differ = (got.isinf() != want.isinf()).sum(dim=-1)                          # tokens per row
                ker_ms = device_ms(lambda: filter_triton(x.clone(), rows, min_p, top_p)) - clone_ms
                row = {"batch": bs, "rows": kind, "filter": name, "ref_ms": ref_ms - clone_ms, "kernel_ms": ker_ms,
                       "kept_mean": float(torch.isfinite(want).sum(dim=-1).float().mean()),
                       "rows_differing": int((differ > 0).sum()), "most_tokens_differing": int(differ.max())}
                print(f"batch {bs:>3} {kind:>6} {name:>11}: ref {row['ref_ms']:.3f} ms, kernel {ker_ms:.3f} ms "
                      f"({row['ref_ms'] / ker_ms:.1f}x), kept ~{row['kept_mean']:.0f}, rows differing "
                      f"{row['rows_differing']} (by at most {row['most_tokens_differing']} tokens)", flush=True)
                out["filter"].append(row)
            seeds, steps = list(range(bs)), [7] * bs
            drawn = exponential_race_triton(x, seeds, steps).tolist()
            same = drawn == exponential_race_ref(x, seeds, steps).tolist()
            same_cpu = drawn == exponential_race_ref(x.cpu(), seeds, steps).tolist()
            ref_ms = device_ms(lambda: exponential_race_ref(x, seeds, steps))
            ker_ms = device_ms(lambda: exponential_race_triton(x, seeds, steps))
            out["race"].append({"batch": bs, "rows": kind, "ref_ms": ref_ms, "kernel_ms": ker_ms, "same_tokens": same,
                                "same_tokens_as_cpu": same_cpu})
            print(f"batch {bs:>3} {kind:>6}        race: ref {ref_ms:.3f} ms, kernel {ker_ms:.3f} ms "
                  f"({ref_ms / ker_ms:.1f}x), same tokens {same} (as the CPU's {same_cpu})", flush=True)
            # Filter and draw: apart (the two kernels) against at once (the first draw stands
            # where top_p keeps it), for top_p 0.95 and for a narrow top_p 0.5.
            for top_p_value in (0.95, 0.5):
                top_p = [top_p_value] * bs
                min_p = [0.0] * bs

                def apart():
                    y = x.clone()
                    filter_triton(y, rows, min_p, top_p)
                    return exponential_race_triton(y, seeds, steps)
                same = torch.equal(apart(), draw_filtered_triton(x.clone(), rows, min_p, top_p, seeds, steps))
                apart_ms = device_ms(apart) - clone_ms
                once_ms = device_ms(lambda: draw_filtered_triton(x.clone(), rows, min_p, top_p, seeds, steps)) - clone_ms
                out.setdefault("draw", []).append({"batch": bs, "rows": kind, "top_p": top_p_value, "apart_ms": apart_ms,
                                                   "at_once_ms": once_ms, "same_tokens": same})
                print(f"batch {bs:>3} {kind:>6} draw top_p {top_p_value}: filter then race {apart_ms:.3f} ms, at once "
                      f"{once_ms:.3f} ms ({apart_ms / once_ms:.2f}x), same tokens {same}", flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "sampler_kernels.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
