"""The router's protocol layer: what bodies it accepts, what it answers, how it streams.

Compatibility is checked against the official `openai` client itself: request bodies are
the ones the client sends, and responses are parsed by its types (or, for streams, by the
client reading our SSE bytes through an in-memory HTTP transport).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import httpx
import openai
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from engine.builtin_models import AGENT_CHAT_TEMPLATE
from engine.sampling_params import SamplingParams
from engine.tokenizer import render_chat_template
from router.protocol import (ChatCompletionRequest, CompletionRequest, ErrorResponse, ModelCard, ModelList,
                             RequestError, error_body, parse_request, random_id, sampling_defaults)
from router.responses import (api_finish_reason, chat_chunk, chat_response, chat_usage_chunk, completion_chunk,
                              completion_response, completion_usage_chunk, usage)
from router.sse import SSE_DONE, json_bytes, sse_data, sse_error

VOCAB = {1: "Hello", 2: ",", 3: " world", 4: "!", 5: "é"}


def token_text(token_id: int) -> str:
    return VOCAB[token_id]


@dataclass
class FakeLogprobs:  # the shape of engine.sampler.TokenLogprobs
    token_id: int
    logprob: float
    rank: int = 1
    top: dict[int, float] = field(default_factory=dict)


def client_for(handler) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://router/v1", api_key="none", max_retries=0,
                         http_client=httpx.Client(transport=httpx.MockTransport(handler)))


def body_sent_by_client(call) -> bytes:
    """The exact JSON body the official client sends for `call(client)`."""
    sent = {}

    def handler(request: httpx.Request) -> httpx.Response:
        sent["body"] = request.content
        return httpx.Response(400, json=error_body("captured"))

    with pytest.raises(openai.BadRequestError):
        call(client_for(handler))
    return sent["body"]


def stream_through_client(events: list[bytes], call):
    """Serve `events` as an SSE response and let the official client read them."""
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"".join(events), headers={"content-type": "text/event-stream"})

    return list(call(client_for(handler)))


def rejected(cls, body: dict, default_max_tokens: int = 100) -> str:
    with pytest.raises(RequestError) as info:
        parse_request(cls, body).to_sampling_params(default_max_tokens)
    return str(info.value)


# --- requests ------------------------------------------------------------------------

def test_completion_body_from_openai_client_with_extra_body_maps_to_sampling_params():
    body = body_sent_by_client(lambda c: c.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=7, temperature=0.5, top_p=0.9, seed=3,
        stop=["\n"], presence_penalty=0.1, frequency_penalty=0.2, logprobs=2, user="u1",
        extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True,
                    "min_tokens": 2, "stop_token_ids": [7], "bad_words": ["darn"],
                    "include_stop_str_in_output": True, "skip_special_tokens": False,
                    "spaces_between_special_tokens": False, "workflow_id": "wf", "agent_id": "a",
                    "parent_request_id": "p"}))
    request = parse_request(CompletionRequest, body)
    assert (request.prompt, request.workflow_id, request.agent_id, request.parent_request_id) == \
        ("Once upon a time", "wf", "a", "p")
    assert request.to_sampling_params(default_max_tokens=100) == SamplingParams(
        max_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop=["\n"], presence_penalty=0.1,
        frequency_penalty=0.2, logprobs=2, top_k=40, min_p=0.05, repetition_penalty=1.1, ignore_eos=True,
        min_tokens=2, stop_token_ids=[7], bad_words=["darn"], include_stop_str_in_output=True,
        skip_special_tokens=False, spaces_between_special_tokens=False)


def test_completion_unset_fields_keep_engine_defaults_and_max_tokens_defaults_to_16():
    params = parse_request(CompletionRequest, {"prompt": "hi"}).to_sampling_params(100)
    assert params == SamplingParams(max_tokens=16)
    explicit_null = parse_request(CompletionRequest, {"prompt": "hi", "max_tokens": None})
    assert explicit_null.to_sampling_params(default_max_tokens=100).max_tokens == 100


@pytest.mark.parametrize("prompt, expected", [
    ("text", "text"), (["text"], "text"), ([1, 2, 3], [1, 2, 3]), ([[1, 2, 3]], [1, 2, 3])])
def test_completion_prompt_is_one_text_or_one_token_list(prompt, expected):
    assert parse_request(CompletionRequest, {"prompt": prompt}).prompt == expected


@pytest.mark.parametrize("prompt", [["a", "b"], [[1], [2]]])
def test_completion_with_several_prompts_is_rejected(prompt):
    assert rejected(CompletionRequest, {"prompt": prompt}).startswith("prompt: got 2 prompts: this server takes one")


@pytest.mark.parametrize("prompt", ["", [], [1, -2], [1, True], [[1], "a"], {"text": "x"}, None])
def test_completion_bad_prompt_names_the_field(prompt):
    assert rejected(CompletionRequest, {"prompt": prompt}).startswith("prompt: ")


@pytest.mark.parametrize("body, message", [
    ({"echo": True, "logprobs": 1}, "echo=true with logprobs is not supported"),
    ({"suffix": "end"}, "suffix is not supported"),
    ({"best_of": 2}, "best_of=2 is not supported"),
    ({"best_of": 0}, "best_of=0 must be at least n=1"),
    ({"best_of": -3}, "best_of=-3 must be at least n=1"),
    ({"best_of": 1, "n": 2}, "best_of=1 must be at least n=2"),
    ({"logit_bias": {"50256": -100}}, "logit_bias is not supported"),
    ({"n": 17}, "n: Input should be less than or equal to 16"),
    ({"logprobs": 6}, "logprobs: Input should be less than or equal to 5"),
    ({"stream_options": {"include_usage": True}}, "stream_options is only allowed when stream is true"),
])
def test_completion_unsupported_features_are_explained(body, message):
    assert message in rejected(CompletionRequest, {"prompt": "hi", **body})


@pytest.mark.parametrize("body, field", [
    ({"temperature": "hot"}, "temperature: "), ({"max_tokens": "16"}, "max_tokens: "),
    ({"n": True}, "n: "), ({"top_k": 1.5}, "top_k: "), ({"stop": [1]}, "stop."),
    ({"stop_token_ids": ["a"]}, "stop_token_ids.0: "), ({"ignore_eos": "yes"}, "ignore_eos: "),
    ({"workflow_id": 5}, "workflow_id: "), ({"stream_options": {"include_usage": 1}, "stream": True},
                                            "stream_options.include_usage: "),
])
def test_type_errors_name_the_field(body, field):
    assert field in rejected(CompletionRequest, {"prompt": "hi", **body})


@pytest.mark.parametrize("body, message", [
    ({"temperature": -1}, "temperature=-1.0: must be between 0"),
    ({"top_p": 0}, "top_p=0"),
    ({"max_tokens": 4, "min_tokens": 5}, "min_tokens=5 is more than max_tokens=4"),
    ({"stop": ""}, "stop contains an empty string"),
])
def test_sampling_params_errors_become_request_errors(body, message):
    assert message in rejected(CompletionRequest, {"prompt": "hi", **body})


@pytest.mark.parametrize("body, message", [
    ({"seed": 2**70, "top_k": 2**70}, "top_k=1180591620717411303424: must be -1 or 0"),
    ({"stop_token_ids": [2**64]}, "must be a list of token ids (integers from 0 to 2147483647)"),
    ({"max_tokens": 2**63}, "max_tokens=9223372036854775808: must be between 1 and 2147483647"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty=1e-300: must be between"),
    ({"workflow_id": "w" * 300}, "workflow_id is 300 characters long: at most 256"),
    ({"stop": ["x"] * 65}, "stop has 65 entries: at most 64"),
    ({"stop": "y" * 2000}, "stop strings may be at most 1024 characters long"),
])
def test_out_of_range_fields_are_refused_before_anything_reaches_a_node(body, message):
    assert message in rejected(CompletionRequest, {"prompt": "hi", **body})


def test_huge_seeds_and_tiny_top_p_are_accepted_as_the_same_sampling():
    params = parse_request(CompletionRequest, {"prompt": "hi", "seed": 2**70 + 3, "top_p": 1e-300}).to_sampling_params(8)
    assert params.seed == 3 and 0 < params.top_p <= 1e-6


def test_unknown_fields_are_ignored_and_bad_json_is_a_request_error():
    assert parse_request(CompletionRequest, b'{"prompt": "hi", "guided_json": {}, "priority": 1}').prompt == "hi"
    with pytest.raises(RequestError, match="Invalid JSON"):
        parse_request(CompletionRequest, b"{not json")
    with pytest.raises(RequestError, match="prompt: Field required"):
        parse_request(CompletionRequest, b"{}")


def test_include_usage_only_when_streaming_with_the_option():
    assert not parse_request(CompletionRequest, {"prompt": "x", "stream": True}).include_usage
    assert parse_request(CompletionRequest, {"prompt": "x", "stream": True,
                                             "stream_options": {"include_usage": True}}).include_usage


def test_chat_body_from_openai_client_parses_with_text_parts_and_tools():
    body = body_sent_by_client(lambda c: c.chat.completions.create(
        model="tiny", max_completion_tokens=9, max_tokens=5, logprobs=True, top_logprobs=3, seed=1,
        stream=True, stream_options={"include_usage": True}, response_format={"type": "text"},
        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}], tool_choice="auto",
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
                  {"role": "assistant", "content": None,
                   "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "42"}],
        extra_body={"top_k": 5, "ignore_eos": True, "workflow_id": "wf"}))
    request = parse_request(ChatCompletionRequest, body)
    assert request.include_usage and request.workflow_id == "wf"
    conversation = request.conversation()
    assert conversation[:2] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"}]
    assert conversation[2]["content"] == "" and conversation[2]["tool_calls"][0]["id"] == "c1"
    assert conversation[3] == {"role": "tool", "content": "42", "tool_call_id": "c1"}
    developer = parse_request(ChatCompletionRequest, {"messages": [{"role": "developer", "content": "Be brief."}]})
    assert developer.conversation() == [{"role": "system", "content": "Be brief."}]
    params = request.to_sampling_params(default_max_tokens=100)
    assert (params.max_tokens, params.logprobs, params.seed, params.top_k, params.ignore_eos) == (9, 3, 1, 5, True)


@pytest.mark.parametrize("body, max_tokens, logprobs", [
    ({}, 100, None), ({"max_tokens": 5}, 5, None), ({"max_completion_tokens": 6, "max_tokens": 5}, 6, None),
    ({"logprobs": True}, 100, 0), ({"logprobs": True, "top_logprobs": 20}, 100, 20), ({"logprobs": False}, 100, None),
])
def test_chat_max_tokens_and_logprobs_mapping(body, max_tokens, logprobs):
    request = parse_request(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], **body})
    params = request.to_sampling_params(default_max_tokens=100)
    assert (params.max_tokens, params.logprobs) == (max_tokens, logprobs)


@pytest.mark.parametrize("body, message", [
    ({"top_logprobs": 2}, "top_logprobs=2 needs logprobs=true"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs: Input should be less than or equal to 20"),
    ({"messages": []}, "messages: List should have at least 1 item"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role: Input should be 'system'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content: content part of type 'image_url' is not supported"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
    ({"n": 0}, "n: Input should be greater than or equal to 1"),
    ({"logit_bias": {"1": 5}}, "logit_bias is not supported"),
    ({"chat_template_kwargs": {"chat_template": "{% for i in range(10**9) %}{% endfor %}"}},
     "chat_template_kwargs may only set template variables, not chat_template"),
    ({"chat_template_kwargs": {"enable_thinking": False, "tools": [], "messages": []}},
     "not messages, tools: the server renders the model's own chat template"),
])
def test_chat_unsupported_or_invalid_requests_are_explained(body, message):
    assert message in rejected(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], **body})


def test_explicit_nulls_from_the_openai_client_mean_not_sent():
    chat = body_sent_by_client(lambda c: c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], logprobs=None, stream=None, n=None,
        top_logprobs=None, stream_options=None, extra_body={"include_reasoning": None}))
    request = parse_request(ChatCompletionRequest, chat)
    assert (request.stream, request.logprobs, request.include_reasoning) == (False, False, True)
    assert request.to_sampling_params(100) == SamplingParams(max_tokens=100)
    completion = body_sent_by_client(lambda c: c.completions.create(
        model="tiny", prompt="hi", echo=None, logprobs=None, stream=None))
    request = parse_request(CompletionRequest, completion)
    assert (request.stream, request.echo, request.logprobs) == (False, False, None)
    streamed = parse_request(CompletionRequest, {"prompt": "hi", "stream": True,
                                                 "stream_options": {"include_usage": None}})
    assert not streamed.include_usage
    message = parse_request(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi", "name": None}]})
    assert message.conversation() == [{"role": "user", "content": "hi"}]


def test_null_keeps_its_own_meaning_where_the_field_has_one():
    # completions: absent max_tokens is OpenAI's 16, null is "up to the context"
    assert parse_request(CompletionRequest, {"prompt": "hi"}).to_sampling_params(100).max_tokens == 16
    null = parse_request(CompletionRequest, {"prompt": "hi", "max_tokens": None})
    assert null.to_sampling_params(100).max_tokens == 100
    assert "prompt: " in rejected(CompletionRequest, {"prompt": None})
    assert "messages: " in rejected(ChatCompletionRequest, {"messages": None})


def test_model_sampling_defaults_apply_under_the_fields_a_request_sends():
    defaults = sampling_defaults({"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0,
                                  "repetition_penalty": 1.05, "max_new_tokens": 64,
                                  "do_sample": True, "eos_token_id": [1, 2], "bos_token_id": 0})
    assert defaults == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0, "repetition_penalty": 1.05,
                        "max_tokens": 64}
    chat = parse_request(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.1})
    assert chat.to_sampling_params(100, defaults) == SamplingParams(
        max_tokens=64, temperature=0.1, top_p=0.95, top_k=20, min_p=0.0, repetition_penalty=1.05)
    assert chat.to_sampling_params(30, defaults).max_tokens == 30              # the context's room is the limit
    sent = parse_request(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200,
                                                 "top_k": 0, "repetition_penalty": 1.0})
    params = sent.to_sampling_params(300, defaults)
    assert (params.max_tokens, params.top_k, params.repetition_penalty, params.temperature) == (200, 0, 1.0, 0.6)
    completion = parse_request(CompletionRequest, {"prompt": "hi"}).to_sampling_params(100, defaults)
    assert (completion.max_tokens, completion.temperature, completion.top_k) == (16, 0.6, 20)   # absent: 16
    null = parse_request(CompletionRequest, {"prompt": "hi", "max_tokens": None}).to_sampling_params(100, defaults)
    assert null.max_tokens == 64


def test_generation_config_without_sampling_keys_changes_nothing_and_bad_values_are_refused_at_start():
    assert sampling_defaults({"bos_token_id": 0, "eos_token_id": [1, 2], "pad_token_id": 3}) == {}
    assert sampling_defaults({"temperature": None}) == {}
    with pytest.raises(ValueError, match="model.generation_config: vllm"):
        sampling_defaults({"top_p": 0.0})


def test_tool_call_arguments_in_the_history_reach_the_template_as_objects():
    calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
             {"id": "c2", "type": "function", "function": {"name": "now", "arguments": ""}},
             {"id": "c3", "type": "function", "function": {"name": "raw", "arguments": "not json"}},
             {"id": "c4", "type": "function", "function": {"name": "given", "arguments": {"a": 1}}}]
    body = {"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None,
                                                                   "tool_calls": calls}]}
    request = parse_request(ChatCompletionRequest, body)
    rendered = [c["function"]["arguments"] for c in request.conversation()[1]["tool_calls"]]
    assert rendered == [{"city": "Paris"}, {}, "not json", {"a": 1}]
    assert request.messages[1].tool_calls[0]["function"]["arguments"] == '{"city": "Paris"}'   # the request as sent
    text = render_chat_template(AGENT_CHAT_TEMPLATE, request.conversation(), add_generation_prompt=True,
                                tools=None, bos_token="")
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text


def test_earlier_reasoning_reaches_the_template_under_both_names():
    turns = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "add"},
             {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6", "reasoning": "add again"}]
    conversation = parse_request(ChatCompletionRequest, {"messages": turns}).conversation()
    assert [(t.get("reasoning"), t.get("reasoning_content")) for t in conversation] == [
        (None, None), ("add", "add"), (None, None), ("add again", "add again")]


def test_generation_prompt_and_continuing_the_last_message():
    hi = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
    request = parse_request(ChatCompletionRequest, {"messages": hi})
    assert (request.add_generation_prompt, request.continue_final_message) == (True, False)
    request = parse_request(ChatCompletionRequest, {"messages": hi, "add_generation_prompt": False,
                                                    "continue_final_message": True})
    assert (request.add_generation_prompt, request.continue_final_message) == (False, True)
    assert "continue_final_message=true cannot go with add_generation_prompt=true" in rejected(
        ChatCompletionRequest, {"messages": hi, "continue_final_message": True})
    assert "not add_generation_prompt, continue_final_message" in rejected(
        ChatCompletionRequest, {"messages": hi, "chat_template_kwargs": {"continue_final_message": True,
                                                                          "add_generation_prompt": False}})


NOT_HONOURED_ON_BOTH = [("prompt_logprobs", 1), ("prompt_logprobs", 0), ("allowed_token_ids", [1, 2]),
                        ("truncate_prompt_tokens", 10), ("use_beam_search", True), ("length_penalty", 0.5),
                        ("return_tokens_as_token_ids", True)]
NOT_HONOURED_IN_CHAT = [("echo", True), ("chat_template", "{{ messages }}"),
                        ("functions", [{"name": "f", "parameters": {}}]), ("function_call", "auto")]


@pytest.mark.parametrize("cls, field, value", [
    *[(CompletionRequest, f, v) for f, v in NOT_HONOURED_ON_BOTH],
    *[(ChatCompletionRequest, f, v) for f, v in NOT_HONOURED_ON_BOTH + NOT_HONOURED_IN_CHAT]])
def test_fields_the_server_does_not_honour_are_refused_naming_the_field(cls, field, value):
    body = {"prompt": "hi"} if cls is CompletionRequest else {"messages": [{"role": "user", "content": "hi"}]}
    assert f"{field} is not supported: " in rejected(cls, {**body, field: value})


def test_fields_the_server_does_not_honour_are_accepted_at_their_default():
    defaults = {"prompt_logprobs": None, "allowed_token_ids": None, "truncate_prompt_tokens": None,
                "use_beam_search": False, "length_penalty": 1, "return_tokens_as_token_ids": False,
                "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": False}}
    assert parse_request(CompletionRequest, {"prompt": "hi", **defaults}).include_usage
    chat = parse_request(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}], **defaults,
                                                 "echo": False, "chat_template": None, "functions": None,
                                                 "function_call": None, "vendor_extra": {"x": 1}})
    assert chat.include_usage
    assert "stream_options.continuous_usage_stats is not supported" in rejected(
        CompletionRequest, {"prompt": "hi", "stream": True, "stream_options": {"continuous_usage_stats": True}})


# --- responses -----------------------------------------------------------------------

def as_json(model) -> dict:
    return json.loads(json_bytes(model))


def test_completion_response_parses_with_openai_types_including_logprobs():
    logprobs = [FakeLogprobs(1, -0.1, top={1: -0.1, 3: -2.5}), FakeLogprobs(3, float("-inf"), rank=9, top={2: -0.3})]
    response = completion_response("cmpl-1", "tiny", "Hello world", "length", prompt_tokens=4, completion_tokens=2,
                                   cached_tokens=3, logprobs=logprobs, token_text=token_text, created=123)
    parsed = Completion.model_validate(as_json(response))
    assert parsed.id == "cmpl-1" and parsed.created == 123 and parsed.object == "text_completion"
    choice = parsed.choices[0]
    assert (choice.text, choice.finish_reason, choice.index) == ("Hello world", "length", 0)
    assert choice.logprobs.tokens == ["Hello", " world"]
    assert choice.logprobs.token_logprobs == [-0.1, -9999.0]   # -inf is not JSON
    assert choice.logprobs.text_offset == [0, 5]
    assert choice.logprobs.top_logprobs == [{"Hello": -0.1, " world": -2.5}, {" world": -9999.0, ",": -0.3}]
    assert (parsed.usage.prompt_tokens, parsed.usage.completion_tokens, parsed.usage.total_tokens) == (4, 2, 6)
    assert parsed.usage.prompt_tokens_details.cached_tokens == 3


def test_response_without_logprobs_or_cache_info_leaves_them_out():
    body = as_json(completion_response("cmpl-1", "tiny", "hi", "stop", 1, 1))
    assert "logprobs" not in body["choices"][0] and "prompt_tokens_details" not in body["usage"]
    assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}


def test_chat_response_parses_with_openai_types_including_logprobs():
    logprobs = [FakeLogprobs(5, -0.5, top={5: -0.5, 4: -1.0})]
    response = chat_response("chatcmpl-1", "tiny", "é", "stop", prompt_tokens=3, completion_tokens=1,
                             logprobs=logprobs, token_text=token_text)
    parsed = ChatCompletion.model_validate(as_json(response))
    choice = parsed.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", "é", "stop")
    token = choice.logprobs.content[0]
    assert (token.token, token.logprob, token.bytes) == ("é", -0.5, [0xC3, 0xA9])
    assert [(t.token, t.logprob, t.bytes) for t in token.top_logprobs] == \
        [("é", -0.5, [0xC3, 0xA9]), ("!", -1.0, [33])]
    assert parsed.usage.total_tokens == 4


def test_chat_stream_chunks_parse_with_openai_types():
    first = as_json(chat_chunk("chatcmpl-1", "tiny", 7, "", role="assistant"))
    assert first["choices"][0] == {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    middle = as_json(chat_chunk("chatcmpl-1", "tiny", 7, "Hello"))
    assert middle["choices"][0]["delta"] == {"content": "Hello"} and middle["choices"][0]["finish_reason"] is None
    assert "usage" not in middle
    last = chat_chunk("chatcmpl-1", "tiny", 7, "!", "stop", logprobs=[FakeLogprobs(4, -0.2)], token_text=token_text)
    for chunk in (first, middle, as_json(last), as_json(chat_usage_chunk("chatcmpl-1", "tiny", 7, usage(3, 2)))):
        ChatCompletionChunk.model_validate(chunk)
    assert ChatCompletionChunk.model_validate(as_json(last)).choices[0].logprobs.content[0].top_logprobs == []


def test_completion_stream_chunks_carry_running_text_offsets():
    chunk = completion_chunk("cmpl-1", "tiny", 7, ", world", "stop", token_text=token_text, text_offset=5,
                             logprobs=[FakeLogprobs(2, -0.1), FakeLogprobs(3, -0.2)])
    parsed = Completion.model_validate(as_json(chunk))   # a chunk with its finish_reason is a valid Completion
    assert parsed.choices[0].logprobs.text_offset == [5, 6]
    assert parsed.choices[0].logprobs.top_logprobs == [{",": -0.1}, {" world": -0.2}]


def test_completion_stream_read_by_openai_client():
    events = [sse_data(completion_chunk("cmpl-1", "tiny", 7, "Hello")),
              sse_data(completion_chunk("cmpl-1", "tiny", 7, " world", "length")),
              sse_data(completion_usage_chunk("cmpl-1", "tiny", 7, usage(2, 2, cached_tokens=0))), SSE_DONE]
    chunks = stream_through_client(events, lambda c: c.completions.create(
        model="tiny", prompt="x", stream=True, stream_options={"include_usage": True}))
    assert [c.choices[0].text for c in chunks[:2]] == ["Hello", " world"]
    assert [c.choices[0].finish_reason for c in chunks[:2]] == [None, "length"]
    assert chunks[2].choices == [] and chunks[2].usage.total_tokens == 4


def test_chat_stream_read_by_openai_client():
    events = [sse_data(chat_chunk("chatcmpl-1", "tiny", 7, "", role="assistant")),
              sse_data(chat_chunk("chatcmpl-1", "tiny", 7, "Hello")),
              sse_data(chat_chunk("chatcmpl-1", "tiny", 7, "!", "stop")),
              sse_data(chat_usage_chunk("chatcmpl-1", "tiny", 7, usage(3, 2))), SSE_DONE]
    chunks = stream_through_client(events, lambda c: c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in chunks[:3]) == "Hello!"
    assert chunks[2].choices[0].finish_reason == "stop" and chunks[3].usage.completion_tokens == 2


def test_stream_error_event_raises_api_error_in_openai_client():
    events = [sse_data(chat_chunk("chatcmpl-1", "tiny", 7, "", role="assistant")),
              sse_error("prefill node p0 failed: load_failure_policy is fail", "internal_server_error", 500), SSE_DONE]
    with pytest.raises(openai.APIError, match="prefill node p0 failed"):
        stream_through_client(events, lambda c: c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True))


@pytest.mark.parametrize("reason", ["abort", "error"])
def test_engine_only_finish_reasons_are_refused_by_builders(reason):
    assert api_finish_reason("stop") == "stop" and api_finish_reason(None) is None
    with pytest.raises(ValueError, match="sse_error"):
        completion_chunk("cmpl-1", "tiny", 7, "", reason)


def test_model_list_parses_with_openai_types():
    models = ModelList(data=[ModelCard(id="tiny", root="builtin:tiny", max_model_len=2048)])
    body = as_json(models)
    assert body["object"] == "list"
    card = Model.model_validate(body["data"][0])
    assert (card.id, card.object, card.owned_by) == ("tiny", "model", "pdcluster")


def test_ids_and_error_bodies():
    assert random_id("chatcmpl").startswith("chatcmpl-") and random_id("cmpl") != random_id("cmpl")
    body = error_body("temperature: Input should be a valid number")
    assert body == {"error": {"message": "temperature: Input should be a valid number",
                              "type": "invalid_request_error", "code": 400}}
    ErrorResponse.model_validate(body)


# --- SSE framing ---------------------------------------------------------------------

def test_sse_framing_is_exact():
    assert sse_data({"a": 1, "b": "x"}) == b'data: {"a":1,"b":"x"}\n\n'
    assert sse_data('{"a":1}') == b'data: {"a":1}\n\n'
    assert sse_data("two\nlines") == b"data: two\ndata: lines\n\n"
    assert SSE_DONE == b"data: [DONE]\n\n"
    assert sse_error("boom", "internal_server_error", 500) == \
        b'data: {"error":{"message":"boom","type":"internal_server_error","code":500}}\n\n'
    assert sse_data(usage(1, 2)) == b'data: {"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}\n\n'


def test_sse_events_survive_readers_that_split_on_unicode_line_breaks():
    """Generated text may hold U+2028, U+0085, ...: JSON leaves them raw, and httpx's
    iter_lines (like str.splitlines) would cut the event there; they go out escaped."""
    import json

    from httpx._decoders import LineDecoder

    from router.sse import sse_data

    text = "a\u2028b\u2029c\x85d\x1ce"
    lines = [line for line in LineDecoder().decode(sse_data({"text": text}).decode()) if line]
    assert len(lines) == 1 and json.loads(lines[0].removeprefix("data: ")) == {"text": text}
