"""Paged attention over the block-major KV cache, torch reference.

One call serves a whole mixed batch: each sequence contributes `query_len` new tokens
(a prefill chunk, a recomputed block, or one decode token) that attend causally to the
first `seq_len` cached tokens, where the new tokens are the last `query_len` of those.
Decode-only batches take a vectorised path; mixed batches loop over sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMetadata:
    """Where each sequence's tokens sit in the flattened batch and in the cache."""

    query_start_loc: list[int]      # (S+1,) offsets of each sequence's queries in the batch
    seq_lens: list[int]             # (S,) tokens in the cache the queries may see, new ones included
    block_tables: torch.Tensor      # (S, max_blocks) int64, padded with 0
    slot_mapping: torch.Tensor      # (T,) int64 cache slot of every new token
    seq_lens_t: torch.Tensor        # (S,) int64, seq_lens on the device
    decode_only: bool               # every sequence has exactly one query


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


paged_attention = paged_attention_ref
