"""KV over plain ZeroMQ/TCP: for hosts without UCX, and proof that the connector
interface is pluggable. The producer's service thread sends the held blocks' bytes; the
consumer copies them into its blocks. One copy through host memory each way — fine on
CPUs, slow for GPUs (use nixl there)."""

from __future__ import annotations

import time

import torch

from kv_connector import messages as m
from kv_connector.pull_connector import LoadJob, Peer, PullConnector, TransferError
from kv_connector.producer_service import ServiceError, call


class TcpConnector(PullConnector):
    def _serve_read(self, msg: m.ReadRequest) -> list[bytes]:
        # Only blocks of a request still held may be read: anything else may be reused.
        # (or computed already, for a streamed pull).
        problem = self.ledger.readable(msg.request_id, msg.block_ids)
        if problem is not None:
            return [m.encode(m.ErrorResponse(problem))]
        with self.side_stream():
            blocks = self.kv_cache[torch.tensor(msg.block_ids, device=self.kv_cache.device)].cpu()  # (n, ...) gathered
        return [b"ok", blocks.view(torch.uint8).numpy().tobytes()]

    def _read(self, peer: Peer, job: LoadJob, remote_ids: list[int], local_ids: list[int], deadline: float) -> None:
        timeout = max(deadline - time.monotonic(), 0.01)
        try:
            frames = call(peer.host, peer.port, m.ReadRequest(job.remote_request_id, remote_ids), timeout,
                          job.producer_dead)
        except ServiceError as e:
            raise TransferError(str(e)) from e
        if frames[0] != b"ok":
            raise TransferError(f"TCP read refused: {m.decode_response(frames[0])}")
        data = frames[1]
        expected = len(local_ids) * self.block_bytes
        if len(data) != expected:
            raise TransferError(f"TCP read returned {len(data)} bytes, expected {expected}")
        src = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(self.kv_cache.dtype)
        src = src.view(len(local_ids), *self.kv_cache.shape[1:])
        with self.side_stream():  # the consumer's checksums run on this stream after the copy
            self.kv_cache[torch.tensor(local_ids, device=self.kv_cache.device)] = src.to(self.kv_cache.device)
            if self.kv_cache.is_cuda:  # landed before the load is reported done (checksums may be off)
                torch.cuda.current_stream().synchronize()
