"""The KV handshake: how a consumer learns where a producer's KV blocks are, over ZeroMQ.

The producer runs a `HandshakeServer` (a ROUTER socket on a small thread) that answers every
`HandshakeRequest` with the same `HandshakeResponse`: its engine id, NIXL agent metadata,
the layout of its registered KV cache, and what its cache holds (`KVCompat`) with a hash of
it. The consumer calls `fetch_handshake(host, port, timeout_s)` once per producer, checks
`check_compat(local, response.compat)`, then `NixlTransport.add_peer(response.agent_metadata,
response.layout)`.

Messages are msgpack through msgspec (typed decoding; never pickle: the port is reachable
from the network). `fetch_handshake` never hangs: it raises `HandshakeError` after
`timeout_s` whether the port refused, nobody answered, or the reply did not decode.

Threads: the server thread only serves bytes encoded before it starts, so it never touches
the NIXL agent (which belongs to the engine's thread).
"""

from __future__ import annotations

import logging
import threading
import time

import msgspec
import zmq

from engine.hashing import safe_hash
from kv_connector.nixl_transport import KVRegionLayout

logger = logging.getLogger(__name__)

HANDSHAKE_PROTOCOL_VERSION = 1


class HandshakeError(RuntimeError):
    """The handshake with a producer failed: no answer in time, a refusal, or an undecodable reply."""


class KVCompat(msgspec.Struct, frozen=True):
    """What a node's KV cache holds: two nodes exchange KV blocks only if these are all equal."""

    model_name: str
    dtype: str  # "bfloat16", "float16", "float32"
    block_size: int  # tokens per block
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_layout: str  # the engine's layout name, e.g. "NL2BHD"

    def fingerprint(self) -> str:
        """Stable hash of every field (hex), cheap to compare before looking at the fields."""
        return safe_hash(msgspec.msgpack.encode(self), usedforsecurity=False).hexdigest()


class HandshakeRequest(msgspec.Struct, tag="handshake_request"):
    protocol_version: int = HANDSHAKE_PROTOCOL_VERSION
    engine_id: str = ""  # the consumer's, for the producer's logs


class HandshakeResponse(msgspec.Struct, tag="handshake_response"):
    engine_id: str
    agent_metadata: bytes  # NixlTransport.agent_metadata()
    layout: KVRegionLayout  # NixlTransport.local_layout()
    compat: KVCompat
    compat_hash: str  # compat.fingerprint()
    protocol_version: int = HANDSHAKE_PROTOCOL_VERSION


class HandshakeRejected(msgspec.Struct, tag="handshake_rejected"):
    reason: str


_request_decoder = msgspec.msgpack.Decoder(HandshakeRequest)
_reply_decoder = msgspec.msgpack.Decoder(HandshakeResponse | HandshakeRejected)
_encoder = msgspec.msgpack.Encoder()


def check_compat(local: KVCompat, remote: KVCompat, remote_role: str = "producer") -> str | None:
    """None when the two caches are interchangeable, else a message naming every field that differs."""
    if local == remote:
        return None
    diffs = [f"{name} {getattr(remote, name)!r} on the {remote_role} but {getattr(local, name)!r} here"
             for name in local.__struct_fields__ if getattr(local, name) != getattr(remote, name)]
    return ("KV caches are incompatible: " + "; ".join(diffs) + ". Both nodes must serve the same model with the "
            "same dtype, block_size and KV layout: fix the node's model/cache settings in cluster.yaml")


def _tcp_endpoint(host: str, port: int | str) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class HandshakeServer:
    """Answers handshakes on host:port from a background thread. Port 0 picks a free port.

        server = HandshakeServer(response, "0.0.0.0", 0)
        port = server.start()       # the bound port; raises if binding failed
        ...
        server.stop()
    """

    def __init__(self, response: HandshakeResponse, host: str = "0.0.0.0", port: int = 0):
        if response.compat_hash != response.compat.fingerprint():
            raise ValueError("response.compat_hash is not response.compat.fingerprint()")
        self._reply = _encoder.encode(response)
        self._engine_id = response.engine_id
        self.host = host
        self.port = port
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # set if the serving thread died

    def start(self, timeout_s: float = 10.0) -> int:
        if self._thread is not None:
            raise RuntimeError("handshake server already started")
        self._thread = threading.Thread(target=self._serve, name=f"kv-handshake-{self._engine_id}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise HandshakeError(f"handshake server did not come up within {timeout_s} s")
        if self.error is not None:
            raise HandshakeError(f"handshake server could not bind {self.host}:{self.port}: "
                                 f"{self.error}") from self.error
        return self.port

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.error("handshake server engine_id=%s did not stop within %.1f s", self._engine_id, timeout_s)

    def __enter__(self) -> HandshakeServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _serve(self) -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDTIMEO, 1000)
            if ":" in self.host:
                sock.setsockopt(zmq.IPV6, 1)
            sock.bind(_tcp_endpoint(self.host, self.port or "*"))
            self.port = int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        except Exception as e:
            self.error = e
            sock.close(0)
            self._ready.set()
            return
        self._ready.set()
        logger.info("handshake server engine_id=%s listening on %s:%d", self._engine_id, self.host, self.port)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(100):
                    continue
                frames = sock.recv_multipart(zmq.NOBLOCK)
                envelope, payload = frames[:-1], frames[-1]  # [id, payload] from DEALER, [id, b"", payload] from REQ
                try:
                    req = _request_decoder.decode(payload)
                except msgspec.DecodeError as e:
                    logger.warning("handshake server engine_id=%s got an undecodable request: %s", self._engine_id, e)
                    reply = _encoder.encode(HandshakeRejected(reason=f"undecodable handshake request: {e}"))
                else:
                    if req.protocol_version != HANDSHAKE_PROTOCOL_VERSION:
                        reply = _encoder.encode(HandshakeRejected(
                            reason=f"handshake protocol {req.protocol_version} requested but this producer speaks "
                                   f"{HANDSHAKE_PROTOCOL_VERSION}: run the same pdcluster version on every node"))
                    else:
                        reply = self._reply
                        logger.debug("handshake served engine_id=%s to consumer=%s", self._engine_id, req.engine_id)
                try:
                    sock.send_multipart([*envelope, reply])
                except zmq.Again:
                    logger.warning("handshake server engine_id=%s could not reply (consumer gone)", self._engine_id)
        except Exception as e:  # surfaced through .error and the log; the server is dead after this
            self.error = e
            logger.exception("handshake server engine_id=%s stopped on an error", self._engine_id)
        finally:
            sock.close(0)


def fetch_handshake(host: str, port: int, timeout_s: float = 5.0, engine_id: str = "") -> HandshakeResponse:
    """Ask the producer at host:port for its handshake. Raises HandshakeError, never hangs."""
    endpoint = _tcp_endpoint(host, port)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        if ":" in host:
            sock.setsockopt(zmq.IPV6, 1)
        try:
            sock.connect(endpoint)
            sock.send_multipart([_encoder.encode(HandshakeRequest(engine_id=engine_id))], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            raise HandshakeError(f"cannot send a KV handshake to {endpoint}: {e}") from e
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        start = time.monotonic()
        if not poller.poll(max(0, int(timeout_s * 1000))):
            raise HandshakeError(f"no KV handshake reply from {endpoint} within {timeout_s:.1f} s (waited "
                                 f"{time.monotonic() - start:.1f} s): the connection was refused or nobody answers; "
                                 "check that the prefill node is up and its kv handshake host/port are reachable")
        frames = sock.recv_multipart(zmq.NOBLOCK)
    finally:
        sock.close(0)
    try:
        reply = _reply_decoder.decode(frames[-1])
    except msgspec.DecodeError as e:
        raise HandshakeError(f"the KV handshake reply from {endpoint} does not decode ({e}): is that port a "
                             "pdcluster prefill node of the same version?") from e
    if isinstance(reply, HandshakeRejected):
        raise HandshakeError(f"the producer at {endpoint} rejected the handshake: {reply.reason}")
    if reply.protocol_version != HANDSHAKE_PROTOCOL_VERSION:
        raise HandshakeError(f"the producer at {endpoint} speaks handshake protocol {reply.protocol_version}, this "
                             f"node {HANDSHAKE_PROTOCOL_VERSION}: run the same pdcluster version on every node")
    if reply.compat_hash != reply.compat.fingerprint():
        raise HandshakeError(f"the handshake from {endpoint} is inconsistent (compat_hash does not match compat)")
    return reply
