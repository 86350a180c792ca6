"""What a node's serving loop adds to the engine's decode step: the same batch decoded by
the engine alone, and by a node (engine/node_server.py) that a client drives over its
ZeroMQ socket as the router does.

    PYTHONPATH=. python bench/gpu/node_overhead.py [--device cuda:0] [--batch-sizes 16,64,128]

Per batch size: the engine's median decode step (windows of 8 steps), the node's (the
median gap between two messages that each carry an update for every request: one per
step), their ratio, and the same for a node that sends one message per request update
(how nodes sent them before UpdateBatch) as the baseline beside it. `--preset tiny
--device cpu` checks the script here. Writes $OUT/node_overhead.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import threading
import time

import torch
import zmq

from engine import SamplingParams
from engine import node_protocol as proto
from engine.builtin_models import make_model
from engine.config import EngineConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.node_server import NodeServer

PROMPT_LEN = 128


class PerUpdateNode(NodeServer):
    """The baseline: one message per request update, as nodes sent them before."""

    def _step(self) -> None:
        for out in self.engine.step():
            self._send(out)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _prompts(bs: int, vocab: int) -> list[list[int]]:
    return [[(b * 104729 + j * 7) % vocab + 10 for j in range(PROMPT_LEN)] for b in range(bs)]


def engine_step_ms(config: EngineConfig, bs: int, steps: int) -> float:
    eng = LLMEngine(config)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=steps + 64, ignore_eos=True)
        for i, p in enumerate(_prompts(bs, eng.model_config.vocab_size - 20)):
            eng.add_request(f"e{i}", p, params)
        while eng.scheduler.waiting or any(len(r.output_token_ids) < 4 for r in eng.scheduler.running):
            eng.step()
        times = []
        for _ in range(max(1, steps // 8)):
            _sync()
            t = time.perf_counter()
            for _ in range(8):
                eng.step()
            _sync()
            times.append((time.perf_counter() - t) / 8)
        return statistics.median(times) * 1e3
    finally:
        eng.close()


def node_step_ms(node_class: type[NodeServer], config: EngineConfig, bs: int, steps: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = node_class("n0", "both", config, "127.0.0.1", port)
    loop = threading.Thread(target=node.serve_forever, kwargs={"handle_signals": False}, daemon=True)
    loop.start()
    ctx = zmq.Context()
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    try:
        client.connect(node.address)
        params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True).to_dict()
        for i, p in enumerate(_prompts(bs, node.engine.model_config.vocab_size - 20)):
            client.send(proto.encode(proto.SubmitRequest(f"n{i}", p, params)))
        finished, messages, full_steps = 0, 0, []  # arrival times of messages covering every request
        per_step: dict[int, set[str]] = {}
        while finished < bs:
            if not client.poll(120_000):
                raise RuntimeError("the node stopped answering")
            payload = client.recv()
            now = time.perf_counter()
            messages += 1
            for u in proto.updates_in(proto.decode_from_node(payload)):
                finished += u.finished
                if 4 <= u.num_output_tokens <= steps + 4:  # decoding, past the first steps
                    per_step.setdefault(u.num_output_tokens, set()).add(u.request_id)
                    if len(per_step[u.num_output_tokens]) == bs:
                        full_steps.append(now)  # the step's last update arrived
        gaps = [b - a for a, b in zip(full_steps, full_steps[1:])]
        return {"step_ms": statistics.median(gaps) * 1e3, "messages": messages, "steps_timed": len(gaps)}
    finally:
        node.request_stop()
        loop.join(120)
        client.close()
        ctx.term()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--preset", default="llama-3-8b")
    ap.add_argument("--batch-sizes", default="16,64,128")
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    path = os.path.join(tempfile.mkdtemp(), args.preset)
    make_model(path, args.preset, with_weights=False)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    config = EngineConfig(model=path, load_format="dummy", device=args.device,
                          dtype="bfloat16" if args.device.startswith("cuda") else "float32",
                          scheduler=SchedulerConfig(max_num_seqs=max(sizes)))
    result = {"device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu",
              "preset": args.preset, "steps": args.steps, "rows": []}
    for bs in sizes:
        engine_ms = engine_step_ms(config, bs, args.steps)
        batched = node_step_ms(NodeServer, config, bs, args.steps)
        per_update = node_step_ms(PerUpdateNode, config, bs, args.steps)
        row = {"batch": bs, "engine_step_ms": engine_ms, "node_step_ms": batched["step_ms"],
               "node_over_engine": batched["step_ms"] / engine_ms, "node_messages": batched["messages"],
               "per_update_node_step_ms": per_update["step_ms"],
               "per_update_over_engine": per_update["step_ms"] / engine_ms,
               "per_update_messages": per_update["messages"]}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    print("\nbatch  engine ms  node ms (x engine)  per-update node ms (x engine)  messages batched/per-update")
    for r in result["rows"]:
        print(f"{r['batch']:>5}  {r['engine_step_ms']:9.2f}  {r['node_step_ms']:7.2f} ({r['node_over_engine']:.2f})"
              f"  {r['per_update_node_step_ms']:18.2f} ({r['per_update_over_engine']:.2f})"
              f"  {r['node_messages']}/{r['per_update_messages']}")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "node_overhead.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
