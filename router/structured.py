"""From a request body to what the engine enforces and how the router reads the answer.

Structured outputs arrive in several spellings, all accepted as vLLM does:
`response_format` (OpenAI: json_object, json_schema), vLLM's older `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` (+ `guided_decoding_backend`), and its
newer `structured_outputs` object. Tools add two more: `tool_choice: "required"` (a JSON
list of calls) and a named function (its arguments' schema) are enforced with the same
grammar machinery. At most one constraint per request: two are a 400, not a guess.

The result is one `StructuredOutputsParams` with the backend checked (installed, or a
400 saying what to install) and, for chat with a reasoning parser, the token after which
the grammar starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine.structured_output.params import StructuredOutputsParams, resolve_backend
from router.protocol import RequestError
from router.reasoning import ReasoningParser, ReasoningParserManager
from router.spec import RouterLaunchSpec
from router.tool_parsers import ParsedToolCall, ToolParser, ToolParserManager


@dataclass(slots=True)
class AnswerPlan:
    """How the router reads one request's output."""

    constraint: StructuredOutputsParams | None = None
    reasoning: ReasoningParser | None = None
    starts_in_reasoning: bool = False          # the prompt opened the reasoning: the output starts inside it
    tool_parser: ToolParser | None = None      # tool_choice auto
    tool_mode: str = "none"                    # none | auto | required | named
    tool_name: str | None = None               # tool_choice named
    max_tool_calls: int | None = None          # 1 with parallel_tool_calls false: later calls are dropped (vLLM)


class ServerFeatures:
    """The cluster-wide settings, resolved once per router."""

    def __init__(self, spec: RouterLaunchSpec):
        self.spec = spec
        self.reasoning = ReasoningParserManager.get(spec.reasoning_parser)() if spec.reasoning_parser else None
        self.tool_parser = ToolParserManager.get(spec.tool_call_parser)() if spec.tool_call_parser else None

    def plan(self, req: Any, chat: bool, tokenizer: Any, prompt_text: str) -> AnswerPlan:
        plan = AnswerPlan()
        sources = _constraint_sources(req)
        if chat and req.tools:
            mode, name = _tool_choice(req)
            plan.tool_mode, plan.tool_name = mode, name
            if req.parallel_tool_calls is False:
                plan.max_tool_calls = 1
            if mode == "auto":
                if self.tool_parser is None:
                    raise RequestError('tool_choice "auto" needs a tool call parser on the server: set '
                                       "router.tool_call_parser in cluster.yaml (hermes, llama3_json), or send "
                                       'tool_choice "required" or a named function')
                plan.tool_parser = self.tool_parser
            elif mode == "required":
                sources.append(("tool_choice", {"json": _required_schema(req.tools, req.parallel_tool_calls)}))
            elif mode == "named":
                sources.append(("tool_choice", {"json": _function(req.tools, name).get("parameters")
                                                or {"type": "object"}}))
        elif chat and req.tool_choice not in (None, "none", "auto"):
            raise RequestError("tool_choice needs tools: send the tools the model may call")
        if len(sources) > 1:
            raise RequestError(f"several structured output constraints ({', '.join(n for n, _ in sources)}): "
                               "send one")
        if (chat and self.reasoning is not None and getattr(req, "include_reasoning", True)
                and not self.reasoning.reasoning_ended_in_prompt(prompt_text)):
            plan.reasoning = self.reasoning  # (a prompt that closed the reasoning gets an answer only)
            plan.starts_in_reasoning = self.reasoning.output_starts_in_reasoning(prompt_text)
        if sources:
            _, fields = sources[0]
            backend = fields.pop("backend", None) or self.spec.structured_outputs_backend
            fields.setdefault("disable_any_whitespace", self.spec.disable_any_whitespace)
            fields.setdefault("disable_additional_properties", self.spec.disable_additional_properties)
            try:
                # auto stays auto: each node takes xgrammar, or guidance where xgrammar cannot
                # compile the grammar (the same choice everywhere: nodes run the same install).
                resolved = resolve_backend(backend)
                fields["backend"] = "auto" if backend == "auto" else resolved
                constraint = StructuredOutputsParams(**fields)
            except (TypeError, ValueError) as e:
                raise RequestError(str(e)) from None
            if plan.reasoning is not None and not self.spec.enable_in_reasoning:
                end = tokenizer.token_to_id(plan.reasoning.end_token)
                if end is None:
                    raise RequestError(f"the reasoning parser's end tag {plan.reasoning.end_token!r} is not one token "
                                       "of this model's tokenizer: structured output cannot start after it")
                constraint.reasoning_end_token_id = end
            plan.constraint = constraint
        return plan


def _constraint_sources(req: Any) -> list[tuple[str, dict[str, Any]]]:
    sources: list[tuple[str, dict[str, Any]]] = []
    rf = req.response_format
    if rf is not None:
        kind = rf.get("type", "text")
        if kind == "json_object":
            sources.append(("response_format", {"json_object": True}))
        elif kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
                raise RequestError("response_format.json_schema must be an object with a 'schema' object")
            sources.append(("response_format", {"json": js.get("schema") or {"type": "object"}}))
        elif kind != "text":
            raise RequestError(f"response_format type {kind!r} is not supported: use text, json_object or json_schema")
    guided = {"json": req.guided_json, "regex": req.guided_regex, "choice": req.guided_choice,
              "grammar": req.guided_grammar}
    for kind, value in guided.items():
        if value is not None:
            fields: dict[str, Any] = {kind: value}
            if req.guided_decoding_backend:
                fields["backend"] = req.guided_decoding_backend
            if req.guided_whitespace_pattern is not None:
                fields["whitespace_pattern"] = req.guided_whitespace_pattern
            sources.append((f"guided_{kind}", fields))
    if req.structured_outputs is not None:
        so = dict(req.structured_outputs)
        unsupported = sorted(set(so) & {"structural_tag"})
        if unsupported:
            raise RequestError(f"structured_outputs.{unsupported[0]} is not supported: use json, regex, choice, "
                               "grammar or json_object")
        so.pop("disable_fallback", None)   # vLLM's knob for auto's fallback: accepted, auto always falls back
        known = {"json", "regex", "choice", "grammar", "json_object", "backend", "disable_any_whitespace",
                 "disable_additional_properties", "whitespace_pattern"}
        unknown = sorted(set(so) - known)
        if unknown:
            raise RequestError(f"structured_outputs: unknown fields {unknown}: use {sorted(known)}")
        if not so.get("backend") and req.guided_decoding_backend:
            so["backend"] = req.guided_decoding_backend
        sources.append(("structured_outputs", so))
    return sources


def _tool_choice(req: Any) -> tuple[str, str | None]:
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise RequestError(f"tool_choice {choice!r}: use none, auto, required or "
                               '{"type": "function", "function": {"name": ...}}')
        return choice, None
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise RequestError('tool_choice must be none, auto, required or {"type": "function", "function": {"name": ...}}')
    _function(req.tools, name)
    return "named", name


def _function(tools: list[dict[str, Any]], name: str | None) -> dict[str, Any]:
    for tool in tools:
        fn = tool.get("function") or {}
        if fn.get("name") == name:
            return fn
    names = [(t.get("function") or {}).get("name") for t in tools]
    raise RequestError(f"tool_choice names function {name!r}, which is not among the tools: {names}")


def check_tools(tools: list[dict[str, Any]]) -> None:
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(tool, dict) and tool.get("type", "function") == "function" and isinstance(fn, dict)
                and isinstance(fn.get("name"), str) and fn["name"]):
            raise RequestError(f'tools.{i}: must be {{"type": "function", "function": {{"name": ..., '
                               '"parameters": {...}}}}')
        if not isinstance(fn.get("parameters", {}), dict):
            raise RequestError(f"tools.{i}.function.parameters must be a JSON schema object")


def _required_schema(tools: list[dict[str, Any]], parallel: bool | None) -> dict[str, Any]:
    """vLLM's schema for tool_choice "required": a non-empty list of {name, parameters};
    one item at most when the request sets parallel_tool_calls false."""
    options = [{"type": "object",
                "properties": {"name": {"type": "string", "enum": [fn["name"]]},
                               "parameters": fn.get("parameters") or {"type": "object"}},
                "required": ["name", "parameters"]}
               for fn in (t["function"] for t in tools)]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": options}}
    if parallel is False:
        schema["maxItems"] = 1
    return schema


def forced_tool_calls(plan: AnswerPlan, text: str) -> list[ParsedToolCall] | None:
    """The calls a grammar-forced answer holds (tool_choice required or named); None when
    the text is not complete (e.g. cut by max_tokens): it is then returned as content."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if plan.tool_mode == "named":
        return [ParsedToolCall(plan.tool_name or "", json.dumps(value, ensure_ascii=False))]
    if not isinstance(value, list):
        return None
    calls = [ParsedToolCall(c["name"], json.dumps(c.get("parameters", {}), ensure_ascii=False))
             for c in value if isinstance(c, dict) and isinstance(c.get("name"), str)]
    return calls or None


def template_takes_tools(template: str) -> bool:
    """Whether a chat template reads the `tools` variable at all."""
    import jinja2
    import jinja2.meta
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateSyntaxError:
        return "tools" in template
