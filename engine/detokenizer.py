"""Generated token ids to streamed text, and when a request should stop.

`IncrementalDetokenizer` turns tokens into text one step at a time without decoding the
whole output each step, and finds stop strings. `check_stop` decides the token-level
stops (eos, stop_token_ids, max_tokens). The engine calls both for every sampled token.

`params` is duck-typed (the engine passes its SamplingParams), read with vLLM's names:
`stop`, `include_stop_str_in_output`, `skip_special_tokens`, `min_tokens`,
`ignore_eos`, `stop_token_ids`, `max_tokens`. `spaces_between_special_tokens` is
accepted and, as in vLLM with fast tokenizers, has no effect: special tokens decode in
place.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

# Prompt tokens decoded with the first output tokens. Some decoders (sentencepiece's
# Metaspace) drop the leading space of a decode: with context before it, the first
# generated word keeps its space.
INITIAL_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"  # what a decode shows for bytes of an unfinished character

FinishReason = Literal["stop", "length"]


class TokenDecoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(slots=True)
class DetokenizerUpdate:
    """What one `append` produced. `text` is new, stable output text: safe to stream, it
    will never be taken back. `stop_str` is the stop string that matched, if one did;
    the request should then finish (the output text is already cut at it)."""

    text: str = ""
    stop_str: str | None = None


class IncrementalDetokenizer:
    """Text of one request's output, built token by token.

    Per token it decodes only a small window of ids: `[prefix_offset, read_offset)` is
    context whose text was already emitted, `[read_offset, end)` tokens not yet turned
    into text. The new text is decode(window) minus decode(context), emitted only when
    it does not end in U+FFFD, i.e. when a character split over several byte-level
    tokens is complete (the technique of text-generation-inference and vLLM).

    Stop strings: the output is cut before the first stop string to complete (after it
    with include_stop_str_in_output), and text that could still begin a stop string is
    held back until the next tokens tell, so a client never sees part of one. `finish()`
    releases what is held back. `text` is everything emitted so far: always the sum of
    the returned deltas, and the final output once finished.
    """

    def __init__(self, tokenizer: TokenDecoder, prompt_token_ids: Sequence[int], params: Any):
        self.tokenizer = tokenizer
        self.skip_special_tokens = bool(getattr(params, "skip_special_tokens", True))
        self.include_stop_str_in_output = bool(getattr(params, "include_stop_str_in_output", False))
        self.min_tokens = int(getattr(params, "min_tokens", 0) or 0)
        stop = getattr(params, "stop", None) or []
        self.stop: list[str] = [s for s in ([stop] if isinstance(stop, str) else stop) if s]
        self._window: list[int] = list(prompt_token_ids[-INITIAL_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._window)
        self._prefix_text: str | None = None  # decode of the context, cached until it moves
        self._text = ""     # output text decoded so far (cut at a matched stop string)
        self._emitted = 0   # how much of _text has been handed out
        self._checked = 0   # how much of _text has been searched for stop strings
        self.num_output_tokens = 0
        self.stop_str: str | None = None
        self.finished = False

    @property
    def text(self) -> str:
        return self._text[:self._emitted]

    def append(self, token_ids: Sequence[int], last_is_stop_token: bool = False) -> DetokenizerUpdate:
        """Add newly generated token(s); return the new stable text.

        `last_is_stop_token`: the last token ended generation (eos or a stop token id,
        see `check_stop`); its text is left out unless include_stop_str_in_output, as
        vLLM does. Tokens after a matched stop string are ignored.
        """
        if self.finished:
            return DetokenizerUpdate()
        delta_start = self._emitted
        for i, token in enumerate(token_ids):
            self.num_output_tokens += 1
            if last_is_stop_token and i == len(token_ids) - 1 and not self.include_stop_str_in_output:
                break
            new = self._decode_next(token)
            if not new:
                continue
            self._text += new
            if self._check_stop_strings():
                self.finished = True
                return DetokenizerUpdate(self._text[delta_start:], self.stop_str)
        self._emitted = max(self._emitted, len(self._text) - self._held_back())
        return DetokenizerUpdate(self._text[delta_start:self._emitted])

    def finish(self) -> str:
        """The request ended: release held-back text and the bytes of an unfinished
        character (as U+FFFD, like a full decode), and return that last delta."""
        if self.finished:
            return ""
        self.finished = True
        delta_start = self._emitted  # a stop string the flush completes moves _emitted
        if self._read_offset < len(self._window):
            prefix_text = self._context_text()
            self._text += self.tokenizer.decode(self._window[self._prefix_offset:],
                                                self.skip_special_tokens)[len(prefix_text):]
            self._check_stop_strings()
        self._emitted = len(self._text)
        return self._text[delta_start:]

    # --- decoding ------------------------------------------------------------------------
    def _context_text(self) -> str:
        if self._prefix_text is None:
            self._prefix_text = self.tokenizer.decode(self._window[self._prefix_offset:self._read_offset],
                                                      self.skip_special_tokens)
        return self._prefix_text

    def _decode_next(self, token: int) -> str:
        """Text that `token` completes, or "" while a character is unfinished (or the
        token has no text, like a skipped special token)."""
        self._window.append(token)
        prefix_text = self._context_text()
        new_text = self.tokenizer.decode(self._window[self._prefix_offset:], self.skip_special_tokens)
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        # The tokens just read become the next context; the window stays a few tokens.
        del self._window[:self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._window)
        self._prefix_text = None
        return new_text[len(prefix_text):]

    # --- stop strings --------------------------------------------------------------------
    def _check_stop_strings(self) -> bool:
        """Cut the text at the stop string that completes first; True if one did.

        Only occurrences that end in text not checked before are new. While fewer than
        min_tokens are out, stop strings do not count (and are not looked for again).
        Held-back text guarantees that a stop string completing now began after the
        emitted text, so the cut never takes back what a client has seen."""
        checked, self._checked = self._checked, len(self._text)
        if not self.stop or self.num_output_tokens < self.min_tokens:
            return False
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for s in self.stop:
            start = self._text.find(s, max(checked - len(s) + 1, 0))
            if start >= 0 and (best is None or (start + len(s), start) < best[:2]):
                best = (start + len(s), start, s)
        if best is None:
            return False
        end, start, s = best
        self._text = self._text[:max(end if self.include_stop_str_in_output else start, self._emitted)]
        self._emitted = self._checked = len(self._text)
        self.stop_str = s
        return True

    def _held_back(self) -> int:
        """Length of the longest tail of the unemitted text that a stop string starts
        with. With include_stop_str_in_output nothing needs holding: the output is cut
        after the stop string, so all text before it stays."""
        if not self.stop or self.include_stop_str_in_output:
            return 0
        tail = self._text[self._emitted:]
        for n in range(min(len(tail), max(len(s) for s in self.stop) - 1), 0, -1):
            suffix = tail[-n:]
            if any(s.startswith(suffix) for s in self.stop):
                return n
        return 0


def check_stop(token_id: int, num_output_tokens: int, params: Any, eos_token_ids: Iterable[int] | None = None,
               max_tokens: int | None = None) -> tuple[FinishReason, int | None] | None:
    """Whether the token just sampled (the `num_output_tokens`-th) ends the request.

    Returns (finish_reason, stop_reason) or None, checking in this order:
    1. fewer than `min_tokens` out: eos and stop_token_ids do not count yet;
    2. eos (any of `eos_token_ids`, unless `ignore_eos`): ("stop", None);
    3. one of `stop_token_ids`: ("stop", token_id), even with ignore_eos;
    4. `max_tokens` reached (the argument, else params.max_tokens): ("length", None).
    A model that stops on its last allowed token reports "stop": it chose to. Stop
    strings are the detokenizer's (`DetokenizerUpdate.stop_str`).
    """
    if num_output_tokens >= int(getattr(params, "min_tokens", 0) or 0):
        if not getattr(params, "ignore_eos", False) and token_id in (eos_token_ids or ()):
            return "stop", None
        if token_id in (getattr(params, "stop_token_ids", None) or ()):
            return "stop", token_id
    limit = max_tokens if max_tokens is not None else getattr(params, "max_tokens", None)
    if limit is not None and num_output_tokens >= limit:
        return "length", None
    return None
