"""KV over NIXL (UCX): NVLink/RDMA between GPUs, shared memory or TCP between CPU processes.

The pull protocol (handshake, leases, release, checksums) is PullConnector's; this file
only moves bytes. A NIXL agent must be driven from the thread that made it
(kv_connector/nixl_transport.py), so one owner thread holds the NixlTransport: load
workers hand it read orders and wait on a future, and it keeps every READ in flight at
once, polling them together. The engine thread never waits on it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import msgspec
import torch

from kv_connector.nixl_transport import KVRegionLayout, NixlTransport
from kv_connector.pull_connector import LoadJob, Peer, PullConnector, TransferError

_POLL_S = 0.0002  # between polls while READs are in flight
# How long a load waits past its deadline for a READ NIXL cannot cancel at once to end.
_ABANDON_WAIT_S = 10.0

log = logging.getLogger(__name__)


class NixlPeerInfo(msgspec.Struct):
    """The transport part of a producer's handshake answer."""
    agent_metadata: bytes
    layout: KVRegionLayout


class _Read(msgspec.Struct):
    peer: str
    remote: list[int]
    local: list[int]
    deadline: float
    future: Any
    give_up: Any = None        # a threading.Event: set when the producer is known dead


class NixlOwnerThread:
    """Owns one NixlTransport; runs calls and READs for other threads."""

    def __init__(self, name: str, kv_cache: torch.Tensor, block_bytes: int, **transport_options):
        self._orders: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._ready: Future[tuple[bytes, KVRegionLayout]] = Future()
        self._thread = threading.Thread(target=self._run, args=(name, kv_cache, block_bytes, transport_options),
                                        name="nixl-owner", daemon=True)
        self._thread.start()
        self.metadata, self.layout = self._ready.result(timeout=120)

    def call(self, fn: Callable[[NixlTransport], Any], timeout_s: float) -> Any:
        fut: Future = Future()
        self._orders.put((fn, fut))
        return fut.result(timeout=timeout_s)

    def read(self, peer: str, remote: list[int], local: list[int], deadline: float,
             give_up: threading.Event | None = None) -> None:
        """Returns when the READ is done; raises TransferError when it failed, and then
        NIXL no longer writes into `local` (the caller may recompute or free them)."""
        fut: Future = Future()
        self._orders.put(_Read(peer, remote, local, deadline, fut, give_up))
        try:
            fut.result(timeout=max(deadline - time.monotonic(), 0) + 1.0)
        except TimeoutError:
            if fut.cancel():  # never posted: it never will be
                raise TransferError("NIXL read did not start before the transfer deadline") from None
            # Posted: the owner ends it at its deadline, and answers once NIXL let go of it.
            try:
                fut.result(timeout=_ABANDON_WAIT_S)
            except TimeoutError:
                raise TransferError(f"NIXL read still in flight {_ABANDON_WAIT_S:.0f}s after the transfer deadline: "
                                    "NIXL could not cancel it") from None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self, name, kv_cache, block_bytes, options) -> None:
        try:
            transport = NixlTransport(name, **options)
            layout = transport.register_kv_cache(kv_cache, block_bytes)
            self._ready.set_result((transport.agent_metadata(), layout))
        except BaseException as e:
            self._ready.set_exception(e)
            return
        in_flight: list[tuple[Any, _Read]] = []
        try:
            while not self._stop.is_set():
                try:
                    order = self._orders.get(timeout=_POLL_S if in_flight else 0.05)
                except queue.Empty:
                    order = None
                if isinstance(order, _Read):
                    if not order.future.set_running_or_notify_cancel():
                        pass  # its caller gave up before it was posted: its blocks are no longer ours
                    elif time.monotonic() >= order.deadline:
                        order.future.set_exception(TransferError("NIXL read not posted: past its transfer deadline"))
                    else:
                        try:
                            in_flight.append((transport.read_blocks(order.peer, order.remote, order.local), order))
                        except Exception as e:
                            order.future.set_exception(TransferError(f"NIXL refused the read: {e}"))
                elif order is not None:
                    fn, fut = order
                    try:
                        fut.set_result(fn(transport))
                    except Exception as e:
                        fut.set_exception(e)
                in_flight = [item for item in in_flight if not self._progress(transport, *item)]
        finally:
            for handle, order in in_flight:
                with contextlib.suppress(Exception):
                    transport.release(handle)
                if not order.future.done():
                    order.future.set_exception(TransferError("the NIXL transport closed"))
            transport.close()

    @staticmethod
    def _progress(transport: NixlTransport, handle, order: _Read) -> bool:
        """Advance one READ; True once it is over (done, failed, or past its deadline or
        its producer's death and released). The caller hears of a READ that failed only
        once NIXL let go of it: a READ that cannot be cancelled yet (release refused) is
        kept and polled until it ends, so no write lands in blocks given back meanwhile."""
        try:
            state = transport.poll(handle)
        except Exception as e:
            state, error = "ERR", TransferError(f"NIXL read failed: {e}")
        else:
            error = None
            if state == "PENDING":
                if order.give_up is not None and order.give_up.is_set():
                    error = TransferError("NIXL read abandoned: the producer is down")
                elif time.monotonic() >= order.deadline:
                    error = TransferError("NIXL read timed out (peer gone or stalled)")
                else:
                    return False
            elif state != "DONE":
                error = TransferError(f"NIXL read ended in state {state}")
        try:
            transport.release(handle)
        except Exception as e:
            if state == "PENDING":  # still live: try again at the next poll
                log.debug("NIXL read not cancelled yet (%s): polling it until it ends", e)
                return False
        if error is None:
            order.future.set_result(None)
        else:
            order.future.set_exception(error)
        return True


class NixlConnector(PullConnector):
    """Options (kv_connector_extra_config): nixl_num_threads, nixl_max_desc_bytes,
    nixl_progress_delay_us."""

    def _register(self, kv_cache: torch.Tensor) -> None:
        extra = self.config.kv_connector_extra_config
        options = {k.removeprefix("nixl_"): v for k, v in extra.items()
                   if k in ("nixl_num_threads", "nixl_max_desc_bytes", "nixl_progress_delay_us")}
        if not kv_cache.is_cuda:
            # UCX worker threads spread GPU copies over CUDA streams; for DRAM they only
            # busy-poll beside the engine. Measured on 2 CPU cores (bench/gpu/kv_load_latency.py
            # with DEVICES=cpu,cpu): a small request's READ took 13.3 ms with 8 threads, 0.6 ms with none.
            options.setdefault("num_threads", 0)
        block_bytes = kv_cache[0].numel() * kv_cache.element_size()
        self._nixl = NixlOwnerThread(self.config.engine_id, kv_cache, block_bytes, **options)

    def _transport_metadata(self) -> bytes:
        return msgspec.msgpack.encode(NixlPeerInfo(self._nixl.metadata, self._nixl.layout))

    def _connect(self, peer: Peer) -> str:
        info = msgspec.msgpack.decode(peer.handshake.transport, type=NixlPeerInfo)
        return self._nixl.call(lambda t: t.add_peer(info.agent_metadata, info.layout), timeout_s=30)

    def _read(self, peer: Peer, job: LoadJob, remote_ids: list[int], local_ids: list[int], deadline: float) -> None:
        self._nixl.read(peer.transport, remote_ids, local_ids, deadline, job.producer_dead)

    def close(self) -> None:
        super().close()
        if getattr(self, "_nixl", None) is not None:
            self._nixl.close()
            self._nixl = None
