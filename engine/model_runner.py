"""Turns a scheduled step into tensors once, runs the model, returns logits rows.

The hot path, in one direction: chunks -> flat token batch + attention metadata ->
forward -> hidden states of the rows that sample -> float32 logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.models.llama import LlamaForCausalLM
from engine.scheduler import ScheduledChunk
from kernels.attention import AttentionMetadata


@dataclass(slots=True)
class ModelInputs:
    input_ids: torch.Tensor       # (T,)
    positions: torch.Tensor       # (T,)
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # (S_sample,) rows of the batch whose next token is sampled


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: torch.Tensor, block_size: int, device: torch.device):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device

    def prepare(self, chunks: list[ScheduledChunk]) -> ModelInputs:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        max_blocks = 0
        for c in chunks:
            req = c.request
            end = c.start + c.num_tokens
            input_ids += req.token_slice(c.start, end)
            pos = range(c.start, end)
            positions += pos
            blocks = req.block_ids
            slots += [blocks[p // bs] * bs + p % bs for p in pos]
            query_start_loc.append(len(input_ids))
            seq_lens.append(end)
            max_blocks = max(max_blocks, (end + bs - 1) // bs)
            if c.sample:
                logits_indices.append(len(input_ids) - 1)
        rows = []
        for c, seq_len in zip(chunks, seq_lens):
            n = (seq_len + bs - 1) // bs
            rows.append(c.request.block_ids[:n] + [0] * (max_blocks - n))  # padded with block 0
        table = torch.tensor(rows, dtype=torch.int64)
        dev = self.device
        meta = AttentionMetadata(
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=table.to(dev, non_blocking=True),
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(dev, non_blocking=True),
            seq_lens_t=torch.tensor(seq_lens, dtype=torch.int64).to(dev, non_blocking=True),
            decode_only=all(c.num_tokens == 1 for c in chunks),
        )
        return ModelInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.int64).to(dev, non_blocking=True),
            positions=torch.tensor(positions, dtype=torch.int64).to(dev, non_blocking=True),
            meta=meta,
            logits_indices=torch.tensor(logits_indices, dtype=torch.int64).to(dev, non_blocking=True),
        )

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Run one step; returns float32 logits (S_sample, V) for the chunks that sample,
        in chunk order."""
        inputs = self.prepare(chunks)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta)
        return self.model.compute_logits(hidden[inputs.logits_indices])
