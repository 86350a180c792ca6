"""Reasoning parsers: split a model's output into `reasoning_content` and `content`.

A registry in vLLM's shape: `ReasoningParserManager.list_registered()`, lookup by a
registered name or by a `module:Class` path (the class is imported, never unpickled).
A parser class has `start_token`/`end_token` (the texts, which the tokenizer must hold
as single tokens for structured output to start after the reasoning) and makes a fresh
`stream()` per choice; the non-streaming answer runs the same stream over the whole text,
so streamed deltas always reassemble to it.
"""

from __future__ import annotations

import importlib

from router.reasoning.think_tags import DeepSeekR1ReasoningParser, Qwen3ReasoningParser, ReasoningParser, ReasoningStream


class ReasoningParserManager:
    _parsers: dict[str, type[ReasoningParser]] = {}

    @classmethod
    def register(cls, name: str, parser: type[ReasoningParser]) -> None:
        cls._parsers[name] = parser

    @classmethod
    def list_registered(cls) -> list[str]:
        return sorted(cls._parsers)

    @classmethod
    def get(cls, name: str) -> type[ReasoningParser]:
        """A registered name, or `module:Class`. ValueError lists what is registered."""
        if name in cls._parsers:
            return cls._parsers[name]
        if ":" in name:
            module, _, attr = name.partition(":")
            try:
                parser = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise ValueError(f"reasoning parser {name!r} cannot be imported: {e}") from None
            if not (isinstance(parser, type) and issubclass(parser, ReasoningParser)):
                raise ValueError(f"reasoning parser {name!r} is not a subclass of router.reasoning.ReasoningParser")
            return parser
        raise ValueError(f"unknown reasoning parser {name!r}: registered are "
                         f"{', '.join(cls.list_registered())}, or give a module:Class path")


ReasoningParserManager.register("deepseek_r1", DeepSeekR1ReasoningParser)
ReasoningParserManager.register("qwen3", Qwen3ReasoningParser)

__all__ = ["ReasoningParser", "ReasoningParserManager", "ReasoningStream"]
