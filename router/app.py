"""The front door: an OpenAI-compatible HTTP API over the cluster's nodes.

Per request: read the body (413 beyond max_request_body_bytes), validate (400s name the
field), tokenize (text or token ids; chat templates), admit (429 beyond
max_concurrent_requests), hand to the Orchestrator, and relay its deltas as JSON or
server-sent events. A client that disconnects cancels the request on every node it
touched. The router never touches KV bytes.

Large prompts are rendered and tokenized on worker threads with the GIL released, so a
2 MB prompt does not pause every other stream. Every error is OpenAI-shaped JSON (the
routing layer's own 404/405 too); 429 and 503 carry `Retry-After`. The API key is
compared in constant time, the `Bearer` scheme case-insensitively.

Sampling defaults come from the model's generation_config.json (read once, at start),
unless the spec's `generation_config` is `vllm`: see `read_sampling_defaults`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zmq.asyncio
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from kv_connector.cluster_key import ClusterKey
from engine.tokenizer import PromptTooLong, Tokenizer
from router import responses as build
from router.auth import ApiKeyMiddleware
from router.disaggregation import DisaggregationRule
from router.membership import install_membership
from router.metrics import RouterMetrics
from router.node_client import PEAK_HISTORY_S, NodeClient
from router.orchestrator import Delta, ForkGroup, Orchestrator, RequestFailed
from router.policy import RoutingPolicy
from router.protocol import (GENERATION_CONFIG_SAMPLING_KEYS, ChatCompletionRequest, CompletionRequest, ModelCard,
                             ModelList, RequestError, error_body, now, parse_request, random_id, sampling_defaults)
from router.structured import AnswerPlan, ServerFeatures, check_tools, forced_tool_calls, template_takes_tools
from router.spec import RouterLaunchSpec
from router.sse import SSE_DONE, json_bytes, sse_data, sse_error

log = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 0.5
# Bodies up to this size are tokenized on the event loop (well under a millisecond);
# larger ones on a worker thread.
INLINE_TOKENIZE_BYTES = 32 << 10
# Retry-After (seconds) on 429 (at the concurrency limit) and 503 (no healthy node).
RETRY_AFTER_S = {429: 1, 503: 2}
# Response headers: where the request's prompt was planned to prefill (remote|local), and why.
PREFILL_HEADER = "x-pdcluster-prefill"
PREFILL_REASON_HEADER = "x-pdcluster-prefill-reason"
_ADMIN_PATHS = ("/cluster", "/metrics")
DISCONNECT_POLL_S = 0.5  # how often a request without a stream to write to asks whether its client is there
# Per node in GET /cluster, from its last stats.
_CLUSTER_FIELDS = ("kv_blocks_total", "kv_blocks_free", "kv_blocks_cached", "running", "waiting",
                   "waiting_for_remote_kv", "prefix_cache_queries", "prefix_cache_hits", "num_preemptions",
                   "prefix_cache_query_tokens", "prefix_cache_hit_tokens", "kv_evictions", "kv_cache_digest",
                   "eviction_policy", "forks", "fork_blocks_shared", "fork_blocks_copied", "fork_tokens_saved",
                   "fork_fallbacks", "tokens_computed")
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                503: "service_unavailable_error"}


def error(message: str, code: int, headers: dict[str, str] | None = None) -> JSONResponse:
    headers = {**(headers or {}), **({"Retry-After": str(RETRY_AFTER_S[code])} if code in RETRY_AFTER_S else {})}
    kind = _ERROR_TYPES.get(code, "invalid_request_error" if 400 <= code < 500 else "internal_server_error")
    return JSONResponse(error_body(message, kind, code), status_code=code, headers=headers or None)


def read_sampling_defaults(model_dir: str | Path, source: str = "auto") -> dict[str, Any]:
    """The sampling defaults of the model's generation_config.json (by SamplingParams
    name), as vLLM's `--generation-config`: `auto` applies them to every field a request
    does not send, `vllm` ignores them (the engine's neutral defaults). Logged once, as
    vLLM logs it, so an operator sees why unsent fields do not sample as the API's defaults."""
    if source not in ("auto", "vllm"):
        raise ValueError(f"generation_config {source!r}: use auto (the model's generation_config.json) or vllm")
    path = Path(model_dir) / "generation_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): fix it, or remove it") from None
    if source == "vllm":
        ignored = sorted(k for k in GENERATION_CONFIG_SAMPLING_KEYS if isinstance(config, dict) and k in config)
        if ignored:
            log.info("generation_config: vllm: ignoring the sampling defaults of %s (%s)", path, ", ".join(ignored))
        return {}
    defaults = sampling_defaults(config if isinstance(config, dict) else {})
    if defaults:
        log.warning("Default sampling parameters have been overridden by the model's generation_config.json: %s "
                    "(they apply to every field a request does not send; set model.generation_config: vllm in "
                    "cluster.yaml to ignore them)", defaults)
    return defaults


class BodyTooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or BodyTooLarge as soon as it passes `limit` (before reading it all)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


class Router:
    """Everything one router process holds: nodes, routing, tokenizer, counters."""

    def __init__(self, spec: RouterLaunchSpec):
        self.spec = spec
        self.tokenizer = Tokenizer.from_pretrained(spec.model_dir)
        self.max_model_len = spec.max_model_len or _max_position_embeddings(spec.model_dir)
        self.sampling_defaults = read_sampling_defaults(spec.model_dir, spec.generation_config)
        self.ctx = zmq.asyncio.Context()
        self.cluster_key = ClusterKey.from_env()  # nodes that join later are reached with it too
        self.nodes = [NodeClient(n, self.ctx, spec.node_timeout_s, self.cluster_key) for n in spec.nodes]
        self.tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        self.policy = RoutingPolicy(spec.policy, spec.block_size)
        self.metrics = RouterMetrics(self.nodes, self.policy.kv_stats)
        rule = DisaggregationRule(spec.disaggregation_mode, spec.colocated_share_kv, spec.max_local_prefill_tokens,
                                  spec.max_prefill_queue)
        self.orchestrator = Orchestrator(
            self.nodes, self.policy, spec.load_failure_policy,
            on_failover=lambda stage: self.metrics.failovers.labels(stage).inc(), disaggregation=rule,
            dispatch_to_both=spec.dispatch_to_both,
            on_prefill_decision=lambda plan: self.metrics.prefill_decisions.labels(plan.decision, plan.reason).inc())
        self.features = ServerFeatures(spec)   # structured outputs, reasoning and tool parsers
        self.in_flight = 0
        self._health_task: asyncio.Task | None = None

    async def start(self) -> None:
        for n in self.nodes:
            n.connect()
        self._health_task = asyncio.create_task(self._health_loop())

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        self.policy.close()
        for n in self.nodes:
            await n.close()
        self.ctx.term()
        self.tokenize_pool.shutdown(wait=False, cancel_futures=True)

    async def _health_loop(self) -> None:
        while True:
            try:
                await self._health_tick()
            except Exception:  # never let the health checks die: nodes would never be marked down
                log.exception("health check failed")
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def _health_tick(self) -> None:
        was_down = {n.id for n in self.nodes if not n.healthy}
        pids = {n.id: n.last_stats.pid for n in self.nodes if n.last_stats is not None}
        await asyncio.gather(*(n.check_health() for n in self.nodes))
        for n in self.nodes:
            # A new pid: restarted between two ticks, perhaps behind the same ports.
            new_process = n.last_stats is not None and pids.get(n.id, n.last_stats.pid) != n.last_stats.pid
            if n.healthy and (n.id in was_down or new_process):
                self.policy.node_restarted(n.id)  # its prefix cache starts empty
                if n.id in was_down and not new_process and n.last_stats.kv_engine_id:
                    # Frozen, not dead: its consumers were told it was down; it lends again.
                    for c in self.nodes:
                        if c is not n and c.role in ("decode", "both"):
                            await c.producer_up(n.last_stats.kv_engine_id)
            elif (n.id not in was_down and not n.healthy and not n.draining and n.role in ("prefill", "both")
                  and n.last_stats and n.last_stats.kv_engine_id):  # a draining producer still lends
                # A producer gone: its consumers stop waiting for KV from it and recompute now.
                for c in self.nodes:
                    if c is not n and c.healthy and c.role in ("decode", "both"):
                        await c.producer_down(n.last_stats.kv_engine_id)
        self.policy.follow_kv_events(self.nodes, self.ctx)  # subscribe to new nodes' KV events

    def can_serve(self) -> bool:
        healthy = {n.role for n in self.nodes if n.healthy}
        return "both" in healthy or {"prefill", "decode"} <= healthy

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def _max_position_embeddings(model_dir: str) -> int:
    import json
    return int(json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings", 4096))


def create_app(spec: RouterLaunchSpec) -> FastAPI:
    router = Router(spec)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await router.start()
        yield
        await router.stop()

    app = FastAPI(title="pdcluster router", lifespan=lifespan)
    app.state.router = router

    @app.exception_handler(StarletteHTTPException)
    async def routing_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """The routing layer's own errors (an unknown route, a wrong method) in the API's shape."""
        if exc.status_code == 404:
            message = (f"{request.method} {request.url.path} is not served here: the API is POST /v1/completions, "
                       "POST /v1/chat/completions, GET /v1/models")
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
            allowed = (exc.headers or {}).get("Allow")
            message += f": use {allowed}" if allowed else ""
        else:
            message = str(exc.detail)
        return error(message, exc.status_code, headers=exc.headers)

    membership = install_membership(app, router)  # /cluster/scale, /cluster/nodes, /cluster/membership

    if spec.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=spec.api_key, protected=lambda path: path.startswith("/v1/") or (
            spec.protect_admin_endpoints and path in _ADMIN_PATHS))

    @app.get("/health")
    async def health():
        ok = router.can_serve()
        body = {"status": "ok" if ok else "unavailable",
                "healthy_nodes": sum(n.healthy for n in router.nodes), "nodes": len(router.nodes)}
        headers = None if ok else {"Retry-After": str(RETRY_AFTER_S[503])}
        return JSONResponse(body, status_code=200 if ok else 503, headers=headers)

    @app.get("/cluster")
    async def cluster(peak_window_s: float = Query(1.0, gt=0, le=PEAK_HISTORY_S)):
        """Every node's state. `peak_running`/`peak_waiting`: the most requests a node ran
        or queued at any step of the last `peak_window_s` seconds (a sampler like the bench
        asks for its own interval; readers do not disturb each other).
        `prefills_waiting` / `prefill_tokens_waiting`: prefills this router sent there whose
        first token is not back, and the prompt tokens they compute; with `in_flight` (this
        router's requests on the node) what router.disaggregation's `conditional` mode
        weighs. `stats_current` false: the node is down and its engine fields are zeros, not
        its last stats; `draining`: it is stopping (no new jobs, its streams finish there).
        `aborts_sent` and
        `kv_releases_sent`: requests this router stopped there before their end (a client
        gone, a failover) and lent KV it freed unread."""
        nodes = []
        for n in router.nodes:
            e = n.last_stats.engine if n.stats_current else None
            peak_running, peak_waiting = n.peaks(peak_window_s)
            nodes.append({"id": n.id, "role": n.role, "address": n.address, "pid": n.pid, "healthy": n.healthy,
                          "state": membership.state(n), "placement": membership.placement.get(n.id, {}),
                          "peak_running": peak_running, "peak_waiting": peak_waiting,
                          "messages_dropped": n.last_stats.messages_dropped if n.last_stats else 0,
                          **{f: getattr(e, f) if e else 0 for f in _CLUSTER_FIELDS},
                          "kv_events_address": n.last_stats.kv_events_address if n.last_stats else "",
                          "kv_events_replay_address": n.last_stats.kv_events_replay_address if n.last_stats else "",
                          "kv_blocks_indexed": router.policy.index.num_blocks(n.id),
                          "in_flight": n.in_flight, "draining": n.draining, "stats_current": n.stats_current,
                          "prefills_waiting": router.orchestrator.planner.queue[n.id],
                          "prefill_tokens_waiting": router.orchestrator.planner.queue.tokens(n.id),
                          "aborts_sent": n.aborts_sent, "kv_releases_sent": n.kv_releases_sent,
                          "kv_transfer": e.kv_transfer if e else {}})
        return {"nodes": nodes, "policy": spec.policy, "model": spec.served_model_name,
                "disaggregation": {"mode": spec.disaggregation_mode, "colocated_share_kv": spec.colocated_share_kv,
                                   "max_local_prefill_tokens": spec.max_local_prefill_tokens,
                                   "max_prefill_queue": spec.max_prefill_queue}}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> ModelCard:
        return ModelCard(id=spec.served_model_name, root=spec.model_dir, max_model_len=router.max_model_len)

    @app.get("/v1/models")
    async def models():
        return Response(json_bytes(ModelList(data=[model_card()])), media_type="application/json")

    @app.get("/v1/models/{model_id:path}")  # `path`: ids such as org/name or a directory hold '/'
    async def model(model_id: str):
        if model_id != spec.served_model_name:
            return error(f"model {model_id!r} is not served here: use {spec.served_model_name!r}", 404)
        return Response(json_bytes(model_card()), media_type="application/json")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _serve(request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _serve(request, ChatCompletionRequest, chat=True)

    async def _serve(request: Request, cls, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        try:
            return await _serve_checked(request, cls, chat, endpoint)
        except Exception as e:  # a router bug: still an OpenAI-shaped answer, and the connection stays usable
            log.exception("%s request failed", endpoint)
            router.metrics.requests.labels(endpoint, 500).inc()
            return error(f"internal error: {type(e).__name__}: {e}", 500)

    async def _serve_checked(request: Request, cls, chat: bool, endpoint: str) -> Response:
        try:
            body = await _read_body(request, spec.max_request_body_bytes)
        except BodyTooLarge:
            router.metrics.requests.labels(endpoint, 413).inc()
            return error(f"the request body is larger than the server's limit of {spec.max_request_body_bytes} "
                         "bytes (router.max_request_body_bytes): send a shorter prompt", 413)
        try:
            req = parse_request(cls, body)
            if req.model is not None and req.model != spec.served_model_name:
                router.metrics.requests.labels(endpoint, 404).inc()
                return error(f"model {req.model!r} is not served here: use {spec.served_model_name!r}", 404)
            if len(body) <= INLINE_TOKENIZE_BYTES:
                prompt_ids, prompt_text = _prompt_ids(router, req, chat)
            else:  # megabytes of prompt: off the event loop, so the other streams go on
                prompt_ids, prompt_text = await asyncio.get_running_loop().run_in_executor(
                    router.tokenize_pool, _prompt_ids, router, req, chat)
            room = router.max_model_len - len(prompt_ids)
            if room < 1:
                raise RequestError(f"the prompt has {len(prompt_ids)} tokens, but the model's context is "
                                   f"{router.max_model_len}: shorten it")
            params = req.to_sampling_params(default_max_tokens=room, defaults=router.sampling_defaults)
            if params.max_tokens is not None and params.max_tokens > room:
                raise RequestError(f"max_tokens={params.max_tokens} plus the prompt's {len(prompt_ids)} tokens "
                                   f"exceed the model's context of {router.max_model_len}: lower max_tokens")
            plan = router.features.plan(req, chat, router.tokenizer, prompt_text)
            params.structured_outputs = plan.constraint
        except (RequestError, ValueError) as e:
            router.metrics.requests.labels(endpoint, 400).inc()
            return error(str(e), 400)
        limit = spec.max_concurrent_requests
        if limit is not None and router.in_flight >= limit:
            router.metrics.requests.labels(endpoint, 429).inc()
            return error(f"the server is at its limit of {limit} concurrent requests: retry shortly", 429)
        run = _Run(router, req, prompt_ids, params, chat, plan, prompt_text)
        try:
            head = await _start_unless_gone(run, request)
        except RequestFailed as e:
            router.metrics.requests.labels(endpoint, e.code).inc()
            return error(str(e), e.code)
        if head is None:  # the client hung up while its prompt was prefilled: the work is stopped
            router.metrics.requests.labels(endpoint, 499).inc()
            return Response(status_code=499)
        headers = _prefill_headers(head)
        if req.stream:
            return _StreamResponse(run, head, headers)
        response = await run.collect(head, request)
        response.headers.update(headers)
        return response

    return app


async def _unless_gone(task: asyncio.Future, request: Request) -> bool:
    """Wait for `task`, asking every DISCONNECT_POLL_S whether the client is still there
    (a request with no stream to write to learns of a hang-up no other way). False: it
    left, and `task` was cancelled (and awaited: its cleanup stops the work on the nodes)."""
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return False
        return True
    finally:
        if not task.done():
            task.cancel()


async def _start_unless_gone(run: _Run, request: Request) -> Delta | None:
    """`run.start()`, or None (and the run stopped on its nodes) if the client hangs up
    before the first token: a long prompt's prefill is not computed for nobody."""
    start = asyncio.ensure_future(run.start())
    return start.result() if await _unless_gone(start, request) else None


def _prefill_headers(head: Delta) -> dict[str, str]:
    """Where choice 0 was planned to prefill (router/disaggregation.py), for clients and
    the benchmark: `x-pdcluster-prefill: remote|local` and the reason."""
    if head.prefill is None:
        return {}
    return {PREFILL_HEADER: head.prefill, PREFILL_REASON_HEADER: head.prefill_reason or ""}


def _prompt_ids(router: Router, req, chat: bool) -> tuple[list[int], str]:
    """The prompt's token ids, and its text (what reasoning checks and echo repeat).
    May run on a worker thread (see INLINE_TOKENIZE_BYTES)."""
    tok, limit = router.tokenizer, router.max_model_len
    try:
        if chat:
            if req.tools:
                check_tools(req.tools)
                template = tok.chat_templates.get("tool_use") or tok.chat_templates.get("default")
                if template is not None and not template_takes_tools(template):
                    raise RequestError("this model's chat template does not take tools: it would drop them silently; "
                                       "serve a model whose template renders `tools`, or describe the tools in a message")
            try:
                text = tok.apply_chat_template(req.conversation(), add_generation_prompt=req.add_generation_prompt,
                                               continue_final_message=req.continue_final_message, tools=req.tools,
                                               **(req.chat_template_kwargs or {}))
            except (TypeError, KeyError, AttributeError, IndexError) as e:  # the template met data it cannot take
                raise RequestError(f"the chat template cannot render these messages/tools ({type(e).__name__}: "
                                   f"{e}): check their shape") from None
            return tok.encode_untrusted(text, add_special_tokens=False, max_tokens=limit), text  # specials are in
        if isinstance(req.prompt, str):
            if not req.prompt:
                raise RequestError("prompt is empty")
            return tok.encode_untrusted(req.prompt, max_tokens=limit), req.prompt
    except PromptTooLong as e:
        raise RequestError(f"{e} (the model's context is {limit} tokens)") from None
    if not req.prompt:
        raise RequestError("prompt is an empty list of token ids")
    vocab = tok.vocab_size
    bad = [t for t in req.prompt if not 0 <= t < vocab]
    if bad:
        raise RequestError(f"prompt has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
    return list(req.prompt), tok.decode(req.prompt, skip_special_tokens=False)


class _Choice:
    """One of a request's `n` choices: its engine stream, and the parsers that read it
    (reasoning first, then tool calls in what is left)."""

    def __init__(self, index: int, stream: AsyncIterator[Delta], plan: AnswerPlan):
        self.index, self.stream, self.plan = index, stream, plan
        self.reasoning = plan.reasoning.stream(plan.starts_in_reasoning) if plan.reasoning is not None else None
        self.tools = plan.tool_parser.stream() if plan.tool_parser is not None else None
        self.forced_tools = plan.tool_mode in ("required", "named")
        self.tokens = 0
        self.logprobs: list = []
        self.content: list[str] = []
        self.reasoning_text: list[str] = []
        self.calls: list = []
        self.finish_reason: str | None = None
        self.last: Delta | None = None

    def read(self, text: str, final: bool) -> tuple[str, str, list]:
        """New (reasoning, content, tool calls) from a text delta; `final` flushes."""
        r, c = self.reasoning.feed(text) if self.reasoning is not None else ("", text)
        if final and self.reasoning is not None:
            r2, c2 = self.reasoning.finish()
            r, c = r + r2, c + c2
        calls: list = []
        if self.tools is not None:
            c, calls = self.tools.feed(c)
            if final:
                c2, calls2 = self.tools.finish()
                c, calls = c + c2, calls + calls2
        if self.forced_tools:  # the grammar-forced JSON is read whole at the end
            self.content.append(c)
            c = ""
            if final:
                whole = "".join(self.content)
                forced = forced_tool_calls(self.plan, whole)
                if forced is None:
                    c = whole  # cut short (max_tokens): the client gets what was written
                else:
                    self.content = []
                    calls = forced
        else:
            self.content.append(c)
        if self.plan.max_tool_calls is not None:  # parallel_tool_calls false: the first call only (vLLM)
            calls = calls[:max(0, self.plan.max_tool_calls - len(self.calls))]
        self.reasoning_text.append(r)
        self.calls += calls
        return r, c, calls

    def api_finish_reason(self, reason: str | None) -> str | None:
        if reason == "stop" and self.calls and self.plan.tool_mode != "named":
            return "tool_calls"
        return reason


class _StreamResponse(StreamingResponse):
    """A streamed answer whose request always ends, however the connection does. Starlette
    never starts the body when the client is gone before the first send (its `finally`
    would never run: the request's work would go on and its admission slot stay taken),
    and leaves a body that a failed send interrupted suspended until garbage collection.
    So the body is closed here and the request ended (a no-op when the body did it)."""

    def __init__(self, run: _Run, head: Delta, headers: dict[str, str]):
        super().__init__(run.sse(head), media_type="text/event-stream", headers=headers)
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            await self.run._finish(499)


class _Run:
    """One admitted request: its choices' deltas, counted into usage and metrics."""

    def __init__(self, router: Router, req, prompt_ids: list[int], params, chat: bool, plan: AnswerPlan,
                 prompt_text: str):
        self.router, self.req, self.prompt_ids, self.params, self.chat = router, req, prompt_ids, params, chat
        self.plan, self.prompt_text = plan, prompt_text
        self.id = random_id("chatcmpl" if chat else "cmpl")
        self.created = now()
        self.model = router.spec.served_model_name
        self.t0 = time.monotonic()
        self.cached_tokens = 0
        self.n = req.n or 1
        self.affinity = req.workflow_id or req.agent_id
        # Choices 1..n-1 follow choice 0 to its nodes as forks of it: each node shares
        # choice 0's prompt blocks with them (router/orchestrator.py, engine/forking.py).
        self.fork = ForkGroup(self.id) if self.n > 1 else None
        self.choices = [self._choice(0)]
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []
        self._done = False
        router.in_flight += 1
        router.metrics.in_flight.inc()

    def _choice(self, index: int) -> _Choice:
        params = self.params
        if index > 0 and params.seed is not None:  # vLLM's rule: choice i samples with seed + i
            params = dataclasses.replace(params, seed=params.seed + index)
        stream = self.router.orchestrator.generate(self.id if index == 0 else f"{self.id}-{index}", self.prompt_ids,
                                                   params, self.affinity, workflow_id=self.req.workflow_id,
                                                   agent_id=self.req.agent_id, fork=self.fork)
        return _Choice(index, stream, self.plan)

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    async def start(self) -> Delta:
        """Start every choice and wait for choice 0's first delta (its first token, or an
        error before any: then the others are stopped). The other choices follow choice 0
        to its nodes at once (router/orchestrator.py ForkGroup): their jobs arrive while
        choice 0 prefills and fork it as soon as its prompt is computed, before a decode
        node dispatched at the same time has pulled (and the prefill node freed) its KV."""
        self.choices += [self._choice(i) for i in range(1, self.n)]
        self._pumps += [asyncio.create_task(self._pump(c)) for c in self.choices[1:]]
        try:
            head = await self.choices[0].stream.__anext__()
        except BaseException:
            await self._finish(None)
            raise
        if head.error is not None and not head.token_ids:  # refused before any token: an HTTP error, not a 200
            await self._finish(None)
            raise RequestFailed(head.error, head.error_code or 500)
        self.router.metrics.ttft.observe(time.monotonic() - self.t0)
        self.cached_tokens = head.num_cached_tokens
        self.router.metrics.observe_prompt_cache(self.req.workflow_id, self.req.agent_id, len(self.prompt_ids),
                                                 head.num_cached_tokens)
        return head

    async def deltas(self, head: Delta) -> AsyncIterator[tuple[_Choice, Delta]]:
        """Every choice's deltas, interleaved as they come, each choice's last one finished."""
        yield self.choices[0], head
        live = len(self.choices)  # the other choices' pumps run since start()
        if head.finished:
            live -= 1
        else:
            self._pumps.append(asyncio.create_task(self._pump(self.choices[0])))
        while live:
            choice, d = await self._queue.get()
            if d.finished:
                live -= 1
            yield choice, d

    async def _pump(self, choice: _Choice) -> None:
        try:
            async for d in choice.stream:
                await self._queue.put((choice, d))
                if d.finished:
                    return
            await self._queue.put((choice, Delta(finished=True, finish_reason="error", error="stream ended early",
                                                 error_code=500)))
        except RequestFailed as e:  # mid-stream (e.g. no decode node left): end with an error
            await self._queue.put((choice, Delta(finished=True, finish_reason="error", error=str(e),
                                                 error_code=e.code)))
        except Exception as e:
            log.exception("request_id=%s choice=%d: stream failed", self.id, choice.index)
            await self._queue.put((choice, Delta(finished=True, finish_reason="error", error=f"internal error: {e}",
                                                 error_code=500)))

    async def _finish(self, status: int | None) -> None:
        if self._done:
            return
        self._done = True
        self.router.in_flight -= 1
        r = self.router.metrics
        r.in_flight.dec()
        if status is not None:
            r.requests.labels("chat" if self.chat else "completions", status).inc()
            r.e2e.observe(time.monotonic() - self.t0)
            r.prompt_tokens.inc(len(self.prompt_ids))
            r.generation_tokens.inc(self.completion_tokens)
        for task in self._pumps:
            task.cancel()
        for task in self._pumps:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for c in self.choices:
            await c.stream.aclose()  # on a disconnect: aborts the request on its nodes

    def _usage(self):
        return build.usage(len(self.prompt_ids), self.completion_tokens, self.cached_tokens)

    def _logprobs(self, entries):
        """The raw logprob entries when the request asked for them."""
        return entries if self.params.logprobs is not None and entries else None

    async def sse(self, head: Delta) -> AsyncIterator[bytes]:
        """The SSE body. Its own `finally` ends the request (_finish) once it has started;
        _StreamResponse makes sure of it when the client is gone before that."""
        status = 500
        offsets = [0] * self.n
        try:
            if self.chat:
                for i in range(self.n):
                    yield sse_data(build.chat_delta_chunk(self.id, self.model, self.created, i, content="",
                                                          role="assistant"))
            elif self.req.echo:
                for i in range(self.n):
                    yield sse_data(build.completion_chunk(self.id, self.model, self.created, self.prompt_text,
                                                          index=i))
            async for choice, d in self.deltas(head):
                if d.error is not None:
                    yield sse_error(d.error, _ERROR_TYPES.get(d.error_code, "internal_server_error"), d.error_code or 500)
                    yield SSE_DONE
                    status = d.error_code or 500
                    return
                choice.tokens += len(d.token_ids)
                reason = d.finish_reason if d.finished else None
                if not (d.text or d.finished or d.token_ids):
                    continue
                lps = self._logprobs(d.logprobs)
                if self.chat:
                    r, c, calls = choice.read(d.text, d.finished)
                    finish = choice.api_finish_reason(reason)
                    if not (r or c or calls or finish or lps):
                        continue  # a parser holds the text back: a chunk would carry nothing
                    deltas = [build.tool_call_delta(len(choice.calls) - len(calls) + k, call.id, call.name,
                                                    call.arguments) for k, call in enumerate(calls)]
                    chunk = build.chat_delta_chunk(
                        self.id, self.model, self.created, choice.index, content=c if (c or not (r or deltas)) else None,
                        reasoning_content=r or None, tool_calls=deltas or None, finish_reason=finish, logprobs=lps,
                        token_text=self.router.token_text)
                else:
                    chunk = build.completion_chunk(self.id, self.model, self.created, d.text, reason,
                                                   logprobs=lps, token_text=self.router.token_text,
                                                   text_offset=offsets[choice.index], index=choice.index)
                    # completions' text_offset counts the token texts sent so far
                    offsets[choice.index] += sum(len(self.router.token_text(e.token_id)) for e in lps or ())
                yield sse_data(chunk)
            if self.req.include_usage:
                make = build.chat_usage_chunk if self.chat else build.completion_usage_chunk
                yield sse_data(make(self.id, self.model, self.created, self._usage()))
            yield SSE_DONE
            status = 200
        except (asyncio.CancelledError, GeneratorExit):  # the client hung up: not a server error
            status = 499
            raise
        except Exception as e:  # a router bug mid-stream: the client still gets an error and [DONE]
            log.exception("request_id=%s: stream failed", self.id)
            yield sse_error(f"internal error: {e}")
            yield SSE_DONE
        finally:
            await self._finish(status)

    async def collect(self, head: Delta, request: Request) -> Response:
        """Non-streaming: gather every choice's deltas; a client that hangs up cancels the work."""
        async def gather() -> Delta | None:
            texts: dict[int, list[str]] = {c.index: [] for c in self.choices}
            async for choice, d in self.deltas(head):
                if d.error is not None:
                    return d
                texts[choice.index].append(d.text)
                choice.tokens += len(d.token_ids)
                choice.logprobs += d.logprobs or []
                if d.finished:
                    choice.finish_reason = d.finish_reason
                    if self.chat:
                        choice.read("".join(texts[choice.index]), final=True)
                    else:
                        choice.content = texts[choice.index]
            return None

        task = asyncio.create_task(gather())
        status = 500
        try:
            if not await _unless_gone(task, request):
                status = 499
                return Response(status_code=499)
            failed = task.result()
            if failed is not None:
                status = failed.error_code or 500
                return error(failed.error, status)
            try:
                body = self._response()
            except Exception as e:  # a router bug building the answer: counted once, by _finish
                log.exception("request_id=%s: building the response failed", self.id)
                return error(f"internal error: {type(e).__name__}: {e}", 500)
            status = 200
            return Response(json_bytes(body), media_type="application/json")
        finally:
            await self._finish(status)

    def _response(self):
        tt = self.router.token_text
        if not self.chat:
            echo = self.prompt_text if self.req.echo else ""
            choices = [build.completion_choice(c.index, echo + "".join(c.content), c.finish_reason,
                                               self._logprobs(c.logprobs), tt) for c in self.choices]
            return build.completion_response_of(self.id, self.model, choices, self._usage())
        choices = []
        for c in self.choices:
            content = "".join(c.content)
            if c.tools is not None and c.calls:
                content = c.tools.message_content(content)  # hermes: the text before the first call (vLLM)
            reasoning = "".join(c.reasoning_text)
            calls = [build.tool_call(call.id, call.name, call.arguments) for call in c.calls]
            has_reasoning = c.reasoning is not None and (reasoning or c.reasoning.seen_start
                                                         or c.plan.starts_in_reasoning)
            choices.append(build.chat_choice(
                c.index, content if (content or not calls) else None, c.api_finish_reason(c.finish_reason),
                reasoning_content=reasoning if has_reasoning else None, tool_calls=calls or None,
                logprobs=self._logprobs(c.logprobs), token_text=tt))
        return build.chat_response_of(self.id, self.model, choices, self._usage())
