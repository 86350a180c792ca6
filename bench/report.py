"""What a benchmark leaves behind, and the comparison table.

    DIR/<topology>-<load>.json   one run: the topology, the load, the workload, summarize()'s numbers
    DIR/summary.json             {"runs": [...every run...], "best": ..., "slo": ...}
    DIR/report.md                the table across topologies and loads, a one-line verdict, and
                                 per workload the P:D advisor's line (bench/advisor.py)
    DIR/latency.png              TTFT p50/p99 and TPOT p50/p99 against request rate, per topology
    DIR/goodput.png              goodput per topology (one bar per load)

A run's `load` is `{"mode": "rate", "request_rate": 4.0}` (Poisson; "inf" for all at
once) or `{"mode": "concurrency", "concurrency": 8}`; its label (`4`, `inf`, `c8`) names
its file. `--compare A.json B.json ...` (or `python -m bench.report --compare ...`)
rebuilds the table, and with --out the whole report, from earlier summary.json or
run files: a run whose topology and load appear in more than one file is labelled with
its file's folder. With `--ttft-slo-ms` / `--tpot-slo-ms` it judges them against those
targets instead, from each request's measured TTFT and TPOT (which topology wins
depends on the TPOT target most of all: one sweep read at several).

summary.json's "advisor" holds, per workload, the split of `gpus` GPUs (default: the most
nodes a measured topology used; `--advisor-gpus N` to ask for another N) that the
measured per-node capacities say serves the most within the SLO, what that rests on, and
each measured topology's distance from it (bench/advisor.py says how).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import advisor
from bench.metrics import rescore

SUMMARY_VERSION = 1


# --- names ----------------------------------------------------------------------------------
def load_label(load: dict[str, Any]) -> str:
    if load.get("mode") == "concurrency":
        return f"c{load['concurrency']}"
    rate = load.get("request_rate")
    return "inf" if rate in (None, "inf") or (isinstance(rate, float) and math.isinf(rate)) else f"{float(rate):g}"


def describe_load(load: dict[str, Any]) -> str:
    if load.get("mode") == "concurrency":
        return f"concurrency {load['concurrency']}"
    label = load_label(load)
    return "all at once" if label == "inf" else f"{label} req/s"


def rate_field(rate: float) -> float | str:
    """A rate as JSON can hold it: "inf" for infinity."""
    return "inf" if math.isinf(rate) else rate


def run_path(out_dir: Path, run: dict[str, Any]) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run["topology"])
    return Path(out_dir) / f"{safe}-{load_label(run['load'])}.json"


# --- writing --------------------------------------------------------------------------------
def write_run(out_dir: Path, run: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = run_path(out_dir, run)
    path.write_text(json.dumps(run, indent=2, allow_nan=False) + "\n")
    return path


def write_report(out_dir: Path, runs: Sequence[dict[str, Any]], meta: dict[str, Any] | None = None, *,
                 advisor_gpus: int | None = None,
                 slo_attainment: float = advisor.DEFAULT_ATTAINMENT) -> dict[str, Path]:
    """summary.json, report.md and the plots for `runs`; returns their paths by name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    best = best_topology(runs)
    advice = advisor.advise(runs, advisor_gpus, slo_attainment)
    summary = {"version": SUMMARY_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(meta or {}),
               "best": best, "advisor": [a.to_json() for a in advice], "runs": list(runs)}
    paths = {"summary": out_dir / "summary.json", "report": out_dir / "report.md",
             "latency_plot": out_dir / "latency.png", "goodput_plot": out_dir / "goodput.png"}
    paths["summary"].write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    plot_latency(runs, paths["latency_plot"])
    plot_goodput(runs, paths["goodput_plot"])
    paths["report"].write_text(markdown_report(runs, meta, advice))
    return paths


# --- the table ------------------------------------------------------------------------------
COLUMNS = ("Topology", "Load", "Goodput (req/s)", "Throughput (req/s)", "Output (tok/s)", "TTFT p50 (ms)",
           "TTFT p99 (ms)", "TPOT p50 (ms)", "TPOT p99 (ms)", "KV GB/s", "KV tail / TTFT", "Prefix hit", "Evictions",
           "OK/sent")


def _num(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pct(dist: dict | None, key: str) -> float | None:
    return None if not dist else dist.get(key)


def table_row(run: dict[str, Any]) -> list[str]:
    kv, prefix = run.get("kv_transfer") or {}, run.get("prefix_cache") or {}
    hit = prefix.get("hit_rate")
    return [run["topology"], describe_load(run["load"]), _num(run.get("goodput")),
            _num(run.get("request_throughput")), _num(run.get("output_throughput"), 1),
            _num(_pct(run.get("ttft_ms"), "median"), 1), _num(_pct(run.get("ttft_ms"), "p99"), 1),
            _num(_pct(run.get("tpot_ms"), "median"), 1), _num(_pct(run.get("tpot_ms"), "p99"), 1),
            _num(kv.get("gb_per_s"), 3) if kv.get("loads") else "-",
            "-" if run.get("kv_transfer_share_of_ttft") is None else f"{100 * run['kv_transfer_share_of_ttft']:.1f}%",
            "-" if hit is None else f"{100 * hit:.0f}%", _evictions(prefix),
            f"{run.get('completed', 0)}/{run.get('requests', 0)}"]


def _evictions(prefix: dict[str, Any]) -> str:
    if prefix.get("evictions") is None:
        return "-"
    policy = prefix.get("eviction_policy")
    return f"{prefix['evictions']:.0f}" + (f" ({policy})" if policy else "")


def markdown_table(runs: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" if i < 2 else "--:" for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(table_row(r)) + " |" for r in runs]
    return "\n".join(lines)


def best_topology(runs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Each topology's best goodput over its loads; the topology with the highest, and the
    runner-up. None when no run met the SLO."""
    per: dict[str, dict[str, Any]] = {}
    for r in runs:
        g = r.get("goodput") or 0.0
        if r["topology"] not in per or g > per[r["topology"]]["goodput"]:
            per[r["topology"]] = {"topology": r["topology"], "goodput": g, "load": r["load"]}
    ranked = sorted(per.values(), key=lambda b: -b["goodput"])
    if not ranked or ranked[0]["goodput"] <= 0:
        return None
    return {**ranked[0], "runner_up": ranked[1] if len(ranked) > 1 else None}


def verdict(runs: Sequence[dict[str, Any]]) -> str:
    slo = next((r.get("slo") for r in runs if r.get("slo")), None) or {}
    target = f"TTFT <= {slo['ttft_ms']:g} ms and TPOT <= {slo['tpot_ms']:g} ms" if slo else "the SLO"
    best = best_topology(runs)
    if best is None:
        return (f"No topology served any request within {target}: relax --ttft-slo-ms / --tpot-slo-ms, "
                "or lower the load.")
    line = (f"Best by goodput: **{best['topology']}**, {best['goodput']:.2f} req/s within {target} "
            f"(at {describe_load(best['load'])})")
    second = best["runner_up"]
    if second is None:
        return line + "."
    if second["goodput"] <= 0:
        return line + f"; {second['topology']} met the SLO for no request."
    return line + f", {best['goodput'] / second['goodput']:.2f}x {second['topology']} ({second['goodput']:.2f} req/s)."


def markdown_report(runs: Sequence[dict[str, Any]], meta: dict[str, Any] | None = None,
                    advice: Sequence[advisor.Advice] | None = None) -> str:
    meta = meta or {}
    advice = advisor.advise(runs) if advice is None else advice
    parts = ["# pdcluster benchmark", ""]
    if meta.get("workload"):
        w = meta["workload"]
        parts.append(f"Workload `{w.get('name')}`: {w.get('num_requests')} requests per run, seed {w.get('seed')}, "
                     f"mean prompt {_num(_mean(runs, 'mean_prompt_tokens'), 0)} tokens, "
                     f"mean output {_num(_mean(runs, 'mean_output_tokens'), 0)} tokens.")
    if meta.get("cluster"):
        parts.append(f"Cluster: {meta['cluster']}.")
    parts += ["", verdict(runs), ""]
    parts += [line for a in advice for line in (a.line, "")]
    parts += [markdown_table(runs), "",
              "Goodput: completed requests per second that met both the TTFT and the TPOT target. "
              "KV GB/s: bytes the decode nodes loaded / time spent loading. KV tail / TTFT: the mean time "
              "from a prefill's end to its KV landed on the decode node (streamed pulls), over the mean TTFT "
              "of the requests whose prefill was remote (of all, when the router does not say). "
              "Prefix hit: prompt blocks "
              "found in the prefix cache of the nodes that compute prompts. Evictions: cached blocks those "
              "nodes evicted for room, and their eviction policy (`workflow`: blocks of active agent "
              "workflows go last; `lru`). Advisor: the split of the GPUs that the measured per-node "
              "capacities say serves the most requests/s with the attainment shown within both targets "
              "(DistServe's goodput), and each measured topology's own such rate as a ratio to it; "
              "see bench/advisor.py.", ""]
    incomplete = [r for r in runs if r.get("failed") or r.get("unsent")]
    parts += [f"- {r['topology']} at {describe_load(r['load'])}: {incomplete_line(r)}" for r in incomplete]
    if incomplete:
        parts.append("")
    parts += ["![latency](latency.png)", "", "![goodput](goodput.png)", ""]
    return "\n".join(parts)


def incomplete_line(run: dict[str, Any]) -> str:
    """What a run did not complete: failed requests (with their errors) and, apart, those
    the time limit left unsent, which the server never saw (the table's OK/sent omits them)."""
    parts = []
    if run.get("failed"):
        errs = "; ".join(f"{e['count']}x {e['message']}" for e in run.get("errors", []))
        parts.append(f"{run['failed']} failed ({errs})")
    if run.get("unsent"):
        parts.append(f"{run['unsent']} not sent before the run's time limit")
    return "; ".join(parts)


def _mean(runs: Sequence[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


# --- plots ----------------------------------------------------------------------------------
def _x_of(run: dict[str, Any]) -> float:
    """Where a run sits on the load axis: its offered rate; for "inf", the rate it achieved;
    for a closed loop, its concurrency."""
    load = run["load"]
    if load.get("mode") == "concurrency":
        return float(load["concurrency"])
    rate = load.get("request_rate")
    return float(run.get("request_throughput") or 0.0) if load_label(load) == "inf" else float(rate)


def _by_topology(runs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(r["topology"], []).append(r)
    return {t: sorted(rs, key=_x_of) for t, rs in groups.items()}


def plot_latency(runs: Sequence[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure  # Agg canvas; no pyplot, no global backend state

    closed = all(r["load"].get("mode") == "concurrency" for r in runs) and runs
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2)
    panels = [("ttft_ms", "median", "TTFT p50"), ("ttft_ms", "p99", "TTFT p99"),
              ("tpot_ms", "median", "TPOT p50"), ("tpot_ms", "p99", "TPOT p99")]
    slo = next((r["slo"] for r in runs if r.get("slo")), None)
    for ax, (metric, key, title) in zip(axes.flat, panels):
        top, heading = 0.0, f"{title} (ms)"
        for topo, rs in _by_topology(runs).items():
            pts = [(_x_of(r), r[metric][key]) for r in rs if r.get(metric)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=topo)
                top = max(top, *(y for _, y in pts))
        if slo and slo[metric] <= 3 * top:  # a target far above the data would flatten it
            ax.axhline(slo[metric], color="grey", linestyle="--", linewidth=1, label="SLO")
        elif slo:
            heading += f"; SLO {slo[metric]:g} ms, off scale"
        ax.set_ylim(bottom=0)
        ax.set_title(heading)
        ax.set_xlabel("concurrency" if closed else "request rate (req/s; 'inf': achieved)")
        ax.set_ylabel("ms")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Latency against load, per topology")
    fig.savefig(path, dpi=110)


def plot_goodput(runs: Sequence[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    topologies = list(_by_topology(runs))
    labels = list(dict.fromkeys(describe_load(r["load"]) for r in sorted(runs, key=_x_of)))
    fig = Figure(figsize=(max(6, 1.6 * len(topologies) * max(1, len(labels)) ** 0.5), 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(labels))
    for j, label in enumerate(labels):
        xs, ys = [], []
        for i, topo in enumerate(topologies):
            run = next((r for r in runs if r["topology"] == topo and describe_load(r["load"]) == label), None)
            if run is not None:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(run.get("goodput") or 0.0)
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize="small")
    ax.set_xticks(range(len(topologies)), topologies)
    ax.set_ylabel("goodput (req/s within SLO)")
    slo = next((r["slo"] for r in runs if r.get("slo")), None)
    ax.set_title("Goodput per topology" + (f" (TTFT <= {slo['ttft_ms']:g} ms, TPOT <= {slo['tpot_ms']:g} ms)"
                                           if slo else ""))
    if len(labels) > 1:
        ax.legend(fontsize="small", title="load")
    ax.grid(True, axis="y", alpha=0.3)
    fig.savefig(path, dpi=110)


# --- compare ---------------------------------------------------------------------------------
def load_runs(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The runs in summary.json files (their "runs") and run files (one each), in order.
    Raises ValueError naming a file that is neither."""
    loaded: list[tuple[Path, dict[str, Any]]] = []
    for p in map(Path, paths):
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{p}: cannot read it as JSON: {e}") from None
        if isinstance(data, dict) and isinstance(data.get("runs"), list):
            loaded += [(p, r) for r in data["runs"]]
        elif isinstance(data, dict) and "topology" in data and "load" in data:
            loaded.append((p, data))
        else:
            raise ValueError(f"{p}: neither a summary.json (with \"runs\") nor a run file (with \"topology\" and \"load\")")
    seen: dict[tuple[str, str], set[Path]] = {}
    for p, r in loaded:
        seen.setdefault((r["topology"], load_label(r["load"])), set()).add(p)
    runs = []
    for p, r in loaded:
        if len(seen[(r["topology"], load_label(r["load"]))]) > 1:
            r = {**r, "topology": f"{r['topology']} ({p.parent.name or p.stem})"}
        runs.append(r)
    return runs


def compare(paths: Sequence[str | Path], out_dir: str | Path | None = None, *, advisor_gpus: int | None = None,
            slo_attainment: float = advisor.DEFAULT_ATTAINMENT, ttft_slo_ms: float | None = None,
            tpot_slo_ms: float | None = None) -> str:
    """The report's verdict, advisor lines and table for earlier runs; with `out_dir`, the
    whole report written there too. With an SLO target, every run is judged against it
    from its per-request numbers (bench/metrics.py rescore) instead of the run's own."""
    for name, target in (("--ttft-slo-ms", ttft_slo_ms), ("--tpot-slo-ms", tpot_slo_ms)):
        if target is not None and not target > 0:
            raise ValueError(f"{name} {target}: give a target in milliseconds above 0")
    runs = load_runs(paths)
    if ttft_slo_ms is not None or tpot_slo_ms is not None:
        runs = [rescore(r, ttft_slo_ms, tpot_slo_ms) for r in runs]
    advice = advisor.advise(runs, advisor_gpus, slo_attainment)   # ValueError before anything is written
    if out_dir is not None:
        write_report(Path(out_dir), runs, {"compared": [str(p) for p in paths]}, advisor_gpus=advisor_gpus,
                     slo_attainment=slo_attainment)
    return "\n\n".join([verdict(runs), *(a.line for a in advice), markdown_table(runs)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description="compare earlier benchmark runs")
    parser.add_argument("--compare", nargs="+", required=True, metavar="JSON", help="summary.json or run files")
    parser.add_argument("--out", default=None, metavar="DIR", help="also write report.md, summary.json and plots here")
    parser.add_argument("--advisor-gpus", type=int, default=None, metavar="N",
                        help="the P:D advisor splits this many GPUs (default: the most a measured topology used)")
    parser.add_argument("--slo-attainment", type=float, default=advisor.DEFAULT_ATTAINMENT, metavar="F",
                        help=f"the advisor's share of requests within the SLO (default {advisor.DEFAULT_ATTAINMENT:g})")
    parser.add_argument("--ttft-slo-ms", type=float, default=None, metavar="MS",
                        help="judge the runs against this TTFT target instead of their own")
    parser.add_argument("--tpot-slo-ms", type=float, default=None, metavar="MS",
                        help="judge the runs against this TPOT target instead of their own")
    args = parser.parse_args(argv)
    try:
        print(compare(args.compare, args.out, advisor_gpus=args.advisor_gpus, slo_attainment=args.slo_attainment,
                      ttft_slo_ms=args.ttft_slo_ms, tpot_slo_ms=args.tpot_slo_ms))
    except ValueError as e:
        print(f"bench.report: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
