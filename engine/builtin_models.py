"""Built-in checkpoints: small Hugging Face-format models made on the spot, no network.

`make_model(dir, preset)` writes what a Hugging Face model directory holds (config.json,
generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json), so the
engine, the tests and `transformers` all load it the same way as a downloaded model.
`resolve_builtin(name)` does that once per machine into a cache folder, for
`model: builtin:NAME`.

Everything is deterministic: the tokenizer is a byte-level BPE trained on the corpus in
this module, and the weights come from a seeded `torch.Generator`, so two nodes of a
cluster that each make `builtin:tiny` get the same bytes (given the same torch and
tokenizers versions). The weights are random, but scaled so that the logits are peaky:
comparisons of greedy tokens across implementations and batchings need clear winners,
and a random model with flat logits has near-ties everywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

log = logging.getLogger(__name__)

BOS_TOKEN = "<|begin_of_text|>"
END_OF_TEXT_TOKEN = "<|end_of_text|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
# Appended after the trained vocabulary (which starts with the 256 byte symbols), as in
# Llama 3 and Qwen.
SPECIAL_TOKENS = (BOS_TOKEN, END_OF_TEXT_TOKEN, IM_START_TOKEN, IM_END_TOKEN, PAD_TOKEN)
TOKENIZER_VOCAB_SIZE = 2048  # trained BPE + special tokens; the corpus supports ~2400

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Reasoning and tool-call markers (Qwen3's): plain added tokens, not special, so that
# decoding keeps them in the text for the router's reasoning and tool parsers to read.
AGENT_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>")

# A Qwen3-style template: `tools` rendered into the system turn (hermes format),
# assistant tool calls and tool results rendered back, and `enable_thinking=False`
# closing the reasoning in the prompt as Qwen3's template does.
AGENT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|im_start|>system\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ '# Tools\\nYou may call functions. Signatures:\\n<tools>\\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}"
    "{{ '</tools>\\nFor each call write <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and tools %}{% elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') }}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{{ '<tool_call>' }}{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "{{ '</tool_call>' }}{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)

# Standard deviation of the logits we aim for (the final RMSNorm's output has RMS 1, so
# a head with std s over hidden size H gives logits of std s * sqrt(H)). Over 2k
# candidates the top-1/top-2 gap is then ~1.2 at the median and below 0.1 about 5% of
# the time (measured with transformers; see tests/test_builtin_models.py).
TARGET_LOGIT_STD = 6.0


@dataclass(frozen=True, slots=True)
class Preset:
    """The shapes of one built-in model. `vocab_size=None` means the tokenizer's size."""

    architecture: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    qk_norm: bool = False          # per-head RMSNorm on q and k (Qwen3)
    rms_norm_eps: float = 1e-5
    dtype: str = "float32"
    # Whether `resolve_builtin` writes weights: a preset of real-model size is meant for
    # `load_format: dummy`, with config and tokenizer only.
    default_with_weights: bool = True
    # Added (non-special) tokens after the special ones, and the chat template.
    extra_tokens: tuple[str, ...] = ()
    chat_template: str = CHAT_TEMPLATE


_TINY = dict(architecture="LlamaForCausalLM", model_type="llama", hidden_size=128, intermediate_size=384,
             num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(**_TINY),
    "tiny-tied": Preset(**_TINY, tie_word_embeddings=True),
    # original_max_position_embeddings 256 makes the llama3 scaling bite at short lengths.
    "tiny-llama3-rope": Preset(**_TINY, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256}),
    "tiny-mistral": Preset(**{**_TINY, "architecture": "MistralForCausalLM", "model_type": "mistral"}),
    "tiny-qwen2": Preset(**{**_TINY, "architecture": "Qwen2ForCausalLM", "model_type": "qwen2"},
                         tie_word_embeddings=True, attention_bias=True, rope_theta=1000000.0, rms_norm_eps=1e-6),
    # head_dim 32 with 8 heads over hidden 128: q/o projections are not square.
    "tiny-qwen3": Preset(architecture="Qwen3ForCausalLM", model_type="qwen3", hidden_size=128,
                         intermediate_size=384, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32,
                         qk_norm=True, rope_theta=1000000.0, rms_norm_eps=1e-6),
    # tiny-qwen3 with Qwen3's <think> and <tool_call> tokens and a template that takes
    # `tools`: for reasoning parsers, tool calls and structured output over them.
    "tiny-chat": Preset(architecture="Qwen3ForCausalLM", model_type="qwen3", hidden_size=128,
                        intermediate_size=384, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32,
                        qk_norm=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
                        extra_tokens=AGENT_TOKENS, chat_template=AGENT_CHAT_TEMPLATE),
    # Llama 3.1 8B: the llama3 rope scaling stretches its 8k training context to 128k.
    "llama-3-8b": Preset(architecture="LlamaForCausalLM", model_type="llama", hidden_size=4096,
                         intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                         vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         dtype="bfloat16", default_with_weights=False),
}

# Training text for the tokenizer: varied enough that prose, code, numbers and a few
# scripts besides Latin get sensible merges.
CORPUS = r'''
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness.
Once upon a time, in a small village by the sea, there lived an old fisherman and his daughter. Every morning
they rowed out past the lighthouse, cast their nets, and sang songs their grandparents had taught them.
The weather report for tomorrow: cloudy in the morning, with a chance of rain in the afternoon. Winds from the
north-west at 15 to 20 kilometres per hour. Temperatures between 12 and 18 degrees Celsius.
Scientists have discovered that the ocean absorbs about a quarter of the carbon dioxide released by humans.
The committee will meet on Thursday to discuss the budget, the new hiring plan, and the office move.
Please remember to bring your passport, your boarding pass, and a charger for your phone.
"Where are you going?" she asked. "To the market," he replied, "and then to the library, if it's still open."
I think, therefore I am. To be, or not to be, that is the question. All that glitters is not gold.
Knowledge is power. Time is money. Practice makes perfect. Actions speak louder than words.
The history of computing is a history of abstraction: from vacuum tubes to transistors, from machine code to
assembly, from assembly to high-level languages, and from single machines to clusters of thousands of servers.
A language model predicts the next token given the previous ones. During training it sees billions of tokens;
during inference it generates one token at a time, reusing the keys and values it has already computed.
Serving large models efficiently requires batching many requests together, managing memory carefully, and
splitting the work of reading the prompt (prefill) from the work of writing the answer (decode).
The cat sat on the mat. The dog lay by the door. The bird sang in the tree. The children played in the park.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. January, February, March, April, May, June,
July, August, September, October, November, December. Spring, summer, autumn, winter.
One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, twenty, thirty, hundred, thousand.
Red, orange, yellow, green, blue, indigo, violet, black, white, grey, brown, pink, purple.
What is the capital of France? The capital of France is Paris. What is two plus two? Two plus two is four.
How do I reverse a list in Python? You can use slicing, like items[::-1], or call items.reverse() in place.
Can you summarize this article? Sure! The article argues that cities should invest in public transport.
Thank you very much for your help. You're welcome! Let me know if there is anything else I can do.
Dear Sir or Madam, I am writing to inquire about the position advertised on your website last week.
Water boils at 100 degrees Celsius at sea level and freezes at 0 degrees. Light travels at about 299,792 km/s.
The population of the city grew from 1,250,000 in 1990 to 2,730,500 in 2020, an increase of 118.4 percent.
Order #48213 shipped on 2024-03-15 at 09:42:17 UTC; expected delivery 2024-03-19. Total: $1,049.99 (tax incl.)
Call +1 (555) 010-2233 or email support@example.com. Version 3.11.4, build 20240517, commit a1b2c3d4e5f6.
Pi is approximately 3.14159265358979, e is about 2.71828182845904, and the square root of two is 1.41421356.
0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 32 64 100 128 256 512 1000 1024 2048 4096 8192 65536
1st 2nd 3rd 4th 5th 10th 50% 75% 99.9% 3/4 1/2 x^2 + y^2 = z^2 a*b - c/d >= 0 <= != == && || ++ -- += -=

def fibonacci(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from empty stack")
        return self.items.pop()


import json
import os
from pathlib import Path

with open("config.json", "r", encoding="utf-8") as f:
    config = json.load(f)
print(f"loaded {len(config)} keys from {os.getcwd()}")
result = {key: value for key, value in config.items() if value is not None}
numbers = [x * x for x in range(10) if x % 2 == 0]

#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    int total = 0;
    for (int i = 0; i < argc; i++) {
        total += atoi(argv[i]);
    }
    printf("total = %d\n", total);
    return 0;
}

function greet(name) {
  const message = `Hello, ${name}!`;
  console.log(message);
  return message.length;
}

fn main() {
    let v: Vec<u32> = (1..=10).map(|x| x * 2).collect();
    println!("{:?}", v);
}

SELECT id, name, email FROM users WHERE created_at > '2023-01-01' ORDER BY name ASC LIMIT 10;
{"model": "tiny", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16, "temperature": 0.7}
<html><head><title>Example</title></head><body><p class="note">Hello, world!</p></body></html>
$ pip install -e ".[test]" && pytest -q tests/ --timeout=60
git commit -m "Fix off-by-one error in the block allocator"
[section]
key = value
path = /usr/local/bin
timeout_ms = 5000

- item one
- item two
  * nested item
1. First step
2. Second step
# Heading
## Subheading
**bold** and _italic_ and `code`

Le petit prince est un livre écrit par Antoine de Saint-Exupéry. Où est la gare ? Ça va très bien, merci.
Café, crème brûlée, déjà vu, naïve, façade, résumé, fiancée, élève, hôtel, forêt, garçon, cœur.
Der schnelle braune Fuchs springt über den faulen Hund. Grüße aus München! Straße, Mädchen, schön, Größe.
El rápido zorro marrón salta sobre el perro perezoso. ¿Dónde está la biblioteca? ¡Qué bonito día! Mañana, niño.
Il gatto è sulla sedia. Perché no? Città, università, caffè. A raposa rápida pulou. Não, obrigado. Coração.
Szybki brązowy lis. Český jazyk. Ελληνικά: γειά σου κόσμε, καλημέρα, ευχαριστώ. Αλφα, βήτα, γάμμα, δέλτα.
Русский язык: привет, мир! Как дела? Спасибо, хорошо. Москва, Санкт-Петербург, книга, вода, солнце.
日本語のテキスト：こんにちは、世界。今日はいい天気ですね。ありがとうございます。東京、大阪、京都。
中文文本：你好，世界。今天天气很好。谢谢你的帮助。北京、上海、广州。我们一起学习。
한국어: 안녕하세요, 세계. 감사합니다. 서울, 부산. العربية: مرحبا بالعالم. שלום עולם. नमस्ते दुनिया।
Symbols and emoji: © ® ™ € £ ¥ ° ± × ÷ → ← ↑ ↓ ∞ ≈ ≠ ≤ ≥ √ ∑ ∫ α β γ δ λ μ π σ Ω … “quotes” ‘single’ — –
😀 😂 🙂 😍 🤔 👍 🙏 🎉 🔥 ❤️ ✨ 🚀 🌍 🐍 🍕 ☕ 🌟 💡 ✅ ❌ 👋🏽 👨‍👩‍👧 🇫🇷
'''


@cache
def _generator_source() -> bytes:
    return Path(__file__).read_bytes()


def content_hash(name: str) -> str:
    """A short hash of what decides the bytes of built-in model `name`: this module's
    source (presets, corpus, init) and the name. Any edit here gives a new cache folder,
    so a stale checkpoint is never reused."""
    return hashlib.sha256(_generator_source() + b"\0" + name.encode()).hexdigest()[:10]


# --- tokenizer -----------------------------------------------------------------------
def build_tokenizer(extra_tokens: tuple[str, ...] = ()) -> Tokenizer:
    """Train the byte-level BPE on CORPUS. Deterministic: the trainer breaks ties between
    equally frequent pairs by token id, and ids come from the sorted byte alphabet."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB_SIZE - len(SPECIAL_TOKENS), min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # One training sequence per line.
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    if extra_tokens:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra_tokens])
    bos_id = tok.token_to_id(BOS_TOKEN)
    # Like Llama 3: `encode(text)` starts with <|begin_of_text|>.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0", pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos_id)])
    return tok


def tokenizer_config(chat_template: str = CHAT_TEMPLATE) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": IM_END_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "chat_template": chat_template,
    }


# --- config --------------------------------------------------------------------------
def model_config(preset: Preset, vocab_size: int, token_ids: dict[str, int]) -> dict[str, Any]:
    """config.json in the keys transformers' Llama/Mistral/Qwen2/Qwen3 configs read."""
    cfg: dict[str, Any] = {
        "architectures": [preset.architecture],
        "model_type": preset.model_type,
        "hidden_size": preset.hidden_size,
        "intermediate_size": preset.intermediate_size,
        "num_hidden_layers": preset.num_layers,
        "num_attention_heads": preset.num_heads,
        "num_key_value_heads": preset.num_kv_heads,
        "head_dim": preset.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": preset.rms_norm_eps,
        "rope_theta": preset.rope_theta,
        "rope_scaling": dict(preset.rope_scaling) if preset.rope_scaling else None,
        "vocab_size": vocab_size,
        "max_position_embeddings": preset.max_position_embeddings,
        "tie_word_embeddings": preset.tie_word_embeddings,
        "bos_token_id": token_ids[BOS_TOKEN],
        "eos_token_id": token_ids[IM_END_TOKEN],
        "pad_token_id": token_ids[PAD_TOKEN],
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": preset.dtype,
    }
    if preset.model_type == "llama":
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif preset.model_type == "mistral":
        cfg.update(sliding_window=None)
    elif preset.model_type == "qwen2":
        # Qwen2 always has q/k/v biases; the key is for readers that look for it.
        cfg.update(attention_bias=True, use_sliding_window=False, sliding_window=None,
                   max_window_layers=preset.num_layers)
    elif preset.model_type == "qwen3":
        cfg.update(attention_bias=False, use_sliding_window=False, sliding_window=None,
                   max_window_layers=preset.num_layers)
    return cfg


def generation_config(token_ids: dict[str, int]) -> dict[str, Any]:
    # Both end tokens stop generation, as in Llama 3 Instruct's generation_config.
    return {"bos_token_id": token_ids[BOS_TOKEN],
            "eos_token_id": [token_ids[IM_END_TOKEN], token_ids[END_OF_TEXT_TOKEN]],
            "pad_token_id": token_ids[PAD_TOKEN]}


# --- weights -------------------------------------------------------------------------
def parameter_shapes(preset: Preset, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """HF parameter names and shapes, in the order they are drawn from the generator."""
    h, d = preset.hidden_size, preset.head_dim
    q, kv = preset.num_heads * d, preset.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab_size, h)}
    for i in range(preset.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        if preset.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q,)
            shapes[p + "self_attn.k_proj.bias"] = (kv,)
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
        if preset.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (preset.intermediate_size, h)
        shapes[p + "mlp.up_proj.weight"] = (preset.intermediate_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, preset.intermediate_size)
    shapes["model.norm.weight"] = (h,)
    if not preset.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab_size, h)
    return shapes


def init_std(name: str, preset: Preset) -> float | None:
    """Standard deviation of a parameter's normal init, or None for norms (all ones).

    Not the usual std-0.02 init: with it, q.k scores are ~0.05, attention is uniform and
    the tokens a model picks hardly depend on positions, so a test would not notice a
    rope or KV-cache bug. Here projections are scaled by fan-in (activations keep RMS ~1),
    q and k twice that (scores of std ~4: attention that picks), output projections
    twice that (each layer moves the residual stream, even past a large tied embedding,
    which otherwise makes the model repeat its input token), and the output head so the
    logits have std TARGET_LOGIT_STD.
    """
    if name.endswith("norm.weight"):
        return None
    h, q = preset.hidden_size, preset.num_heads * preset.head_dim
    if name == "lm_head.weight" or (name == "model.embed_tokens.weight" and preset.tie_word_embeddings):
        return TARGET_LOGIT_STD / math.sqrt(h)
    if name == "model.embed_tokens.weight":
        return 1.0
    if name.endswith(".bias"):
        return 0.5  # large enough that dropping the q/k/v bias changes the tokens
    if name.endswith(("q_proj.weight", "k_proj.weight")):
        return 2.0 / math.sqrt(h)
    if name.endswith("o_proj.weight"):
        return 2.0 / math.sqrt(q)
    if name.endswith("down_proj.weight"):
        return 2.0 / math.sqrt(preset.intermediate_size)
    return 1.0 / math.sqrt(h)  # v, gate, up


def iter_weights(preset: Preset, vocab_size: int, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Deterministic float32 weights, one tensor at a time (an 8B model never sits in
    memory whole). Every parameter draws from one generator in `parameter_shapes` order."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for name, shape in parameter_shapes(preset, vocab_size).items():
        std = init_std(name, preset)
        yield name, torch.ones(shape) if std is None else torch.empty(shape).normal_(0.0, std, generator=gen)


def write_weights(preset: Preset, vocab_size: int, seed: int, out: Path, max_shard_bytes: int = 4 << 30) -> None:
    """model.safetensors, or Hugging Face-style shards plus model.safetensors.index.json
    when the model is larger than one shard."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[preset.dtype]
    shapes = parameter_shapes(preset, vocab_size)
    shards: list[list[str]] = [[]]  # parameter names per shard, in generation order
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weights = iter_weights(preset, vocab_size, seed)  # same order as `shapes`, so as `shards`
    for names, file in zip(shards, files, strict=True):
        tensors = {name: t.to(dtype) for name, t in itertools.islice(weights, len(names))}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(math.prod(s) * dtype.itemsize for s in shapes.values())
        weight_map = {name: file for names, file in zip(shards, files, strict=True) for name in names}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# --- the checkpoint ------------------------------------------------------------------
def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown built-in model {name!r}: choose one of {', '.join(PRESETS)}") from None


def make_model(dir: str | os.PathLike, preset: str = "tiny", with_weights: bool = True, seed: int = 0,
               overwrite: bool = False) -> Path:
    """Write a Hugging Face model directory for `preset` into `dir` and return its path.

    `with_weights=False` writes config and tokenizer only, for `load_format: dummy`.
    Refuses a directory that already holds a config.json unless `overwrite`.
    """
    spec = get_preset(preset)
    out = Path(dir)
    if (out / "config.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a model (config.json): pick an empty directory "
                              "or pass overwrite=True (--force)")
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(spec.extra_tokens)
    token_ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    tok_vocab = tok.get_vocab_size(with_added_tokens=True)
    vocab_size = spec.vocab_size or tok_vocab
    if vocab_size < tok_vocab:
        raise ValueError(f"preset {preset} has vocab_size {vocab_size} < tokenizer's {tok_vocab}")
    tok.save(str(out / "tokenizer.json"), pretty=True)
    _write_json(out / "tokenizer_config.json", tokenizer_config(spec.chat_template))
    _write_json(out / "config.json", model_config(spec, vocab_size, token_ids))
    _write_json(out / "generation_config.json", generation_config(token_ids))
    if with_weights:
        if not spec.default_with_weights:
            warnings.warn(f"writing full random weights for {preset} ({_param_bytes(spec, vocab_size) / 1e9:.0f} GB "
                          f"in {spec.dtype}); with_weights=False and load_format dummy is usually what you want",
                          stacklevel=2)
        write_weights(spec, vocab_size, seed, out)
    return out


def _param_bytes(spec: Preset, vocab_size: int) -> int:
    itemsize = 4 if spec.dtype == "float32" else 2
    return sum(math.prod(s) for s in parameter_shapes(spec, vocab_size).values()) * itemsize


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def cache_root() -> Path:
    return Path(os.environ.get("PDCLUSTER_CACHE") or Path.home() / ".cache" / "pdcluster")


def resolve_builtin(name: str) -> Path:
    """The directory of built-in model `name` ("tiny" or "builtin:tiny"), made on first use.

    It lives in `$PDCLUSTER_CACHE/builtin/NAME-HASH` (default ~/.cache/pdcluster), the
    hash covering everything that decides its bytes. It is written to a temporary folder
    next to it and renamed into place, so a directory that exists is complete, and of two
    processes that race, one rename wins and the other's copy is thrown away.
    """
    name = name.removeprefix("builtin:")
    spec = get_preset(name)
    final = cache_root() / "builtin" / f"{name}-{content_hash(name)}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        log.info("creating built-in model %s at %s", name, final)
        make_model(tmp, name, with_weights=spec.default_with_weights)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --- `pdcluster make-model` ----------------------------------------------------------
def add_make_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="directory to write the checkpoint into")
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model shapes (default: tiny)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--no-weights", action="store_true",
                        help="config and tokenizer only, for load_format: dummy (default for llama-3-8b)")
    parser.add_argument("--weights", action="store_true", help="write weights even for a preset of real size")
    parser.add_argument("--force", action="store_true", help="overwrite a checkpoint already in OUT")


def make_model_command(args: argparse.Namespace) -> int:
    with_weights = args.weights or (PRESETS[args.preset].default_with_weights and not args.no_weights)
    out = make_model(args.out, args.preset, with_weights=with_weights, seed=args.seed, overwrite=args.force)
    print(f"wrote {args.preset} to {out}" + ("" if with_weights else " (no weights: use load_format dummy)"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdcluster make-model",
                                     description="Write a small deterministic Hugging Face checkpoint.")
    add_make_model_arguments(parser)
    return make_model_command(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
