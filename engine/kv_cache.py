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


GIB = 1 << 30


def gpu_kv_budget_bytes(free_bytes: int, memory_fraction: float, model: ModelConfig, max_num_seqs: int,
                        enforce_eager: bool) -> int:
    """The bytes a GPU node gives its KV cache, out of `free_bytes` free once the weights are
    loaded. The engine sizes its cache with this and `pdcluster plan` (bench/plan.py)
    predicts it, so the two cannot drift apart.

    Held back: 2 GiB for the activations and logits of the largest step and, unless
    `enforce_eager`, the pool of the decode CUDA graphs, which keep their activations
    sized by the largest captured batch (max_num_seqs rows; its float32 logits and their
    temporaries dominate), counted before the cache is sized. Per row: 6 logits-sized
    float32 buffers, the MLP's and the residual stream's activations; measured 1,107 MiB
    at 256 rows of an 8B-shape model (bench/results/2026-12-01-h200), this gives 1,096 MiB."""
    headroom = 2 * GIB
    if not enforce_eager:
        headroom += max_num_seqs * (model.vocab_size * 4 * 6 + model.intermediate_size * 2 * 8
                                    + model.hidden_size * 2 * 16) + 256 * 2**20
    return max(int(free_bytes * memory_fraction) - headroom, 0)


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
