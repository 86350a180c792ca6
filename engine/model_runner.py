"""Turns a scheduled step into tensors once, runs the model, returns logits rows.

The hot path, in one direction: chunks -> flat token batch + attention metadata ->
forward -> hidden states of the rows that sample -> float32 logits.

Where the time goes on a GPU, and what this module does about it:

* Inputs. Every integer the step needs (token ids, positions, cache slots, sequence
  lengths, query offsets, sampled rows, block table) is written with numpy into ONE
  preallocated pinned host buffer and moved with ONE host-to-device copy into a device
  buffer of the same layout; the tensors the model sees are views of it. No per-token
  torch.tensor() calls, no per-field copies.
* Decode steps replay CUDA graphs. A decode step of an 8B model is ~1,000 kernel
  launches; eager, the launch overhead alone exceeds the HBM roofline. Graphs are
  captured once per padded batch size (1, 2, 4, 8, then steps of 16 up to
  `max_num_seqs`), largest first into one memory pool, with the device buffer's fixed
  regions as their static inputs, so a replay needs no copy beyond the one above (and
  the block table rows). Padded rows have seq_len 0 and cache slot -1: attention reads
  nothing for them and the cache write skips them. Prefill and mixed steps run eagerly:
  their kernels are large enough that launches do not dominate.
* In the graphs, on Hopper: the weight products (of up to 16 rows) are Triton GEMVs
  (kernels/gemv.py) rather than cuBLAS, and every Triton kernel is launched with
  programmatic dependent launch (kernels/triton_utils.py), so the next kernel's programs
  are in place when one ends; the same logprobs bit for bit as without PDL
  (bench/gpu/pdl_check.py), 3% off a batch-1 step. PDCLUSTER_PDL=0 and
  PDCLUSTER_TRITON_GEMV="" turn them off (see decode_gemv_configs). The graphs run
  decode tokens only (graph_size_for): a prompt token is computed by prefill kernels.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from engine.models.llama import LlamaForCausalLM
from engine.scheduler import ScheduledChunk
from kernels.attention import AttentionMetadata, choose_num_kv_splits, num_sms
from kernels.gemv import GemvConfig
from kernels.triton_utils import pdl_supported, programmatic_launch

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ModelInputs:
    input_ids: torch.Tensor       # (T,)
    positions: torch.Tensor       # (T,)
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # (S_sample,) rows of the batch whose next token is sampled


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16, up to and including max_num_seqs."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


def kv_splits_for(batch_size: int, num_kv_heads: int, max_model_len: int, block_size: int,
                  device: torch.device) -> int:
    """Flash-decoding splits for a decode batch: about two programs per SM, no split
    shorter than 128 keys of the longest context served. A function of the (padded)
    batch size alone, so a graph's choice holds for every replay."""
    return choose_num_kv_splits(batch_size, num_kv_heads, max_model_len, block_size, sms=num_sms(device))


class _StagingLayout:
    """Offsets of each field in the flat int64 staging buffer (host and device alike)."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int):
        self.ids = 0
        self.pos = self.ids + max_tokens
        self.slots = self.pos + max_tokens
        self.seq_lens = self.slots + max_tokens
        self.qsl = self.seq_lens + max_seqs
        self.logits_idx = self.qsl + max_seqs + 1
        self.table = self.logits_idx + max_seqs
        self.size = self.table + max_seqs * max_blocks


class _DecodeGraph:
    """One captured decode step for a padded batch size."""

    def __init__(self, graph: torch.cuda.CUDAGraph, logits: torch.Tensor):
        self.graph = graph
        self.logits = logits      # (bs, V) float32, rewritten by every replay


# The decode GEMV's launch shape (up to 16 rows): the fastest for o_proj and down_proj at 1
# and 16 rows in bench/gpu/small_matmuls.py on an H200 (bench/results/2026-12-01c-h200).
DECODE_GEMV = GemvConfig(block_n=32, block_k=256, num_warps=4, num_stages=5, use_dot=True)
GEMV_PROJECTIONS = ("qkv", "o", "gate_up", "down", "lm_head")


def decode_gemv_configs(device: torch.device, spec: str | None = None) -> dict[str, GemvConfig]:
    """Which weight products of a graphed decode step (at up to 16 rows) take the Triton GEMV
    instead of cuBLAS: `spec` or PDCLUSTER_TRITON_GEMV, a comma list of GEMV_PROJECTIONS
    ("" for none); by default all of them on Hopper, where it was measured, none elsewhere.
    Why all: with every product a Triton kernel, the whole decoder layer is one chain of
    programmatically launched kernels (kernels/triton_utils.py), and a batch-1 step on an
    H200 is 3% faster than with cuBLAS, 1.5% at batch 16 (bench/results/2026-12-01d-h200);
    alone, without PDL, the GEMV wins or loses 2% depending on the machine."""
    if spec is None:
        spec = os.environ.get("PDCLUSTER_TRITON_GEMV")
    if spec is None:
        hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
        spec = ",".join(GEMV_PROJECTIONS) if hopper else ""
    names = [p.strip() for p in spec.split(",") if p.strip()]
    unknown = [n for n in names if n not in GEMV_PROJECTIONS]
    if unknown:
        raise ValueError(f"PDCLUSTER_TRITON_GEMV: unknown projection(s) {unknown}; "
                         f"known: {', '.join(GEMV_PROJECTIONS)}")
    return {name: DECODE_GEMV for name in names}


def pdl_wanted(device: torch.device) -> bool:
    """Decode graphs captured with programmatic dependent launch where the GPU and Triton
    support it; PDCLUSTER_PDL=0 turns it off (A/B runs, or a driver that misbehaves)."""
    return os.environ.get("PDCLUSTER_PDL", "1") != "0" and pdl_supported(device)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: torch.Tensor, block_size: int, device: torch.device,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, max_model_len: int = 4096,
                 enforce_eager: bool = False):
        self.model: LlamaForCausalLM | None = model  # None once released
        self.kv_cache: torch.Tensor | None = kv_cache
        self.block_size = block_size
        self.device = device
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max(max_num_batched_tokens, max_num_seqs)
        self.max_blocks = (max_model_len + block_size - 1) // block_size
        self.max_model_len = max_model_len
        self.num_kv_heads = kv_cache.shape[4]
        self.layout = _StagingLayout(self.max_tokens, max_num_seqs, self.max_blocks)
        pin = device.type == "cuda"
        self._host = torch.zeros(self.layout.size, dtype=torch.int64, pin_memory=pin)
        self._host_np = self._host.numpy()
        self._dev = torch.zeros(self.layout.size, dtype=torch.int64, device=device) if pin else self._host
        self._staging_copied = torch.cuda.Event() if pin else None
        self.use_graphs = device.type == "cuda" and not enforce_eager
        self._graphs: dict[int, _DecodeGraph] = {}
        self._graph_sizes: list[int] = []
        self._graph_table: torch.Tensor | None = None  # (max_num_seqs, max_blocks), rows read by the graphs
        self.graph_pool_bytes = 0
        self.single_row_speedups: dict[str, float] = {}

    # --- inputs -----------------------------------------------------------------------
    def prepare(self, chunks: list[ScheduledChunk], pad_to: int = 0) -> ModelInputs:
        """Fill the staging buffer for `chunks` and copy it to the device once. `pad_to`
        (decode graphs) appends rows with seq_len 0 and slot -1 up to that batch size."""
        bs, L, h = self.block_size, self.layout, self._host_np
        self._wait_staging_copy()
        num_seqs = len(chunks)
        lens = np.fromiter((c.num_tokens for c in chunks), dtype=np.int64, count=num_seqs)
        starts = np.fromiter((c.start for c in chunks), dtype=np.int64, count=num_seqs)
        ends = starts + lens
        qsl = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(lens, out=qsl[1:])
        total = int(qsl[-1])
        if total > self.max_tokens or num_seqs > self.max_num_seqs:
            raise ValueError(f"a step of {total} tokens in {num_seqs} sequences exceeds the runner's "
                             f"{self.max_tokens} tokens / {self.max_num_seqs} sequences")
        n_blocks = (ends + bs - 1) // bs
        width = int(n_blocks.max())

        # Token ids: one flat list over the chunks (a decode chunk is one id).
        ids = []
        prompt_rows = False   # a prompt token among them (see decode_only below)
        for c in chunks:
            prompt_rows = prompt_rows or c.start < c.request.num_prompt_tokens
            known = c.request.token_slice(c.start, c.start + c.num_tokens)
            # A token still on the device (a decode step queued ahead) is filled in there.
            ids += known if len(known) == c.num_tokens else known + [0] * (c.num_tokens - len(known))
        h[L.ids:L.ids + total] = ids
        # Positions: start..end-1 of each chunk, vectorised.
        row_of_token = np.repeat(np.arange(num_seqs), lens)
        positions = np.arange(total, dtype=np.int64) - np.repeat(qsl[:-1], lens) + np.repeat(starts, lens)
        h[L.pos:L.pos + total] = positions
        # Block table (num_seqs, width), row-major at L.table; slots looked up in it.
        table = h[L.table:L.table + num_seqs * width].reshape(num_seqs, width)
        for i, c in enumerate(chunks):
            blocks = c.request.block_ids
            n = int(n_blocks[i])
            table[i, :n] = blocks[:n] if len(blocks) != n else blocks
        h[L.slots:L.slots + total] = table[row_of_token, positions // bs] * bs + positions % bs
        h[L.seq_lens:L.seq_lens + num_seqs] = ends
        h[L.qsl:L.qsl + num_seqs + 1] = qsl
        sample_rows = [int(qsl[i + 1]) - 1 for i, c in enumerate(chunks) if c.sample]
        h[L.logits_idx:L.logits_idx + len(sample_rows)] = sample_rows
        if pad_to > num_seqs:  # graph padding: rows that read and write nothing
            h[L.ids + total:L.ids + pad_to] = 0
            h[L.pos + total:L.pos + pad_to] = 0
            h[L.slots + total:L.slots + pad_to] = -1
            h[L.seq_lens + num_seqs:L.seq_lens + pad_to] = 0
        used = L.table + num_seqs * width
        if self._dev is not self._host:
            self._dev[:used].copy_(self._host[:used], non_blocking=True)
            self._staging_copied.record()
        d = self._dev
        n_tok = max(total, pad_to)
        n_seq = max(num_seqs, pad_to)
        # The decode kernel for decode tokens only: a prompt's last token computed alone (a
        # prefix-cache hit, a fork) takes the prefill kernel a cold prefill takes, so the
        # first token does not depend on how the prompt's KV came to be (graph_size_for).
        decode_only = not prompt_rows and bool((lens == 1).all())
        meta = AttentionMetadata(
            query_start_loc=qsl.tolist(),
            seq_lens=ends.tolist(),
            block_tables=d[L.table:L.table + num_seqs * width].view(num_seqs, width),
            slot_mapping=d[L.slots:L.slots + n_tok],
            seq_lens_t=d[L.seq_lens:L.seq_lens + n_seq],
            decode_only=decode_only,
            query_start_loc_t=d[L.qsl:L.qsl + num_seqs + 1],
            max_query_len=int(lens.max()),
            max_seq_len=int(ends.max()),
            num_kv_splits=kv_splits_for(num_seqs, self.num_kv_heads, self.max_model_len, bs, self.device),
        )
        return ModelInputs(input_ids=d[L.ids:L.ids + n_tok], positions=d[L.pos:L.pos + n_tok], meta=meta,
                           logits_indices=d[L.logits_idx:L.logits_idx + len(sample_rows)])

    # --- running ----------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk], input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run one step; returns float32 logits (S_sample, V) for the chunks that sample,
        in chunk order. On a GPU the result is still being computed when this returns.
        `input_ids` (graphed decode steps only): the step's token ids already on the
        device, one per chunk (the previous step's samples, not yet read back)."""
        if self.model is None:
            raise RuntimeError("this model runner was released (its engine was closed): build a new engine")
        graph_bs = self.graph_size_for(chunks)
        if input_ids is not None and not self.takes_device_ids(len(chunks)):
            raise ValueError("device input ids are only taken by graphed decode steps (or on a CPU)")
        if graph_bs:
            n = len(chunks)
            table = self._stage_decode(chunks, graph_bs)
            if input_ids is not None:
                self._dev[self.layout.ids:self.layout.ids + n].copy_(input_ids)
            self._graph_table[:n, :table.shape[1]].copy_(table, non_blocking=True)
            g = self._graphs[graph_bs]
            g.graph.replay()
            return g.logits[:n]
        inputs = self.prepare(chunks)
        if input_ids is not None:
            inputs.input_ids[:len(chunks)].copy_(input_ids)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta)
        return self.model.compute_logits(hidden[inputs.logits_indices])

    def _stage_decode(self, chunks: list[ScheduledChunk], pad_to: int) -> torch.Tensor:
        """prepare() for a graphed decode step: only what the graph reads (ids, positions,
        slots, seq_lens up to `pad_to`, the block table), in plain Python over one token
        per sequence. Returns the device block table (n, width)."""
        bs, L, h = self.block_size, self.layout, self._host_np
        self._wait_staging_copy()
        n = len(chunks)
        reqs = [c.request for c in chunks]
        pos = [c.start for c in chunks]
        ids = [r.output_token_ids[-1] if r.output_token_ids else r.prompt_token_ids[-1] for r in reqs]
        blocks = [r.block_ids for r in reqs]
        h[L.ids:L.ids + n] = ids
        h[L.pos:L.pos + n] = pos
        h[L.slots:L.slots + n] = [b[p // bs] * bs + p % bs for b, p in zip(blocks, pos)]
        h[L.seq_lens:L.seq_lens + n] = [p + 1 for p in pos]
        if pad_to > n:
            h[L.ids + n:L.ids + pad_to] = 0
            h[L.pos + n:L.pos + pad_to] = 0
            h[L.slots + n:L.slots + pad_to] = -1
            h[L.seq_lens + n:L.seq_lens + pad_to] = 0
        width = max(p // bs for p in pos) + 1
        table = h[L.table:L.table + n * width].reshape(n, width)
        for i, (b, p) in enumerate(zip(blocks, pos)):
            k = p // bs + 1
            table[i, :k] = b if len(b) == k else b[:k]
        used = L.table + n * width
        self._dev[:used].copy_(self._host[:used], non_blocking=True)
        self._staging_copied.record()
        return self._dev[L.table:L.table + n * width].view(n, width)

    def _wait_staging_copy(self) -> None:
        """The host staging buffer is rewritten only after the device has read it."""
        if self._staging_copied is not None:
            self._staging_copied.synchronize()

    def graph_size_for(self, chunks: list[ScheduledChunk]) -> int:
        """The padded batch size whose graph runs this step, or 0 when it runs eagerly."""
        if not self.has_graph_for(len(chunks)):
            return 0
        # Decode tokens only. A prompt token computed alone (a fork's last prompt token, a
        # prompt wholly in the prefix cache but its last token) runs eagerly, on the kernels
        # every prefill uses: the graphs' GEMVs round differently from cuBLAS, and a prompt
        # must give the same first token however its KV came to be (choice i of an n request
        # samples what a request seeded s + i samples, a cache hit what a cold prefill does).
        if not all(c.num_tokens == 1 and c.sample and c.start >= c.request.num_prompt_tokens for c in chunks):
            return 0
        return next(b for b in self._graph_sizes if b >= len(chunks))

    def takes_device_ids(self, num_seqs: int) -> bool:
        """Whether a decode step of `num_seqs` can take its ids from the device: graphed on
        a GPU (the eager GPU path would need them on the host for its metadata); always on
        a CPU, where "device" and host are one."""
        return self.has_graph_for(num_seqs) if self.device.type == "cuda" else 0 < num_seqs <= self.max_num_seqs

    def has_graph_for(self, num_seqs: int) -> bool:
        return bool(self._graphs) and 0 < num_seqs <= self.max_num_seqs

    def release(self) -> None:
        """Drop the decode graphs (their memory pool and the KV cache addresses baked into
        them), the weights, the KV cache and the staging buffers, so that their memory is
        freed even while something still points at this runner (the engine that owns it
        outlives its close(): see LLMEngine.close). The runner runs nothing afterwards."""
        self._graphs.clear()  # first: a graph replayed later would write into freed memory
        self._graph_sizes = []
        self._graph_table = None
        self.model = self.kv_cache = None
        self._host = self._host_np = self._dev = self._staging_copied = None

    # --- CUDA graphs ------------------------------------------------------------------
    @torch.inference_mode()
    def tune_single_row_matmuls(self, reps: int = 100) -> dict[str, float]:
        """For each weight shape of a decode step: time x @ W^T against W @ x^T for one
        row, and flag the layers to use the transposed product where it is >3% faster.
        Returns the speed-up per shape (1.0: not flipped)."""
        chosen = {}
        for name, (weight, set_flip) in self.model.single_row_matmuls().items():
            x = torch.randn(1, weight.shape[1], device=weight.device, dtype=weight.dtype)
            plain = _time_calls(lambda: x @ weight.t(), reps)
            flipped = _time_calls(lambda: torch.mm(weight, x.t()), reps)
            flip = flipped < plain * 0.97
            set_flip(flip)
            chosen[name] = plain / flipped if flip else 1.0
        log.info("single-row matmuls, speed-up of W @ x^T where taken: %s", chosen)
        return chosen

    @torch.inference_mode()
    def capture_decode_graphs(self) -> None:
        """Capture one decode graph per padded batch size, largest first, sharing one
        memory pool (a smaller graph's activations fit in the larger one's)."""
        if not self.use_graphs:
            return
        self.model.prepare_rope_cache(self.max_model_len, self.device, self.kv_cache.dtype)
        self.single_row_speedups = self.tune_single_row_matmuls()
        L, d = self.layout, self._dev
        self._graph_table = torch.zeros(self.max_num_seqs, self.max_blocks, dtype=torch.int64, device=self.device)
        # Static inputs: fixed regions of the device staging buffer, all padding for now.
        self._host_np[L.slots:L.slots + self.max_num_seqs] = -1
        self._host_np[L.seq_lens:L.seq_lens + self.max_num_seqs] = 0
        self._dev.copy_(self._host)
        pool = torch.cuda.graph_pool_handle()
        before = torch.cuda.memory_allocated(self.device)
        stream = torch.cuda.Stream(self.device)
        # The GEMVs only inside the graphs: eager steps (prefill, mixed) keep cuBLAS, so a
        # prompt's KV does not depend on whether it was prefilled alone (<= 16 tokens) or
        # in a batch, which keeps a 1P1D cluster's tokens equal to one engine's.
        gemv = decode_gemv_configs(self.device)
        self.model.use_triton_gemv(gemv)
        try:
            with programmatic_launch(pdl_wanted(self.device)):
                self._capture(pool, stream)
        finally:
            self.model.use_triton_gemv(dict.fromkeys(gemv))
        self._graph_sizes = sorted(self._graphs)
        torch.cuda.synchronize(self.device)
        self.graph_pool_bytes = torch.cuda.memory_allocated(self.device) - before
        log.info("captured %d decode CUDA graphs (batch sizes up to %d), %.0f MiB", len(self._graphs),
                 self.max_num_seqs, self.graph_pool_bytes / 2**20)

    def _capture(self, pool, stream: torch.cuda.Stream) -> None:
        L, d = self.layout, self._dev
        for bs in sorted(graph_batch_sizes(self.max_num_seqs), reverse=True):
            meta = AttentionMetadata(
                query_start_loc=list(range(bs + 1)), seq_lens=[0] * bs,
                block_tables=self._graph_table[:bs], slot_mapping=d[L.slots:L.slots + bs],
                seq_lens_t=d[L.seq_lens:L.seq_lens + bs], decode_only=True,
                query_start_loc_t=None, max_query_len=1, max_seq_len=self.max_blocks * self.block_size,
                num_kv_splits=kv_splits_for(bs, self.num_kv_heads, self.max_model_len, self.block_size,
                                            self.device))
            ids, pos = d[L.ids:L.ids + bs], d[L.pos:L.pos + bs]

            def run() -> torch.Tensor:
                return self.model.compute_logits(self.model(ids, pos, self.kv_cache, meta))

            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: Triton compiles, cuBLAS picks its kernels
                    run()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                logits = run()
            self._graphs[bs] = _DecodeGraph(graph, logits)


def _time_calls(fn, reps: int) -> float:
    """Seconds per call of a device function, after a warm-up (CUDA events)."""
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps
