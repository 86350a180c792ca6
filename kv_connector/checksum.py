"""Per-block checksums, so a consumer can tell intact KV from corrupt KV.

The sum of a block's 32-bit words times position weights, wrapped mod 2**64. Integer
addition mod 2**64 is associative, so the result is bit-identical whatever order a
device reduces in — CPU and GPU agree. It is not cryptographic: it catches transport
faults and reads of blocks that were overwritten, which is what it is for.
"""

from __future__ import annotations

import torch

_CHUNK_BLOCKS = 64  # bounds the int64 temporaries: 64 blocks x 2 MiB x 2 for an 8B model


def block_checksums(kv_cache: torch.Tensor, block_ids: list[int]) -> list[int]:
    """One checksum per block id, in order. kv_cache: (num_blocks, ...) contiguous."""
    if not block_ids:
        return []
    words = kv_cache.view(kv_cache.shape[0], -1).view(torch.int32)  # (N, block_bytes/4)
    weights = (torch.arange(words.shape[1], device=kv_cache.device, dtype=torch.int64) % 65521) + 1
    out: list[int] = []
    for start in range(0, len(block_ids), _CHUNK_BLOCKS):
        ids = torch.tensor(block_ids[start:start + _CHUNK_BLOCKS], device=kv_cache.device)
        chunk = words.index_select(0, ids).to(torch.int64)       # (n, W)
        out += (chunk * weights).sum(dim=1).tolist()
    return out
