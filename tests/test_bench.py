"""The benchmark harness (bench/): workloads, the load generator, metrics, the report,
and a short CPU run of `pdcluster bench` through real clusters (1P1D and colocated1).

The unit tests use hand-made inputs with known answers; the load generator's tests run
against a fake router (an httpx transport) whose timing is known. The smoke run checks
what the report says, not only that it was written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import time
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from rich.progress import Progress

from bench import report
from bench import cli as bench_cli
from bench import soak
from bench.cli import BenchPlan, model_limits, per_request, run_bench
from bench.client import METRICS_SETTLE_S, LoadRun, QueueSample, RequestResult, run_duration, run_load
from bench.metrics import SLO, cluster_delta, distribution, parse_prometheus, queue_peaks, rescore, summarize
from bench.workloads import (TOKEN_ID_MARGIN, BenchRequest, WorkloadOptions, make_workload, parse_rates,
                             with_poisson_arrivals)


# --- workloads ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fixed", "random-uniform", "random-lognormal", "sharegpt", "prefix-agents"])
def test_workload_is_repeatable_with_a_seed_and_stays_in_the_vocabulary(name):
    opts = WorkloadOptions(num_requests=50, input_len=40, output_len=10, vocab_size=500, seed=7,
                           system_prompt_len=30, turn_len=5)
    a, b = make_workload(name, opts), make_workload(name, opts)
    assert [(r.prompt_ids, r.max_tokens, r.agent_id, r.after) for r in a] == \
           [(r.prompt_ids, r.max_tokens, r.agent_id, r.after) for r in b]
    other = make_workload(name, replace(opts, seed=8))
    assert [r.prompt_ids for r in other] != [r.prompt_ids for r in a]
    ids = np.concatenate([r.prompt_ids for r in a])
    assert ids.min() >= TOKEN_ID_MARGIN and ids.max() < 500 - TOKEN_ID_MARGIN
    assert len(a) == 50 and [r.index for r in a] == list(range(50))
    assert all(r.prompt_len + r.max_tokens <= opts.max_model_len for r in a)


def test_salt_changes_token_ids_but_not_lengths():
    opts = WorkloadOptions(num_requests=20, input_len=64, output_len=8, vocab_size=1000)
    a, b = make_workload("random-uniform", opts, salt=0), make_workload("random-uniform", opts, salt=1)
    assert [(r.prompt_len, r.max_tokens) for r in a] == [(r.prompt_len, r.max_tokens) for r in b]
    assert all(x.prompt_ids != y.prompt_ids for x, y in zip(a, b))


def test_fixed_uniform_and_lognormal_lengths_follow_their_options():
    fixed = make_workload("fixed", WorkloadOptions(num_requests=10, input_len=100, output_len=20, length_scale=0.5))
    assert {(r.prompt_len, r.max_tokens) for r in fixed} == {(50, 10)}
    uni = make_workload("random-uniform", WorkloadOptions(num_requests=2000, input_len=100, output_len=20,
                                                          range_ratio=0.5))
    ins = np.array([r.prompt_len for r in uni])
    assert ins.min() >= 50 and ins.max() <= 150 and abs(ins.mean() - 100) < 3
    logn = make_workload("random-lognormal", WorkloadOptions(num_requests=4000, input_len=200, output_len=50))
    assert abs(np.median([r.prompt_len for r in logn]) - 200) < 12
    assert abs(np.median([r.max_tokens for r in logn]) - 50) < 4


def test_sharegpt_mix_has_the_published_means_and_a_long_tail():
    reqs = make_workload("sharegpt", WorkloadOptions(num_requests=20000))
    ins, outs = np.array([r.prompt_len for r in reqs]), np.array([r.max_tokens for r in reqs])
    assert 180 < ins.mean() < 300 and 150 < outs.mean() < 250
    assert np.median(ins) < ins.mean()              # right-skewed
    assert ins.max() <= 1024 and (ins + outs).max() <= 2048 and np.percentile(ins, 99) > 700
    small = make_workload("sharegpt", WorkloadOptions(num_requests=20000, length_scale=0.1))
    assert 15 < np.mean([r.prompt_len for r in small]) < 30


def test_prefix_agents_share_system_prompts_and_grow_their_conversations():
    opts = WorkloadOptions(num_requests=24, num_agents=4, num_system_prompts=2, system_prompt_len=32, turn_len=8,
                           output_len=4, vocab_size=1000)
    reqs = make_workload("prefix-agents", opts)
    by_agent: dict[str, list[BenchRequest]] = {}
    for r in reqs:
        by_agent.setdefault(r.agent_id, []).append(r)
    assert sorted(by_agent) == ["agent-0", "agent-1", "agent-2", "agent-3"]
    for turns in by_agent.values():
        assert turns[0].after is None
        for prev, cur in zip(turns, turns[1:]):
            assert cur.after == prev.index                      # waits for its previous turn
            assert cur.prompt_ids[:prev.prompt_len] == prev.prompt_ids  # the previous prompt is a prefix
            assert cur.prompt_len == prev.prompt_len + 8 + 4    # + its user turn + the (synthetic) reply
    first = {a: turns[0].prompt_ids[:32] for a, turns in by_agent.items()}
    assert first["agent-0"] == first["agent-2"] and first["agent-1"] == first["agent-3"]
    assert first["agent-0"] != first["agent-1"]
    assert {r.workflow_id for r in by_agent["agent-0"] + by_agent["agent-2"]} == {"workflow-0"}
    assert by_agent["agent-0"][0].prompt_ids != by_agent["agent-2"][0].prompt_ids  # own user turn


def test_prefix_agents_restart_a_conversation_that_no_longer_fits():
    opts = WorkloadOptions(num_requests=40, num_agents=1, system_prompt_len=50, turn_len=10, output_len=10,
                           max_model_len=150)
    reqs = make_workload("prefix-agents", opts)
    assert all(r.prompt_len + r.max_tokens <= 150 for r in reqs)
    assert min(r.prompt_len for r in reqs[1:]) == 60            # restarted after its system prompt


def test_poisson_arrivals_have_the_rate_and_are_repeatable():
    reqs = make_workload("fixed", WorkloadOptions(num_requests=20000, input_len=4, output_len=1))
    timed = with_poisson_arrivals(reqs, 50.0, seed=3)
    t = np.array([r.arrival_s for r in timed])
    assert t[0] == 0 and np.all(np.diff(t) >= 0)
    assert abs(np.diff(t).mean() - 1 / 50) < 0.001
    assert abs(np.diff(t).std() - 1 / 50) < 0.001           # exponential: std == mean
    assert [r.arrival_s for r in with_poisson_arrivals(reqs[:10], 50.0, seed=3)] == list(t[:10])
    assert {r.arrival_s for r in with_poisson_arrivals(reqs[:10], math.inf)} == {0.0}
    assert parse_rates("1, 2.5,inf") == [1.0, 2.5, math.inf] and parse_rates(4) == [4.0]
    with pytest.raises(ValueError, match="positive"):
        parse_rates("0")
    with pytest.raises(ValueError, match="choose one of"):
        make_workload("nope", WorkloadOptions())


# --- the load generator against a fake router -------------------------------------------------------
class FakeRouter:
    """/v1/completions streaming like the router: headers after the first token, then one
    chunk per `gap_s`, `per_chunk` tokens each, the usage chunk, [DONE]."""

    def __init__(self, ttft_s=0.05, gap_s=0.02, per_chunk=1, status=200, stream_error=False):
        self.ttft_s, self.gap_s, self.per_chunk = ttft_s, gap_s, per_chunk
        self.status, self.stream_error = status, stream_error
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.scrapes = 0

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            self.scrapes += 1
            return httpx.Response(200, text=f"pdcluster_node_prefix_cache_hits_total{{node=\"both-0\",role=\"both\"}} {self.scrapes}\n")
        if request.url.path == "/cluster":
            return httpx.Response(200, json={"nodes": [{"id": "both-0", "running": self.in_flight, "waiting": 1}]})
        body = json.loads(request.content)
        self.bodies.append(body)
        if self.status != 200:
            return httpx.Response(self.status, json={"error": {"message": "too busy", "type": "x", "code": 429}})
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(self.ttft_s)
        return httpx.Response(200, content=self._events(body["max_tokens"]),
                              headers={"content-type": "text/event-stream"})

    async def _events(self, n: int):
        # The request counts as finished as [DONE] goes out: the client stops reading
        # there, and a mock stream is not closed when its reader stops.
        sent = 0
        while sent < n:
            if sent:
                await asyncio.sleep(self.gap_s)
            k = min(self.per_chunk, n - sent)
            sent += k
            yield _sse({"choices": [{"index": 0, "text": "x" * k, "finish_reason": "length" if sent == n else None}]})
            if self.stream_error:
                yield _sse({"error": {"message": "node gone", "type": "x", "code": 503}})
                break
        else:
            yield _sse({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}})
        self.in_flight -= 1
        yield b"data: [DONE]\n\n"


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _load(fake: FakeRouter, requests, **kw):
    return asyncio.run(run_load("http://fake", requests, transport=httpx.MockTransport(fake.handle),
                                metrics_settle_s=0.0, sample_interval_s=0.02, **kw))


def _reqs(n: int, max_tokens: int = 5, **kw) -> list[BenchRequest]:
    return [BenchRequest(i, [11, 12, 13], max_tokens, **kw) for i in range(n)]


def test_client_times_ttft_itl_and_tpot_from_the_stream():
    fake = FakeRouter(ttft_s=0.05, gap_s=0.02)
    run = _load(fake, _reqs(1, max_tokens=5, workflow_id="wf", agent_id="a1"))
    (r,) = run.results
    assert r.ok and r.error == "" and r.output_tokens == 5 and r.num_chunks == 5
    assert 0.05 <= r.ttft_s < 0.2
    assert len(r.itl_s) == 4 and all(0.02 <= g < 0.1 for g in r.itl_s)
    assert r.e2e_s >= r.ttft_s + 0.08
    assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 4)
    body = fake.bodies[0]
    assert body["prompt"] == [11, 12, 13] and body["max_tokens"] == 5 and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["workflow_id"] == "wf" and body["agent_id"] == "a1"
    assert run.metrics_before and run.metrics_after != run.metrics_before   # scraped before and after
    assert run.queue_samples and run.queue_samples[0].nodes["both-0"][1] == 1


def test_client_counts_tokens_from_usage_when_a_chunk_carries_several():
    run = _load(FakeRouter(ttft_s=0.01, gap_s=0.02, per_chunk=2), _reqs(1, max_tokens=6))
    (r,) = run.results
    assert r.ok and r.num_chunks == 3 and r.output_tokens == 6
    assert len(r.itl_s) == 2                                   # per chunk
    assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 5)  # per token


def test_client_reports_http_and_stream_errors_as_failures():
    r = _load(FakeRouter(status=429), _reqs(1)).results[0]
    assert not r.ok and r.error == "HTTP 429: too busy" and math.isnan(r.tpot_s)
    r = _load(FakeRouter(stream_error=True), _reqs(1)).results[0]
    assert not r.ok and r.error == "stream error: node gone"


def test_closed_loop_keeps_exactly_the_concurrency_in_flight():
    fake = FakeRouter(ttft_s=0.01, gap_s=0.01)
    run = _load(fake, _reqs(10, max_tokens=3), concurrency=3)
    assert all(r.ok for r in run.results) and fake.max_in_flight == 3


def test_open_loop_sends_at_arrival_times_and_after_the_previous_turn():
    fake = FakeRouter(ttft_s=0.01, gap_s=0.01)
    reqs = [BenchRequest(0, [11], 3, arrival_s=0.0), BenchRequest(1, [11], 3, arrival_s=0.15),
            BenchRequest(2, [11], 20, arrival_s=0.0), BenchRequest(3, [11], 2, arrival_s=0.0, after=2)]
    res = _load(fake, reqs).results
    assert res[0].send_s < 0.1 and 0.15 <= res[1].send_s < 0.4  # on time, with room for a busy CI box
    assert res[3].send_s >= res[2].send_s + res[2].e2e_s       # waited for request 2 to finish


def test_a_run_is_bounded_in_time():
    t0 = time.monotonic()
    res = _load(FakeRouter(ttft_s=0.01, gap_s=1.0), _reqs(3, max_tokens=10), max_duration_s=0.3).results
    assert time.monotonic() - t0 < 2.0
    assert all(not r.ok and "time limit" in r.error for r in res)


def test_the_time_limit_cuts_off_requests_in_flight_and_leaves_later_ones_unsent():
    reqs = [BenchRequest(0, [11], 10, arrival_s=0.0), BenchRequest(1, [11], 2, arrival_s=30.0)]
    run = _load(FakeRouter(ttft_s=0.01, gap_s=1.0), reqs, max_duration_s=0.3)
    in_flight, later = run.results
    assert in_flight.cut_off and not in_flight.unsent and not in_flight.ok
    assert 0.0 <= in_flight.send_s < 0.3 and 0.01 <= in_flight.ttft_s < 0.3   # its first token came: kept
    assert math.isnan(in_flight.e2e_s) and "cut off" in in_flight.error        # it never completed
    assert later.unsent and not later.cut_off and math.isnan(later.send_s) and "not sent" in later.error
    assert run.duration_s >= 0.3                                               # the run lasted until the cut


def test_a_cut_run_lasts_until_its_cutoff_not_its_last_finished_request():
    finished = RequestResult(0, True, 1, 2, output_tokens=2, send_s=0.0, ttft_s=0.01, e2e_s=0.11)
    cut = RequestResult(1, False, 1, 100, send_s=0.0, ttft_s=0.01, cut_off=True)
    assert run_duration([finished, cut], cut_at_s=1.0) == 1.0
    later = RequestResult(2, True, 1, 2, output_tokens=2, send_s=0.5, ttft_s=0.01, e2e_s=0.2)
    assert run_duration([finished, later], cut_at_s=None) == pytest.approx(0.7)   # uncut: the last answer


# --- metrics ----------------------------------------------------------------------------------------
def _result(i, ttft_ms, tpot_ms, out=11, ok=True) -> RequestResult:
    ttft = ttft_ms / 1e3
    return RequestResult(i, ok, prompt_tokens=100, max_tokens=out, output_tokens=out if ok else 0, send_s=0.0,
                         ttft_s=ttft, e2e_s=ttft + tpot_ms / 1e3 * (out - 1), itl_s=[tpot_ms / 1e3] * (out - 1),
                         error="" if ok else "HTTP 503: down")


def test_distribution_percentiles_on_known_values():
    d = distribution([v / 1e3 for v in range(1, 101)])           # 1..100 ms
    assert d["mean"] == pytest.approx(50.5) and d["median"] == pytest.approx(50.5)
    assert d["p90"] == pytest.approx(90.1) and d["p99"] == pytest.approx(99.01) and d["count"] == 100
    assert distribution([math.nan]) is None and distribution([]) is None


def test_goodput_counts_requests_meeting_both_targets():
    results = [_result(0, 100, 20), _result(1, 900, 90),          # both met
               _result(2, 1500, 20),                              # TTFT missed
               _result(3, 100, 150),                              # TPOT missed
               _result(4, 100, 20, out=1),                        # one token: TTFT alone decides
               _result(5, 100, 20, ok=False)]                     # failed
    s = summarize(results, duration_s=2.0, slo=SLO(ttft_ms=1000, tpot_ms=100))
    assert s["completed"] == 5 and s["failed"] == 1 and s["errors"] == [{"message": "HTTP 503: down", "count": 1}]
    assert s["goodput"] == pytest.approx(3 / 2.0) and s["slo_attainment"] == pytest.approx(3 / 6)
    assert s["request_throughput"] == pytest.approx(5 / 2.0)
    assert s["output_throughput"] == pytest.approx((11 * 4 + 1) / 2.0)
    assert s["ttft_ms"]["median"] == pytest.approx(100) and s["tpot_ms"]["count"] == 4
    assert s["tpot_ms"]["median"] == pytest.approx(55) and s["itl_ms"]["count"] == 40
    assert s["kv_transfer"] is None and s["queues"] is None
    json.dumps(s, allow_nan=False)


def test_unsent_requests_are_neither_sent_nor_failed_nor_in_the_slo_attainment():
    unsent = RequestResult(3, False, 100, 11, unsent=True, error="not sent within the run's time limit of 1.0 s")
    results = [_result(0, 100, 20), _result(1, 2000, 20), _result(2, 100, 20, ok=False), unsent]
    s = summarize(results, duration_s=1.0, slo=SLO(ttft_ms=1000, tpot_ms=100))
    assert s["requests"] == 3 and s["completed"] == 2 and s["failed"] == 1 and s["unsent"] == 1
    assert s["errors"] == [{"message": "HTTP 503: down", "count": 1}]
    assert s["slo_attainment"] == pytest.approx(1 / 3)                 # of the 3 sent, not of all 4
    run = {"topology": "1P1D", "load": {"mode": "rate", "request_rate": 1.0}, **s}
    assert report.table_row(run)[-1] == "2/3"                          # OK/sent
    assert "- 1P1D at 1 req/s: 1 failed (1x HTTP 503: down); 1 not sent before the run's time limit" \
        in report.markdown_report([run], advice=[])


def test_ttft_counts_requests_cut_off_after_their_first_token():
    def cut(i, ttft_s):
        return RequestResult(i, False, 100, 50, send_s=0.0, ttft_s=ttft_s, cut_off=True, error="cut off")
    results = [_result(0, 10, 20, out=2), cut(1, 0.5), cut(2, 0.5), cut(3, math.nan)]   # 3: no token yet
    s = summarize(results, duration_s=1.0, slo=SLO(ttft_ms=1000, tpot_ms=100))
    assert s["ttft_ms"]["count"] == 3 and s["ttft_ms"]["max"] == pytest.approx(500)
    assert s["completed"] == 1 and s["failed"] == 3 and s["goodput"] == pytest.approx(1.0)  # not completed
    assert s["e2e_ms"]["count"] == 1 and s["tpot_ms"]["count"] == 1


def test_the_run_file_flags_requests_cut_off_and_unsent():
    cut = per_request(RequestResult(1, False, 100, 50, send_s=0.2, ttft_s=0.5, cut_off=True, error="cut off"))
    assert cut["cut_off"] is True and cut["ttft_ms"] == 500.0 and cut["e2e_ms"] is None and "unsent" not in cut
    unsent = per_request(RequestResult(2, False, 100, 50, unsent=True, error="not sent"))
    assert unsent["unsent"] is True and unsent["send_ms"] is None and "cut_off" not in unsent
    assert "cut_off" not in per_request(_result(0, 100, 20)) and "unsent" not in per_request(_result(0, 100, 20))


def _kv_tail_metrics(loads: int, tail_s: float) -> str:
    return (f'pdcluster_node_kv_transfer_total{{node="d0",role="both",counter="streamed_loads"}} {loads}\n'
            f'pdcluster_node_kv_transfer_total{{node="d0",role="both",counter="stream_tail_seconds"}} {tail_s}\n')


def test_kv_share_of_ttft_is_over_the_requests_whose_prefill_was_remote():
    def timed(i, ttft_s, prefill):
        return RequestResult(i, True, 4096, 8, output_tokens=8, send_s=0.0, ttft_s=ttft_s, e2e_s=ttft_s + 0.07,
                             prefill=prefill)
    # Two requests pulled their KV (TTFT 400 ms, 20 ms tail each), two were prefilled locally.
    mixed = [timed(0, 0.4, "remote"), timed(1, 0.4, "remote"), timed(2, 0.1, "local"), timed(3, 0.1, "local")]
    s = summarize(mixed, 1.0, metrics_before=_kv_tail_metrics(0, 0.0), metrics_after=_kv_tail_metrics(2, 0.04))
    assert s["kv_transfer_share_of_ttft"] == pytest.approx(0.02 / 0.4)
    no_header = [timed(0, 0.4, ""), timed(1, 0.2, "")]                # a router that does not say: all of them
    s = summarize(no_header, 1.0, metrics_before=_kv_tail_metrics(0, 0.0), metrics_after=_kv_tail_metrics(2, 0.06))
    assert s["kv_transfer_share_of_ttft"] == pytest.approx(0.03 / 0.3)


_BEFORE = """# HELP x
pdcluster_node_kv_transfer_total{counter="bytes_loaded",node="decode-0",role="decode"} 1000.0
pdcluster_node_kv_transfer_total{counter="load_seconds",node="decode-0",role="decode"} 0.5
pdcluster_node_kv_transfer_total{counter="loads",node="decode-0",role="decode"} 2.0
pdcluster_node_prefix_cache_queries_total{node="prefill-0",role="prefill"} 10.0
pdcluster_node_prefix_cache_hits_total{node="prefill-0",role="prefill"} 1.0
pdcluster_node_prefix_cache_queries_total{node="decode-0",role="decode"} 50.0
pdcluster_node_prefix_cache_hits_total{node="decode-0",role="decode"} 0.0
"""
_AFTER = _BEFORE.replace("} 1000.0", "} 2000001000.0").replace("} 0.5", "} 2.5").replace("} 2.0", "} 12.0") \
    .replace('prefill"} 10.0', 'prefill"} 110.0').replace('prefill"} 1.0', 'prefill"} 26.0') \
    .replace('decode"} 50.0', 'decode"} 500.0')


def test_cluster_delta_gives_kv_bandwidth_and_prompt_side_hit_rate():
    assert ("pdcluster_node_kv_transfer_total", {"counter": "bytes_loaded", "node": "decode-0", "role": "decode"},
            1000.0) in parse_prometheus(_BEFORE)
    d = cluster_delta(_BEFORE, _AFTER)
    kv, prefix = d["kv_transfer"], d["prefix_cache"]
    assert kv["bytes_loaded"] == 2e9 and kv["load_seconds"] == pytest.approx(2.0) and kv["loads"] == 10
    assert kv["gb_per_s"] == pytest.approx(1.0)
    assert prefix["queries"] == 100 and prefix["hits"] == 25 and prefix["hit_rate"] == pytest.approx(0.25)
    assert cluster_delta("", "") == {"kv_transfer": None, "prefix_cache": None}
    extra = ('pdcluster_node_prefix_cache_query_tokens_total{node="prefill-0",role="prefill"} %s\n'
             'pdcluster_node_prefix_cache_hit_tokens_total{node="prefill-0",role="prefill"} %s\n'
             'pdcluster_node_kv_evictions_total{node="prefill-0",role="prefill"} %s\n'
             'pdcluster_node_eviction_policy{node="prefill-0",policy="workflow",role="prefill"} 1.0\n')
    prefix = cluster_delta(_BEFORE + extra % (100, 10, 3), _AFTER + extra % (1100, 510, 8))["prefix_cache"]
    assert prefix["token_hit_rate"] == pytest.approx(0.5) and prefix["evictions"] == 5
    assert prefix["eviction_policy"] == "workflow"


def test_queue_peaks_over_samples():
    q = queue_peaks([QueueSample(0.0, {"a": (1, 0), "b": (2, 3)}), QueueSample(0.5, {"a": (4, 2), "b": (0, 0)})])
    assert q["peak_waiting"] == 3 and q["peak_running"] == 4 and q["mean_waiting"] == 2.5
    assert q["peak_waiting_per_node"] == {"a": 2, "b": 3}
    assert q["mean_running_per_node"] == {"a": 2.5, "b": 1.0} and q["mean_waiting_per_node"] == {"a": 1.0, "b": 1.5}


# --- report ----------------------------------------------------------------------------------------
def _run(topology, rate, goodput, **extra) -> dict:
    s = summarize([_result(0, 100, 20), _result(1, 200, 30)], 1.0, SLO(1000, 100))
    return {"topology": topology, "load": {"mode": "rate", "request_rate": report.rate_field(rate)},
            **s, "goodput": goodput, **extra}


def test_report_table_and_verdict():
    runs = [_run("1P1D", 2.0, 1.8, kv_transfer={"loads": 4, "gb_per_s": 1.234}, kv_transfer_share_of_ttft=0.026),
            _run("colocated2", 2.0, 0.9),
            _run("1P1D", math.inf, 3.0), _run("colocated2", math.inf, 1.5)]
    table = report.markdown_table(runs)
    lines = table.splitlines()
    assert lines[0].startswith("| Topology | Load | Goodput (req/s) |") and len(lines) == 6
    assert lines[2] == "| 1P1D | 2 req/s | 1.80 | 2.00 | 22.0 | 150.0 | 199.0 | 25.0 | 29.9 | 1.234 | 2.6% | - | - | 2/2 |"
    row = report.table_row(_run("both", 1.0, 1.0, prefix_cache={"hit_rate": 0.5, "evictions": 12.0,
                                                               "eviction_policy": "workflow"}))
    assert row[-3:] == ["50%", "12 (workflow)", "2/2"]
    assert lines[5].startswith("| colocated2 | all at once | 1.50 |")
    v = report.verdict(runs)
    assert v.startswith("Best by goodput: **1P1D**, 3.00 req/s within TTFT <= 1000 ms and TPOT <= 100 ms")
    assert "2.00x colocated2 (1.50 req/s)" in v
    assert "No topology" in report.verdict([_run("1P1D", 1.0, 0.0)])
    assert report.run_path(Path("d"), runs[0]) == Path("d/1P1D-2.json")
    assert report.run_path(Path("d"), runs[2]) == Path("d/1P1D-inf.json")
    assert report.load_label({"mode": "concurrency", "concurrency": 8}) == "c8"


def test_report_files_and_compare(tmp_path):
    a = [_run("1P1D", 4.0, 2.0), _run("colocated2", 4.0, 1.0)]
    paths = report.write_report(tmp_path / "a", a, {"workload": {"name": "fixed", "num_requests": 2, "seed": 0}})
    summary = json.loads(paths["summary"].read_text())
    assert [r["topology"] for r in summary["runs"]] == ["1P1D", "colocated2"]
    assert summary["best"]["topology"] == "1P1D"
    md = paths["report"].read_text()
    assert "| 1P1D | 4 req/s | 2.00 |" in md and "Best by goodput: **1P1D**" in md and "latency.png" in md
    for png in (paths["latency_plot"], paths["goodput_plot"]):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    run_file = report.write_run(tmp_path / "b", _run("1P1D", 4.0, 2.5))
    table = report.compare([paths["summary"], run_file], out_dir=tmp_path / "cmp")
    assert "| 1P1D (a) | 4 req/s | 2.00 |" in table and "| 1P1D (b) | 4 req/s | 2.50 |" in table
    assert "**1P1D (b)**" in table and (tmp_path / "cmp" / "report.md").is_file()
    with pytest.raises(ValueError, match="neither a summary.json"):
        (tmp_path / "x.json").write_text("{}")
        report.load_runs([tmp_path / "x.json"])


def test_compare_judges_earlier_runs_against_another_slo_from_their_requests(tmp_path):
    """One sweep read at several TPOT targets: the per-request numbers decide, not the
    goodput the run printed."""
    def run(topology: str, tpots: list[float | None]) -> dict:
        results = [_result(i, 100, t) if t is not None else _result(i, 100, 0, out=1) for i, t in enumerate(tpots)]
        s = summarize(results, 2.0, SLO(1000, 30))
        return {"topology": topology, "load": {"mode": "rate", "request_rate": 4.0}, **s,
                "per_request": [per_request(r) for r in results]}
    split, colocated = run("1P1D", [6, 6, 6, 6]), run("colocated2", [9, 12, 20, None])
    assert (split["goodput"], colocated["goodput"]) == (2.0, 2.0)
    paths = [report.write_run(tmp_path / "runs", r) for r in (split, colocated)]
    text = report.compare(paths, tmp_path / "tight", tpot_slo_ms=10)
    assert "| 1P1D | 4 req/s | 2.00 |" in text and "| colocated2 | 4 req/s | 1.00 |" in text  # 9 ms and one token
    assert "TTFT <= 1000 ms and TPOT <= 10 ms" in text
    tight = json.loads((tmp_path / "tight" / "summary.json").read_text())
    assert [r["slo_attainment"] for r in tight["runs"]] == [1.0, 0.5]
    assert rescore(colocated, ttft_ms=50)["goodput"] == 0.0 and rescore(colocated)["goodput"] == 2.0
    with pytest.raises(ValueError, match="no per_request numbers"):
        rescore({k: v for k, v in colocated.items() if k != "per_request"}, tpot_ms=10)
    with pytest.raises(ValueError, match="--tpot-slo-ms 0"):
        report.compare(paths, tpot_slo_ms=0)


def test_bench_plan_reads_optional_flags_and_refuses_bad_ones(tmp_path):
    plan = BenchPlan.from_args(argparse.Namespace(topologies=["1P1D"], workload=None, num_requests=None,
                                                  request_rate=None, concurrency=None, out=str(tmp_path), url=None))
    assert plan.workload == "sharegpt" and plan.options.num_requests == 200
    assert plan.loads == [{"mode": "rate", "request_rate": "inf"}] and plan.slo == SLO()
    plan = BenchPlan.from_args(argparse.Namespace(topologies=["1P1D"], request_rates="1,2", input_len=64,
                                                  ttft_slo_ms=500, out=str(tmp_path)))
    assert [ld["request_rate"] for ld in plan.loads] == [1.0, 2.0] and plan.options.input_len == 64
    assert plan.slo.ttft_ms == 500
    with pytest.raises(ValueError, match="not both"):
        BenchPlan.from_args(argparse.Namespace(topologies=["1P1D"], request_rate=2.0, concurrency=4))
    with pytest.raises(ValueError, match="--workload"):
        BenchPlan.from_args(argparse.Namespace(topologies=["1P1D"], workload="zipf"))
    with pytest.raises(ValueError, match="--temperature"):
        BenchPlan.from_args(argparse.Namespace(topologies=["1P1D"], temperature=-0.5))


def test_requests_are_greedy_unless_a_temperature_is_given_then_seeded_by_index():
    opts = WorkloadOptions(num_requests=3, input_len=8, output_len=4)
    fake = FakeRouter(ttft_s=0.0, gap_s=0.0)
    _load(fake, make_workload("fixed", opts))
    assert [(b["temperature"], "seed" in b) for b in fake.bodies] == [(0.0, False)] * 3
    opts.temperature = 0.8
    fake = FakeRouter(ttft_s=0.0, gap_s=0.0)
    _load(fake, make_workload("fixed", opts))
    assert sorted((b["temperature"], b["seed"]) for b in fake.bodies) == [(0.8, 0), (0.8, 1), (0.8, 2)]


def test_model_limits_take_the_smaller_of_model_and_tokenizer_vocab(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 128256, "max_position_embeddings": 8192}))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 2040}},
                                                         "added_tokens": [{"id": 2047, "content": "<eos>"}]}))
    assert model_limits(tmp_path, None) == (2048, 8192)
    assert model_limits(tmp_path, 1024) == (2048, 1024)


def test_the_warm_up_settles_before_the_first_measured_load_scrapes(tmp_path, monkeypatch):
    """The warm-up's KV loads and prefix-cache counters must reach /metrics before the first
    load's "before" scrape, or they land in that load's deltas."""
    calls = []

    async def fake_run_load(url, requests, **kw):
        calls.append(kw)
        return LoadRun([], 1.0, [], "", "")

    monkeypatch.setattr(bench_cli, "run_load", fake_run_load)
    plan = BenchPlan.from_args(argparse.Namespace(topologies=["1P1D"], workload="fixed", num_requests=2,
                                                  warmup_requests=2, out=str(tmp_path)))
    with Progress(disable=True) as progress:
        bench_cli._run_loads(plan, "1P1D", "http://fake", None, 1000, 4096, progress, {})
    warm_up, measured = calls
    assert warm_up.get("metrics_settle_s", METRICS_SETTLE_S) == measured.get("metrics_settle_s", METRICS_SETTLE_S) > 0


def test_soak_finds_blocks_free_only_on_nodes_it_saw_up():
    up = {"id": "d0", "healthy": True, "kv_blocks_free": 8, "kv_blocks_total": 8}
    assert soak.all_blocks_free([up])
    assert not soak.all_blocks_free([])  # the router did not answer
    assert not soak.all_blocks_free([up, {**up, "id": "d1", "healthy": False}])
    assert not soak.all_blocks_free([{**up, "kv_blocks_free": 7}])


def test_soak_draws_token_ids_the_router_accepts(tmp_path):
    """The llama-3-8b preset's shape: config.json says 128256, its tokenizer has 2048 ids."""
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 128256, "max_position_embeddings": 8192}))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 2047}}}))
    vocab = soak._vocab(argparse.Namespace(model_dir=tmp_path))
    assert vocab == 2048
    ids = soak.prompt_ids(random.Random(0), 5000, vocab)
    assert min(ids) >= TOKEN_ID_MARGIN and max(ids) < vocab - TOKEN_ID_MARGIN   # workloads.py's safe range


# --- a short CPU run through real clusters -----------------------------------------------------------
def _children(pid: int) -> set[int]:
    kids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == pid and stat[0] != "Z":
                    kids.add(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def test_bench_compares_1p1d_and_colocated_on_cpu(tmp_path, monkeypatch, capsys):
    # One torch thread per node: on a small CPU, each node's default of one thread per
    # core oversubscribes it and makes step times erratic.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("PDCLUSTER_API_KEY", raising=False)
    from cluster.config import load_cluster_config

    yaml = tmp_path / "cluster.yaml"
    yaml.write_text("model: {path: 'builtin:tiny', dtype: float32}\n"
                    "kv_transfer: {connector: tcp}\n"
                    "engine: {num_blocks: 256, block_size: 16}\n"
                    "prefill: {replicas: 1, devices: [cpu]}\n"
                    "decode: {replicas: 1, devices: [cpu]}\n")
    out = tmp_path / "bench-out"
    before = _children(os.getpid())
    args = argparse.Namespace(
        cluster_yaml=str(yaml), cluster_config=load_cluster_config(yaml), topologies=["1P1D", "colocated1"],
        workload="prefix-agents", num_requests=32, request_rate=None, request_rates="8,inf", concurrency=None,
        out=str(out), url=None, num_agents=4, num_system_prompts=2, system_prompt_len=64, turn_len=16, output_len=8,
        ttft_slo_ms=30000, tpot_slo_ms=5000, warmup_requests=2, start_timeout_s=120, max_duration_s=60)
    rc = run_bench(args)
    printed = capsys.readouterr()
    assert rc == 0, printed.out + printed.err
    assert _children(os.getpid()) <= before, "bench left processes running"

    summary = json.loads((out / "summary.json").read_text())
    runs = {(r["topology"], report.load_label(r["load"])): r for r in summary["runs"]}
    assert set(runs) == {("1P1D", "8"), ("1P1D", "inf"), ("colocated1", "8"), ("colocated1", "inf")}
    for key, r in runs.items():
        assert r["requests"] == 32 and r["completed"] == 32, (key, r["errors"])
        assert r["short_outputs"] == 0 and r["mean_output_tokens"] == 8   # ignore_eos held the lengths
        assert r["goodput"] > 0 and r["request_throughput"] > 0 and r["output_throughput"] > 0
        assert 0 < r["ttft_ms"]["median"] <= r["ttft_ms"]["p99"] < 30000
        assert 0 < r["tpot_ms"]["median"] < 5000 and r["itl_ms"]["count"] == 32 * 7
        assert r["e2e_ms"]["median"] > r["ttft_ms"]["median"]
        assert r["prefix_cache"]["hit_rate"] > 0.2, key               # agents share their prompts
        assert r["prefix_cache"]["token_hit_rate"] > 0.2 and r["prefix_cache"]["eviction_policy"] == "workflow"
        assert r["queues"]["samples"] >= 1
        assert (out / f"{key[0]}-{key[1]}.json").is_file()
    for topo in ("1P1D", "colocated1"):  # 4 s at 8 req/s: sampled while busy (stats lag up to 0.5 s)
        assert runs[(topo, "8")]["queues"]["peak_running"] >= 1
    for rate in ("8", "inf"):
        kv = runs[("1P1D", rate)]["kv_transfer"]
        assert kv["loads"] > 0 and kv["bytes_loaded"] > 0 and kv["gb_per_s"] > 0 and kv["blocks_failed"] == 0
        assert runs[("colocated1", rate)]["kv_transfer"]["loads"] == 0   # nothing to transfer
    assert runs[("1P1D", "8")]["nodes"] == [{"name": "prefill-0", "role": "prefill", "device": "cpu"},
                                            {"name": "decode-0", "role": "decode", "device": "cpu"}]

    md = (out / "report.md").read_text()
    assert "Best by goodput: **" in md and summary["best"]["topology"] in ("1P1D", "colocated1")
    assert "| Evictions |" in md and "0 (workflow) |" in md   # 256 blocks: nothing had to go
    for topo in ("1P1D", "colocated1"):
        assert f"| {topo} | 8 req/s |" in md and f"| {topo} | all at once |" in md
    assert "| 1P1D | 8 req/s |" in printed.out and str(out) in printed.out
    assert set(runs[("1P1D", "8")]["queues"]["mean_running_per_node"]) == {"prefill-0", "decode-0"}
    # The P:D advisor on this real run: every request met the loose SLO at 8 req/s (and a
    # burst has no arrival rate), so no phase saturated and it must not name a split.
    (advice,) = summary["advisor"]
    assert advice["gpus"] == 2 and advice["suggestion"] is None and "cannot tell" in advice["line"]
    assert "no run saturated" in advice["line"] and advice["line"] in md and advice["line"] in printed.out
    assert sorted(advice["skipped_runs"]) == ["1P1D at all at once: no arrival rate (burst or closed loop)",
                                              "colocated1 at all at once: no arrival rate (burst or closed loop)"]
    assert advice["capacity_per_node"]["prefill"]["lo"] == 8.0 and advice["capacity_per_node"]["colocated"]["lo"] == 8.0
    for png in ("latency.png", "goodput.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
