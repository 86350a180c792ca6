"""The front door: an OpenAI-compatible HTTP API over the cluster's nodes.

Per request: validate (400s name the field), tokenize (text or token ids; chat
templates), admit (429 beyond max_concurrent_requests), hand to the Orchestrator, and
relay its deltas as JSON or server-sent events. A client that disconnects cancels the
request on every node it touched. The router never touches KV bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import zmq.asyncio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine.tokenizer import Tokenizer
from router import responses as build
from router.membership import install_membership
from router.metrics import RouterMetrics
from router.node_client import NodeClient
from router.orchestrator import Delta, Orchestrator, RequestFailed
from router.policy import RoutingPolicy
from router.protocol import (ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, RequestError,
                             error_body, now, parse_request, random_id)
from router.spec import RouterLaunchSpec
from router.sse import SSE_DONE, json_bytes, sse_data, sse_error

log = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 0.5
# Per node in GET /cluster, from its last stats.
_CLUSTER_FIELDS = ("kv_blocks_total", "kv_blocks_free", "kv_blocks_cached", "running", "waiting",
                   "waiting_for_remote_kv", "prefix_cache_queries", "prefix_cache_hits", "num_preemptions")
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                429: "rate_limit_error", 503: "service_unavailable_error"}


def error(message: str, code: int) -> JSONResponse:
    return JSONResponse(error_body(message, _ERROR_TYPES.get(code, "internal_server_error"), code), status_code=code)


class Router:
    """Everything one router process holds: nodes, routing, tokenizer, counters."""

    def __init__(self, spec: RouterLaunchSpec):
        self.spec = spec
        self.tokenizer = Tokenizer.from_pretrained(spec.model_dir)
        self.max_model_len = spec.max_model_len or _max_position_embeddings(spec.model_dir)
        self.ctx = zmq.asyncio.Context()
        self.nodes = [NodeClient(n, self.ctx) for n in spec.nodes]
        self.policy = RoutingPolicy(spec.policy, spec.block_size)
        self.metrics = RouterMetrics(self.nodes)
        self.orchestrator = Orchestrator(self.nodes, self.policy, spec.load_failure_policy,
                                         on_failover=lambda stage: self.metrics.failovers.labels(stage).inc())
        self.in_flight = 0
        self._health_task: asyncio.Task | None = None

    async def start(self) -> None:
        for n in self.nodes:
            n.connect()
        self._health_task = asyncio.create_task(self._health_loop())

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        for n in self.nodes:
            await n.close()
        self.ctx.term()

    async def _health_loop(self) -> None:
        while True:
            was_down = {n.id for n in self.nodes if not n.healthy}
            await asyncio.gather(*(n.check_health() for n in self.nodes))
            for n in self.nodes:
                if n.id in was_down and n.healthy:
                    self.policy.node_restarted(n.id)  # its prefix cache starts empty
            await asyncio.sleep(HEALTH_INTERVAL_S)

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
    membership = install_membership(app, router)  # /cluster/scale, /cluster/nodes, /cluster/membership

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if spec.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {spec.api_key}":
                return error("missing or wrong API key: send 'Authorization: Bearer <key>'", 401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        ok = router.can_serve()
        body = {"status": "ok" if ok else "unavailable",
                "healthy_nodes": sum(n.healthy for n in router.nodes), "nodes": len(router.nodes)}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/cluster")
    async def cluster():
        """Every node's state. `peak_running`/`peak_waiting`: the most requests a node ran
        or queued at any step since the previous GET /cluster (for samplers like the bench)."""
        nodes = []
        for n in router.nodes:
            e = n.last_stats.engine if n.last_stats else None
            peak_running, peak_waiting = n.take_peaks()
            nodes.append({"id": n.id, "role": n.role, "address": n.address, "pid": n.pid, "healthy": n.healthy,
                          "state": membership.state(n), "placement": membership.placement.get(n.id, {}),
                          "peak_running": peak_running, "peak_waiting": peak_waiting,
                          **{f: getattr(e, f) if e else 0 for f in _CLUSTER_FIELDS},
                          "kv_transfer": e.kv_transfer if e else {}})
        return {"nodes": nodes, "policy": spec.policy, "model": spec.served_model_name}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        card = ModelCard(id=spec.served_model_name, root=spec.model_dir, max_model_len=router.max_model_len)
        return Response(json_bytes(ModelList(data=[card])), media_type="application/json")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _serve(request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _serve(request, ChatCompletionRequest, chat=True)

    async def _serve(request: Request, cls, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        try:
            req = parse_request(cls, await request.body())
            if req.model is not None and req.model != spec.served_model_name:
                router.metrics.requests.labels(endpoint, 404).inc()
                return error(f"model {req.model!r} is not served here: use {spec.served_model_name!r}", 404)
            prompt_ids = _prompt_ids(router, req, chat)
            room = router.max_model_len - len(prompt_ids)
            if room < 1:
                raise RequestError(f"the prompt has {len(prompt_ids)} tokens, but the model's context is "
                                   f"{router.max_model_len}: shorten it")
            params = req.to_sampling_params(default_max_tokens=room)
            if params.max_tokens is not None and params.max_tokens > room:
                raise RequestError(f"max_tokens={params.max_tokens} plus the prompt's {len(prompt_ids)} tokens "
                                   f"exceed the model's context of {router.max_model_len}: lower max_tokens")
        except (RequestError, ValueError) as e:
            router.metrics.requests.labels(endpoint, 400).inc()
            return error(str(e), 400)
        limit = spec.max_concurrent_requests
        if limit is not None and router.in_flight >= limit:
            router.metrics.requests.labels(endpoint, 429).inc()
            return error(f"the server is at its limit of {limit} concurrent requests: retry shortly", 429)
        run = _Run(router, req, prompt_ids, params, chat)
        try:
            head = await run.start()
        except RequestFailed as e:
            router.metrics.requests.labels(endpoint, e.code).inc()
            return error(str(e), e.code)
        if req.stream:
            return StreamingResponse(run.sse(head), media_type="text/event-stream")
        return await run.collect(head, request)

    return app


def _prompt_ids(router: Router, req, chat: bool) -> list[int]:
    if chat:
        text = router.tokenizer.apply_chat_template(req.conversation(), add_generation_prompt=True, tools=req.tools)
        return router.tokenizer.encode(text, add_special_tokens=False)  # the template wrote the specials
    if isinstance(req.prompt, str):
        if not req.prompt:
            raise RequestError("prompt is empty")
        return router.tokenizer.encode(req.prompt)
    if not req.prompt:
        raise RequestError("prompt is an empty list of token ids")
    vocab = router.tokenizer.vocab_size
    bad = [t for t in req.prompt if not 0 <= t < vocab]
    if bad:
        raise RequestError(f"prompt has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
    return list(req.prompt)


class _Run:
    """One admitted request: its deltas, counted into usage and metrics."""

    def __init__(self, router: Router, req, prompt_ids: list[int], params, chat: bool):
        self.router, self.req, self.prompt_ids, self.params, self.chat = router, req, prompt_ids, params, chat
        self.id = random_id("chatcmpl" if chat else "cmpl")
        self.created = now()
        self.model = router.spec.served_model_name
        self.t0 = time.monotonic()
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.stream = router.orchestrator.generate(self.id, prompt_ids, params,
                                                   req.workflow_id or req.agent_id)
        self._done = False
        router.in_flight += 1
        router.metrics.in_flight.inc()

    async def start(self) -> Delta:
        """Wait for the first delta (the first token, or an error before any)."""
        try:
            head = await self.stream.__anext__()
        except BaseException:
            await self._finish(None)
            raise
        self.router.metrics.ttft.observe(time.monotonic() - self.t0)
        self.cached_tokens = head.num_cached_tokens
        return head

    async def deltas(self, head: Delta) -> AsyncIterator[Delta]:
        yield head
        try:
            async for d in self.stream:
                yield d
        except RequestFailed as e:  # mid-stream (e.g. no decode node left): end with an error
            yield Delta(finished=True, finish_reason="error", error=str(e), error_code=e.code)

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
        await self.stream.aclose()  # on a disconnect: aborts the request on its nodes

    def _usage(self):
        return build.usage(len(self.prompt_ids), self.completion_tokens, self.cached_tokens)

    def _logprobs(self, d: Delta):
        """The delta's raw logprob entries when the request asked for them."""
        return d.logprobs if self.params.logprobs is not None and d.logprobs else None

    async def sse(self, head: Delta) -> AsyncIterator[bytes]:
        status = 500
        offset = 0
        try:
            if self.chat:
                yield sse_data(build.chat_chunk(self.id, self.model, self.created, "", role="assistant"))
            async for d in self.deltas(head):
                if d.error is not None:
                    yield sse_error(d.error, _ERROR_TYPES.get(d.error_code, "internal_server_error"), d.error_code or 500)
                    yield SSE_DONE
                    status = d.error_code or 500
                    return
                self.completion_tokens += len(d.token_ids)
                reason = d.finish_reason if d.finished else None
                if d.text or d.finished or d.token_ids:
                    lps = self._logprobs(d)
                    if self.chat:
                        chunk = build.chat_chunk(self.id, self.model, self.created, d.text, reason,
                                                 logprobs=lps, token_text=self.router.token_text)
                    else:
                        chunk = build.completion_chunk(self.id, self.model, self.created, d.text, reason,
                                                       logprobs=lps, token_text=self.router.token_text,
                                                       text_offset=offset)
                        # completions' text_offset counts the token texts sent so far
                        offset += sum(len(self.router.token_text(e.token_id)) for e in lps or ())
                    yield sse_data(chunk)
                if d.finished:
                    break
            if self.req.include_usage:
                make = build.chat_usage_chunk if self.chat else build.completion_usage_chunk
                yield sse_data(make(self.id, self.model, self.created, self._usage()))
            yield SSE_DONE
            status = 200
        except Exception as e:  # a router bug mid-stream: the client still gets an error and [DONE]
            log.exception("request_id=%s: stream failed", self.id)
            yield sse_error(f"internal error: {e}")
            yield SSE_DONE
        finally:
            await self._finish(status)

    async def collect(self, head: Delta, request: Request) -> Response:
        """Non-streaming: gather every delta; a client that hangs up cancels the work."""
        async def gather() -> tuple[str, Delta, list]:
            text, last, lps = [], head, []
            async for d in self.deltas(head):
                if d.error is not None:
                    return "", d, []
                text.append(d.text)
                self.completion_tokens += len(d.token_ids)
                lps += d.logprobs or []
                last = d
                if d.finished:
                    break
            return "".join(text), last, lps

        task = asyncio.create_task(gather())
        status = 500
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.5)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    status = 499
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    return Response(status_code=499)
            text, last, lps = task.result()
            if last.error is not None:
                status = last.error_code or 500
                return error(last.error, status)
            args = dict(finish_reason=last.finish_reason, prompt_tokens=len(self.prompt_ids),
                        completion_tokens=self.completion_tokens, cached_tokens=self.cached_tokens,
                        logprobs=self._logprobs(Delta(logprobs=lps)), token_text=self.router.token_text)
            body = (build.chat_response if self.chat else build.completion_response)(self.id, self.model, text, **args)
            status = 200
            return Response(json_bytes(body), media_type="application/json")
        finally:
            if not task.done():
                task.cancel()
            await self._finish(status)
