"""The load generator: sends a workload to a router's /v1/completions and times each
token as it arrives.

    run = asyncio.run(run_load("http://127.0.0.1:8000", requests, concurrency=None))
    run.results          # one RequestResult per request, in request order
    run.metrics_before   # the router's /metrics text before and after the run
    run.queue_samples    # the router's /cluster, sampled during the run

Every request streams (`stream: true`, `stream_options.include_usage`) with `ignore_eos`
and `max_tokens` = the workload's output length, so output lengths are the workload's,
whatever the model samples; greedy, or at the workload's temperature seeded with the
request's index (the same tokens in every topology). Only `url` is contacted (no proxies from the environment).

What is measured, per request (seconds, `time.perf_counter` in this process):
  * TTFT: from just before the request is sent (connection set-up included) to the
    arrival of the first SSE chunk that carries a choice (the first token).
  * ITL: the gaps between consecutive such chunks. The router sends one chunk per engine
    step, which is one token per request, so a gap is one token's latency. The API does
    not say how many tokens a chunk carries; when the usage chunk reports more tokens
    than chunks arrived (a chunk carried several), ITL stays per *chunk* (what a user
    sees) while TPOT below stays per token. A last chunk that only carries the finish
    reason (chunks > tokens) adds no gap.
  * TPOT: (e2e - TTFT) / (output_tokens - 1); undefined (NaN) for one output token.
  * e2e: from sending to `data: [DONE]`.
  * output tokens: the usage chunk's `completion_tokens` (the chunk count without it).
  * prefill: where the router planned the prompt's prefill, `remote` (another node, KV
    pulled) or `local` (on the decode node), from its `x-pdcluster-prefill` header (""
    from a router that does not send it).
A request succeeds when the answer is HTTP 200 and the stream ends with [DONE] and no
error event.

Open loop: request i is sent at `arrival_s` after the start (Poisson, see workloads).
Closed loop (`concurrency` C): C senders, each sending its next request when the last
one finished. Either way a request with `after` waits for that request to finish first.
The run is bounded: `max_duration_s` cancels what is still in flight or unsent. A request
in flight then is `cut_off`: it keeps its send time and, when its first token had come,
its TTFT (leaving it out would drop the slowest requests from the TTFT percentiles), but
it did not complete. A request not sent by then is `unsent`: the server never saw it, so
it is no failure of the server. The run's duration is its wall time from the start: to
the cutoff when the limit fired, else to the end of the last request.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec

from bench.workloads import BenchRequest

DEFAULT_REQUEST_TIMEOUT_S = 300.0
CLUSTER_SAMPLE_INTERVAL_S = 0.5   # the router refreshes node stats every 0.5 s
METRICS_SETTLE_S = 1.2            # wait after the run so /metrics shows its last stats
PREFILL_HEADER = "x-pdcluster-prefill"   # router/app.py's
PREFILL_REASON_HEADER = "x-pdcluster-prefill-reason"


@dataclass(slots=True)
class RequestResult:
    """One request's outcome. Times in seconds; NaN where not measured."""

    index: int
    ok: bool
    prompt_tokens: int
    max_tokens: int
    output_tokens: int = 0
    send_s: float = math.nan      # when it was sent, after the run's start
    ttft_s: float = math.nan
    e2e_s: float = math.nan
    itl_s: list[float] = field(default_factory=list)
    num_chunks: int = 0
    cached_tokens: int = 0        # prompt tokens served from the prefix cache (usage)
    prefill: str = ""             # remote | local: the router's x-pdcluster-prefill header
    prefill_reason: str = ""
    error: str = ""
    cut_off: bool = False         # in flight when the run's time limit cancelled it
    unsent: bool = False          # never sent: the run's time limit came first

    @property
    def tpot_s(self) -> float:
        if not self.ok or self.output_tokens < 2:
            return math.nan
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(slots=True)
class QueueSample:
    """The router's /cluster at one moment: per node id, (running, waiting) — the peaks over
    the sampling interval — where waiting counts the scheduler's queue plus requests waiting
    for their KV to arrive."""

    t_s: float
    nodes: dict[str, tuple[int, int]]

    @property
    def running(self) -> int:
        return sum(r for r, _ in self.nodes.values())

    @property
    def waiting(self) -> int:
        return sum(w for _, w in self.nodes.values())


@dataclass(slots=True)
class LoadRun:
    results: list[RequestResult]
    duration_s: float             # the run's start to its cutoff, or to its last answer
    queue_samples: list[QueueSample]
    metrics_before: str           # Prometheus text ("" when the router had no /metrics)
    metrics_after: str


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def run_load(url: str, requests: list[BenchRequest], *, concurrency: int | None = None,
                   api_key: str | None = None, request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
                   max_duration_s: float | None = None, on_result: Callable[[RequestResult], None] | None = None,
                   sample_interval_s: float = CLUSTER_SAMPLE_INTERVAL_S,
                   metrics_settle_s: float = METRICS_SETTLE_S,
                   transport: httpx.AsyncBaseTransport | None = None) -> LoadRun:
    """Send `requests` to the router at `url`; see the module docstring for what is timed.
    `on_result` is called (on the event loop) as each request ends. `transport` replaces
    the network (tests)."""
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency {concurrency}: give 1 or more")
    url = url.rstrip("/")
    timeout = httpx.Timeout(request_timeout_s, connect=10.0, pool=None)
    # No connection cap: a pool limit would queue requests in this client and count the
    # wait as the server's TTFT.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=_headers(api_key), trust_env=False,
                                 transport=transport) as http:
        before = await scrape_metrics(http, url)
        samples: list[QueueSample] = []
        stop_sampling = asyncio.Event()
        t0 = time.perf_counter()
        sampler = asyncio.create_task(_sample_cluster(http, url, t0, sample_interval_s, samples, stop_sampling))
        try:
            results, cut_at_s = await _dispatch(http, url, requests, t0, concurrency, max_duration_s, on_result)
        finally:
            stop_sampling.set()
            await sampler
        duration = run_duration(results, cut_at_s)
        await asyncio.sleep(metrics_settle_s)
        after = await scrape_metrics(http, url)
    return LoadRun(results, duration, samples, before, after)


def run_duration(results: list[RequestResult], cut_at_s: float | None) -> float:
    """The run's wall time (seconds from its start): `cut_at_s` when the time limit cut it,
    else the end of its last request. Throughput divides by this, so a cut run must not
    end at its last *finished* request: the ones cut off were being served until the cut."""
    if cut_at_s is not None:
        return cut_at_s
    ends = [r.send_s + r.e2e_s for r in results if not math.isnan(r.send_s + r.e2e_s)]
    return max(ends, default=0.0)


async def _dispatch(http: httpx.AsyncClient, url: str, requests: list[BenchRequest], t0: float,
                    concurrency: int | None, max_duration_s: float | None,
                    on_result: Callable[[RequestResult], None] | None) -> tuple[list[RequestResult], float | None]:
    """Every request's result, in request order, and when the time limit cut the run
    (seconds after t0; None when everything ended before it)."""
    done: dict[int, asyncio.Event] = {r.index: asyncio.Event() for r in requests}
    results: dict[int, RequestResult] = {}   # a request has one from the moment it is sent

    async def one(req: BenchRequest) -> None:
        if req.after is not None and req.after in done:
            await done[req.after].wait()
        result = results[req.index] = RequestResult(req.index, False, req.prompt_len, req.max_tokens)
        try:
            await stream_completion(http, url, req, t0, result)
        except asyncio.CancelledError:
            mark_cut_off(result, max_duration_s)
            raise
        finally:
            done[req.index].set()
        if on_result is not None:
            on_result(result)

    async def open_loop(req: BenchRequest) -> None:
        delay = t0 + req.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await one(req)

    if concurrency is None:
        tasks = [asyncio.create_task(open_loop(r)) for r in requests]
    else:
        queue: asyncio.Queue[BenchRequest] = asyncio.Queue()
        for r in requests:
            queue.put_nowait(r)

        async def sender() -> None:
            while not queue.empty():
                await one(queue.get_nowait())

        tasks = [asyncio.create_task(sender()) for _ in range(min(concurrency, len(requests)))]
    cut_at_s = None
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=max_duration_s)
        if pending:
            cut_at_s = time.perf_counter() - t0
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in tasks:  # a bug in the client itself must not pass as a slow server
        if not t.cancelled() and t.exception() is not None:
            raise t.exception()
    return [results.get(r.index) or unsent_result(r, max_duration_s) for r in requests], cut_at_s


def mark_cut_off(result: RequestResult, max_duration_s: float | None) -> None:
    """A request the time limit cancelled in flight: what was measured stays (send time,
    TTFT when a first token came); it did not complete, so no e2e and no success."""
    result.ok, result.cut_off, result.e2e_s, result.itl_s = False, True, math.nan, []
    result.error = f"cut off in flight at the run's time limit of {max_duration_s} s"


def unsent_result(req: BenchRequest, max_duration_s: float | None) -> RequestResult:
    """A request the time limit came before (its arrival, its turn, or the one it waits
    for): the server never saw it."""
    return RequestResult(req.index, False, req.prompt_len, req.max_tokens, unsent=True,
                         error=f"not sent within the run's time limit of {max_duration_s} s")


def request_body(req: BenchRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": req.prompt_ids, "max_tokens": req.max_tokens, "stream": True,
                            "stream_options": {"include_usage": True}, "ignore_eos": True,
                            "temperature": req.temperature}
    if req.temperature:
        body["seed"] = req.index
    if req.workflow_id is not None:
        body["workflow_id"] = req.workflow_id
    if req.agent_id is not None:
        body["agent_id"] = req.agent_id
    return body


async def send_request(http: httpx.AsyncClient, url: str, req: BenchRequest, t0: float) -> RequestResult:
    """One streamed completion, timed (see the module docstring)."""
    result = RequestResult(req.index, False, req.prompt_len, req.max_tokens)
    await stream_completion(http, url, req, t0, result)
    return result


async def stream_completion(http: httpx.AsyncClient, url: str, req: BenchRequest, t0: float,
                            result: RequestResult) -> None:
    """send_request's work, filling `result` as the answer streams in: a request cancelled
    midway (the run's time limit) keeps its send time and TTFT."""
    chunk_times: list[float] = []
    usage: dict[str, Any] | None = None
    finished = False
    start = time.perf_counter()
    result.send_s = start - t0
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=request_body(req)) as resp:
            result.prefill = resp.headers.get(PREFILL_HEADER, "")
            result.prefill_reason = resp.headers.get(PREFILL_REASON_HEADER, "")
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {_error_message(await resp.aread())}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    finished = True
                    break
                now = time.perf_counter()
                event = msgspec.json.decode(data)
                if "error" in event:
                    result.error = f"stream error: {_error_message(data.encode())}"
                    return
                if event.get("choices"):
                    if not chunk_times:
                        result.ttft_s = now - start
                    chunk_times.append(now)
                if event.get("usage"):
                    usage = event["usage"]
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
        return
    except msgspec.DecodeError as e:
        result.error = f"undecodable SSE event: {e}"
        return
    finally:
        result.e2e_s = time.perf_counter() - start
    if not finished:
        result.error = "the stream ended without data: [DONE]"
        return
    if not chunk_times:
        result.error = "the stream carried no tokens"
        return
    result.num_chunks = len(chunk_times)
    result.output_tokens = int(usage["completion_tokens"]) if usage else len(chunk_times)
    details = (usage or {}).get("prompt_tokens_details") or {}
    result.cached_tokens = int(details.get("cached_tokens") or 0)
    gaps = [b - a for a, b in zip(chunk_times, chunk_times[1:])]
    result.itl_s = gaps[:max(0, result.output_tokens - 1)]  # drop a finish-only last chunk
    result.ok = True


def _error_message(body: bytes) -> str:
    try:
        err = msgspec.json.decode(body).get("error", {})
        return str(err.get("message", err)) if isinstance(err, dict) else str(err)
    except (msgspec.DecodeError, AttributeError):
        return body[:200].decode("utf-8", "replace")


async def scrape_metrics(http: httpx.AsyncClient, url: str) -> str:
    """The router's /metrics text, or "" when it does not answer (the report then leaves
    the cluster-side columns empty)."""
    try:
        r = await http.get(f"{url}/metrics", timeout=5.0)
        return r.text if r.status_code == 200 else ""
    except httpx.HTTPError:
        return ""


async def fetch_cluster(http: httpx.AsyncClient, url: str, peak_window_s: float = 1.0) -> dict[str, Any] | None:
    try:
        r = await http.get(f"{url}/cluster", params={"peak_window_s": peak_window_s}, timeout=5.0)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


async def _sample_cluster(http: httpx.AsyncClient, url: str, t0: float, interval_s: float,
                          samples: list[QueueSample], stop: asyncio.Event) -> None:
    while not stop.is_set():
        # A window a stats period (0.5 s) longer than the interval: overlapping windows
        # repeat a peak, a gap between them would lose one.
        view = await fetch_cluster(http, url, peak_window_s=interval_s + 0.5)
        if view is not None:
            # Peaks over the interval, where the router reports them: an instant's
            # counts miss the bursts between two samples.
            nodes = {n["id"]: (max(int(n.get("running", 0)), int(n.get("peak_running", 0))),
                               max(int(n.get("waiting", 0)) + int(n.get("waiting_for_remote_kv", 0)),
                                   int(n.get("peak_waiting", 0))))
                     for n in view.get("nodes", [])}
            samples.append(QueueSample(time.perf_counter() - t0, nodes))
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
        except asyncio.TimeoutError:
            pass
