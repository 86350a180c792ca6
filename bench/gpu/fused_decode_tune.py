"""The fused decode-attention kernel (kernels/fused_decode.py) on the GPU: checked against
the references at Llama-3-8B shapes, timed against the three launches it replaces, and
its launch shapes swept at small batch.

    PYTHONPATH=. python bench/gpu/fused_decode_tune.py [--sweep]  # -> $OUT/fused_decode_{tune,sweep}.json

Unfused = rope_and_write_kv (Triton) + paged_decode_attention (split kernel + reduction),
what a decode step ran per layer before. Both are timed as CUDA-graph replays of 32 calls
(one per layer), with the split count the engine's graphs use (sized for an 8,448-token
max_model_len), on 16-token blocks scattered through a large cache.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch

from bench.gpu.timing import graph_time
from kernels.attention import AttentionMetadata, choose_num_kv_splits, paged_attention_ref, paged_decode_attention_triton
from kernels.fused_decode import fused_decode_attention_triton
from kernels.rope import rope_and_write_kv_ref, rope_and_write_kv_triton, rope_cos_sin, rope_inv_freq

HQ, HKV, D, PAGE, LAYERS, MAX_MODEL_LEN = 32, 8, 128, 16, 32, 8448


def make_case(bs: int, ctx: int, cache: torch.Tensor, dev: torch.device):
    n_blocks = cache.shape[0]
    seq_lens = torch.tensor([ctx + (7 * i) % 64 for i in range(bs)], device=dev)
    width = (int(seq_lens.max()) + PAGE - 1) // PAGE
    table = torch.randperm(n_blocks, device=dev)[:bs * width].view(bs, width) if bs * width <= n_blocks \
        else torch.randint(0, n_blocks, (bs, width), device=dev)
    last = seq_lens - 1
    slots = table.gather(1, (last // PAGE)[:, None]).squeeze(1) * PAGE + last % PAGE
    qkv = torch.randn(bs, (HQ + 2 * HKV) * D, device=dev, dtype=torch.bfloat16)
    q, k, v = qkv.split([HQ * D, HKV * D, HKV * D], dim=-1)
    q, k, v = q.view(bs, HQ, D), k.view(bs, HKV, D), v.view(bs, HKV, D)
    inv = rope_inv_freq(D, 500000.0, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}, device=dev)
    cos, sin = rope_cos_sin(last, inv, torch.bfloat16)
    return seq_lens, table, slots, q, k, v, cos, sin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="also sweep the launch shapes at small batch (minutes)")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    n_blocks = 40000
    cache = torch.randn(n_blocks, 2, 2, PAGE, HKV, D, device=dev, dtype=torch.bfloat16)
    scale = D ** -0.5
    results: dict = {"checks": {}, "cases": {}, "sweep": {}}

    # Correctness at 8B shapes: output and the cache the step leaves behind.
    for bs, ctx in ((1, 1000), (64, 1000), (4, 8192), (256, 300)):
        seq_lens, table, slots, q, k, v, cos, sin = make_case(bs, ctx, cache, dev)
        splits = choose_num_kv_splits(bs, HKV, MAX_MODEL_LEN, PAGE)
        want_cache, got_cache = cache.clone(), cache.clone()
        rq, _ = rope_and_write_kv_ref(q, k, v, cos, sin, want_cache, 1, slots)
        meta = AttentionMetadata(list(range(bs + 1)), seq_lens.tolist(), table, slots, seq_lens, True)
        want = paged_attention_ref(rq, want_cache, 1, meta, scale)
        got = fused_decode_attention_triton(q, k, v, cos, sin, got_cache, 1, slots, table, seq_lens, scale, splits)
        again = fused_decode_attention_triton(q, k, v, cos, sin, got_cache, 1, slots, table, seq_lens, scale, splits)
        rel = float((got.double() - want.double()).norm() / want.double().norm())
        results["checks"][f"{bs}@{ctx}"] = {
            "splits": splits, "rel_error": rel, "cache_elements_differing": int((got_cache != want_cache).sum()),
            "second_call_equal": bool(torch.equal(got, again))}
        print(f"check bs {bs} ctx {ctx} splits {splits}: rel {rel:.2e}, cache diff "
              f"{results['checks'][f'{bs}@{ctx}']['cache_elements_differing']}, repeat equal "
              f"{results['checks'][f'{bs}@{ctx}']['second_call_equal']}", flush=True)
        del want_cache, got_cache

    def timings(bs, ctx, with_unfused=True, **launch):
        seq_lens, table, slots, q, k, v, cos, sin = make_case(bs, ctx, cache, dev)
        splits = launch.pop("splits", None) or choose_num_kv_splits(bs, HKV, MAX_MODEL_LEN, PAGE)

        def unfused(i):
            rq, _ = rope_and_write_kv_triton(q, k, v, cos, sin, cache, 1, slots)
            return paged_decode_attention_triton(rq, cache, 1, table, seq_lens, scale, splits)

        def fused(i):
            return fused_decode_attention_triton(q, k, v, cos, sin, cache, 1, slots, table, seq_lens, scale, splits,
                                                 **launch)
        kv_bytes = int(seq_lens.sum()) * HKV * D * 2 * 2
        tu = graph_time(unfused, LAYERS, replays=9) if with_unfused else None
        return splits, kv_bytes, tu, graph_time(fused, LAYERS, replays=9)

    for bs, ctx in ((1, 1024), (16, 1024), (64, 1024), (256, 1024), (1, 8192), (16, 8192), (64, 8192)):
        splits, kv_bytes, tu, tf = timings(bs, ctx)
        row = {"splits": splits, "unfused_us": tu * 1e6, "fused_us": tf * 1e6, "speedup": tu / tf,
               "fused_kv_GBps": kv_bytes / tf / 1e9, "saved_ms_per_32_layers": (tu - tf) * LAYERS * 1e3}
        results["cases"][f"{bs}@{ctx}"] = row
        print(f"bs {bs:>3} ctx {ctx:>5} splits {splits:>2}: unfused {tu * 1e6:6.2f} us, fused {tf * 1e6:6.2f} us "
              f"({tu / tf:.2f}x, {row['saved_ms_per_32_layers']:.3f} ms/step saved), KV {row['fused_kv_GBps']:.0f} GB/s",
              flush=True)

    # Launch shapes at small batch, where the step is latency-bound.
    for bs, ctx in ((1, 1024), (16, 1024), (1, 8192)) if args.sweep else ():
        rows = []
        for bn, nw, ns, splits in itertools.product((32, 64, 128), (2, 4, 8), (1, 2), (0, 4, 8, 16, 32)):
            launch = dict(block_n=bn, num_warps=nw, num_stages=ns)
            if splits:  # a split count other than the engine's, every split used
                launch.update(splits=splits, min_keys_per_split=PAGE)
            try:
                _, kv_bytes, _, tf = timings(bs, ctx, False, **launch)
            except Exception as e:  # shared memory: skip
                rows.append({**launch, "failed": repr(e)[:100]})
                continue
            rows.append({**launch, "us": tf * 1e6})
        ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        results["sweep"][f"{bs}@{ctx}"] = ok[:10]
        print(f"sweep bs {bs} ctx {ctx}: best", json.dumps(ok[:4]), flush=True)

    if os.environ.get("OUT"):
        name = "fused_decode_sweep.json" if args.sweep else "fused_decode_tune.json"
        with open(os.path.join(os.environ["OUT"], name), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
