"""The P:D advisor: from measured runs, the prefill:decode split that serves the most.

    advise(runs, gpus=None, attainment=0.9) -> [Advice, ...]   one per workload in `runs`
    Advice.line                                                 the report's advisor line
    Advice.to_json()                                            the same in summary.json

The method is DistServe's placement search (Zhong et al., OSDI'24, §4) fed with this
benchmark's measurements instead of a simulator, and the replica arithmetic of Dynamo's
SLA planner (capacity per engine at the latency target, replicas = load / capacity):

1. Capacity per node, per node kind, under the SLO. A node kind's capacity is the highest
   request rate per node at which at least `attainment` (default 90%, DistServe's target)
   of the requests meet that kind's target: TTFT for a prefill node (the first token comes
   from it), TPOT for a decode node (KV loads included: they delay the second token), both
   for a colocated node. The runs of every xPyD topology measure prefill and decode nodes,
   those of every colocatedN topology colocated nodes; a run at Poisson rate R on x
   prefill nodes is a point (R/x, share of its requests within TTFT). The capacity is
   bracketed by the highest rate per node that met the target (`lo`) and the lowest that
   missed it (`hi`), and estimated by linear interpolation of the attainment between the
   two. A phase that met its target at every rate has no upper bound yet; one that missed
   it at every rate has no lower bound: the data says only that much, and so does the
   advisor.
2. Splits of N GPUs (one node per GPU): xPyD serves min(x * prefill, y * decode) requests/s
   (the slower phase sets the rate; both scale linearly with their nodes, as DistServe
   assumes for replicas), colocatedN serves N * colocated. Each split gets an interval
   from the brackets and an estimate where the phase that binds has one.
3. The suggestion: the split with the highest estimate (or lower bound). Where a split the
   data cannot pin down might still do better (its upper bound is higher), the line names
   it and the measurement that is missing; where no split can be told apart, it says it
   cannot tell rather than invent a number. A node kind with no run at all (no colocated
   topology measured, say) is left out of the contest and named.
4. Each measured topology's own capacity (its runs' attainment of both targets) as a ratio
   to the suggestion: how far the topologies a user ran are from the best split.

What it rests on and where it can be wrong: only Poisson-rate runs count (a burst or a
closed loop has no arrival rate); a decode node in xPyD sees no more than its prefill
nodes pass on, so a run whose prefill missed TTFT credits the decode nodes only with the
run's completed rate; nodes are assumed to scale linearly and independently (no shared
link limits, no router bottleneck); and the workload must be the one the runs measured.
A run whose router chose each request's prefill (`router.disaggregation.mode:
conditional`, colocated nodes lending KV, as the run's `disaggregation_mode` or its
requests' `prefill` plans show) measures that choice rather than a node kind: it is
compared with the suggestion ("colocated2 (conditional)") but not used for capacities.
Runs of one workload are those with the same workload name, mean prompt and output
lengths and SLO targets.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_ATTAINMENT = 0.9   # DistServe's SLO attainment target
KINDS = ("prefill", "decode", "colocated")
CLOSE = 0.9                # another split's estimate this near the best's is named as too close to call
_TARGET = {"prefill": "TTFT", "decode": "TPOT", "colocated": "TTFT and TPOT"}


# --- one run: per-phase SLO attainment ----------------------------------------------------------
@dataclass(slots=True, frozen=True)
class RunPoint:
    """One Poisson-rate run as the advisor sees it."""

    topology: str
    label: str                     # the topology as the measured list names it ("colocated2 (conditional)")
    pure: bool                     # every request took its node kinds' path: the run measures them
    rate: float                    # offered requests/s
    prefill_nodes: int
    decode_nodes: int
    colocated_nodes: int
    completed_rate: float          # completed requests / run duration
    ttft_met: float                # share of the requests sent (failed ones miss) within TTFT
    tpot_met: float                # ... within TPOT (a one-token request has none: met)
    both_met: float
    goodput: float                 # the table's: requests/s that met both targets
    prefill_tokens_per_s: float    # prompt tokens computed (not from the prefix cache) / duration
    output_tokens_per_s: float
    mean_running: dict[str, float] = field(default_factory=dict)   # per role: mean running per node

    @property
    def nodes(self) -> int:
        return self.prefill_nodes + self.decode_nodes + self.colocated_nodes


_SUFFIX = re.compile(r"\s*\(.*\)$")   # report.load_runs labels a repeated topology "1P1D (dir)"


def node_counts(run: dict[str, Any]) -> tuple[int, int, int] | None:
    """(prefill, decode, colocated) nodes of a run: from its `nodes` where recorded, else from
    the topology's name; None for a cluster of unknown shape (`--url`)."""
    nodes = run.get("nodes")
    if nodes:
        roles = [n.get("role") for n in nodes]
        return roles.count("prefill"), roles.count("decode"), roles.count("both")
    m = re.fullmatch(r"(\d+)p(\d+)d|colocated(\d+)", _SUFFIX.sub("", run["topology"]).strip().lower())
    if not m:
        return None
    p, d, c = (int(g) if g else 0 for g in m.groups())
    return p, d, c


def run_point(run: dict[str, Any]) -> RunPoint | str:
    """The run's point, or why it cannot be one."""
    load = run.get("load") or {}
    rate = load.get("request_rate")
    if load.get("mode") != "rate" or rate in (None, "inf") or not math.isfinite(float(rate)):
        return "no arrival rate (burst or closed loop)"
    counts = node_counts(run)
    if counts is None:
        return "unknown node roles"
    per_request = run.get("per_request")
    if not per_request:
        return "no per-request results"
    per_request = [r for r in per_request if not r.get("unsent")]  # the server never saw them
    if not per_request:
        return "no request sent"
    slo = run.get("slo") or {}
    ttft_slo, tpot_slo = slo.get("ttft_ms"), slo.get("tpot_ms")
    if ttft_slo is None or tpot_slo is None:
        return "no SLO recorded"
    n = len(per_request)
    ttft_ok = [bool(r.get("ok")) and r.get("ttft_ms") is not None and r["ttft_ms"] <= ttft_slo for r in per_request]
    tpot_ok = [bool(r.get("ok")) and (r.get("tpot_ms") is None or r["tpot_ms"] <= tpot_slo) for r in per_request]
    duration = float(run.get("duration_s") or 0.0)
    done = [r for r in per_request if r.get("ok")]
    computed = sum(max(0, (r.get("prompt_tokens") or 0) - (r.get("cached_tokens") or 0)) for r in done)
    per_node = (run.get("queues") or {}).get("mean_running_per_node") or {}
    by_role: dict[str, list[float]] = {}
    for node in run.get("nodes") or []:
        if node.get("name") in per_node:
            by_role.setdefault(node.get("role"), []).append(per_node[node["name"]])
    mixed = per_request_split(run, counts)
    return RunPoint(
        topology=run["topology"], label=_SUFFIX.sub("", run["topology"]) + (f" ({mixed})" if mixed else ""),
        pure=not mixed, rate=float(rate), prefill_nodes=counts[0], decode_nodes=counts[1],
        colocated_nodes=counts[2], completed_rate=len(done) / duration if duration > 0 else 0.0,
        ttft_met=sum(ttft_ok) / n, tpot_met=sum(tpot_ok) / n,
        both_met=sum(a and b for a, b in zip(ttft_ok, tpot_ok)) / n, goodput=float(run.get("goodput") or 0.0),
        prefill_tokens_per_s=computed / duration if duration > 0 else 0.0,
        output_tokens_per_s=float(run.get("output_throughput") or 0.0),
        mean_running={role: sum(v) / len(v) for role, v in by_role.items()})


# Local prefills that even `always` makes (router/disaggregation.py): nothing to decode,
# or a prefill failover. They do not make a run a per-request split.
_FORCED_LOCAL = ("single_token", "no_prefill_node")


def per_request_split(run: dict[str, Any], counts: tuple[int, int, int]) -> str:
    """"" when every request of the run took its topology's path (xPyD: prefill on a prefill
    node; colocatedN: one node whole); else what the router did instead: the
    `disaggregation_mode` it ran with, or, where none is recorded, "per-request split" when
    its x-pdcluster-prefill answers show one. Such a run measures the router's choice,
    not a node kind."""
    p, d, c = counts
    mode = run.get("disaggregation_mode")
    if mode is not None:
        pure = mode in ("always",) if p and d else mode in ("never",) if c else True
        return "" if pure else str(mode)
    plans = [(r.get("prefill"), r.get("prefill_reason")) for r in run.get("per_request") or []]
    if p and d and any(plan == "local" and reason not in _FORCED_LOCAL for plan, reason in plans):
        return "per-request split"
    if c and any(plan == "remote" for plan, _ in plans):
        return "per-request split"
    return ""


# --- capacity from attainment points ------------------------------------------------------------
@dataclass(slots=True, frozen=True)
class Sample:
    """A load (requests/s, per node or in all) and the share of requests that met the target there."""

    rate: float
    met: float
    source: str                     # "1P1D at 4 req/s"
    note: str = ""                  # e.g. why the rate is the completed rather than the offered one
    per_node: bool = True
    load: str = ""                  # what the nodes did there: tokens/s, requests running


@dataclass(slots=True)
class Capacity:
    """Requests/s (per node for a node kind, in all for a topology) within the SLO for at
    least the attainment target: more than `lo`, less than `hi` (inf: no run missed),
    about `estimate` (None: no bracket)."""

    lo: float = 0.0
    hi: float = math.inf
    estimate: float | None = None
    evidence: list[str] = field(default_factory=list)
    lo_sample: Sample | None = None
    hi_sample: Sample | None = None
    measured: bool = False          # some run measured it at all

    @property
    def value(self) -> float:
        """What the data supports claiming at least."""
        return self.estimate if self.estimate is not None else self.lo

    @property
    def ceiling(self) -> float:
        """What it may be at most."""
        return self.estimate if self.estimate is not None else self.hi

    def scaled(self, k: int) -> Capacity:
        return Capacity(k * self.lo, k * self.hi, None if self.estimate is None else k * self.estimate,
                        self.evidence, self.lo_sample, self.hi_sample, self.measured)

    def to_json(self) -> dict[str, Any]:
        return {"lo": _finite(self.lo), "hi": _finite(self.hi), "estimate": self.estimate,
                "evidence": self.evidence}


def capacity(samples: Sequence[Sample], attainment: float) -> Capacity:
    """Bracket and interpolate the rate at which the share of requests within the target
    falls below `attainment`. Attainment is assumed to fall with load; a sample that met the
    target above one that missed it is kept in the evidence as a contradiction, not used."""
    cap = Capacity(measured=bool(samples))
    missed = [s for s in samples if s.met < attainment]
    hi = min(missed, key=lambda s: s.rate) if missed else None
    met = [s for s in samples if s.met >= attainment and (hi is None or s.rate < hi.rate)]
    lo = max(met, key=lambda s: s.rate) if met else None
    if lo is not None:
        cap.lo, cap.lo_sample = lo.rate, lo
    if hi is not None:
        cap.hi, cap.hi_sample = hi.rate, hi
    if lo is not None and hi is not None:
        cap.estimate = lo.rate + (lo.met - attainment) / (lo.met - hi.met) * (hi.rate - lo.rate)
    for s in sorted(samples, key=lambda s: s.rate):
        contradicts = hi is not None and s.met >= attainment and s.rate >= hi.rate
        cap.evidence.append(f"{s.source}: {100 * s.met:.0f}% met ({s.rate:.3g} req/s"
                            f"{' per node' if s.per_node else ''}{'; ' + s.note if s.note else ''}"
                            f"{'; ' + s.load if s.load else ''})"
                            + (" - met above a rate that missed: not used" if contradicts else ""))
    return cap


def node_samples(points: Sequence[RunPoint], attainment: float) -> dict[str, list[Sample]]:
    """Per node kind, the per-node samples of every run that has nodes of that kind."""
    out: dict[str, list[Sample]] = {k: [] for k in KINDS}
    for p in points:
        if not p.pure:
            continue
        source = f"{p.topology} at {p.rate:g} req/s"

        def load(role: str, n: int) -> str:
            tokens = (f"{p.prefill_tokens_per_s / n:.0f} prompt tok/s" if role != "decode" else "") + \
                     (", " if role == "both" else "") + \
                     (f"{p.output_tokens_per_s / n:.0f} output tok/s" if role != "prefill" else "")
            running = p.mean_running.get(role)
            return tokens + " per node" + (f", {running:.1f} running" if running is not None else "")
        if p.colocated_nodes and not (p.prefill_nodes or p.decode_nodes):
            n = p.colocated_nodes
            out["colocated"].append(Sample(p.rate / n, p.both_met, source, load=load("both", n)))
        elif p.prefill_nodes and p.decode_nodes and not p.colocated_nodes:
            x, y = p.prefill_nodes, p.decode_nodes
            out["prefill"].append(Sample(p.rate / x, p.ttft_met, source, load=load("prefill", x)))
            seen, note = p.rate, ""
            if p.ttft_met < attainment and p.tpot_met >= attainment:
                # Prefill was the bottleneck: the decode nodes saw no more than what got through.
                seen, note = min(p.rate, p.completed_rate), "completed rate: the prefill nodes held the rest back"
            out["decode"].append(Sample(seen / y, p.tpot_met, source, note, load=load("decode", y)))
    return out


# --- splits ---------------------------------------------------------------------------------------
@dataclass(slots=True)
class SplitEstimate:
    split: str
    prefill: int
    decode: int
    colocated: int
    capacity: Capacity
    binds: str = ""                 # which node kind sets the rate, where known
    unknown: str = ""               # why it is not estimated

    def to_json(self) -> dict[str, Any]:
        return {"split": self.split, **self.capacity.to_json(), "binds": self.binds or None,
                "not_estimated": self.unknown or None}


def estimate_split(x: int, y: int, c: int, caps: dict[str, Capacity]) -> SplitEstimate:
    if c:
        cap = caps["colocated"]
        est = SplitEstimate(f"colocated{c}", 0, 0, c, cap.scaled(c), "colocated")
        if not cap.measured:
            est.unknown = "no colocated run with one node per request"
        elif cap.estimate is None:
            est.unknown = _why_no_estimate("colocated", cap)
        return est
    p, d = caps["prefill"].scaled(x), caps["decode"].scaled(y)
    est = SplitEstimate(f"{x}P{y}D", x, y, 0, Capacity(min(p.lo, d.lo), min(p.hi, d.hi),
                                                          measured=p.measured and d.measured))
    if not est.capacity.measured:
        est.unknown = "no xPyD run with every request split"
        return est
    # The slower phase binds. It has an estimate where its own bracket gives one and the
    # other phase is known to be faster (its estimate, or else its lower bound, is above).
    known = {k: c for k, c in (("prefill", p), ("decode", d)) if c.estimate is not None}
    if len(known) == 2:
        est.binds = min(known, key=lambda k: known[k].estimate)
        est.capacity.estimate = known[est.binds].estimate
    elif len(known) == 1:
        (kind, mine), other = next(iter(known.items())), d if "prefill" in known else p
        if other.lo >= mine.estimate:
            est.binds, est.capacity.estimate = kind, mine.estimate
    if est.capacity.estimate is None:
        est.binds = "prefill" if p.hi <= d.lo else "decode" if d.hi <= p.lo else ""
        missing = [k for k, c_ in (("prefill", p), ("decode", d)) if c_.estimate is None]
        est.unknown = "; ".join(_why_no_estimate(k, caps[k]) for k in missing)
    return est


def _why_no_estimate(kind: str, cap: Capacity) -> str:
    target = _TARGET[kind]
    if cap.lo_sample is None and cap.hi_sample is None:
        return f"no run measured {kind} nodes"
    if cap.hi_sample is None:
        how = ("a topology with more prefill nodes per decode node pushes them further" if kind == "decode"
               else "add a higher rate")
        return f"no run saturated the {kind} nodes ({target} met up to {cap.lo:.3g} req/s per node): {how}"
    return (f"the {kind} nodes missed {target} at every rate, from {cap.hi:.3g} req/s per node: "
            f"add a lower rate")


def splits_for(gpus: int) -> list[tuple[int, int, int]]:
    return [(x, gpus - x, 0) for x in range(1, gpus)] + [(0, 0, gpus)]


# --- one workload -----------------------------------------------------------------------------
@dataclass(slots=True)
class MeasuredTopology:
    topology: str
    gpus: int
    capacity: Capacity
    best_goodput: float
    ratio: tuple[float, float] | None = None    # (lo, hi) of capacity / the suggestion's

    def ratio_text(self) -> str:
        return _ratio_text(self.ratio)

    def to_json(self) -> dict[str, Any]:
        lo, hi = self.ratio or (None, None)
        return {"topology": self.topology, "gpus": self.gpus, **self.capacity.to_json(),
                "best_goodput": self.best_goodput,
                "ratio_to_suggestion": None if self.ratio is None else
                {"lo": _finite(lo), "hi": _finite(hi), "text": self.ratio_text()}}


@dataclass(slots=True)
class Advice:
    workload: dict[str, Any]
    gpus: int
    attainment: float
    capacities: dict[str, Capacity]
    splits: list[SplitEstimate]
    suggestion: SplitEstimate | None
    rivals: list[SplitEstimate]          # splits the data cannot rule out above the suggestion
    left_out: list[SplitEstimate]        # splits of a node kind no run measured
    measured: list[MeasuredTopology]
    skipped: list[str]                   # runs not used, and why
    reason: str = ""                     # why there is no suggestion
    split_per_request: list[str] = field(default_factory=list)   # measured, not used for node capacities

    @property
    def line(self) -> str:
        return advice_line(self)

    def to_json(self) -> dict[str, Any]:
        s = self.suggestion
        return {"workload": self.workload, "gpus": self.gpus, "attainment": self.attainment,
                "capacity_per_node": {k: c.to_json() for k, c in self.capacities.items() if c.measured},
                "splits": [e.to_json() for e in self.splits],
                "suggestion": None if s is None else {"split": s.split, "estimate": s.capacity.estimate,
                                                      "lo": _finite(s.capacity.lo), "hi": _finite(s.capacity.hi),
                                                      "binds": s.binds or None,
                                                      "might_do_better": [r.split for r in self.rivals]},
                "cannot_tell": self.reason or None,
                "not_estimated": {e.split: e.unknown for e in self.left_out},
                "measured": [m.to_json() for m in self.measured],
                "skipped_runs": self.skipped, "split_per_request": self.split_per_request, "line": self.line}


def workload_key(run: dict[str, Any]) -> tuple:
    slo = run.get("slo") or {}

    def r(v: Any) -> float | None:
        return None if v is None else round(float(v), 1)
    return (run.get("workload"), r(run.get("mean_prompt_tokens")), r(run.get("mean_max_tokens")),
            slo.get("ttft_ms"), slo.get("tpot_ms"))


def advise(runs: Sequence[dict[str, Any]], gpus: int | None = None,
           attainment: float = DEFAULT_ATTAINMENT) -> list[Advice]:
    """One Advice per workload among `runs`, for `gpus` GPUs (default: the most nodes any
    measured topology of that workload used)."""
    if not 0 < attainment <= 1:
        raise ValueError(f"SLO attainment {attainment}: give a share in (0, 1], e.g. 0.9")
    if gpus is not None and gpus < 1:
        raise ValueError(f"advisor GPUs {gpus}: give 1 or more")
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(workload_key(run), []).append(run)
    return [_advise_workload(key, rs, gpus, attainment) for key, rs in groups.items()]


def _advise_workload(key: tuple, runs: list[dict[str, Any]], gpus: int | None, attainment: float) -> Advice:
    name, prompt, max_tokens, ttft, tpot = key
    output = max_tokens if max_tokens is not None else _mean([r.get("mean_output_tokens") for r in runs])
    workload = {"name": name, "mean_prompt_tokens": prompt, "mean_output_tokens": output,
                "slo": {"ttft_ms": ttft, "tpot_ms": tpot}}
    points: list[RunPoint] = []
    skipped = []
    for run in runs:
        p = run_point(run)
        if isinstance(p, str):
            skipped.append(f"{run['topology']} at {_load_text(run.get('load') or {})}: {p}")
        else:
            points.append(p)
    split_per_request = list(dict.fromkeys(p.label for p in points if not p.pure))
    samples = node_samples(points, attainment)
    caps = {k: capacity(samples[k], attainment) for k in KINDS}
    n = gpus or max((p.nodes for p in points), default=0)
    measured = _measured(points, attainment)
    if n < 1:
        return Advice(workload, 0, attainment, caps, [], None, [], [], measured, skipped,
                      "no run with an arrival rate and per-request results", split_per_request)
    splits = [estimate_split(x, y, c, caps) for x, y, c in splits_for(n)]
    contest = [s for s in splits if s.capacity.measured]
    left_out = [s for s in splits if not s.capacity.measured]
    advice = Advice(workload, n, attainment, caps, splits, None, [], left_out, measured, skipped,
                    split_per_request=split_per_request)
    if not contest:
        advice.reason = "no run measured the node kinds of any split of " + f"{n} GPUs"
        return advice
    best = max(contest, key=lambda s: (s.capacity.value, s.capacity.estimate is not None))
    if best.capacity.value <= 0:
        advice.reason = "no split is known to serve any rate within the SLO: " + \
                        "; ".join(sorted({s.unknown for s in contest if s.unknown}))
        return advice
    rivals = [s for s in contest if s is not best and s.capacity.ceiling > best.capacity.value]
    if rivals and best.capacity.estimate is None:
        advice.reason = (f"{best.split} serves at least {best.capacity.lo:.2f} req/s, but "
                         + ", ".join(f"{r.split} ({_bound(r.capacity.hi)})" for r in rivals)
                         + " may serve more: " + "; ".join(sorted({r.unknown for r in [best, *rivals] if r.unknown})))
        return advice
    advice.suggestion, advice.rivals = best, rivals
    for m in measured:
        m.ratio = _ratio(m.capacity, best.capacity)
    return advice


def _measured(points: Sequence[RunPoint], attainment: float) -> list[MeasuredTopology]:
    """Each measured topology's own capacity: its runs' attainment of both targets."""
    out = []
    # "1P1D (dir)" (report.load_runs' label for a topology and load found in several files)
    # is the same topology as "1P1D": within one workload their runs are pooled. A run that
    # split per request is its own entry, "colocated2 (conditional)".
    for label in dict.fromkeys(p.label for p in points):
        mine = [p for p in points if p.label == label]
        cap = capacity([Sample(p.rate, p.both_met, f"{p.topology} at {p.rate:g} req/s", per_node=False)
                        for p in mine], attainment)
        out.append(MeasuredTopology(label, mine[0].nodes, cap, max(p.goodput for p in mine)))
    return out


def _ratio(mine: Capacity, best: Capacity) -> tuple[float, float]:
    """(lo, hi) of mine / best. Where one is the other scaled (the suggestion is the
    measured topology, or a colocated one of another size estimated from its runs alone),
    the ratio is that scale even when neither is pinned down."""
    if best.lo > 0 and mine.lo > 0:
        k = mine.lo / best.lo
        if (math.isclose(mine.hi, k * best.hi) or math.isinf(mine.hi) and math.isinf(best.hi)) and (
                mine.estimate is None and best.estimate is None
                or None not in (mine.estimate, best.estimate) and math.isclose(mine.estimate, k * best.estimate)):
            return k, k
    lo = mine.value / best.ceiling if best.ceiling > 0 else 0.0
    hi = mine.ceiling / best.value if best.value > 0 else math.inf
    return lo, hi


def _ratio_text(ratio: tuple[float, float] | None) -> str:
    if ratio is None:
        return "?"
    lo, hi = ratio
    if math.isclose(lo, hi, rel_tol=1e-9):
        return f"{lo:.2f}x"
    if math.isinf(hi):
        return f">= {lo:.2f}x" if lo > 0 else "unknown"
    if lo <= 0:
        return f"<= {hi:.2f}x"
    return f"{lo:.2f}-{hi:.2f}x"


# --- the line ------------------------------------------------------------------------------------
def advice_line(a: Advice) -> str:
    w = a.workload
    slo = w["slo"]
    head = (f"**Advisor** (`{w['name']}`, prompt {_fmt(w['mean_prompt_tokens'], 0)} / output "
            f"{_fmt(w['mean_output_tokens'], 0)} tokens, {a.gpus} GPUs, {100 * a.attainment:.0f}% of requests within "
            + (f"TTFT <= {slo['ttft_ms']:g} ms and TPOT <= {slo['tpot_ms']:g} ms)"
               if None not in (slo["ttft_ms"], slo["tpot_ms"]) else "the SLO)"))
    parts = []
    s = a.suggestion
    if s is None:
        parts.append(f"{head}: cannot tell — {a.reason}.")
    else:
        c = s.capacity
        amount = (f"about {c.estimate:.2f} req/s" if c.estimate is not None else
                  f"at least {c.lo:.2f} req/s" + (f" (at most {c.hi:.2f})" if math.isfinite(c.hi) else ""))
        bound = f", bound by its {s.binds} nodes" if s.binds and s.binds != "colocated" else ""
        parts.append(f"{head}: **{s.split}**, {amount}{bound}.")
        if a.rivals:
            parts.append("Might do better: " + "; ".join(
                f"{r.split} ({_bound(r.capacity.hi)}: {r.unknown})" for r in a.rivals) + ".")
        others = [e for e in a.splits if e is not s and e.capacity.measured and e not in a.rivals]
        if others:
            parts.append("Other splits: " + ", ".join(f"{e.split} {_interval(e.capacity)}" for e in others) + ".")
        close = [e for e in others if e.capacity.estimate is not None and c.estimate is not None
                 and e.capacity.estimate >= CLOSE * c.estimate]
        if close:
            parts.append("Too close to call at the rates measured: " + ", ".join(e.split for e in close)
                         + f" within {100 * (1 - CLOSE):.0f}%.")
        if a.measured:
            parts.append("Measured topologies against it: " + ", ".join(
                f"{m.topology}{'' if m.gpus == a.gpus else f' ({m.gpus} GPUs)'} {m.ratio_text()}"
                for m in a.measured) + ".")
    if a.left_out:
        parts.append("Not estimated: " + ", ".join(f"{e.split} ({e.unknown})" for e in a.left_out) + ".")
    rests = [f"{kind} node {_interval(c)} ({_basis(c)})" for kind, c in a.capacities.items() if c.measured]
    if rests:
        parts.append("Rests on, per node: " + "; ".join(rests) + ".")
    if a.split_per_request:
        parts.append(f"Compared, not used for node capacities (the router chose each request's prefill): "
                     f"{', '.join(a.split_per_request)}.")
    return " ".join(parts)


def _basis(c: Capacity) -> str:
    used = [x for x in (c.lo_sample, c.hi_sample) if x is not None]
    return ", ".join(f"{x.source}: {100 * x.met:.0f}% met" for x in used) or "no sample"


def _interval(c: Capacity) -> str:
    if c.estimate is not None:
        return f"~{c.estimate:.2f} ({c.lo:.2f}-{c.hi:.2f}) req/s"
    if math.isinf(c.hi):
        return f">= {c.lo:.2f} req/s"
    if c.lo <= 0:
        return f"< {c.hi:.2f} req/s"
    return f"{c.lo:.2f}-{c.hi:.2f} req/s"


def _bound(v: float) -> str:
    return "no upper bound" if math.isinf(v) else f"at most {v:.2f} req/s"


def _fmt(v: float | None, digits: int) -> str:
    return "?" if v is None else f"{v:.{digits}f}"


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _load_text(load: dict[str, Any]) -> str:
    if load.get("mode") == "concurrency":
        return f"concurrency {load.get('concurrency')}"
    rate = load.get("request_rate")
    return "all at once" if rate in (None, "inf") else f"{float(rate):g} req/s"


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.advisor RUNS... [--gpus N]`: the advisor lines for earlier runs
    (summary.json or run files), e.g. a 4-GPU suggestion from 2-GPU runs."""
    from bench.report import load_runs

    parser = argparse.ArgumentParser(prog="python -m bench.advisor", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="JSON", help="summary.json or run files")
    parser.add_argument("--gpus", type=int, default=None, metavar="N",
                        help="split this many GPUs (default: the most nodes a measured topology used)")
    parser.add_argument("--slo-attainment", type=float, default=DEFAULT_ATTAINMENT, metavar="F",
                        help=f"share of requests that must meet the SLO (default {DEFAULT_ATTAINMENT})")
    parser.add_argument("--json", action="store_true", help="print the advice as JSON")
    args = parser.parse_args(argv)
    try:
        advice = advise(load_runs(args.runs), args.gpus, args.slo_attainment)
    except ValueError as e:
        print(f"bench.advisor: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([a.to_json() for a in advice], indent=2, allow_nan=False))
    else:
        print("\n\n".join(a.line for a in advice))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
