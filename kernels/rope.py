"""Rotary position embedding (neox style, rotate-half), with Llama-3 frequency scaling.

Frequencies and angles are computed in float32 from the integer positions, as
transformers does, then cos/sin are cast to the activation dtype before rotating.

Triton `apply_rope`: one program per BLOCK_T tokens (1 on the GPU) rotates all Hq query
heads and Hkv key heads of those tokens, as (tokens * heads, head_dim/2) tiles of the two
halves. It rounds where the reference rounds (each product, then the sum, in the activation
dtype), so half-precision results equal the reference's. q and k may be strided views of
the fused qkv projection; results are new contiguous tensors.

`rope_and_write_kv` does the same and also stores the rotated k and v at the token's
cache slot (negative slot = nothing, as in write_kv): one launch and one read of k instead
of two. Whether it pays over apply_rope + write_kv is for the GPU timing to say.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from kernels.cache_ops import write_kv_ref
from kernels.triton_utils import cast, emulate_bf16, pdl_launch, pdl_release, pdl_wait, use_pdl, use_triton


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), float32, Llama-3 scaled when asked."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if scaling is None:
        return inv
    factor = scaling["factor"]
    low = scaling.get("low_freq_factor", 1.0)
    high = scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen = old_len / low
    high_wavelen = old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # positions: (T,) int -> cos, sin: (T, head_dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # q: (T, Hq, D), k: (T, Hkv, D), cos/sin: (T, D)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def rope_and_write_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          kv_cache: torch.Tensor, layer: int,
                          slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = apply_rope_ref(q, k, cos, sin)
    write_kv_ref(kv_cache, layer, k, v, slot_mapping)
    return q, k


@triton.jit
def _rotate(x_ptr, out_ptr, t0, n_tokens, cos_ptr, sin_ptr, sct, scd, sst, ssd, stride_t, stride_h, stride_d,
            H: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
            BLOCK_HALF: tl.constexpr, EMULATE: tl.constexpr):
    # Rows are (token, head) pairs of BLOCK_T tokens from t0: x[t, h] -> out[t, h] (contiguous).
    # Returns the rotated halves, the row tokens and the row mask for the cache write.
    r = tl.arange(0, BLOCK_T * BLOCK_H)
    t = t0 + r // BLOCK_H
    h = r % BLOCK_H
    row_ok = (t < n_tokens) & (h < H)
    j = tl.arange(0, BLOCK_HALF)[None, :]
    mask = row_ok[:, None] & (j < HALF)
    cs = cos_ptr + (t * sct)[:, None]
    sn = sin_ptr + (t * sst)[:, None]
    cos1 = tl.load(cs + j * scd, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cs + (j + HALF) * scd, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sn + j * ssd, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sn + (j + HALF) * ssd, mask=mask, other=0.0).to(tl.float32)
    src = x_ptr + (t * stride_t + h * stride_h)[:, None]
    x1 = tl.load(src + j * stride_d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + (j + HALF) * stride_d, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    # out = x * cos + rotate_half(x) * sin, each product and the sum rounded to dt like torch
    o1 = cast(cast(x1 * cos1, dt, EMULATE).to(tl.float32) - cast(x2 * sin1, dt, EMULATE).to(tl.float32), dt, EMULATE)
    o2 = cast(cast(x2 * cos2, dt, EMULATE).to(tl.float32) + cast(x1 * sin2, dt, EMULATE).to(tl.float32), dt, EMULATE)
    dst = out_ptr + (t * (H * 2 * HALF) + h * (2 * HALF))[:, None]
    tl.store(dst + j, o1, mask=mask)
    tl.store(dst + j + HALF, o2, mask=mask)
    return o1, o2, t, h, row_ok


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, cache_ptr, slot_ptr, n_tokens,
    sqt, sqh, sqd, skt, skh, skd, svt, svh, svd, sct, scd, sst, ssd,
    stride_cn, stride_ck, stride_cb, stride_ch, stride_cd, layer_off,
    HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, PAGE: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
    WRITE_KV: tl.constexpr, EMULATE: tl.constexpr, PDL: tl.constexpr,
):
    pdl_wait(PDL)
    t0 = tl.program_id(0).to(tl.int64) * BLOCK_T
    _rotate(q_ptr, q_out_ptr, t0, n_tokens, cos_ptr, sin_ptr, sct, scd, sst, ssd, sqt, sqh, sqd,
            HQ, HALF, BLOCK_T, BLOCK_HQ, BLOCK_HALF, EMULATE)
    k1, k2, t, h, row_ok = _rotate(k_ptr, k_out_ptr, t0, n_tokens, cos_ptr, sin_ptr, sct, scd, sst, ssd, skt, skh, skd,
                                 HKV, HALF, BLOCK_T, BLOCK_HKV, BLOCK_HALF, EMULATE)
    if WRITE_KV:
        slot = tl.load(slot_ptr + t, mask=row_ok, other=-1).to(tl.int64)
        j = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (row_ok & (slot >= 0))[:, None] & (j < HALF)  # negative slot: write nothing
        dst = cache_ptr + ((slot // PAGE) * stride_cn + layer_off + (slot % PAGE) * stride_cb + h * stride_ch)[:, None]
        tl.store(dst + j * stride_cd, k1, mask=mask)
        tl.store(dst + (j + HALF) * stride_cd, k2, mask=mask)
        src = v_ptr + (t * svt + h * svh)[:, None]
        v1 = tl.load(src + j * svd, mask=mask, other=0.0)
        v2 = tl.load(src + (j + HALF) * svd, mask=mask, other=0.0)
        tl.store(dst + stride_ck + j * stride_cd, v1, mask=mask)
        tl.store(dst + stride_ck + (j + HALF) * stride_cd, v2, mask=mask)
    pdl_release(PDL)


def _launch(q, k, v, cos, sin, kv_cache, layer, slot_mapping, block_t, num_warps):
    t, hq, d = q.shape
    hkv = k.shape[1]
    assert k.shape == (t, hkv, d) and cos.shape == sin.shape == (t, d) and d % 2 == 0, (q.shape, k.shape, cos.shape)
    dtype = torch.result_type(q, cos)
    q_out = torch.empty((t, hq, d), dtype=dtype, device=q.device)
    k_out = torch.empty((t, hkv, d), dtype=torch.result_type(k, cos), device=q.device)
    if t == 0:
        return q_out, k_out
    write = kv_cache is not None
    if write:
        assert kv_cache.dtype == k_out.dtype == v.dtype and kv_cache.shape[4:] == (hkv, d) and v.shape == k.shape
        cs = kv_cache.stride()
        cache_args = (cs[0], cs[2], cs[3], cs[4], cs[5], layer * cs[1])
        page = kv_cache.shape[3]
    else:
        kv_cache, v, slot_mapping = q_out, k, cos  # unused
        cache_args, page = (0, 0, 0, 0, 0, 0), 1
    half = d // 2
    # One token per program on the GPU; under the interpreter (CPU) several, which cuts
    # its per-program cost.
    block_t = triton.next_power_of_2(block_t or (1 if q.is_cuda else 8))
    _rope_kernel[(triton.cdiv(t, block_t),)](
        q, k, v, cos, sin, q_out, k_out, kv_cache, slot_mapping, t,
        *q.stride(), *k.stride(), *v.stride(), *cos.stride(), *sin.stride(), *cache_args,
        HQ=hq, HKV=hkv, HALF=half, PAGE=page, BLOCK_T=block_t,
        BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HKV=triton.next_power_of_2(hkv),
        BLOCK_HALF=triton.next_power_of_2(half), WRITE_KV=write,
        EMULATE=emulate_bf16(q.dtype, k.dtype, cos.dtype, dtype), PDL=use_pdl(q),
        num_warps=num_warps or (4 if block_t * hq * d >= 2048 else 2), **pdl_launch(use_pdl(q)),
    )
    return q_out, k_out


def apply_rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                      block_t: int | None = None, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(q, k, None, cos, sin, None, 0, None, block_t, num_warps)


def rope_and_write_kv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                             sin: torch.Tensor, kv_cache: torch.Tensor, layer: int, slot_mapping: torch.Tensor, *,
                             block_t: int | None = None,
                             num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(q, k, v, cos, sin, kv_cache, layer, slot_mapping, block_t, num_warps)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (T, Hq, D), k (T, Hkv, D), cos/sin (T, D) -> rotated (q, k), new tensors."""
    if use_triton(q):
        return apply_rope_triton(q, k, cos, sin)
    return apply_rope_ref(q, k, cos, sin)


def rope_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      kv_cache: torch.Tensor, layer: int,
                      slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rope, then write_kv of the rotated k and v, in one launch on CUDA."""
    if use_triton(q):
        return rope_and_write_kv_triton(q, k, v, cos, sin, kv_cache, layer, slot_mapping)
    return rope_and_write_kv_ref(q, k, v, cos, sin, kv_cache, layer, slot_mapping)
