"""cluster.yaml and the `pdcluster` command line, as the contract states them: the shipped
file is the built-in default, and a bad file is refused before anything starts, with one
line per problem naming the field and what is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cluster.config import ClusterConfig, ClusterConfigError, load_cluster_config, parse_topology

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ClusterConfigError) as e:
        load_cluster_config(path)
    assert str(e.value) == "\n".join(e.value.problems)
    return e.value.problems


def pdcluster(*args: str, cwd: Path = ROOT, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


# --- the shipped file ----------------------------------------------------------------
def test_shipped_cluster_yaml_is_the_builtin_default():
    config = load_cluster_config(ROOT / "cluster.yaml")
    assert config == ClusterConfig.default()
    assert config.model.path == "builtin:tiny" and config.model.dtype == "float32"
    assert config.kv_transfer.connector == "nixl" and config.backend == "local"
    assert [(n.role, n.index, n.device, n.kv_role) for n in config.node_specs()] == [
        ("prefill", 0, "cpu", "kv_producer"), ("decode", 0, "cpu", "kv_consumer")]


def test_commented_out_section_means_its_defaults(tmp_path):
    config = load_cluster_config(write(tmp_path, "router:\n  # port: 9000\nprefill:\n"))
    assert config == ClusterConfig.default()


def test_api_key_comes_from_the_environment_unless_given(tmp_path, monkeypatch):
    monkeypatch.setenv("PDCLUSTER_API_KEY", "from-env")
    assert ClusterConfig.default().router.api_key == "from-env"
    assert load_cluster_config(write(tmp_path, "router: {api_key: in-file}")).router.api_key == "in-file"
    monkeypatch.delenv("PDCLUSTER_API_KEY")
    assert ClusterConfig.default().router.api_key is None


# --- bad files: one line each, naming the field ---------------------------------------
BAD_FILES = [
    ("wrong_device", "prefill: {replicas: 1, devices: [gpu0]}",
     "prefill.devices: 'gpu0' is not a device: use cpu, auto or cuda:N"),
    ("devices_count_mismatch", "decode: {replicas: 3, devices: [cpu, cpu]}",
     "decode.devices: 2 devices for 3 replicas: give one device, one per replica, or more"),
    ("no_devices", "decode: {replicas: 1, devices: []}", "decode.devices: no devices: give one device"),
    ("no_devices_for_scale_ups", "colocated: {replicas: 0, devices: []}", "colocated.devices: no devices"),
    ("kv_block_sizes_differ", "prefill: {engine: {block_size: 32}}",
     "engine.block_size: the nodes that move KV between them need one block size, got prefill.engine.block_size "
     "32, decode.engine.block_size 16"),
    ("chunked_prefill_off_too_small", "engine: {max_model_len: 4096, enable_chunked_prefill: false}",
     "engine.max_num_batched_tokens: 2048 is below max_model_len 4096 with enable_chunked_prefill false"),
    ("chunked_prefill_off_in_one_role", "decode: {engine: {max_model_len: 4096, enable_chunked_prefill: false}}",
     "decode.engine.max_num_batched_tokens: 2048 is below max_model_len 4096"),
    ("unknown_key_suggests", "router: {polcy: round_robin}",
     "router.polcy: unknown key (did you mean 'policy'?); allowed keys: host, port, policy"),
    ("unknown_top_level_key", "prefil: {replicas: 1}", "prefil: unknown key (did you mean 'prefill'?); allowed keys: model"),
    ("unknown_engine_override", "decode: {engine: {blok_size: 16}}",
     "decode.engine.blok_size: unknown key (did you mean 'block_size'?)"),
    ("bad_policy", "router: {policy: random}",
     "router.policy: 'random' is not one of 'round_robin', 'least_loaded', 'prefix_aware'"),
    ("bad_connector", "kv_transfer: {connector: ucx}",
     "kv_transfer.connector: 'ucx' is not a connector: use nixl, tcp, cuda_ipc or a module:Class path"),
    ("bad_load_failure_policy", "kv_transfer: {load_failure_policy: retry}",
     "kv_transfer.load_failure_policy: 'retry' is not one of 'recompute', 'fail'"),
    ("bad_dtype", "model: {dtype: fp8}", "model.dtype: 'fp8' is not one of 'auto', 'float32'"),
    ("bad_generation_config", "model: {generation_config: hf}",
     "model.generation_config: 'hf' is not one of 'auto', 'vllm'"),
    ("negative_replicas", "decode: {replicas: -1}", "decode.replicas: input should be greater than or equal to 0"),
    ("replicas_not_a_number", "prefill: {replicas: two}", "prefill.replicas: input should be a valid integer"),
    ("prefill_without_decode", "decode: {replicas: 0}",
     "prefill.replicas: 1 prefill node(s) but no decode node: a prefill node cannot serve alone"),
    ("decode_without_prefill", "prefill: {replicas: 0}\ncolocated: {replicas: 1}",
     "decode.replicas: 1 decode node(s) but no prefill node"),
    ("no_serving_node", "prefill: {replicas: 0}\ndecode: {replicas: 0}", "prefill.replicas: no serving node"),
    ("port_out_of_range", "router: {port: 70000}", "router.port: input should be less than or equal to 65535"),
    ("router_port_among_node_ports", "nodes_base_port: 7999", "router.port: 8000 falls in the nodes' ports 7999..8002"),
    ("block_size_not_power_of_two", "engine: {block_size: 12}", "engine.block_size: 12 is not a power of two"),
    ("memory_fraction_above_one", "prefill: {engine: {memory_fraction: 1.5}}",
     "prefill.engine.memory_fraction: input should be less than or equal to 1"),
    ("model_dir_missing", "model: {path: /nonexistent/model}", "model.path: '/nonexistent/model' is not a directory"),
    ("section_not_a_mapping", "router: 8000", "router: expected a mapping of keys, not a number"),
    ("bad_backend", "backend: k8s", "backend: 'k8s' is not one of 'local', 'ray'"),
    ("empty_file", "", "the file is empty"),
    ("yaml_syntax_error", "router:\n  port: [8000\n", "not valid YAML: line 3"),
    ("top_level_not_a_mapping", "- prefill\n- decode\n", "the top level must be a mapping of keys (model, router,"),
    # PyYAML keeps the last of two equal keys, silently: the first section would be ignored.
    ("section_given_twice", "decode: {replicas: 2}\nprefill: {replicas: 1}\ndecode: {replicas: 1}\n",
     "not valid YAML: line 3, column 1: decode: given twice (first on line 1): merge them into one"),
    ("key_given_twice", "engine:\n  block_size: 16\n  block_size: 32\n",
     "not valid YAML: line 3, column 3: block_size: given twice (first on line 2)"),
]


@pytest.mark.parametrize("text, expected", [pytest.param(t, e, id=i) for i, t, e in BAD_FILES])
def test_bad_file_gets_one_line_naming_the_field(tmp_path, text, expected):
    path = write(tmp_path, text)
    problems = problems_of(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}: ") and expected in problems[0], problems[0]


def test_missing_file_is_named(tmp_path):
    assert problems_of(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: no such file"]


def test_every_problem_gets_its_own_line(tmp_path):
    path = write(tmp_path, """
        router: {policy: random, port: -1}
        decode: {replicas: 3, devices: [cuda:0, cuda:1]}
    """)
    lines = problems_of(path)
    assert [line.split(": ")[1] for line in lines] == ["router.port", "router.policy", "decode.devices"]


def test_model_generation_config_reaches_the_router_spec(tmp_path):
    from cluster.launcher import router_launch_spec

    assert ClusterConfig.default().model.generation_config == "auto"   # vLLM's default: the model's defaults apply
    config = load_cluster_config(write(tmp_path, "model: {path: builtin:tiny, generation_config: vllm}"))
    spec = router_launch_spec(config, 8000, tmp_path, [], 16)
    assert spec.generation_config == "vllm"
    assert router_launch_spec(ClusterConfig.default(), 8000, tmp_path, [], 16).generation_config == "auto"


def test_ray_backend_and_module_class_connector_are_accepted(tmp_path):
    config = load_cluster_config(write(tmp_path, "backend: ray\nkv_transfer: {connector: 'my_pkg.conn:MyConnector'}"))
    assert config.backend == "ray" and config.kv_transfer.connector == "my_pkg.conn:MyConnector"


# --- nodes ---------------------------------------------------------------------------
def test_node_specs_resolve_devices_ports_and_per_role_engine(tmp_path):
    config = load_cluster_config(write(tmp_path, """
        engine: {block_size: 32, num_blocks: 100}
        prefill: {replicas: 2, devices: [cuda:0, cuda:1], engine: {max_num_seqs: 8}}
        decode: {replicas: 2, devices: [cuda:2], engine: {num_blocks: null}}
        nodes_base_port: 9000
    """))
    nodes = config.node_specs()
    assert [(n.name, n.device, n.port, n.kv_port) for n in nodes] == [
        ("prefill-0", "cuda:0", 9000, 9001), ("prefill-1", "cuda:1", 9002, 9003),
        ("decode-0", "cuda:2", 9004, 9005), ("decode-1", "cuda:2", 9006, 9007)]
    prefill, decode = nodes[0].engine, nodes[2].engine
    assert (prefill.block_size, prefill.num_blocks, prefill.max_num_seqs) == (32, 100, 8)
    assert (decode.block_size, decode.num_blocks, decode.max_num_seqs) == (32, None, 64)


def test_auto_devices_take_gpus_round_robin_or_cpu():
    config = ClusterConfig.model_validate({"prefill": {"devices": ["auto"]}, "decode": {"replicas": 2, "devices": ["auto"]}})
    assert [n.device for n in config.node_specs(num_gpus=2)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert [n.device for n in config.node_specs(num_gpus=0)] == ["cpu", "cpu", "cpu"]


def test_nodes_sharing_a_gpu_split_its_kv_memory_unless_told_otherwise(tmp_path):
    """They start together and each sizes its KV cache from the memory free then: each
    taking the default 0.85 of it would leave the last to allocate out of memory."""
    def shared(text: str) -> dict[str, float]:
        config = load_cluster_config(write(tmp_path, "model: {path: builtin:tiny}\n" + text))
        return {s.name: round(s.engine.memory_fraction, 3) for s in config.share_gpus(config.node_specs(num_gpus=2))}

    assert shared("prefill: {devices: [cuda:0]}\ndecode: {replicas: 2, devices: [cuda:0, cuda:1]}") == {
        "prefill-0": 0.425, "decode-0": 0.425, "decode-1": 0.85}
    assert shared("prefill: {devices: [cuda:0], engine: {memory_fraction: 0.5}}\ndecode: {devices: [cuda:0]}") == {
        "prefill-0": 0.5, "decode-0": 0.35}
    assert shared("engine: {memory_fraction: 0.4}\nprefill: {devices: [cuda:0]}\ndecode: {devices: [cuda:0]}") == {
        "prefill-0": 0.4, "decode-0": 0.4}
    assert shared("engine: {num_blocks: 64}\nprefill: {devices: [cuda:0]}\ndecode: {devices: [cuda:0]}") == {
        "prefill-0": 0.85, "decode-0": 0.85}  # a fixed cache size: nothing to split
    with pytest.raises(ClusterConfigError, match=r"prefill-0 and decode-0 share cuda:0 .* \(0.85 \+ 0.85\) sum to "
                                                 r"more than 1: give fractions that sum to at most 1"):
        shared("engine: {memory_fraction: 0.85}\nprefill: {devices: [cuda:0]}\ndecode: {devices: [cuda:0]}")
    with pytest.raises(ClusterConfigError, match="leave too little of 0.85 for decode-0"):
        shared("prefill: {devices: [cuda:0], engine: {memory_fraction: 0.84}}\ndecode: {devices: [cuda:0]}")


def test_a_node_added_while_serving_takes_the_least_used_gpu():
    config = ClusterConfig.model_validate({"prefill": {"devices": ["auto"]}, "decode": {"devices": ["auto"]}})
    running = [s.device for s in config.node_specs(num_gpus=3)]  # cuda:0, cuda:1
    assert config.node_spec("decode", 1, num_gpus=3, busy=running).device == "cuda:2"
    assert config.node_spec("decode", 2, num_gpus=3, busy=running + ["cuda:2"]).device == "cuda:0"
    assert config.node_spec("decode", 1, num_gpus=0, busy=running).device == "cpu"
    assert config.node_spec("decode", 3, num_gpus=2).device == "cuda:1"  # nothing known: by index


def test_colocated_nodes_that_would_serve_nothing_are_named():
    def idle(**sections) -> str | None:
        return ClusterConfig.model_validate(sections).idle_colocated_nodes()

    assert "serve nothing while router.disaggregation.mode is unset" in idle(colocated={"replicas": 1})
    assert idle(colocated={"replicas": 1}, router={"disaggregation": {"mode": "conditional"}}) is None
    assert idle(prefill={"replicas": 0}, decode={"replicas": 0}, colocated={"replicas": 2}) is None
    assert idle() is None


def test_with_topology_reuses_the_device_pool_round_robin():
    config = ClusterConfig.model_validate({"prefill": {"devices": ["cuda:0"], "engine": {"max_num_seqs": 8}},
                                           "decode": {"devices": ["cuda:1"]}, "router": {"port": 9100}})

    def layout(p, d, c):
        return [(n.name, n.device) for n in config.with_topology(prefill=p, decode=d, colocated=c).node_specs()]

    assert layout(1, 1, 0) == [("prefill-0", "cuda:0"), ("decode-0", "cuda:1")]
    assert layout(2, 1, 0) == [("prefill-0", "cuda:0"), ("prefill-1", "cuda:1"), ("decode-0", "cuda:0")]
    assert layout(0, 0, 2) == [("both-0", "cuda:0"), ("both-1", "cuda:1")]
    derived = config.with_topology(prefill=2, decode=1)
    assert derived.router.port == 9100 and derived.node_specs()[0].engine.max_num_seqs == 8
    with pytest.raises(ClusterConfigError, match="no serving node"):
        config.with_topology(prefill=0, decode=0, colocated=0)


@pytest.mark.parametrize("name, expected", [("1P1D", (1, 1, 0)), ("2p1d", (2, 1, 0)), ("colocated2", (0, 0, 2))])
def test_parse_topology(name, expected):
    assert parse_topology(name) == expected


@pytest.mark.parametrize("name", ["1P", "P1D", "0P1D", "colocated0", "2x2"])
def test_parse_topology_rejects_what_cannot_serve(name):
    with pytest.raises(ValueError, match=name):
        parse_topology(name)


def test_kv_transfer_config_per_role():
    config = ClusterConfig.model_validate({"kv_transfer": {"connector": "tcp", "load_failure_policy": "fail",
                                                           "abort_timeout_s": 5, "extra": {"x": 1}},
                                           "colocated": {"replicas": 1}})
    prefill, decode, both = config.node_specs()
    kv = config.kv_transfer_config(prefill, engine_id="p0")
    assert (kv.kv_connector, kv.kv_role, kv.engine_id, kv.load_failure_policy, kv.abort_timeout_s,
            kv.kv_connector_extra_config) == ("tcp", "kv_producer", "p0", "fail", 5, {"x": 1})
    assert config.kv_transfer_config(decode).kv_role == "kv_consumer"
    assert config.kv_transfer_config(both) is None


# --- the command line ----------------------------------------------------------------
def test_up_with_a_bad_file_exits_2_and_starts_nothing(tmp_path):
    bad = write(tmp_path, "decode: {replicas: 3, devices: [cpu, cpu]}", name="bad.yaml")
    result = pdcluster("up", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"{bad}: decode.devices: 2 devices for 3 replicas: give one device, one per "
                                     "replica, or more (nodes added by `pdcluster scale` take the next ones)")
    # Nothing was started: neither the launcher nor torch was even imported.
    probe = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from cluster.cli import main
        rc = main(["up", {str(bad)!r}])
        print(rc, sorted(m for m in sys.modules if m in ("torch", "cluster.launcher")))
    """)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "2 []", probe.stderr


def test_up_with_a_missing_file_exits_2(tmp_path):
    result = pdcluster("up", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and result.stderr.strip() == f"{tmp_path / 'missing.yaml'}: no such file"


def test_help_and_bad_arguments_do_not_import_torch():
    probe = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys
        from cluster.cli import main
        for argv in (["--help"], ["bench", "cluster.yaml", "--topologies", "3X"]):
            try:
                main(argv)
            except SystemExit as e:
                print(e.code, end=" ")
        print("torch" in sys.modules)
    """)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip().endswith("0 2 False"), probe.stdout + probe.stderr
    assert "topology '3X'" in probe.stderr


def test_make_model_writes_a_checkpoint(tmp_path):
    out = tmp_path / "tiny"
    result = pdcluster("make-model", str(out), "--preset", "tiny")
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    again = pdcluster("make-model", str(out), "--preset", "tiny")
    assert again.returncode == 1 and "already holds a model" in again.stderr


def test_generate_prints_a_completion():
    result = pdcluster("generate", "--model", "builtin:tiny", "--max-tokens", "4", "Hello")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("Hello") and len(result.stdout.strip()) > len("Hello")
    as_json = pdcluster("generate", "--model", "builtin:tiny", "--max-tokens", "4", "--json", "Hello", "Numbers:")
    outputs = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [o["prompt"] for o in outputs] == ["Hello", "Numbers:"]
    assert all(1 <= len(o["token_ids"]) <= 4 for o in outputs)
    assert result.stdout == outputs[0]["prompt"] + outputs[0]["text"] + "\n"


def test_nixl_nodes_sharing_a_gpu_are_named_for_the_launchers_warning(tmp_path):
    shared = "prefill: {devices: [cuda:0]}\ndecode: {devices: [cuda:0]}\n"
    config = load_cluster_config(write(tmp_path, shared))
    assert config.kv_nodes_sharing_a_gpu(config.node_specs()) == "prefill-0 and decode-0 share cuda:0"
    for other in ("kv_transfer: {connector: cuda_ipc}\n" + shared, "prefill: {devices: [cuda:0]}\ndecode: {devices: [cuda:1]}\n",
                  "prefill: {devices: [cpu]}\ndecode: {devices: [cpu]}\n"):
        config = load_cluster_config(write(tmp_path, other))
        assert config.kv_nodes_sharing_a_gpu(config.node_specs()) is None, other
