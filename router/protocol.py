"""The OpenAI API as the router serves it: request bodies in, response bodies out.

Pure data, no server and no engine: the router parses a body with `parse_request`, turns
it into engine `SamplingParams` with `to_sampling_params`, and answers with the response
models below (built by `router/responses.py`, framed for streaming by `router/sse.py`).

Request bodies follow vLLM: unknown fields are ignored, and the engine's extra sampling
parameters are accepted by their vLLM names (clients send them through `extra_body`).
vLLM fields this server knows but does not honour (beam search, prompt logprobs, a
request's own chat template, ...) are refused with a 400 that names them when sent with
anything but their default: a client must not believe it got what it asked for.
Unlike vLLM, types are checked strictly, as OpenAI does: `"max_tokens": "16"` or
`"n": true` is a 400, not silently coerced. An explicit `null` on a field whose type has
no null (`"stream": null`, `"logprobs": null` in chat, as the official client sends for
arguments set to None) means "not sent": the field's default. Every error a client can
cause is raised as `RequestError` (a `ValueError`) whose message names the field: answer
it with HTTP 400 and `error_body(str(exc))`.

The model's generation_config.json may set sampling defaults (`sampling_defaults`): they
apply to the fields a request does not send, as vLLM's `--generation-config auto` does.
"""

from __future__ import annotations

import functools
import json
import time
import types
import uuid
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)

from engine.sampling_params import SamplingParams


# Most choices one request may ask for (`n`).
MAX_N = 16


class RequestError(ValueError):
    """A request the client must fix: HTTP 400, `error_body(str(exc))`."""


def random_id(prefix: str) -> str:
    """A response id as OpenAI writes them: "cmpl-…" for completions, "chatcmpl-…" for chat."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """A `created` timestamp: Unix seconds. Take it once per request so every chunk of a
    stream carries the same value."""
    return int(time.time())


# --- requests ------------------------------------------------------------------------

_Request = TypeVar("_Request", bound="_SamplingRequest")


def parse_request(cls: type[_Request], body: bytes | str | dict[str, Any]) -> _Request:
    """Validate a raw body (JSON bytes/str, or an already decoded dict). Raises
    `RequestError` listing each problem ("; "-separated), each naming its field ("messages.0.role: ...").
    Use this rather than a FastAPI body parameter, which would answer 422, not 400."""
    try:
        if isinstance(body, dict):
            return cls.model_validate(body)
        return cls.model_validate_json(body)
    except ValidationError as exc:
        raise RequestError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors(include_url=False):
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        if err["type"] not in ("missing", "value_error") and isinstance(value, (str, int, float, bool)):
            msg += f" (got {value!r:.60})"
        where = ".".join(str(part) for part in err["loc"])
        problems.append(f"{where}: {msg}" if where else msg)
    return "; ".join(problems)


def _admits_null(annotation: Any) -> bool:
    return annotation is Any or annotation is None or annotation is type(None) or (
        get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation))


@functools.cache
def _null_means_default(cls: type[BaseModel]) -> frozenset[str]:
    """Fields of `cls` with a default and a type without null: there a JSON null means "not sent"."""
    return frozenset(name for name, f in cls.model_fields.items()
                     if not f.is_required() and not _admits_null(f.annotation))


class _Body(BaseModel):
    """A part of a request body. `"field": null` on a field whose type has no null is read
    as the field left out (its default): the official client sends `"logprobs": null`,
    `"stream": null` for arguments set to None. Where null has a meaning of its own
    (CompletionRequest.max_tokens) the type admits it and it is kept."""

    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_sent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            defaulted = _null_means_default(cls)
            if any(data.get(name, 0) is None for name in defaulted):
                data = {k: v for k, v in data.items() if not (v is None and k in defaulted)}
        return data


class StreamOptions(_Body):
    include_usage: bool = False   # one last chunk with `choices: []` and `usage`
    continuous_usage_stats: bool = False   # vLLM's usage in every chunk: refused when true


# Bounds on request fields (numbers are bounded by SamplingParams).
MAX_ID_CHARS = 256          # model, user, workflow_id, agent_id, parent_request_id
MAX_STOP_STRINGS = 64       # OpenAI allows 4
MAX_STOP_CHARS = 1024
MAX_LIST_ITEMS = 1024       # stop_token_ids, bad_words

# Request fields that go to SamplingParams under the same name, when sent.
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                    "frequency_penalty", "repetition_penalty", "min_tokens", "stop", "stop_token_ids",
                    "include_stop_str_in_output", "ignore_eos", "skip_special_tokens",
                    "spaces_between_special_tokens", "bad_words")

# generation_config.json keys that are sampling defaults, as vLLM reads them
# (ModelConfig.get_diff_sampling_param): their SamplingParams names.
GENERATION_CONFIG_SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                                   "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                                   "max_new_tokens": "max_tokens"}


def sampling_defaults(generation_config: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling defaults a model's generation_config.json sets, by SamplingParams
    name (`max_new_tokens` becomes `max_tokens`); other keys (eos ids, do_sample, ...) are
    not sampling defaults. Raises ValueError when a value is not one SamplingParams takes:
    a bad file must stop the server at start, not fail every request with a 400."""
    defaults = {ours: generation_config[theirs] for theirs, ours in GENERATION_CONFIG_SAMPLING_KEYS.items()
                if generation_config.get(theirs) is not None}
    try:
        SamplingParams(**defaults)
    except (TypeError, ValueError) as e:
        raise ValueError(f"generation_config.json sets sampling defaults SamplingParams refuses ({e}): fix the "
                         "file, or set model.generation_config: vllm in cluster.yaml to ignore them") from None
    return defaults


class _SamplingRequest(_Body):
    """Fields both endpoints share: OpenAI's, vLLM's extra sampling params, and routing
    metadata. None means "not sent": the model's generation_config.json default, else the
    engine's `SamplingParams` default, applies."""

    # vLLM fields the server does not honour -> what to do instead. Sent with anything but
    # their default (None, False, or the field's own), they are a 400.
    not_honoured: ClassVar[dict[str, str]] = {
        "prompt_logprobs": "this server returns logprobs of generated tokens only (logprobs); remove it",
        "allowed_token_ids": "restrict the output with guided_choice, guided_regex or bad_words instead",
        "truncate_prompt_tokens": "the server never cuts a prompt; shorten it yourself",
        "use_beam_search": "there is no beam search; sample n choices and pick the best yourself",
        "length_penalty": "it applies to beam search only, which this server does not do; remove it",
        "return_tokens_as_token_ids": "logprobs name tokens by their text; remove it",
    }

    model: str | None = None      # None: the served model (the router checks a given name)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = Field(None, ge=1, le=MAX_N)   # choices: fanned out by the router, prompt prefilled once
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None       # accepted, unused
    # vLLM's extra sampling params (`extra_body={...}` in the openai client)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    # Workflow metadata: which agent run a request belongs to; routing may use it
    # (e.g. to keep one workflow's requests on one decode node for prefix reuse).
    workflow_id: str | None = None
    agent_id: str | None = None
    parent_request_id: str | None = None
    # Structured outputs (router/structured.py reads these): OpenAI's response_format,
    # vLLM's guided_* fields and its newer `structured_outputs` object.
    response_format: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    structured_outputs: dict[str, Any] | None = None
    # Known to vLLM, not honoured here: accepted only at their default (not_honoured).
    prompt_logprobs: int | None = None
    allowed_token_ids: list[int] | None = None
    truncate_prompt_tokens: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    return_tokens_as_token_ids: bool = False

    @model_validator(mode="after")
    def _check_shared(self) -> _SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.stream_options is not None and self.stream_options.continuous_usage_stats:
            raise ValueError("stream_options.continuous_usage_stats is not supported: usage comes once, in the "
                             "stream's last chunk (stream_options.include_usage)")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported: remove it (to ban words, send bad_words "
                             "in extra_body)")
        for name, advice in self.not_honoured.items():
            value = getattr(self, name)
            if value is not None and value is not False and value != type(self).model_fields[name].default:
                raise ValueError(f"{name} is not supported: {advice}")
        return self

    @model_validator(mode="after")
    def _check_bounds(self) -> _SamplingRequest:
        """Sizes the product serves; numbers are bounded where SamplingParams checks them."""
        for name in ("model", "user", "workflow_id", "agent_id", "parent_request_id"):
            value = getattr(self, name)
            if value is not None and len(value) > MAX_ID_CHARS:
                raise ValueError(f"{name} is {len(value)} characters long: at most {MAX_ID_CHARS}")
        for name, most in (("stop", MAX_STOP_STRINGS), ("stop_token_ids", MAX_LIST_ITEMS), ("bad_words", MAX_LIST_ITEMS)):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) > most:
                raise ValueError(f"{name} has {len(value)} entries: at most {most}")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop strings may be at most {MAX_STOP_CHARS} characters long")
        return self

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (non-streaming responses always carry usage)."""
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def _sampling_params(self, max_tokens: int, logprobs: int | None,
                         defaults: Mapping[str, Any] | None) -> SamplingParams:
        """The fields the request sent, over the model's defaults (`sampling_defaults`)."""
        fields = {name: value for name, value in (defaults or {}).items() if name in _SAMPLING_FIELDS}
        fields.update((name, getattr(self, name)) for name in _SAMPLING_FIELDS if getattr(self, name) is not None)
        try:
            params = SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **fields)
        except ValueError as exc:  # its messages name the field and the rule
            raise RequestError(str(exc)) from None
        if params.max_tokens is not None and params.min_tokens > params.max_tokens:
            raise RequestError(f"min_tokens={params.min_tokens} is more than max_tokens={params.max_tokens}: "
                               "lower min_tokens or raise max_tokens")
        return params


def _default_max_tokens(context_room: int, defaults: Mapping[str, Any] | None) -> int:
    """Where a request gives no max_tokens: the room left in the context, or the model's
    max_new_tokens (generation_config.json) when that is smaller."""
    model_default = (defaults or {}).get("max_tokens")
    return context_room if model_default is None else min(context_room, model_default)


class CompletionRequest(_SamplingRequest):
    """`POST /v1/completions`. One prompt per request: text, or a list of token ids. After
    validation `prompt` is either a `str` or a `list[int]` (a one-element list is unwrapped)."""

    prompt: str | list[int]
    max_tokens: int | None = 16   # OpenAI's and vLLM's default; null: `default_max_tokens`
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
            if len(value) != 1:
                raise ValueError(f"got {len(value)} prompts: this server takes one prompt per request; "
                                 "send one request per prompt (they run concurrently)")
            value = value[0]
        if isinstance(value, str) and value:
            return value
        if isinstance(value, list) and value and all(type(t) is int and t >= 0 for t in value):
            return value
        raise ValueError("must be a non-empty string or a non-empty list of token ids (integers >= 0)")

    @model_validator(mode="after")
    def _check_supported(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:
            raise ValueError("echo=true with logprobs is not supported (no prompt logprobs): drop one of them")
        if self.suffix:
            raise ValueError("suffix is not supported (no fill-in-the-middle): remove it")
        if self.best_of is not None and self.best_of < max(self.n or 1, 1):
            raise ValueError(f"best_of={self.best_of} must be at least n={self.n or 1}")
        if self.best_of is not None and self.best_of > 1:
            raise ValueError(f"best_of={self.best_of} is not supported: only 1; send several requests "
                             "with logprobs and pick the best yourself")
        return self

    def to_sampling_params(self, default_max_tokens: int, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        """`default_max_tokens` (typically context length minus prompt length, capped by the
        model's max_new_tokens in `defaults`) applies when the body sends `"max_tokens": null`;
        an absent field means 16, as in OpenAI. `defaults`: `sampling_defaults(...)` of the
        model, under the fields the request sent."""
        max_tokens = _default_max_tokens(default_max_tokens, defaults) if self.max_tokens is None else self.max_tokens
        return self._sampling_params(max_tokens, self.logprobs, defaults)


class TextPart(_Body):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(_Body):
    """One turn of the conversation. `tool_calls`/`tool_call_id`/`name` are kept as sent
    so the chat template can render them; the server itself never calls tools.
    `reasoning_content` / `reasoning`: an earlier assistant turn's thinking, for
    templates that render it back (interleaved thinking), as vLLM passes it."""

    role: Literal["system", "developer", "user", "assistant", "tool"]   # developer: newer clients' system
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"content part of type {kind!r} is not supported: this server "
                                     "serves text-only models; send {'type': 'text', 'text': ...} parts")
        return value

    @property
    def text(self) -> str:
        """The content as one string: text parts joined by newlines (as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    """`POST /v1/chat/completions`.

    `tools` go to the chat template; `tool_choice` auto is read back by the server's tool
    call parser, required and named choices are enforced with a grammar (router/structured.py).
    """

    not_honoured: ClassVar[dict[str, str]] = {
        **_SamplingRequest.not_honoured,
        "echo": "chat completions do not echo; use /v1/completions with echo, or repeat the last message yourself",
        "chat_template": "the server renders the model's own chat template (a request's template would be code "
                         "run on the server); set template variables with chat_template_kwargs",
        "functions": "it is OpenAI's deprecated form of tools: send tools",
        "function_call": "it is OpenAI's deprecated form of tool_choice: send tool_choice",
    }

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None             # deprecated by OpenAI for max_completion_tokens
    max_completion_tokens: int | None = None  # wins over max_tokens when both are sent
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None   # false: at most one tool call (the first), as vLLM
    chat_template_kwargs: dict[str, Any] | None = None   # e.g. {"enable_thinking": false}
    include_reasoning: bool = True            # false: reasoning is not split out (vLLM)
    # vLLM's: render without the assistant header; or continue the last message itself
    # (rendered without a generation prompt and cut right after its content).
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # Known to vLLM, not honoured here: accepted only at their default (not_honoured).
    echo: bool = False
    chat_template: str | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables_only(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        # The server renders with the model's own template: a client's template would be
        # code run on the router (a loop in it stalls every stream; vLLM's CVE-2025-61620).
        taken = sorted(set(v or ()) & {"chat_template", "messages", "tools", "add_generation_prompt",
                                       "continue_final_message", "tokenize"})
        if taken:
            raise ValueError(f"chat_template_kwargs may only set template variables, not {', '.join(taken)}: "
                             "the server renders the model's own chat template; send messages and tools as "
                             "the request's own fields")
        return v

    @model_validator(mode="after")
    def _check_supported(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError(f"top_logprobs={self.top_logprobs} needs logprobs=true")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message=true cannot go with add_generation_prompt=true (its default): "
                             "send add_generation_prompt=false to continue the last message")
        return self

    def conversation(self) -> list[dict[str, Any]]:
        """The messages as plain dicts for a chat template: content is always a string;
        tool calls' `arguments` are objects, as vLLM hands them to templates (which write
        `arguments | tojson`); an earlier turn's reasoning goes as both `reasoning` and
        `reasoning_content`, the names templates use."""
        out = []
        for m in self.messages:
            role = "system" if m.role == "developer" else m.role   # chat templates know only "system"
            turn: dict[str, Any] = {"role": role, "content": m.text}
            turn.update({k: v for k in ("name", "tool_call_id") if (v := getattr(m, k)) is not None})
            if m.tool_calls is not None:
                turn["tool_calls"] = [_decoded_arguments(call) for call in m.tool_calls]
            reasoning = m.reasoning if m.reasoning is not None else m.reasoning_content
            if reasoning is not None:
                turn["reasoning"] = turn["reasoning_content"] = reasoning
            out.append(turn)
        return out

    def to_sampling_params(self, default_max_tokens: int, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        """`default_max_tokens` (typically context length minus prompt length, capped by the
        model's max_new_tokens in `defaults`) applies when neither max_completion_tokens nor
        max_tokens is sent. `defaults`: `sampling_defaults(...)` of the model."""
        max_tokens = next((v for v in (self.max_completion_tokens, self.max_tokens) if v is not None), None)
        if max_tokens is None:
            max_tokens = _default_max_tokens(default_max_tokens, defaults)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs, defaults)


def _decoded_arguments(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call of the history with its `function.arguments` JSON text decoded (vLLM's
    rule): templates encode them with `tojson`, so text would be encoded twice. "" or
    null is {}; text that is not JSON stays text. The request's own dict is not changed."""
    function = call.get("function")
    if not isinstance(function, dict):
        return call
    arguments = function.get("arguments")
    if arguments is None or arguments == "":
        arguments = {}
    elif isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return {**call, "function": {**function, "arguments": arguments}}


# --- responses -----------------------------------------------------------------------
# Serialise with `router.sse.json_bytes` (None fields left out, as the official client
# expects absence), except a stream choice's `finish_reason`, which stays as `null`.

FinishReason = Literal["stop", "length", "tool_calls"]


class _KeepsFinishReason(BaseModel):
    """A stream choice: OpenAI sends `"finish_reason": null` until the last chunk, and raw
    SSE readers index it (`choice["finish_reason"]`), so it survives `exclude_none`."""

    finish_reason: FinishReason | None = None

    @model_serializer(mode="wrap")
    def _keep_finish_reason(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        out.pop("finish_reason", None)
        out["finish_reason"] = self.finish_reason   # last, as OpenAI orders it
        return out


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0    # prompt tokens served by the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    """Per generated token, in order. `top_logprobs[i]` holds the sampled token and the
    `logprobs` most likely ones (OpenAI's "up to logprobs + 1" entries)."""

    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason


class CompletionStreamChoice(_KeepsFinishReason):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]   # empty in the final usage chunk
    usage: UsageInfo | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None          # the token's UTF-8 bytes


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str                          # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None    # what a reasoning parser split off (vLLM's name)
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None   # only on a stream's first chunk
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(_KeepsFinishReason):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatCompletionStreamChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]         # empty in the final usage chunk
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "pdcluster"
    root: str | None = None                  # the checkpoint path or builtin:NAME
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = []


class ErrorInfo(BaseModel):
    message: str
    type: str
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_body(message: str, type: str = "invalid_request_error", code: int = 400) -> dict[str, Any]:
    """`{"error": {"message", "type", "code"}}`. Types in use: invalid_request_error (400),
    not_found_error (404), internal_server_error (500), service_unavailable (503)."""
    return {"error": {"message": message, "type": type, "code": code}}
