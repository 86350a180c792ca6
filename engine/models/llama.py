"""The Llama family in one module: Llama, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norm).

Tokens arrive flattened, (T,), from every sequence of the step; attention finds each
sequence's keys in the paged cache through AttentionMetadata. Projections are fused
(q|k|v and gate|up) at load time: fewer, larger matrix products.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from kernels.activation import silu_and_mul
from kernels.attention import AttentionMetadata, paged_attention
from kernels.gemv import MAX_ROWS as GEMV_MAX_ROWS
from kernels.gemv import GemvConfig, gemv
from kernels.norm import fused_add_rms_norm, rms_norm
from kernels.rope import rope_and_write_kv, rope_cos_sin, rope_inv_freq


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """F.linear, or, for a single row when the layer is flagged, W @ x^T: for one token
    cuBLAS may pick a faster (GEMV-like) kernel for the transposed product, and (N, 1)
    and (1, N) share one layout, so no copy is needed. Which is faster depends on the
    shape and the GPU: ModelRunner measures both at start (tune_single_row_matmuls).
    A layer given a `triton_gemv` launch shape (LlamaForCausalLM.use_triton_gemv) takes
    kernels/gemv.py's Triton GEMV for up to GEMV_MAX_ROWS rows instead."""
    gemv_config = getattr(layer, "triton_gemv", None)
    if gemv_config is not None and x.shape[0] <= GEMV_MAX_ROWS:
        return gemv(x, layer.weight, layer.bias, config=gemv_config)
    if x.shape[0] == 1 and getattr(layer, "flip_single_row", False):
        out = torch.mm(layer.weight, x.t()).view(1, -1)
        return out if layer.bias is None else out + layer.bias
    return F.linear(x, layer.weight, layer.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual) in one pass over the activations."""
        return fused_add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = linear(self.qkv_proj, x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)      # (T, Hq, D)
        k = k.view(t, self.num_kv_heads, self.head_dim)   # (T, Hkv, D)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope_and_write_kv(q, k, v, cos, sin, kv_cache, self.layer, meta.slot_mapping)
        out = paged_attention(q, kv_cache, self.layer, meta, self.scale)  # (T, Hq, D)
        return linear(self.o_proj, out.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.down_proj, silu_and_mul(linear(self.gate_up_proj, x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, residual, cos, sin, kv_cache, meta):
        # h: the previous layer's output, not yet added to the residual stream (None for the
        # first layer, whose input is the residual itself). Same sums as x + f(norm(x)).
        if h is None:
            x = self.input_layernorm(residual)
        else:
            x, residual = self.input_layernorm.add_and_norm(h, residual)
        h = self.self_attn(x, cos, sin, kv_cache, meta)
        x, residual = self.post_attention_layernorm.add_and_norm(h, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    """Serves LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM:
    they differ only in the flags ModelConfig carries (bias, q/k norm, tying)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._inv_freq: torch.Tensor | None = None  # computed on first use, on the right device
        self.flip_single_row_logits = False  # see `linear`
        self.lm_head_gemv: GemvConfig | None = None  # see use_triton_gemv
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None  # see prepare_rope_cache

    def prepare_rope_cache(self, max_positions: int, device: torch.device, dtype: torch.dtype) -> None:
        """Precompute cos/sin for positions [0, max_positions): the same values rope_cos_sin
        gives per step (same operations per element), looked up instead of recomputed. The
        model runner calls it on a GPU, where a decode step's small kernels add up."""
        inv = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling, device=device)
        self._rope_cache = rope_cos_sin(torch.arange(max_positions, device=device), inv, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        # input_ids, positions: (T,) -> hidden states (T, hidden)
        if self._inv_freq is None or self._inv_freq.device != input_ids.device:
            self._inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling,
                                           device=input_ids.device)
        residual = self.embed_tokens(input_ids)
        if self._rope_cache is not None:  # (P, D) tables: two gathers instead of ~7 kernels a step
            cos, sin = self._rope_cache[0][positions], self._rope_cache[1][positions]
        else:
            cos, sin = rope_cos_sin(positions, self._inv_freq, residual.dtype)
        h = None
        for layer in self.layers:
            h, residual = layer(h, residual, cos, sin, kv_cache, meta)
        return self.norm.add_and_norm(h, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: (S, hidden) -> float32 logits (S, V)
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if self.lm_head_gemv is not None and hidden.shape[0] <= GEMV_MAX_ROWS:
            return gemv(hidden, weight, config=self.lm_head_gemv).float()
        if hidden.shape[0] == 1 and self.flip_single_row_logits:
            return torch.mm(weight, hidden.t()).view(1, -1).float()
        return (hidden @ weight.t()).float()

    def projections(self, layer: DecoderLayer) -> dict[str, nn.Linear]:
        """A decoder layer's weight products by the names the runner's settings use."""
        return {"qkv": layer.self_attn.qkv_proj, "o": layer.self_attn.o_proj,
                "gate_up": layer.mlp.gate_up_proj, "down": layer.mlp.down_proj}

    def use_triton_gemv(self, configs: dict[str, GemvConfig | None]) -> None:
        """The named projections (see `projections`) of every layer take the Triton GEMV with
        the given launch shape at up to GEMV_MAX_ROWS rows, "lm_head" the logits' product;
        None: cuBLAS."""
        self.lm_head_gemv = configs.get("lm_head", self.lm_head_gemv)
        for layer in self.layers:
            for name, lin in self.projections(layer).items():
                if name in configs:
                    lin.triton_gemv = configs[name]

    def single_row_matmuls(self) -> dict[str, tuple[torch.Tensor, object]]:
        """Each distinct weight shape of a decode step, with a setter for its flip flag
        (see `linear`): what ModelRunner.tune_single_row_matmuls measures."""
        out = {}
        for name, lin in self.projections(self.layers[0]).items():
            def setter(flag, attr=name):
                for layer in self.layers:
                    self.projections(layer)[attr].flip_single_row = flag
            out[name] = (lin.weight, setter)
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        out["lm_head"] = (weight, lambda flag: setattr(self, "flip_single_row_logits", flag))
        return out

    # --- weights --------------------------------------------------------------------
    _STACKED = {  # HF name piece -> (our name piece, shard index)
        ".q_proj.": (".qkv_proj.", 0), ".k_proj.": (".qkv_proj.", 1), ".v_proj.": (".qkv_proj.", 2),
        ".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1),
    }

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the fused parameters; every parameter
        must be written exactly once, and unknown names are an error."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied checkpoints sometimes store both
            for piece, (fused, shard) in self._STACKED.items():
                if piece in name:
                    name = name.replace(piece, fused)
                    param = params.get(name)
                    if param is None:
                        raise ValueError(f"checkpoint tensor {hf_name} has no place in {self.cfg.architecture}")
                    view = self._shard_view(param, name, shard)
                    if view.shape != tensor.shape:
                        raise ValueError(f"checkpoint tensor {hf_name} has shape {tuple(tensor.shape)}, the model "
                                         f"expects {tuple(view.shape)}: is config.json from this checkpoint?")
                    view.copy_(tensor)
                    loaded.add(f"{name}#{shard}")
                    break
            else:
                param = params.get(name)
                if param is None:
                    raise ValueError(f"checkpoint tensor {hf_name} has no place in {self.cfg.architecture}")
                if param.shape != tensor.shape:
                    raise ValueError(f"checkpoint tensor {hf_name} has shape {tuple(tensor.shape)}, "
                                     f"the model expects {tuple(param.shape)}: is config.json from this checkpoint?")
                param.data.copy_(tensor)
                loaded.add(name)
        missing = [n for n in self.expected_weight_keys() if n not in loaded]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")

    def expected_weight_keys(self) -> list[str]:
        keys = []
        for name, _ in self.named_parameters():
            if ".qkv_proj." in name:
                keys += [f"{name}#{i}" for i in range(3)]
            elif ".gate_up_proj." in name:
                keys += [f"{name}#{i}" for i in range(2)]
            else:
                keys.append(name)
        return keys

    def _shard_view(self, param: torch.Tensor, name: str, shard: int) -> torch.Tensor:
        if ".qkv_proj." in name:
            a = self.layers[0].self_attn
            sizes = [a.q_size, a.kv_size, a.kv_size]
        else:
            sizes = [self.cfg.intermediate_size] * 2
        start = sum(sizes[:shard])
        return param.data.narrow(0, start, sizes[shard])


MODEL_CLASSES = {arch: LlamaForCausalLM for arch in
                 ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")}
