"""The KV transfer's share of a request's latency, with and without dispatch to both nodes.

A 1P1D cluster (DEVICES=cuda:0,cuda:0 puts both nodes on one GPU, moving KV by CUDA IPC;
cuda:0,cuda:1 on two, by NIXL; CONNECTOR overrides) and one colocated node serve the same requests one at a time: 4k-token prompts (8B
shapes, bf16, dummy weights), 16 output tokens, prefill in chunks of CHUNK tokens. Per
mode it reports TTFT, the second token's latency, the median inter-token latency after
it, and

    transfer share = (second-token latency - median ITL) / TTFT

— how long the decode node waited for KV beyond a normal step, as a share of TTFT (the
issue's goal: <= 5% at 4k tokens). `serial` sends the decode job after the prefill's
answer (the whole transfer after the prefill); `both` dispatches to both nodes at once
(blocks move while later chunks compute). The decode node's own count of blocks read
early and its transfer tail come from /cluster.

    PYTHONPATH=. python bench/gpu/kv_stream_overlap.py [--out DIR]

Writes kv_stream_overlap.json into --out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

from bench.client import run_load
from bench.workloads import BenchRequest
from cluster.config import ClusterConfig
from cluster.launcher import LocalCluster
from engine.builtin_models import make_model

DEVICES = os.environ.get("DEVICES", "cuda:0,cuda:0").split(",")
PROMPT_LEN = int(os.environ.get("PROMPT_LEN", 4096))
CHUNK = int(os.environ.get("CHUNK", 1024))
REQUESTS = int(os.environ.get("REQUESTS", 12))
OUTPUT_LEN = 16
# UCX reads another process's memory on the same GPU by TCP emulation (0.47 GB/s): one GPU
# shared by both nodes uses CUDA IPC.
CONNECTOR = os.environ.get("CONNECTOR", "cuda_ipc" if DEVICES[0] == DEVICES[-1] != "cpu" else "nixl")


def cluster_config(model: str, dtype: str, load_format: str, topology: str, dispatch_to_both: bool) -> ClusterConfig:
    engine = {"block_size": 16, "max_model_len": PROMPT_LEN + 64, "max_num_batched_tokens": CHUNK,
              "max_num_seqs": 16, "memory_fraction": 0.4 if DEVICES[0] == DEVICES[-1] else 0.8}
    if DEVICES[0] == "cpu":
        engine = {**engine, "memory_fraction": 0.85, "cpu_kv_cache_gib": 1}
    roles = ({"prefill": {"replicas": 1, "devices": [DEVICES[0]]}, "decode": {"replicas": 1, "devices": [DEVICES[-1]]}}
             if topology == "1P1D" else {"prefill": {"replicas": 0}, "decode": {"replicas": 0},
                                         "colocated": {"replicas": 1, "devices": [DEVICES[0]]}})
    return ClusterConfig.model_validate({
        "model": {"path": model, "dtype": dtype, "load_format": load_format},
        "router": {"port": 0, "dispatch_to_both": dispatch_to_both}, "kv_transfer": {"connector": CONNECTOR},
        "engine": engine, **roles})


def measure(cfg: ClusterConfig, vocab: int, seed: int, name: str) -> dict:
    rng = random.Random(seed)
    # Distinct prompts (no prefix-cache help), sent one after another (no queueing).
    reqs = [BenchRequest(i, [rng.randrange(10, vocab) for _ in range(PROMPT_LEN)], OUTPUT_LEN,
                         after=i - 1 if i else None) for i in range(REQUESTS + 2)]
    log_dir = os.environ.get("LOG_DIR")  # node logs kept there (else a temporary run directory)
    with LocalCluster(cfg, run_dir=Path(log_dir) / name if log_dir else None) as cluster:
        run = asyncio.run(run_load(cluster.url, reqs))
        nodes = httpx.get(cluster.url + "/cluster", timeout=30).json()["nodes"]
    done = [r for r in run.results[2:] if r.ok]  # the first two warm up
    if not done:
        raise RuntimeError(f"no request succeeded: {[r.error for r in run.results]}")
    ttft = statistics.median(r.ttft_s for r in done)
    second = statistics.median(r.itl_s[0] for r in done)
    itl = statistics.median(x for r in done for x in r.itl_s[1:])
    decode = next((n for n in nodes if n["role"] == "decode"), None)
    kv = decode["kv_transfer"] if decode else {}
    return {"requests": len(done), "ttft_ms": 1e3 * ttft, "second_token_ms": 1e3 * second, "itl_ms": 1e3 * itl,
            "transfer_share_of_ttft": max(second - itl, 0.0) / ttft,
            "decode_kv": {k: kv.get(k) for k in ("loads", "streamed_loads", "stream_blocks_early", "blocks_loaded",
                                                 "bytes_loaded", "stream_tail_seconds", "load_seconds", "blocks_failed",
                                                 *(f"load_{p}_seconds" for p in ("handshake", "claim", "follow", "read",
                                                                                   "release", "verify")))}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--model", default="", help="a model directory (default: an 8B-shape one, dummy weights)")
    args = parser.parse_args()
    if args.model:
        model, dtype, load_format = args.model, "auto", "auto"
    elif DEVICES[0] == "cpu":
        model, dtype, load_format = "builtin:tiny", "float32", "auto"
    else:
        model = os.path.join(tempfile.mkdtemp(), "llama-3-8b")
        make_model(model, "llama-3-8b", with_weights=False)
        dtype, load_format = "bfloat16", "dummy"
    vocab = 200 if model.startswith("builtin:") else 2000  # what the built-in tokenizers cover
    results = {}
    modes = os.environ.get("MODES", "1P1D-both,1P1D-serial,colocated").split(",")
    for name, topology, both in (("1P1D-both", "1P1D", True), ("1P1D-serial", "1P1D", False),
                                 ("colocated", "colocated", False)):
        if name not in modes:
            continue
        results[name] = measure(cluster_config(model, dtype, load_format, topology, both), vocab, seed=1, name=name)
        r = results[name]
        print(f"{name:12s} TTFT {r['ttft_ms']:8.1f} ms  2nd token {r['second_token_ms']:7.1f} ms  ITL "
              f"{r['itl_ms']:6.1f} ms  transfer share of TTFT {100 * r['transfer_share_of_ttft']:5.1f}%  "
              f"decode kv {json.dumps(r['decode_kv'])}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"devices": DEVICES, "connector": CONNECTOR, "prompt_len": PROMPT_LEN, "chunk": CHUNK, "output_len": OUTPUT_LEN, "model": model}
    (out / "kv_stream_overlap.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
