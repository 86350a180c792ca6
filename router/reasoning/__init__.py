"""Reasoning parsers: split a model's output into `reasoning_content` and `content`.

A registry in vLLM's shape: `ReasoningParserManager.list_registered()`, lookup by a
registered name or by a `module:Class` path (the class is imported, never unpickled).
A parser class has `start_token`/`end_token` (the texts, which the tokenizer must hold
as single tokens for structured output to start after the reasoning) and makes a fresh
`stream()` per choice; the non-streaming answer runs the same stream over the whole text,
so streamed deltas always reassemble to it.
"""

from __future__ import annotations

from router.class_registry import ClassRegistry
from router.reasoning.think_tags import DeepSeekR1ReasoningParser, Qwen3ReasoningParser, ReasoningParser, ReasoningStream


class ReasoningParserManager(ClassRegistry):
    kind = "reasoning parser"
    base = ReasoningParser
    base_path = "router.reasoning.ReasoningParser"


ReasoningParserManager.register("deepseek_r1", DeepSeekR1ReasoningParser)
ReasoningParserManager.register("qwen3", Qwen3ReasoningParser)

__all__ = ["ReasoningParser", "ReasoningParserManager", "ReasoningStream"]
