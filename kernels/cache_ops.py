"""Writes into the paged KV cache.

The cache is one tensor (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim):
see engine/kv_cache.py for why. A token's cache slot is block_id * block_size + offset.
A negative slot means "write nothing": the padded rows of a CUDA-graph batch carry -1,
so a replayed graph never scribbles over a real block.

Triton version: one program per BLOCK_T tokens (1 on the GPU), copying those tokens' K
and V rows (all KV heads, Hkv * head_dim elements each) with one masked load and store
per tensor. k and v
may be strided views (slices of the fused qkv projection): their strides are passed in,
nothing is copied first. Offsets into the cache are computed in int64
because a large cache has more than 2**31 elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_utils import use_triton


def write_kv_ref(kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    # kv_cache: (N, L, 2, B, H, D); k, v: (T, H, D); slot_mapping: (T,) int32/int64, negative = skip
    block_size = kv_cache.shape[3]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    slot_mapping = slot_mapping.long()
    blocks = slot_mapping // block_size
    offsets = slot_mapping % block_size
    kv_cache[blocks, layer, 0, offsets] = k
    kv_cache[blocks, layer, 1, offsets] = v


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, cache_ptr, slot_ptr, n_tokens,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_cn, stride_ck, stride_cb, stride_ch, stride_cd,
    layer_off,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Rows are (token, head) pairs of BLOCK_T tokens.
    r = tl.arange(0, BLOCK_T * BLOCK_H)
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + r // BLOCK_H
    h = r % BLOCK_H
    row_ok = (t < n_tokens) & (h < NUM_HEADS)
    slot = tl.load(slot_ptr + t, mask=row_ok, other=-1).to(tl.int64)
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (row_ok & (slot >= 0))[:, None] & (d < HEAD_DIM)  # negative slot: write nothing
    k = tl.load(k_ptr + (t * stride_kt + h * stride_kh)[:, None] + d * stride_kd, mask=mask)
    v = tl.load(v_ptr + (t * stride_vt + h * stride_vh)[:, None] + d * stride_vd, mask=mask)
    dst = cache_ptr + ((slot // BLOCK_SIZE) * stride_cn + layer_off + (slot % BLOCK_SIZE) * stride_cb
                       + h * stride_ch)[:, None] + d * stride_cd
    tl.store(dst, k, mask=mask)
    tl.store(dst + stride_ck, v, mask=mask)


def write_kv_triton(kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
                    slot_mapping: torch.Tensor, *, block_t: int | None = None, num_warps: int | None = None) -> None:
    t, h, d = k.shape
    if t == 0:
        return
    assert v.shape == k.shape and slot_mapping.shape == (t,), (k.shape, v.shape, slot_mapping.shape)
    assert kv_cache.shape[4:] == (h, d) and k.dtype == kv_cache.dtype == v.dtype
    # One token per program on the GPU; under the interpreter (CPU) several, which cuts
    # its per-program cost.
    block_t = triton.next_power_of_2(block_t or (1 if k.is_cuda else 8))
    block_h, block_d = triton.next_power_of_2(h), triton.next_power_of_2(d)
    sc = kv_cache.stride()
    _write_kv_kernel[(triton.cdiv(t, block_t),)](
        k, v, kv_cache, slot_mapping, t,
        *k.stride(), *v.stride(),
        sc[0], sc[2], sc[3], sc[4], sc[5],
        layer * sc[1],
        NUM_HEADS=h, HEAD_DIM=d, BLOCK_SIZE=kv_cache.shape[3],
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=num_warps or (4 if block_t * block_h * block_d >= 1024 else 1),
    )


def write_kv(kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store k, v (T, Hkv, D) at their slots of `layer`; negative slots are skipped."""
    if use_triton(kv_cache):
        write_kv_triton(kv_cache, layer, k, v, slot_mapping)
    else:
        write_kv_ref(kv_cache, layer, k, v, slot_mapping)
