"""The paged KV cache tensor and its layout.

Layout: ONE tensor per node, (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim).

Block-major, so a block's keys and values for every layer are one contiguous run of
bytes (2 MiB for a Llama-3-8B shape in bf16 at block size 16). The KV connector moves
whole blocks between nodes, and NIXL's throughput depends on descriptor size (measured
on H200 NVLink: 5 GB/s for 32 KiB descriptors built per transfer, ~370 GB/s for 64 MiB):
the vLLM-style layer-major layout would cut each block into 2×num_layers descriptors of
32 KiB, this one gives one descriptor per block, and a run of adjacent blocks is one
contiguous range. One tensor also means one memory registration per node.

The cost is on the compute side: a layer's K (or V) for all blocks is a strided view,
(N, B, H, D) with a stride of a whole block between blocks; attention kernels index by
block id anyway, so reading it strided costs nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import ModelConfig

KV_LAYOUT = "NL2BHD"  # name of the layout above; part of the producer/consumer compatibility check


@dataclass(slots=True)
class KVCacheSpec:
    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_blocks, self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @classmethod
    def bytes_per_block(cls, model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return cls(1, model.num_layers, block_size, model.num_kv_heads, model.head_dim, dtype).block_bytes


def num_blocks_for_budget(budget_bytes: int, block_bytes: int) -> int:
    n = budget_bytes // block_bytes
    if n < 2:
        raise ValueError(f"the KV cache budget ({budget_bytes / 2**20:.1f} MiB) holds fewer than two blocks of "
                         f"{block_bytes / 2**20:.2f} MiB: give the cache more memory or use a smaller block_size")
    return int(n)


def allocate_kv_cache(spec: KVCacheSpec, device: torch.device) -> torch.Tensor:
    # Zeroed, not empty: attention reads padded slots (masked out), and a NaN from stale
    # uninitialised memory would survive the mask as 0 * NaN.
    return torch.zeros(spec.shape, dtype=spec.dtype, device=device)


def copy_blocks(kv_cache: torch.Tensor, src: list[int], dst: list[int]) -> None:
    """kv_cache[dst[i]] = kv_cache[src[i]] for every layer, K and V: one contiguous copy
    per block in this layout, queued on the current stream (a fork's copy-on-write block,
    engine/forking.py)."""
    for s, d in zip(src, dst, strict=True):
        kv_cache[d].copy_(kv_cache[s])
