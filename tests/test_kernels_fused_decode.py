"""The fused decode-attention kernel (rope + cache write + flash-decoding + in-kernel split
reduction) against the references it replaces: rope_and_write_kv_ref, then
paged_attention_ref. Runs under Triton's interpreter on CPU (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from kernels import fused_decode
from kernels.attention import AttentionMetadata, paged_attention_ref
from kernels.fused_decode import fused_decode_attention_triton, rope_write_and_attend
from kernels.rope import rope_and_write_kv_ref, rope_cos_sin, rope_inv_freq
from kernels.triton_utils import force_triton
from tests.test_kernels_attention import POISON_BLOCK, TOL, scattered_block_tables
from tests.test_kernels_elementwise import ulps_apart


def make_step(seq_lens, hq, hkv, d, block_size, dtype, seed, num_layers=2):
    """A decode step: a cache holding each sequence's first seq_len - 1 tokens, the new
    token's q/k/v as strided views of one fused projection, its cos/sin and its slot."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    cache = torch.randn(num_blocks, num_layers, 2, block_size, hkv, d, generator=gen).to(dtype)
    qkv = torch.randn(len(seq_lens), (hq + 2 * hkv) * d, generator=gen).to(dtype)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    s = len(seq_lens)
    q, k, v = q.view(s, hq, d), k.view(s, hkv, d), v.view(s, hkv, d)
    table = scattered_block_tables(seq_lens, block_size, num_blocks, gen)
    slots = torch.tensor([int(table[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size if n else -1
                          for i, n in enumerate(seq_lens)])
    positions = torch.tensor([max(n - 1, 0) for n in seq_lens])
    inv = rope_inv_freq(d, 500000.0, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 64})
    cos, sin = rope_cos_sin(positions, inv, dtype)
    meta = AttentionMetadata(query_start_loc=list(range(s + 1)), seq_lens=list(seq_lens), block_tables=table,
                             slot_mapping=slots, seq_lens_t=torch.tensor(seq_lens), decode_only=True,
                             max_query_len=1, max_seq_len=max(seq_lens))
    return q, k, v, cos, sin, cache, meta


def reference(q, k, v, cos, sin, cache, meta, layer, scale):
    cache = cache.clone()
    real = [i for i, n in enumerate(meta.seq_lens) if n > 0]
    q, _ = rope_and_write_kv_ref(q, k, v, cos, sin, cache, layer, meta.slot_mapping)
    out = torch.zeros_like(q)
    if real:
        sub = AttentionMetadata(list(range(len(real) + 1)), [meta.seq_lens[i] for i in real], meta.block_tables[real],
                                meta.slot_mapping[real], meta.seq_lens_t[real], True)
        out[real] = paged_attention_ref(q[real], cache, layer, sub, scale)
    return out, cache


CASES = [
    # (hq, hkv, d, block_size, seq_lens, num_kv_splits, dtype)
    (4, 4, 64, 16, [1, 16, 17, 40], 1, torch.float32),       # GQA 1, direct path, on/across block edges
    (8, 2, 64, 16, [33, 5, 64], 3, torch.float32),           # GQA 4, three splits
    (8, 1, 128, 8, [70, 1, 24], 4, torch.bfloat16),          # GQA 8, head dim 128, block size 8
    (4, 1, 64, 16, [3, 100], 8, torch.float16),              # more splits than a short sequence has blocks
    (6, 2, 64, 16, [31, 48, 16], 2, torch.float32),          # GQA 3 (not a power of two)
    (8, 2, 128, 16, [129, 2, 47], 5, torch.bfloat16),        # bf16, the new token first in its block
]


@pytest.mark.parametrize("hq,hkv,d,block_size,seq_lens,splits,dtype", CASES)
def test_fused_decode_matches_rope_write_then_attention(hq, hkv, d, block_size, seq_lens, splits, dtype):
    q, k, v, cos, sin, cache, meta = make_step(seq_lens, hq, hkv, d, block_size, dtype, seed=hq * 31 + d + splits)
    scale = d ** -0.5
    want, want_cache = reference(q, k, v, cos, sin, cache, meta, 1, scale)
    table = meta.block_tables.clone()
    for i, n in enumerate(seq_lens):  # the kernel must not follow the table's padding
        table[i, -(-n // block_size):] = POISON_BLOCK
    got = fused_decode_attention_triton(q, k, v, cos, sin, cache, 1, meta.slot_mapping, table, meta.seq_lens_t,
                                        scale, splits, min_keys_per_split=block_size)  # every split used
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])
    # The rotated k and v land where the reference puts them, rounded as it rounds; nothing else moves.
    assert ulps_apart(cache, want_cache) <= (0 if dtype == torch.float32 else 1)
    if dtype == torch.float32:
        torch.testing.assert_close(cache, want_cache, atol=1e-6, rtol=1e-6)


def test_padded_rows_write_nothing_and_give_zeros_and_counters_reset():
    """CUDA-graph padding: seq_len 0 and slot -1 rows produce zeros and touch no block; the
    arrival counters are back at zero after each call, so a second call (a graph replay)
    gives the same answer."""
    hq, hkv, d, bs = 4, 2, 64, 16
    seq_lens = [0, 37, 0, 16]
    q, k, v, cos, sin, cache, meta = make_step(seq_lens, hq, hkv, d, bs, torch.float32, seed=5)
    want, want_cache = reference(q, k, v, cos, sin, cache, meta, 0, d ** -0.5)
    table = meta.block_tables.clone().to(torch.int32)
    table[0] = table[2] = 1 << 30
    for splits in (1, 5):
        got_cache = cache.clone()
        for _ in range(2):
            out = torch.full_like(q, float("nan"))
            got = fused_decode_attention_triton(q, k, v, cos, sin, got_cache, 0, meta.slot_mapping.to(torch.int32),
                                                table, meta.seq_lens_t.to(torch.int32), d ** -0.5, splits, out=out,
                                                min_keys_per_split=1)
            assert got is out
            assert torch.equal(out[[0, 2]], torch.zeros_like(out[[0, 2]]))
            torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got_cache, want_cache, atol=1e-6, rtol=1e-6)
            assert int(fused_decode._COUNTERS[q.device][:len(seq_lens) * hkv].abs().sum()) == 0


def test_dispatch_cpu_reference_and_interpreted_kernel_agree():
    """What the model calls: the references on CPU tensors, the kernel when forced (the
    interpreter); both leave the same cache behind."""
    q, k, v, cos, sin, cache, meta = make_step([9, 20, 33], 8, 2, 64, 16, torch.float32, seed=11)
    meta.num_kv_splits = 3
    ref_cache, ker_cache = cache.clone(), cache.clone()
    ref = rope_write_and_attend(q, k, v, cos, sin, ref_cache, 1, meta, 0.125)
    want, want_cache = reference(q, k, v, cos, sin, cache, meta, 1, 0.125)
    assert torch.equal(ref, want) and torch.equal(ref_cache, want_cache)
    with force_triton():
        got = rope_write_and_attend(q, k, v, cos, sin, ker_cache, 1, meta, 0.125)
        unfused_cache = cache.clone()
        unfused = rope_write_and_attend(q, k, v, cos, sin, unfused_cache, 1, meta, 0.125, fused=False)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(unfused, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ker_cache, ref_cache, atol=1e-6, rtol=1e-6)


def test_mixed_batches_are_refused():
    q, k, v, cos, sin, cache, meta = make_step([9, 20], 4, 2, 64, 16, torch.float32, seed=2)
    meta.decode_only = False
    with pytest.raises(ValueError, match="decode-only"):
        rope_write_and_attend(q, k, v, cos, sin, cache, 0, meta, 0.125)
