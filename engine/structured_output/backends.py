"""Grammar backends behind one small interface, and the registry that names them.

A backend turns a `StructuredOutputsParams` into a compiled grammar (once per cache key,
see manager.py) and makes a fresh matcher from it per request. A matcher knows which
tokens may come next (it fills one row of a shared int32 bitmask, 32 tokens per word,
bit set = allowed: the format xgrammar and llguidance both use) and advances by one
token at a time.

Registered here: `xgrammar` (the default under `auto`) and `guidance` (llguidance), both
installed with the project's `structured` extra; `outlines` (through `outlines_core`,
as vLLM does) where that package is installed. `lm-format-enforcer` is a known name that
is refused with what to do. Third parties add a backend with `register_backend(name,
factory)`, a factory being `(tokenizer_view) -> GrammarBackend`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from engine.structured_output.params import StructuredOutputsParams, backend_unavailable


@dataclass(frozen=True, slots=True)
class TokenizerView:
    """What a backend needs from the model's tokenizer: the tokenizer.json text (both
    libraries read the Hugging Face format themselves), the vocabulary by id, the ids
    that end generation, and the model's vocabulary size (the logits' width, which may
    exceed the tokenizer's)."""

    tokenizer_json: str
    vocab: tuple[str, ...]            # token string by id ("" for ids the tokenizer lacks)
    eos_token_ids: tuple[int, ...]
    vocab_size: int


class GrammarMatcher(Protocol):
    def accept(self, token_id: int) -> bool:
        """Advance by one token; False if the grammar does not allow it (state unchanged)."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (int32, CPU)."""

    def is_terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted."""


class GrammarBackend(Protocol):
    name: str

    def fill_bitmasks(self, matchers: list[GrammarMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        """`matchers[k]` fills `bitmask[rows[k]]`: one call per step and backend, so a
        backend can spread a large batch over threads."""

    def accept_tokens(self, matchers: list[GrammarMatcher], tokens: list[int]) -> list[bool]:
        """`matchers[k].accept(tokens[k])` for every k (a backend without this method is
        called one matcher at a time): one call per step and backend, as fill_bitmasks.
        A backend may also have `close()`, called when its engine closes."""

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar; raises ValueError naming what is wrong with the constraint."""

    def matcher(self, compiled: Any) -> GrammarMatcher: ...


BackendFactory = Callable[[TokenizerView], GrammarBackend]
_REGISTRY: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory) -> None:
    _REGISTRY[name] = factory


def registered_backends() -> list[str]:
    return sorted(_REGISTRY)


def check_available(name: str) -> None:
    """Raise ValueError with what to install when backend `name` cannot run here."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown structured output backend {name!r}: registered are "
                         f"{', '.join(registered_backends())} (and auto)")
    problem = backend_unavailable(name)
    if problem:
        raise ValueError(problem)


# Below this many rows a thread pool costs more than it saves.
PARALLEL_FILL_MIN_ROWS = 8
FILL_THREADS = max(1, min(8, (os.cpu_count() or 1) // 2))


def fill_one_by_one(matchers: list[GrammarMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
    for m, row in zip(matchers, rows):
        m.fill_bitmask(bitmask, row)


def accept_one_by_one(matchers: list[GrammarMatcher], tokens: list[int]) -> list[bool]:
    return [m.accept(t) for m, t in zip(matchers, tokens)]


def accept_all(backend: GrammarBackend, matchers: list[GrammarMatcher], tokens: list[int]) -> list[bool]:
    """The backend's batched accept, or one matcher at a time for a backend without one."""
    batched = getattr(backend, "accept_tokens", None)
    return accept_one_by_one(matchers, tokens) if batched is None else batched(matchers, tokens)


class _AcceptPool:
    """Matchers advanced from FILL_THREADS threads, in contiguous shares. Worth it where
    the library releases the GIL while it advances: xgrammar's accept_token does, and takes
    33-65 us a token for a JSON schema on an H200 host, 2-4 ms a step at batch 64, where the
    whole step's host work must fit in the forward's 5.3 ms (8 threads: 1.1 ms,
    bench/gpu/grammar_accept.py)."""

    def __init__(self, threads: int):
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="grammar-accept") if threads > 1 else None

    def accept(self, matchers: list[GrammarMatcher], tokens: list[int]) -> list[bool]:
        if self._pool is None or len(matchers) < PARALLEL_FILL_MIN_ROWS:
            return accept_one_by_one(matchers, tokens)
        share = -(-len(matchers) // self.threads)
        parts = [self._pool.submit(accept_one_by_one, matchers[i:i + share], tokens[i:i + share])
                 for i in range(0, len(matchers), share)]
        wait(parts)  # all shares done before one's error surfaces: no matcher still moving then
        return [ok for part in parts for ok in part.result()]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def build_backend(name: str, tokenizer: TokenizerView) -> GrammarBackend:
    check_available(name)
    return _REGISTRY[name](tokenizer)


def choice_regex(choices: list[str]) -> str:
    """A regex matching exactly one of `choices` (each taken literally)."""
    import re
    return "(" + "|".join(re.escape(c) for c in choices) + ")"


def closed_schema(schema: Any) -> Any:
    """`disable_additional_properties`: every object schema without an explicit
    `additionalProperties` gets `false`, recursively (vLLM's rule for guidance)."""
    if isinstance(schema, list):
        return [closed_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_schema(v) for k, v in schema.items()}
    if out.get("type") == "object" or "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


def _schema(params: StructuredOutputsParams) -> Any:
    schema = params.spec
    return closed_schema(schema) if params.disable_additional_properties else schema


# --- xgrammar --------------------------------------------------------------------------
class _XGrammarMatcher:
    __slots__ = ("m",)

    def __init__(self, m):
        self.m = m

    def accept(self, token_id: int) -> bool:
        return self.m.accept_token(token_id)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.m.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self.m.is_terminated()


class XGrammarBackend:
    name = "xgrammar"

    def __init__(self, tokenizer: TokenizerView):
        import xgrammar as xgr
        self.xgr = xgr
        # vocab type (byte-level, byte-fallback, raw) and prefix-space handling read from
        # tokenizer.json, as xgrammar's own from_huggingface does.
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.tokenizer_json)
        info = xgr.TokenizerInfo(list(tokenizer.vocab), vocab_type=meta["vocab_type"],
                                 vocab_size=tokenizer.vocab_size, stop_token_ids=list(tokenizer.eos_token_ids),
                                 add_prefix_space=meta["add_prefix_space"])
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self._batch = xgr.BatchGrammarMatcher(max_threads=FILL_THREADS) if FILL_THREADS > 1 else None
        self._accept = _AcceptPool(FILL_THREADS)

    def accept_tokens(self, matchers: list[GrammarMatcher], tokens: list[int]) -> list[bool]:
        return self._accept.accept(matchers, tokens)

    def close(self) -> None:
        self._accept.close()

    def fill_bitmasks(self, matchers: list[GrammarMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        if self._batch is None or len(matchers) < PARALLEL_FILL_MIN_ROWS:
            return fill_one_by_one(matchers, bitmask, rows)
        self._batch.batch_fill_next_token_bitmask([m.m for m in matchers], bitmask, indices=rows)

    def compile(self, params: StructuredOutputsParams) -> Any:
        c, kind = self.compiler, params.kind
        try:
            if kind in ("json", "json_object"):
                return c.compile_json_schema(json.dumps(_schema(params)), any_whitespace=not params.disable_any_whitespace)
            if kind == "regex":
                return c.compile_regex(params.regex)
            if kind == "choice":
                return c.compile_regex(choice_regex(params.choice))
            return c.compile_grammar(params.grammar)
        except Exception as e:  # xgrammar raises RuntimeError/ValueError subclasses on bad input
            raise ValueError(f"the {kind} constraint does not compile with xgrammar: {_first_line(e)}") from None

    def matcher(self, compiled: Any) -> GrammarMatcher:
        return _XGrammarMatcher(self.xgr.GrammarMatcher(compiled))


# --- llguidance ------------------------------------------------------------------------
class _GuidanceMatcher:
    __slots__ = ("m", "fill")

    def __init__(self, m, fill):
        self.m, self.fill = m, fill

    def accept(self, token_id: int) -> bool:
        return self.m.consume_token(token_id) and not self.m.is_error()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.fill(self.m, bitmask, row)

    def is_terminated(self) -> bool:
        return self.m.is_stopped()


class GuidanceBackend:
    name = "guidance"

    def __init__(self, tokenizer: TokenizerView):
        import llguidance
        import llguidance.torch
        self.ll = llguidance
        self.fill = llguidance.torch.fill_next_token_bitmask
        self.tokenizer = llguidance.LLTokenizer(tokenizer.tokenizer_json, n_vocab=tokenizer.vocab_size,
                                                eos_token=list(tokenizer.eos_token_ids) or None)
        self._executor = llguidance.LLExecutor(FILL_THREADS) if FILL_THREADS > 1 else None
        self._fill_par = llguidance.torch.fill_next_token_bitmask_par

    def fill_bitmasks(self, matchers: list[GrammarMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        if self._executor is None or len(matchers) < PARALLEL_FILL_MIN_ROWS:
            return fill_one_by_one(matchers, bitmask, rows)
        self._fill_par(self._executor, [(m.m, row) for m, row in zip(matchers, rows)], bitmask)

    def compile(self, params: StructuredOutputsParams) -> Any:
        ll, kind = self.ll, params.kind
        try:
            if kind in ("json", "json_object"):
                grammar = ll.LLMatcher.grammar_from_json_schema(
                    json.dumps(_schema(params)),
                    defaults={"whitespace_flexible": not params.disable_any_whitespace, "lenient": True})
            elif kind == "regex":
                grammar = ll.LLMatcher.grammar_from_regex(params.regex)
            elif kind == "choice":
                grammar = ll.grammar_from("choice", params.choice)
            else:
                grammar = ll.grammar_from("grammar", params.grammar)
        except ValueError as e:
            raise ValueError(f"the {kind} constraint does not compile with guidance: {_first_line(e)}") from None
        is_error, messages = ll.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise ValueError(f"the {kind} constraint does not compile with guidance: {_first_line(messages[0])}")
        return grammar

    def matcher(self, compiled: Any) -> GrammarMatcher:
        return _GuidanceMatcher(self.ll.LLMatcher(self.tokenizer, compiled, log_level=0), self.fill)


# --- outlines (outlines_core) ----------------------------------------------------------
class _OutlinesMatcher:
    __slots__ = ("guide",)

    def __init__(self, guide):
        self.guide = guide

    def accept(self, token_id: int) -> bool:
        if not self.guide.accepts_tokens([token_id]):
            return False
        self.guide.advance(token_id, return_tokens=False)
        return True

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        v = bitmask[row]
        self.guide.write_mask_into(v.data_ptr(), v.numel(), v.element_size())

    def is_terminated(self) -> bool:
        return self.guide.is_finished()


class OutlinesBackend:
    """outlines_core's regex index (as vLLM's outlines backend): JSON schemas become a regex
    first, so recursive schemas and grammars need xgrammar or guidance."""

    name = "outlines"

    def __init__(self, tokenizer: TokenizerView):
        import outlines_core
        self.oc = outlines_core
        eos = set(tokenizer.eos_token_ids)
        byte_level = '"ByteLevel"' in tokenizer.tokenizer_json
        decode = _byte_level_decoder() if byte_level else None
        special = _added_token_contents(tokenizer.tokenizer_json)
        vocab: dict[bytes, list[int]] = {}
        for i, token in enumerate(tokenizer.vocab):
            if not token or i in eos or token in special:
                continue
            raw = token.encode() if decode is None or any(ch not in decode for ch in token) \
                else bytes(decode[ch] for ch in token)
            vocab.setdefault(raw, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(min(eos) if eos else 0, vocab)

    def compile(self, params: StructuredOutputsParams) -> Any:
        kind = params.kind
        try:
            if kind in ("json", "json_object"):
                regex = self.oc.json_schema.build_regex_from_schema(
                    json.dumps(_schema(params)), **({"whitespace_pattern": ""} if params.disable_any_whitespace else {}))
            elif kind == "regex":
                regex = params.regex
            elif kind == "choice":
                regex = choice_regex(params.choice)
            else:
                raise ValueError("grammar constraints need backend xgrammar or guidance")
            return self.oc.Index(regex, self.vocabulary)
        except Exception as e:
            raise ValueError(f"the {kind} constraint does not compile with outlines: {_first_line(e)}") from None

    def matcher(self, compiled: Any) -> GrammarMatcher:
        return _OutlinesMatcher(self.oc.Guide(compiled))

    def fill_bitmasks(self, matchers: list[GrammarMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        fill_one_by_one(matchers, bitmask, rows)


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable-character alphabet for bytes, inverted: char -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _added_token_contents(tokenizer_json: str) -> set[str]:
    return {t["content"] for t in json.loads(tokenizer_json).get("added_tokens", []) if t.get("special")}


def _unavailable(name: str) -> BackendFactory:
    def factory(tokenizer: TokenizerView) -> GrammarBackend:
        check_available(name)
        raise AssertionError("unreachable")
    return factory


def _first_line(e: Any) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


register_backend("xgrammar", XGrammarBackend)
register_backend("guidance", GuidanceBackend)
register_backend("outlines", OutlinesBackend)
register_backend("lm-format-enforcer", _unavailable("lm-format-enforcer"))
