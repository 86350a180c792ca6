"""One request's path through the cluster: prefill job, decode job, token stream.

Disaggregated (xPyD):
  1. The prefill node runs the prompt with max_tokens=1 and `do_remote_decode`: it samples
     the first token (streamed to the client at once) and lends the prompt's KV.
  2. The decode node gets the prompt, that token and the KV handle; it pulls the blocks
     and continues. Sampling is stateless per (seed, step) (engine/sampler.py), so the
     split changes no token; the router draws the seed when the client gave none.
Colocated: one node does both.

Failures (ARCHITECTURE §2). A prefill node that fails before answering: under
`recompute` the request goes to a decode node, which prefills it itself; under `fail`
the client gets a 5xx error at once. A decode node that fails mid-stream: under
`recompute` another decode node continues from the tokens streamed so far (it
recomputes their KV); under `fail`, an error. Either way the prefill node is told at
once to release the KV it lent for the request (nobody will pull it any more), rather
than holding it until abort_timeout_s. Bad input (4xx) is never retried.

`n` > 1 (a ForkGroup): choice 0 runs as above and records its nodes; the other choices
go to the same nodes as forks of it (SubmitRequest.fork_of), so each node shares choice
0's prompt blocks with them (engine/forking.py): the prompt is prefilled once and its KV
moves once. A node that is gone or leaving is replaced by the policy's pick, and the
fork then falls back to computing (or pulling) as any request.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import aclosing
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from engine import node_protocol as proto
from engine.sampling_params import SamplingParams
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


@dataclass(slots=True)
class ForkGroup:
    """The choices of one `n` > 1 request: where choice 0 ran, per stage ("prompt": the
    prefill or colocated node, "decode"), and its request id on that node."""
    request_id: str                                                   # choice 0's
    homes: dict[str, tuple[NodeClient, str]] = field(default_factory=dict)


class RequestFailed(Exception):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class Orchestrator:
    def __init__(self, nodes: Sequence[NodeClient], policy: RoutingPolicy, load_failure_policy: str = "recompute",
                 on_failover: Callable[[str], None] = lambda stage: None):
        self.nodes = nodes  # the router's live list: nodes join and leave while serving
        self.policy = policy
        self.load_failure_policy = load_failure_policy
        self.on_failover = on_failover  # called with "prefill" or "decode" (metrics)

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

    @property
    def disaggregated(self) -> bool:
        return bool(self.prefill_nodes and self.decode_nodes)

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
        try:
            if not self.disaggregated:
                node, fork_of = self._place(fork, "prompt", request_id, request_id, self.colocated_nodes,
                                            lambda nodes: self.policy.pick_prefill(nodes, prompt_ids, affinity_key))
                async with aclosing(self._stream(node, request_id, prompt_ids, params, owner=owner,
                                                 fork_of=fork_of)) as inner:
                    async for d in inner:
                        yield d
                return
            async with aclosing(self._disaggregated(request_id, prompt_ids, params, affinity_key, owner,
                                                    fork)) as inner:
                async for d in inner:
                    yield d
        except NoHealthyNode as e:
            raise RequestFailed(str(e), 503) from None

    async def _disaggregated(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                             affinity_key: str | None, owner: tuple[str | None, str | None],
                             fork: ForkGroup | None = None) -> AsyncIterator[Delta]:
        def pick_prefill(nodes: Sequence[NodeClient]) -> NodeClient:
            return self.policy.pick_prefill(nodes, prompt_ids, affinity_key)

        if params.max_tokens == 1:  # nothing to decode: the prefill node serves it whole
            node, fork_of = self._place(fork, "prompt", request_id, request_id, self.prefill_nodes, pick_prefill)
            async with aclosing(self._stream(node, request_id, prompt_ids, params, owner=owner,
                                             fork_of=fork_of)) as inner:
                async for d in inner:
                    yield d
            return
        try:
            prefill, prefill_fork_of = self._place(fork, "prompt", request_id, f"{request_id}-p", self.prefill_nodes,
                                                   pick_prefill)
        except NoHealthyNode:
            if self.load_failure_policy == "fail":
                raise
            # No prefill node is up: a decode node prefills the request itself.
            self.on_failover("prefill")
            async with aclosing(self._stream(self.policy.pick_decode(self.decode_nodes), request_id, prompt_ids,
                                             params, owner=owner)) as inner:
                async for d in inner:
                    yield d
            return
        first_params = dataclasses.replace(params, max_tokens=1)
        first: proto.RequestUpdate | None = None
        try:
            q = await _submit(prefill, proto.SubmitRequest(f"{request_id}-p", prompt_ids, first_params.to_dict(),
                                                           kv_transfer_params={"do_remote_decode": True},
                                                           workflow_id=owner[0], agent_id=owner[1],
                                                           fork_of=prefill_fork_of))
            try:
                first = await q.get()  # max_tokens=1: exactly one, final update
            except BaseException:
                await prefill.abort(f"{request_id}-p")
                raise
        except NodeUnavailable as e:
            first = proto.RequestUpdate(request_id, finished=True, finish_reason="error", error=str(e), error_code=503)
        if first.error is not None:
            if first.error_code < 500 or self.load_failure_policy == "fail":
                raise RequestFailed(first.error, first.error_code or 500)
            # The prefill node failed before answering: a decode node prefills it itself.
            self.on_failover("prefill")
            log.warning("request_id=%s prefill on %s failed (%s): prefilling on a decode node", request_id,
                        prefill.id, first.error)
            node = self.policy.pick_decode(self.decode_nodes)
            async with aclosing(self._stream(node, request_id, prompt_ids, params, owner=owner)) as inner:
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
            raise
        decode, decode_fork_of = self._place(fork, "decode", request_id, request_id, self.decode_nodes,
                                             self.policy.pick_decode)
        stream = self._stream(decode, request_id, prompt_ids, params, output_ids=list(first.new_token_ids),
                              kv=first.kv_transfer_params, lender=prefill, owner=owner, fork_of=decode_fork_of)
        async with aclosing(stream) as inner:
            async for d in inner:
                yield d

    async def _stream(self, node: NodeClient, request_id: str, prompt_ids: list[int], params: SamplingParams,
                      output_ids: list[int] | None = None, kv: dict | None = None,
                      lender: NodeClient | None = None,
                      owner: tuple[str | None, str | None] = (None, None),
                      fork_of: str | None = None) -> AsyncIterator[Delta]:
        """Run (or continue) a request on one node and relay its updates. A node that
        fails mid-way hands the request to another of its kind under `recompute`.
        `fork_of`: the request on `node` whose prompt blocks this one shares."""
        output_ids = list(output_ids or [])
        tried: set[str] = set()
        while True:
            tried.add(node.id)
            try:
                q = await _submit(node, proto.SubmitRequest(request_id, prompt_ids, params.to_dict(), output_ids, kv,
                                                            workflow_id=owner[0], agent_id=owner[1], fork_of=fork_of))
            except NodeUnavailable as e:
                q = None
                update = proto.RequestUpdate(request_id, finished=True, finish_reason="error", error=str(e),
                                             error_code=503)
            try:
                while q is not None:
                    update = await q.get()
                    if update.error is not None:
                        break
                    output_ids += update.new_token_ids
                    if update.new_token_ids or update.finished:
                        yield _delta(update)
                    if update.finished:
                        return
            except BaseException:  # the client went away (or we were cancelled): stop the work
                await node.abort(request_id)
                if lender is not None and kv is not None:
                    await lender.release_kv(kv.get("remote_request_id", ""))
                raise
            # The node failed this request: whatever comes next, nobody pulls the lent KV.
            if lender is not None and kv is not None:
                await lender.release_kv(kv.get("remote_request_id", ""))
            if self.load_failure_policy == "fail" or update.error_code != 503:  # only a lost node is retried
                yield _delta(update)
                return
            pool = self.decode_nodes if node.role == "decode" else self.colocated_nodes or self.prefill_nodes
            others = [n for n in pool if n.healthy and n.id not in tried]
            if not others:
                yield _delta(update)
                return
            self.on_failover("decode")
            log.warning("request_id=%s: node %s failed (%s); continuing on %s from %d tokens", request_id, node.id,
                        update.error, others[0].id, len(output_ids))
            node, kv, fork_of = self.policy.pick_decode(others), None, None  # the new node recomputes the KV

    @staticmethod
    def _place(fork: ForkGroup | None, stage: str, request_id: str, node_request_id: str,
               nodes: Sequence[NodeClient], pick: Callable[[Sequence[NodeClient]], NodeClient],
               ) -> tuple[NodeClient, str | None]:
        """The node among `nodes` for one stage of a request, and the request it forks
        there: choice 0 takes the policy's pick and records it (with `node_request_id`,
        its id on that node); the other choices follow it while that node is healthy and
        among `nodes` (not leaving)."""
        if fork is None:
            return pick(nodes), None
        if request_id == fork.request_id:
            node = pick(nodes)
            fork.homes[stage] = (node, node_request_id)
            return node, None
        home = fork.homes.get(stage)
        if home is not None and home[0].healthy and home[0] in nodes:
            return home
        return pick(nodes), None


async def _submit(node: NodeClient, msg: proto.SubmitRequest):
    try:
        return await node.submit(msg)
    except ValueError as e:  # cannot even be encoded: the request's fault, never retried
        raise RequestFailed(str(e), 400) from None


def _delta(u: proto.RequestUpdate) -> Delta:
    return Delta(u.new_token_ids, u.new_text, u.logprobs, u.finished, u.finish_reason, u.stop_reason, u.error,
                 u.error_code, u.num_prompt_tokens, u.num_cached_tokens)
