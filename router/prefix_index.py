"""Which node holds which prompt prefixes, as the nodes themselves say.

Built from every node's KV events (engine/kv_events.py, applied by
router/kv_event_listener.py), not from the router's guesses: a block a node evicts
leaves the index when its BlockRemoved arrives, and a restarted node's
AllBlocksCleared empties its entry. Keys are the block hash contract's
(engine/hashing.py), so the router finds a prompt's blocks by hashing its tokens the way
the nodes do. It steers routing only, never correctness: an event still on the wire
costs at most one cache miss.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from engine.hashing import internal_block_hash
from engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVCacheEvent


class PrefixIndex:
    def __init__(self) -> None:
        self._nodes: dict[int, set[str]] = {}     # block key -> nodes holding it
        self._blocks: dict[str, set[int]] = {}    # node -> block keys it holds

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Per node, how many leading blocks of `hashes` it holds."""
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

    def apply(self, node_id: str, events: Iterable[KVCacheEvent]) -> None:
        for e in events:
            if isinstance(e, BlockStored):
                self.insert(node_id, [internal_block_hash(h) for h in e.block_hashes])
            elif isinstance(e, BlockRemoved):
                self.remove(node_id, [internal_block_hash(h) for h in e.block_hashes])
            elif isinstance(e, AllBlocksCleared):
                self.forget_node(node_id)

    def insert(self, node_id: str, hashes: Iterable[int]) -> None:
        held = self._blocks.setdefault(node_id, set())
        for h in hashes:
            self._nodes.setdefault(h, set()).add(node_id)
            held.add(h)

    def remove(self, node_id: str, hashes: Iterable[int]) -> None:
        held = self._blocks.get(node_id, set())
        for h in hashes:
            held.discard(h)
            nodes = self._nodes.get(h)
            if nodes is not None:
                nodes.discard(node_id)
                if not nodes:
                    del self._nodes[h]

    def forget_node(self, node_id: str) -> None:
        """The node's cache is empty (it restarted, or said so)."""
        self.remove(node_id, list(self._blocks.pop(node_id, ())))

    def num_blocks(self, node_id: str) -> int:
        return len(self._blocks.get(node_id, ()))

    def digest(self, node_id: str) -> int:
        """Comparable with the node's `kv_cache_digest` stat when in sync."""
        return sum(self._blocks.get(node_id, ())) & ((1 << 64) - 1)

    def __len__(self) -> int:
        return len(self._nodes)
