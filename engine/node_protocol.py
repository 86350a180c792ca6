"""Messages between the router and the serving nodes (ZeroMQ, msgpack via msgspec).

The router is the only client; a node answers every submitted request with a stream of
`RequestUpdate`s on the same connection, the last one `finished`; one engine step's
updates travel together in an `UpdateBatch` (one message per step, not one per request). Decoding is typed
(msgspec tagged unions): nothing on this wire is ever unpickled. Every message is one
frame (after the ROUTER socket's identity frame); anything else is dropped and counted.
When the cluster has a key (kv_connector/cluster_key.py) the socket is CURVE-authenticated.
"""

from __future__ import annotations

from typing import Any

import msgspec

from engine.outputs import EngineStats


# --- router -> node ---------------------------------------------------------------------
class SubmitRequest(msgspec.Struct, tag="submit"):
    request_id: str
    prompt_token_ids: list[int]
    params: dict[str, Any]                  # SamplingParams.to_dict()
    output_token_ids: list[int] = []        # tokens another node already generated
    kv_transfer_params: dict[str, Any] | None = None
    workflow_id: str | None = None          # for workflow-aware eviction
    agent_id: str | None = None
    fork_of: str | None = None              # share this request's prompt blocks (n > 1, engine/forking.py)


class AbortRequest(msgspec.Struct, tag="abort"):
    request_id: str


class ReleaseKV(msgspec.Struct, tag="release_kv"):
    """A prefill node may free the KV it holds for this request: no decode will pull it."""
    request_id: str


class StatsRequest(msgspec.Struct, tag="stats"):
    pass


class ProducerDown(msgspec.Struct, tag="producer_down"):
    """The router saw the node with this KV engine id die: loads from it fail at once
    (and recompute, under that policy) instead of waiting for transfer_timeout_s."""
    engine_id: str


class ProducerUp(msgspec.Struct, tag="producer_up"):
    """That node answers again (it was frozen, not dead): loads from it go ahead again."""
    engine_id: str


# --- node -> router ---------------------------------------------------------------------
class LogprobEntry(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float
    rank: int
    top: dict[int, float]


class RequestUpdate(msgspec.Struct, tag="update"):
    request_id: str
    new_token_ids: list[int] = []
    new_text: str = ""
    finished: bool = False
    finish_reason: str | None = None        # stop | length | abort | error
    stop_reason: int | str | None = None
    error: str | None = None
    error_code: int = 0                     # HTTP-like: 400 bad input, 500 server-side, 503 unavailable
    kv_transfer_params: dict[str, Any] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    logprobs: list[LogprobEntry] | None = None
    num_output_tokens: int = 0              # the request's output tokens on this node after this update
    refused: bool = False                   # the node never took the request (nothing ran there)


class NodeStats(msgspec.Struct, tag="node_stats"):
    node_id: str
    role: str                               # prefill | decode | both
    pid: int
    model: str
    block_size: int
    engine: EngineStats
    draining: bool = False
    # KV events (engine/kv_events.py): the PUB and replay sockets, "" when not published,
    # and the block hash algorithm of the keys they carry (engine/hashing.py).
    kv_events_address: str = ""
    kv_events_replay_address: str = ""
    block_hash_algo: str = "sha256_64"
    messages_dropped: int = 0               # malformed or undecodable messages since the node started
    kv_engine_id: str | None = None         # the KV connector's engine id (new at every start)
    kv_service: str = ""                    # host:port of its KV service, when it lends KV


class UpdateBatch(msgspec.Struct, tag="updates"):
    updates: list[RequestUpdate]


ToNode = SubmitRequest | AbortRequest | ReleaseKV | StatsRequest | ProducerDown | ProducerUp
FromNode = RequestUpdate | UpdateBatch | NodeStats

_encoder = msgspec.msgpack.Encoder()
_to_node = msgspec.msgpack.Decoder(ToNode)
_from_node = msgspec.msgpack.Decoder(FromNode)


def encode(msg: ToNode | FromNode) -> bytes:
    return _encoder.encode(msg)


def decode_to_node(data: bytes) -> ToNode:
    return _to_node.decode(data)


def decode_from_node(data: bytes) -> FromNode:
    return _from_node.decode(data)


def updates_in(msg: FromNode) -> list[RequestUpdate]:
    """The request updates a message from a node carries (none for stats)."""
    if isinstance(msg, UpdateBatch):
        return msg.updates
    return [msg] if isinstance(msg, RequestUpdate) else []
