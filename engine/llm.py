"""The offline API, in the spirit of vLLM's `LLM`: hand it prompts, get completions."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from types import TracebackType

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """`LLM(model="builtin:tiny").generate(["Hello"], SamplingParams(max_tokens=8))`.

    Use it as a context manager, or call close(), when the process goes on after it:
    a discarded engine is not reclaimed by the garbage collector (see LLMEngine.close),
    so its KV cache and weights would stay in memory until the process ends."""

    def __init__(self, model: str = "builtin:tiny", dtype: str = "auto", device: str = "auto",
                 load_format: str = "auto", seed: int = 0, block_size: int = 16, num_blocks: int | None = None,
                 enable_prefix_caching: bool = True, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 max_model_len: int | None = None, enable_chunked_prefill: bool = True, enforce_eager: bool = False,
                 **cache_kwargs):
        config = EngineConfig(
            model=model, dtype=dtype, device=device, load_format=load_format, seed=seed,
            cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                              enable_prefix_caching=enable_prefix_caching, **cache_kwargs),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      max_model_len=max_model_len, enable_chunked_prefill=enable_chunked_prefill),
            enforce_eager=enforce_eager,
        )
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def close(self) -> None:
        """Free the engine's KV cache, decode graphs and weights now; generate() raises
        afterwards. Safe to call more than once."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of `prompts`.
        A single prompt may be a string or one list of token ids."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling_params)} sampling params: give one, or one per prompt")
        order = {}
        for prompt, params in zip(prompts, sampling_params):
            rid = f"offline-{next(self._ids)}"
            self.engine.add_request(rid, prompt, params)
            order[rid] = len(order)
        results: list[RequestOutput | None] = [None] * len(order)
        while self.engine.has_unfinished_requests:
            for out in self.engine.step():
                if out.finished:
                    results[order[out.request_id]] = out
            if self.engine.idle:
                time.sleep(0.001)  # only waiting for KV from another node
        return results  # type: ignore[return-value]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(m, add_generation_prompt=True) for m in conversations]
        # Chat templates write the special tokens themselves.
        ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        return self.generate(ids, sampling_params)
