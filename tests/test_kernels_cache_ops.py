"""Triton KV-cache write against the torch reference (TRITON_INTERPRET=1 on CPU)."""

from __future__ import annotations

import pytest
import torch

from kernels.cache_ops import write_kv, write_kv_ref, write_kv_triton


@pytest.mark.parametrize("dtype,block_size,hkv,d,index_dtype,block_t", [
    (torch.float32, 16, 2, 64, torch.int64, 1),
    (torch.bfloat16, 8, 1, 128, torch.int32, 4),
    (torch.float16, 16, 3, 64, torch.int64, 8),
])
def test_write_kv_kernel_matches_reference_and_skips_negative_slots(dtype, block_size, hkv, d, index_dtype, block_t):
    gen = torch.Generator().manual_seed(block_size + hkv + d)
    n_blocks, layers, t = 6, 3, 13
    cache = torch.randn(n_blocks, layers, 2, block_size, hkv, d, generator=gen).to(dtype)
    # k and v as strided views of a fused qkv projection, like the model passes them.
    qkv = torch.randn(t, (2 + 2 * hkv) * d, generator=gen).to(dtype)
    k = qkv[:, 2 * d:(2 + hkv) * d].view(t, hkv, d)
    v = qkv[:, (2 + hkv) * d:].view(t, hkv, d)
    slots = torch.randperm(n_blocks * block_size, generator=gen)[:t]
    slots[[2, 5, 12]] = -1  # padded rows of a CUDA-graph batch
    slots = slots.to(index_dtype)
    expected = cache.clone()  # written row by row: only non-negative slots, only layer 1
    for row, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected[slot // block_size, 1, 0, slot % block_size] = k[row]
            expected[slot // block_size, 1, 1, slot % block_size] = v[row]
    want, got = cache.clone(), cache.clone()
    write_kv_ref(want, 1, k, v, slots)
    write_kv_triton(got, 1, k, v, slots, block_t=block_t)
    assert torch.equal(want, expected)
    assert torch.equal(got, expected)


def test_write_kv_all_negative_and_empty_batches_write_nothing():
    cache = torch.randn(2, 1, 2, 16, 2, 64)
    before = cache.clone()
    k = torch.randn(3, 2, 64)
    write_kv_triton(cache, 0, k, k, torch.full((3,), -1))
    write_kv_ref(cache, 0, k, k, torch.full((3,), -1))
    write_kv(cache, 0, k[:0], k[:0], torch.zeros(0, dtype=torch.int64))
    write_kv_triton(cache, 0, k[:0], k[:0], torch.zeros(0, dtype=torch.int64))
    assert torch.equal(cache, before)
