"""The cluster's key: who may talk to a node's sockets.

It lives in kv_connector/, the lowest package that opens sockets (the KV service), so
that engine/, router/ and cluster/ can share it while kv_connector/ imports nothing from
engine/.

`pdcluster up` draws one CURVE key pair per cluster run and hands it to every child in
the environment (`PDCLUSTER_CLUSTER_KEY`, never argv: /proc/PID/environ is readable only
by the same user, /proc/PID/cmdline by everyone). Every internal ZeroMQ server socket (a
node's request socket, a prefill node's KV service) is then a CURVE server that
encrypts its traffic and admits only clients that prove they hold the key; a stranger's
connection is dropped in the handshake, before any message reaches the node. (A ZAP
handler checks the client's public key: CURVE alone would admit anyone who learned the
server's public key.)

Without the variable (a node or engine started by hand, the tests that build engines
directly) sockets stay plain, as before. The KV-events PUB socket, which vLLM-style
subscribers read, is not an internal socket and stays open.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import zmq

log = logging.getLogger(__name__)

ENV_VAR = "PDCLUSTER_CLUSTER_KEY"


@dataclass(frozen=True, slots=True)
class ClusterKey:
    public: bytes   # Z85, 40 bytes
    secret: bytes   # Z85, 40 bytes

    @classmethod
    def generate(cls) -> ClusterKey:
        if not zmq.has("curve"):
            raise RuntimeError("this libzmq has no CURVE support (built without libsodium): install pyzmq's "
                               "wheel, which bundles a libzmq with CURVE")
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    def encode(self) -> str:
        return f"{self.public.decode()},{self.secret.decode()}"  # ',' is not in Z85's alphabet

    @classmethod
    def decode(cls, text: str) -> ClusterKey:
        public, sep, secret = text.strip().partition(",")
        if not sep or len(public) != 40 or len(secret) != 40:
            raise ValueError(f"${ENV_VAR} is not a cluster key (two 40-character Z85 keys joined by ','): "
                             "let `pdcluster up` set it, or unset it")
        key = cls(public.encode(), secret.encode())
        if zmq.curve_public(key.secret) != key.public:
            raise ValueError(f"${ENV_VAR}: the public key does not belong to the secret key")
        return key

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClusterKey | None:
        text = (os.environ if environ is None else environ).get(ENV_VAR)
        return cls.decode(text) if text else None

    def serve(self, sock: zmq.Socket) -> None:
        """Make `sock` (before bind) a CURVE server admitting holders of this key only."""
        _authenticator(sock.context, self)
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def connect(self, sock: zmq.Socket) -> None:
        """Make `sock` (before connect) a CURVE client of a server holding this key."""
        sock.curve_serverkey = self.public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


class _OnlyOurKey:
    """ZAP credentials provider: admit the cluster's own public key, nothing else."""

    def __init__(self, public: bytes):
        self.public = public
        self.refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        if key == self.public:
            return True
        self.refused += 1
        log.warning("refused a connection with an unknown CURVE key (not this cluster's)")
        return False


_authenticators: dict[int, object] = {}
_lock = threading.Lock()


def _authenticator(ctx: zmq.Context, key: ClusterKey) -> None:
    """One ZAP handler thread per context (ZAP is per context), started on first use."""
    from zmq.auth.thread import ThreadAuthenticator

    with _lock:
        if id(ctx) in _authenticators:
            return
        auth = ThreadAuthenticator(ctx, log=logging.getLogger("pdcluster.zap"))
        auth.start()
        auth.configure_curve_callback(domain="*", credentials_provider=_OnlyOurKey(key.public))
        _authenticators[id(ctx)] = auth
