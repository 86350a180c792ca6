"""The KV connector interface: how an engine gets prompt KV from another engine.

Who calls what
--------------
One connector object lives in each engine process; the engine calls it from its one
engine thread, never concurrently. (vLLM splits a connector into a scheduler half and a
worker half because its model runs in other processes; ours runs in the engine's own
process, so one object serves both, and the split shows as the method groups below.)

Lifecycle
  1. ``__init__(config, kv_info)`` — config is the node's KVTransferConfig; kv_info
     describes this engine's KV cache (shapes, dtype, layout) for compatibility checks.
  2. ``register_kv_cache(kv_cache)`` — once, before any request: the one KV tensor
     (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim); see
     engine/kv_cache.py. Register it with the transport here.

Scheduler side (a request's life)
  * ``check_request(request_id, kv_transfer_params)`` — before a request is queued: raise
    ValueError when its params are malformed (they came over a socket) or its id is still
    lent; the node answers 400 and nothing else is touched.
  * ``on_request_added(request)`` — a request entered this engine. A consumer may
    announce itself to the producer now (so the producer keeps the blocks while the
    request waits in the queue). Must not block.
  * ``get_num_new_matched_tokens(request, num_computed_tokens) -> int`` — at admission:
    how many tokens after the locally cached ``num_computed_tokens`` will arrive from
    outside. 0 means "compute them here". Must not block or do I/O.
  * ``start_load(request, num_computed_tokens, num_external_tokens)`` — blocks are
    allocated (``request.block_ids``); begin filling tokens [num_computed_tokens,
    num_computed_tokens + num_external_tokens) asynchronously. Must not block: the
    engine keeps stepping its other requests meanwhile (async loads).
  * ``kv_computed(requests, event)`` — producer, after each step: how far each lent
    request's KV is computed (a streaming connector lets consumers read finished blocks).
  * ``request_finished(request) -> bool`` — the request ended (any reason; with or without
    blocks). Return True
    to keep its blocks: a producer lends them to a consumer, a consumer whose load is
    still in flight must not let the pool reuse blocks being written into. Blocks kept
    are handed back later through ``ConnectorEvents.blocks_to_free``. A producer sets
    ``request.kv_transfer_params`` here: what a consumer needs to pull.
  * ``release_lent(request_id)`` — producer: nobody will pull that request's KV.

Progress
  * ``poll() -> ConnectorEvents`` — called every engine step and while idle; returns
    what finished since the last call (loads done, with the blocks that failed; loads
    failed under the ``fail`` policy; blocks to give back). Must not block.
  * ``close()`` — stop threads, deregister memory. Idempotent.

Overlap
  vLLM's interface lets a producer save, and a consumer load, layer by layer, so that
  transfer overlaps the forward pass. Here the unit is the block: with the block-major KV
  layout a block is one contiguous run across all layers, and a layer-by-layer pull would
  cut every block into 2 x num_layers small pieces — the regime where NIXL crawls (see
  engine/kv_cache.py). Overlap comes from chunks instead: when the router dispatches a
  request to both nodes at once, the consumer reads each block as soon as the producer's
  chunk that computes it is done (``kv_computed``), so only the last chunk's blocks move
  after the prefill ends. Loads run on background threads while the decode node keeps
  stepping its running requests, and many requests' loads are in flight at once.

Failure
  The load-failure policy is the connector's to apply: under ``recompute`` a failed
  block is reported in ``loads_done`` (the engine computes those tokens again; the rest
  is kept), under ``fail`` the request is reported in ``loads_failed`` with a message
  that says what failed. A load must end — done or failed — within
  ``config.transfer_timeout_s``: no request may wait forever.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import msgspec
import torch

from kv_connector.config import KVTransferConfig


class KVCacheInfo(msgspec.Struct, frozen=True):
    """What two engines must agree on to exchange KV blocks byte for byte."""

    model: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    layout: str

    def mismatch(self, other: KVCacheInfo, here: str = "here", there: str = "on the producer") -> str | None:
        """None when compatible, else a message that names every field that differs."""
        diffs = [f"{f} {getattr(other, f)!r} {there} but {getattr(self, f)!r} {here}"
                 for f in self.__struct_fields__ if getattr(self, f) != getattr(other, f)]
        if not diffs:
            return None
        return ("KV caches are incompatible: " + "; ".join(diffs)
                + ". Run prefill and decode nodes with the same model, dtype and block_size.")


@dataclass(slots=True)
class ConnectorEvents:
    loads_done: list[tuple[str, set[int]]] = field(default_factory=list)  # (request id, failed block ids)
    loads_failed: list[tuple[str, str]] = field(default_factory=list)     # (request id, error message)
    blocks_to_free: list[list[int]] = field(default_factory=list)
    # Streamed pulls: the tokens the producer sampled, for requests in loads_done (or failed
    # under recompute): the engine continues from them.
    remote_outputs: dict[str, list[int]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.loads_done or self.loads_failed or self.blocks_to_free)


class KVConnectorBase(ABC):
    def __init__(self, config: KVTransferConfig, kv_info: KVCacheInfo):
        self.config = config
        self.kv_info = kv_info

    @abstractmethod
    def register_kv_cache(self, kv_cache: torch.Tensor) -> None: ...

    def check_request(self, request_id: str, kv_transfer_params: dict) -> None:
        return None

    def on_request_added(self, request) -> None:
        return None

    @abstractmethod
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> int: ...

    @abstractmethod
    def start_load(self, request, num_computed_tokens: int, num_external_tokens: int) -> None: ...

    @abstractmethod
    def request_finished(self, request) -> bool: ...

    @abstractmethod
    def poll(self) -> ConnectorEvents: ...

    def release_lent(self, request_id: str) -> None:
        """Producer: the consumer will never pull this request's KV (the router knows):
        free it at the next poll instead of after abort_timeout_s."""
        return None

    def kv_computed(self, requests, event=None) -> None:
        """Producer, engine thread, after each step: these requests' KV is written up to
        their num_computed_tokens once `event` (a device event; None: already) completes.
        A connector that streams KV to consumers while the prefill runs reads from here."""
        return None

    @property
    def wakeup_fd(self) -> int | None:
        """A file descriptor that becomes readable when poll() has news (a load ended), so
        the node loop can sleep on it instead of polling; None: poll periodically."""
        return None

    def drain_wakeup(self) -> None:
        """Consume what made wakeup_fd readable."""
        return None

    def producer_down(self, engine_id: str) -> None:
        """Consumer, engine thread: the router saw the producer with this engine id die.
        Loads from it should end now (as failed blocks, so the load-failure policy
        applies) rather than wait for transfer_timeout_s; later ones should not start."""
        return None

    def producer_up(self, engine_id: str) -> None:
        """Consumer, engine thread: that producer answers the router again (it was frozen,
        not dead): loads from it may start again."""
        return None

    def stats(self) -> dict[str, float]:
        """Counters for metrics (transfers, bytes, seconds, failures). Names are stable."""
        return {}

    def close(self) -> None:
        return None
