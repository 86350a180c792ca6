"""The router's readers of model output: reasoning parsers and tool-call parsers, their
registries, and the rule that a stream cut anywhere reassembles to the whole answer."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.builtin_models import AGENT_CHAT_TEMPLATE, CHAT_TEMPLATE
from router.reasoning import ReasoningParser, ReasoningParserManager
from router.structured import template_takes_tools
from router.tool_parsers import ToolParser, ToolParserManager


def streamed(stream, text: str, cuts: list[int]):
    """Feed `text` in pieces cut at `cuts`, then finish; concatenate every output."""
    outs = []
    start = 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(text))) + [len(text)]:
        outs.append(stream.feed(text[start:cut]))
        start = cut
    outs.append(stream.finish())
    return outs


@pytest.mark.parametrize("name,text,want", [
    ("deepseek_r1", "<think>plan it</think>The answer", ("plan it", "The answer")),
    ("deepseek_r1", "plan it</think>The answer", ("plan it", "The answer")),   # <think> was in the prompt
    ("deepseek_r1", "still thinking", ("still thinking", None)),                # never closed: all reasoning
    ("qwen3", "<think>plan it</think>The answer", ("plan it", "The answer")),
    ("qwen3", "No thoughts, just this.", (None, "No thoughts, just this.")),
    ("qwen3", "<think>cut short", ("cut short", None)),
])
def test_reasoning_parsers_split_reasoning_from_content(name, text, want):
    assert ReasoningParserManager.get(name)().extract(text) == want


THINKING_2507_PROMPT = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
HYBRID_PROMPT = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
EARLIER_TURN_CLOSED = ("<|im_start|>assistant\n<think>\nold</think>\n\nold answer<|im_end|>\n"
                       "<|im_start|>user\nMore<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("name, prompt, starts_in_reasoning", [
    ("qwen3", THINKING_2507_PROMPT, True),       # the template opened <think>: the model writes only </think>
    ("qwen3", HYBRID_PROMPT, False),             # the model opens <think> itself (or answers at once)
    ("qwen3", EARLIER_TURN_CLOSED, False),
    ("qwen3", EARLIER_TURN_CLOSED + "<think>\n", True),
    ("deepseek_r1", HYBRID_PROMPT, True),        # R1 always starts in reasoning, as before
    ("deepseek_r1", THINKING_2507_PROMPT, True),
])
def test_whether_the_output_starts_in_reasoning_is_read_from_the_prompt(name, prompt, starts_in_reasoning):
    assert ReasoningParserManager.get(name)().output_starts_in_reasoning(prompt) is starts_in_reasoning


def test_qwen3_reads_the_reasoning_of_a_prompt_that_opened_think():
    parser = ReasoningParserManager.get("qwen3")()
    start = parser.output_starts_in_reasoning(THINKING_2507_PROMPT)
    assert parser.extract("plan it\n</think>\n\nThe answer", start) == ("plan it\n", "\n\nThe answer")
    assert parser.extract("still thinking", start) == ("still thinking", None)
    outs = streamed(parser.stream(start), "plan it</think>The answer", [3, 9, 12])
    assert ("".join(r for r, _ in outs), "".join(c for _, c in outs)) == ("plan it", "The answer")
    assert parser.extract("plan it</think>The answer") == (None, "plan it</think>The answer")  # hybrid: as before


def test_the_plan_decides_per_request_where_the_output_starts():
    from router.protocol import ChatCompletionRequest, parse_request
    from router.spec import RouterLaunchSpec
    from router.structured import ServerFeatures

    req = parse_request(ChatCompletionRequest, {"messages": [{"role": "user", "content": "Hi"}]})
    for parser, prompt, want in (("qwen3", THINKING_2507_PROMPT, True), ("qwen3", HYBRID_PROMPT, False),
                                 ("deepseek_r1", HYBRID_PROMPT, True)):
        features = ServerFeatures(RouterLaunchSpec(model_dir="", served_model_name="m", nodes=[],
                                                   reasoning_parser=parser))
        plan = features.plan(req, True, None, prompt)
        assert plan.reasoning is not None and plan.starts_in_reasoning is want


# Texts made of pieces likely to form (and break) tags and calls.
PIECES = list("ab <>/{}\":,") + ["<think>", "</think>", "<tool_call>", "</tool_call>", '{"name": "f", ',
                                  '"arguments": {"x": 1}}', '"parameters": {}}', "<|python_tag|>", ";"]
TEXTS = st.lists(st.sampled_from(PIECES), max_size=20).map("".join)


@settings(max_examples=150, deadline=None)
@given(text=TEXTS, cuts=st.lists(st.integers(0, 80), max_size=8),
       name=st.sampled_from(["deepseek_r1", "qwen3"]))
def test_reasoning_streams_reassemble_to_the_whole_answer(text, cuts, name):
    parser = ReasoningParserManager.get(name)()
    outs = streamed(parser.stream(), text, cuts)
    reasoning, content = "".join(r for r, _ in outs), "".join(c for _, c in outs)
    whole = parser.extract(text)
    assert (reasoning, content) == (whole[0] or "", whole[1] or "")


@settings(max_examples=150, deadline=None)
@given(text=TEXTS, cuts=st.lists(st.integers(0, 80), max_size=8),
       name=st.sampled_from(["hermes", "llama3_json"]))
def test_tool_call_streams_reassemble_to_the_whole_answer(text, cuts, name):
    parser = ToolParserManager.get(name)()
    outs = streamed(parser.stream(), text, cuts)
    content = "".join(c for c, _ in outs)
    calls = [(call.name, call.arguments) for _, cs in outs for call in cs]
    whole_content, whole_calls = parser.extract(text)
    assert (content, calls) == (whole_content, [(c.name, c.arguments) for c in whole_calls])


def test_hermes_reads_calls_and_keeps_what_is_not_a_call():
    text = ('Let me look. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
            '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call><tool_call>oops</tool_call>')
    content, calls = ToolParserManager.get("hermes")().extract(text)
    assert content == "Let me look.<tool_call>oops</tool_call>"   # the space before a call is layout
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                  ("add", {"a": 1, "b": 2})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def message_of(parser_name: str, text: str) -> tuple[str | None, list[tuple[str, dict]]]:
    """A non-streaming answer's (content, calls), as the router builds it."""
    stream = ToolParserManager.get(parser_name)().stream()
    c1, t1 = stream.feed(text)
    c2, t2 = stream.finish()
    calls = t1 + t2
    return (stream.message_content(c1 + c2) if calls else c1 + c2), [(c.name, json.loads(c.arguments)) for c in calls]


def test_hermes_message_content_is_the_text_before_the_first_call():
    two_calls = ('<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
                 '<tool_call>{"name": "b", "arguments": {"x": 1}}</tool_call>\n')
    assert message_of("hermes", two_calls) == (None, [("a", {}), ("b", {"x": 1})])
    assert message_of("hermes", "Let me check.\n\n" + two_calls) == ("Let me check.", [("a", {}), ("b", {"x": 1})])
    assert message_of("hermes", "No calls here.\n") == ("No calls here.\n", [])
    # streamed, the whitespace around calls is held back and dropped too: the deltas read the same
    outs = streamed(ToolParserManager.get("hermes")().stream(), "Let me check.\n\n" + two_calls, [14, 15, 60])
    assert "".join(c for c, _ in outs) == "Let me check."
    outs = streamed(ToolParserManager.get("hermes")().stream(), "a  b \n", [2, 3, 5])
    assert "".join(c for c, _ in outs) == "a  b \n"   # without calls every character is content


def test_hermes_accepts_an_unclosed_last_call_whose_json_parses():
    stopped = 'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'  # stop=["</tool_call>"]
    content, calls = ToolParserManager.get("hermes")().extract(stopped)
    assert content == "Checking." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})]
    assert message_of("hermes", stopped) == ("Checking.", [("get_weather", {"city": "Paris"})])
    cut = 'Checking.<tool_call>{"name": "get_weather", "argum'      # cut short: not a call, kept as text
    assert ToolParserManager.get("hermes")().extract(cut) == (cut, [])


def test_llama3_json_reads_one_or_several_calls_or_leaves_text_alone():
    parser = ToolParserManager.get("llama3_json")()
    content, calls = parser.extract('<|python_tag|>{"name": "f", "parameters": {"x": "a;b"}}; {"name": "g", "parameters": {}}')
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"x": "a;b"}), ("g", {})]
    assert parser.extract("Hello {there}") == ("Hello {there}", [])
    assert parser.extract('{"not": "a call"}') == ('{"not": "a call"}', [])


class Brackets(ReasoningParser):
    start_token, end_token = "[[", "]]"


class EveryLine(ToolParser):
    pass


def test_parsers_register_by_name_or_module_path_and_unknown_names_list_the_registered():
    assert ReasoningParserManager.list_registered() == ["deepseek_r1", "qwen3"]
    assert {"hermes", "llama3_json"} <= set(ToolParserManager.list_registered())
    assert ReasoningParserManager.get(f"{__name__}:Brackets") is Brackets
    assert Brackets().extract("[[x]]y") == ("x", "y")
    ReasoningParserManager.register("brackets", Brackets)
    try:
        assert "brackets" in ReasoningParserManager.list_registered()
    finally:
        ReasoningParserManager._classes.pop("brackets")
    assert ToolParserManager.get(f"{__name__}:EveryLine") is EveryLine
    with pytest.raises(ValueError, match="registered are deepseek_r1, qwen3"):
        ReasoningParserManager.get("nope")
    with pytest.raises(ValueError, match="registered are hermes, llama3_json"):
        ToolParserManager.get("nope")
    with pytest.raises(ValueError, match="not a subclass"):
        ToolParserManager.get("json:loads")


def test_only_templates_that_read_tools_take_them():
    assert template_takes_tools(AGENT_CHAT_TEMPLATE)
    assert not template_takes_tools(CHAT_TEMPLATE)


def test_tools_for_a_template_that_ignores_them_are_a_400_not_silently_dropped():
    from types import SimpleNamespace

    from engine.builtin_models import resolve_builtin
    from engine.tokenizer import Tokenizer
    from router.app import _prompt_ids
    from router.protocol import ChatCompletionRequest, RequestError, parse_request

    body = {"messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}
    req = parse_request(ChatCompletionRequest, body)
    plain = SimpleNamespace(tokenizer=Tokenizer.from_pretrained(resolve_builtin("tiny")), max_model_len=4096)
    with pytest.raises(RequestError, match="chat template does not take tools"):
        _prompt_ids(plain, req, chat=True)
    agent = SimpleNamespace(tokenizer=Tokenizer.from_pretrained(resolve_builtin("tiny-chat")), max_model_len=4096)
    ids, text = _prompt_ids(agent, req, chat=True)
    assert '"name": "f"' in text and ids
    bad = parse_request(ChatCompletionRequest, {**body, "tools": [{"type": "function", "function": {}}]})
    with pytest.raises(RequestError, match="tools.0"):
        _prompt_ids(agent, bad, chat=True)
