"""Per request: where its prompt is prefilled. Remotely, on a prefill-capable node whose KV
the decode node then pulls, or locally, on the decode node itself.

Modes (cluster.yaml `router.disaggregation.mode`):
* `always` — every request with tokens to decode is split when a prefill-capable node other
  than the decode node is healthy (xPyD as before this module; the default when the
  cluster has prefill nodes).
* `conditional` — Dynamo's conditional disaggregation: split only when it pays. The
  decode node is picked first; the prompt tokens it does not already hold (prefix-cache
  credit from its own KV events, router/prefix_index.py) are what a local prefill would
  compute. More than `max_local_prefill_tokens` of them, and a prefill candidate with
  fewer than `max_prefill_queue` prefills waiting: remote. Otherwise local: a short or
  mostly cached prompt costs the decode node's running streams one short step, less than
  a transfer; and a queued prefill node would only add its queue to the first token.
  A colocated (`both`) decode node can prefill as well as any lender, so for it a long
  prompt is lent only to a node that is cheaper on both counts and strictly on one: the
  prefill tokens ahead of this prompt's first token there (its queued prefills' plus what
  it would compute of this prompt, its own prefix cache credited) and the requests in
  flight there (the streams a prefill stalls). Two colocated nodes at even load then serve
  like two colocated replicas (a split would only move the same prefill elsewhere and add
  a transfer); a decode node picked for its cached prefix or workflow while busier than
  the other, or one with prefills queued while the other has none, lends.
* `never` — one node serves each request whole (the default with only `both` nodes).

Pools. Decode candidates: decode nodes, plus `both` nodes when they share KV (a mode
other than `never` set in the file), when the mode is `never`, or when no decode node is
up. Prefill candidates: prefill nodes, plus sharing `both` nodes, never the
decode node itself. Draining nodes are in neither.

Picks. With decode nodes the decode node is the policy's decode pick (least loaded, or in
turn) and the prefill node its prefill pick, workflow affinity included, as before. With
only `both` nodes the decode node is the policy's prefill pick (it holds the prompt's
prefix and the workflow's affinity, since the next turn's prompt extends this one's
output), and the lender the cheapest other node: longest cached prefix, fewest prefills
waiting, least loaded.

The queue. What waits on a prefill candidate is counted by this router (PrefillQueue):
requests it sent there whose first token has not come back. That is fresher than the
nodes' stats, and on a `both` node it counts prefills only, not the streams it decodes.

Failures (ARCHITECTURE §2, router/orchestrator.py): when the split was wanted but no
prefill node (role `prefill`) is healthy, `recompute` prefills on the decode node (a
prefill failover) and `fail` answers 503. A `both` lender that is down just means local
prefill: the cluster still serves every request in full.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from router.node_client import NodeClient
from router.policy import NoHealthyNode, RoutingPolicy

MODES = ("always", "conditional", "never")

# Why a plan is what it is: the `reason` label of pdcluster_router_prefill_decisions (a
# fixed set, so the metric stays bounded).
REMOTE_REASONS = ("always", "long_prompt")
LOCAL_REASONS = ("never", "short_prompt", "prefill_busy", "local_cheaper", "no_prefill_node", "single_token")


@dataclass(slots=True, frozen=True)
class DisaggregationRule:
    """cluster.yaml's `router.disaggregation`, as the router's spec carries it."""

    mode: str | None = None        # None: `always` when the cluster has prefill nodes, else `never`
    colocated_share_kv: bool = False
    max_local_prefill_tokens: int = 512
    max_prefill_queue: int = 4

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"disaggregation mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.max_local_prefill_tokens < 0 or self.max_prefill_queue < 1:
            raise ValueError("max_local_prefill_tokens must be >= 0 and max_prefill_queue >= 1")


@dataclass(slots=True)
class PrefillPlan:
    """Where one request runs. `decode` serves it (and prefills it when `prefill` is None)."""

    decode: NodeClient
    prefill: NodeClient | None
    reason: str
    uncached_tokens: int | None = None  # conditional: prompt tokens the decode node would compute itself
    failover: bool = False     # a prefill node was wanted and none is up: the decode node prefills
    prefill_tokens: int | None = None   # what the prefilling node computes, where the plan counted it

    def tokens_to_prefill(self, prompt_len: int) -> int:
        """Tokens the prefilling node computes (the whole prompt where the plan did not
        count its cache): what this request adds to that node's prefill queue."""
        if self.prefill_tokens is not None:
            return self.prefill_tokens
        return self.uncached_tokens if self.prefill is None and self.uncached_tokens is not None else prompt_len

    @property
    def decision(self) -> str:
        return "local" if self.prefill is None else "remote"


class PrefillQueue:
    """Per node: prefills this router sent there whose first token is not back yet, and the
    prompt tokens they compute."""

    def __init__(self) -> None:
        self._waiting: dict[str, list[int]] = {}   # node id -> [prefills, tokens]

    def __getitem__(self, node_id: str) -> int:
        return self._waiting.get(node_id, (0, 0))[0]

    def tokens(self, node_id: str) -> int:
        return self._waiting.get(node_id, (0, 0))[1]

    def enter(self, node_id: str, tokens: int = 0) -> Callable[[], None]:
        """Count one prefill of `tokens` on the node; call the returned function (once or
        more) when its first token came back, or it ended without one."""
        entry = self._waiting.setdefault(node_id, [0, 0])
        entry[0] += 1
        entry[1] += tokens
        left = False

        def leave() -> None:
            nonlocal left
            if not left:
                left = True
                entry[0] -= 1
                entry[1] -= tokens
                if not entry[0]:
                    self._waiting.pop(node_id, None)
        return leave


class DisaggregationPlanner:
    def __init__(self, rule: DisaggregationRule, policy: RoutingPolicy, load_failure_policy: str = "recompute"):
        self.rule = rule
        self.policy = policy
        self.load_failure_policy = load_failure_policy
        self.queue = PrefillQueue()
        self._turn = itertools.count()

    def plan(self, nodes: Sequence[NodeClient], prompt_ids: Sequence[int], max_tokens: int | None,
             affinity_key: str | None = None) -> PrefillPlan:
        """The plan for one request among `nodes` (the router's live list). Raises
        NoHealthyNode when no node can serve it (the caller answers 503)."""
        rule = self.rule
        active = [n for n in nodes if not n.leaving]
        prefill_nodes = [n for n in active if n.role == "prefill"]
        decode_nodes = [n for n in active if n.role == "decode"]
        both = [n for n in active if n.role == "both"]
        mode = rule.mode or ("always" if prefill_nodes else "never")
        # `both` nodes decode too where no decode node is up (e.g. while a scale from colocated
        # to 1P1D waits for the new nodes: router/membership.py keeps the old one until then).
        decode_pool = decode_nodes + (both if rule.colocated_share_kv or mode == "never"
                                      or not any(n.healthy for n in decode_nodes) else [])
        prefill_pool = prefill_nodes + (both if rule.colocated_share_kv else [])

        if max_tokens == 1 and mode != "never" and any(n.healthy for n in prefill_nodes):
            # Nothing to decode: a prefill node serves it whole (no KV to move).
            node = self.policy.pick_prefill(prefill_nodes, prompt_ids, affinity_key)
            return PrefillPlan(node, None, "single_token")
        if decode_nodes:
            decode = self.policy.pick_decode(decode_pool)
        else:
            decode = self.policy.pick_prefill(decode_pool, prompt_ids, affinity_key)
        if mode == "never":
            return PrefillPlan(decode, None, "never")
        if max_tokens == 1:
            return PrefillPlan(decode, None, "single_token")
        uncached = None  # hashing a long prompt costs a millisecond or more: only when the rule needs it
        if mode == "conditional":
            uncached = len(prompt_ids) - self.cached_tokens(decode, prompt_ids)
            if uncached <= rule.max_local_prefill_tokens:
                return PrefillPlan(decode, None, "short_prompt", uncached)
        candidates = [n for n in prefill_pool if n.healthy and n is not decode]
        if not candidates:
            if prefill_nodes:  # the cluster has prefill nodes and none is up: a failure
                if self.load_failure_policy == "fail":
                    raise NoHealthyNode("no healthy prefill node right now: retry shortly")
                return PrefillPlan(decode, None, "no_prefill_node", uncached, failover=True)
            return PrefillPlan(decode, None, "no_prefill_node", uncached)
        if mode == "conditional":
            candidates = [n for n in candidates if self.queue[n.id] < rule.max_prefill_queue]
            if not candidates:
                return PrefillPlan(decode, None, "prefill_busy", uncached)
            if decode.role == "both":
                return self._lend_if_cheaper(decode, candidates, prompt_ids, uncached)
        if decode_nodes:
            prefill = self.policy.pick_prefill(candidates, prompt_ids, affinity_key)
        else:
            prefill = self._pick_lender(candidates, prompt_ids)
        return PrefillPlan(decode, prefill, "always" if mode == "always" else "long_prompt", uncached)

    def _pick_lender(self, candidates: Sequence[NodeClient], prompt_ids: Sequence[int]) -> NodeClient:
        """Among `both` nodes: the one holding the longest prefix of the prompt (it computes
        the least), then the fewest prefills waiting, then the least loaded; ties in turn.
        Whatever the policy: the workflow's affinity stays with its decode node."""
        if len(candidates) == 1:
            return candidates[0]
        matched = self.policy.cached_blocks(candidates, prompt_ids)

        def cost(n: NodeClient) -> tuple[int, int, int]:
            return -matched.get(n.id, 0), self.queue[n.id], n.load
        best = min(map(cost, candidates))
        tied = [n for n in candidates if cost(n) == best]
        return tied[next(self._turn) % len(tied)]

    def _lend_if_cheaper(self, decode: NodeClient, candidates: Sequence[NodeClient], prompt_ids: Sequence[int],
                         uncached: int) -> PrefillPlan:
        """A `both` decode node's long prompt: lent to the cheapest candidate that is no
        dearer than the decode node on (prefill tokens ahead of the first token, requests
        in flight) and cheaper on one of them; else prefilled where it decodes."""
        matched = self.policy.cached_blocks(candidates, prompt_ids)
        computed = {n.id: len(prompt_ids) - self._credit(n, matched.get(n.id, 0), len(prompt_ids)) for n in candidates}
        computed[decode.id] = uncached

        def cost(n: NodeClient) -> tuple[int, int]:
            return self.queue.tokens(n.id) + computed[n.id], n.load
        local = cost(decode)
        cheaper = [n for n in candidates if cost(n) != local and all(c <= l for c, l in zip(cost(n), local))]
        if not cheaper:
            return PrefillPlan(decode, None, "local_cheaper", uncached)
        best = min(map(cost, cheaper))
        tied = [n for n in cheaper if cost(n) == best]
        lender = tied[next(self._turn) % len(tied)]
        return PrefillPlan(decode, lender, "long_prompt", uncached, prefill_tokens=computed[lender.id])

    def cached_tokens(self, node: NodeClient, prompt_ids: Sequence[int]) -> int:
        """Leading prompt tokens `node` holds in its prefix cache, by its KV events. At
        least one token is always computed (the one whose logits give the first token)."""
        blocks = self.policy.cached_blocks([node], prompt_ids).get(node.id, 0) if prompt_ids else 0
        return self._credit(node, blocks, len(prompt_ids))

    def _credit(self, node: NodeClient, blocks: int, prompt_len: int) -> int:
        """Prompt tokens `blocks` cached blocks on `node` spare it (never the last one)."""
        if not prompt_len:
            return 0
        block_size = node.last_stats.block_size if node.last_stats is not None else self.policy.block_size
        return min(blocks * block_size, prompt_len - 1)
