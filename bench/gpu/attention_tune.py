"""Sweep the Triton decode-attention kernel's launch parameters on the GPU.

    PYTHONPATH=. python bench/gpu/attention_tune.py

For Llama-3-8B attention shapes (Hq 32, Hkv 8, D 128, bf16, 16-token blocks scattered
in a large cache) at several batch sizes and contexts: every (BLOCK_N, num_warps,
num_stages, num_kv_splits) in a small grid, timed as CUDA-graph replays of 32 calls
(one per layer, as in a decode step), reported as effective GB/s of KV read against a
plain read of the same number of bytes. Prints the best few per case; writes
$OUT/attention_tune.json.
"""

from __future__ import annotations

import itertools
import json
import os

import torch

from bench.gpu.timing import graph_time
from kernels.attention import _decode_attention, paged_decode_attention_triton

HQ, HKV, D, PAGE, LAYERS = 32, 8, 128, 16, 32


def main() -> None:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    n_blocks = 40000
    # One layer's worth of cache per block is what a decode step reads per layer; a
    # 2-layer cache keeps the per-layer stride of the real layout without 70 GB of memory.
    cache = torch.randn(n_blocks, 2, 2, PAGE, HKV, D, device=dev, dtype=torch.bfloat16)
    read_buf = torch.randn(1 << 30, device=dev, dtype=torch.bfloat16)
    # plain read rate: sum of a 2 GiB tensor
    t = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        read_buf.sum(dtype=torch.float32)
        b.record()
        b.synchronize()
        t.append(a.elapsed_time(b) / 1e3)
    read_gbps = read_buf.numel() * 2 / sorted(t)[2] / 1e9
    del read_buf
    cases = [(1, 1024), (1, 8192), (16, 1024), (64, 1024), (256, 1024), (16, 8192), (64, 8192)]
    grid = list(itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3)))
    results = {"read_GBps": read_gbps, "cases": {}}
    for bs, ctx in cases:
        seq_lens = torch.tensor([ctx + (7 * i) % 64 for i in range(bs)], device=dev)
        width = (int(seq_lens.max()) + PAGE - 1) // PAGE
        table = torch.randperm(n_blocks, device=dev)[:bs * width].view(bs, width) if bs * width <= n_blocks \
            else torch.randint(0, n_blocks, (bs, width), device=dev)
        q = torch.randn(bs, HQ, D, device=dev, dtype=torch.bfloat16)
        kv_bytes = int(seq_lens.sum()) * HKV * D * 2 * 2
        ref = _decode_attention(q, cache[:, 1, 0], cache[:, 1, 1], table, seq_lens, D ** -0.5)
        rows = []
        for (bn, nw, ns), splits in itertools.product(grid, (1, 2, 4, 8, 16, 32)):
            if splits * 256 > ctx * 2 and splits > 1:
                continue
            fn = lambda: paged_decode_attention_triton(q, cache, 1, table, seq_lens, D ** -0.5, splits,  # noqa: E731
                                                       block_n=bn, num_warps=nw, num_stages=ns)
            try:
                out = fn()
                if ref is not None:
                    err = float((out.float() - ref.float()).norm() / ref.float().norm())
                    if not err < 2e-2:
                        rows.append({"block_n": bn, "warps": nw, "stages": ns, "splits": splits, "error": err})
                        continue
                sec = graph_time(lambda i: fn(), LAYERS)
            except Exception as e:  # a config that does not compile (shared memory) is skipped
                rows.append({"block_n": bn, "warps": nw, "stages": ns, "splits": splits, "failed": repr(e)[:120]})
                continue
            rows.append({"block_n": bn, "warps": nw, "stages": ns, "splits": splits, "us": sec * 1e6,
                         "GBps": kv_bytes / sec / 1e9, "fraction_of_read": kv_bytes / sec / 1e9 / read_gbps})
        ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        default = next((r for r in ok if (r["block_n"], r["warps"], r["stages"]) == (64, 4, 2)), None)
        del ref
        results["cases"][f"{bs}@{ctx}"] = {"best": ok[:8], "default_64_4_2": [r for r in ok if (
            r["block_n"], r["warps"], r["stages"]) == (64, 4, 2)], "failed": [r for r in rows if "us" not in r][:5]}
        print(f"\nbatch {bs} ctx {ctx}: {kv_bytes / 1e6:.0f} MB of KV per layer, plain read {read_gbps:.0f} GB/s")
        for r in ok[:5]:
            print(f"  BLOCK_N {r['block_n']:>3} warps {r['warps']} stages {r['stages']} splits {r['splits']:>2}: "
                  f"{r['us']:8.1f} us  {r['GBps']:6.0f} GB/s  {r['fraction_of_read']:.2f} of read")
        if default:
            print(f"  (64,4,2) best split {default['splits']}: {default['us']:.1f} us {default['GBps']:.0f} GB/s")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "attention_tune.json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
