"""A request's state inside one engine: its tokens, its blocks, how far its KV is computed."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.hashing import PrefixHashAlgo, hash_block_tokens, root_block_hash
from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"                            # queued for (re)prefill
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"  # blocks allocated, a KV connector is filling them
    RUNNING = "running"
    PREEMPTED = "preempted"                        # blocks taken back; will recompute
    FINISHED_STOPPED = "finished_stopped"          # eos, stop token or stop string
    FINISHED_LENGTH = "finished_length"            # max_tokens or the context limit
    FINISHED_ABORTED = "finished_aborted"          # the client went away, or abort()
    FINISHED_ERROR = "finished_error"              # the engine could not serve it (KV load failed, ...)

    @property
    def finished(self) -> bool:
        return self.value.startswith("finished")

    @property
    def finish_reason(self) -> str | None:
        return {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                RequestStatus.FINISHED_ABORTED: "abort", RequestStatus.FINISHED_ERROR: "error"}.get(self)


class GrowingArray:
    """A numpy copy of an append-only token list (append, +=), kept current by copying what
    is new: a penalty's per-step flattening of every prompt and output was O(tokens) of
    Python ints per step (1.6 ms at batch 64 with 300 tokens each on an H200 host). A
    list that is replaced or shorter starts a new copy; one edited in place in the middle
    is not noticed (the engine never does that)."""

    __slots__ = ("_source", "_buf", "_n")

    def __init__(self) -> None:
        self._source: list[int] | None = None
        self._buf = np.empty(0, dtype=np.int64)
        self._n = 0

    def of(self, tokens: list[int]) -> np.ndarray:
        """tokens as int64 (len(tokens),): a view later calls leave as it is."""
        if tokens is not self._source or len(tokens) < self._n:  # another list, or cut: a new copy
            self._source, self._buf, self._n = tokens, np.empty(0, dtype=np.int64), 0
        m = len(tokens)
        if m > self._n:
            if m > len(self._buf):
                grown = np.empty(max(m, 2 * len(self._buf)), dtype=np.int64)
                grown[:self._n] = self._buf[:self._n]
                self._buf = grown
            self._buf[self._n:m] = tokens[self._n:m]
            self._n = m
        return self._buf[:m]


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int                                # the sampler's seed: the request's, or one drawn for it
    max_tokens: int                          # params.max_tokens bounded by the context limit
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0             # tokens whose KV is in the cache (a prefix of all tokens)
    num_cached_tokens: int = 0               # of those, found in the prefix cache at admission
    # Ranges [start, end) inside the computed prefix whose KV must be computed again
    # (blocks a KV connector failed to deliver). Served before the request moves on.
    recompute_ranges: list[tuple[int, int]] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained keys of full blocks
    num_published_blocks: int = 0            # leading blocks already offered to the prefix cache
    stop_reason: int | str | None = None
    error: str | None = None
    error_is_client_side: bool = False       # the request asked for the impossible (a 400), not an engine fault
    error_is_unavailable: bool = False       # something it needs is gone (its KV producer): a 503, not a fault
    # KV connector seam: what the producer reported (on a consumer: where to pull from;
    # on a producer: filled in when the request finishes, for the router to forward).
    kv_transfer_params: dict[str, Any] | None = None
    num_external_tokens: int = 0             # prompt tokens whose KV arrives from another node
    prompt_text: str | None = None
    workflow_id: str | None = None           # the agent workflow it belongs to (eviction priority, metrics)
    # Another request of this engine with the same prompt (choice 0 of an `n` > 1 request):
    # admission shares its prompt blocks instead of computing them (engine/forking.py).
    # Cleared once the fork is made or found impossible.
    fork_of: str | None = None
    agent_id: str | None = None
    detokenizer: Any = None
    logprobs: list[Any] = field(default_factory=list)
    # A stop string matched in text read while the next step ran: the request ends at the
    # engine's next step (see LLMEngine.step), with this reason and last text delta.
    pending_stop: str | None = None
    pending_text: str = ""
    _prompt_array: GrowingArray = field(default_factory=GrowingArray, repr=False)
    _output_array: GrowingArray = field(default_factory=GrowingArray, repr=False)

    def token_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(prompt, output) token ids as int64 arrays, kept current across steps."""
        return self._prompt_array.of(self.prompt_token_ids), self._output_array.of(self.output_token_ids)

    @property
    def cache_owner(self) -> str | None:
        """Whose KV blocks these are for workflow-aware eviction: the workflow, else the agent."""
        return self.workflow_id or self.agent_id

    @property
    def awaits_remote_output(self) -> bool:
        """A streamed pull (kv_connector/pull_connector.py) will bring the producer's first
        token with the prompt's KV."""
        p = self.kv_transfer_params
        return bool(p and p.get("do_remote_prefill") and p.get("streamed") and not self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    def update_block_hashes(self, block_size: int, algo: PrefixHashAlgo) -> None:
        """Extend the chained keys to every full block of known tokens."""
        n_full = self.num_tokens // block_size
        while len(self.block_hashes) < n_full:
            i = len(self.block_hashes)
            parent = self.block_hashes[-1] if self.block_hashes else root_block_hash(algo)
            self.block_hashes.append(hash_block_tokens(parent, self.token_slice(i * block_size, (i + 1) * block_size), algo))
