"""Load held: a steady-load soak, and the router's own overhead.

    python -m bench.soak [CLUSTER_YAML] --minutes 20 --rate 4 --out soak-out/

starts the cluster (or drives `--url URL`), then

1. **Soak**: sends streamed completions (random token-id prompts, `ignore_eos`) at a
   fixed rate (Poisson arrivals) for `--minutes`, and every `--sample-s` seconds records
   the router's and every node's resident memory (VmRSS from /proc: this machine's
   processes only) and the KV blocks free. At the end: requests sent and failed, TTFT
   and end-to-end latency p50/p99, memory over time, and whether every KV block came
   back once the load stopped.
2. **Router overhead** (only when this script started the cluster: it needs the cluster
   key to talk to a node directly): the same one-token request (`max_tokens: 1`), one at
   a time, through the router over HTTP and straight to a node over its ZeroMQ socket;
   the difference of the latency percentiles is what the router adds (HTTP, JSON,
   tokenizer-free token-id prompt, routing, its hop to the node). Then the highest rate
   one router process sustains: `--concurrency` closed-loop clients sending one-token
   requests for `--overhead-s`, with the router process's CPU use over that time (near
   100% of one core: the router is the limit; well below: the node or this client is).

Writes `soak.json` and `soak.md` to `--out`, and prints the markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench.client import RequestResult, send_request
from bench.workloads import TOKEN_ID_MARGIN, BenchRequest

PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024 if hasattr(os, "sysconf") else 4
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# --- measurements from /proc ------------------------------------------------------------------
def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_KIB / 1024
    except (OSError, IndexError, ValueError):
        return None


def cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


# --- the soak ---------------------------------------------------------------------------------
def prompt_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    """n random token ids in bench/workloads.py's safe range [TOKEN_ID_MARGIN, vocab -
    TOKEN_ID_MARGIN): special tokens, at either end of most vocabularies, stay out."""
    return [rng.randrange(TOKEN_ID_MARGIN, vocab - TOKEN_ID_MARGIN) for _ in range(n)]


async def soak(url: str, headers: dict[str, str], router_pid: int | None, minutes: float, rate: float,
               prompt_tokens: int, max_tokens: int, vocab: int, sample_s: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    duration = minutes * 60
    results: list[RequestResult] = []
    samples: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=10.0), limits=limits, headers=headers,
                                 trust_env=False) as http:
        t0 = time.perf_counter()

        async def sampler() -> None:
            while True:
                samples.append(await _sample(http, url, router_pid, time.perf_counter() - t0))
                await asyncio.sleep(sample_s)

        sampling = asyncio.create_task(sampler())
        tasks: list[asyncio.Task] = []
        next_at, index = 0.0, 0
        while next_at < duration:
            await asyncio.sleep(max(0.0, next_at - (time.perf_counter() - t0)))
            req = BenchRequest(index, prompt_ids(rng, prompt_tokens, vocab), max_tokens)
            tasks.append(asyncio.create_task(send_request(http, url, req, t0)))
            index += 1
            next_at += rng.expovariate(rate)
        results = list(await asyncio.gather(*tasks))
        sampling.cancel()
        end = await _settled(http, url, router_pid, time.perf_counter() - t0)
        samples.append(end)
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error[:120]] = errors.get(r.error[:120], 0) + 1
    return {
        "minutes": minutes, "rate": rate, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
        "sent": len(results), "failed": len(results) - len(ok), "errors": errors,
        "ttft_ms": {"p50": 1e3 * percentile([r.ttft_s for r in ok], 50),
                    "p99": 1e3 * percentile([r.ttft_s for r in ok], 99)},
        "e2e_ms": {"p50": 1e3 * percentile([r.e2e_s for r in ok], 50),
                   "p99": 1e3 * percentile([r.e2e_s for r in ok], 99)},
        "samples": samples,
        "blocks_free_at_end": {n["id"]: [n["kv_blocks_free"], n["kv_blocks_total"]] for n in end["nodes"]},
        "all_blocks_free_at_end": all_blocks_free(end["nodes"]),
    }


def all_blocks_free(nodes: list[dict[str, Any]]) -> bool:
    """Every node up and holding no KV block. False without nodes (the router did not
    answer) or with a node down (its last stats are not current): never vacuously true."""
    return bool(nodes) and all(n["healthy"] and n["kv_blocks_free"] == n["kv_blocks_total"] for n in nodes)


async def _sample(http: httpx.AsyncClient, url: str, router_pid: int | None, t: float) -> dict[str, Any]:
    try:
        nodes = (await http.get(f"{url}/cluster", timeout=10)).json()["nodes"]
    except (httpx.HTTPError, ValueError, KeyError):
        nodes = []
    return {"t_s": round(t, 1), "router_rss_mib": rss_mib(router_pid) if router_pid else None,
            "nodes": [{"id": n["id"], "healthy": n["healthy"], "rss_mib": rss_mib(n["pid"]), "running": n["running"],
                       "waiting": n["waiting"],
                       "kv_blocks_free": n["kv_blocks_free"], "kv_blocks_total": n["kv_blocks_total"]}
                      for n in nodes]}


async def _settled(http: httpx.AsyncClient, url: str, router_pid: int | None, t: float,
                   timeout_s: float = 30.0) -> dict[str, Any]:
    """The cluster once idle (or after timeout_s): lent KV may take a stats period to return."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = await _sample(http, url, router_pid, t)
        idle = s["nodes"] and all(n["running"] == 0 and n["waiting"] == 0
                                  and n["kv_blocks_free"] == n["kv_blocks_total"] for n in s["nodes"])
        if idle or time.monotonic() > deadline:
            return s
        await asyncio.sleep(0.5)


# --- the router's overhead --------------------------------------------------------------------
def _one_token_body(prompt: list[int]) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": 1, "temperature": 0.0, "ignore_eos": True}


async def router_overhead(url: str, headers: dict[str, str], node_address: str, cluster_key, router_pid: int | None,
                          vocab: int, requests: int, concurrency: int, seconds: float, seed: int) -> dict[str, Any]:
    import zmq
    import zmq.asyncio

    from engine import node_protocol as proto
    from engine.sampling_params import SamplingParams

    rng = random.Random(seed)
    prompt = prompt_ids(rng, 16, vocab)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, seed=1).to_dict()
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    if cluster_key is not None:
        cluster_key.connect(sock)
    sock.connect(node_address)

    async def direct() -> float:
        rid = f"overhead-{uuid.uuid4().hex}"
        start = time.perf_counter()
        await sock.send(proto.encode(proto.SubmitRequest(rid, prompt, params)))
        while True:
            for update in proto.updates_in(proto.decode_from_node(await sock.recv())):
                if update.request_id == rid and update.finished:
                    if update.error:
                        raise RuntimeError(f"the node refused the probe: {update.error}")
                    return time.perf_counter() - start

    direct_s, routed_s = [], []
    async with httpx.AsyncClient(timeout=60, headers=headers, trust_env=False) as http:
        async def routed() -> float:
            start = time.perf_counter()
            r = await http.post(f"{url}/v1/completions", json=_one_token_body(prompt))
            r.raise_for_status()
            return time.perf_counter() - start

        for _ in range(10):  # warm both paths (connections, caches)
            await direct()
            await routed()
        for _ in range(requests):  # interleaved, so drifts in load hit both alike
            direct_s.append(await direct())
            routed_s.append(await routed())
        sock.close()
        ctx.term()

        # The highest rate: closed loop, one-token requests, as many as the clients can send.
        done, failed = 0, 0
        stop_at = time.perf_counter() + seconds

        async def client() -> None:
            nonlocal done, failed
            while time.perf_counter() < stop_at:
                try:
                    r = await http.post(f"{url}/v1/completions",
                                        json=_one_token_body(prompt_ids(rng, 16, vocab)))
                    done += r.status_code == 200
                    failed += r.status_code != 200
                except httpx.HTTPError:
                    failed += 1

        cpu0, t0 = cpu_seconds(router_pid) if router_pid else None, time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        cpu1 = cpu_seconds(router_pid) if router_pid else None
    ms = lambda xs, q: 1e3 * percentile(xs, q)  # noqa: E731
    return {
        "requests": requests,
        "direct_ms": {"p50": ms(direct_s, 50), "p99": ms(direct_s, 99)},
        "routed_ms": {"p50": ms(routed_s, 50), "p99": ms(routed_s, 99)},
        "added_ms": {"p50": ms(routed_s, 50) - ms(direct_s, 50), "p99": ms(routed_s, 99) - ms(direct_s, 99),
                     "mean": 1e3 * (statistics.fmean(routed_s) - statistics.fmean(direct_s))},
        "max_rate": {"concurrency": concurrency, "seconds": round(elapsed, 1), "ok": done, "failed": failed,
                     "requests_per_s": done / elapsed,
                     "router_cpu_percent": None if cpu0 is None or cpu1 is None else 100 * (cpu1 - cpu0) / elapsed},
    }


# --- report -----------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    s = report["soak"]
    lines = [f"## Soak: {s['minutes']:g} min at {s['rate']:g} req/s ({s['prompt_tokens']} prompt tokens, "
             f"{s['max_tokens']} output tokens)", "",
             f"Sent {s['sent']}, failed {s['failed']}. TTFT p50 / p99 {s['ttft_ms']['p50']:.1f} / "
             f"{s['ttft_ms']['p99']:.1f} ms; end-to-end p50 / p99 {s['e2e_ms']['p50']:.1f} / {s['e2e_ms']['p99']:.1f} ms. "
             f"Every KV block free at the end: {'yes' if s['all_blocks_free_at_end'] else 'NO'} "
             f"({', '.join(f'{k} {v[0]}/{v[1]}' for k, v in s['blocks_free_at_end'].items())}).", ""]
    if s["errors"]:
        lines += ["Errors: " + "; ".join(f"{n}x {e}" for e, n in s["errors"].items()), ""]
    samples = s["samples"]
    node_ids = [n["id"] for n in samples[0]["nodes"]] if samples else []
    lines += ["| t (s) | router RSS (MiB) | " + " | ".join(f"{i} RSS (MiB)" for i in node_ids) + " |",
              "|--:|--:|" + "--:|" * len(node_ids)]
    step = max(1, len(samples) // 10)
    for sample in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []):
        rss = {n["id"]: n["rss_mib"] for n in sample["nodes"]}
        cells = [_mib(rss.get(i)) for i in node_ids]
        lines.append(f"| {sample['t_s']:.0f} | {_mib(sample['router_rss_mib'])} | " + " | ".join(cells) + " |")
    o = report.get("overhead")
    if o:
        m = o["max_rate"]
        cpu = "n/a" if m["router_cpu_percent"] is None else f"{m['router_cpu_percent']:.0f}%"
        lines += ["", f"## Router overhead ({o['requests']} one-token requests each way, one at a time)", "",
                  "| path | p50 (ms) | p99 (ms) |", "|---|--:|--:|",
                  f"| straight to the node (ZeroMQ) | {o['direct_ms']['p50']:.2f} | {o['direct_ms']['p99']:.2f} |",
                  f"| through the router (HTTP) | {o['routed_ms']['p50']:.2f} | {o['routed_ms']['p99']:.2f} |",
                  f"| **added by the router** | **{o['added_ms']['p50']:.2f}** | **{o['added_ms']['p99']:.2f}** |", "",
                  f"Highest rate, {m['concurrency']} closed-loop clients, `max_tokens: 1`, {m['seconds']:g} s: "
                  f"**{m['requests_per_s']:.0f} req/s** ({m['failed']} failed), router process CPU {cpu} of one core."]
    return "\n".join(lines) + "\n"


def _mib(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


# --- entry --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("cluster_yaml", nargs="?", help="start this cluster (default: the embedded default)")
    p.add_argument("--url", help="drive this running router instead (no direct-to-node overhead run)")
    p.add_argument("--api-key", default=os.environ.get("PDCLUSTER_API_KEY"))
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson arrivals)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--sample-s", type=float, default=10.0, help="memory and KV sampling period")
    p.add_argument("--overhead-requests", type=int, default=300, help="0: skip the router-overhead part")
    p.add_argument("--overhead-s", type=float, default=20.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=1000,
                   help="with --url: prompt token ids are drawn below this (the model's vocabulary when started here)")
    p.add_argument("--out", default="soak-out")
    args = p.parse_args(argv)

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    cluster = None
    if args.url:
        url, router_pid = args.url.rstrip("/"), None
    else:
        from cluster.config import ClusterConfig, load_cluster_config
        from cluster.launcher import LocalCluster

        config = load_cluster_config(args.cluster_yaml) if args.cluster_yaml else ClusterConfig.default()
        cluster = LocalCluster(config)
        print(f"starting the cluster; logs in {cluster.run_dir}", file=sys.stderr)
        cluster.start()
        url, router_pid = cluster.url, cluster.router.pid
        if cluster.api_key:
            headers = {"Authorization": f"Bearer {cluster.api_key}"}
    try:
        vocab = _vocab(cluster) if cluster is not None else args.vocab_size
        if vocab <= 2 * TOKEN_ID_MARGIN:
            raise SystemExit(f"vocab_size {vocab} leaves no token ids in [{TOKEN_ID_MARGIN}, vocab_size - "
                             f"{TOKEN_ID_MARGIN}): give the model's vocabulary with --vocab-size")
        print(f"soak: {args.minutes:g} min at {args.rate:g} req/s against {url}", file=sys.stderr)
        report: dict[str, Any] = {"url": url, "argv": sys.argv[1:], "soak": asyncio.run(soak(
            url, headers, router_pid, args.minutes, args.rate, args.prompt_tokens, args.max_tokens, vocab,
            args.sample_s, args.seed))}
        if cluster is not None and args.overhead_requests > 0:
            node = next(c for c in cluster.nodes if c.role in ("prefill", "both"))  # where max_tokens=1 goes
            print(f"router overhead: {args.overhead_requests} requests each way, then {args.overhead_s:g} s at "
                  f"concurrency {args.concurrency}", file=sys.stderr)
            report["overhead"] = asyncio.run(router_overhead(
                url, headers, node.address, cluster.cluster_key, router_pid, vocab, args.overhead_requests,
                args.concurrency, args.overhead_s, args.seed))
    finally:
        if cluster is not None:
            cluster.stop()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (out / "soak.md").write_text(text)
    print(text)
    s = report["soak"]
    return 0 if s["failed"] == 0 and s["all_blocks_free_at_end"] else 1


def _vocab(cluster) -> int:
    """The ids the router accepts: config.json's vocab_size can exceed the tokenizer's (the
    llama-3-8b preset: 128256 against 2048), and the router refuses ids beyond it."""
    from bench.cli import model_limits

    return model_limits(cluster.model_dir, None)[0]


if __name__ == "__main__":
    sys.exit(main())
