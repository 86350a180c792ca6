"""Whether xgrammar accepts tokens faster from several threads (it does when accept_token
releases the GIL): 64 matchers of structured_output_overhead.py's JSON schema advance
through the same 40 tokens each, one thread or a pool.

    PYTHONPATH=. python bench/gpu/grammar_accept.py

Why it matters: the engine advances every grammar row's matcher between two decode
steps, on the host, and at batch 64 that took 2-4 ms of a 5.3 ms step
(bench/results/2026-12-01h-h200). Runs on any machine with xgrammar (no GPU needed).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from engine.builtin_models import make_model
from engine.sampling_params import StructuredOutputsParams
from engine.structured_output.manager import StructuredOutputManager
from engine.tokenizer import Tokenizer

SCHEMA = {"type": "array", "minItems": 64,
          "items": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                    "required": ["name", "age"]}}
ROWS, STEPS = 64, 40


def token_paths(compiled, vocab: int) -> list[list[int]]:
    """Per row, STEPS tokens its grammar allows: the argmax of masked random logits."""
    import xgrammar as xgr
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(ROWS)]
    bitmask = xgr.allocate_token_bitmask(ROWS, vocab)
    g = torch.Generator().manual_seed(0)
    paths: list[list[int]] = [[] for _ in range(ROWS)]
    for _ in range(STEPS):
        logits = torch.randn(ROWS, vocab, generator=g)
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        for i, (m, t) in enumerate(zip(matchers, logits.argmax(dim=-1).tolist())):
            assert m.accept_token(t)
            paths[i].append(t)
    return paths


def accept_ms(compiled, paths: list[list[int]], threads: int) -> float:
    """Median ms to advance all ROWS matchers by one token, from `threads` threads."""
    import xgrammar as xgr
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(ROWS)]
    share = -(-ROWS // threads)

    def advance(ms, tokens):
        return [m.accept_token(t) for m, t in zip(ms, tokens)]

    times = []
    with ThreadPoolExecutor(threads) as pool:
        for step in range(STEPS):
            tokens = [p[step] for p in paths]
            t = time.perf_counter()
            parts = [pool.submit(advance, matchers[i:i + share], tokens[i:i + share]) for i in range(0, ROWS, share)]
            ok = [v for part in parts for v in part.result()]
            times.append(time.perf_counter() - t)
            assert all(ok)
    return statistics.median(times) * 1e3


def main() -> None:
    path = make_model(os.path.join(tempfile.mkdtemp(), "m"), "llama-3-8b", with_weights=False)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    manager = StructuredOutputManager(Tokenizer.from_pretrained(path), vocab)
    compiled = manager.compile(StructuredOutputsParams(json=SCHEMA, backend="xgrammar"))[1]
    paths = token_paths(compiled, vocab)
    for threads in (1, 2, 4, 8, 1, 8):
        print(f"threads {threads} accept ms per step of {ROWS}: {accept_ms(compiled, paths, threads):.3f}", flush=True)


if __name__ == "__main__":
    main()
