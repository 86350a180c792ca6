"""Messages between a consumer and a producer's KV service (msgpack via msgspec; a
decoded message is plain data — nothing on this wire is ever unpickled)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from kv_connector.base import KVCacheInfo

NonNegative = Annotated[int, Meta(ge=0)]


class HandshakeRequest(msgspec.Struct, tag="handshake"):
    engine_id: str                 # the consumer's
    config_hash: str               # KVTransferConfig.compute_hash() of the consumer


class HandshakeResponse(msgspec.Struct, tag="handshake_ok"):
    engine_id: str                 # the producer's
    config_hash: str
    kv_info: KVCacheInfo
    num_blocks: int
    block_bytes: int
    transport: bytes = b""         # transport-specific: NIXL agent metadata and region layout


class ClaimRequest(msgspec.Struct, tag="claim"):
    request_ids: list[str]         # renew the lease on each


class ClaimResponse(msgspec.Struct, tag="claim_ok"):
    held: list[bool]               # per request id: are its blocks still held?


class ReleaseRequest(msgspec.Struct, tag="release"):
    request_id: str


class ReleaseResponse(msgspec.Struct, tag="release_ok"):
    was_held: bool                 # False: the lease ran out before the release; the read is void
    checksums: list[int] = []      # per block of the request, for the consumer to verify


class ReadRequest(msgspec.Struct, tag="read"):
    """TCP connector: send these blocks' bytes (the request must be held)."""
    request_id: str
    block_ids: list[int]


class WaitKV(msgspec.Struct, tag="wait_kv"):
    """Streamed pull: what of this request's KV is computed now? Answered at once when the
    producer knows more than the consumer has (`have_blocks` at `epoch`), else when it
    does, or after `wait_s` with no news (a long poll: the consumer asks again)."""
    request_id: str
    have_blocks: NonNegative = 0
    epoch: NonNegative = 0
    wait_s: Annotated[float, Meta(ge=0, le=60)] = 0.5  # NaN fails too: a long poll always ends


class KVProgress(msgspec.Struct, tag="kv_progress"):
    state: str                     # unknown (not seen yet) | computing | done (lent) | gone
    epoch: int = 0                 # bumped when computed blocks were taken back (preemption)
    block_ids: list[int] = []      # the producer's blocks whose KV is computed, in request order
    num_tokens: int = 0            # prompt tokens they hold (done: all of them)
    output_token_ids: list[int] = []  # done: the tokens the producer sampled (the first token)
    reason: str = ""               # gone: why (stopped, aborted, failed, expired)


class ErrorResponse(msgspec.Struct, tag="error"):
    message: str


class PullHandle(msgspec.Struct):
    """A decode job's `kv_transfer_params` when its prompt's KV is to be pulled (what the
    producer's lending, or the router's dispatch to both nodes, put there). Checked when
    the job arrives, so a malformed one is refused with a 400 before it is queued."""
    remote_engine_id: str
    remote_host: Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9.:_\-\[\]]+$")]
    remote_port: Annotated[int, Meta(ge=1, le=65535)]
    remote_request_id: Annotated[str, Meta(min_length=1)]
    num_tokens: NonNegative
    remote_block_ids: list[NonNegative] = []
    streamed: bool = False


Request = HandshakeRequest | ClaimRequest | ReleaseRequest | ReadRequest | WaitKV
Response = HandshakeResponse | ClaimResponse | ReleaseResponse | KVProgress | ErrorResponse

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_response_decoder = msgspec.msgpack.Decoder(Response)


def encode(msg: Request | Response) -> bytes:
    return _encoder.encode(msg)


def decode_request(data: bytes) -> Request:
    return _request_decoder.decode(data)


def decode_response(data: bytes) -> Response:
    return _response_decoder.decode(data)

