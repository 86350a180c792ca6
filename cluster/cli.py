"""The `pdcluster` command line: up, down, status, scale, bench, plan, make-model, generate.

Each subcommand's work lives elsewhere (cluster.launcher, cluster.status, bench.cli,
engine.builtin_models, engine.LLM), imported only when that subcommand runs: `--help`
and a bad cluster.yaml answer without importing torch.

Exit codes: 0 success, 1 the command ran and failed, 2 bad usage or a bad cluster.yaml
(nothing was started).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from cluster.config import ClusterConfig, ClusterConfigError, load_cluster_config, parse_topology

DEFAULT_CLUSTER_YAML = "cluster.yaml"
DEFAULT_URL = "http://127.0.0.1:8000"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    return args.run(args)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdcluster", description="A disaggregated prefill/decode LLM serving cluster.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start the cluster, wait until healthy, print the URL; Ctrl-C stops it")
    up.add_argument("cluster_yaml", nargs="?", metavar="CLUSTER_YAML",
                    help=f"the cluster description (default: ./{DEFAULT_CLUSTER_YAML} if present, else the built-in default)")
    up.add_argument("--detach", action="store_true",
                    help="return once the cluster is healthy and keep it running in the background "
                         "(`pdcluster down` stops it)")
    up.set_defaults(run=_up)

    down = sub.add_parser("down", help="stop a cluster started with `pdcluster up --detach`")
    down.add_argument("--url", default=None, help="which one, when several run (default: the only one)")
    down.set_defaults(run=_down)

    scale = sub.add_parser("scale", help="change the topology while serving, e.g. prefill=1 decode=2; "
                                         "leaving nodes drain first")
    scale.add_argument("targets", nargs="+", metavar="ROLE=N", help="prefill=N, decode=M, colocated=K")
    scale.add_argument("--url", default=DEFAULT_URL, help=f"the router (default: {DEFAULT_URL})")
    scale.add_argument("--no-wait", dest="wait", action="store_false",
                       help="return once the router accepted the change, without waiting for it")
    scale.add_argument("--timeout", type=float, default=300.0, metavar="S", help="how long to wait (default 300)")
    scale.set_defaults(run=_scale)

    status = sub.add_parser("status", help="the running cluster's topology and health, as a table")
    status.add_argument("--url", default=DEFAULT_URL, help=f"the router (default: {DEFAULT_URL})")
    status.set_defaults(run=_status)

    bench = sub.add_parser("bench", help="benchmark topologies (1P1D, xPyD, colocatedN) on the same hardware")
    bench.add_argument("cluster_yaml", nargs="?", metavar="CLUSTER_YAML",
                       help="the cluster each topology is derived from")
    bench.add_argument("--topologies", default=None, type=_topologies, metavar="LIST",
                       help="comma-separated, e.g. 1P1D,2P1D,colocated2; @MODE sets router.disaggregation.mode, "
                            "e.g. colocated2@conditional")
    bench.add_argument("--workload", default=None, metavar="NAME",
                       help="fixed | random-uniform | random-lognormal | sharegpt | prefix-agents")
    bench.add_argument("--num-requests", type=int, default=None, metavar="N")
    load = bench.add_mutually_exclusive_group()
    load.add_argument("--request-rate", type=float, default=None, metavar="R", help="requests per second (Poisson)")
    load.add_argument("--concurrency", type=int, default=None, metavar="C", help="requests in flight at once")
    bench.add_argument("--out", default="bench-out", metavar="DIR", help="where summary.json, report.md and plots go")
    bench.add_argument("--url", default=None, help="drive this already running router instead of starting topologies")
    if _subcommand(argv) == "bench":  # the harness's own options; it imports matplotlib
        from bench.cli import add_bench_arguments
        add_bench_arguments(bench)
    bench.set_defaults(run=_bench)

    plan = sub.add_parser("plan", help="per node: KV blocks that fit, the longest context, concurrent requests "
                                       "with and without prefix sharing")
    plan.add_argument("cluster_yaml", nargs="?", metavar="CLUSTER_YAML",
                      help=f"the cluster description (default: ./{DEFAULT_CLUSTER_YAML} if present, else the built-in default)")
    plan.add_argument("--prefix-hit-rate", type=_share, default=None, metavar="R",
                      help="expected share of prompt tokens served from the prefix cache (default: the workload's ideal)")
    plan.add_argument("--workload", default="fixed", metavar="NAME",
                      help="fixed | random-uniform | random-lognormal | sharegpt | prefix-agents (default fixed)")
    plan.add_argument("--input-len", type=int, default=None, metavar="N", help="fixed / random-*: prompt tokens")
    plan.add_argument("--output-len", type=int, default=None, metavar="N", help="output tokens")
    plan.add_argument("--gpu-memory-gib", type=float, default=None, metavar="G",
                      help="free memory of each GPU, for planning on a machine that does not see the GPUs")
    plan.set_defaults(run=_plan)

    make_model = sub.add_parser("make-model", help="write a random-initialised Hugging Face checkpoint")
    make_model.set_defaults(run=_make_model)
    if _subcommand(argv) == "make-model":  # its arguments come from the engine, which imports torch
        from engine.builtin_models import add_make_model_arguments
        add_make_model_arguments(make_model)

    gen = sub.add_parser("generate", help="offline completions with the engine, no cluster")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument("--model", default="builtin:tiny", help="builtin:NAME or a Hugging Face directory")
    gen.add_argument("--max-tokens", type=int, default=16, metavar="N")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default="auto", help="auto | cpu | cuda:N")
    gen.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    gen.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt instead of plain text")
    gen.set_defaults(run=_generate)
    return parser


def _subcommand(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _share(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number: give a share in [0, 1], e.g. 0.5") from None
    if not 0 <= rate <= 1:
        raise argparse.ArgumentTypeError(f"{rate} is not in [0, 1]: give a share, e.g. 0.5 for half the prompt tokens")
    return rate


def _topologies(value: str) -> list[str]:
    names = [t.strip() for t in value.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no topology given: e.g. 1P1D,2P1D,colocated2")
    for name in names:
        try:
            parse_topology(name)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return names


def _load(path: str | None) -> ClusterConfig | None:
    """The checked cluster.yaml, the built-in default for None, or None after printing
    every problem (the caller returns 2)."""
    if path is None:
        return ClusterConfig.default()
    try:
        return load_cluster_config(path)
    except ClusterConfigError as e:
        print(e, file=sys.stderr)
        return None


def _entry_point(module: str, name: str, command: str) -> Any:
    """`module.name`, or None after saying in one line why `pdcluster COMMAND` cannot run."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        print(f"pdcluster {command}: cannot load {module}.{name}: {e}", file=sys.stderr)
        return None


def _up(args: argparse.Namespace) -> int:
    path = args.cluster_yaml
    if path is None and Path(DEFAULT_CLUSTER_YAML).is_file():
        path = DEFAULT_CLUSTER_YAML
    if _load(path) is None:
        return 2
    if args.detach:
        run_detached = _entry_point("cluster.detach", "run_detached", "up")
        return 2 if run_detached is None else run_detached(path)
    run_up = _entry_point("cluster.launcher", "run_up", "up")
    return 2 if run_up is None else run_up(path)


def _down(args: argparse.Namespace) -> int:
    run_down = _entry_point("cluster.detach", "run_down", "down")
    return 2 if run_down is None else run_down(args.url)


def _scale(args: argparse.Namespace) -> int:
    run_scale = _entry_point("cluster.scale", "run_scale", "scale")
    return 2 if run_scale is None else run_scale(args.url, args.targets, args.wait, args.timeout)


def _status(args: argparse.Namespace) -> int:
    run_status = _entry_point("cluster.status", "run_status", "status")
    return 2 if run_status is None else run_status(args.url)


def _bench(args: argparse.Namespace) -> int:
    args.cluster_config = None
    if not getattr(args, "compare", None):
        if not args.url and not (args.cluster_yaml and args.topologies):
            print("pdcluster bench: give CLUSTER_YAML and --topologies, or --url, or --compare", file=sys.stderr)
            return 2
        if args.cluster_yaml:
            args.cluster_config = _load(args.cluster_yaml)
            if args.cluster_config is None:
                return 2
    run_bench = _entry_point("bench.cli", "run_bench", "bench")
    return 2 if run_bench is None else run_bench(args)


def _plan(args: argparse.Namespace) -> int:
    path = args.cluster_yaml
    if path is None and Path(DEFAULT_CLUSTER_YAML).is_file():
        path = DEFAULT_CLUSTER_YAML
    config = _load(path)
    if config is None:
        return 2
    from bench.workloads import WORKLOADS
    if args.workload not in WORKLOADS:
        print(f"pdcluster plan: --workload {args.workload!r}: choose one of {', '.join(WORKLOADS)}", file=sys.stderr)
        return 2
    run_plan = _entry_point("bench.plan", "run_plan", "plan")
    if run_plan is None:
        return 2
    try:
        return run_plan(config, args.workload, args.prefix_hit_rate, args.gpu_memory_gib, args.input_len,
                        args.output_len)
    except (FileNotFoundError, ValueError) as e:
        print(f"pdcluster plan: {e}", file=sys.stderr)
        return 1


def _make_model(args: argparse.Namespace) -> int:
    from engine.builtin_models import make_model_command
    try:
        return make_model_command(args)
    except (FileExistsError, ValueError) as e:
        print(f"pdcluster make-model: {e}", file=sys.stderr)
        return 1


def _generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams
    llm = LLM(model=args.model, dtype=args.dtype, device=args.device, load_format=args.load_format)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    for prompt, out in zip(args.prompts, llm.generate(args.prompts, params)):
        completion = out.outputs[0]
        if args.json:
            print(json.dumps({"prompt": prompt, "text": completion.text, "token_ids": completion.token_ids,
                              "finish_reason": completion.finish_reason}))
        else:
            print(prompt + completion.text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
