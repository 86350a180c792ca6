"""Engine configuration: what the model is, how the KV cache is laid out, how to schedule.

`ModelConfig` is read from a Hugging Face `config.json`; the others are plain knobs with
defaults that suit a small CPU model and scale to GPUs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from engine.hashing import PrefixHashAlgo

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype, checkpoint_dtype: str | None = None) -> torch.dtype:
    """`auto` means the checkpoint's own dtype (float32 when it names none)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return _DTYPES.get(checkpoint_dtype or "float32", torch.float32)
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not supported: use auto, float32, bfloat16 or float16") from None


@dataclass(slots=True)
class ModelConfig:
    """The shapes and constants of a Llama-family decoder, read from `config.json`."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False          # RMSNorm on q and k per head before rope (Qwen3)
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    checkpoint_dtype: str | None = None
    name: str = ""

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], name: str = "") -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"model {name or '?'} has architectures {archs}; pdcluster supports "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        # The window is checked against the context the engine serves (LLMEngine): a window
        # at least that long is full attention, which is what pdcluster computes.
        window = _sliding_window(cfg, arch)
        unsupported = []
        if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
            unsupported.append(f"hidden_act {cfg['hidden_act']!r} (only silu)")
        if cfg.get("mlp_bias"):
            unsupported.append("mlp_bias (biases on the MLP projections)")
        if cfg.get("attention_bias") and arch != "Qwen2ForCausalLM":
            unsupported.append(f"attention_bias on {arch} (it biases o_proj too)")
        kv_heads = cfg.get("num_key_value_heads") or heads
        if heads % kv_heads:
            unsupported.append(f"{heads} attention heads over {kv_heads} KV heads (a whole number of query heads "
                               "per KV head)")
        if head_dim % 2 or head_dim < 16:
            unsupported.append(f"head_dim {head_dim} (rope needs it even; the attention kernels at least 16)")
        if unsupported:
            raise ValueError(f"model {name or '?'}: {'; '.join(unsupported)} is not supported by pdcluster")
        params = cfg.get("rope_parameters") or None
        if params is not None:  # transformers 5's form: it wins over the legacy keys, as there
            rope_theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
            rope_scaling = params if params.get("rope_type", "default") != "default" else None
        else:
            rope_theta = cfg.get("rope_theta", 10000.0)
            rope_scaling = cfg.get("rope_scaling") or None
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind == "default":
                rope_scaling = None
            elif kind != "llama3":
                raise ValueError(f"rope scaling {kind!r} is not supported (only llama3)")
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=rope_scaling,
            attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=window,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            checkpoint_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            name=name,
        )

    @classmethod
    def from_path(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file} not found: model.path must be a Hugging Face model directory "
                                    "(config.json, *.safetensors, tokenizer.json) or builtin:NAME")
        return cls.from_dict(json.loads(cfg_file.read_text()), name=str(path))


@dataclass(slots=True)
class CacheConfig:
    """Paged KV cache. `num_blocks=None` sizes the cache from `memory_fraction` of free
    device memory on GPU, or from `cpu_kv_cache_gib` on CPU."""

    block_size: int = 16
    num_blocks: int | None = None
    memory_fraction: float = 0.85
    cpu_kv_cache_gib: float = 0.25
    enable_prefix_caching: bool = True
    prefix_hash_algo: PrefixHashAlgo = "sha256_64"  # engine/hashing.py: the block hash contract
    # engine/block_pool.py: `workflow` evicts blocks of workflows with requests in flight,
    # or active within workflow_ttl_s, after every other cached block; `lru` ignores workflows.
    eviction_policy: Literal["lru", "workflow"] = "workflow"
    workflow_ttl_s: float = 60.0

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2, got {self.num_blocks}")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.eviction_policy not in ("lru", "workflow"):
            raise ValueError(f"eviction_policy {self.eviction_policy!r}: use lru or workflow")
        if self.prefix_hash_algo not in ("sha256_64", "sha256"):
            raise ValueError(f"prefix_hash_algo {self.prefix_hash_algo!r}: use sha256_64 or sha256")


@dataclass(slots=True)
class KVEventsConfig:
    """Publishing KV events (engine/kv_events.py). Port 0 picks a free port."""

    enable: bool = False
    host: str = "127.0.0.1"
    port: int = 0
    replay_port: int = 0
    topic: str = "kv-events"
    buffer_steps: int = 10_000


@dataclass(slots=True)
class SchedulerConfig:
    """Continuous batching limits. A step runs at most `max_num_seqs` requests and
    `max_num_batched_tokens` tokens; long prompts are cut into chunks to fit."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")


@dataclass(slots=True)
class EngineConfig:
    model: str = "builtin:tiny"
    dtype: str = "auto"
    device: str = "auto"  # auto: cuda when available, else cpu
    load_format: Literal["auto", "safetensors", "dummy"] = "auto"
    seed: int = 0  # for dummy weights
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # GPU: decode steps replay CUDA graphs unless True (engine/model_runner.py).
    enforce_eager: bool = False
    # Queue a plain decode step before the previous one is read back (LLMEngine._run_ahead).
    async_scheduling: bool = True
    # Compile structured-output grammars on a worker thread (nodes: a big schema must not
    # stall the other requests); False compiles in add_request, which raises on a bad one.
    background_grammar_compile: bool = False
    kv_events: KVEventsConfig = field(default_factory=KVEventsConfig)
    # KV transfer (kv_connector.config.KVTransferConfig); None: a plain engine.
    kv_transfer: Any = None
    # Overrides kv_transfer.kv_connector: a class object, or its cloudpickle bytes from the
    # parent process (see kv_connector/registry.py).
    kv_connector_spec: Any = None


def _sliding_window(cfg: dict[str, Any], arch: str) -> int | None:
    """The window some layer attends within, as transformers reads the config; None when
    every layer attends to the whole context."""
    if arch == "MistralForCausalLM":
        return cfg.get("sliding_window", 4096)   # MistralConfig's default when the key is absent
    if not cfg.get("use_sliding_window", False) or cfg.get("sliding_window") is None:
        return None
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        return cfg["sliding_window"] if "sliding_attention" in layer_types else None
    # Qwen2/Qwen3: layers from max_window_layers on slide (transformers' default 28).
    return cfg["sliding_window"] if cfg.get("max_window_layers", 28) < cfg["num_hidden_layers"] else None
