"""What the launcher tells a router process (`python -m router --spec JSON`)."""

from __future__ import annotations

import msgspec


class NodeAddress(msgspec.Struct):
    id: str            # e.g. prefill-0
    role: str          # prefill | decode | both
    address: str       # tcp://127.0.0.1:PORT, the node's ZeroMQ ROUTER socket
    pid: int = 0       # for /cluster (0 when not known, e.g. on another machine)


class RouterLaunchSpec(msgspec.Struct, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8000
    model_dir: str                          # for the tokenizer and chat template
    served_model_name: str                  # what /v1/models lists and requests may name
    nodes: list[NodeAddress]
    policy: str = "round_robin"             # round_robin | least_loaded | prefix_aware
    api_key: str | None = None
    max_concurrent_requests: int | None = None
    load_failure_policy: str = "recompute"  # what to do when a prefill node fails before answering
    block_size: int = 16                    # for prefix_aware's block-hash index
    max_model_len: int | None = None
    log_level: str = "info"
    # Structured outputs, reasoning and tools (cluster.yaml `structured_outputs:` and
    # `router.tool_call_parser`).
    structured_outputs_backend: str = "auto"
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    reasoning_parser: str | None = None
    enable_in_reasoning: bool = False
    tool_call_parser: str | None = None
