"""From per-request results and router scrapes to one run's numbers.

`summarize(...)` gives a plain dict (JSON-ready: no NaN, None where nothing was measured):

  * requests sent (`requests`), `completed`, `failed` (sent, not completed: errors and
    requests `cut_off` in flight by the run's time limit) and `unsent` (the time limit
    came before they were sent: the server never saw them, so they count nowhere else);
  * latency distributions in milliseconds (mean, median, p90, p99; numpy's linear
    interpolation, as vLLM's benchmark_serving): TTFT, TPOT, ITL, e2e, over the
    successful requests (ITL over all their gaps); TTFT also over the requests cut off
    after their first token, or the slowest requests would drop out of its percentiles;
  * throughput over the run's duration (its start to its cutoff or its last answer):
    requests/s and input/output tokens/s of the successful requests;
  * goodput: successful requests/s that met BOTH the TTFT and the TPOT target (a request
    with one output token has no TPOT and is judged on TTFT alone), and the fraction of
    the requests sent that did (`slo_attainment`);
  * from the router's /metrics scraped before and after: KV bytes and seconds loaded by
    the decode nodes, loads and failed blocks, and `gb_per_s` = bytes / load seconds: the
    bandwidth *while* loading, per load (overlapping loads each count their own time, so
    it is not the link's total use; `bytes_loaded / duration_s` is that); the prefix
    cache hit rate (blocks) of the nodes that compute prompts (prefill and colocated);
    `kv_transfer_share_of_ttft`: the mean streamed-pull tail over the mean TTFT of the
    requests whose prefill was remote (see _transfer_share);
  * from /cluster sampled during the run: peak and mean queue lengths (waiting) and
    running requests, summed over nodes, the peak per node, and per node the mean of the
    running and waiting peaks (a node's batch under load, which bench/advisor.py reports).

The default SLO targets (TTFT 1 s, TPOT 100 ms) are DistServe's chatbot-style targets
relaxed for an 8B model (DistServe used TTFT 0.25 s / TPOT 0.1 s for OPT-13B chat); set
them to your service's with --ttft-slo-ms / --tpot-slo-ms.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.client import QueueSample, RequestResult

DEFAULT_TTFT_SLO_MS = 1000.0
DEFAULT_TPOT_SLO_MS = 100.0
PROMPT_ROLES = ("prefill", "both")   # roles whose prefix cache serves prompts


@dataclass(slots=True, frozen=True)
class SLO:
    ttft_ms: float = DEFAULT_TTFT_SLO_MS
    tpot_ms: float = DEFAULT_TPOT_SLO_MS

    def met_by(self, r: RequestResult) -> bool:
        return self.met(r.ok, r.ttft_s * 1e3, None if math.isnan(r.tpot_s) else r.tpot_s * 1e3)

    def met(self, ok: bool, ttft_ms: float | None, tpot_ms: float | None) -> bool:
        """Served, its first token within TTFT, and within TPOT (a one-token answer has no
        TPOT: met). None or NaN for TTFT: no first token, missed."""
        if not ok or ttft_ms is None or not ttft_ms <= self.ttft_ms:
            return False
        return tpot_ms is None or tpot_ms <= self.tpot_ms


def rescore(run: dict[str, Any], ttft_ms: float | None = None, tpot_ms: float | None = None) -> dict[str, Any]:
    """`run` judged against another SLO (a target left None keeps the run's own): its
    goodput, slo_attainment and slo recomputed from its per-request numbers, the rest
    as measured. Whether a split pays depends on the TPOT target above all (a colocated
    node's steps carry prefill chunks), so one sweep can be read at several targets.
    ValueError when the run kept no per-request numbers."""
    per_request = run.get("per_request")
    if not per_request:
        raise ValueError(f"{run.get('topology')} at {run.get('load')}: the run file has no per_request numbers, "
                         f"so it cannot be judged against another SLO")
    own = run.get("slo") or {}
    slo = SLO(own.get("ttft_ms", DEFAULT_TTFT_SLO_MS) if ttft_ms is None else ttft_ms,
              own.get("tpot_ms", DEFAULT_TPOT_SLO_MS) if tpot_ms is None else tpot_ms)
    sent = [r for r in per_request if not r.get("unsent")]
    good = sum(slo.met(bool(r.get("ok")), r.get("ttft_ms"), r.get("tpot_ms")) for r in sent)
    duration_s = float(run.get("duration_s") or 0.0)
    return {**run, "goodput": good / duration_s if duration_s > 0 else 0.0,
            "slo_attainment": good / len(sent) if sent else 0.0,
            "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms}}


def distribution(values_s: Iterable[float]) -> dict[str, float] | None:
    """mean/median/p90/p99 in milliseconds of the finite values (seconds in); None when
    there are none."""
    x = np.asarray([v for v in values_s if v is not None and math.isfinite(v)], dtype=np.float64) * 1e3
    if x.size == 0:
        return None
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"mean": float(x.mean()), "median": float(p50), "p90": float(p90), "p99": float(p99),
            "max": float(x.max()), "count": int(x.size)}


def summarize(results: Sequence[RequestResult], duration_s: float, slo: SLO = SLO(), *,
              metrics_before: str = "", metrics_after: str = "",
              queue_samples: Sequence[QueueSample] = ()) -> dict[str, Any]:
    sent = [r for r in results if not r.unsent]
    ok = [r for r in sent if r.ok]
    good = [r for r in ok if slo.met_by(r)]
    per_s = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    errors = Counter(r.error for r in sent if not r.ok)
    return {
        "requests": len(sent),
        "completed": len(ok),
        "failed": len(sent) - len(ok),
        "unsent": len(results) - len(sent),
        "errors": [{"message": m, "count": n} for m, n in errors.most_common(5)],
        "short_outputs": sum(r.output_tokens < r.max_tokens for r in ok),  # ignore_eos not honoured?
        "duration_s": duration_s,
        "request_throughput": per_s(len(ok)),
        "input_throughput": per_s(sum(r.prompt_tokens for r in ok)),
        "output_throughput": per_s(sum(r.output_tokens for r in ok)),
        "goodput": per_s(len(good)),
        "slo_attainment": len(good) / len(sent) if sent else 0.0,
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        "mean_prompt_tokens": float(np.mean([r.prompt_tokens for r in sent])) if sent else None,
        "mean_output_tokens": float(np.mean([r.output_tokens for r in ok])) if ok else None,
        "mean_max_tokens": float(np.mean([r.max_tokens for r in sent])) if sent else None,
        "ttft_ms": distribution(r.ttft_s for r in sent if r.ok or r.cut_off),  # NaN (no first token) left out
        "tpot_ms": distribution(r.tpot_s for r in ok),
        "itl_ms": distribution(g for r in ok for g in r.itl_s),
        "e2e_ms": distribution(r.e2e_s for r in ok),
        "cached_prompt_tokens": sum(r.cached_tokens for r in ok),
        "prefill_decisions": prefill_decisions(results),
        **(delta := cluster_delta(metrics_before, metrics_after)),
        "kv_transfer_share_of_ttft": _transfer_share(delta["kv_transfer"], ok),
        "queues": queue_peaks(queue_samples),
    }


def _transfer_share(kv: dict[str, Any] | None, ok: Sequence[RequestResult]) -> float | None:
    """The mean streamed-pull tail over the mean TTFT of the requests it applies to: how
    much the KV transfer adds to the time before a split request's decode starts, relative
    to its first token. Those are the requests the router's x-pdcluster-prefill header
    called `remote` (a locally prefilled request pulls nothing, and its shorter TTFT would
    shrink the mean); every successful request when none carries the header (a router
    that does not send it)."""
    remote = [r for r in ok if r.prefill == "remote"]
    planned = remote if any(r.prefill for r in ok) else ok
    ttfts = [r.ttft_s for r in planned if not math.isnan(r.ttft_s)]
    if not kv or kv.get("stream_tail_ms_mean") is None or not ttfts:
        return None
    return kv["stream_tail_ms_mean"] / (1e3 * float(np.mean(ttfts)))


def prefill_decisions(results: Sequence[RequestResult]) -> dict[str, int]:
    """Requests per prefill plan (`remote`, `local`) and per `remote:reason` /
    `local:reason`, from the router's response headers; {} when it sent none."""
    counts: Counter[str] = Counter()
    for r in results:
        if r.prefill:
            counts[r.prefill] += 1
            counts[f"{r.prefill}:{r.prefill_reason}"] += 1
    return dict(sorted(counts.items()))


# --- the router's /metrics -------------------------------------------------------------------
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample in Prometheus text format."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), value))
    return out


_NODE_COUNTERS = {f"pdcluster_node_{c}_total" for c in ("prefix_cache_queries", "prefix_cache_hits",
                                                         "prefix_cache_query_tokens", "prefix_cache_hit_tokens",
                                                         "kv_evictions")}


def node_counters(text: str) -> dict[str, dict[str, Any]]:
    """Per node: role, prefix_cache_queries/hits, and kv_transfer counters, from the
    router's pdcluster_node_*_total counters (the nodes' cumulative counts)."""
    nodes: dict[str, dict[str, Any]] = {}
    for name, labels, value in parse_prometheus(text):
        if not name.startswith("pdcluster_node_") or "node" not in labels:
            continue
        node = nodes.setdefault(labels["node"], {"role": labels.get("role", ""), "kv_transfer": {}})
        if name == "pdcluster_node_kv_transfer_total" and "counter" in labels:
            node["kv_transfer"][labels["counter"]] = value
        elif name in _NODE_COUNTERS:
            node[name.removeprefix("pdcluster_node_").removesuffix("_total")] = value
        elif name == "pdcluster_node_eviction_policy" and "policy" in labels:
            node["eviction_policy"] = labels["policy"]
    return nodes


def cluster_delta(before: str, after: str) -> dict[str, Any]:
    """`kv_transfer` and `prefix_cache` over the run: counters after minus before, summed
    over nodes (a node absent before counts from zero; a counter that went down, i.e. a
    restarted node, counts from zero too). Empty values when /metrics was not scraped."""
    if not after:
        return {"kv_transfer": None, "prefix_cache": None}
    b, a = node_counters(before), node_counters(after)

    def delta(node: str, get) -> float:
        now, then = get(a[node]), get(b[node]) if node in b else 0.0
        return now - then if now >= then else now

    def total(get, roles: Iterable[str] | None = None) -> float:
        return sum(delta(n, get) for n in a if roles is None or a[n]["role"] in roles)

    kv = {k: total(lambda c, k=k: c["kv_transfer"].get(k, 0.0))
          for k in ("loads", "bytes_loaded", "load_seconds", "blocks_loaded", "blocks_failed", "load_failures",
                    "streamed_loads", "stream_tail_seconds", "stream_blocks_early", "load_follow_seconds")}
    busy = kv["load_seconds"] - kv["load_follow_seconds"]  # a streamed pull's wait for the prefill is not transfer
    kv["gb_per_s"] = kv["bytes_loaded"] / busy / 1e9 if busy > 0 else None
    # A streamed pull's tail: from the prefill's end (the producer lent the request) to the
    # KV landed on the decode node — what the transfer adds before decoding starts.
    kv["stream_tail_ms_mean"] = (1e3 * kv["stream_tail_seconds"] / kv["streamed_loads"]
                                 if kv["streamed_loads"] > 0 else None)
    roles = PROMPT_ROLES if any(n["role"] in PROMPT_ROLES for n in a.values()) else None
    queries = total(lambda c: c.get("prefix_cache_queries", 0.0), roles)
    hits = total(lambda c: c.get("prefix_cache_hits", 0.0), roles)
    query_tokens = total(lambda c: c.get("prefix_cache_query_tokens", 0.0), roles)
    hit_tokens = total(lambda c: c.get("prefix_cache_hit_tokens", 0.0), roles)
    policies = sorted({n["eviction_policy"] for n in a.values()
                       if n.get("eviction_policy") and (roles is None or n["role"] in roles)})
    prefix = {"queries": queries, "hits": hits, "hit_rate": hits / queries if queries > 0 else None,
              "query_tokens": query_tokens, "hit_tokens": hit_tokens,
              "token_hit_rate": hit_tokens / query_tokens if query_tokens > 0 else None,
              "evictions": total(lambda c: c.get("kv_evictions", 0.0), roles),
              "eviction_policy": ",".join(policies) or None,
              "roles": list(roles) if roles else "all"}
    return {"kv_transfer": kv, "prefix_cache": prefix}


def queue_peaks(samples: Sequence[QueueSample]) -> dict[str, Any] | None:
    if not samples:
        return None
    nodes = sorted({n for s in samples for n in s.nodes})
    return {"samples": len(samples),
            "peak_waiting": max(s.waiting for s in samples),
            "mean_waiting": float(np.mean([s.waiting for s in samples])),
            "peak_running": max(s.running for s in samples),
            "peak_waiting_per_node": {n: max(s.nodes.get(n, (0, 0))[1] for s in samples) for n in nodes},
            # Each sample holds the peaks since the previous one: these means are of those peaks.
            "mean_running_per_node": {n: float(np.mean([s.nodes.get(n, (0, 0))[0] for s in samples])) for n in nodes},
            "mean_waiting_per_node": {n: float(np.mean([s.nodes.get(n, (0, 0))[1] for s in samples])) for n in nodes}}
