"""Text to token ids and back, and chat templates, for a Hugging Face model directory.

Wraps `tokenizers.Tokenizer` (the Rust fast tokenizer) directly: transformers is too
heavy a dependency for a serving node, and is only the reference the tests compare
against. Loading follows what transformers' (5.x) `AutoTokenizer` does with the same
files, so ids match: tokenizer.json is the tokenizer, its post-processor alone decides
what `add_special_tokens` adds (transformers 5 ignores tokenizer_config.json's
`add_bos_token`/`add_eos_token` when tokenizer.json exists, and so do we);
tokenizer_config.json names the special tokens and may add tokens; chat templates are
rendered in the same sandboxed Jinja environment.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer

# The named special tokens of transformers' tokenizers, passed to chat templates.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


_PIECE_CHARS = 1 << 16  # encode_untrusted's length check: ~50k tokens a piece, a few ms of GIL each


class PromptTooLong(ValueError):
    def __init__(self, at_least: int, max_tokens: int):
        super().__init__(f"the prompt has more than {at_least} tokens; at most {max_tokens} fit: shorten it")
        self.at_least = at_least


class Tokenizer:
    """A model's tokenizer. Build it with `Tokenizer.from_pretrained(model_dir)`.

    Attributes others read: `vocab_size` (added tokens included), `bos_token_id`,
    `eos_token_id` (the tokenizer's own), `eos_token_ids` (every id that ends
    generation: the tokenizer's eos plus generation_config.json's and config.json's),
    `pad_token_id`, `all_special_ids` (what `skip_special_tokens` removes),
    `special_tokens_map` and `chat_templates` (name -> template; "default" is the
    model's main one).
    """

    def __init__(self, backend: BackendTokenizer, special_tokens_map: Mapping[str, str] | None = None,
                 chat_templates: Mapping[str, str] | None = None, extra_eos_token_ids: Sequence[int] = (),
                 name_or_path: str = ""):
        self._backend = backend
        self.special_tokens_map = dict(special_tokens_map or {})
        self.chat_templates = dict(chat_templates or {})
        self.name_or_path = name_or_path
        self.bos_token_id = self._id_of("bos_token")
        self.pad_token_id = self._id_of("pad_token")
        eos = [i for i in (self._id_of("eos_token"), *extra_eos_token_ids) if i is not None]
        self.eos_token_id: int | None = eos[0] if eos else None
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        added = backend.get_added_tokens_decoder()
        named = (self._id_of(name) for name in self.special_tokens_map)
        self.all_special_ids: frozenset[int] = frozenset(
            {i for i, tok in added.items() if tok.special} | {i for i in named if i is not None})
        # Added tokens may sit past the model's vocabulary; ids run to the largest one.
        self.vocab_size: int = max(backend.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1)

    def _id_of(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        return None if token is None else self._backend.token_to_id(token)

    # --- loading ---------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of a Hugging Face model directory (see the module doc)."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            hint = (" It has a sentencepiece tokenizer.model; convert it once with transformers: "
                    "AutoTokenizer.from_pretrained(dir).save_pretrained(dir) writes tokenizer.json."
                    if (path / "tokenizer.model").is_file() else
                    " Copy tokenizer.json from the model's Hub repository, or save one with transformers: "
                    "AutoTokenizer.from_pretrained(name).save_pretrained(dir).")
            raise FileNotFoundError(f"no tokenizer.json in {path}: pdcluster needs the fast-tokenizer file.{hint}")
        backend = BackendTokenizer.from_file(str(tok_file))
        config = _read_json(path / "tokenizer_config.json")

        special: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            token = _added_token(config.get(name))
            if token is not None:
                special[name] = token.content
                # As transformers does: named special tokens are special added tokens,
                # whatever tokenizer.json says (this is what decode skips).
                backend.add_special_tokens([token])
        for spec in (config.get("added_tokens_decoder") or {}).values():
            token = _added_token(spec)
            if token is not None and backend.token_to_id(token.content) is None:
                (backend.add_special_tokens if token.special else backend.add_tokens)([token])
        # Prompts are never cut or padded here: the engine checks their length itself.
        backend.no_truncation()
        backend.no_padding()

        extra_eos: list[int] = []
        for file in ("generation_config.json", "config.json"):
            eos = _read_json(path / file).get("eos_token_id")
            extra_eos += eos if isinstance(eos, list) else [] if eos is None else [eos]
        return cls(backend, special, _load_chat_templates(path, config), extra_eos, str(path))

    # --- ids <-> text ----------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. `add_special_tokens` adds what the model's post-processor
        adds (usually a BOS); turn it off for text a chat template already marked up."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_untrusted(self, text: str, add_special_tokens: bool = True, max_tokens: int | None = None) -> list[int]:
        """`encode` for text from a client, possibly megabytes, in a worker thread: the
        tokenizing runs with the GIL released (encode_batch), so the caller's event loop
        keeps running; and a text of far more than `max_tokens` tokens raises
        PromptTooLong after tokenizing it in pieces, never building its whole token list
        (a 2 MB text's Encoding alone takes 0.2 s to free, with the GIL held)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON can carry lone surrogates ("\ud800"); tokenizers cannot
            raise ValueError(f"the text is not valid Unicode ({e.reason} at character {e.start}): send UTF-8 "
                             "text") from None
        if max_tokens is not None and len(text) > _PIECE_CHARS:
            counted = 0
            for cuts, start in enumerate(range(0, len(text), _PIECE_CHARS), start=1):
                piece = self._backend.encode_batch([text[start:start + _PIECE_CHARS]], add_special_tokens=False)[0]
                counted += len(piece)
                del piece
                # A cut inside a word can add a token or two to the pieces' sum: allow for it.
                if counted - 2 * cuts > max_tokens:
                    raise PromptTooLong(counted - 2 * cuts, max_tokens)
        return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Ids the tokenizer does not know (a model's vocabulary is often
        padded past the tokenizer's) decode to nothing."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Token strings as the vocabulary spells them (byte-level BPE: 'Ġworld').
        Unknown ids give ""."""
        return [self._backend.id_to_token(i) or "" for i in ids]

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        decoder = self._backend.decoder
        return decoder.decode(list(tokens)) if decoder is not None else "".join(tokens)

    def get_vocab(self) -> dict[str, int]:
        """Token string -> id, added tokens included (grammar backends index it by id)."""
        return self._backend.get_vocab(with_added_tokens=True)

    def to_json_str(self) -> str:
        """The tokenizer as tokenizer.json text, with the added tokens loaded here."""
        return self._backend.to_str()

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # --- chat ------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, chat_template: str | None = None,
                            continue_final_message: bool = False, **kwargs: Any) -> str:
        """Render a conversation to the prompt text the model was trained on.

        `messages` are {"role", "content"} dicts; content is a string or a list of
        {"type": "text", "text": ...} parts, joined with newlines (templates get strings).
        `chat_template` picks a named template of the model or is a template itself.
        `continue_final_message`: the prompt ends right after the last message's content
        (no end-of-turn marker), so the model continues that message; as in transformers,
        it cannot go with `add_generation_prompt`.
        Extra kwargs reach the template as variables (e.g. `enable_thinking=False`).
        The result already holds the special tokens: encode it with add_special_tokens=False.
        """
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be set: continue the last "
                             "message, or start a new assistant message")
        template = self._select_chat_template(chat_template, tools)
        # As in transformers: special tokens first, so the caller's kwargs override them;
        # tools and documents are always defined (None when not given).
        variables = {**self.special_tokens_map, "documents": None, **kwargs}
        messages = _template_messages(messages)
        final = None
        if continue_final_message:  # as transformers: mark the content's end, render, cut at the mark
            final = messages[-1].get("content")
            if not isinstance(final, str):
                raise ValueError("continue_final_message: the last message has no content to continue")
            messages[-1] = {**messages[-1], "content": final + _CONTINUE_TAG}
        text = render_chat_template(template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                    **variables)
        return text if final is None else _cut_at_continue_tag(text, final)

    def _select_chat_template(self, chat_template: str | None, tools: list[dict] | None) -> str:
        if chat_template is not None:
            return self.chat_templates.get(chat_template, chat_template)
        if not self.chat_templates:
            raise ValueError(f"the model {self.name_or_path or ''} has no chat template (none in tokenizer_config.json "
                             "or chat_template.jinja): send the prompt as text to /v1/completions, or give a "
                             "template (chat_template in the request or the server's config)")
        if tools and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        raise ValueError(f"the model has several chat templates and none is the default: name one with chat_template "
                         f"(one of {', '.join(sorted(self.chat_templates))})")

    def __repr__(self) -> str:
        return f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size})"


# --- loading helpers -------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): fix or remove it") from None


def _added_token(value: Any) -> AddedToken | None:
    """A special token as tokenizer_config.json writes it: a string, or a dict with
    "content" and the AddedToken flags."""
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return AddedToken(value["content"], single_word=value.get("single_word", False),
                          lstrip=value.get("lstrip", False), rstrip=value.get("rstrip", False),
                          normalized=value.get("normalized", False), special=value.get("special", True))
    return None


def _load_chat_templates(path: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Name -> template. chat_template.jinja (and additional_chat_templates/*.jinja)
    win over tokenizer_config.json's, as in transformers; chat_template.json (the
    processor format) is the last resort."""
    templates: dict[str, str] = {}
    inline = config.get("chat_template")
    if isinstance(inline, str):
        templates["default"] = inline
    elif isinstance(inline, list):
        templates.update({t["name"]: t["template"] for t in inline})
    if not templates:
        legacy = _read_json(path / "chat_template.json").get("chat_template")
        if isinstance(legacy, str):
            templates["default"] = legacy
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        templates["default"] = jinja_file.read_text(encoding="utf-8")
    extra_dir = path / "additional_chat_templates"
    if extra_dir.is_dir():
        templates.update({f.stem: f.read_text(encoding="utf-8") for f in sorted(extra_dir.glob("*.jinja"))})
    return templates


# --- chat templates --------------------------------------------------------------------
def _template_messages(messages: list[dict]) -> list[dict[str, Any]]:
    """Check the messages and flatten list-of-parts content to strings."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] is {type(message).__name__}, not an object with role and content")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}] has no role: every message needs a role (system, user, assistant, "
                             "tool) and content")
        content = message.get("content")
        if "content" not in message and not message.get("tool_calls"):
            raise ValueError(f"messages[{i}] ({role}) has no content: give content (a string or a list of text parts)")
        if isinstance(content, list):
            content = _join_text_parts(content, i)
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{i}].content is {type(content).__name__}: give a string or a list of "
                             '{"type": "text", "text": ...} parts')
        # None-valued keys go, as transformers drops them: an OpenAI tool-call turn's
        # `"content": null` must not render as "None".
        out.append({k: v for k, v in {**message, "content": content}.items() if v is not None})
    return out


# Appended to the message `continue_final_message` continues, to find where its content
# ends in the rendered text (transformers' marker, so the prompts are the same).
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _cut_at_continue_tag(text: str, final: str) -> str:
    """The rendered chat cut where the last message's content ends (at `_CONTINUE_TAG`):
    the template's end-of-turn marker after it goes. Content whitespace the template
    trimmed stays trimmed."""
    if final.strip() not in text or _CONTINUE_TAG.strip() not in text:
        raise ValueError("continue_final_message: the last message's content does not appear in the rendered chat "
                         "(the chat template changes or drops it), so it cannot be continued")
    at = text.rindex(_CONTINUE_TAG.strip())
    if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return text[:at]
    return text[:at].rstrip()  # the template trimmed the content's end


def _join_text_parts(parts: list[Any], index: int) -> str:
    texts = []
    for part in parts:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"messages[{index}].content has a part of type {kind!r}: this model takes text only, "
                             'send {"type": "text", "text": ...} parts')
        texts.append(part["text"])
    return "\n".join(texts)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker):
    rendered as its body; serving has no use for the mask."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which would change what the model sees.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile a chat template as transformers does: an immutable sandbox (templates come
    from model repositories and are untrusted), trim_blocks and lstrip_blocks, loop
    controls, and the helpers templates call."""
    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < (3, 1, 6):
        raise ImportError(f"jinja2 {jinja2.__version__} has known sandbox escapes; chat templates need jinja2>=3.1.6: "
                          "pip install -U jinja2")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message}): "
                         "fix the template") from None


def render_chat_template(template: str, messages: list[dict[str, Any]], **variables: Any) -> str:
    try:
        return compile_chat_template(template).render(messages=messages, **variables)
    except jinja2.exceptions.TemplateError as e:
        # raise_exception() in templates says what is wrong ("roles must alternate").
        raise ValueError(f"the chat template rejected the conversation: {e}") from None
