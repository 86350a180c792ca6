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
* `never` — one node serves each request whole (the default with only `both` nodes).

Pools. Decode candidates: decode nodes, plus `both` nodes when they share KV (a mode
other than `never` set in the file), when the mode is `never`, or when there are no
decode nodes. Prefill candidates: prefill nodes, plus sharing `both` nodes, never the
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
LOCAL_REASONS = ("never", "short_prompt", "prefill_busy", "no_prefill_node", "single_token")


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

    @property
    def decision(self) -> str:
        return "local" if self.prefill is None else "remote"


class PrefillQueue:
    """Per node: prefills this router sent there whose first token is not back yet."""

    def __init__(self) -> None:
        self._waiting: dict[str, int] = {}

    def __getitem__(self, node_id: str) -> int:
        return self._waiting.get(node_id, 0)

    def enter(self, node_id: str) -> Callable[[], None]:
        """Count one prefill on the node; call the returned function (once or more) when its
        first token came back, or it ended without one."""
        self._waiting[node_id] = self._waiting.get(node_id, 0) + 1
        left = False

        def leave() -> None:
            nonlocal left
            if not left:
                left = True
                self._waiting[node_id] -= 1
                if not self._waiting[node_id]:
                    del self._waiting[node_id]
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
        decode_pool = decode_nodes + (both if rule.colocated_share_kv or mode == "never" or not decode_nodes else [])
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

    def cached_tokens(self, node: NodeClient, prompt_ids: Sequence[int]) -> int:
        """Leading prompt tokens `node` holds in its prefix cache, by its KV events. At
        least one token is always computed (the one whose logits give the first token)."""
        if not prompt_ids:
            return 0
        blocks = self.policy.cached_blocks([node], prompt_ids).get(node.id, 0)
        block_size = node.last_stats.block_size if node.last_stats is not None else self.policy.block_size
        return min(blocks * block_size, len(prompt_ids) - 1)
