"""`pdcluster bench`: run each topology on the same hardware and compare them.

    run_bench(args) -> exit code

For each topology name (1P1D, 2P1D, colocated2, ...): derive the cluster from the file
(`ClusterConfig.with_topology`: same devices, split differently), start it as local
processes on free ports (logs in OUT/logs/<topology>/), warm it up with a few requests
of the workload's shape, run the workload at each load (every rate of the sweep, or the
closed-loop concurrency), scrape the router's /metrics around each load and sample
/cluster during it, stop it. With `--url`, drive that running router instead, as the
single topology "external". Then write OUT/<topology>-<load>.json, OUT/summary.json,
OUT/report.md and the plots (bench/report.py), and print the verdict, the P:D advisor's
line per workload (bench/advisor.py; `--advisor-gpus N` for another GPU count) and the
table.

Every load point of a topology gets the same request lengths; each gets its own token
ids (`salt`), so a later rate does not find an earlier rate's prompts in the prefix
cache. Every topology gets the same requests as the others.

`args` comes from cluster/cli.py's bench subparser. The options beyond the contract's
(--ttft-slo-ms, --input-len, --request-rates, ...) are read with getattr and a default,
so this works with any version of that parser; `BENCH_DEFAULTS` lists them and
`add_bench_arguments(parser)` adds them to a parser. `python -m bench.cli` is the same
command with every option, for when cluster/cli.py does not have them yet.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench import advisor, report
from bench.client import RequestResult, run_load
from bench.metrics import DEFAULT_TPOT_SLO_MS, DEFAULT_TTFT_SLO_MS, SLO, summarize
from bench.workloads import WORKLOADS, BenchRequest, WorkloadOptions, make_workload, parse_rates, with_poisson_arrivals
from cluster.config import ClusterConfig, parse_topology, topology_mode

EXTERNAL = "external"
WARMUP_SALT = 1_000_003      # token ids of warm-up requests: never the measured ones

# Optional attributes of `args` and their defaults (None: derived, see BenchPlan.from_args).
BENCH_DEFAULTS: dict[str, Any] = {
    "workload": "sharegpt",
    "num_requests": 200,
    "request_rate": None,        # one rate (Poisson); neither rate nor concurrency: all at once
    "request_rates": None,       # a sweep, "1,2,4" (wins over request_rate)
    "concurrency": None,         # closed loop
    "out": "bench-out",
    "url": None,
    "ttft_slo_ms": DEFAULT_TTFT_SLO_MS,
    "tpot_slo_ms": DEFAULT_TPOT_SLO_MS,
    "input_len": None,           # fixed / random-*: default WorkloadOptions.input_len
    "output_len": None,
    "length_scale": 1.0,         # multiplies every workload length (small CPU runs)
    "seed": 0,
    "temperature": 0.0,          # 0: greedy requests
    "num_agents": None,          # prefix-agents
    "num_system_prompts": None,
    "system_prompt_len": None,
    "turn_len": None,
    "background_share": None,    # prefix-agents: share of one-off requests outside the workflows
    "warmup_requests": 4,
    "max_duration_s": 1800.0,    # per load point
    "request_timeout_s": 300.0,
    "start_timeout_s": None,     # None: the launcher's (PDCLUSTER_START_TIMEOUT_S, else 300 s)
    "vocab_size": None,          # --url only, when the router's model directory is not readable here
    "compare": None,             # [A.json, B.json, ...]: only rebuild the report from these
    "advisor_gpus": None,        # the P:D advisor's GPU count (None: the most nodes a topology used)
    "slo_attainment": advisor.DEFAULT_ATTAINMENT,   # the advisor's share of requests within the SLO
}


def _opt(args: Any, name: str) -> Any:
    value = getattr(args, name, None)
    return BENCH_DEFAULTS[name] if value is None else value


@dataclass(slots=True)
class BenchPlan:
    """What to run, checked before anything starts."""

    topologies: list[str]
    workload: str
    options: WorkloadOptions                 # vocab_size / max_model_len filled per cluster
    loads: list[dict[str, Any]]              # report.load_label's input
    slo: SLO
    out_dir: Path
    url: str | None = None
    warmup_requests: int = 4
    max_duration_s: float = 1800.0
    request_timeout_s: float = 300.0
    start_timeout_s: float | None = None
    vocab_size: int | None = None
    advisor_gpus: int | None = None
    slo_attainment: float = advisor.DEFAULT_ATTAINMENT

    @classmethod
    def from_args(cls, args: Any) -> BenchPlan:
        workload = _opt(args, "workload")
        if workload not in WORKLOADS:
            raise ValueError(f"--workload {workload!r}: choose one of {', '.join(WORKLOADS)}")
        opts = WorkloadOptions(num_requests=int(_opt(args, "num_requests")), seed=int(_opt(args, "seed")),
                               length_scale=float(_opt(args, "length_scale")), temperature=float(_opt(args, "temperature")))
        if not 0 <= opts.temperature <= 2:
            raise ValueError(f"--temperature {opts.temperature}: give 0 (greedy) to 2, as the API takes")
        for name in ("input_len", "output_len", "num_agents", "num_system_prompts", "system_prompt_len", "turn_len"):
            if getattr(args, name, None) is not None:
                setattr(opts, name, int(getattr(args, name)))
        if getattr(args, "background_share", None) is not None:
            opts.background_share = float(args.background_share)
            if not 0 <= opts.background_share < 1:
                raise ValueError(f"--background-share {opts.background_share}: give a share in [0, 1)")
        if opts.num_requests < 1:
            raise ValueError(f"--num-requests {opts.num_requests}: give 1 or more")
        if opts.length_scale <= 0:
            raise ValueError(f"--length-scale {opts.length_scale}: give a positive factor")
        concurrency = getattr(args, "concurrency", None)
        rates = parse_rates(getattr(args, "request_rates", None)) or parse_rates(getattr(args, "request_rate", None))
        if concurrency is not None:
            if rates:
                raise ValueError("give --concurrency or a request rate, not both")
            if concurrency < 1:
                raise ValueError(f"--concurrency {concurrency}: give 1 or more")
            loads = [{"mode": "concurrency", "concurrency": int(concurrency)}]
        else:
            loads = [{"mode": "rate", "request_rate": report.rate_field(r)} for r in (rates or [math.inf])]
        slo = SLO(float(_opt(args, "ttft_slo_ms")), float(_opt(args, "tpot_slo_ms")))
        if slo.ttft_ms <= 0 or slo.tpot_ms <= 0:
            raise ValueError(f"SLO targets must be positive: TTFT {slo.ttft_ms} ms, TPOT {slo.tpot_ms} ms")
        advisor_gpus, attainment = advisor_options(args)
        url = getattr(args, "url", None)
        topologies = [EXTERNAL] if url else list(getattr(args, "topologies", None) or [])
        if not topologies:
            raise ValueError("no topology: give --topologies (e.g. 1P1D,colocated2) or --url")
        for t in topologies if not url else []:
            parse_topology(t)  # ValueError says what a name looks like
        return cls(topologies=topologies, workload=workload, options=opts, loads=loads, slo=slo,
                   out_dir=Path(_opt(args, "out")), url=url, warmup_requests=int(_opt(args, "warmup_requests")),
                   max_duration_s=float(_opt(args, "max_duration_s")),
                   request_timeout_s=float(_opt(args, "request_timeout_s")),
                   start_timeout_s=getattr(args, "start_timeout_s", None), vocab_size=getattr(args, "vocab_size", None),
                   advisor_gpus=advisor_gpus, slo_attainment=attainment)


def advisor_options(args: Any) -> tuple[int | None, float]:
    """--advisor-gpus and --slo-attainment, checked (ValueError says what is wrong)."""
    gpus, attainment = getattr(args, "advisor_gpus", None), float(_opt(args, "slo_attainment"))
    if gpus is not None and int(gpus) < 1:
        raise ValueError(f"--advisor-gpus {gpus}: give 1 or more")
    if not 0 < attainment <= 1:
        raise ValueError(f"--slo-attainment {attainment}: give a share in (0, 1], e.g. 0.9")
    return (None if gpus is None else int(gpus)), attainment


def run_bench(args: Any) -> int:
    """`pdcluster bench`. 0: every topology ran and served requests; 1: a topology failed
    to start or served nothing; 2: bad options (nothing started)."""
    if getattr(args, "compare", None):
        out = Path(_opt(args, "out")) / "compare"  # beside, never over, the runs it reads
        try:
            gpus, attainment = advisor_options(args)
            print(report.compare(args.compare, out, advisor_gpus=gpus, slo_attainment=attainment,
                                 ttft_slo_ms=getattr(args, "ttft_slo_ms", None),
                                 tpot_slo_ms=getattr(args, "tpot_slo_ms", None)))
        except ValueError as e:
            print(f"pdcluster bench: {e}", file=sys.stderr)
            return 2
        print(f"\nreport: {out / 'report.md'}")
        return 0
    try:
        plan = BenchPlan.from_args(args)
    except ValueError as e:
        print(f"pdcluster bench: {e}", file=sys.stderr)
        return 2
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    base: ClusterConfig | None = getattr(args, "cluster_config", None)
    runs: list[dict[str, Any]] = []
    failed: list[str] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        for topology in plan.topologies:
            try:
                if plan.url:
                    runs += _bench_external(plan, base, progress)
                else:
                    runs += _bench_topology(plan, base or ClusterConfig.default(), topology, progress)
            except Exception as e:  # one topology failing must not lose the others' results
                console.print(f"{topology}: failed: {type(e).__name__}: {e}", markup=False)
                failed.append(topology)
    if not runs:
        print("pdcluster bench: no run completed", file=sys.stderr)
        return 1
    meta = {"workload": {"name": plan.workload, **asdict(plan.options)}, "slo": asdict(plan.slo),
            "cluster": str(getattr(args, "cluster_yaml", None) or plan.url), "topologies": plan.topologies,
            "failed_topologies": failed}
    paths = report.write_report(plan.out_dir, runs, meta, advisor_gpus=plan.advisor_gpus,
                                slo_attainment=plan.slo_attainment)
    print(report.verdict(runs))
    print()
    for advice in advisor.advise(runs, plan.advisor_gpus, plan.slo_attainment):
        print(advice.line)
        print()
    print(report.markdown_table(runs))
    print(f"\nreport: {paths['report']}  summary: {paths['summary']}  plots: {paths['latency_plot'].name}, "
          f"{paths['goodput_plot'].name} in {plan.out_dir}/")
    served_nothing = [f"{r['topology']} at {report.describe_load(r['load'])}" for r in runs if not r.get("completed")]
    if served_nothing:
        print(f"pdcluster bench: no request succeeded for {', '.join(served_nothing)}", file=sys.stderr)
    return 1 if failed or served_nothing else 0


# --- the command line -------------------------------------------------------------------------------
def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The options beyond the contract's (`pdcluster bench CLUSTER_YAML --topologies ...
    --workload --num-requests --request-rate | --concurrency --out --url`)."""
    d = BENCH_DEFAULTS
    g = parser.add_argument_group("load and workload")
    g.add_argument("--request-rates", default=None, metavar="LIST",
                   help="a sweep of Poisson rates, e.g. 1,2,4,inf (each topology runs every rate)")
    g.add_argument("--input-len", type=int, default=None, metavar="N", help="prompt tokens (fixed, random-*)")
    g.add_argument("--output-len", type=int, default=None, metavar="N", help="output tokens (fixed, random-*, prefix-agents)")
    g.add_argument("--length-scale", type=float, default=None, metavar="X",
                   help=f"multiply every workload length (default {d['length_scale']}); small for CPU runs")
    g.add_argument("--seed", type=int, default=None, help=f"workload and arrival seed (default {d['seed']})")
    g.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="every request's temperature (default 0: greedy); sampled requests are seeded")
    g.add_argument("--num-agents", type=int, default=None, metavar="N", help="prefix-agents: agents (default 8)")
    g.add_argument("--num-system-prompts", type=int, default=None, metavar="N",
                   help="prefix-agents: shared system prompts, one workflow each (default 2)")
    g.add_argument("--system-prompt-len", type=int, default=None, metavar="N", help="prefix-agents (default 1024)")
    g.add_argument("--turn-len", type=int, default=None, metavar="N", help="prefix-agents: user tokens per turn (default 64)")
    g.add_argument("--background-share", type=float, default=None, metavar="F",
                   help="prefix-agents: share of one-off requests from outside the workflows (default 0)")
    g = parser.add_argument_group("targets and limits")
    g.add_argument("--ttft-slo-ms", type=float, default=None, metavar="MS",
                   help=f"goodput's TTFT target (default {d['ttft_slo_ms']:g})")
    g.add_argument("--tpot-slo-ms", type=float, default=None, metavar="MS",
                   help=f"goodput's TPOT target (default {d['tpot_slo_ms']:g})")
    g.add_argument("--warmup-requests", type=int, default=None, metavar="N",
                   help=f"sent before measuring, per topology (default {d['warmup_requests']})")
    g.add_argument("--max-duration-s", type=float, default=None, metavar="S",
                   help=f"per load point; requests in flight then count as failed, those not yet sent as unsent "
                        f"(default {d['max_duration_s']:g})")
    g.add_argument("--request-timeout-s", type=float, default=None, metavar="S",
                   help=f"longest silence within one response (default {d['request_timeout_s']:g})")
    g.add_argument("--start-timeout-s", type=float, default=None, metavar="S", help="wait this long for each cluster")
    g.add_argument("--vocab-size", type=int, default=None, metavar="N",
                   help="with --url, when the router's model directory is not readable here")
    g.add_argument("--advisor-gpus", type=int, default=None, metavar="N",
                   help="the P:D advisor suggests a split of N GPUs (default: the most a measured topology used)")
    g.add_argument("--slo-attainment", type=float, default=None, metavar="F",
                   help=f"the advisor's share of requests that must meet the SLO (default {d['slo_attainment']:g})")
    parser.add_argument("--compare", nargs="+", default=None, metavar="JSON",
                        help="only rebuild the report, into OUT/compare/, from earlier summary.json or run files "
                             "(with --ttft-slo-ms / --tpot-slo-ms: judged against those targets)")


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.cli ...` is `pdcluster bench ...`. It runs that command in a new
    process rather than importing cluster.cli: the CLI imports this module, not the
    other way round."""
    import subprocess

    argv = sys.argv[1:] if argv is None else argv
    return subprocess.call([sys.executable, "-m", "cluster.cli", "bench", *argv])


# --- one topology -------------------------------------------------------------------------------
def topology_config(base: ClusterConfig, topology: str) -> ClusterConfig:
    """`base` split as `topology`, its router on a free port (the launcher picks port 0),
    with the disaggregation mode the name gives after `@` (e.g. colocated2@conditional)."""
    cfg = base.with_topology(*parse_topology(topology))
    router = {"port": 0}
    mode = topology_mode(topology)
    if mode is not None:
        router["disaggregation"] = cfg.router.disaggregation.model_copy(update={"mode": mode})
    return cfg.model_copy(update={"router": cfg.router.model_copy(update=router)})


def _bench_topology(plan: BenchPlan, base: ClusterConfig, topology: str, progress: Progress) -> list[dict[str, Any]]:
    from cluster.launcher import LocalCluster  # start() must run on this (the main) thread

    cfg = topology_config(base, topology)
    task = progress.add_task(f"{topology}: starting", total=None)
    cluster = LocalCluster(cfg, run_dir=plan.out_dir / "logs" / topology, console=progress.console)
    try:
        cluster.start(plan.start_timeout_s)
        progress.update(task, description=f"{topology}: ready at {cluster.url}", total=1, completed=1)
        vocab, max_len = model_limits(cluster.model_dir, _max_model_len(cfg))
        nodes = [{"name": s.name, "role": s.role, "device": s.device} for s in cfg.node_specs()]
        extra = {"nodes": nodes, "logs": str(cluster.run_dir)}
        # router.disaggregation.mode, where this version of the config has it: the advisor
        # must not take a cluster that splits per request for a pure xPyD or colocated one.
        mode = getattr(getattr(cfg.router, "disaggregation", None), "mode", None)
        if mode is not None:
            extra["disaggregation_mode"] = mode
        return _run_loads(plan, topology, cluster.url, cluster.api_key, vocab, max_len, progress, extra)
    finally:
        progress.update(task, description=f"{topology}: stopping")
        cluster.stop()
        progress.update(task, description=f"{topology}: done")


def _bench_external(plan: BenchPlan, base: ClusterConfig | None, progress: Progress) -> list[dict[str, Any]]:
    url = plan.url.rstrip("/")
    api_key = base.router.api_key if base is not None else None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    card = {}
    try:
        r = httpx.get(f"{url}/v1/models", headers=headers, timeout=10.0, trust_env=False)
        r.raise_for_status()
        card = (r.json().get("data") or [{}])[0]
    except (httpx.HTTPError, ValueError) as e:
        raise RuntimeError(f"the router at {url} does not answer GET /v1/models: {e}") from None
    model_dir = Path(card["root"]) if card.get("root") and Path(card["root"]).is_dir() else None
    if plan.vocab_size is not None:
        vocab, max_len = plan.vocab_size, card.get("max_model_len") or plan.options.max_model_len
    elif model_dir is not None:
        vocab, max_len = model_limits(model_dir, card.get("max_model_len"))
    else:
        raise RuntimeError(f"the router's model directory {card.get('root')!r} is not readable here: "
                           "give --vocab-size (token ids are drawn below it)")
    return _run_loads(plan, EXTERNAL, url, api_key, vocab, max_len, progress, {"url": url})


def _run_loads(plan: BenchPlan, topology: str, url: str, api_key: str | None, vocab: int, max_len: int,
               progress: Progress, extra: dict[str, Any]) -> list[dict[str, Any]]:
    opts = WorkloadOptions(**{**asdict(plan.options), "vocab_size": vocab, "max_model_len": max_len})
    if plan.warmup_requests > 0:
        warm = make_workload(plan.workload, opts, salt=WARMUP_SALT)[:plan.warmup_requests]
        warm = [BenchRequest(r.index, r.prompt_ids, min(r.max_tokens, 16), temperature=r.temperature)
                for r in warm]  # no `after`
        task = progress.add_task(f"{topology}: warm-up", total=len(warm))
        # The normal settle after it: the first measured load's "before" scrape must already
        # hold the warm-up's KV loads and prefix-cache counters, or they land in its deltas.
        asyncio.run(run_load(url, warm, concurrency=len(warm), api_key=api_key,
                             request_timeout_s=plan.request_timeout_s, max_duration_s=plan.max_duration_s,
                             on_result=lambda _: progress.advance(task)))
    runs = []
    for i, load in enumerate(plan.loads):
        requests = make_workload(plan.workload, opts, salt=i)
        concurrency = load.get("concurrency")
        if concurrency is None:
            rate = float(load["request_rate"])
            requests = with_poisson_arrivals(requests, rate, seed=opts.seed)
        task = progress.add_task(f"{topology}: {report.describe_load(load)}", total=len(requests))

        def advance(_: RequestResult, task=task) -> None:
            progress.advance(task)

        result = asyncio.run(run_load(url, requests, concurrency=concurrency, api_key=api_key,
                                      request_timeout_s=plan.request_timeout_s, max_duration_s=plan.max_duration_s,
                                      on_result=advance))
        summary = summarize(result.results, result.duration_s, plan.slo, metrics_before=result.metrics_before,
                            metrics_after=result.metrics_after, queue_samples=result.queue_samples)
        run = {"topology": topology, "load": load, "workload": plan.workload, "seed": opts.seed,
               "temperature": opts.temperature, **extra, **summary,
               "per_request": [per_request(r) for r in result.results]}
        report.write_run(plan.out_dir, run)
        runs.append(run)
    return runs


def per_request(r: RequestResult) -> dict[str, Any]:
    """One request's numbers for the run file (ms; None where not measured). `cut_off` (in
    flight at the run's time limit: not ok, its TTFT kept when a first token came) and
    `unsent` (never sent: the server never saw it) appear only when true."""
    def ms(v: float) -> float | None:
        return None if math.isnan(v) else round(v * 1e3, 3)
    return {"index": r.index, "ok": r.ok, "send_ms": ms(r.send_s), "ttft_ms": ms(r.ttft_s), "tpot_ms": ms(r.tpot_s),
            "e2e_ms": ms(r.e2e_s), "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
            "cached_tokens": r.cached_tokens, **({"prefill": r.prefill, "prefill_reason": r.prefill_reason}
                                                 if r.prefill else {}),
            **({"cut_off": True} if r.cut_off else {}), **({"unsent": True} if r.unsent else {}),
            **({"error": r.error} if r.error else {})}


# --- the model's limits ---------------------------------------------------------------------------
def model_limits(model_dir: Path | str, max_model_len: int | None) -> tuple[int, int]:
    """(vocab size the router accepts, context length) of a Hugging Face model directory.

    Token ids must be valid for both the model (config.json's vocab_size) and the router's
    tokenizer (tokenizer.json's ids, added tokens included), which can be smaller (a
    dummy 8B-shape checkpoint carries a small tokenizer)."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    vocab = int(config["vocab_size"])
    tok_path = model_dir / "tokenizer.json"
    if tok_path.is_file():
        tok = json.loads(tok_path.read_text())
        ids = list((tok.get("model") or {}).get("vocab", {}).values()) if isinstance(
            (tok.get("model") or {}).get("vocab"), dict) else []
        ids += [t["id"] for t in tok.get("added_tokens", [])]
        if ids:
            vocab = min(vocab, max(ids) + 1)
    context = max_model_len or int(config.get("max_position_embeddings") or 4096)
    return vocab, context


def _max_model_len(cfg: ClusterConfig) -> int | None:
    """The smallest max_model_len any node is configured with, None where none is."""
    limits = [cfg.engine.max_model_len] + [s.engine.max_model_len for _, s in cfg.roles()
                                            if "max_model_len" in s.engine.model_fields_set]
    limits = [x for x in limits if x]
    return min(limits) if limits else None


if __name__ == "__main__":
    raise SystemExit(main())
