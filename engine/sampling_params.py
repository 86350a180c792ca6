"""How one request wants its tokens chosen: vLLM's `SamplingParams`, names and defaults.

A `SamplingParams` is built where the user's request enters (HTTP body, `LLM.generate`),
completed once per engine by `update_from_tokenizer` (eos ids, bad words as token ids),
and may travel to another node: a prefill node forwards it to the decode node with
`to_dict()`, the decode node rebuilds it with `from_dict()`. It is never pickled.

No torch import here: `engine/__init__.py` imports this module on light paths (router).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Protocol

from engine.structured_output.params import StructuredOutputsParams

# Below this temperature a request is greedy (vLLM's _SAMPLING_EPS).
SAMPLING_EPS = 1e-5
_MASK64 = (1 << 64) - 1
# Most top logprobs a request may ask for per token (vLLM's default max_logprobs).
MAX_LOGPROBS = 20
# Bounds that keep every value representable where it goes: token ids and counts fit
# int32 tensors and msgpack, floats stay finite and non-zero in float32 (a positive
# top_p of 1e-300 is 0.0 in float32; a temperature of 1e39 is inf).
MAX_TOKEN_ID = 2**31 - 1
MAX_COUNT = 2**31 - 1                 # max_tokens, min_tokens, top_k
# top_p below this keeps only the most likely token(s) on any vocabulary under a
# million tokens (the second token has at least 1/V of the mass ahead of it), so it
# is stored as this: same tokens, and a float32-safe value.
MIN_TOP_P = 1e-6
MAX_TEMPERATURE = 1e4                 # logits / temperature: already uniform long before this
REPETITION_PENALTY_RANGE = (1e-4, 1e4)


class SamplingType(enum.Enum):
    GREEDY = "greedy"            # argmax; no randomness
    RANDOM = "random"            # the engine draws a seed for the request
    RANDOM_SEED = "random_seed"  # the user's seed: reproducible across batches and nodes


class SamplingTokenizer(Protocol):
    """What `update_from_tokenizer` needs from a tokenizer."""

    eos_token_ids: frozenset[int]
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                      # 0 or -1: no top-k (-1 is stored as 0)
    min_p: float = 0.0
    seed: int | None = None             # any int; stored (and used) modulo 2**64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16         # None: until the context is full
    # May exceed max_tokens: the request then ends at max_tokens, with eos, stop ids and stop
    # strings ignored throughout. That is how the router's prefill job (max_tokens 1) carries
    # a split request's min_tokens; clients are refused the combination (router/protocol.py).
    min_tokens: int = 0
    stop: str | list[str] | None = None           # stored as list[str]
    stop_token_ids: list[int] | None = None       # stored as list[int]
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None         # top logprobs per token; 0: only the sampled token's
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    bad_words: list[str] | None = None            # stored as list[str]
    detokenize: bool = True
    # A grammar the output must match (a dict is converted); see engine/structured_output/.
    structured_outputs: StructuredOutputsParams | None = None
    # Derived by update_from_tokenizer. They are fields (not private attributes) so that
    # to_dict()/from_dict() carry them to a node that may not have the tokenizer loaded.
    bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False)
    eos_token_ids: frozenset[int] = field(default=frozenset(), repr=False)

    def __post_init__(self) -> None:
        self.stop = _as_str_list("stop", self.stop)
        self.bad_words = _as_str_list("bad_words", self.bad_words)
        self.stop_token_ids = _as_token_ids("stop_token_ids", self.stop_token_ids)
        self.bad_words_token_ids = [_as_token_ids("bad_words_token_ids", ids) for ids in self.bad_words_token_ids]
        self.eos_token_ids = frozenset(_as_token_ids("eos_token_ids", list(self.eos_token_ids)))
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        self._validate()
        # Same sampling, wire-safe values (msgpack carries at most 64-bit ints; float32 has no 1e-300).
        if self.seed is not None:
            self.seed &= _MASK64
        if self.top_p < MIN_TOP_P:
            self.top_p = MIN_TOP_P

    def _validate(self) -> None:
        _check_int("n", self.n)
        if self.n != 1:
            raise ValueError(f"n={self.n}: only n=1 is supported; send {self.n} requests (with different seeds) "
                             "to get several completions")
        _check_number("temperature", self.temperature, lambda v: 0 <= v <= MAX_TEMPERATURE,
                      f"must be between 0 (greedy) and {MAX_TEMPERATURE:g}")
        _check_number("top_p", self.top_p, lambda v: 0 < v <= 1, "must be in (0, 1] (1 disables top-p)")
        _check_int("top_k", self.top_k)
        if not -1 <= self.top_k <= MAX_COUNT:
            raise ValueError(f"top_k={self.top_k}: must be -1 or 0 (disabled) or between 1 and {MAX_COUNT}")
        _check_number("min_p", self.min_p, lambda v: 0 <= v <= 1, "must be in [0, 1] (0 disables min-p)")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name), lambda v: -2 <= v <= 2, "must be in [-2, 2] (0 disables it)")
        low, high = REPETITION_PENALTY_RANGE
        _check_number("repetition_penalty", self.repetition_penalty, lambda v: low <= v <= high,
                      f"must be between {low:g} and {high:g} (1 disables it; > 1 discourages repeats)")
        if self.seed is not None:
            _check_int("seed", self.seed)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens)
            if not 1 <= self.max_tokens <= MAX_COUNT:
                raise ValueError(f"max_tokens={self.max_tokens}: must be between 1 and {MAX_COUNT}, or None to "
                                 "generate until the context is full")
        _check_int("min_tokens", self.min_tokens)
        if not 0 <= self.min_tokens <= MAX_COUNT:
            raise ValueError(f"min_tokens={self.min_tokens}: must be between 0 and {MAX_COUNT}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise ValueError(f"logprobs={self.logprobs}: must be between 0 and {MAX_LOGPROBS} "
                                 "(0 returns only the sampled token's logprob), or None")
        if any(not s for s in self.stop):
            raise ValueError("stop contains an empty string: remove it (it would end every request at once)")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need the text: drop detokenize=false, or stop on token ids "
                             "(stop_token_ids) instead")
        if any(not w.strip() for w in self.bad_words):
            raise ValueError("bad_words contains an empty or whitespace-only word: remove it")

    # --- derived --------------------------------------------------------------------
    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def sampling_type(self) -> SamplingType:
        if self.greedy:
            return SamplingType.GREEDY
        return SamplingType.RANDOM if self.seed is None else SamplingType.RANDOM_SEED

    def update_from_tokenizer(self, tokenizer: SamplingTokenizer) -> None:
        """Fill `eos_token_ids` and `bad_words_token_ids` for this tokenizer.

        Idempotent: `LLM.generate` shares one params object among prompts, and a decode
        node calls it again on params a prefill node already completed.
        """
        self.eos_token_ids = frozenset() if self.ignore_eos else frozenset(tokenizer.eos_token_ids)
        self.bad_words_token_ids = _encode_bad_words(self.bad_words, tokenizer)

    # --- the wire -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/msgpack-ready values (lists, not frozensets); `from_dict` inverts it."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["stop"] = list(self.stop)
        out["stop_token_ids"] = list(self.stop_token_ids)
        out["bad_words"] = list(self.bad_words)
        out["bad_words_token_ids"] = [list(ids) for ids in self.bad_words_token_ids]
        out["eos_token_ids"] = sorted(self.eos_token_ids)
        if self.structured_outputs is not None:
            out["structured_outputs"] = self.structured_outputs.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        """Rebuild (and re-validate) params sent by `to_dict`, or by `msgspec` encoding
        the dataclass itself. Unknown keys are refused rather than dropped silently."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown sampling params {unknown}: the sending node runs a different "
                             "pdcluster version; run the same version on every node")
        return cls(**data)


def _encode_bad_words(words: list[str], tokenizer: SamplingTokenizer) -> list[list[int]]:
    """vLLM's rule: each word as-is (left-stripped), plus a leading-space variant when
    that variant starts with a different token but has as many tokens (the word in the
    middle of text, for tokenizers that mark word starts)."""
    out: list[list[int]] = []
    for word in words:
        word = word.lstrip()
        plain = list(tokenizer.encode(word, add_special_tokens=False))
        if not plain:
            raise ValueError(f"bad word {word!r} encodes to no tokens: remove it from bad_words")
        out.append(plain)
        spaced = list(tokenizer.encode(" " + word, add_special_tokens=False))
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            out.append(spaced)
    invalid = sorted({t for ids in out for t in ids if not 0 <= t < tokenizer.vocab_size})
    if invalid:
        raise ValueError(f"bad_words encode to token ids {invalid[:10]} outside the vocabulary "
                         f"[0, {tokenizer.vocab_size}): the tokenizer and model disagree; check the model files")
    return out


def _check_number(name: str, value: Any, ok: Callable[[float], bool], rule: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r}: must be a number ({rule})")
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name}={value}: {rule}")


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r}: must be an integer")


def _as_str_list(name: str, value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    items = list(value)
    if not all(isinstance(s, str) for s in items):
        raise ValueError(f"{name}={value!r}: must be a string or a list of strings")
    return items


def _as_token_ids(name: str, value: list[int] | None) -> list[int]:
    if value is None:
        return []
    items = list(value)
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_TOKEN_ID for t in items):
        raise ValueError(f"{name}={value!r:.200}: must be a list of token ids (integers from 0 to {MAX_TOKEN_ID})")
    return items
