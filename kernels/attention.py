"""Paged attention over the block-major KV cache: torch reference and Triton kernels.

One call serves a whole mixed batch: each sequence contributes `query_len` new tokens
(a prefill chunk, a recomputed block, or one decode token) that attend causally to the
first `seq_len` cached tokens, where the new tokens are the last `query_len` of those.
q is (T, Hq, D), the cache (N, L, 2, B, Hkv, D) (engine/kv_cache.py), out (T, Hq, D).

`paged_attention` dispatches: CPU tensors take the torch reference (the oracle, and the
CPU production path); CUDA tensors take one of two Triton kernels, which read each
sequence's keys where they sit in the cache through its block table (no gather into new
tensors; a key's address is block_tables[s, pos // B] * block_stride + (pos % B) * row).

Decode (`paged_decode_attention`), flash-decoding in two launches:
  1. grid (S, Hkv, num_kv_splits). One program owns one KV head of one sequence and all
     G = Hq / Hkv query heads that share it (GQA: each K/V tile is loaded once and used by
     G rows, padded to 16 rows for tl.dot). The program covers one contiguous range of the
     context; the ranges are computed IN the kernel from seq_lens (whole cache blocks,
     ceil(blocks / num_kv_splits) each), so the grid depends only on the batch size and
     the split count. That is what CUDA-graph capture needs: a graph captured for batch
     size S with a fixed split count replays correctly for any sequence lengths, with no
     host sync and no Python int that changes between replays. Splits past the end of a
     short sequence are empty and cost one early-exiting program; a padded row with
     seq_len 0 makes every split empty and yields zeros. Each split writes its partial
     output (normalised) and its log-sum-exp, float32.
  2. grid (S, Hq): combine the splits by their log-sum-exp.
  With num_kv_splits == 1 the first kernel writes the final output and the second is
  skipped. Choose the split count so S * Hkv * splits covers the GPU about twice
  (`choose_num_kv_splits`); for CUDA graphs pick it per captured batch size.

Prefill/extend (`paged_prefill_attention`), one launch per layer for the whole batch
(vLLM's "unified attention" grid): queries are cut into tiles of BLOCK_Q = BLOCK_M // G
tokens of one sequence, and one program computes the G query heads of one KV head for
those tokens, packed into BLOCK_M rows (row m = token m // G, head m % G), so K/V tiles
are shared by the GQA group and decode rows riding along fill G rows instead of one.
The grid is (T // BLOCK_Q + S, Hkv): sequence i owns tile ids starting at
query_start_loc[i] // BLOCK_Q + i, an upper bound on the tiles needed that is known from
the shapes alone (no host sync); each program finds its sequence by binary search over
query_start_loc and exits if its tile is past the end of the chunk. The key loop runs over
[0, last visible position] in BLOCK_N-key tiles, without any mask up to the tile's first
query position and with the causal mask on the diagonal tiles, flash-attention style
(online softmax in exp2, float32 accumulation, P cast to the KV dtype for the second
tl.dot). float32 inputs use IEEE dots (no TF32) so fp32 models stay exact.
The EMULATE flag only matters under Triton's CPU interpreter (kernels/triton_utils.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.triton_utils import cast, dot, emulate_bf16, pdl_launch, pdl_release, pdl_wait, use_pdl, use_triton


@dataclass(slots=True)
class AttentionMetadata:
    """Where each sequence's tokens sit in the flattened batch and in the cache."""

    query_start_loc: list[int]      # (S+1,) offsets of each sequence's queries in the batch
    seq_lens: list[int]             # (S,) tokens in the cache the queries may see, new ones included
    block_tables: torch.Tensor      # (S, max_blocks) int32/int64, padded (entries past the sequence unread)
    slot_mapping: torch.Tensor      # (T,) int32/int64 cache slot of every new token, negative = none
    seq_lens_t: torch.Tensor        # (S,) int64, seq_lens on the device
    decode_only: bool               # every sequence has exactly one query, a decode token
    # Used by the Triton kernels (CUDA); the reference ignores them. Left at their
    # defaults, the kernels derive what they need (query_start_loc_t from the list).
    query_start_loc_t: torch.Tensor | None = None  # (S+1,) int32, query_start_loc on the device
    max_query_len: int = 0
    max_seq_len: int = 0
    num_kv_splits: int = 0          # decode kernel's context splits; 0 = choose from max_seq_len


def paged_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata,
                        scale: float) -> torch.Tensor:
    # q: (T, Hq, D); kv_cache: (N, L, 2, B, Hkv, D) -> out (T, Hq, D)
    k_cache = kv_cache[:, layer, 0]  # (N, B, Hkv, D), strided view
    v_cache = kv_cache[:, layer, 1]
    if meta.decode_only:
        return _decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens_t, scale)
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    qsl = meta.query_start_loc
    # One-token sequences (decodes riding along with a prefill chunk) in one batched call;
    # only multi-token chunks loop.
    single = [i for i in range(len(meta.seq_lens)) if qsl[i + 1] - qsl[i] == 1]
    if single:
        rows = torch.tensor([qsl[i] for i in single], device=q.device)
        idx = torch.tensor(single, device=q.device)
        out[rows] = _decode_attention(q[rows], k_cache, v_cache, meta.block_tables[idx], meta.seq_lens_t[idx], scale)
    for i, seq_len in enumerate(meta.seq_lens):
        start, end = qsl[i], qsl[i + 1]
        if end - start == 1:
            continue
        n_blocks = (seq_len + block_size - 1) // block_size
        blocks = meta.block_tables[i, :n_blocks]
        k = k_cache[blocks].flatten(0, 1)[:seq_len]  # (S_kv, Hkv, D)
        v = v_cache[blocks].flatten(0, 1)[:seq_len]
        out[start:end] = _causal_attention(q[start:end], k, v, scale)
    return out


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # q: (Tq, Hq, D) are the last Tq of the Tk positions in k, v: (Tk, Hkv, D)
    tq, hq, _ = q.shape
    tk, hkv, _ = k.shape
    group = hq // hkv
    qh = q.transpose(0, 1)                                     # (Hq, Tq, D)
    kh = k.transpose(0, 1).repeat_interleave(group, dim=0)     # (Hq, Tk, D)
    vh = v.transpose(0, 1).repeat_interleave(group, dim=0)
    q_pos = torch.arange(tk - tq, tk, device=q.device)
    mask = q_pos[:, None] >= torch.arange(tk, device=q.device)[None, :]  # (Tq, Tk)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    # q: (S, Hq, D), one query per sequence at position seq_len-1; block_tables (S, MB); seq_lens (S,)
    s, hq, d = q.shape
    hkv = k_cache.shape[2]
    k = k_cache[block_tables].flatten(1, 2)  # (S, MB*B, Hkv, D)
    v = v_cache[block_tables].flatten(1, 2)
    valid = torch.arange(k.shape[1], device=q.device)[None, :] < seq_lens[:, None]  # (S, Tk)
    qg = q.view(s, hkv, hq // hkv, d).float()                  # (S, Hkv, G, D)
    scores = torch.einsum("shgd,sthd->shgt", qg, k.float()) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("shgt,sthd->shgd", probs, v.float())
    return out.reshape(s, hq, d).to(q.dtype)



# --- Triton kernels ------------------------------------------------------------------

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    q_ptr, cache_ptr, bt_ptr, seq_lens_ptr, mid_o_ptr, mid_lse_ptr, out_ptr,
    scale_log2,
    stride_qs, stride_qh, stride_qd,
    stride_cn, stride_ck, stride_cb, stride_ch, stride_cd, layer_off,
    stride_bts,
    stride_os, stride_oh, stride_od,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, MIN_PAGES: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DIRECT: tl.constexpr, DOT_PREC: tl.constexpr, EMULATE: tl.constexpr,
    PDL: tl.constexpr, RELEASE_KEYS: tl.constexpr,
):
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    pdl_wait(PDL)
    seq_len = tl.load(seq_lens_ptr + s).to(tl.int32)
    # Splits of at least MIN_PAGES blocks: a short context uses fewer of the grid's splits
    # (the rest exit at once) instead of many tiny ones that each pay the setup.
    pages_per_split = tl.maximum(tl.cdiv(tl.cdiv(seq_len, PAGE), num_splits), MIN_PAGES)
    start = split * pages_per_split * PAGE
    end = tl.minimum(start + pages_per_split * PAGE, seq_len)
    # Under PDL, a short range lets the reduction be scheduled now (its programs are cheap
    # to hold); a long one only after its loop.
    if end - start <= RELEASE_KEYS:
        pdl_release(PDL)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    head = kvh * G + g
    gmask = g < G
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + s.to(tl.int64) * stride_qs + head[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=gmask[:, None] & dmask[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    kv_base = cache_ptr + layer_off + kvh * stride_ch
    bt_row = bt_ptr + s.to(tl.int64) * stride_bts
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

    pdl_release(PDL)
    nonempty = l_i > 0.0
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    omask = gmask[:, None] & dmask[None, :]
    if DIRECT:
        tl.store(out_ptr + s.to(tl.int64) * stride_os + head[:, None] * stride_oh + d[None, :] * stride_od,
                 cast(o, out_ptr.dtype.element_ty, EMULATE), mask=omask)
    else:
        # mid_o: (S, Hq, num_splits, BLOCK_D) float32, mid_lse: (S, Hq, num_splits), contiguous
        row = (s.to(tl.int64) * (G * tl.num_programs(1)) + head) * num_splits + split
        tl.store(mid_o_ptr + row[:, None] * BLOCK_D + d[None, :], o, mask=omask)
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(mid_lse_ptr + row, lse, mask=gmask)


@triton.jit
def _decode_reduce_kernel(
    mid_o_ptr, mid_lse_ptr, out_ptr,
    stride_os, stride_oh, stride_od,
    num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, EMULATE: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_wait(PDL)
    s = tl.program_id(0)
    h = tl.program_id(1)
    kk = tl.arange(0, BLOCK_K)
    d = tl.arange(0, BLOCK_D)
    kmask = kk < num_splits
    row = (s.to(tl.int64) * tl.num_programs(1) + h) * num_splits + kk
    lse = tl.load(mid_lse_ptr + row, mask=kmask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - m))
    den = tl.sum(w, 0)
    o = tl.load(mid_o_ptr + row[:, None] * BLOCK_D + d[None, :], mask=kmask[:, None] & (d < HEAD_DIM)[None, :],
                other=0.0)  # columns past HEAD_DIM are never written
    pdl_release(PDL)
    out = tl.sum(w[:, None] * o, 0) / tl.where(den > 0.0, den, 1.0)
    tl.store(out_ptr + s.to(tl.int64) * stride_os + h * stride_oh + d * stride_od,
             cast(out, out_ptr.dtype.element_ty, EMULATE), mask=d < HEAD_DIM)


_NUM_SMS: dict[int, int] = {}


def num_sms(device: torch.device | None = None) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100/H200 SXM, the figure
    used where there is no GPU, e.g. under the interpreter)."""
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return 132
    idx = torch.cuda.current_device() if device is None or device.index is None else device.index
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def choose_num_kv_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, block_size: int,
                         sms: int | None = None, min_keys_per_split: int = 128, max_splits: int = 32) -> int:
    """A decode split count giving about two programs per SM, without splits shorter than
    `min_keys_per_split` keys. For CUDA graphs, call it once per captured batch size with
    the longest context the graph must serve (max_model_len) and keep the result: shorter
    sequences then leave some splits empty, which costs an early exit each."""
    sms = num_sms() if sms is None else sms
    want = triton.cdiv(2 * sms, max(1, num_seqs * num_kv_heads))
    cap = triton.cdiv(max(1, max_seq_len), max(min_keys_per_split, block_size))
    return int(max(1, min(want, cap, max_splits)))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# Decode launch shapes (keys per step, warps, pipeline stages) by batch size, from a sweep
# on an H200 at Llama-3-8B shapes (bench/gpu/attention_tune.py): long key tiles while few
# programs run, short ones once the batch alone fills the GPU. Override per call to tune.
DECODE_LAUNCH = ((16, (128, 4, 2)), (127, (64, 4, 3)), (1 << 62, (32, 2, 2)))
# Under programmatic dependent launch, a split program with at most this many keys lets the
# next kernels be scheduled before its loop (see _decode_split_kernel); 0 (always after the
# loop) was 2% slower at batch 1, 4096 the same as 512 (bench/results/2026-12-01d-h200).
DECODE_RELEASE_KEYS = 512


def paged_decode_attention_triton(q: torch.Tensor, kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
                                  seq_lens: torch.Tensor, scale: float, num_kv_splits: int,
                                  out: torch.Tensor | None = None, *, block_n: int | None = None,
                                  num_warps: int | None = None, num_stages: int | None = None,
                                  min_keys_per_split: int = 128) -> torch.Tensor:
    s, hq, d = q.shape
    hkv = kv_cache.shape[4]
    page = kv_cache.shape[3]
    assert hq % hkv == 0 and kv_cache.shape[5] == d, (q.shape, kv_cache.shape)
    assert block_tables.shape[0] == s and seq_lens.shape == (s,), (block_tables.shape, seq_lens.shape)
    assert num_kv_splits >= 1, "num_kv_splits must be >= 1 (choose_num_kv_splits picks one)"
    if out is None:
        out = torch.empty_like(q)
    if s == 0:
        return out
    g = hq // hkv
    block_d = triton.next_power_of_2(d)
    sc = kv_cache.stride()
    direct = num_kv_splits == 1
    pdl = use_pdl(q)
    tuned = next(shape for most, shape in DECODE_LAUNCH if s <= most)
    block_n, num_warps, num_stages = (v if v is not None else t for v, t in
                                      zip((block_n, num_warps, num_stages), tuned))
    if direct:
        mid_o = mid_lse = out  # unused
    else:
        mid_o = torch.empty((s, hq, num_kv_splits, block_d), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((s, hq, num_kv_splits), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(s, hkv, num_kv_splits)](
        q, kv_cache, block_tables, seq_lens, mid_o, mid_lse, out,
        scale * _LOG2E,
        *q.stride(),
        sc[0], sc[2], sc[3], sc[4], sc[5], layer * sc[1],
        block_tables.stride(0),
        *out.stride(),
        G=g, HEAD_DIM=d, PAGE=page, MIN_PAGES=max(1, min_keys_per_split // page),
        BLOCK_G=max(16, triton.next_power_of_2(g)), BLOCK_D=block_d, BLOCK_N=block_n,
        DIRECT=direct, DOT_PREC=_dot_precision(q.dtype), EMULATE=emulate_bf16(q.dtype, kv_cache.dtype),
        PDL=pdl, RELEASE_KEYS=DECODE_RELEASE_KEYS,
        num_warps=num_warps, num_stages=num_stages, **pdl_launch(pdl),
    )
    if not direct:
        _decode_reduce_kernel[(s, hq)](
            mid_o, mid_lse, out, *out.stride(), num_kv_splits,
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_K=triton.next_power_of_2(num_kv_splits),
            EMULATE=emulate_bf16(out.dtype), PDL=pdl,
            num_warps=4 if block_d >= 128 else 2, **pdl_launch(pdl),
        )
    return out


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, num_kv_splits: int,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """One query per sequence, at position seq_len - 1: q (S, Hq, D) -> (S, Hq, D).
    Rows with seq_len 0 (CUDA-graph padding) give zeros on CUDA."""
    if use_triton(q):
        return paged_decode_attention_triton(q, kv_cache, layer, block_tables, seq_lens, scale, num_kv_splits, out)
    res = _decode_attention(q, kv_cache[:, layer, 0], kv_cache[:, layer, 1], block_tables.long(), seq_lens, scale)
    if out is None:
        return res
    out.copy_(res)
    return out


@triton.jit
def _find_seq(qsl_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    # The last sequence i whose first tile id, query_start_loc[i] // BLOCK_Q + i, is <= tile.
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(qsl_ptr + mid).to(tl.int32) // BLOCK_Q + mid
        if first <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _prefill_tile(q, acc, m_i, l_i, kv_base, bt_row, n0, kv_end, q_pos, d, dmask, scale_log2,
                  stride_cn, stride_ck, stride_cb, stride_cd,
                  PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  DOT_PREC: tl.constexpr, EMULATE: tl.constexpr):
    # One BLOCK_N-key step of the online softmax. Unmasked tiles lie wholly before every
    # row's position (and before seq_len).
    pos = n0 + tl.arange(0, BLOCK_N)
    valid = pos < kv_end
    if MASKED:
        block = tl.load(bt_row + pos // PAGE, mask=valid, other=0).to(tl.int64)
        kv_mask = valid[:, None] & dmask[None, :]
    else:
        block = tl.load(bt_row + pos // PAGE).to(tl.int64)
        kv_mask = dmask[None, :]
    off = block * stride_cn + (pos % PAGE) * stride_cb
    k = tl.load(kv_base + off[:, None] + d[None, :] * stride_cd, mask=kv_mask, other=0.0)
    v = tl.load(kv_base + stride_ck + off[:, None] + d[None, :] * stride_cd, mask=kv_mask, other=0.0)
    scores = dot(q, tl.trans(k), DOT_PREC, EMULATE) * scale_log2  # (BLOCK_M, BLOCK_N)
    if MASKED:
        visible = valid[None, :] & (pos[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
    # Every row sees key 0 in the first tile, so m_new is finite from there on.
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(cast(p, v.dtype, EMULATE), v, DOT_PREC, EMULATE)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr, cache_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr,
    scale_log2, num_seqs: tl.int32,
    stride_qt, stride_qh, stride_qd,
    stride_cn, stride_ck, stride_cb, stride_ch, stride_cd, layer_off,
    stride_bts,
    stride_ot, stride_oh, stride_od,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PREC: tl.constexpr, EMULATE: tl.constexpr,
):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = _find_seq(qsl_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + seq).to(tl.int32)
    q_len = tl.load(qsl_ptr + seq + 1).to(tl.int32) - q_start
    local = tile - (q_start // BLOCK_Q + seq)
    if local * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    ctx = seq_len - q_len  # tokens before this chunk: prefix-cached or earlier chunks

    m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    qi = local * BLOCK_Q + m // G           # query index within the chunk
    head = kvh * G + m % G
    row_ok = (m // G < BLOCK_Q) & (qi < q_len)
    dmask = d < HEAD_DIM
    q_pos = ctx + qi                        # absolute position of each row's query
    tok = (q_start + qi).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=row_ok[:, None] & dmask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_base = cache_ptr + layer_off + kvh * stride_ch
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bts
    # Keys this tile can see: up to the last row's position (causal), at most seq_len.
    # Keys up to the first row's position are visible to every row: those tiles skip
    # all masking; only the tiles on the diagonal take the causal mask.
    kv_end = tl.minimum(seq_len, ctx + (local + 1) * BLOCK_Q)
    full_end = (ctx + local * BLOCK_Q + 1) // BLOCK_N * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(q, acc, m_i, l_i, kv_base, bt_row, n0, kv_end, q_pos, d, dmask, scale_log2,
                                      stride_cn, stride_ck, stride_cb, stride_cd,
                                      PAGE, BLOCK_N, False, DOT_PREC, EMULATE)
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(q, acc, m_i, l_i, kv_base, bt_row, n0, kv_end, q_pos, d, dmask, scale_log2,
                                      stride_cn, stride_ck, stride_cb, stride_cd,
                                      PAGE, BLOCK_N, True, DOT_PREC, EMULATE)

    o = acc / l_i[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od,
             cast(o, out_ptr.dtype.element_ty, EMULATE), mask=row_ok[:, None] & dmask[None, :])


# Tile defaults for H100/H200-class GPUs at head_dim 64-128; override per call to tune.
PREFILL_BLOCK_M = 128
PREFILL_BLOCK_N = 64
PREFILL_NUM_WARPS = 8
PREFILL_NUM_STAGES = 2


def paged_prefill_attention_triton(q: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata,
                                   scale: float, out: torch.Tensor | None = None, *, block_m: int | None = None,
                                   block_n: int | None = None, num_warps: int | None = None,
                                   num_stages: int | None = None) -> torch.Tensor:
    t, hq, d = q.shape
    hkv = kv_cache.shape[4]
    page = kv_cache.shape[3]
    assert hq % hkv == 0 and kv_cache.shape[5] == d, (q.shape, kv_cache.shape)
    g = hq // hkv
    if out is None:
        out = torch.empty_like(q)
    num_seqs = meta.seq_lens_t.shape[0]
    if t == 0 or num_seqs == 0:
        return out
    qsl = meta.query_start_loc_t
    if qsl is None:
        qsl = torch.tensor(meta.query_start_loc, dtype=torch.int32, device=q.device)
    # A power of two of at least 16 rows (tl.dot's minimum) holding at least one query token.
    block_m = triton.next_power_of_2(max(block_m or PREFILL_BLOCK_M, 16, g))
    block_q = block_m // g
    sc = kv_cache.stride()
    grid = (t // block_q + num_seqs, hkv)
    _prefill_kernel[grid](
        q, kv_cache, meta.block_tables, meta.seq_lens_t, qsl, out,
        scale * _LOG2E, num_seqs,
        *q.stride(),
        sc[0], sc[2], sc[3], sc[4], sc[5], layer * sc[1],
        meta.block_tables.stride(0),
        *out.stride(),
        G=g, HEAD_DIM=d, PAGE=page,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_D=triton.next_power_of_2(d), BLOCK_N=block_n or PREFILL_BLOCK_N,
        DOT_PREC=_dot_precision(q.dtype), EMULATE=emulate_bf16(q.dtype, kv_cache.dtype),
        num_warps=num_warps or PREFILL_NUM_WARPS, num_stages=num_stages or PREFILL_NUM_STAGES,
    )
    return out


def paged_prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata,
                            scale: float) -> torch.Tensor:
    """A whole mixed batch (chunks, prefix-cache hits, decode rows) in one launch on CUDA."""
    if use_triton(q):
        return paged_prefill_attention_triton(q, kv_cache, layer, meta, scale)
    return paged_attention_ref(q, kv_cache, layer, meta, scale)


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """What the model calls. CPU: the reference. CUDA: the decode kernel for decode-only
    batches, the prefill/extend kernel for anything else."""
    if not use_triton(q):
        return paged_attention_ref(q, kv_cache, layer, meta, scale)
    if meta.decode_only:
        splits = meta.num_kv_splits or choose_num_kv_splits(
            q.shape[0], kv_cache.shape[4], meta.max_seq_len or max(meta.seq_lens, default=1), kv_cache.shape[3],
            num_sms(q.device))
        return paged_decode_attention_triton(q, kv_cache, layer, meta.block_tables, meta.seq_lens_t, scale, splits)
    return paged_prefill_attention_triton(q, kv_cache, layer, meta, scale)
