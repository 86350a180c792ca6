"""Triton paged attention (decode and prefill/extend) against the torch reference.

On a CPU-only machine these run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes are tiny; the GPU script checks the same kernels at 8B shapes.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels.attention import (AttentionMetadata, choose_num_kv_splits, paged_attention, paged_attention_ref,
                               paged_decode_attention, paged_decode_attention_triton,
                               paged_prefill_attention_triton)

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=1e-2, rtol=1e-2)}
POISON_BLOCK = 1 << 40  # table padding the kernels must never follow


def scattered_block_tables(seq_lens: list[int], block_size: int, num_blocks: int, gen: torch.Generator,
                           pad: int = 0) -> torch.Tensor:
    """Distinct, shuffled block ids per sequence (non-contiguous, out of order), one spare
    column of padding, padded with `pad` past each sequence's last block."""
    need = [-(-n // block_size) for n in seq_lens]
    assert sum(need) <= num_blocks, "test cache too small"
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.full((len(seq_lens), max(need, default=0) + 1), pad, dtype=torch.int64)
    at = 0
    for i, n in enumerate(need):
        table[i, :n] = perm[at:at + n]
        at += n
    return table


def make_case(seq_lens, query_lens, hq, hkv, d, block_size, dtype, seed, num_layers=2, index_dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    kv_cache = torch.randn(num_blocks, num_layers, 2, block_size, hkv, d, generator=gen).to(dtype)
    q = torch.randn(sum(query_lens), hq, d, generator=gen).to(dtype)
    table = scattered_block_tables(seq_lens, block_size, num_blocks, gen)
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    meta = AttentionMetadata(
        query_start_loc=qsl, seq_lens=list(seq_lens), block_tables=table.to(index_dtype),
        slot_mapping=torch.zeros(sum(query_lens), dtype=index_dtype),
        seq_lens_t=torch.tensor(seq_lens, dtype=index_dtype),
        decode_only=all(n == 1 for n in query_lens),
        query_start_loc_t=torch.tensor(qsl, dtype=torch.int32),
        max_query_len=max(query_lens, default=0), max_seq_len=max(seq_lens, default=0))
    return q, kv_cache, meta


# --- decode ----------------------------------------------------------------------------

DECODE_CASES = [
    # (hq, hkv, d, block_size, seq_lens, num_kv_splits, dtype)
    (4, 4, 64, 16, [1, 16, 17, 40], 1, torch.float32),        # GQA 1, on/across block edges, direct path
    (8, 2, 64, 16, [33, 5, 64], 3, torch.float32),            # GQA 4, three splits
    (8, 1, 128, 8, [70, 1, 24], 4, torch.bfloat16),           # GQA 8, head dim 128, block size 8
    (4, 1, 64, 16, [3, 100], 8, torch.float16),               # more splits than a short sequence has blocks
    (6, 2, 64, 16, [31, 48], 2, torch.float32),               # GQA 3 (not a power of two)
    (4, 2, 80, 16, [20, 45], 2, torch.float32),               # head dim 80: the reduce masks columns past it
]


@pytest.mark.parametrize("hq,hkv,d,block_size,seq_lens,splits,dtype", DECODE_CASES)
def test_decode_kernel_matches_reference(hq, hkv, d, block_size, seq_lens, splits, dtype):
    q, kv_cache, meta = make_case(seq_lens, [1] * len(seq_lens), hq, hkv, d, block_size, dtype,
                                  seed=hq * 100 + d + splits)
    scale = d ** -0.5
    ref = paged_attention_ref(q, kv_cache, 1, meta, scale)
    # The kernel must not follow the padding of the table: poison it.
    table = meta.block_tables.clone()
    for i, n in enumerate(seq_lens):
        table[i, -(-n // block_size):] = POISON_BLOCK
    out = torch.full_like(q, float("nan"))
    got = paged_decode_attention_triton(q, kv_cache, 1, table, meta.seq_lens_t, scale, splits, out=out,
                                        min_keys_per_split=block_size)  # every split used
    assert got is out
    torch.testing.assert_close(got.float(), ref.float(), **TOL[dtype])


def test_decode_kernel_padded_rows_give_zeros_and_int32_indices():
    """CUDA-graph padding: rows with seq_len 0 (and a table of poison) produce zeros, never
    NaN, with every split count, and the real rows are unaffected; int32 metadata works."""
    hq, hkv, d, bs = 4, 2, 64, 16
    seq_lens = [0, 37, 0, 16]
    q, kv_cache, meta = make_case(seq_lens, [1] * 4, hq, hkv, d, bs, torch.float32, seed=7)
    real = [1, 3]
    sub = AttentionMetadata([0, 1, 2], [seq_lens[i] for i in real], meta.block_tables[real], meta.slot_mapping[:2],
                            meta.seq_lens_t[real], True)
    ref = paged_attention_ref(q[real], kv_cache, 0, sub, d ** -0.5)
    table = meta.block_tables.clone().to(torch.int32)
    table[0] = table[2] = 1 << 30
    for splits in (1, 5):
        out = torch.full_like(q, float("nan"))
        paged_decode_attention_triton(q, kv_cache, 0, table, meta.seq_lens_t.to(torch.int32), d ** -0.5, splits, out=out,
                                      min_keys_per_split=1)
        assert torch.equal(out[[0, 2]], torch.zeros_like(out[[0, 2]]))
        torch.testing.assert_close(out[real], ref, **TOL[torch.float32])


def test_decode_dispatch_on_cpu_is_the_reference():
    q, kv_cache, meta = make_case([9, 20], [1, 1], 4, 2, 64, 16, torch.float32, seed=3)
    ref = paged_attention_ref(q, kv_cache, 0, meta, 0.125)
    assert torch.equal(paged_decode_attention(q, kv_cache, 0, meta.block_tables, meta.seq_lens_t, 0.125, 2), ref)
    assert torch.equal(paged_attention(q, kv_cache, 0, meta, 0.125), ref)


def test_choose_num_kv_splits_fills_the_gpu_without_tiny_splits():
    assert choose_num_kv_splits(256, 8, 1024, 16, sms=132) == 1
    assert choose_num_kv_splits(1, 8, 32, 16, sms=132) == 1              # short context: no split
    assert choose_num_kv_splits(1, 8, 8192, 16, sms=64) == math.ceil(2 * 64 / 8)
    assert choose_num_kv_splits(1, 8, 1024, 16, sms=132) == 1024 // 128  # no split under 128 keys
    assert choose_num_kv_splits(1, 1, 1 << 20, 16, sms=132) == 32        # capped


# --- prefill / extend (mixed batches) ------------------------------------------------------

PREFILL_CASES = [
    # (hq, hkv, d, block_size, [(seq_len, query_len), ...], block_m, dtype)
    # GQA 1: whole prompts on and across block edges, a prefix-cache hit, a decode row riding along
    (2, 2, 64, 16, [(16, 16), (37, 5), (17, 1), (40, 40)], 16, torch.float32),
    # GQA 4, block size 8: a chunk after earlier chunks, an empty chunk, a one-token prompt
    (8, 2, 64, 8, [(30, 11), (9, 0), (1, 1), (24, 8), (13, 13)], 16, torch.float32),
    # GQA 8, head dim 128, bfloat16, several query tiles per chunk
    (8, 1, 128, 16, [(48, 19), (5, 1), (33, 33)], 32, torch.bfloat16),
    # float16, GQA 4, the default (GPU-sized) tiles
    (4, 1, 64, 16, [(70, 70), (18, 2), (64, 1)], None, torch.float16),
    # GQA 3 (not a power of two: rows of a tile left empty), float32
    (6, 2, 64, 16, [(21, 21), (50, 9)], 16, torch.float32),
    # empty chunks first and last (the tile -> sequence search at both ends)
    (4, 2, 64, 16, [(5, 0), (20, 20), (1, 1), (7, 0)], 16, torch.float32),
]


@pytest.mark.parametrize("hq,hkv,d,block_size,chunks,block_m,dtype", PREFILL_CASES)
def test_prefill_kernel_matches_reference(hq, hkv, d, block_size, chunks, block_m, dtype):
    seq_lens = [s for s, _ in chunks]
    query_lens = [n for _, n in chunks]
    q, kv_cache, meta = make_case(seq_lens, query_lens, hq, hkv, d, block_size, dtype, seed=hq + d + block_size,
                                  index_dtype=torch.int32 if hkv == 2 else torch.int64)
    scale = d ** -0.5
    ref = paged_attention_ref(q, kv_cache, 1, meta, scale)
    poison = meta.block_tables.clone()
    for i, n in enumerate(seq_lens):
        poison[i, -(-n // block_size):] = 1 << 30
    meta.block_tables = poison
    out = torch.full_like(q, float("nan"))
    got = paged_prefill_attention_triton(q, kv_cache, 1, meta, scale, out=out, block_m=block_m, block_n=16)
    torch.testing.assert_close(got.float(), ref.float(), **TOL[dtype])


def test_prefill_kernel_handles_decode_only_and_host_side_offsets():
    """Decode rows alone through the prefill kernel, with query_start_loc_t left unset
    (the kernel builds it from the list)."""
    q, kv_cache, meta = make_case([3, 16, 29], [1, 1, 1], 8, 2, 64, 16, torch.float32, seed=11)
    meta.query_start_loc_t = None
    ref = paged_attention_ref(q, kv_cache, 0, meta, 0.125)
    got = paged_prefill_attention_triton(q, kv_cache, 0, meta, 0.125, block_m=16, block_n=16)
    torch.testing.assert_close(got, ref, **TOL[torch.float32])


def test_short_contexts_use_fewer_splits_than_the_grid_has():
    """With a minimum split length, a short sequence fills only its first splits; the
    others are empty (log-sum-exp -inf) and the reduction ignores them."""
    q, kv_cache, meta = make_case([40, 300], [1, 1], 8, 2, 64, 16, torch.float32, seed=5)
    ref = paged_attention_ref(q, kv_cache, 1, meta, 0.125)
    for min_keys in (16, 64, 256):
        out = paged_decode_attention_triton(q, kv_cache, 1, meta.block_tables, meta.seq_lens_t, 0.125, 8,
                                            min_keys_per_split=min_keys)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
