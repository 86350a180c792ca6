"""The router's OpenAI API in-process: `create_app` on a real model directory (its
tokenizer, chat template and generation_config.json) read by the official `openai`
client through Starlette's TestClient, with the cluster's token stream scripted.

What a random-weight model cannot be made to write on demand (two tool calls, a
thinking model's `</think>`) is scripted here as the engine deltas the orchestrator
would hand the HTTP layer; the nodes themselves are covered by the e2e tests
(tests/test_cluster_e2e.py, tests/test_structured_outputs_e2e.py,
tests/test_router_api_e2e.py)."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import httpx
import openai
import pytest
from starlette.testclient import TestClient

from engine.builtin_models import AGENT_CHAT_TEMPLATE, make_model
from router.app import create_app
from router.orchestrator import Delta
from router.spec import RouterLaunchSpec

USER = [{"role": "user", "content": "Weather in Paris?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
TWO_CALLS = ['<tool_call>{"name": "get_weather", ', '"arguments": {"city": "Paris"}}</tool_call>\n',
             '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>']


class ScriptedCluster:
    """Stands in for the orchestrator: every choice streams `pieces`, one delta each."""

    def __init__(self, pieces: list[str] | None = None):
        self.pieces = pieces or ["Hello", "!"]
        self.requests: list[tuple[list[int], object]] = []   # (prompt ids, SamplingParams)

    def generate(self, request_id, prompt_ids, params, affinity_key=None, **_):
        self.requests.append((list(prompt_ids), params))
        return self._deltas(len(prompt_ids))

    async def _deltas(self, prompt_tokens: int):
        for i, piece in enumerate(self.pieces):
            last = i == len(self.pieces) - 1
            yield Delta(token_ids=[7], text=piece, finished=last, finish_reason="stop" if last else None,
                        num_prompt_tokens=prompt_tokens)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny-chat"), "tiny-chat", with_weights=False)


@contextlib.contextmanager
def router(model_dir: Path, cluster: ScriptedCluster | None = None, **spec):
    """(openai client, raw HTTP client, the scripted cluster) of a router on `model_dir`."""
    spec = RouterLaunchSpec(**{"model_dir": str(model_dir), "served_model_name": "tiny-chat", "nodes": [], **spec})
    app = create_app(spec)
    cluster = cluster or ScriptedCluster()
    app.state.router.orchestrator.generate = cluster.generate
    with TestClient(app) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key=spec.api_key or "none", max_retries=0,
                               http_client=http)
        yield client, http, cluster


def prompt_text(model_dir: Path, cluster: ScriptedCluster) -> str:
    from engine.tokenizer import Tokenizer
    return Tokenizer.from_pretrained(model_dir).decode(cluster.requests[-1][0], skip_special_tokens=False)


def sse_chunks(http: TestClient, body: dict) -> list[dict]:
    response = http.post("/v1/chat/completions", json={"messages": USER, "stream": True, **body})
    assert response.status_code == 200, response.text
    events = [line.removeprefix("data: ") for line in response.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# --- errors of the routing layer, and retrieving the model ----------------------------------

def test_unknown_routes_and_wrong_methods_answer_in_the_openai_error_shape(chat_model):
    with router(chat_model) as (client, http, _):
        for path in ("/v1/responses", "/v1/embeddings", "/nope"):
            response = http.post(path, json={"model": "tiny-chat", "input": "x"})
            assert response.status_code == 404
            error = response.json()["error"]
            assert (error["type"], error["code"]) == ("not_found_error", 404) and path in error["message"]
        response = http.get("/v1/chat/completions")
        assert response.status_code == 405 and response.headers["allow"] == "POST"
        assert response.json()["error"] == {"message": "GET is not allowed on /v1/chat/completions: use POST",
                                            "type": "invalid_request_error", "code": 405}
        with pytest.raises(openai.NotFoundError, match="POST /v1/embeddings is not served here"):
            client.embeddings.create(model="tiny-chat", input="x")


def test_a_model_is_retrieved_by_its_id_even_one_with_slashes(chat_model):
    with router(chat_model, served_model_name="org/tiny-chat") as (client, http, _):
        model = client.models.retrieve("org/tiny-chat")   # the client sends org%2Ftiny-chat
        assert (model.id, model.object, model.owned_by) == ("org/tiny-chat", "model", "pdcluster")
        assert http.get("/v1/models/org/tiny-chat").json()["id"] == "org/tiny-chat"
        with pytest.raises(openai.NotFoundError, match="model 'gpt-4o' is not served here: use 'org/tiny-chat'"):
            client.models.retrieve("gpt-4o")
        assert http.get("/v1/models/org").json()["error"]["code"] == 404


def test_the_api_key_guards_retrieve_and_unknown_routes_as_it_guards_the_model_list(chat_model):
    with router(chat_model, api_key="sesame") as (client, http, _):
        for path in ("/v1/models", "/v1/models/tiny-chat", "/v1/nope"):
            assert http.get(path).status_code == 401
        assert client.models.retrieve("tiny-chat").id == "tiny-chat"
        assert http.get("/v1/nope", headers={"Authorization": "Bearer sesame"}).json()["error"]["code"] == 404


# --- sampling defaults from generation_config.json ------------------------------------------

@pytest.fixture(scope="module")
def model_with_sampling_defaults(tmp_path_factory) -> Path:
    path = make_model(tmp_path_factory.mktemp("tuned"), "tiny-chat", with_weights=False)
    config = json.loads((path / "generation_config.json").read_text())
    config.update(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=5, do_sample=True)
    (path / "generation_config.json").write_text(json.dumps(config))
    return path


def test_generation_config_defaults_apply_to_the_fields_a_request_does_not_send(model_with_sampling_defaults,
                                                                                caplog):
    with caplog.at_level(logging.WARNING, logger="router.app"):
        with router(model_with_sampling_defaults) as (client, _, cluster):
            client.chat.completions.create(model="tiny-chat", messages=USER)
            client.chat.completions.create(model="tiny-chat", messages=USER, temperature=0.0, max_tokens=9)
            client.completions.create(model="tiny-chat", prompt="Hi", extra_body={"top_k": 0})
    (_, defaulted), (_, sent), (_, completion) = cluster.requests
    assert (defaulted.temperature, defaulted.top_p, defaulted.top_k, defaulted.max_tokens) == (0.6, 0.95, 20, 5)
    assert (sent.temperature, sent.top_p, sent.top_k, sent.max_tokens) == (0.0, 0.95, 20, 9)
    assert (completion.temperature, completion.top_k, completion.max_tokens) == (0.6, 0, 16)  # OpenAI's 16
    assert "Default sampling parameters have been overridden by the model's generation_config.json" in caplog.text


def test_generation_config_vllm_keeps_the_neutral_defaults(model_with_sampling_defaults, chat_model):
    for model_dir, source in ((model_with_sampling_defaults, "vllm"), (chat_model, "auto")):
        with router(model_dir, generation_config=source, max_model_len=256) as (client, _, cluster):
            client.chat.completions.create(model="tiny-chat", messages=USER)
        prompt_ids, params = cluster.requests[0]
        assert (params.temperature, params.top_p, params.top_k) == (1.0, 1.0, 0)
        assert params.max_tokens == 256 - len(prompt_ids)


# --- chat templates -----------------------------------------------------------------------

def test_tool_call_arguments_of_the_history_are_rendered_once_as_json(chat_model):
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    with router(chat_model, tool_call_parser="hermes") as (client, _, cluster):
        client.chat.completions.create(model="tiny-chat", messages=history, tools=TOOLS)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in prompt_text(
        chat_model, cluster)


def test_the_generation_prompt_can_be_left_out_or_the_last_message_continued(chat_model):
    partial = [*USER, {"role": "assistant", "content": "It is"}]
    with router(chat_model) as (client, _, cluster):
        client.chat.completions.create(model="tiny-chat", messages=USER)
        assert prompt_text(chat_model, cluster).endswith("Weather in Paris?<|im_end|>\n<|im_start|>assistant\n")
        client.chat.completions.create(model="tiny-chat", messages=USER, extra_body={"add_generation_prompt": False})
        assert prompt_text(chat_model, cluster).endswith("Weather in Paris?<|im_end|>\n")
        client.chat.completions.create(model="tiny-chat", messages=partial, extra_body={
            "add_generation_prompt": False, "continue_final_message": True})
        assert prompt_text(chat_model, cluster).endswith("<|im_start|>assistant\nIt is")
        with pytest.raises(openai.BadRequestError, match="continue_final_message=true cannot go with"):
            client.chat.completions.create(model="tiny-chat", messages=partial,
                                           extra_body={"continue_final_message": True})


def test_refused_fields_and_explicit_nulls_through_the_openai_client(chat_model):
    with router(chat_model) as (client, _, _):
        out = client.chat.completions.create(model="tiny-chat", messages=USER, logprobs=None, stream=None, n=None)
        assert out.choices[0].message.content == "Hello!"
        assert client.completions.create(model="tiny-chat", prompt="Hi", echo=None, logprobs=None,
                                         stream=None).choices[0].text == "Hello!"
        with pytest.raises(openai.BadRequestError, match="use_beam_search is not supported"):
            client.chat.completions.create(model="tiny-chat", messages=USER, extra_body={"use_beam_search": True})
        with pytest.raises(openai.BadRequestError, match="functions is not supported: .* send tools"):
            client.chat.completions.create(model="tiny-chat", messages=USER,
                                           functions=[{"name": "f", "parameters": {}}])


# --- reading the answer: tool calls, reasoning, stream chunks --------------------------------

def test_parallel_tool_calls_false_keeps_only_the_first_call(chat_model):
    with router(chat_model, ScriptedCluster(TWO_CALLS), tool_call_parser="hermes") as (client, http, _):
        both = client.chat.completions.create(model="tiny-chat", messages=USER, tools=TOOLS)
        assert [c.function.name for c in both.choices[0].message.tool_calls] == ["get_weather", "add"]
        one = client.chat.completions.create(model="tiny-chat", messages=USER, tools=TOOLS, parallel_tool_calls=False)
        assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]
        assert one.choices[0].finish_reason == "tool_calls" and one.choices[0].message.content is None
        chunks = sse_chunks(http, {"tools": TOOLS, "parallel_tool_calls": False})
        calls = [call for c in chunks for call in c["choices"][0]["delta"].get("tool_calls") or []]
        assert [(call["index"], call["function"]["name"]) for call in calls] == [(0, "get_weather")]
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_hermes_answer_content_is_the_text_before_the_first_call(chat_model):
    script = ScriptedCluster(["I will check.\n", *TWO_CALLS, "\n"])
    with router(chat_model, script, tool_call_parser="hermes") as (client, _, _):
        out = client.chat.completions.create(model="tiny-chat", messages=USER, tools=TOOLS)
        assert out.choices[0].message.content == "I will check." and len(out.choices[0].message.tool_calls) == 2
        script.pieces = TWO_CALLS
        assert client.chat.completions.create(model="tiny-chat", messages=USER,
                                              tools=TOOLS).choices[0].message.content is None


def test_a_last_call_cut_at_its_closing_tag_is_still_a_call(chat_model):
    stopped = ScriptedCluster(['<tool_call>\n{"name": "get_weather", ', '"arguments": {"city": "Paris"}}\n'])
    with router(chat_model, stopped, tool_call_parser="hermes") as (client, http, _):
        out = client.chat.completions.create(model="tiny-chat", messages=USER, tools=TOOLS, stop=["</tool_call>"])
        call = out.choices[0].message.tool_calls[0]
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
        assert out.choices[0].finish_reason == "tool_calls" and out.choices[0].message.content is None
        streamed = sse_chunks(http, {"tools": TOOLS, "stop": ["</tool_call>"]})
        assert [call["function"]["name"] for c in streamed for call in c["choices"][0]["delta"].get("tool_calls") or []
                ] == ["get_weather"]


def test_stream_chunks_that_would_carry_nothing_are_not_sent(chat_model):
    pieces = ["Let me", " check.", "<tool", "_call>", '{"name": "add", ', '"arguments": {}}', "</tool_call>"]
    with router(chat_model, ScriptedCluster(pieces), tool_call_parser="hermes") as (_, http, _):
        chunks = sse_chunks(http, {"tools": TOOLS, "stream_options": {"include_usage": True}})
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks[:-1]]
    assert deltas[0] == ({"role": "assistant", "content": ""}, None)                 # the role chunk stays
    assert [d.get("content") for d, _ in deltas[1:3]] == ["Let me", " check."]
    assert len(deltas) == 4 and deltas[3][0]["tool_calls"][0]["function"]["name"] == "add"
    assert deltas[3][1] == "tool_calls"                                              # so does the finish chunk
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(pieces)


def test_held_back_text_with_logprobs_still_sends_its_logprobs(chat_model):
    class WithLogprobs(ScriptedCluster):
        async def _deltas(self, prompt_tokens):
            from engine.sampler import TokenLogprobs
            async for d in super()._deltas(prompt_tokens):
                d.logprobs = [TokenLogprobs(token_id=7, logprob=-0.5, rank=1, top={})]
                yield d

    with router(chat_model, WithLogprobs(["<tool", "_call>", "oops", "</tool_call>"]),
                tool_call_parser="hermes") as (_, http, _):
        chunks = sse_chunks(http, {"tools": TOOLS, "logprobs": True})
    assert sum(len(c["choices"][0]["logprobs"]["content"]) for c in chunks[1:]) == 4
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "<tool_call>oops</tool_call>"


THINKING_TEMPLATE = AGENT_CHAT_TEMPLATE.replace(
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}",
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}")


@pytest.fixture(scope="module")
def thinking_model(tmp_path_factory) -> Path:
    """tiny-chat with a Qwen3-Thinking-2507-style template: the prompt opens `<think>`."""
    path = make_model(tmp_path_factory.mktemp("thinking"), "tiny-chat", with_weights=False)
    assert THINKING_TEMPLATE != AGENT_CHAT_TEMPLATE
    (path / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    return path


def test_qwen3_reads_reasoning_when_the_prompt_opened_think(thinking_model, chat_model):
    answer = ["Paris is ", "sunny, say so.\n</thi", "nk>\n\nSunny."]
    with router(thinking_model, ScriptedCluster(answer), reasoning_parser="qwen3") as (client, http, _):
        out = client.chat.completions.create(model="tiny-chat", messages=USER).choices[0].message
        assert (out.reasoning_content, out.content) == ("Paris is sunny, say so.\n", "\n\nSunny.")
        chunks = sse_chunks(http, {})
        assert "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks) == \
            "Paris is sunny, say so.\n"
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "\n\nSunny."
    with router(chat_model, ScriptedCluster(answer), reasoning_parser="qwen3") as (client, _, _):
        out = client.chat.completions.create(model="tiny-chat", messages=USER).choices[0].message
        assert (out.model_extra.get("reasoning_content"), out.content) == (None, "".join(answer))  # all answer


def test_a_response_that_cannot_be_built_is_one_500_counted_once(chat_model, monkeypatch):
    from router import app as router_app

    def broken(self):
        raise RuntimeError("cannot build it")
    monkeypatch.setattr(router_app._Run, "_response", broken)
    with router(chat_model) as (_, http, _cluster):
        r = http.post("/v1/chat/completions", json={"messages": USER})
        assert r.status_code == 500 and "cannot build it" in r.json()["error"]["message"]
        counted = [line for line in http.get("/metrics").text.splitlines()
                   if line.startswith('pdcluster_requests_total{endpoint="chat",status="500"}')]
        assert counted == ['pdcluster_requests_total{endpoint="chat",status="500"} 1.0']


class ClosableCluster(ScriptedCluster):
    """Counts the streams closed: what stops a request's work on its nodes."""

    closed = 0

    async def _deltas(self, prompt_tokens: int):
        try:
            async for d in super()._deltas(prompt_tokens):
                yield d
        finally:
            self.closed += 1


@pytest.mark.parametrize("spec_version, gone", [("2.4", "first send fails"), ("2.3", "before the response"),
                                                ("2.3", "after the first byte")])
def test_a_stream_whose_client_is_gone_still_ends_its_request(chat_model, spec_version, gone):
    """Starlette never starts a streamed body when the client is gone before it would (a
    send that fails, ASGI 2.4; a disconnect already waiting, 2.3 as uvicorn speaks): the
    body's `finally` must not be the only way a request ends (its work would run on and
    its admission slot stay taken)."""
    import asyncio

    cluster = ClosableCluster(["a", "b", "c"])
    with router(chat_model, cluster) as (_, http, _):
        app, state = http.app, http.app.state.router

        async def gone_client() -> None:
            body = json.dumps({"model": "tiny-chat", "prompt": "Hi", "stream": True}).encode()
            requests = [{"type": "http.request", "body": body, "more_body": False}]
            answered = asyncio.Event()

            async def receive():
                if requests:
                    return requests.pop(0)
                if gone == "after the first byte":
                    await answered.wait()
                return {"type": "http.disconnect"}

            async def send(message):
                answered.set()
                if gone == "first send fails":
                    raise OSError("connection reset by peer")

            scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
                     "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
                     "root_path": "", "query_string": b"", "client": ("127.0.0.1", 5000), "server": ("testserver", 80),
                     "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")]}
            with contextlib.suppress(Exception):
                await app(scope, receive, send)

        http.portal.call(gone_client)
        assert state.in_flight == 0 and cluster.closed == 1
        assert http.post("/v1/completions", json={"model": "tiny-chat", "prompt": "Hi"}).status_code == 200
