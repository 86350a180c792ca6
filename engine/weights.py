"""Weight loading: Hugging Face safetensors directories (one file or sharded with an
index), or `dummy` random weights of the config's shapes for benchmarks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import ModelConfig
from engine.models.llama import MODEL_CLASSES, LlamaForCausalLM


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not there: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}: pdcluster loads safetensors checkpoints only "
                                "(or set load_format: dummy for random weights)")
    return files


def iter_safetensors(path: Path, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    for file in safetensors_files(path):
        with safe_open(file, framework="pt", device=device) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def build_model(cfg: ModelConfig, path: Path | None, dtype: torch.dtype, device: torch.device,
                load_format: str = "auto", seed: int = 0) -> LlamaForCausalLM:
    """Build the model on `device` in `dtype` without a float32 copy on the way: the
    module is made on the meta device, given empty storage, then filled."""
    cls = MODEL_CLASSES[cfg.architecture]
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    elif load_format in ("auto", "safetensors"):
        if path is None:
            raise ValueError("load_format auto needs a model directory")
        model.load_weights(iter_safetensors(path, device="cpu"))
    else:
        raise ValueError(f"load_format {load_format!r} is not supported: use auto, safetensors or dummy")
    return model.eval()


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """Random weights, reproducible for a seed. Norm weights are ones so activations keep
    a sane scale; matrices get small uniform values (the shapes and bytes are what a
    benchmark needs, not the values)."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            # Drawn on the parameter's own device: an 8B model fills in seconds on a GPU.
            gen = gens.get(p.device)
            if gen is None:
                gen = gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            p.uniform_(-0.02, 0.02, generator=gen)
