"""One request's path through the cluster: prefill job, decode job, token stream.

Disaggregated (xPyD):
  1. The prefill node runs the prompt with max_tokens=1 and `do_remote_decode`: it samples
     the first token (streamed to the client at once) and lends the prompt's KV.
  2. The decode node gets the prompt, that token and the KV handle; it pulls the blocks
     and continues. Sampling is stateless per (seed, step) (engine/sampler.py), so the
     split changes no token; the router draws the seed when the client gave none.
Colocated: one node does both. Which of the two a request gets, and on which nodes, is
router/disaggregation.py's plan (router.disaggregation.mode: always, conditional, never);
`both` nodes that share KV are split like prefill and decode nodes.

Dispatch to both at once (when the prefill node advertises its KV service, as SGLang
does): the decode job is sent with the prefill job, carrying `streamed` KV parameters.
The decode node reserves its blocks and pulls each block as soon as the prefill node has
computed it, then continues from the first token the prefill node sampled (it arrives
with the last blocks); the router streams that token from the prefill node's answer and
the rest from the decode node. No round trip through the router stands between the
prefill's end and the decode's start. If the prefill job fails or stops on its first
token, the decode job is aborted (and, on failure, the request is served as below).

Failures (ARCHITECTURE §2). A prefill node that fails before answering: under
`recompute` the request goes to a decode node, which prefills it itself; under `fail`
the client gets a 5xx error at once. A decode node that fails mid-stream: under
`recompute` another decode node continues from the tokens streamed so far (it
recomputes their KV); under `fail`, an error. Either way the prefill node is told at
once to release the KV it lent for the request (nobody will pull it any more), rather
than holding it until abort_timeout_s. Bad input (4xx) is never retried.

`n` > 1 (a ForkGroup): choice 0 runs as above and records its plan's nodes; the other
choices go to the node that decodes choice 0, as forks of it (SubmitRequest.fork_of):
that node shares choice 0's prompt blocks with them (engine/forking.py) and computes one
row per choice for its first token. The prompt is prefilled once and its KV moves once.
When that node is gone or leaving, the choice takes its own plan, and its nodes compute
(or pull) as for any request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from contextlib import aclosing
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from engine import node_protocol as proto
from engine.sampling_params import SamplingParams
from router.disaggregation import DisaggregationPlanner, DisaggregationRule, PrefillPlan
from router.node_client import NodeClient, NodeUnavailable
from router.policy import NoHealthyNode, RoutingPolicy

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Delta:
    """What the HTTP layer streams: new tokens and text, and at the end how it ended."""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[proto.LogprobEntry] | None = None
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    error_code: int = 0
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    prefill: str | None = None          # first delta only: the plan, "remote" or "local"
    prefill_reason: str | None = None   # and why (router/disaggregation.py)


@dataclass(slots=True)
class ForkGroup:
    """The choices of one `n` > 1 request: choice 0's request id and the nodes its plan
    chose (prefill None: served whole on `decode`)."""
    request_id: str
    decode: NodeClient | None = None
    prefill: NodeClient | None = None
    placed: asyncio.Event = field(default_factory=asyncio.Event)  # choice 0 has its plan
    counted: set[str] = field(default_factory=set)  # what the metrics counted once for the request

    def first(self, event: str) -> bool:
        """True the first time a choice reports `event`: metrics count requests, not choices."""
        if event in self.counted:
            return False
        self.counted.add(event)
        return True

    def follow(self, make_plan: Callable[[], PrefillPlan],
               request_id: str) -> tuple[PrefillPlan, str | None, str | None]:
        """The plan for one choice, and the requests it forks on its prefill and decode
        nodes: choice 0 records its plan; the others go, whole, to the node that decodes
        choice 0 while it serves: there they share choice 0's prompt blocks (its pulled KV,
        on a split cluster) and compute one row each, so the prompt is computed once and
        its KV moves once. Only a choice that needs a plan of its own calls `make_plan`: a
        plan takes the policy's turn (and records workflow affinity), so a fork planned and
        then redirected would make the next request skip a node (n=2, round robin over two
        nodes: every request's choice 0 on the first)."""
        if request_id == self.request_id:
            plan = make_plan()
            self.decode, self.prefill = plan.decode, plan.prefill
            self.placed.set()
            return plan, None, None
        if self.decode is None or not self.decode.healthy or self.decode.leaving:
            return make_plan(), None, None
        # Its prompt is choice 0's, computed once.
        return PrefillPlan(self.decode, None, "fork", prefill_tokens=0), None, self.request_id


class RequestFailed(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class Orchestrator:
    def __init__(self, nodes: Sequence[NodeClient], policy: RoutingPolicy, load_failure_policy: str = "recompute",
                 on_failover: Callable[[str], None] = lambda stage: None,
                 disaggregation: DisaggregationRule = DisaggregationRule(),
                 on_prefill_decision: Callable[[PrefillPlan], None] = lambda plan: None,
                 dispatch_to_both: bool = True):
        self.nodes = nodes  # the router's live list: nodes join and leave while serving
        self.policy = policy
        self.load_failure_policy = load_failure_policy
        self.on_failover = on_failover  # called with "prefill" or "decode" (metrics)
        self.planner = DisaggregationPlanner(disaggregation, policy, load_failure_policy)
        self.on_prefill_decision = on_prefill_decision  # every plan (metrics)
        self.dispatch_to_both = dispatch_to_both

    # A draining node (router/membership.py) gets no new job; what it runs goes on.
    @property
    def prefill_nodes(self) -> list[NodeClient]:
        return [n for n in self.nodes if n.role == "prefill" and not n.leaving]

    @property
    def decode_nodes(self) -> list[NodeClient]:
        return [n for n in self.nodes if n.role == "decode" and not n.leaving]

    @property
    def colocated_nodes(self) -> list[NodeClient]:
        return [n for n in self.nodes if n.role == "both" and not n.leaving]

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       affinity_key: str | None = None, *, workflow_id: str | None = None,
                       agent_id: str | None = None, fork: ForkGroup | None = None) -> AsyncIterator[Delta]:
        """Deltas until one with finished=True. Raises RequestFailed before the first
        token when the request cannot start (no node, bad input). `workflow_id` and
        `agent_id` go to the nodes (workflow-aware eviction). `fork`: the request is a
        choice of an `n` > 1 request (choice 0 when `request_id` is the group's)."""
        owner = (workflow_id, agent_id)
        if params.seed is None:  # one seed for both halves: unseeded sampling splits cleanly too
            params = dataclasses.replace(params, seed=random.getrandbits(63))
        if fork is not None and request_id != fork.request_id:
            await fork.placed.wait()  # the other choices go where choice 0 goes, right behind it

        def make_plan() -> PrefillPlan:
            return self.planner.plan(self.nodes, prompt_ids, params.max_tokens, affinity_key)
        fork_p = fork_d = None
        try:
            if fork is None:
                plan = make_plan()
            else:
                plan, fork_p, fork_d = fork.follow(make_plan, request_id)
        except NoHealthyNode as e:
            raise RequestFailed(str(e), 503) from None
        failover = self.on_failover
        if fork is not None:
            def failover(stage: str) -> None:
                if fork.first(f"failover:{stage}"):
                    self.on_failover(stage)
        if fork is None or fork.first("plan"):  # choice 0's (the others wait for it)
            self.on_prefill_decision(plan)
        if plan.failover:  # no prefill node is up: the decode node prefills the request itself
            failover("prefill")
        if plan.prefill is None:
            stream = self._stream(plan.decode, request_id, prompt_ids, params, owner=owner, fork_of=fork_d,
                                  failover=failover)
        else:
            stream = self._disaggregated(request_id, prompt_ids, params, plan.prefill, plan.decode, owner,
                                         fork_of=(fork_p, fork_d), failover=failover)
        prefilled = self.planner.queue.enter((plan.prefill or plan.decode).id, plan.tokens_to_prefill(len(prompt_ids)))
        try:
            async with aclosing(stream) as inner:
                async for d in inner:
                    if prefilled is not None:  # the first delta: the prefill is done
                        prefilled()
                        prefilled = None
                        d.prefill, d.prefill_reason = plan.decision, plan.reason
                    yield d
        except NoHealthyNode as e:
            raise RequestFailed(str(e), 503) from None
        finally:
            if prefilled is not None:
                prefilled()

    async def _disaggregated(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                             prefill: NodeClient, decode: NodeClient, owner: tuple[str | None, str | None],
                             fork_of: tuple[str | None, str | None] = (None, None),
                             *, failover: Callable[[str], None],
                             tried: frozenset[str] = frozenset()) -> AsyncIterator[Delta]:
        """Prefill on `prefill` (it samples the first token and lends the KV), then decode on
        `decode`, which pulls that KV; the nodes are router/disaggregation.py's plan.
        `fork_of`: the requests on the prefill and the decode node whose blocks it shares.
        `failover(stage)` counts a failover. `tried`: prefill nodes that refused this request
        already."""
        # The prefill node samples the first token only. min_tokens goes along whole: it bans
        # eos there, and a stop string the first token completes must not end the request
        # before min_tokens, as it would not on one node.
        first_params = dataclasses.replace(params, max_tokens=1)
        first: proto.RequestUpdate | None = None
        streamed_kv, decode_q = None, None
        try:
            q = await _submit(prefill, proto.SubmitRequest(f"{request_id}-p", prompt_ids, first_params.to_dict(),
                                                           kv_transfer_params={"do_remote_decode": True},
                                                           workflow_id=owner[0], agent_id=owner[1],
                                                           fork_of=fork_of[0]))
            try:
                streamed_kv = self._streamed_kv(prefill, f"{request_id}-p", len(prompt_ids))
                if streamed_kv is not None:  # the decode job goes out now, beside the prefill job
                    decode_q = await _submit_quietly(decode, proto.SubmitRequest(
                        request_id, prompt_ids, params.to_dict(), [], streamed_kv, workflow_id=owner[0],
                        agent_id=owner[1], fork_of=fork_of[1]))
                first = await q.get()  # max_tokens=1: exactly one, final update
            except BaseException:
                await prefill.abort(f"{request_id}-p")
                if not q.empty():  # it answered as we were stopped: the KV it lent, nobody will pull
                    await prefill.release_kv(f"{request_id}-p")
                if decode_q is not None:
                    await decode.abort(request_id)
                raise
        except NodeUnavailable as e:
            first = proto.RequestUpdate(request_id, finished=True, finish_reason="error", error=str(e), error_code=503,
                                        refused=True)
        if decode_q is not None and (first.error is not None or first.finish_reason != "length"):
            await decode.abort(request_id)  # no decode to come: free what it reserved
            decode_q = None
        if first.error is not None:
            tried = tried | {prefill.id}
            others = [n for n in self.prefill_nodes if n.healthy and n.id not in tried]
            if first.refused and first.error_code == 503 and others:
                # Never taken there (gone unnoticed, or stopping): another prefill node, whatever
                # the policy; under new ids, as for the failover below.
                failover("prefill")
                retry = self.policy.pick_prefill(others, prompt_ids)
                log.warning("request_id=%s: %s refused the prefill (%s): sending it to %s", request_id, prefill.id,
                            first.error, retry.id)
                async with aclosing(self._disaggregated(f"{request_id}-r", prompt_ids, params, retry, decode, owner,
                                                        failover=failover, tried=tried)) as inner:
                    async for d in inner:
                        yield d
                return
            if first.error_code < 500 or (self.load_failure_policy == "fail" and prefill.role == "prefill"):
                raise RequestFailed(first.error, first.error_code or 500)
            # The prefill node failed before answering: a decode node prefills it itself,
            # as a job of its own id (what the aborted decode job sent last may still be
            # on its way).
            failover("prefill")
            log.warning("request_id=%s prefill on %s failed (%s): prefilling on a decode node", request_id,
                        prefill.id, first.error)
            async with aclosing(self._stream(decode, f"{request_id}-f", prompt_ids, params, owner=owner,
                                             failover=failover)) as inner:
                async for d in inner:
                    yield d
            return
        head = _delta(first)
        if first.finish_reason != "length":  # ended on its first token (eos, stop string)
            yield head
            return
        head.finished, head.finish_reason = False, None
        try:
            yield head
        except BaseException:  # the client left before the decode job: free the lent KV now
            await prefill.release_kv(f"{request_id}-p")
            if decode_q is not None:
                await decode.abort(request_id)
            raise
        stream = self._stream(decode, request_id, prompt_ids, params, output_ids=list(first.new_token_ids),
                              kv=streamed_kv or first.kv_transfer_params, lender=prefill, owner=owner,
                              submitted=decode_q, fork_of=fork_of[1], failover=failover)
        async with aclosing(stream) as inner:
            async for d in inner:
                yield d

    def _streamed_kv(self, prefill: NodeClient, remote_request_id: str, num_tokens: int) -> dict | None:
        """The decode job's KV parameters for a dispatch to both nodes at once, or None when
        the prefill node does not advertise its KV service (then the decode job follows the
        prefill's answer, with the handle it carries)."""
        stats = prefill.last_stats
        if not self.dispatch_to_both or stats is None or not stats.kv_service or not stats.kv_engine_id:
            return None
        host, _, port = stats.kv_service.rpartition(":")
        return {"do_remote_prefill": True, "streamed": True, "remote_engine_id": stats.kv_engine_id,
                "remote_host": host, "remote_port": int(port), "remote_request_id": remote_request_id,
                "num_tokens": num_tokens}

    async def _stream(self, node: NodeClient, request_id: str, prompt_ids: list[int], params: SamplingParams,
                      output_ids: list[int] | None = None, kv: dict | None = None,
                      lender: NodeClient | None = None,
                      owner: tuple[str | None, str | None] = (None, None),
                      submitted: asyncio.Queue | None = None, fork_of: str | None = None,
                      *, failover: Callable[[str], None]) -> AsyncIterator[Delta]:
        """Run (or continue) a request on one node and relay its updates (`submitted`: the
        job was sent already, this is its queue). A node that fails mid-way hands the
        request to another of its kind under `recompute`. Tokens the client has already had
        (a decode node sampling again the first token a prefill node sent) are not sent twice.
        `fork_of`: the request on `node` whose prompt blocks this one shares. `failover(stage)`
        counts a failover."""
        output_ids = list(output_ids or [])
        tried: set[str] = set()
        while True:
            tried.add(node.id)
            q, submitted = submitted, None
            try:
                if q is None:
                    q = await _submit(node, proto.SubmitRequest(request_id, prompt_ids, params.to_dict(), output_ids,
                                                                kv, workflow_id=owner[0], agent_id=owner[1],
                                                                fork_of=fork_of))
            except NodeUnavailable as e:
                q = None
                update = proto.RequestUpdate(request_id, finished=True, finish_reason="error", error=str(e),
                                             error_code=503, refused=True)
            ended = False  # the node finished it: a reader that stops at the last delta leaves nothing to stop
            try:
                while q is not None:
                    update = await q.get()
                    if update.error is not None:
                        break
                    _drop_sent(update, len(output_ids))
                    output_ids += update.new_token_ids
                    ended = update.finished
                    if update.new_token_ids or update.finished:
                        yield _delta(update)
                    if update.finished:
                        return
            except BaseException:  # the client went away (or we were cancelled): stop the work
                if not ended:
                    await node.abort(request_id)
                    if lender is not None and kv is not None:
                        await lender.release_kv(kv.get("remote_request_id", ""))
                raise
            # Only a lost node is retried; under `fail` only one that never took the request
            # (nothing ran there, not even a KV load: the next node pulls the same KV).
            refused = update.refused and update.error_code == 503
            retry = update.error_code == 503 and (self.load_failure_policy != "fail" or refused)
            pool = self.decode_nodes if node.role == "decode" else self.colocated_nodes or self.prefill_nodes
            others = [n for n in pool if n.healthy and n.id not in tried] if retry else []
            if not (refused and others) and lender is not None and kv is not None:
                await lender.release_kv(kv.get("remote_request_id", ""))  # nobody will pull the lent KV
            if not others:
                yield _delta(update)
                return
            failover("decode")
            log.warning("request_id=%s: node %s failed (%s); continuing on %s from %d tokens", request_id, node.id,
                        update.error, others[0].id, len(output_ids))
            node, fork_of = self.policy.pick_decode(others), None
            if not refused:
                kv = None  # the new node recomputes the KV


async def _submit_quietly(node: NodeClient, msg: proto.SubmitRequest) -> asyncio.Queue | None:
    """Submit, or None when the node cannot take it now (the job is sent again later)."""
    try:
        return await _submit(node, msg)
    except NodeUnavailable:
        return None


def _drop_sent(update: proto.RequestUpdate, num_sent: int) -> None:
    """Drop from `update` the tokens the client already had."""
    start = update.num_output_tokens - len(update.new_token_ids)
    if not update.num_output_tokens or start >= num_sent:
        return
    skip = min(num_sent - start, len(update.new_token_ids))
    if skip == len(update.new_token_ids):
        update.new_text = ""
    log.info("request_id=%s: %d token(s) already sent dropped", update.request_id, skip)
    update.new_token_ids = update.new_token_ids[skip:]
    if update.logprobs is not None:
        update.logprobs = update.logprobs[skip:]


async def _submit(node: NodeClient, msg: proto.SubmitRequest):
    try:
        return await node.submit(msg)
    except ValueError as e:  # cannot even be encoded: the request's fault, never retried
        raise RequestFailed(str(e), 400) from None


def _delta(u: proto.RequestUpdate) -> Delta:
    return Delta(u.new_token_ids, u.new_text, u.logprobs, u.finished, u.finish_reason, u.stop_reason, u.error,
                 u.error_code, u.num_prompt_tokens, u.num_cached_tokens)
