"""Eviction policies compared on one offline engine: the same workload replayed through
an engine per policy, the prefix-cache hit rate of each.

    python -m bench.eviction --workload prefix-agents --background-share 0.5

The replay keeps `concurrency` requests in the engine and honours each request's
`after` (an agent's next turn waits for its previous one), as the bench client does
against a cluster; it runs in-process, so what differs between the policies is only the
eviction order. The cache is made small (`num_blocks`) so that eviction happens at all.
"""

from __future__ import annotations

import argparse
import sys
from collections import deque
from dataclasses import dataclass

from bench.workloads import WORKLOADS, BenchRequest, WorkloadOptions, make_workload


@dataclass(slots=True)
class EvictionResult:
    policy: str
    hit_rate: float        # prompt tokens served from the prefix cache / prompt tokens
    hit_tokens: int
    query_tokens: int
    evictions: int
    protected_evictions: int


def replay(engine, requests: list[BenchRequest], concurrency: int = 4) -> None:
    """Run every request through `engine` (an LLMEngine), `concurrency` at a time."""
    from engine import SamplingParams

    pending = deque(requests)
    done: set[int] = set()
    running: dict[str, int] = {}
    while pending or running:
        while pending and len(running) < concurrency:
            ready = next((r for r in pending if r.after is None or r.after in done), None)
            if ready is None:
                break
            pending.remove(ready)
            rid = f"req-{ready.index}"
            engine.add_request(rid, ready.prompt_ids, SamplingParams(temperature=0.0, max_tokens=ready.max_tokens,
                                                                     ignore_eos=True),
                               workflow_id=ready.workflow_id, agent_id=ready.agent_id)
            running[rid] = ready.index
        for out in engine.step():
            if out.finished:
                done.add(running.pop(out.request_id))


def compare(model: str, requests: list[BenchRequest], num_blocks: int, block_size: int = 16,
            concurrency: int = 4, policies: tuple[str, ...] = ("lru", "workflow")) -> list[EvictionResult]:
    from engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from engine.llm_engine import LLMEngine

    results = []
    for policy in policies:
        engine = LLMEngine(EngineConfig(model=model, dtype="float32", device="cpu",
                                        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                                                          eviction_policy=policy),
                                        scheduler=SchedulerConfig(max_num_seqs=concurrency,
                                                                  max_model_len=num_blocks * block_size)))
        try:
            replay(engine, requests, concurrency)
            s = engine.pool.stats
            results.append(EvictionResult(policy, s.hit_tokens / max(s.query_tokens, 1), s.hit_tokens,
                                          s.query_tokens, s.evictions, s.protected_evictions))
        finally:
            engine.close()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.eviction", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:tiny")
    p.add_argument("--workload", default="prefix-agents", choices=WORKLOADS)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--num-agents", type=int, default=4)
    p.add_argument("--num-system-prompts", type=int, default=2)
    p.add_argument("--system-prompt-len", type=int, default=128)
    p.add_argument("--turn-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=8)
    p.add_argument("--background-share", type=float, default=0.5)
    p.add_argument("--num-blocks", type=int, default=64, help="KV blocks of the engine (small: eviction must happen)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from engine.builtin_models import resolve_builtin
    from engine.config import ModelConfig

    model = str(resolve_builtin(a.model.removeprefix("builtin:"))) if a.model.startswith("builtin:") else a.model
    opts = WorkloadOptions(num_requests=a.num_requests, num_agents=a.num_agents,
                           num_system_prompts=a.num_system_prompts, system_prompt_len=a.system_prompt_len,
                           turn_len=a.turn_len, output_len=a.output_len, background_share=a.background_share,
                           seed=a.seed, vocab_size=ModelConfig.from_path(model).vocab_size,
                           max_model_len=a.num_blocks * a.block_size // 2)
    results = compare(model, make_workload(a.workload, opts), a.num_blocks, a.block_size, a.concurrency)
    print("| Eviction policy | Prefix hit (tokens) | Evictions | of active workflows |")
    print("|---|--:|--:|--:|")
    for r in results:
        print(f"| {r.policy} | {100 * r.hit_rate:.1f}% ({r.hit_tokens}/{r.query_tokens}) | {r.evictions} | "
              f"{r.protected_evictions} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
