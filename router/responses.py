"""Builders from engine results to API objects, so the router never hand-crafts dicts.

Engine inputs: text, token counts, a finish reason ("stop" | "length" | "abort" |
"error"), and per generated token one logprobs entry (`engine.sampler.TokenLogprobs`:
`.token_id`, `.logprob`, `.top: {token_id: logprob}`), rendered to text with the
`token_text(token_id) -> str` callable the router passes (its tokenizer's decode of one
token). Only "stop" and "length" are API finish reasons: "abort" and "error" end a
request with an error (`error_body` / `sse_error`), and the builders refuse them.

A stream is: `chat_chunk(..., role="assistant")` first (chat only), then one chunk per
engine step with the new text, the last one with `finish_reason`, then, when
`request.include_usage`, a `*_usage_chunk`, then `SSE_DONE`.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Protocol

from router.protocol import (AssistantMessage, ChatChoice, ChatCompletionResponse, ChatCompletionStreamChunk,
                             ChatDelta, ChatLogprobs, ChatStreamChoice, ChatTokenLogprob, ChatTopLogprob,
                             CompletionChoice, CompletionLogprobs, CompletionResponse, CompletionStreamChoice,
                             CompletionStreamChunk, DeltaFunctionCall, DeltaToolCall, FinishReason, FunctionCall,
                             PromptTokensDetails, ToolCall, UsageInfo)

TokenText = Callable[[int], str]

# JSON has no -inf: OpenAI and vLLM send this instead for impossible tokens.
_LOGPROB_FLOOR = -9999.0


class TokenLogprobsLike(Protocol):
    token_id: int
    logprob: float
    top: dict[int, float]


def api_finish_reason(reason: str | None) -> FinishReason | None:
    """The engine's finish reason as the API's; None while a stream is still running."""
    if reason is None or reason in ("stop", "length", "tool_calls"):
        return reason  # type: ignore[return-value]
    raise ValueError(f"finish_reason {reason!r} has no API equivalent: end the request with "
                     "error_body(...) (or sse_error(...) then SSE_DONE when streaming) instead")


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> UsageInfo:
    """`cached_tokens`: prompt tokens the prefix cache served (`RequestOutput.num_cached_tokens`);
    None leaves `prompt_tokens_details` out."""
    details = None if cached_tokens is None else PromptTokensDetails(cached_tokens=cached_tokens)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens, prompt_tokens_details=details)


def _clamp(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _LOGPROB_FLOOR


def _ranked(entry: TokenLogprobsLike) -> list[tuple[int, float]]:
    return sorted(entry.top.items(), key=lambda kv: -kv[1])


# --- /v1/completions -----------------------------------------------------------------

def completion_logprobs(entries: Iterable[TokenLogprobsLike], token_text: TokenText,
                        text_offset: int = 0) -> CompletionLogprobs:
    """`text_offset`: characters of token text already sent in this response (a stream's
    running total, `sum(len(t) for t in tokens sent so far)`); 0 for the whole response."""
    out = CompletionLogprobs()
    for entry in entries:
        token = token_text(entry.token_id)
        top = {token: _clamp(entry.logprob)}  # the sampled token first, then the top ones
        for token_id, logprob in _ranked(entry):
            top.setdefault(token_text(token_id), _clamp(logprob))
        out.tokens.append(token)
        out.token_logprobs.append(_clamp(entry.logprob))
        out.top_logprobs.append(top)
        out.text_offset.append(text_offset)
        text_offset += len(token)
    return out


def completion_response(request_id: str, model: str, text: str, finish_reason: str,
                        prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None,
                        logprobs: Iterable[TokenLogprobsLike] | None = None,
                        token_text: TokenText | None = None, created: int | None = None) -> CompletionResponse:
    """The non-streaming answer. Pass `logprobs` (and `token_text`) when the request asked."""
    lp = None if logprobs is None else completion_logprobs(logprobs, _need(token_text))
    choice = CompletionChoice(text=text, logprobs=lp, finish_reason=api_finish_reason(finish_reason))
    extra = {} if created is None else {"created": created}
    return CompletionResponse(id=request_id, model=model, choices=[choice],
                              usage=usage(prompt_tokens, completion_tokens, cached_tokens), **extra)


def completion_chunk(request_id: str, model: str, created: int, text: str, finish_reason: str | None = None,
                     logprobs: Iterable[TokenLogprobsLike] | None = None, token_text: TokenText | None = None,
                     text_offset: int = 0, index: int = 0) -> CompletionStreamChunk:
    """One streamed step: the new text, its tokens' logprobs when asked for."""
    lp = None if logprobs is None else completion_logprobs(logprobs, _need(token_text), text_offset)
    choice = CompletionStreamChoice(index=index, text=text, logprobs=lp, finish_reason=api_finish_reason(finish_reason))
    return CompletionStreamChunk(id=request_id, model=model, created=created, choices=[choice])


def completion_usage_chunk(request_id: str, model: str, created: int, usage: UsageInfo) -> CompletionStreamChunk:
    return CompletionStreamChunk(id=request_id, model=model, created=created, choices=[], usage=usage)


# --- /v1/chat/completions ------------------------------------------------------------

def chat_logprobs(entries: Iterable[TokenLogprobsLike], token_text: TokenText) -> ChatLogprobs:
    """Per token: text, logprob, UTF-8 bytes, and the request's `top_logprobs` most likely."""
    def rendered(token_id: int, logprob: float) -> ChatTopLogprob:
        token = token_text(token_id)
        return ChatTopLogprob(token=token, logprob=_clamp(logprob), bytes=list(token.encode()))

    content = []
    for entry in entries:
        token = token_text(entry.token_id)
        top = [rendered(token_id, logprob) for token_id, logprob in _ranked(entry)]
        content.append(ChatTokenLogprob(token=token, logprob=_clamp(entry.logprob), bytes=list(token.encode()),
                                        top_logprobs=top))
    return ChatLogprobs(content=content)


def chat_response(request_id: str, model: str, text: str, finish_reason: str,
                  prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None,
                  logprobs: Iterable[TokenLogprobsLike] | None = None,
                  token_text: TokenText | None = None, created: int | None = None) -> ChatCompletionResponse:
    """The non-streaming answer. Pass `logprobs` (and `token_text`) when the request asked."""
    lp = None if logprobs is None else chat_logprobs(logprobs, _need(token_text))
    choice = ChatChoice(message=AssistantMessage(content=text), logprobs=lp,
                        finish_reason=api_finish_reason(finish_reason))
    extra = {} if created is None else {"created": created}
    return ChatCompletionResponse(id=request_id, model=model, choices=[choice],
                                  usage=usage(prompt_tokens, completion_tokens, cached_tokens), **extra)


def chat_chunk(request_id: str, model: str, created: int, text: str, finish_reason: str | None = None,
               logprobs: Iterable[TokenLogprobsLike] | None = None, token_text: TokenText | None = None,
               role: str | None = None) -> ChatCompletionStreamChunk:
    """One streamed step. The first chunk of a stream is `chat_chunk(..., "", role="assistant")`."""
    lp = None if logprobs is None else chat_logprobs(logprobs, _need(token_text))
    choice = ChatStreamChoice(delta=ChatDelta(role=role, content=text), logprobs=lp,
                              finish_reason=api_finish_reason(finish_reason))
    return ChatCompletionStreamChunk(id=request_id, model=model, created=created, choices=[choice])


def completion_choice(index: int, text: str, finish_reason: str, logprobs: Iterable[TokenLogprobsLike] | None = None,
                      token_text: TokenText | None = None) -> CompletionChoice:
    lp = None if logprobs is None else completion_logprobs(logprobs, _need(token_text))
    return CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=api_finish_reason(finish_reason))


def completion_response_of(request_id: str, model: str, choices: list[CompletionChoice], usage: UsageInfo,
                           created: int | None = None) -> CompletionResponse:
    """The non-streaming answer with several choices (`n`)."""
    extra = {} if created is None else {"created": created}
    return CompletionResponse(id=request_id, model=model, choices=choices, usage=usage, **extra)


def chat_choice(index: int, content: str | None, finish_reason: str, reasoning_content: str | None = None,
                tool_calls: list[ToolCall] | None = None, logprobs: Iterable[TokenLogprobsLike] | None = None,
                token_text: TokenText | None = None) -> ChatChoice:
    """One choice of a chat answer: content, the reasoning split off it, parsed tool calls."""
    lp = None if logprobs is None else chat_logprobs(logprobs, _need(token_text))
    message = AssistantMessage(content=content, reasoning_content=reasoning_content, tool_calls=tool_calls or None)
    return ChatChoice(index=index, message=message, logprobs=lp, finish_reason=api_finish_reason(finish_reason))


def chat_response_of(request_id: str, model: str, choices: list[ChatChoice], usage: UsageInfo,
                     created: int | None = None) -> ChatCompletionResponse:
    extra = {} if created is None else {"created": created}
    return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage, **extra)


def chat_delta_chunk(request_id: str, model: str, created: int, index: int, *, content: str | None = None,
                     reasoning_content: str | None = None, tool_calls: list[DeltaToolCall] | None = None,
                     finish_reason: str | None = None, logprobs: Iterable[TokenLogprobsLike] | None = None,
                     token_text: TokenText | None = None, role: str | None = None) -> ChatCompletionStreamChunk:
    """One streamed step of choice `index`, with whichever of content, reasoning and tool
    call deltas it carries."""
    lp = None if logprobs is None else chat_logprobs(logprobs, _need(token_text))
    delta = ChatDelta(role=role, content=content, reasoning_content=reasoning_content, tool_calls=tool_calls)
    choice = ChatStreamChoice(index=index, delta=delta, logprobs=lp, finish_reason=api_finish_reason(finish_reason))
    return ChatCompletionStreamChunk(id=request_id, model=model, created=created, choices=[choice])


def tool_call_delta(index: int, call_id: str, name: str, arguments: str) -> DeltaToolCall:
    """A whole call in one delta (OpenAI clients concatenate `arguments` across deltas)."""
    return DeltaToolCall(index=index, id=call_id, type="function",
                         function=DeltaFunctionCall(name=name, arguments=arguments))


def tool_call(call_id: str, name: str, arguments: str) -> ToolCall:
    return ToolCall(id=call_id, function=FunctionCall(name=name, arguments=arguments))


def chat_usage_chunk(request_id: str, model: str, created: int, usage: UsageInfo) -> ChatCompletionStreamChunk:
    return ChatCompletionStreamChunk(id=request_id, model=model, created=created, choices=[], usage=usage)


def _need(token_text: TokenText | None) -> TokenText:
    if token_text is None:
        raise TypeError("logprobs given without token_text: pass the tokenizer's one-token decode")
    return token_text
