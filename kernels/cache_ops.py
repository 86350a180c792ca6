"""Writes into the paged KV cache.

The cache is one tensor (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim):
see engine/kv_cache.py for why. A token's cache slot is block_id * block_size + offset.
"""

from __future__ import annotations

import torch


def write_kv_ref(kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    # kv_cache: (N, L, 2, B, H, D); k, v: (T, H, D); slot_mapping: (T,) int64
    block_size = kv_cache.shape[3]
    blocks = slot_mapping // block_size
    offsets = slot_mapping % block_size
    kv_cache[blocks, layer, 0, offsets] = k
    kv_cache[blocks, layer, 1, offsets] = v


write_kv = write_kv_ref
