"""The built-in tool-call formats.

* `hermes` (Hermes 2 Pro, Qwen2.5/Qwen3): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  blocks, text around them is content. A last `<tool_call>` left open (the output stopped
  at `</tool_call>`, or ended) is a call when its JSON parses, as vLLM's regex reads it.
  A non-streaming answer with calls has as content only the text before the first call
  (trailing whitespace stripped; null when empty), as vLLM builds it: see
  `ToolStream.message_content`.
* `llama3_json` (Llama 3.1/3.2): the whole answer is one JSON object `{"name": ...,
  "parameters": {...}}` (or several separated by `;`), optionally after `<|python_tag|>`.

A block that does not parse as a call stays in the content: nothing the model wrote is
dropped, but for whitespace around hermes calls (and, in a non-streaming hermes answer,
text after the first call, as vLLM).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass


@dataclass(slots=True)
class ParsedToolCall:
    name: str
    arguments: str           # JSON text, as OpenAI sends it
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"call_{uuid.uuid4().hex[:24]}"


def parse_call(obj: object, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> ParsedToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    return ParsedToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


class ToolStream:
    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        raise NotImplementedError

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        raise NotImplementedError

    def message_content(self, content: str) -> str | None:
        """A non-streaming message's `content` once the stream made calls, from `content`,
        all the content it passed on: by default that text, None when empty."""
        return content or None


class ToolParser:
    def stream(self) -> ToolStream:
        raise NotImplementedError

    def extract(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        s = self.stream()
        c1, t1 = s.feed(text)
        c2, t2 = s.finish()
        return c1 + c2, t1 + t2


class _HermesStream(ToolStream):
    """Whitespace next to calls is layout, not an answer: the stream holds a run of
    whitespace back until text follows it, and drops it when a call follows (or the
    answer ends after calls). Without calls every character is passed on."""

    START, END = "<tool_call>", "</tool_call>"

    def __init__(self):
        self._buf = ""
        self._in_call = False
        self._space = ""                   # trailing whitespace held back
        self._passed: list[str] = []       # content passed on before the first call
        self._lead: str | None = None      # all of it, once a call was made

    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        self._buf += text
        content, calls = [], []
        while True:
            if not self._in_call:
                i = self._buf.find(self.START)
                if i < 0:
                    keep = _partial_suffix(self._buf, self.START)
                    content.append(self._pass(self._buf[:len(self._buf) - keep]))
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                content.append(self._pass(self._buf[:i]))
                self._buf = self._buf[i:]
                self._in_call = True
            j = self._buf.find(self.END)
            if j < 0:
                break
            block = self._buf[:j + len(self.END)]
            self._buf = self._buf[j + len(self.END):]
            self._in_call = False
            call = _json_call(block[len(self.START):-len(self.END)])
            if call is None:
                content.append(self._pass(block))
            else:
                self._called()
                calls.append(call)
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        out, self._buf = self._buf, ""
        if self._in_call:  # an unclosed last call: a call when what follows the tag is one
            self._in_call = False
            call = _json_call(out[len(self.START):])
            if call is not None:
                self._called()
                return "", [call]
        content = self._pass(out)
        space, self._space = self._space, ""
        return (content if self._lead is not None else content + space), []

    def _pass(self, text: str) -> str:
        """What of `text` goes out now: all but its trailing whitespace, which waits."""
        text = self._space + text
        kept = text.rstrip()
        self._space = text[len(kept):]
        if self._lead is None and kept:
            self._passed.append(kept)
        return kept

    def _called(self) -> None:
        self._space = ""
        if self._lead is None:
            self._lead = "".join(self._passed)
            self._passed = []

    def message_content(self, content: str) -> str | None:
        if self._lead is None:
            return content or None
        return self._lead.rstrip() or None   # vLLM: the text before the first call


class HermesToolParser(ToolParser):
    def stream(self) -> ToolStream:
        return _HermesStream()


class _Llama3JsonStream(ToolStream):
    TAG = "<|python_tag|>"

    def __init__(self):
        self._buf = ""
        self._mode: str | None = None    # None: undecided, "text", "json"

    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        if self._mode == "text":
            return text, []
        self._buf += text
        head = self._buf.lstrip()
        if not head or (self.TAG.startswith(head) and head != self.TAG):
            return "", []
        self._mode = "json" if head.startswith(("{", self.TAG)) else "text"
        if self._mode == "text":
            out, self._buf = self._buf, ""
            return out, []
        return "", []

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        out, self._buf = self._buf, ""
        if self._mode != "json":
            return out, []
        body = out.strip().removeprefix(self.TAG).strip()
        calls = []
        for part in _split_json_objects(body):
            call = _json_call(part)
            if call is None:
                return out, []
            calls.append(call)
        return ("", calls) if calls else (out, [])


class Llama3JsonToolParser(ToolParser):
    def stream(self) -> ToolStream:
        return _Llama3JsonStream()


def _json_call(text: str) -> ParsedToolCall | None:
    try:
        return parse_call(json.loads(text))
    except ValueError:
        return None


def _split_json_objects(text: str) -> list[str]:
    """`{...}; {...}` -> the objects' texts (raw_decode, so `;` inside strings is safe)."""
    decoder, parts, i = json.JSONDecoder(), [], 0
    while i < len(text):
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
        if i >= len(text):
            break
        try:
            _, end = decoder.raw_decode(text, i)
        except ValueError:
            return [text]
        parts.append(text[i:end])
        i = end
    return parts


def _partial_suffix(text: str, tag: str) -> int:
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
