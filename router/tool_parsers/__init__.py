"""Tool-call parsers: turn a model's text into OpenAI `tool_calls`.

A registry like the reasoning parsers' (`ToolParserManager.list_registered()`, a name or
a `module:Class` path). A parser makes a fresh `stream()` per choice: feed it text
deltas, get back (content delta, finished tool calls); `finish()` flushes. The
non-streaming answer runs the same stream over the whole text, so streamed deltas
reassemble to it exactly.
"""

from __future__ import annotations

import importlib

from router.tool_parsers.parsers import (HermesToolParser, Llama3JsonToolParser, ParsedToolCall, ToolParser,
                                         ToolStream)


class ToolParserManager:
    _parsers: dict[str, type[ToolParser]] = {}

    @classmethod
    def register(cls, name: str, parser: type[ToolParser]) -> None:
        cls._parsers[name] = parser

    @classmethod
    def list_registered(cls) -> list[str]:
        return sorted(cls._parsers)

    @classmethod
    def get(cls, name: str) -> type[ToolParser]:
        if name in cls._parsers:
            return cls._parsers[name]
        if ":" in name:
            module, _, attr = name.partition(":")
            try:
                parser = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise ValueError(f"tool call parser {name!r} cannot be imported: {e}") from None
            if not (isinstance(parser, type) and issubclass(parser, ToolParser)):
                raise ValueError(f"tool call parser {name!r} is not a subclass of router.tool_parsers.ToolParser")
            return parser
        raise ValueError(f"unknown tool call parser {name!r}: registered are "
                         f"{', '.join(cls.list_registered())}, or give a module:Class path")


ToolParserManager.register("hermes", HermesToolParser)
ToolParserManager.register("llama3_json", Llama3JsonToolParser)

__all__ = ["ParsedToolCall", "ToolParser", "ToolParserManager", "ToolStream"]
