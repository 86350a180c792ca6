"""A producer's KV service: a ZeroMQ ROUTER thread that answers consumers (handshake,
claim, release, and for the TCP connector the block bytes), and the client side.

Long polls: a request type registered in `long_poll` (a streamed pull's WaitKV) may be
answered later: its handler returns None when there is no news, the request is parked,
and the thread asks the handler again every millisecond until it answers or the
request's wait runs out (then the handler must answer). Other requests are served
meanwhile; nothing blocks the thread.

The service thread never touches the engine: it reads the ledger (its own lock) and,
for TCP reads, the KV tensor's held blocks, which nobody writes while they are held.
Every client call has a deadline and uses a fresh socket with LINGER 0, so a dead
producer costs a consumer at most its timeout, never a hang.

With a cluster key in the environment (kv_connector/cluster_key.py) the service is a CURVE
server and clients authenticate; malformed messages are dropped, logged and counted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import msgspec
import zmq

from kv_connector.cluster_key import ClusterKey
from kv_connector import messages as m

log = logging.getLogger(__name__)

# Handler for a ReadRequest: returns the frames to send back (raw block bytes).
ReadHandler = Callable[[m.ReadRequest], list[bytes]]
# Handler for a long poll: (request, final) -> an answer, or None to be asked again later.
LongPollHandler = Callable[[m.Request, bool], m.Response | None]

_LONG_POLL_TICK_MS = 1
_MAX_WAIT_S = 5.0


class ServiceError(RuntimeError):
    """The producer could not be reached in time, or answered with an error."""


class ProducerService:
    def __init__(self, host: str, port: int, handlers: dict[type, Callable],
                 long_poll: dict[type, LongPollHandler] | None = None):
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, 16 << 20)  # requests are small: a larger one disconnects its peer
        key = ClusterKey.from_env()
        if key is not None:
            key.serve(self._sock)
        self.messages_dropped = 0
        if port == 0:
            self.port = self._sock.bind_to_random_port(f"tcp://{host}")
        else:
            self._sock.bind(f"tcp://{host}:{port}")
            self.port = port
        self.host = host
        self._handlers = handlers
        self._long_poll = long_poll or {}
        self._parked: list[tuple[bytes, bytes, m.Request, float]] = []  # (ident, tag, request, answer by)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kv-producer-service", daemon=True)

    def start(self) -> ProducerService:
        self._thread.start()
        return self

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if poller.poll(_LONG_POLL_TICK_MS if self._parked else 100):
                self._serve_one()
            if self._parked:
                self._answer_parked()
        self._sock.close(0)

    def _serve_one(self) -> None:
        frames = self._sock.recv_multipart()
        if len(frames) != 4 or frames[1]:
            self.messages_dropped += 1
            log.warning("kv service: dropped a message of %d frames, not ours (%d dropped so far)",
                        len(frames) - 1, self.messages_dropped)
            return
        ident, _, tag, payload = frames
        try:
            msg = m.decode_request(payload)
            poll = self._long_poll.get(type(msg))
            handler = self._handlers.get(type(msg))
            if poll is not None:
                out = poll(msg, False)
                if out is None:
                    wait = min(max(float(getattr(msg, "wait_s", 0.0)), 0.0), _MAX_WAIT_S)
                    self._parked.append((ident, tag, msg, time.monotonic() + wait))
                    return
            elif handler is None:
                out = m.ErrorResponse(f"{type(msg).__name__} is not served here")
            else:
                out = handler(msg)
            reply = out if isinstance(out, list) else [m.encode(out)]
        except Exception as e:  # a bad message must not kill the service
            log.warning("kv service: bad request from a consumer: %s", e)
            reply = [m.encode(m.ErrorResponse(f"bad request: {e}"))]
        self._sock.send_multipart([ident, b"", tag, *reply], copy=False)

    def _answer_parked(self) -> None:
        now = time.monotonic()
        still: list[tuple[bytes, bytes, m.Request, float]] = []
        for ident, tag, msg, until in self._parked:
            try:
                out = self._long_poll[type(msg)](msg, now >= until)
            except Exception as e:
                log.warning("kv service: long poll %s failed: %s", type(msg).__name__, e)
                out = m.ErrorResponse(f"bad request: {e}")
            if out is None:
                still.append((ident, tag, msg, until))
            else:
                self._sock.send_multipart([ident, b"", tag, m.encode(out)], copy=False)
        self._parked = still

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)


_local = threading.local()  # per thread: (host, port) -> DEALER socket, and a request counter


def _socket(host: str, port: int) -> zmq.Socket:
    """This thread's connection to a producer, made once: a fresh TCP connection per
    message would cost more than the message."""
    cache = getattr(_local, "sockets", None)
    if cache is None:
        cache = _local.sockets = {}
        _local.seq = 0
    sock = cache.get((host, port))
    if sock is None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            key = ClusterKey.from_env()
            if key is not None:
                key.connect(sock)
            sock.connect(f"tcp://{host}:{port}")
        except BaseException:  # e.g. an address zmq cannot parse: no socket left behind
            sock.close(0)
            raise
        cache[(host, port)] = sock
    return sock


def _drop_socket(host: str, port: int) -> None:
    sock = getattr(_local, "sockets", {}).pop((host, port), None)
    if sock is not None:
        sock.close(0)


def call(host: str, port: int, msg: m.Request, timeout_s: float,
         give_up: threading.Event | None = None) -> list[bytes]:
    """Send one request and return the raw reply frames, or raise ServiceError.

    Each request carries a sequence number the service echoes, so a late answer to an
    earlier request that timed out is recognised and skipped. `give_up` set (the
    producer is known dead) ends the wait within 50 ms."""
    sock = _socket(host, port)
    _local.seq += 1
    tag = _local.seq.to_bytes(8, "little")
    deadline = time.monotonic() + timeout_s
    try:
        sock.send_multipart([b"", tag, m.encode(msg)])
        while True:
            left = deadline - time.monotonic()
            if give_up is not None and give_up.is_set():
                raise ServiceError(f"KV producer at {host}:{port} is down: gave up on {type(msg).__name__}")
            if left <= 0:
                raise ServiceError(f"KV producer at {host}:{port} did not answer {type(msg).__name__} "
                                   f"within {timeout_s:.1f}s (down, or overloaded)")
            if not sock.poll(int(min(left, 0.05) * 1000) + 1, zmq.POLLIN):
                continue
            frames = sock.recv_multipart()
            if len(frames) >= 3 and frames[1] == tag:
                return frames[2:]
    except BaseException:
        _drop_socket(host, port)  # a dead or confused peer: start afresh next time
        raise


def call_struct(host: str, port: int, msg: m.Request, expect: type, timeout_s: float,
                give_up: threading.Event | None = None):
    try:
        reply = m.decode_response(call(host, port, msg, timeout_s, give_up)[0])
    except msgspec.DecodeError as e:
        raise ServiceError(f"KV producer at {host}:{port} sent an unreadable answer to {type(msg).__name__}: {e} "
                           "(a different pdcluster version?)") from e
    if isinstance(reply, m.ErrorResponse):
        raise ServiceError(f"KV producer at {host}:{port} refused {type(msg).__name__}: {reply.message}")
    if not isinstance(reply, expect):
        raise ServiceError(f"KV producer at {host}:{port} answered {type(reply).__name__} to {type(msg).__name__}")
    return reply
