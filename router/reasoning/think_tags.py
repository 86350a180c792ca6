"""Reasoning between `<think>` and `</think>`: DeepSeek-R1 and Qwen3.

The two differ only in where the output starts: DeepSeek-R1's chat template already
opens `<think>` in the prompt, so its output is reasoning until `</think>` (and all of it
when the tag never comes, as vLLM reads it). Qwen3 decides per prompt: Qwen3's hybrid
models write `<think>` themselves (the output is answer until the tag opens), but the
Thinking-2507 templates end the prompt with `<think>\n`, so the output starts inside the
reasoning: it does whenever the prompt's last `<think>` comes after its last `</think>`.
"""

from __future__ import annotations


class ReasoningStream:
    """Feed text deltas, get (reasoning, content) deltas. A tag split across deltas is
    held back until it can be told from plain text."""

    def __init__(self, start: str, end: str, in_reasoning: bool):
        self.start, self.end = start, end
        self.in_reasoning = in_reasoning
        self.seen_start = False
        self._pending = ""
        self.ended = False             # the end tag was seen

    def feed(self, text: str) -> tuple[str, str]:
        reasoning, content = [], []
        buf = self._pending + text
        self._pending = ""
        while buf:
            if self.ended:
                content.append(buf)
                break
            tag = self.end if self.in_reasoning else self.start
            # A start tag right at the beginning of reasoning (R1 models sometimes repeat it) is dropped.
            if self.in_reasoning and not self.seen_start and buf.startswith(self.start):
                self.seen_start = True
                buf = buf[len(self.start):]
                continue
            if self.in_reasoning and not self.seen_start and self.start.startswith(buf):
                self._pending = buf  # might still become the start tag
                break
            i = buf.find(tag)
            if i < 0:
                keep = _partial_suffix(buf, tag)
                out, self._pending = buf[:len(buf) - keep], buf[len(buf) - keep:]
                (reasoning if self.in_reasoning else content).append(out)
                if out and self.in_reasoning:
                    self.seen_start = True
                break
            (reasoning if self.in_reasoning else content).append(buf[:i])
            buf = buf[i + len(tag):]
            if self.in_reasoning:
                self.in_reasoning, self.ended = False, True
            else:
                self.in_reasoning = self.seen_start = True
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """Flush held-back text (a tag that never completed is plain text)."""
        out, self._pending = self._pending, ""
        return (out, "") if self.in_reasoning else ("", out)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningParser:
    start_token = "<think>"
    end_token = "</think>"
    starts_in_reasoning = False   # where the output starts when the prompt does not say

    def stream(self, in_reasoning: bool | None = None) -> ReasoningStream:
        """A reader for one choice; `in_reasoning`: whether the output starts inside the
        reasoning (`output_starts_in_reasoning(prompt)`), else the class's default."""
        start = self.starts_in_reasoning if in_reasoning is None else in_reasoning
        return ReasoningStream(self.start_token, self.end_token, start)

    def extract(self, text: str, in_reasoning: bool | None = None) -> tuple[str | None, str | None]:
        """Non-streaming: (reasoning_content, content), None where there is none."""
        start = self.starts_in_reasoning if in_reasoning is None else in_reasoning
        s = self.stream(start)
        r1, c1 = s.feed(text)
        r2, c2 = s.finish()
        reasoning, content = r1 + r2, c1 + c2
        return (reasoning if reasoning or s.seen_start or start else None), (content or None)

    def output_starts_in_reasoning(self, prompt_text: str) -> bool:
        """Whether the output of this (rendered) prompt begins inside the reasoning."""
        return self.starts_in_reasoning

    def reasoning_ended_in_prompt(self, prompt_text: str) -> bool:
        """The prompt itself closed the reasoning (e.g. a template rendered with
        enable_thinking=False writes `<think></think>`): the output is all answer."""
        start, end = prompt_text.rfind(self.start_token), prompt_text.rfind(self.end_token)
        return end >= 0 and end > start


class DeepSeekR1ReasoningParser(ReasoningParser):
    starts_in_reasoning = True

    def reasoning_ended_in_prompt(self, prompt_text: str) -> bool:
        # Only the generation prompt counts: earlier turns' closed thoughts do not.
        return prompt_text.rstrip().endswith(self.end_token)


class Qwen3ReasoningParser(ReasoningParser):
    starts_in_reasoning = False

    def reasoning_ended_in_prompt(self, prompt_text: str) -> bool:
        return prompt_text.rstrip().endswith(self.end_token)

    def output_starts_in_reasoning(self, prompt_text: str) -> bool:
        # Thinking-2507 templates open the reasoning in the prompt ("...assistant\n<think>\n"):
        # the model then writes only the end tag. A closed earlier turn does not count.
        return prompt_text.rfind(self.start_token) > prompt_text.rfind(self.end_token)
