"""engine.builtin_models: the built-in tiny_checkpoints are real Hugging Face tiny_checkpoints
(transformers loads them), the same bytes everywhere, and good for comparing greedy
tokens (peaky logits, attention that depends on positions)."""

from __future__ import annotations

import hashlib
import json
import re
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from engine import builtin_models
from engine.builtin_models import PRESETS, make_model, resolve_builtin
from engine.config import ModelConfig
from engine.tokenizer import Tokenizer

TINY_PRESETS = [name for name in PRESETS if name != "llama-3-8b"]
PROMPTS = ["Hello, world! The quick brown fox", "def fibonacci(n):", "Le petit prince est un livre",
           "1 2 3 4 5 6 7 8 9 10 11 12", "The weather report for tomorrow: cloudy in the morning"]
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("builtin")
    return {name: make_model(root / name, name) for name in TINY_PRESETS}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_transformers_loads_every_preset_with_no_missing_or_unexpected_keys(tiny_checkpoints, preset):
    path = tiny_checkpoints[preset]
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert type(model).__name__ == PRESETS[preset].architecture
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tok.encode("Hello there")])
    assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_config_reads_the_same_in_pdcluster_and_transformers(tiny_checkpoints, preset):
    path, spec = tiny_checkpoints[preset], PRESETS[preset]
    ours, ref = ModelConfig.from_path(path), AutoConfig.from_pretrained(path)
    tokenizer = Tokenizer.from_pretrained(path)
    assert ours.architecture == spec.architecture
    assert (ours.hidden_size, ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.head_dim) == \
        (ref.hidden_size, ref.num_hidden_layers, ref.num_attention_heads, ref.num_key_value_heads, ref.head_dim)
    assert ours.vocab_size == ref.vocab_size >= tokenizer.vocab_size
    assert ours.tie_word_embeddings == ref.tie_word_embeddings == spec.tie_word_embeddings
    assert ours.attention_bias == spec.attention_bias and ours.qk_norm == spec.qk_norm
    assert ours.attention_bias == (preset == "tiny-qwen2") and ours.qk_norm == (preset in ("tiny-qwen3", "tiny-chat"))
    assert ours.sliding_window is None
    assert set(ours.eos_token_ids) <= tokenizer.eos_token_ids
    generation = json.loads((path / "generation_config.json").read_text())
    assert set(generation["eos_token_id"]) == tokenizer.eos_token_ids


def test_qwen3_head_dim_differs_from_hidden_over_heads(tiny_checkpoints):
    cfg = json.loads((tiny_checkpoints["tiny-qwen3"] / "config.json").read_text())
    assert cfg["head_dim"] != cfg["hidden_size"] // cfg["num_attention_heads"]


def test_weights_use_hugging_face_names(tiny_checkpoints):
    with safe_open(tiny_checkpoints["tiny-qwen2"] / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.3.self_attn.q_proj.bias",
            "model.layers.0.mlp.gate_proj.weight", "model.layers.0.post_attention_layernorm.weight"} <= names
    assert "lm_head.weight" not in names  # tied
    with safe_open(tiny_checkpoints["tiny-qwen3"] / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_norm.weight").shape == (32,)
        assert "lm_head.weight" in f.keys()


def test_same_preset_and_seed_give_the_same_bytes(tmp_path, tiny_checkpoints):
    again = make_model(tmp_path / "again", "tiny")
    for file in ["tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json",
                 "model.safetensors"]:
        assert (again / file).read_bytes() == (tiny_checkpoints["tiny"] / file).read_bytes(), file
    other_seed = make_model(tmp_path / "seed1", "tiny", seed=1)
    assert sha256(other_seed / "model.safetensors") != sha256(again / "model.safetensors")


def test_another_process_trains_the_same_tokenizer(tiny_checkpoints):
    """Two nodes of a cluster each make builtin:tiny: the tokenizer must not depend on
    hash seeds or thread scheduling."""
    code = ("import hashlib, sys; from engine.builtin_models import build_tokenizer; "
            "sys.stdout.write(hashlib.sha256(build_tokenizer().to_str(True).encode()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "123", "RAYON_NUM_THREADS": "3"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out == hashlib.sha256(builtin_models.build_tokenizer().to_str(True).encode()).hexdigest()


def test_tokenizer_is_a_byte_level_bpe_of_a_few_thousand_tokens(tiny_checkpoints):
    tok = Tokenizer.from_pretrained(tiny_checkpoints["tiny"])
    assert 2000 <= tok.vocab_size <= 4000
    text = "naïve café, 日本語, Ελληνικά, emoji 🐍 and ☕ ... and unseen ᚠᛇᚻ runes"
    assert tok.decode(tok.encode(text)) == text  # byte-level: anything round-trips
    assert len(tok.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)) <= 12


def test_tiny_weights_are_made_well_under_five_seconds(tmp_path):
    start = time.perf_counter()
    make_model(tmp_path / "t", "tiny")
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize("preset", ["tiny", "tiny-tied", "tiny-qwen2", "tiny-qwen3"])
def test_logits_are_peaky_enough_for_greedy_comparisons(tiny_checkpoints, preset):
    """Median top-1/top-2 gap far above numerical noise, and few near-ties."""
    path = tiny_checkpoints[preset]
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    gaps, own_token = [], []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tok.encode(prompt)])
            logits = model(ids).logits[0]                      # (T, V)
            top2 = logits.topk(2, dim=-1).values
            gaps.append(top2[:, 0] - top2[:, 1])
            own_token.append(logits.argmax(-1) == ids[0])
    gaps = torch.cat(gaps)
    assert gaps.median() > 0.5
    assert (gaps < 0.1).float().mean() < 0.15
    # A model that mostly predicts its input token back would hide attention bugs.
    assert torch.cat(own_token).float().mean() < 0.3


def test_greedy_tokens_depend_on_positions_through_llama3_rope_scaling(tiny_checkpoints, tmp_path):
    """The same weights with and without the llama3 rope scaling pick different tokens
    within 100 positions (original_max_position_embeddings is 256): scaling bites, and a
    rope bug would show."""
    path = tiny_checkpoints["tiny-llama3-rope"]
    unscaled = tmp_path / "unscaled"
    shutil.copytree(path, unscaled)
    cfg = json.loads((unscaled / "config.json").read_text())
    (unscaled / "config.json").write_text(json.dumps({**cfg, "rope_scaling": None}))
    ids = torch.tensor([AutoTokenizer.from_pretrained(path).encode(builtin_models.CORPUS[:400])])[:, :100]
    with torch.no_grad():
        scaled = AutoModelForCausalLM.from_pretrained(path)(ids).logits[0].argmax(-1)
        plain = AutoModelForCausalLM.from_pretrained(unscaled)(ids).logits[0].argmax(-1)
    assert (scaled != plain).float().mean() > 0.2


def test_llama_3_8b_is_config_and_tokenizer_only(tmp_path, monkeypatch):
    monkeypatch.setenv("PDCLUSTER_CACHE", str(tmp_path))
    path = resolve_builtin("builtin:llama-3-8b")
    assert not list(path.glob("*.safetensors"))
    cfg = ModelConfig.from_path(path)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size,
            cfg.vocab_size, cfg.rope_theta) == (4096, 32, 32, 8, 14336, 128256, 500000.0)
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.checkpoint_dtype == "bfloat16"
    assert AutoConfig.from_pretrained(path).num_hidden_layers == 32
    assert Tokenizer.from_pretrained(path).vocab_size < cfg.vocab_size  # ids past it decode to nothing


def test_llama_3_8b_with_weights_warns_about_the_size(tmp_path, monkeypatch):
    written = []
    monkeypatch.setattr(builtin_models, "write_weights", lambda spec, *args: written.append(spec.dtype))
    with pytest.warns(UserWarning, match="16 GB in bfloat16"):
        make_model(tmp_path / "big", "llama-3-8b", with_weights=True)
    assert written == ["bfloat16"]


def test_large_models_are_written_in_shards_with_an_index(tmp_path, tiny_checkpoints):
    out = make_model(tmp_path / "sharded", "tiny", with_weights=False)
    spec = PRESETS["tiny"]
    builtin_models.write_weights(spec, 2048, 0, out, max_shard_bytes=2 << 20)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    sharded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    single = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["tiny"]).state_dict()
    assert all(torch.equal(sharded[k], single[k]) for k in single)


# --- resolve_builtin --------------------------------------------------------------------
def test_resolve_builtin_makes_the_model_once_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PDCLUSTER_CACHE", str(tmp_path))
    path = resolve_builtin("builtin:tiny")
    assert path.parent == tmp_path / "builtin" and path.name.startswith("tiny-")
    assert (path / "model.safetensors").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_builtin("tiny") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "builtin").iterdir()] == [path.name]  # no temp folders left


def test_the_cache_folder_name_changes_with_the_generator(tmp_path, monkeypatch):
    monkeypatch.setenv("PDCLUSTER_CACHE", str(tmp_path))
    before = builtin_models.content_hash("tiny")
    monkeypatch.setattr(builtin_models, "_generator_source", lambda: b"an edited generator")
    assert builtin_models.content_hash("tiny") != before
    assert builtin_models.content_hash("tiny") != builtin_models.content_hash("tiny-tied")


def test_a_lost_race_keeps_the_winners_copy(tmp_path, monkeypatch):
    """Another process renames its copy into place while we are still writing ours."""
    monkeypatch.setenv("PDCLUSTER_CACHE", str(tmp_path))
    real_make = builtin_models.make_model
    final = tmp_path / "builtin" / f"tiny-{builtin_models.content_hash('tiny')}"

    def make_and_lose(dir, preset, **kwargs):
        real_make(final, preset, **kwargs)  # the winner
        (final / "winner").touch()
        return real_make(dir, preset, **kwargs)

    monkeypatch.setattr(builtin_models, "make_model", make_and_lose)
    assert resolve_builtin("tiny") == final
    assert (final / "winner").exists()
    assert [p.name for p in (tmp_path / "builtin").iterdir()] == [final.name]


def test_two_processes_racing_get_one_complete_model(tmp_path):
    code = ("import sys; from engine.builtin_models import resolve_builtin; "
            "sys.stdout.write(str(resolve_builtin('tiny')))")
    env = {**os.environ, "PDCLUSTER_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    paths = {p.communicate(timeout=120)[0] for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(paths) == 1
    path = Path(paths.pop())
    assert AutoModelForCausalLM.from_pretrained(path) is not None
    assert [p.name for p in (tmp_path / "builtin").iterdir()] == [path.name]


def test_unknown_names_list_the_presets(tmp_path, monkeypatch):
    monkeypatch.setenv("PDCLUSTER_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="unknown built-in model 'huge'.*tiny, tiny-tied"):
        resolve_builtin("builtin:huge")
    with pytest.raises(ValueError, match="choose one of"):
        make_model(tmp_path / "x", "huge")


def test_make_model_refuses_to_overwrite_a_checkpoint_unless_asked(tmp_path):
    path = make_model(tmp_path / "m", "tiny", with_weights=False)
    with pytest.raises(FileExistsError, match="overwrite"):
        make_model(path, "tiny")
    make_model(path, "tiny", overwrite=True)
    assert (path / "model.safetensors").is_file()


def test_make_model_command_line(tmp_path, capsys):
    assert builtin_models.main([str(tmp_path / "q"), "--preset", "tiny-qwen3", "--seed", "3"]) == 0
    assert (tmp_path / "q" / "model.safetensors").is_file()
    assert builtin_models.main([str(tmp_path / "big"), "--preset", "llama-3-8b"]) == 0
    assert not list((tmp_path / "big").glob("*.safetensors"))
    assert "load_format dummy" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert builtin_models.main([str(tmp_path / "t"), "--no-weights"]) == 0
    assert not (tmp_path / "t" / "model.safetensors").exists()


def _config(tiny_checkpoints, preset: str, **changes) -> dict:
    cfg = json.loads((tiny_checkpoints[preset] / "config.json").read_text())
    cfg.update(changes)
    return cfg


def test_rope_parameters_win_over_a_top_level_rope_theta_as_in_transformers(tiny_checkpoints):
    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    ours = ModelConfig.from_dict(_config(tiny_checkpoints, "tiny", rope_theta=10000.0, rope_parameters=llama3))
    assert ours.rope_theta == 500000.0 and ours.rope_scaling["rope_type"] == "llama3"
    with pytest.raises(ValueError, match="rope scaling 'yarn' is not supported"):
        ModelConfig.from_dict(_config(tiny_checkpoints, "tiny", rope_theta=10000.0,
                                      rope_parameters={"rope_type": "yarn", "factor": 4.0}))


@pytest.mark.parametrize("changes, message", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' (only silu)"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"attention_bias": True}, "attention_bias on LlamaForCausalLM (it biases o_proj too)"),
    ({"num_attention_heads": 6, "num_key_value_heads": 4, "head_dim": 16}, "6 attention heads over 4 KV heads"),
    ({"head_dim": 10}, "head_dim 10"),
    ({"head_dim": 18 + 1}, "head_dim 19"),
])
def test_config_fields_that_would_change_the_computation_are_refused_by_name(tiny_checkpoints, changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig.from_dict(_config(tiny_checkpoints, "tiny", **changes))


_ABSENT = object()


@pytest.mark.parametrize("arch, changes", [
    ("MistralForCausalLM", {"sliding_window": _ABSENT}),     # MistralConfig's default: 4096
    ("MistralForCausalLM", {"sliding_window": None}),
    ("MistralForCausalLM", {"sliding_window": 64}),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 2}),   # none slides
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1}),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 64}),   # max_window_layers 28: none
    ("Qwen2ForCausalLM", {"use_sliding_window": False, "sliding_window": 64, "max_window_layers": 0}),
])
def test_the_sliding_window_is_read_as_transformers_reads_it(tiny_checkpoints, arch, changes):
    from transformers import MistralConfig, Qwen2Config

    cfg = _config(tiny_checkpoints, "tiny", architectures=[arch], num_hidden_layers=2)
    cfg.pop("sliding_window", None)
    cfg.update({k: v for k, v in changes.items() if v is not _ABSENT})
    reference = (MistralConfig if arch == "MistralForCausalLM" else Qwen2Config)(**cfg)
    layer_types = getattr(reference, "layer_types", None) or ["sliding_attention"] * 2
    want = reference.sliding_window if "sliding_attention" in layer_types else None
    assert ModelConfig.from_dict(cfg).sliding_window == want


def test_a_sliding_window_shorter_than_the_served_context_is_refused(tiny_checkpoints, tmp_path):
    from engine import LLM

    path = tmp_path / "mistral-window"
    shutil.copytree(tiny_checkpoints["tiny-mistral"], path)
    (path / "config.json").write_text(json.dumps(_config(tiny_checkpoints, "tiny-mistral", sliding_window=64,
                                                         max_position_embeddings=64)))
    with pytest.raises(ValueError, match=r"sliding-window attention \(64 tokens\) and would serve 256"):
        LLM(str(path), dtype="float32", device="cpu", num_blocks=32, max_model_len=256)
    llm = LLM(str(path), dtype="float32", device="cpu", num_blocks=32, max_model_len=64)  # full attention == window
    assert llm.engine.max_model_len == 64


def test_a_fused_projection_of_the_wrong_shape_is_refused_by_its_checkpoint_name(tiny_checkpoints):
    from safetensors.torch import load_file

    from engine.models.llama import LlamaForCausalLM

    cfg = ModelConfig.from_path(tiny_checkpoints["tiny"])
    model = LlamaForCausalLM(cfg)
    weights = load_file(str(next(tiny_checkpoints["tiny"].glob("*.safetensors"))))
    name = next(n for n in weights if n.endswith("layers.0.self_attn.k_proj.weight"))
    weights[name] = weights[name][:1]  # broadcastable: a copy_ would have filled the slice silently
    with pytest.raises(ValueError, match=re.escape(f"checkpoint tensor {name} has shape")):
        model.load_weights(weights.items())
