"""Structured outputs, reasoning, tool calls, n > 1 and echo through real clusters and
the official `openai` client, on the built-in `tiny-chat` model (Qwen3-shaped, with
`<think>`/`<tool_call>` tokens and a template that takes tools).

Two clusters per module: a split one (1P1D over TCP, deepseek_r1 + hermes) whose decode
node drops the first KV block of every transfer, so every split request also goes
through a KV recompute, and a colocated one (qwen3 + llama3_json). Both apply the
grammar during the reasoning (`enable_in_reasoning`), which is how a random-weight model
can be made to write `<think>...</think>` at all: the regexes below spell it out.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from cluster.config import ClusterConfig, ClusterConfigError
from cluster.launcher import LocalCluster

MODEL = "builtin:tiny-chat"
SCHEMA = {"type": "object",
          "properties": {"answer": {"enum": ["yes", "no"]}, "score": {"type": "integer", "minimum": 0, "maximum": 9},
                         "name": {"type": "string", "pattern": "^[a-z]{2,6}$"}},
          "required": ["answer", "score", "name"], "additionalProperties": False}
PROMPT = "Answer in JSON, please, with an answer, a score and a short name for the thing we talked about."
MESSAGES = [{"role": "user", "content": PROMPT}]
# The template closes the reasoning in the prompt: the whole output is the answer.
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[a-z]{3,8}$"}},
                         "required": ["city"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                              "b": {"type": "integer", "minimum": 0, "maximum": 99}},
             "required": ["a", "b"], "additionalProperties": False}}}]


def config(topology: str, reasoning_parser: str, tool_call_parser: str) -> ClusterConfig:
    split = topology == "1P1D"
    return ClusterConfig.model_validate({
        "model": {"path": MODEL, "dtype": "float32"},
        "router": {"port": 0, "tool_call_parser": tool_call_parser},
        "kv_transfer": {"connector": "tcp", "abort_timeout_s": 30, "transfer_timeout_s": 10,
                        "extra": {"fault_drop_blocks": [0]} if split else {}},
        "engine": {"num_blocks": 256, "block_size": 16, "max_num_seqs": 32},
        "prefill": {"replicas": 1 if split else 0, "devices": ["cpu"]},
        "decode": {"replicas": 1 if split else 0, "devices": ["cpu"]},
        "colocated": {"replicas": 0 if split else 1, "devices": ["cpu"]},
        # A random model fills any allowed whitespace: compact JSON keeps answers short.
        "structured_outputs": {"reasoning_parser": reasoning_parser, "enable_in_reasoning": True,
                               "disable_any_whitespace": True},
    })


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    started = []
    try:
        for topology, rp, tp in (("1P1D", "deepseek_r1", "hermes"), ("colocated1", "qwen3", "llama3_json")):
            c = LocalCluster(config(topology, rp, tp), run_dir=tmp_path_factory.mktemp(topology))
            c.start(timeout_s=180)
            started.append(c)
        yield {"split": started[0], "colocated": started[1]}
    finally:
        for c in started:
            c.stop()


@pytest.fixture(scope="module")
def split(clusters):
    return openai.OpenAI(base_url=clusters["split"].url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def colocated(clusters):
    return openai.OpenAI(base_url=clusters["colocated"].url + "/v1", api_key="unused", max_retries=0, timeout=60)


def check_schema(text: str) -> dict:
    obj = json.loads(text)
    assert set(obj) == {"answer", "score", "name"}
    assert obj["answer"] in ("yes", "no") and 0 <= obj["score"] <= 9 and 2 <= len(obj["name"]) <= 6
    return obj


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_json_schema_output_parses_for_every_installed_backend(split, colocated, backend):
    for client in (split, colocated):
        out = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=80, temperature=0.0,
            response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}},
            extra_body={"guided_decoding_backend": backend, **NO_THINKING})
        assert out.choices[0].finish_reason == "stop"
        check_schema(out.choices[0].message.content)


def test_json_object_and_vllm_structured_outputs_object(split):
    out = split.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, temperature=0.0,
                                        response_format={"type": "json_object"}, extra_body=NO_THINKING)
    text = out.choices[0].message.content  # any object: a random model may not close it in 40 tokens
    assert text.startswith("{") and (out.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))
    out = split.completions.create(model=MODEL, prompt=PROMPT, max_tokens=80, temperature=0.0,
                                   extra_body={"structured_outputs": {"json": SCHEMA, "backend": "guidance",
                                                                      "disable_any_whitespace": True}})
    assert " " not in out.choices[0].text.replace('" ', "")  # compact: no free whitespace between tokens
    check_schema(out.choices[0].text)


def test_guided_choice_and_regex_are_obeyed(split, colocated):
    for client in (split, colocated):
        for seed in range(3):
            out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=seed,
                                            extra_body={"guided_choice": ["alpha", "beta", "gamma delta"]})
            assert out.choices[0].text in ("alpha", "beta", "gamma delta")
        out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=1.0, seed=7,
                                        extra_body={"guided_regex": r"[A-Z][a-z]{2,5}-\d{3}"})
        import re
        assert re.fullmatch(r"[A-Z][a-z]{2,5}-\d{3}", out.choices[0].text)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_p=0.95, seed=11)],
                         ids=["greedy", "seeded"])
def test_split_cluster_gives_the_colocated_constrained_output_after_a_kv_recompute(clusters, split, colocated,
                                                                                    sampling):
    # The split cluster's decode node drops block 0 of every transfer: it recomputes that
    # block, and its grammar matcher resumes from the prefill node's first token.
    long_prompt = PROMPT + " " + PROMPT  # several full blocks
    kw = dict(model=MODEL, prompt=long_prompt, max_tokens=80, extra_body={"guided_json": SCHEMA}, **sampling)
    a = split.completions.create(**kw).choices[0].text
    b = colocated.completions.create(**kw).choices[0].text
    check_schema(a)
    assert a == b
    stats = httpx.get(clusters["split"].url + "/cluster").json()["nodes"]
    decode = next(n for n in stats if n["role"] == "decode")
    assert decode["kv_transfer"]["blocks_failed"] > 0  # dropped, then recomputed


def stream_chat(client, **kw) -> tuple[str, str, list[dict], str | None]:
    """(reasoning, content, tool calls reassembled from deltas, finish_reason) of a stream."""
    reasoning, content, calls, finish = "", "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = tc.id or call["id"]
            call["name"] += tc.function.name or ""
            call["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return reasoning, content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("which,regex", [
    ("split", r"[a-z ]{8,20}</think>[a-z]{3,8}"),                 # deepseek_r1: the template opened <think>
    ("colocated", r"<think>[a-z ]{8,20}</think>[a-z]{3,8}")])     # qwen3: the model opens it
def test_reasoning_is_split_from_the_answer_streamed_or_not(split, colocated, which, regex):
    client = split if which == "split" else colocated
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=40, temperature=0.0, extra_body={"guided_regex": regex})
    msg = client.chat.completions.create(**kw).choices[0].message
    reasoning = getattr(msg, "reasoning_content", None)
    assert reasoning and "<think>" not in reasoning and "</think>" not in reasoning
    assert msg.content and msg.content.isalpha()
    s_reasoning, s_content, _, finish = stream_chat(client, **kw)
    assert (s_reasoning, s_content, finish) == (reasoning, msg.content, "stop")


def test_a_prompt_that_closes_the_reasoning_gets_an_answer_only(split):
    # enable_thinking=False: the template writes <think></think>; nothing is reasoning.
    out = split.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=80, temperature=0.0,
                                        response_format={"type": "json_schema", "json_schema": {"name": "v", "schema": SCHEMA}},
                                        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert getattr(out.choices[0].message, "reasoning_content", None) is None
    check_schema(out.choices[0].message.content)


@pytest.mark.parametrize("which,regex", [
    ("split", r'[a-z]{2,6} <tool_call>\{"name": "get_weather", "arguments": \{"city": "[a-z]{3,8}"\}\}</tool_call>'),
    ("colocated", r'\{"name": "add", "parameters": \{"a": [1-9], "b": [1-9]\}\}')])
def test_tool_calls_are_parsed_and_stream_as_deltas_that_reassemble(split, colocated, which, regex):
    client = split if which == "split" else colocated
    prefix = "</think>" if which == "split" else ""   # deepseek_r1 reasons first; close it at once
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "What is the weather in paris?"}], tools=TOOLS,
              max_tokens=150, temperature=0.0, extra_body={"guided_regex": prefix + regex})
    out = client.chat.completions.create(**kw).choices[0]
    assert out.finish_reason == "tool_calls"
    calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in out.message.tool_calls]
    assert len(calls) == 1 and calls[0]["name"] == ("get_weather" if which == "split" else "add")
    args = json.loads(calls[0]["arguments"])
    assert set(args) == ({"city"} if which == "split" else {"a", "b"})
    _, content, streamed, finish = stream_chat(client, **kw)
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in streamed] == [(c["name"], c["arguments"]) for c in calls]
    assert content == (out.message.content or "")
    if which == "split":
        assert "<tool_call>" not in content and content.strip().isalpha()


def test_tool_choice_required_and_named_are_enforced(split):
    base = dict(model=MODEL, messages=[{"role": "user", "content": "Add two numbers."}], tools=TOOLS,
                max_tokens=200, temperature=0.0, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    out = split.chat.completions.create(tool_choice="required", parallel_tool_calls=False, **base).choices[0]
    assert out.finish_reason == "tool_calls" and len(out.message.tool_calls) == 1
    for call in out.message.tool_calls:
        assert call.function.name in ("get_weather", "add")
        assert isinstance(json.loads(call.function.arguments), dict)
    named = split.chat.completions.create(tool_choice={"type": "function", "function": {"name": "add"}}, **base)
    call = named.choices[0].message.tool_calls[0]
    assert call.function.name == "add" and set(json.loads(call.function.arguments)) == {"a", "b"}
    _, _, streamed, _ = stream_chat(split, tool_choice={"type": "function", "function": {"name": "add"}}, **base)
    assert [(c["name"], c["arguments"]) for c in streamed] == [("add", call.function.arguments)]
    none = split.chat.completions.create(tool_choice="none", **{**base, "max_tokens": 5}).choices[0]
    assert none.message.tool_calls is None
    for malformed in ({"type": "function", "function": "add"}, {"type": "function", "function": ["add"]},
                      {"type": "function"}):
        with pytest.raises(openai.BadRequestError, match="tool_choice must be none, auto, required or"):
            split.chat.completions.create(tool_choice=malformed, **base)


def node_stats(url: str) -> dict[str, dict]:
    """role -> that role's (only) node in /cluster."""
    return {n["role"]: n for n in httpx.get(url + "/cluster").json()["nodes"]}


def settled_stats(url: str, done=lambda nodes: True) -> dict[str, dict]:
    """/cluster's nodes once `done(nodes)` and no node runs or queues anything; the router
    polls node stats every 0.5 s, so a snapshot taken after a request ended comes later."""
    deadline = time.monotonic() + 10
    while True:
        nodes = node_stats(url)
        if done(nodes) and all(n["running"] == 0 and n["waiting"] == 0 for n in nodes.values()):
            return nodes
        assert time.monotonic() < deadline, nodes
        time.sleep(0.2)


@pytest.mark.parametrize("which", ["split", "colocated"])
def test_n_choices_match_single_requests_with_consecutive_seeds(clusters, split, colocated, which):
    client = split if which == "split" else colocated
    url = clusters[which].url
    roles = ("prefill", "decode") if which == "split" else ("both",)
    prompt = f"{which}: {PROMPT} {PROMPT}"  # not seen before: the cache starts cold for it
    kw = dict(model=MODEL, prompt=prompt, max_tokens=16, temperature=1.0, extra_body={"ignore_eos": True})
    time.sleep(2.0)  # a snapshot taken after the earlier tests' last steps, even on a loaded machine
    before = settled_stats(url)
    many = client.completions.create(n=3, seed=100, **kw)
    # Choices 1 and 2 went whole to the node decoding choice 0, as forks of it: the prompt
    # was computed once (split: on the prefill node, choice 0's only) and pulled once (the
    # decode node forked choice 0's pulled KV, one row computed per fork).
    p = many.usage.prompt_tokens
    forking = roles[-1]
    after = settled_stats(url, lambda nodes: nodes[forking]["forks"] > before[forking]["forks"])
    for r in roles:
        assert after[r]["forks"] - before[r]["forks"] == (2 if r == forking else 0)
        assert after[r]["fork_fallbacks"] == before[r]["fork_fallbacks"]
    assert after[forking]["fork_blocks_shared"] - before[forking]["fork_blocks_shared"] == 2 * ((p - 1) // 16)
    assert after[forking]["fork_tokens_saved"] - before[forking]["fork_tokens_saved"] == 2 * (p - 1)
    first = roles[0]
    computed = after[first]["tokens_computed"] - before[first]["tokens_computed"]
    assert computed == (p if which == "split" else p + 2 + 3 * 15)  # colocated: and 15 decode steps per choice
    if which == "split":
        loads = after["decode"]["kv_transfer"]["loads"] - before["decode"]["kv_transfer"]["loads"]
        assert loads == 1
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    texts = {c.index: c.text for c in many.choices}
    with ThreadPoolExecutor(3) as pool:
        singles = list(pool.map(lambda i: client.completions.create(seed=100 + i, **kw).choices[0].text, range(3)))
    assert [texts[i] for i in range(3)] == singles
    assert len(set(singles)) > 1
    assert many.usage.completion_tokens == 48
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(n=3, seed=100, stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == texts


def test_echo_repeats_the_prompt_before_the_completion(split):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0.0, extra_body={"ignore_eos": True})
    plain = split.completions.create(**kw).choices[0].text
    echoed = split.completions.create(echo=True, **kw).choices[0].text
    assert echoed == PROMPT + plain
    streamed = "".join(c.choices[0].text for c in split.completions.create(echo=True, stream=True, **kw) if c.choices)
    assert streamed == PROMPT + plain


def test_unknown_backends_and_parsers_are_refused_with_the_registered_names(split):
    with pytest.raises(openai.BadRequestError) as err:
        split.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                 extra_body={"guided_json": SCHEMA, "guided_decoding_backend": "nope"})
    assert "xgrammar" in err.value.message and "guidance" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        split.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                 extra_body={"guided_json": SCHEMA, "guided_decoding_backend": "lm-format-enforcer"})
    assert "lm-format-enforcer" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        split.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                 extra_body={"guided_regex": "[a-z", "guided_decoding_backend": "xgrammar"})
    assert "regex" in err.value.message
    with pytest.raises(openai.BadRequestError):
        split.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                 extra_body={"guided_regex": "a+", "guided_choice": ["a"]})
    for section, key in (("structured_outputs", "reasoning_parser"), ("router", "tool_call_parser")):
        with pytest.raises((ClusterConfigError, ValueError)) as cerr:
            ClusterConfig.model_validate({section: {key: "nope"}})
        assert "registered are" in str(cerr.value)
