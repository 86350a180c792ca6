"""Whether filling grammar masks on a worker thread overlaps the engine's Python text work:
the pattern between two decode steps (fill the next masks on a worker while the engine's
thread does T ms of pure-Python work, then wait for them) against filling first on the
engine's thread, for 64 rows of structured_output_overhead.py's JSON schema.

    PYTHONPATH=. python bench/gpu/grammar_fill_gil.py

Runs on any machine with xgrammar and llguidance (no GPU needed). On the 2-core CPU of
2026-12-02 the worker never overlapped: it needs the GIL around the libraries' fill and
waits for it while the other thread runs Python (a fill of 0.5 ms took 333 ms beside a
spinning thread), so the engine fills on its own thread now (manager.apply_bitmask).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import threading
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
ROWS = 64


def python_work(ms: float) -> None:
    """Pure-Python work, as detokenizing and building outputs is."""
    start = time.perf_counter()
    while time.perf_counter() - start < ms / 1e3:
        sum(i for i in range(50))


def main() -> None:
    path = make_model(os.path.join(tempfile.mkdtemp(), "m"), "llama-3-8b", with_weights=False)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    manager = StructuredOutputManager(Tokenizer.from_pretrained(path), vocab)
    pool = ThreadPoolExecutor(1)
    out = {"rows": ROWS, "backends": {}}
    for backend in ("xgrammar", "guidance"):
        rids = [f"{backend}{i}" for i in range(ROWS)]
        for rid in rids:
            manager.add_request(rid, StructuredOutputsParams(json=SCHEMA, backend=backend), [])
        for _ in range(5):  # a few tokens into the schema
            logits = torch.randn(ROWS, vocab)
            manager.apply_bitmask(logits, rids)
            manager.accept_tokens(rids, logits.argmax(-1).tolist())
        plan = manager._plan(rids)
        t, fills = time.perf_counter(), 0
        while time.perf_counter() - t < 0.3:
            manager._fill(plan, vocab)
            fills += 1
        row = {"fill_ms": 300 / fills}
        # A worker filling over and over beside a thread that only runs Python.
        stop, beside = threading.Event(), [0]

        def worker():
            while not stop.is_set():
                manager._fill(plan, vocab)
                beside[0] += 1
        thread = threading.Thread(target=worker)
        thread.start()
        python_work(1000)
        stop.set()
        thread.join()
        row["fill_ms_beside_python"] = 1000 / max(beside[0], 1)
        for text_ms in (0.5, 1.5, 3.0):
            on_worker, first = [], []
            for _ in range(40):
                t = time.perf_counter()
                future = pool.submit(manager._fill, plan, vocab)
                python_work(text_ms)
                future.result()
                on_worker.append(time.perf_counter() - t)
                t = time.perf_counter()
                manager._fill(plan, vocab)
                python_work(text_ms)
                first.append(time.perf_counter() - t)
            row[f"text_{text_ms}_ms"] = {"fill_on_worker_ms": statistics.median(on_worker) * 1e3,
                                         "fill_first_ms": statistics.median(first) * 1e3}
        out["backends"][backend] = row
        print(f"{backend}: fill {row['fill_ms']:.2f} ms alone, {row['fill_ms_beside_python']:.1f} ms beside a "
              "Python thread; text work T then the masks: " + ", ".join(
                  f"T {k.split('_')[1]} ms: worker {v['fill_on_worker_ms']:.2f} / first {v['fill_first_ms']:.2f} ms"
                  for k, v in row.items() if k.startswith("text_")), flush=True)
        for rid in rids:
            manager.remove(rid)
    manager.close()
    pool.shutdown()
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "grammar_fill_gil.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
