"""`pdcluster plan`: the figures are the engine's own, sharing is reckoned as written in
bench/plan.py, and a max_model_len that cannot fit is refused by the plan and by the
engine, both naming the largest length that fits."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from cluster.config import ClusterConfig
from bench.plan import GIB, WorkloadShape, plan_node, weight_bytes
from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, parse_dtype
from engine.llm_engine import LLMEngine


def _config(checkpoint, **engine) -> ClusterConfig:
    return ClusterConfig.model_validate({
        "model": {"path": str(checkpoint), "dtype": "float32"},
        "engine": {"block_size": 16, **engine},
        "prefill": {"replicas": 0}, "decode": {"replicas": 0}, "colocated": {"replicas": 1, "devices": ["cpu"]}})


def test_plan_gives_the_engines_own_block_count_on_cpu(checkpoints):
    config = _config(checkpoints["tiny"], cpu_kv_cache_gib=0.003)
    model = ModelConfig.from_path(checkpoints["tiny"])
    shape = WorkloadShape("fixed", 100, 20, 0.0, 1)
    plan = plan_node(config.node_specs()[0], model, parse_dtype("float32"), shape, 0.0)
    engine = LLMEngine(EngineConfig(model=str(checkpoints["tiny"]), dtype="float32", device="cpu",
                                    cache=CacheConfig(block_size=16, cpu_kv_cache_gib=0.003)))
    try:
        assert plan.num_blocks == engine.kv_spec.num_blocks and plan.block_bytes == engine.kv_spec.block_bytes
        assert plan.max_len_that_fits == plan.num_blocks * 16 == engine.max_model_len  # lowered to what fits
        assert plan.warnings and not plan.problems
        assert plan.concurrent_without_sharing == plan.num_blocks // 8  # 120 tokens: 8 blocks a request
    finally:
        engine.close()


def _gpu_config(checkpoint, **engine) -> ClusterConfig:
    return ClusterConfig.model_validate({
        "model": {"path": str(checkpoint), "dtype": "float32"}, "engine": {"block_size": 16, **engine},
        "prefill": {"replicas": 0}, "decode": {"replicas": 0}, "colocated": {"replicas": 1, "devices": ["cuda:0"]}})


def _engine_budget(model: ModelConfig, free_bytes: int, monkeypatch, **engine) -> int:
    """What LLMEngine._kv_budget_bytes gives a GPU with `free_bytes` free after its weights."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free_bytes, free_bytes))
    config = EngineConfig(model="unused", device="cuda:0", cache=CacheConfig(memory_fraction=0.85),
                          scheduler=SchedulerConfig(max_num_seqs=engine["max_num_seqs"]),
                          enforce_eager=engine["enforce_eager"])
    fake = type("Engine", (), {"config": config, "device": torch.device("cuda:0"), "model_config": model})()
    return LLMEngine._kv_budget_bytes(fake)


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_plan_holds_back_what_the_engine_does_on_a_gpu_cuda_graphs_included(checkpoints, monkeypatch,
                                                                             enforce_eager):
    model = ModelConfig.from_path(checkpoints["tiny"])
    dtype = parse_dtype("float32")
    engine = {"max_num_seqs": 256, "enforce_eager": enforce_eager}
    spec = _gpu_config(checkpoints["tiny"], memory_fraction=0.85, **engine).node_specs()[0]
    plan = plan_node(spec, model, dtype, WorkloadShape("fixed", 100, 20, 0.0, 1), 0.0, gpu_memory_gib=80)
    budget = _engine_budget(model, 80 * GIB - weight_bytes(model, dtype.itemsize), monkeypatch, **engine)
    assert plan.num_blocks == budget // plan.block_bytes
    graphs = 256 * (model.vocab_size * 4 * 6 + model.intermediate_size * 2 * 8 + model.hidden_size * 2 * 16) \
        + 256 * 2**20                     # engine/kv_cache.py: the decode CUDA graphs' pool
    eager = int((80 * GIB - weight_bytes(model, dtype.itemsize)) * 0.85) - 2 * GIB
    assert budget == eager - (0 if enforce_eager else graphs)


def test_prefix_sharing_holds_each_shared_prefix_once(checkpoints):
    spec = _config(checkpoints["tiny"], num_blocks=100).node_specs()[0]
    model = ModelConfig.from_path(checkpoints["tiny"])
    shape = WorkloadShape("prefix-agents", 160, 16, 0.9, 1)  # 11 blocks a request
    plan = plan_node(spec, model, parse_dtype("float32"), shape, 0.5)
    assert plan.concurrent_without_sharing == 9
    assert plan.concurrent_with_sharing == (100 - 5) // (11 - 5)  # 5 shared blocks held once


def test_a_max_model_len_that_cannot_fit_is_refused_naming_the_largest_that_fits(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="max_model_len 1000 does not fit.*Set max_model_len to 128 or less"):
        LLMEngine(EngineConfig(model=str(checkpoints["tiny"]), dtype="float32", device="cpu",
                               cache=CacheConfig(block_size=16, num_blocks=8),
                               scheduler=SchedulerConfig(max_model_len=1000)))
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"path": str(checkpoints["tiny"]), "dtype": "float32"},
        "engine": {"block_size": 16, "num_blocks": 8, "max_model_len": 1000},
        "prefill": {"replicas": 0}, "decode": {"replicas": 0}, "colocated": {"replicas": 1, "devices": ["cpu"]}}))
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "plan", str(path), "--workload", "prefix-agents",
                          "--prefix-hit-rate", "0.5"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert "error: both-0: max_model_len 1000 cannot fit" in out.stdout and "128 or less" in out.stdout
    assert "with 50% prefix hits" in out.stdout
