"""Per-block checksums, so a consumer can tell intact KV from corrupt KV.

The sum of a block's 32-bit words times position weights, wrapped mod 2**64. Integer
addition mod 2**64 is associative, so the result is bit-identical whatever order a
device reduces in — CPU and GPU, torch and Triton agree. It is not cryptographic: it
catches transport faults and reads of blocks that were overwritten, which is what it is for.

On a GPU one Triton kernel reads each block once (partial sums per tile, then one small
torch sum): the torch formulation gathers, widens and multiplies in several passes over
int64 temporaries, and at 256 blocks of 2 MiB (a 4k-token prompt of an 8B model) it cost
milliseconds on each side of every transfer — most of what a streamed pull adds to a
request's latency (bench/results/2026-12-01b-h200).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_CHUNK_BLOCKS = 64  # bounds the int64 temporaries: 64 blocks x 2 MiB x 2 for an 8B model
_MOD = 65521
_TILE = 4096        # 32-bit words per program


def block_checksums_ref(kv_cache: torch.Tensor, block_ids: list[int]) -> list[int]:
    """The torch formulation (CPU, and the oracle for the kernel)."""
    if not block_ids:
        return []
    words = kv_cache.view(kv_cache.shape[0], -1).view(torch.int32)  # (N, block_bytes/4)
    weights = (torch.arange(words.shape[1], device=kv_cache.device, dtype=torch.int64) % _MOD) + 1
    out: list[int] = []
    for start in range(0, len(block_ids), _CHUNK_BLOCKS):
        ids = torch.tensor(block_ids[start:start + _CHUNK_BLOCKS], device=kv_cache.device)
        chunk = words.index_select(0, ids).to(torch.int64)       # (n, W)
        out += (chunk * weights).sum(dim=1).tolist()
    return out


@triton.jit
def _checksum_kernel(words_ptr, ids_ptr, partial_ptr, W, stride_block, TILES, TILE: tl.constexpr,
                     MOD: tl.constexpr):
    b = tl.program_id(0)
    t = tl.program_id(1)
    block = tl.load(ids_ptr + b).to(tl.int64)
    j = t * TILE + tl.arange(0, TILE)
    mask = j < W
    w = tl.load(words_ptr + block * stride_block + j, mask=mask, other=0).to(tl.int64)
    weight = (j.to(tl.int64) % MOD) + 1
    tl.store(partial_ptr + b * TILES + t, tl.sum(w * weight, axis=0))


def block_checksums_triton(kv_cache: torch.Tensor, block_ids: list[int]) -> list[int]:
    if not block_ids:
        return []
    words = kv_cache.view(kv_cache.shape[0], -1).view(torch.int32)
    w = words.shape[1]
    tiles = triton.cdiv(w, _TILE)
    ids = torch.tensor(block_ids, dtype=torch.int64).to(kv_cache.device, non_blocking=True)
    partial = torch.empty((len(block_ids), tiles), dtype=torch.int64, device=kv_cache.device)
    _checksum_kernel[(len(block_ids), tiles)](words, ids, partial, w, words.stride(0), tiles, TILE=_TILE, MOD=_MOD,
                                              num_warps=8)
    return partial.sum(dim=1).tolist()


def block_checksums(kv_cache: torch.Tensor, block_ids: list[int]) -> list[int]:
    """One checksum per block id, in order. kv_cache: (num_blocks, ...) contiguous."""
    if kv_cache.is_cuda:
        return block_checksums_triton(kv_cache, block_ids)
    return block_checksums_ref(kv_cache, block_ids)
