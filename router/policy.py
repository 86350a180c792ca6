"""Routing policies: which prefill (or colocated) node and which decode node serve a
request.

* round_robin — in turn, skipping unhealthy nodes.
* least_loaded — the node with the fewest requests in flight (the router's own count,
  fresher than any stats poll), ties in turn.
* prefix_aware — prefill nodes by the longest cached prefix of the prompt (a block-hash
  index, in the spirit of Dynamo's KV-aware router), then least loaded; a request with a
  workflow_id or agent_id sticks to the node its workflow used before while that node is
  healthy and not much busier than the rest. Decode nodes: least loaded.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence

from engine.hashing import prefix_block_hashes
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
        self._turn = itertools.count()
        self._affinity: OrderedDict[str, str] = OrderedDict()  # workflow/agent key -> node id

    def pick_prefill(self, nodes: Sequence[NodeClient], prompt_ids: Sequence[int],
                     affinity_key: str | None = None) -> NodeClient:
        """Pick among prefill (or colocated) nodes; remembers the choice for prefix_aware."""
        healthy = _healthy(nodes)
        if self.name == "round_robin":
            return healthy[next(self._turn) % len(healthy)]
        if self.name == "least_loaded":
            return self._least_loaded(healthy)
        hashes = prefix_block_hashes(prompt_ids, self.block_size)
        node = self._sticky(healthy, affinity_key)
        if node is None:
            matched = self.index.match(hashes)
            best = max(matched.get(n.id, 0) for n in healthy)
            candidates = [n for n in healthy if matched.get(n.id, 0) == best]
            node = self._least_loaded(candidates)
        self.index.insert(node.id, hashes)
        if affinity_key:
            self._affinity[affinity_key] = node.id
            self._affinity.move_to_end(affinity_key)
            if len(self._affinity) > _MAX_WORKFLOWS:
                self._affinity.popitem(last=False)
        return node

    def pick_decode(self, nodes: Sequence[NodeClient], exclude: str | None = None) -> NodeClient:
        healthy = [n for n in _healthy(nodes) if n.id != exclude] or _healthy(nodes)
        if self.name == "round_robin":
            return healthy[next(self._turn) % len(healthy)]
        return self._least_loaded(healthy)

    def _sticky(self, healthy: Sequence[NodeClient], key: str | None) -> NodeClient | None:
        if not key or key not in self._affinity:
            return None
        node = next((n for n in healthy if n.id == self._affinity[key]), None)
        if node is None or node.load > min(n.load for n in healthy) + _AFFINITY_SLACK:
            return None
        return node

    def _least_loaded(self, nodes: Sequence[NodeClient]) -> NodeClient:
        low = min(n.load for n in nodes)
        tied = [n for n in nodes if n.load == low]
        return tied[next(self._turn) % len(tied)]

    def node_restarted(self, node_id: str) -> None:
        self.index.forget_node(node_id)


def _healthy(nodes: Sequence[NodeClient]) -> list[NodeClient]:
    healthy = [n for n in nodes if n.healthy]
    if not healthy:
        role = nodes[0].role if nodes else "serving"
        raise NoHealthyNode(f"no healthy {role} node right now: retry shortly")
    return healthy
