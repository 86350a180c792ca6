"""Routing policies: which prefill (or colocated) node and which decode node serve a
request.

* round_robin — in turn, skipping unhealthy nodes.
* least_loaded — the node with the fewest requests in flight (the router's own count,
  fresher than any stats poll), ties in turn.
* prefix_aware — prefill nodes by the longest cached prefix of the prompt, then least
  loaded; a request with a workflow_id or agent_id sticks to the node its workflow used
  before while that node is healthy and not much busier than the rest. Decode nodes:
  least loaded. What each node has cached comes from its KV events (in the spirit of
  Dynamo's KV-aware router): router/prefix_index.py, router/kv_event_listener.py.

Whatever the policy, requests of a workflow are scored for the workflow-affinity metric
(did it land on a node holding its longest cached prefix?), from the same index.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence

import zmq.asyncio

from engine.hashing import prefix_block_hashes
from router.kv_event_listener import KVEventListener
from router.metrics import WorkflowKVStats
from router.node_client import NodeClient
from router.prefix_index import PrefixIndex

POLICIES = ("round_robin", "least_loaded", "prefix_aware")

# A sticky workflow moves when its node has this many more requests than the least loaded.
_AFFINITY_SLACK = 8
_MAX_WORKFLOWS = 100_000


class NoHealthyNode(RuntimeError):
    pass


class RoutingPolicy:
    def __init__(self, name: str, block_size: int):
        if name not in POLICIES:
            raise ValueError(f"routing policy {name!r}: use one of {', '.join(POLICIES)}")
        self.name = name
        self.block_size = block_size
        self.index = PrefixIndex()
        self.listeners: dict[str, KVEventListener] = {}
        self.kv_stats = WorkflowKVStats()
        # Prefill and decode picks take turns apart: on one shared counter a request's two
        # picks advance it by two, and with two nodes of each kind every request would land
        # on prefill-0 and decode-1.
        self._turn = itertools.count()
        self._decode_turn = itertools.count()
        self._affinity: OrderedDict[str, str] = OrderedDict()  # workflow/agent key -> node id

    def pick_prefill(self, nodes: Sequence[NodeClient], prompt_ids: Sequence[int],
                     affinity_key: str | None = None) -> NodeClient:
        """Pick among prefill (or colocated) nodes; remembers the choice for prefix_aware."""
        healthy = _healthy(nodes)
        matched = self._match(healthy, prompt_ids) if self.name == "prefix_aware" or affinity_key else {}
        if self.name == "round_robin":
            node = healthy[next(self._turn) % len(healthy)]
        elif self.name == "least_loaded":
            node = self._least_loaded(healthy)
        else:
            # A workflow stays home unless its prefix is found longer elsewhere (the home
            # evicted it, or restarted).
            best = max(matched.get(n.id, 0) for n in healthy)
            node = self._sticky(healthy, affinity_key)
            if node is None or matched.get(node.id, 0) < best:
                node = self._least_loaded([n for n in healthy if matched.get(n.id, 0) == best])
        if affinity_key:
            best = max(matched.values(), default=0)
            self.kv_stats.observe_routing(affinity_key, None if best == 0 else matched.get(node.id, 0) == best)
        if self.name != "prefix_aware":
            return node
        if affinity_key:
            self._affinity[affinity_key] = node.id
            self._affinity.move_to_end(affinity_key)
            if len(self._affinity) > _MAX_WORKFLOWS:
                self._affinity.popitem(last=False)
        return node

    def pick_decode(self, nodes: Sequence[NodeClient], exclude: str | None = None) -> NodeClient:
        healthy = [n for n in _healthy(nodes) if n.id != exclude] or _healthy(nodes)
        if self.name == "round_robin":
            return healthy[next(self._decode_turn) % len(healthy)]
        return self._least_loaded(healthy, self._decode_turn)

    def _sticky(self, healthy: Sequence[NodeClient], key: str | None) -> NodeClient | None:
        if not key or key not in self._affinity:
            return None
        node = next((n for n in healthy if n.id == self._affinity[key]), None)
        if node is None or node.load > min(n.load for n in healthy) + _AFFINITY_SLACK:
            return None
        return node

    def _least_loaded(self, nodes: Sequence[NodeClient], turn: itertools.count | None = None) -> NodeClient:
        low = min(n.load for n in nodes)
        tied = [n for n in nodes if n.load == low]
        return tied[next(turn or self._turn) % len(tied)]

    def _match(self, nodes: Sequence[NodeClient], prompt_ids: Sequence[int]) -> dict[str, int]:
        """Leading blocks of the prompt each node holds, hashing the prompt the way each
        node's cache does (its block size and hash algorithm, from its stats)."""
        matched: dict[str, int] = {}
        by_scheme: dict[tuple[int, str], list[str]] = {}
        for n in nodes:
            stats = n.last_stats
            scheme = (stats.block_size, stats.block_hash_algo) if stats is not None else (self.block_size, "sha256_64")
            by_scheme.setdefault(scheme, []).append(n.id)
        for (block_size, algo), ids in by_scheme.items():
            found = self.index.match(prefix_block_hashes(prompt_ids, block_size, algo))
            matched.update((i, found[i]) for i in ids if i in found)
        return matched

    def cached_blocks(self, nodes: Sequence[NodeClient], prompt_ids: Sequence[int]) -> dict[str, int]:
        """Per node id, the leading blocks of the prompt it holds (router/disaggregation.py
        credits them against a local prefill)."""
        return self._match(nodes, prompt_ids)

    # --- KV events ----------------------------------------------------------------------
    def follow_kv_events(self, nodes: Sequence[NodeClient], ctx: zmq.asyncio.Context) -> None:
        """Subscribe to every node's KV events at the addresses its stats give (health loop)."""
        for n in nodes:
            if n.last_stats is None or not n.last_stats.kv_events_address:
                continue
            listener = self.listeners.get(n.id)
            if listener is None:
                listener = self.listeners[n.id] = KVEventListener(n.id, self.index, ctx)
            listener.follow(n.last_stats.kv_events_address, n.last_stats.kv_events_replay_address)

    def node_restarted(self, node_id: str) -> None:
        """The node was down and is back: its subscription starts afresh (a restarted
        node also says so itself, with a new sequence and AllBlocksCleared)."""
        listener = self.listeners.get(node_id)
        if listener is not None:
            listener.resync()
        else:
            self.index.forget_node(node_id)

    def node_left(self, node_id: str) -> None:
        """The node left the cluster: stop following its KV events, forget what it held
        (a later process on its port must not be indexed under its id)."""
        listener = self.listeners.pop(node_id, None)
        if listener is not None:
            listener.stop()
        self.index.forget_node(node_id)

    def close(self) -> None:
        for listener in self.listeners.values():
            listener.stop()


def _healthy(nodes: Sequence[NodeClient]) -> list[NodeClient]:
    healthy = [n for n in nodes if n.healthy]
    if not healthy:
        role = nodes[0].role if nodes else "serving"
        raise NoHealthyNode(f"no healthy {role} node right now: retry shortly")
    return healthy
