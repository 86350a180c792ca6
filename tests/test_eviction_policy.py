"""Workflow-aware eviction against plain LRU on the prefix-agents workload, replayed
through real offline engines (bench/eviction.py)."""

from __future__ import annotations

from bench.eviction import compare
from bench.workloads import WorkloadOptions, make_workload


def _agents(background_share: float) -> list:
    opts = WorkloadOptions(num_requests=24, num_agents=4, num_system_prompts=2, system_prompt_len=64, turn_len=16,
                           output_len=2, background_share=background_share, vocab_size=512, max_model_len=512)
    return make_workload("prefix-agents", opts)


def test_workflow_eviction_hits_at_least_as_often_as_lru_on_prefix_agents(checkpoints):
    model = str(checkpoints["tiny"])
    lru, workflow = compare(model, _agents(0.0), num_blocks=32, concurrency=2)
    assert (lru.policy, workflow.policy) == ("lru", "workflow")
    assert workflow.hit_rate >= lru.hit_rate > 0.5
    # Next to other traffic, LRU lets one-off prompts push out the agents' contexts between
    # their turns; workflow-aware eviction evicts the one-off blocks first.
    lru, workflow = compare(model, _agents(0.5), num_blocks=32, concurrency=2)
    assert workflow.hit_rate > lru.hit_rate + 0.05
    assert workflow.query_tokens == lru.query_tokens and lru.evictions > 0
