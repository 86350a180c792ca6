"""`pdcluster plan CLUSTER_YAML`: how much KV cache each node gets, before starting it.

Per node: the bytes of one KV block, how many blocks fit, the longest context that fits
(one request using the whole cache), and how many requests of a workload fit at once,
without prefix sharing and with the expected sharing. The question of vLLM issue 16118
("will max_model_len fit?") answered before a GPU is touched: a node whose configured
`max_model_len` cannot fit is an error (the engine would refuse to start, naming the
same largest length), one whose model context is merely longer than the cache a warning
(the engine serves at most what fits).

How the figures are reckoned (the engine's own rules, engine/llm_engine.py):

* block bytes = layers x 2 (K and V) x block_size x kv_heads x head_dim x dtype size;
* blocks = `num_blocks` when set; on CPU `cpu_kv_cache_gib` / block bytes; on a GPU
  (free memory after the weights x `memory_fraction` - headroom) / block bytes, the
  headroom being 2 GiB plus, unless `enforce_eager`, the decode CUDA graphs' pool
  (engine/kv_cache.py `gpu_kv_budget_bytes`, the engine's own function), free memory
  asked of the GPU when this machine sees it, else `--gpu-memory-gib` minus the weights
  (their size from the config's shapes);
* a request of P prompt and O output tokens holds ceil((P + O) / block_size) blocks;
  without sharing, floor(blocks / that) requests fit (at most max_num_seqs);
* with prefix sharing at hit rate R, the first floor(R x P / block_size) blocks of a
  prompt are a prefix other requests share: each of the workload's distinct prefixes
  (its system prompts) is held once, and every request adds only its own blocks.

The hit rate R is `--prefix-hit-rate`, else the workload's own ideal one: the share of
prompt tokens whose leading blocks an earlier request of the workload already had (what
an unbounded prefix cache would hit).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.config import ClusterConfig, NodeSpec

GIB = 1 << 30


@dataclass(slots=True)
class WorkloadShape:
    name: str
    mean_prompt_tokens: float
    mean_output_tokens: float
    ideal_hit_rate: float       # prompt tokens an unbounded prefix cache would serve
    distinct_prefixes: int      # prefixes the shared blocks belong to (system prompts)


@dataclass(slots=True)
class NodePlan:
    node: str
    device: str
    dtype: str
    block_size: int
    block_bytes: int
    num_blocks: int
    kv_cache_bytes: int
    max_len_that_fits: int
    max_model_len: int                 # what the node will serve
    configured_max_model_len: int | None
    concurrent_without_sharing: int    # requests of the workload's size the cache holds at once
    concurrent_with_sharing: int
    max_num_seqs: int                  # the scheduler's own cap on top
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def weight_bytes(model: Any, itemsize: int) -> int:
    """Parameters of a Llama-family decoder from its shapes, times the dtype size."""
    h, layers = model.hidden_size, model.num_layers
    q, kv = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    per_layer = h * q * 2 + h * kv * 2 + 3 * h * model.intermediate_size + 2 * h
    embed = model.vocab_size * h * (1 if model.tie_word_embeddings else 2)
    return (layers * per_layer + embed + h) * itemsize


def plan_node(spec: NodeSpec, model: Any, dtype: Any, workload: WorkloadShape, hit_rate: float,
              gpu_memory_gib: float | None = None) -> NodePlan:
    from engine.kv_cache import KVCacheSpec, gpu_kv_budget_bytes

    e = spec.engine
    block_bytes = KVCacheSpec.bytes_per_block(model, e.block_size, dtype)
    problems, warnings = [], []
    if e.num_blocks is not None:
        num_blocks = e.num_blocks
    elif spec.device == "cpu":
        num_blocks = int(e.cpu_kv_cache_gib * GIB) // block_bytes
    else:
        free = _gpu_free_bytes(spec.device, gpu_memory_gib)
        if free is None:
            problems.append(f"{spec.device} is not visible here: give --gpu-memory-gib (the GPU's memory) "
                            "or engine.num_blocks")
            num_blocks = 0
        else:
            free -= weight_bytes(model, dtype.itemsize)
            budget = gpu_kv_budget_bytes(free, e.memory_fraction, model, e.max_num_seqs, e.enforce_eager)
            num_blocks = budget // block_bytes
    if num_blocks < 2 and not problems:
        problems.append(f"the KV cache holds {num_blocks} blocks of {block_bytes / 2**20:.2f} MiB (at least 2 are "
                        "needed): give it more memory (cpu_kv_cache_gib, memory_fraction) or lower block_size")
    fits = num_blocks * e.block_size
    model_len = model.max_position_embeddings
    served = e.max_model_len or model_len
    if problems:  # the cache size is unknown: nothing more to say
        pass
    elif e.max_model_len is not None and e.max_model_len > fits:
        problems.append(f"max_model_len {e.max_model_len} cannot fit: the KV cache holds at most {fits} tokens; "
                        f"set max_model_len to {fits} or less, or give the KV cache more memory")
        served = fits
    elif e.max_model_len is None and model_len > fits:
        warnings.append(f"the model's context of {model_len} tokens does not fit: the node serves at most {fits} "
                        "tokens (set max_model_len to say so)")
        served = fits
    prompt = min(workload.mean_prompt_tokens, served)
    output = min(workload.mean_output_tokens, max(served - prompt, 0))
    per_request = max(1, math.ceil((prompt + output) / e.block_size))
    shared = min(int(hit_rate * prompt) // e.block_size, per_request - 1)
    without = num_blocks // per_request
    room = num_blocks - workload.distinct_prefixes * shared
    with_sharing = max(room, 0) // (per_request - shared) if shared > 0 else without
    return NodePlan(spec.name, spec.device, str(dtype).removeprefix("torch."), e.block_size, block_bytes, num_blocks,
                    num_blocks * block_bytes, fits, served, e.max_model_len, without, max(with_sharing, without),
                    e.max_num_seqs, problems, warnings)


def _gpu_free_bytes(device: str, gpu_memory_gib: float | None) -> int | None:
    if gpu_memory_gib is not None:
        return int(gpu_memory_gib * GIB)
    import torch

    if not torch.cuda.is_available():
        return None
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        return None
    free, _ = torch.cuda.mem_get_info(index)
    return free


def workload_shape(name: str, vocab_size: int, max_model_len: int, block_size: int, **options: Any) -> WorkloadShape:
    """Mean lengths and the ideal prefix hit rate of a bench workload (bench/workloads.py)."""
    from bench.workloads import WorkloadOptions, make_workload
    from engine.hashing import prefix_block_hashes

    opts = WorkloadOptions(num_requests=200, vocab_size=vocab_size, max_model_len=max_model_len,
                           **{k: v for k, v in options.items() if v is not None})
    requests = make_workload(name, opts)
    seen: set[int] = set()
    hit = total = 0
    for r in requests:
        hashes = prefix_block_hashes(r.prompt_ids, block_size)
        n = 0
        while n < len(hashes) and hashes[n] in seen:
            n += 1
        hit += n * block_size
        total += r.prompt_len
        seen.update(hashes)
    distinct = opts.num_system_prompts if name == "prefix-agents" else 1
    return WorkloadShape(name, sum(r.prompt_len for r in requests) / len(requests),
                         sum(r.max_tokens for r in requests) / len(requests), hit / max(total, 1), distinct)


def run_plan(config: ClusterConfig, workload: str = "fixed", prefix_hit_rate: float | None = None,
             gpu_memory_gib: float | None = None, input_len: int | None = None, output_len: int | None = None,
             out=None) -> int:
    """Print the plan; 0 when every node can serve, 1 when one cannot."""
    from rich.console import Console
    from rich.table import Table

    from engine.config import ModelConfig, parse_dtype
    from engine.llm_engine import resolve_model_path

    console = Console(file=out or sys.stdout, width=160)
    model_dir = resolve_model_path(config.model.path)
    model = ModelConfig.from_path(model_dir)
    dtype = parse_dtype(config.model.dtype, model.checkpoint_dtype)
    specs = config.node_specs()  # `auto` devices resolve as `pdcluster up` would on this machine
    if config.backend == "local":
        specs = config.share_gpus(specs)  # nodes of one GPU split its KV memory, as `pdcluster up` does
    block_size = specs[0].engine.block_size
    shape = workload_shape(workload, model.vocab_size, config.engine.max_model_len or model.max_position_embeddings,
                           block_size, input_len=input_len, output_len=output_len)
    rate = shape.ideal_hit_rate if prefix_hit_rate is None else prefix_hit_rate
    plans = [plan_node(s, model, dtype, shape, rate, gpu_memory_gib) for s in specs]
    table = Table(title=f"{Path(str(model_dir)).name}: KV cache per node")
    for col in ("node", "device", "KV dtype", "block", "KV blocks", "KV cache", "longest fit", "max_model_len",
                "concurrent", f"with {100 * rate:.0f}% prefix hits"):
        table.add_column(col, justify="left" if col in ("node", "device", "KV dtype") else "right")
    for p in plans:
        table.add_row(p.node, p.device, p.dtype, f"{p.block_size} tok, {p.block_bytes / 2**10:.0f} KiB",
                      str(p.num_blocks), f"{p.kv_cache_bytes / GIB:.2f} GiB", f"{p.max_len_that_fits} tok",
                      f"{p.max_model_len}", _capped(p.concurrent_without_sharing, p.max_num_seqs),
                      _capped(p.concurrent_with_sharing, p.max_num_seqs))
    console.print(table, markup=False)
    console.print(f"Workload `{shape.name}`: mean prompt {shape.mean_prompt_tokens:.0f} tokens, mean output "
                  f"{shape.mean_output_tokens:.0f} tokens; prefix hit rate {100 * rate:.0f}% "
                  f"({'given' if prefix_hit_rate is not None else 'the workload ideal'}). Concurrent: requests "
                  "of that size the KV cache holds at once; the scheduler runs at most max_num_seqs of them.",
                  markup=False, highlight=False)
    for p in plans:
        for w in p.warnings:
            console.print(f"warning: {p.node}: {w}", markup=False, highlight=False)
        for e in p.problems:
            console.print(f"error: {p.node}: {e}", markup=False, highlight=False)
    return 1 if any(p.problems for p in plans) else 0


def _capped(n: int, max_num_seqs: int) -> str:
    return f"{n} (runs {max_num_seqs})" if n > max_num_seqs else str(n)
