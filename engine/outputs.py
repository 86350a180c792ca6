"""What the engine reports back per request and step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[Any] | None = None       # one TokenLogprobs per token when asked for
    finish_reason: str | None = None        # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None    # the stop string or token id that ended it


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt: str | None = None
    new_token_ids: list[int] = field(default_factory=list)  # tokens added this step
    new_text: str = ""                                      # stable text added this step
    num_cached_tokens: int = 0                              # prompt tokens served by the prefix cache
    error: str | None = None
    kv_transfer_params: dict[str, Any] | None = None        # a producer's handle for the consumer
    error_is_client_side: bool = False                      # error: the request's own fault (HTTP 400)
    error_is_unavailable: bool = False                      # error: something it needs is gone (HTTP 503)


@dataclass(slots=True)
class EngineStats:
    """An engine's queues and KV cache at one moment (nodes report it to the router).
    `kv_blocks_free` counts blocks no request holds, cached prefixes included."""
    running: int
    waiting: int
    waiting_for_remote_kv: int
    kv_blocks_total: int
    kv_blocks_free: int
    kv_blocks_cached: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    kv_transfer: dict[str, float] = field(default_factory=dict)  # the connector's counters
    # The most requests running / waiting at any step since the previous stats() call: an
    # instant's queue lengths miss the bursts between two polls.
    peak_running: int = 0
    peak_waiting: int = 0
    # Prefix cache in tokens (queries: prompt tokens looked up at admission; hits: served
    # from the cache), cached blocks evicted for room (of those, blocks of active
    # workflows), the cached set's digest (engine/block_pool.py; a KV event subscriber
    # in sync computes the same) and the eviction policy.
    prefix_cache_query_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    kv_evictions: int = 0
    kv_protected_evictions: int = 0
    kv_cache_digest: int = 0
    eviction_policy: str = ""
    # Forks (engine/forking.py: the choices of an `n` > 1 request): requests admitted as
    # forks, the parent blocks they shared by reference, the blocks they copied where the
    # choices differ, the prompt tokens they did not compute, and the forks that shared
    # nothing (the parent was gone: prefix cache and compute instead). `tokens_computed`:
    # tokens whose KV this engine computed since it started (loaded KV not counted).
    forks: int = 0
    fork_blocks_shared: int = 0
    fork_blocks_copied: int = 0
    fork_tokens_saved: int = 0
    fork_fallbacks: int = 0
    tokens_computed: int = 0
