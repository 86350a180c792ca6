"""What the launcher tells a router process (`python -m router --spec JSON`)."""

from __future__ import annotations

import msgspec

API_KEY_ENV = "PDCLUSTER_ROUTER_API_KEY"   # how the launcher hands the router its API key


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
    api_key: str | None = None              # the launcher leaves it out of argv: $PDCLUSTER_ROUTER_API_KEY
    protect_admin_endpoints: bool = False   # the key also guards /cluster and /metrics
    max_concurrent_requests: int | None = None
    max_request_body_bytes: int = 16 << 20  # larger bodies get 413
    node_timeout_s: float = 5.0             # a node silent this long is declared down
    load_failure_policy: str = "recompute"  # what to do when a prefill node fails before answering
    dispatch_to_both: bool = True           # send the decode job with the prefill job (streamed KV)
    block_size: int = 16                    # for prefix_aware's block-hash index
    max_model_len: int | None = None
    log_level: str = "info"
    generation_config: str = "auto"         # auto: generation_config.json's sampling defaults apply; vllm: ignored
    # Structured outputs, reasoning and tools (cluster.yaml `structured_outputs:` and
    # `router.tool_call_parser`).
    structured_outputs_backend: str = "auto"
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    reasoning_parser: str | None = None
    enable_in_reasoning: bool = False
    tool_call_parser: str | None = None
    # Per-request disaggregation (cluster.yaml `router.disaggregation`, router/disaggregation.py).
    disaggregation_mode: str | None = None  # always | conditional | never; None: always with prefill nodes, else never
    colocated_share_kv: bool = False        # `both` nodes lend and pull KV (kv_both)
    max_local_prefill_tokens: int = 512
    max_prefill_queue: int = 4
