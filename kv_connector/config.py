"""KVTransferConfig: how a node takes part in KV transfer (vLLM's names, pydantic-checked).

It enters from cluster.yaml and the command line, so it validates like user input: a bad
value fails before anything starts, naming the field.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kv_connector.fingerprint import safe_hash

KVRole = Literal["kv_producer", "kv_consumer", "kv_both"]
LoadFailurePolicy = Literal["recompute", "fail"]

# Bumped whenever the messages producer and consumer exchange change shape.
PROTOCOL_VERSION = 2


class KVTransferConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    kv_connector: str = "nixl"
    """A registered connector name (`nixl`, `tcp`) or a `module:Class` path."""

    kv_role: KVRole = "kv_both"
    """`kv_producer` (prefill node: computes KV and lends it), `kv_consumer` (decode node:
    pulls KV), or `kv_both`."""

    kv_rank: int | None = Field(default=None, ge=0)
    """This instance's rank among the transfer instances (informational: xPyD needs none)."""

    engine_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    """Unique per engine; peers address each other by it."""

    kv_ip: str = "127.0.0.1"
    """Where this node's handshake server listens (producers) — an address peers can reach."""

    kv_port: int = Field(default=0, ge=0, le=65535)
    """Handshake port; 0 picks a free one."""

    kv_buffer_device: Literal["cpu", "cuda"] = "cpu"
    """Where the KV cache that transfers read and write lives."""

    kv_connector_extra_config: dict[str, Any] = Field(default_factory=dict)
    """Connector-specific options, e.g. fault injection for tests (see each connector)."""

    load_failure_policy: LoadFailurePolicy = "recompute"
    """`recompute`: compute missing KV locally, the client sees the same tokens.
    `fail`: end the request at once with an error."""

    abort_timeout_s: float = Field(default=120.0, gt=0)
    """A producer frees blocks that no consumer has claimed for this long."""

    transfer_timeout_s: float = Field(default=30.0, gt=0)
    """A consumer gives up on a handshake or a transfer that takes longer."""

    @field_validator("kv_connector")
    @classmethod
    def _connector_named(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("kv_connector is empty: use nixl, tcp or a module:Class path")
        return v

    @property
    def is_producer(self) -> bool:
        return self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self.kv_role in ("kv_consumer", "kv_both")

    def get_from_extra_config(self, key: str, default: Any = None) -> Any:
        return self.kv_connector_extra_config.get(key, default)

    def compute_hash(self) -> str:
        """Fingerprint of the settings two engines must share to exchange KV.

        Factors: the connector (both ends must speak the same transport) and the protocol
        version. Everything else here is local policy (role, addresses, timeouts, failure
        policy) and may differ between the ends. Model and cache compatibility (dtype,
        block size, shapes, layout) is checked separately at handshake, from the engine.
        """
        factors: list[Any] = [self.kv_connector, PROTOCOL_VERSION]
        return safe_hash(str(factors).encode(), usedforsecurity=False).hexdigest()
