"""Which prefill node has which prompt prefixes cached, as the router last saw them.

The router computes the same chained block hashes the engines' prefix caches use
(engine/hashing.py) and remembers, per hash, the nodes it sent that block to. It is a
guess — a node may have evicted the block since — so it only steers routing, never
correctness. Bounded: the least recently used hashes are dropped first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PrefixIndex:
    def __init__(self, capacity_blocks: int = 200_000):
        self.capacity = capacity_blocks
        self._nodes: OrderedDict[int, set[str]] = OrderedDict()  # block hash -> node ids

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Per node, how many leading blocks of `hashes` it (probably) has."""
        matched: dict[str, int] = {}
        alive: set[str] | None = None
        for i, h in enumerate(hashes):
            nodes = self._nodes.get(h)
            if not nodes:
                break
            alive = set(nodes) if alive is None else alive & nodes
            if not alive:
                break
            for n in alive:
                matched[n] = i + 1
        return matched

    def insert(self, node_id: str, hashes: Sequence[int]) -> None:
        for h in hashes:
            nodes = self._nodes.get(h)
            if nodes is None:
                self._nodes[h] = {node_id}
            else:
                nodes.add(node_id)
                self._nodes.move_to_end(h)
        while len(self._nodes) > self.capacity:
            self._nodes.popitem(last=False)

    def forget_node(self, node_id: str) -> None:
        """A node restarted: its cache is empty."""
        for h in [h for h, nodes in self._nodes.items() if node_id in nodes]:
            nodes = self._nodes[h]
            nodes.discard(node_id)
            if not nodes:
                del self._nodes[h]

    def __len__(self) -> int:
        return len(self._nodes)
