"""A decode step's attention in one launch per layer: rotary embedding of the new token's
q and k, its K/V written to the cache, flash-decoding over the paged cache, and the
reduction of the splits.

Why one launch: at small batch a decode step is ~12 kernels per layer, and the ones
around attention (rope + cache write, the split kernel, the split reduction) each cost a
launch floor of ~2 us for a few kilobytes of work: 0.15 ms of a 4.6 ms step at batch 1
(bench/results/2026-12-01-h200, the profile). Here they are one program per (sequence,
KV head, split), as in `kernels/attention.py`'s `_decode_split_kernel`:

  - every program rotates the G query heads of its KV head itself (the same rounding as
    `kernels/rope.py`: each product, then the sum, in the activation dtype);
  - the program whose split holds the new token (position seq_len - 1) rotates its k,
    writes k and v at the token's slot (a negative slot writes nothing, as CUDA-graph
    padding needs), and then reads the cache as usual: a barrier between its stores and
    its loads makes its own writes visible to all its threads;
  - every program writes its split's partial output and log-sum-exp, then counts itself
    in with one atomic per (sequence, KV head); the last program to arrive combines the
    splits (one load of all of them per query head) and writes the output, then resets the counter to 0 for the next call (a CUDA
    graph replays it with the counters already zero). The arrival is the pattern CUTLASS's
    semaphores use: a CTA barrier, then one acq_rel atomic at GPU scope; the combining
    program reads the partials from L2 (".cg"), where the other SMs' stores landed.

The counters live in one zeroed int32 buffer per device that only grows (a captured graph
keeps the address it captured). Two of these kernels running at once on one device, on
two streams, would share it: the engine runs its forward on one stream.

CPU tensors take the references (`rope_and_write_kv_ref`, then `paged_attention_ref`),
which stay the oracle; the interpreter runs the kernel in the tests.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.attention import (_LOG2E, DECODE_LAUNCH, AttentionMetadata, _dot_precision, choose_num_kv_splits,
                               num_sms, paged_attention, paged_attention_ref)
from kernels.rope import rope_and_write_kv, rope_and_write_kv_ref
from kernels.triton_utils import cast, dot, emulate_bf16, use_triton

# The engine takes this path for decode-only steps on a GPU; PDCLUSTER_FUSED_DECODE=0
# turns it off (rope + cache write, split kernel, reduction: three launches), for A/B runs.
ENABLED = os.environ.get("PDCLUSTER_FUSED_DECODE", "1") != "0"


@triton.jit
def _rotated(ptr, row_off, d, stride_d, cos, sin, dmask, HALF: tl.constexpr, dt: tl.constexpr,
             EMULATE: tl.constexpr):
    # x * cos + rotate_half(x) * sin for the rows at row_off (a column vector of offsets),
    # rounded like the reference: rotate_half(x)[d] = -x[d + HALF] below HALF, x[d - HALF] above.
    partner = tl.where(d < HALF, d + HALF, d - HALF)
    x = tl.load(ptr + row_off + d[None, :] * stride_d, mask=dmask, other=0.0).to(tl.float32)
    xp = tl.load(ptr + row_off + partner[None, :] * stride_d, mask=dmask, other=0.0).to(tl.float32)
    sign = tl.where(d < HALF, -1.0, 1.0)[None, :]
    a = cast(x * cos, dt, EMULATE).to(tl.float32)
    b = cast(xp * sin, dt, EMULATE).to(tl.float32)
    return cast(a + sign * b, dt, EMULATE)


@triton.jit
def _fused_decode_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr,
    cache_ptr, bt_ptr, seq_lens_ptr, mid_o_ptr, mid_lse_ptr, count_ptr, out_ptr,
    scale_log2,
    stride_qs, stride_qh, stride_qd, stride_ks, stride_kh, stride_kd, stride_vs, stride_vh, stride_vd,
    stride_cos, stride_cosd, stride_sin, stride_sind,
    stride_cn, stride_ck, stride_cb, stride_ch, stride_cd, layer_off,
    stride_bts,
    stride_os, stride_oh, stride_od,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr, PAGE: tl.constexpr, MIN_PAGES: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DIRECT: tl.constexpr, DOT_PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    s64 = s.to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + s).to(tl.int32)
    pages_per_split = tl.maximum(tl.cdiv(tl.cdiv(seq_len, PAGE), num_splits), MIN_PAGES)
    start = split * pages_per_split * PAGE
    end = tl.minimum(start + pages_per_split * PAGE, seq_len)
    dt: tl.constexpr = cache_ptr.dtype.element_ty

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    head = kvh * G + g
    gmask = g < G
    dmask = d < HEAD_DIM
    cos = tl.load(cos_ptr + s64 * stride_cos + d * stride_cosd, mask=dmask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + s64 * stride_sin + d * stride_sind, mask=dmask, other=0.0).to(tl.float32)[None, :]
    q = _rotated(q_ptr, s64 * stride_qs + head[:, None] * stride_qh, d, stride_qd, cos, sin,
                 gmask[:, None] & dmask[None, :], HALF, dt, EMULATE)

    kv_base = cache_ptr + layer_off + kvh * stride_ch
    if (start < seq_len) & (seq_len <= end):  # this split holds the new token: write its K/V first
        slot = tl.load(slot_ptr + s).to(tl.int64)
        if slot >= 0:
            k_new = _rotated(k_ptr, s64 * stride_ks + kvh * stride_kh, d, stride_kd, cos, sin, dmask[None, :],
                             HALF, dt, EMULATE)  # (1, BLOCK_D)
            v_new = tl.load(v_ptr + s64 * stride_vs + kvh * stride_vh + d[None, :] * stride_vd,
                            mask=dmask[None, :], other=0.0)
            dst = kv_base + (slot // PAGE) * stride_cn + (slot % PAGE) * stride_cb + d[None, :] * stride_cd
            tl.store(dst, k_new, mask=dmask[None, :])
            tl.store(dst + stride_ck, v_new, mask=dmask[None, :])
    tl.debug_barrier()

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    bt_row = bt_ptr + s64 * stride_bts
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        block = tl.load(bt_row + pos // PAGE, mask=valid, other=0).to(tl.int64)
        off = block * stride_cn + (pos % PAGE) * stride_cb
        kv_mask = valid[:, None] & dmask[None, :]
        k = tl.load(kv_base + off[:, None] + d[None, :] * stride_cd, mask=kv_mask, other=0.0)
        v = tl.load(kv_base + stride_ck + off[:, None] + d[None, :] * stride_cd, mask=kv_mask, other=0.0)
        scores = dot(q, tl.trans(k), DOT_PREC, EMULATE) * scale_log2  # (BLOCK_G, BLOCK_N)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(cast(p, v.dtype, EMULATE), v, DOT_PREC, EMULATE)
        m_i = m_new

    nonempty = l_i > 0.0
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    omask = gmask[:, None] & dmask[None, :]
    out_rows = out_ptr + s64 * stride_os + head[:, None] * stride_oh + d[None, :] * stride_od
    if DIRECT:  # one split: no partials
        tl.store(out_rows, cast(o, out_ptr.dtype.element_ty, EMULATE), mask=omask)
    else:
        # mid_o: (S, Hq, num_splits, BLOCK_D) float32, mid_lse: (S, Hq, num_splits), contiguous
        # Splits past the end of the context (a graph's split count is sized for the longest
        # context it serves) store nothing and are not read back: only arrive.
        used = tl.cdiv(tl.cdiv(seq_len, PAGE), pages_per_split)
        rows = (s64 * (G * tl.num_programs(1)) + head) * num_splits
        if split < used:
            tl.store(mid_o_ptr + (rows + split)[:, None] * BLOCK_D + d[None, :], o, mask=omask)
            lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
            tl.store(mid_lse_ptr + rows + split, lse, mask=gmask)
        tl.debug_barrier()
        counter = count_ptr + s64 * tl.num_programs(1) + kvh
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:  # the last split of this (sequence, KV head): combine
            # Per query head, all splits in one load (the loads of the G heads are
            # independent): two L2 round trips, whatever the split count. The same
            # arithmetic as kernels/attention.py's _decode_reduce_kernel.
            kk = tl.arange(0, BLOCK_K)
            kmask = kk < used
            for gi in tl.static_range(G):
                row = (s64 * (G * tl.num_programs(1)) + kvh * G + gi) * num_splits + kk
                lse_k = tl.load(mid_lse_ptr + row, mask=kmask, other=float("-inf"), cache_modifier=".cg")
                o_k = tl.load(mid_o_ptr + row[:, None] * BLOCK_D + d[None, :], mask=kmask[:, None] & dmask[None, :],
                              other=0.0, cache_modifier=".cg")
                m = tl.max(lse_k, 0)
                m = tl.where(m == float("-inf"), 0.0, m)
                w = tl.where(lse_k == float("-inf"), 0.0, tl.exp2(lse_k - m))
                den = tl.sum(w, 0)
                res = tl.sum(w[:, None] * o_k, 0) / tl.where(den > 0.0, den, 1.0)
                tl.store(out_ptr + s64 * stride_os + (kvh * G + gi) * stride_oh + d * stride_od,
                         cast(res, out_ptr.dtype.element_ty, EMULATE), mask=dmask)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


_COUNTERS: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown counter buffers a captured graph may still use


def _counters(device: torch.device, n: int) -> torch.Tensor:
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"fused decode attention needs {n} arrival counters while a CUDA graph is being "
                               "captured; run the batch size once before capturing it (the engine's warm-up does)")
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def fused_decode_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                                  sin: torch.Tensor, kv_cache: torch.Tensor, layer: int, slot_mapping: torch.Tensor,
                                  block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                                  num_kv_splits: int, out: torch.Tensor | None = None, *,
                                  block_n: int | None = None, num_warps: int | None = None,
                                  num_stages: int | None = None, min_keys_per_split: int = 128) -> torch.Tensor:
    """q (S, Hq, D), k and v (S, Hkv, D) of the new tokens, not yet rotated (strided views
    of the qkv projection are fine), cos/sin (S, D) -> attention output (S, Hq, D), with
    the rotated k and v written to the cache at slot_mapping."""
    s, hq, d = q.shape
    hkv, page = kv_cache.shape[4], kv_cache.shape[3]
    assert hq % hkv == 0 and kv_cache.shape[5] == d and d % 2 == 0, (q.shape, kv_cache.shape)
    assert k.shape == v.shape == (s, hkv, d) and cos.shape == sin.shape == (s, d), (k.shape, v.shape, cos.shape)
    assert block_tables.shape[0] == s and seq_lens.shape[0] >= s and slot_mapping.shape[0] >= s
    assert num_kv_splits >= 1, "num_kv_splits must be >= 1 (choose_num_kv_splits picks one)"
    assert kv_cache.dtype == q.dtype == k.dtype == v.dtype, "q, k, v and the cache share one dtype"
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if s == 0:
        return out
    g = hq // hkv
    block_d = triton.next_power_of_2(d)
    tuned = next(shape for most, shape in DECODE_LAUNCH if s <= most)
    block_n, num_warps, num_stages = (x if x is not None else t for x, t in
                                      zip((block_n, num_warps, num_stages), tuned))
    if num_kv_splits == 1:
        mid_o = mid_lse = out
        counters = seq_lens  # unused
    else:
        mid_o = torch.empty((s, hq, num_kv_splits, block_d), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((s, hq, num_kv_splits), dtype=torch.float32, device=q.device)
        counters = _counters(q.device, s * hkv)
    sc = kv_cache.stride()
    _fused_decode_kernel[(s, hkv, num_kv_splits)](
        q, k, v, cos, sin, slot_mapping,
        kv_cache, block_tables, seq_lens, mid_o, mid_lse, counters, out,
        scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *cos.stride(), *sin.stride(),
        sc[0], sc[2], sc[3], sc[4], sc[5], layer * sc[1],
        block_tables.stride(0),
        *out.stride(),
        G=g, HEAD_DIM=d, HALF=d // 2, PAGE=page, MIN_PAGES=max(1, min_keys_per_split // page),
        BLOCK_G=max(16, triton.next_power_of_2(g)), BLOCK_D=block_d, BLOCK_N=block_n,
        BLOCK_K=triton.next_power_of_2(num_kv_splits), DIRECT=num_kv_splits == 1, DOT_PREC=_dot_precision(q.dtype),
        EMULATE=emulate_bf16(q.dtype, kv_cache.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return out


def rope_write_and_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata, scale: float,
                          fused: bool | None = None) -> torch.Tensor:
    """What a decode-only step's attention layer calls: the fused kernel on a GPU, the
    references (rope and cache write, then attention) on a CPU. `fused=False` forces the
    unfused Triton kernels (rope_and_write_kv, then paged_attention)."""
    if not meta.decode_only:
        raise ValueError("rope_write_and_attend serves decode-only batches (one query per sequence); "
                         "mixed batches go through rope_and_write_kv + paged_attention")
    if not use_triton(q):
        q, k = rope_and_write_kv_ref(q, k, v, cos, sin, kv_cache, layer, meta.slot_mapping)
        return paged_attention_ref(q, kv_cache, layer, meta, scale)
    if not (ENABLED if fused is None else fused):
        q, k = rope_and_write_kv(q, k, v, cos, sin, kv_cache, layer, meta.slot_mapping)
        return paged_attention(q, kv_cache, layer, meta, scale)
    splits = meta.num_kv_splits or choose_num_kv_splits(
        q.shape[0], kv_cache.shape[4], meta.max_seq_len or max(meta.seq_lens, default=1), kv_cache.shape[3],
        num_sms(q.device))
    return fused_decode_attention_triton(q, k, v, cos, sin, kv_cache, layer, meta.slot_mapping, meta.block_tables,
                                         meta.seq_lens_t, scale, splits)
