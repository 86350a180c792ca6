"""engine.tokenizer: ids and chat prompts must be exactly what transformers' AutoTokenizer
gives for the same model directory (the reference), without transformers at run time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, normalizers, trainers
from transformers import AutoTokenizer

from engine.builtin_models import CORPUS, make_model
from engine.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs\nand newlines\n\n",
    "héllo wörld, ça va? 日本語のテキスト、中文。",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧 and a flag 🇫🇷",
    "def f(x):\n    return x ** 2  # comment",
    "<|im_start|>user\nspecial tokens in text<|im_end|>",
    "numbers 3.14159 1,000,000 2024-03-15",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? 😀"}],
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny"), "tiny", with_weights=False)


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory) -> Path:
    """A sentencepiece-style tokenizer (Metaspace, byte fallback, no post-processor in
    tokenizer.json, add_bos_token in the config), the Llama 2 / Mistral layout."""
    out = tmp_path_factory.mktemp("spm")
    tok = BackendTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *alphabet],
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": {"__type": "AddedToken", "content": "<unk>", "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True},
        "add_bos_token": True, "add_eos_token": False}))
    return out


@pytest.mark.parametrize("add_special_tokens", [True, False])
@pytest.mark.parametrize("which", ["tiny_dir", "spm_dir"])
def test_encode_matches_transformers(which, add_special_tokens, request):
    path = request.getfixturevalue(which)
    ours, ref = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=add_special_tokens) == \
            ref.encode(text, add_special_tokens=add_special_tokens), text


@pytest.mark.parametrize("which", ["tiny_dir", "spm_dir"])
def test_decode_matches_transformers(which, request):
    path = request.getfixturevalue(which)
    ours, ref = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        ids = ref.encode(text)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
        assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
        assert ours.convert_tokens_to_string(ours.convert_ids_to_tokens(ids)) == \
            ref.convert_tokens_to_string(ref.convert_ids_to_tokens(ids))


def test_special_tokens_come_from_the_config_files(tiny_dir):
    ours, ref = Tokenizer.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    assert ours.vocab_size == len(ref) == 2048
    assert ours.bos_token_id == ref.bos_token_id == ours.token_to_id("<|begin_of_text|>")
    assert ours.eos_token_id == ref.eos_token_id == ours.token_to_id("<|im_end|>")
    assert ours.pad_token_id == ref.pad_token_id
    # generation_config.json's eos list joins the tokenizer's eos.
    assert ours.eos_token_ids == {ours.token_to_id("<|im_end|>"), ours.token_to_id("<|end_of_text|>")}
    # Everything decode(skip_special_tokens=True) drops, which includes transformers' named ones.
    assert set(ref.all_special_ids) <= ours.all_special_ids
    assert ours.all_special_ids == {ours.token_to_id(t) for t in
                                    ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]}


def test_eos_ids_accept_an_int_or_a_list(tmp_path):
    path = make_model(tmp_path / "m", "tiny", with_weights=False)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    (path / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()),
                                                  "eos_token_id": [8, 9]}))
    tok = Tokenizer.from_pretrained(path)
    assert tok.eos_token_id == tok.token_to_id("<|im_end|>")
    assert tok.eos_token_ids == {tok.eos_token_id, 7, 8, 9}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tiny_dir, add_generation_prompt):
    ours, ref = Tokenizer.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    for messages in CONVERSATIONS:
        prompt = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert prompt == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.encode(prompt, add_special_tokens=False) == ref.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False)
    assert prompt.startswith("<|begin_of_text|><|im_start|>system\nYou are terse.<|im_end|>\n")


@pytest.mark.parametrize("final", ["The answer is", "The answer is ", "  spaced  ", "line\n"])
def test_continue_final_message_cuts_after_the_last_message_like_transformers(tiny_dir, final):
    ours, ref = Tokenizer.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    messages = [*CONVERSATIONS[1], {"role": "assistant", "content": final}]
    prompt = ours.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert prompt == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                             continue_final_message=True)
    assert prompt.endswith("<|im_start|>assistant\n" + final)
    with pytest.raises(ValueError, match="continue_final_message and add_generation_prompt"):
        ours.apply_chat_template(messages, add_generation_prompt=True, continue_final_message=True)


def test_a_tool_calling_style_template_renders_like_transformers(tmp_path):
    """Templates lean on tojson, namespace, loop controls, raise_exception and tools."""
    path = make_model(tmp_path / "m", "tiny", with_weights=False)
    template = (
        "{%- set ns = namespace(n=0) -%}"
        "{%- if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif -%}"
        "{%- for m in messages -%}"
        "{%- if m.role == 'system' and not loop.first %}{{ raise_exception('system must come first') }}{% endif -%}"
        "{%- if m.role == 'skip' %}{% continue %}{% endif -%}"
        "{%- set ns.n = ns.n + 1 -%}"
        "<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n"
        "{%- endfor -%}"
        "{{ ns.n }} messages{% if add_generation_prompt %}<assistant>{% endif %}")
    (path / "chat_template.jinja").write_text(template)
    ours, ref = Tokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "<b>Weather</b> & more",
                                               "parameters": {"type": "object", "properties": {}}}}]
    messages = [{"role": "user", "content": "Weather in Zürich?"}, {"role": "skip", "content": "x"}]
    assert ours.apply_chat_template(messages, tools=tools) == \
        ref.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert "<b>Weather</b> & more" in ours.apply_chat_template(messages, tools=tools)  # tojson does not escape HTML
    with pytest.raises(ValueError, match="system must come first"):
        ours.apply_chat_template([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    # An OpenAI tool-call turn has "content": null: dropped, as transformers drops None values.
    call_turn = [{"role": "user", "content": "Weather?"},
                 {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
                     "name": "get_weather", "arguments": {}}}]}]
    rendered = ours.apply_chat_template(call_turn, tools=tools)
    assert rendered == ref.apply_chat_template(call_turn, tools=tools, tokenize=False, add_generation_prompt=True)
    assert "None" not in rendered


def test_chat_template_file_overrides_tokenizer_config(tmp_path):
    path = make_model(tmp_path / "m", "tiny", with_weights=False)
    (path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert Tokenizer.from_pretrained(path).apply_chat_template([{"role": "user", "content": "hi"}]) == "[hi]"


def test_named_chat_templates_pick_default_or_tool_use_or_by_name(tmp_path):
    path = make_model(tmp_path / "m", "tiny", with_weights=False)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "D{{ messages[0].content }}"},
                               {"name": "tool_use", "template": "T{{ messages[0].content }}"},
                               {"name": "rag", "template": "R{{ messages[0].content }}"}]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(messages) == "Dx"
    assert tok.apply_chat_template(messages, tools=[{"type": "function"}]) == "Tx"
    assert tok.apply_chat_template(messages, chat_template="rag") == "Rx"
    assert tok.apply_chat_template(messages, chat_template="literal {{ messages|length }}") == "literal 1"


def test_text_parts_are_joined_into_one_string(tiny_dir):
    tok = Tokenizer.from_pretrained(tiny_dir)
    parts = [{"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template([{"role": "user", "content": "first\nsecond"}])


def test_template_variables_include_special_tokens_and_kwargs(tiny_dir):
    tok = Tokenizer.from_pretrained(tiny_dir)
    messages = [{"role": "user", "content": "x"}]
    template = "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ enable_thinking }}|{{ strftime_now('%Y') | length }}"
    assert tok.apply_chat_template(messages, chat_template=template, enable_thinking=False) == \
        "<|begin_of_text|>|<|im_end|>|<|pad|>|False|4"


def test_generation_tags_render_their_body(tiny_dir):
    tok = Tokenizer.from_pretrained(tiny_dir)
    template = "{% for m in messages %}{% generation %}<{{ m.content }}>{% endgeneration %}{% endfor %}"
    assert tok.apply_chat_template([{"role": "assistant", "content": "a"}], chat_template=template) == "<a>"


def test_templates_run_in_a_sandbox(tiny_dir):
    tok = Tokenizer.from_pretrained(tiny_dir)
    with pytest.raises(ValueError, match="rejected"):
        tok.apply_chat_template([{"role": "user", "content": "x"}],
                                chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ValueError, match="rejected"):  # immutable: templates cannot change the caller's data
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ messages.append(1) }}")


def test_invalid_template_syntax_says_so(tiny_dir):
    with pytest.raises(ValueError, match="not valid Jinja"):
        Tokenizer.from_pretrained(tiny_dir).apply_chat_template([{"role": "user", "content": "x"}],
                                                                 chat_template="{% for m in messages %}")


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ([{"content": "no role"}], "has no role"),
    ([{"role": "user"}], "has no content"),
    ([{"role": "user", "content": 3}], "give a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "text only"),
])
def test_malformed_messages_are_rejected_with_advice(tiny_dir, messages, match):
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_pretrained(tiny_dir).apply_chat_template(messages)


def test_assistant_tool_call_messages_may_omit_content_or_send_null(tiny_dir):
    """Either way the template sees no content, as transformers renders it."""
    ours, ref = Tokenizer.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)
    template = "{{ messages[0].content is defined }}|{{ messages[0].content }}|{{ messages[0].tool_calls[0] }}"
    for message in ({"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]},
                    {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}):
        rendered = ours.apply_chat_template([message], chat_template=template)
        assert rendered == ref.apply_chat_template([message], chat_template=template, tokenize=False)
        assert rendered.startswith("False||")


def test_model_without_chat_template_points_to_completions(spm_dir):
    with pytest.raises(ValueError, match="has no chat template.*/v1/completions"):
        Tokenizer.from_pretrained(spm_dir).apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_tokenizer_json_says_what_to_provide(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json.*save_pretrained"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="sentencepiece tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)


def test_ids_past_the_tokenizer_vocabulary_decode_to_nothing(tiny_dir):
    """A model's vocabulary is often padded past the tokenizer's (llama-3-8b preset)."""
    tok = Tokenizer.from_pretrained(tiny_dir)
    hello = tok.encode("hello", add_special_tokens=False)
    assert tok.decode([*hello, tok.vocab_size + 5]) == "hello"
    assert tok.convert_ids_to_tokens([tok.vocab_size + 5]) == [""]
