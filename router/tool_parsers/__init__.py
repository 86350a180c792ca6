"""Tool-call parsers: turn a model's text into OpenAI `tool_calls`.

A registry like the reasoning parsers' (`ToolParserManager.list_registered()`, a name or
a `module:Class` path). A parser makes a fresh `stream()` per choice: feed it text
deltas, get back (content delta, finished tool calls); `finish()` flushes. The
non-streaming answer runs the same stream over the whole text, so streamed deltas
reassemble to it exactly.
"""

from __future__ import annotations

from router.class_registry import ClassRegistry
from router.tool_parsers.parsers import (HermesToolParser, Llama3JsonToolParser, ParsedToolCall, ToolParser,
                                         ToolStream)


class ToolParserManager(ClassRegistry):
    kind = "tool call parser"
    base = ToolParser
    base_path = "router.tool_parsers.ToolParser"


ToolParserManager.register("hermes", HermesToolParser)
ToolParserManager.register("llama3_json", Llama3JsonToolParser)

__all__ = ["ParsedToolCall", "ToolParser", "ToolParserManager", "ToolStream"]
