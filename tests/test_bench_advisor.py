"""The P:D advisor (bench/advisor.py): on synthetic runs whose right answer is known
(a prefill-bound workload wants more prefill nodes, a decode-bound one more decode nodes,
runs that saturated nothing cannot tell), and on the committed 2×H200 results.

A synthetic run is what `pdcluster bench` writes for one rate, reduced to what the
advisor reads: the topology, the rate, the SLO and per-request TTFT/TPOT, where the first
`ttft_met` share of the requests meet TTFT and the first `tpot_met` share meet TPOT.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from bench import advisor, report
from bench.cli import BenchPlan

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results" / "2026-11-23-h200x2"
SLO = {"ttft_ms": 1000.0, "tpot_ms": 100.0}


def _run(topology: str, rate: float | str, ttft_met: float = 1.0, tpot_met: float = 1.0, *, n: int = 100,
         completed_rate: float | None = None, failed: int = 0, workload: str = "fixed", prompt: float = 1000.0):
    per_request = []
    for i in range(n):
        ok = i < n - failed
        per_request.append({"index": i, "ok": ok, "ttft_ms": (500.0 if i < ttft_met * n else 2000.0) if ok else None,
                            "tpot_ms": (50.0 if i < tpot_met * n else 200.0) if ok else None,
                            "prompt_tokens": int(prompt), "output_tokens": 100 if ok else 0, "cached_tokens": 0})
    duration = n / (completed_rate or (rate if isinstance(rate, float) else 10.0))
    good = sum(r["ok"] and r["ttft_ms"] <= 1000 and r["tpot_ms"] <= 100 for r in per_request)
    return {"topology": topology, "load": {"mode": "rate", "request_rate": rate}, "workload": workload,
            "slo": SLO, "mean_prompt_tokens": prompt, "mean_max_tokens": 100.0, "duration_s": duration,
            "goodput": good / duration, "output_throughput": 100 * (n - failed) / duration,
            "per_request": per_request}


def _only(advice: list[advisor.Advice]) -> advisor.Advice:
    assert len(advice) == 1
    return advice[0]


def test_capacity_brackets_and_interpolates_the_rate_where_attainment_crosses_the_target():
    cap = advisor.capacity([advisor.Sample(1.0, 1.0, "a"), advisor.Sample(2.0, 0.5, "b"),
                            advisor.Sample(4.0, 0.1, "c")], 0.9)
    assert (cap.lo, cap.hi) == (1.0, 2.0) and cap.estimate == pytest.approx(1.2)   # 1 + (1 - .9)/(1 - .5)
    only_met = advisor.capacity([advisor.Sample(3.0, 0.95, "a")], 0.9)
    assert (only_met.lo, only_met.hi, only_met.estimate) == (3.0, math.inf, None)
    only_missed = advisor.capacity([advisor.Sample(3.0, 0.2, "a")], 0.9)
    assert (only_missed.lo, only_missed.hi, only_missed.estimate) == (0.0, 3.0, None)
    noisy = advisor.capacity([advisor.Sample(1.0, 1.0, "a"), advisor.Sample(2.0, 0.5, "b"),
                              advisor.Sample(3.0, 0.95, "c")], 0.9)
    assert (noisy.lo, noisy.hi) == (1.0, 2.0) and "not used" in noisy.evidence[-1]


def test_run_point_counts_failed_requests_as_misses_and_skips_runs_without_an_arrival_rate():
    p = advisor.run_point(_run("2P1D", 4.0, ttft_met=0.9, tpot_met=0.8, failed=10))
    assert (p.prefill_nodes, p.decode_nodes, p.colocated_nodes) == (2, 1, 0)
    assert p.ttft_met == pytest.approx(0.9) and p.tpot_met == pytest.approx(0.8) and p.both_met == pytest.approx(0.8)
    one_token = _run("colocated1", 4.0)
    one_token["per_request"][0]["tpot_ms"] = None                  # one output token: no TPOT, met
    assert advisor.run_point(one_token).tpot_met == 1.0
    assert advisor.run_point(_run("1P1D", "inf")) == "no arrival rate (burst or closed loop)"
    assert advisor.run_point({**_run("1P1D", 2.0), "per_request": []}) == "no per-request results"
    assert advisor.run_point({**_run("1P1D", 2.0), "topology": "external"}) == "unknown node roles"
    with_nodes = {**_run("x", 2.0), "nodes": [{"name": "a", "role": "prefill"}, {"name": "b", "role": "decode"},
                                              {"name": "c", "role": "decode"}]}
    assert advisor.node_counts(with_nodes) == (1, 2, 0)
    assert advisor.node_counts({"topology": "1P1D (2026-11-23)"}) == (1, 1, 0)   # report.load_runs' label


def test_run_point_leaves_requests_never_sent_out_of_the_shares():
    run = _run("1P1D", 4.0, ttft_met=0.9, tpot_met=0.8, n=10)
    run["per_request"] += [{"index": 10 + i, "ok": False, "unsent": True, "ttft_ms": None, "tpot_ms": None,
                            "prompt_tokens": 1000, "output_tokens": 0, "cached_tokens": 0} for i in range(10)]
    p = advisor.run_point(run)            # the server never saw the 10 unsent: they are no misses
    assert p.ttft_met == pytest.approx(0.9) and p.tpot_met == pytest.approx(0.8) and p.both_met == pytest.approx(0.8)
    none_sent = {**run, "per_request": [r for r in run["per_request"] if r.get("unsent")]}
    assert advisor.run_point(none_sent) == "no request sent"


def test_a_prefill_bound_workload_gets_more_prefill_nodes():
    # One prefill node keeps 90% of TTFTs in target up to ~1.2 req/s; one decode node takes
    # at least 4 (3P1D passed it everything its prefill nodes let through); a colocated node ~0.58.
    runs = [_run("1P1D", 1.0), _run("1P1D", 2.0, ttft_met=0.5),
            _run("3P1D", 3.0), _run("3P1D", 6.0, ttft_met=0.5, completed_rate=4.0),
            _run("colocated2", 1.0), _run("colocated2", 2.0, ttft_met=0.4)]
    a = _only(advisor.advise(runs, gpus=4))
    assert a.gpus == 4 and a.suggestion is not None and a.suggestion.split == "3P1D"
    assert a.suggestion.capacity.estimate == pytest.approx(3.6) and a.suggestion.binds == "prefill"
    est = {s.split: s.capacity.estimate for s in a.splits}
    assert est["1P3D"] == pytest.approx(1.2) and est["2P2D"] == pytest.approx(2.4)
    assert est["colocated4"] == pytest.approx(4 * (0.5 + 0.1 / 0.6 * 0.5))
    assert a.capacities["decode"].lo == pytest.approx(4.0) and a.capacities["decode"].estimate is None
    assert "completed rate" in " ".join(a.capacities["decode"].evidence)   # what the decode node was credited with
    ratios = {m.topology: m.ratio for m in a.measured}
    assert ratios["colocated2"][0] == pytest.approx((1 + 0.1 / 0.6) / 3.6)   # its own 1.17 req/s against 3.6
    assert a.line.startswith("**Advisor** (`fixed`, prompt 1000 / output 100 tokens, 4 GPUs, 90% of requests")
    assert "**3P1D**, about 3.60 req/s, bound by its prefill nodes" in a.line
    assert "colocated2 (2 GPUs) 0.32x" in a.line and "1P1D at 2 req/s: 50% met" in a.line
    # Default N: the most nodes a measured topology used (3P1D: 4).
    assert _only(advisor.advise(runs)).gpus == 4
    json.dumps(a.to_json(), allow_nan=False)


def test_a_decode_bound_workload_gets_more_decode_nodes():
    runs = [_run("1P1D", 1.0), _run("1P1D", 2.0, tpot_met=0.5),
            _run("1P3D", 3.0), _run("1P3D", 4.5, tpot_met=0.5)]
    a = _only(advisor.advise(runs, gpus=4))
    assert a.suggestion is not None and a.suggestion.split == "1P3D" and a.suggestion.binds == "decode"
    assert a.capacities["decode"].estimate == pytest.approx(1.1)          # 1 + 0.1/0.5 * 0.5 per node
    est = {s.split: s.capacity.estimate for s in a.splits}
    assert est["1P3D"] == pytest.approx(3.3) and est["2P2D"] == pytest.approx(2.2) and est["3P1D"] == pytest.approx(1.1)
    assert [s.split for s in a.left_out] == ["colocated4"]
    assert "colocated4 (no colocated run with one node per request)" in a.line
    # The same workload on two GPUs: the only split is 1P1D.
    assert _only(advisor.advise(runs, gpus=2)).suggestion.split == "1P1D"


def test_runs_that_saturated_nothing_cannot_tell_and_say_what_to_measure():
    runs = [_run(t, r) for t in ("1P1D", "colocated2") for r in (1.0, 2.0)]
    a = _only(advisor.advise(runs))
    assert a.suggestion is None and a.gpus == 2
    assert all(s.capacity.estimate is None for s in a.splits)             # no invented number
    assert "cannot tell" in a.line and "no run saturated the prefill nodes" in a.line and "add a higher rate" in a.line
    assert a.to_json()["suggestion"] is None and a.to_json()["cannot_tell"]


def test_bounds_alone_can_decide_when_one_split_is_surely_ahead():
    # colocated nodes met both targets at every rate; the decode node missed TPOT at the lowest rate.
    runs = [_run("1P1D", 4.0, tpot_met=0.5), _run("colocated2", 4.0), _run("colocated2", 8.0)]
    a = _only(advisor.advise(runs))
    assert a.suggestion.split == "colocated2" and a.suggestion.capacity.estimate is None
    assert "**colocated2**, at least 8.00 req/s" in a.line and "1P1D <= 0.50x" in a.line


def test_runs_that_split_per_request_are_compared_but_measure_no_node_kind():
    runs = [_run("1P1D", 1.0), _run("1P1D", 2.0, tpot_met=0.5),
            {**_run("1P1D", 1.5), "disaggregation_mode": "always"},
            {**_run("colocated2", 1.0), "disaggregation_mode": "conditional"},
            {**_run("colocated2", 4.0, ttft_met=0.5), "disaggregation_mode": "conditional"}]
    runs[0]["per_request"][0].update(prefill="local", prefill_reason="single_token")   # even `always` does that
    local = _run("1P1D", 3.0)
    local["per_request"][0].update(prefill="local", prefill_reason="short_prompt")
    runs.append(local)
    a = _only(advisor.advise(runs))
    assert not a.capacities["colocated"].measured and [s.split for s in a.left_out] == ["colocated2"]
    assert [p.source for p in (a.capacities["decode"].lo_sample, a.capacities["decode"].hi_sample)] == \
        ["1P1D at 1.5 req/s", "1P1D at 2 req/s"]               # the 3 req/s run split per request
    measured = {m.topology: m for m in a.measured}
    assert set(measured) == {"1P1D", "colocated2 (conditional)", "1P1D (per-request split)"}
    assert a.suggestion.split == "1P1D" and measured["colocated2 (conditional)"].capacity.lo == 1.0
    assert "colocated2 (conditional) " in a.line and "not used for node capacities" in a.line
    assert a.to_json()["split_per_request"] == ["colocated2 (conditional)", "1P1D (per-request split)"]


def test_workloads_are_advised_separately():
    runs = [_run("1P1D", 1.0), _run("1P1D", 2.0, ttft_met=0.5),
            _run("1P1D", 1.0, workload="sharegpt", prompt=200), _run("1P1D", 2.0, workload="sharegpt", prompt=200)]
    names = [a.workload["name"] for a in advisor.advise(runs)]
    assert names == ["fixed", "sharegpt"]


def test_advisor_options_are_checked_before_anything_starts():
    base = dict(topologies=["1P1D"], out="x")
    plan = BenchPlan.from_args(argparse.Namespace(**base, advisor_gpus=4, slo_attainment=0.95))
    assert plan.advisor_gpus == 4 and plan.slo_attainment == 0.95
    with pytest.raises(ValueError, match="--advisor-gpus"):
        BenchPlan.from_args(argparse.Namespace(**base, advisor_gpus=0))
    with pytest.raises(ValueError, match="--slo-attainment"):
        BenchPlan.from_args(argparse.Namespace(**base, slo_attainment=1.5))


def test_report_on_the_committed_two_gpu_results(tmp_path):
    decode_heavy = _only(advisor.advise(report.load_runs([RESULTS / "decode-heavy" / "summary.json"])))
    # Colocated nodes met both targets at 8 req/s; the decode node missed TPOT already at 4.
    assert decode_heavy.suggestion.split == "colocated2" and "at least 8.00 req/s" in decode_heavy.line
    assert "1P1D <= 0.50x" in decode_heavy.line and "1P1D at 4 req/s: 50% met" in decode_heavy.line

    text = report.compare([RESULTS / "prefill-heavy" / "summary.json"], tmp_path / "out", advisor_gpus=4)
    assert "**Advisor** (`random-uniform`, prompt 2031 / output 67 tokens, 4 GPUs" in text
    assert "**2P2D**, about 4.94 req/s, bound by its prefill nodes" in text   # 2 x 2.47 per prefill node
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    (entry,) = summary["advisor"]
    assert entry["gpus"] == 4 and entry["suggestion"]["split"] == "2P2D"
    assert entry["capacity_per_node"]["prefill"]["estimate"] == pytest.approx(2.47, abs=0.01)
    assert {m["topology"]: m["ratio_to_suggestion"]["text"] for m in entry["measured"]} == \
        {"1P1D": "0.48x", "colocated2": "0.48x"}
    assert entry["line"] in (tmp_path / "out" / "report.md").read_text()
