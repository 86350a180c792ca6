"""KV between GPU processes of one host through CUDA IPC: the consumer maps the producer's
KV cache into its own address space once, at handshake, and copies blocks device to
device (cudaMemcpy; NVLink/PCIe peer copies between GPUs, a plain device copy when both
processes share one GPU).

Why beside NIXL: UCX reads GPU memory of another process with cuda_ipc only over NVLink
peers; between two processes on the SAME GPU it falls back to TCP software emulation,
measured at 0.47 GB/s on an H200 (bench/results/2026-12-01b-h200) — a 4k-token 8B prompt
then takes over a second to move. One GPU shared by a prefill and a decode process (small
models, MPS, tests) needs this path; across GPUs NIXL is the default and this is an
alternative to measure against.

The pull protocol (handshake, streamed progress, release, checksums) is PullConnector's.
The handshake carries torch's IPC handle of the KV storage (plain bytes and integers, the
fields torch.multiprocessing sends; never a pickle) and the host's boot id: a consumer on
another host refuses at once with a message that names nixl or tcp instead.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import torch

from kv_connector.pull_connector import LoadJob, Peer, PullConnector, TransferError


class IpcHandle(msgspec.Struct):
    """torch's CUDA IPC description of one storage (UntypedStorage._share_cuda_())."""
    boot_id: str
    device: int
    handle: bytes
    storage_bytes: int
    offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    shape: list[int]
    dtype: str


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _runs(remote: list[int], local: list[int]) -> list[tuple[int, int, int]]:
    """(remote start, local start, length) of runs consecutive on both sides."""
    runs: list[tuple[int, int, int]] = []
    for r, l in zip(remote, local):
        if runs and runs[-1][0] + runs[-1][2] == r and runs[-1][1] + runs[-1][2] == l:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((r, l, 1))
    return runs


class CudaIpcConnector(PullConnector):
    def _register(self, kv_cache: torch.Tensor) -> None:
        if not kv_cache.is_cuda:
            raise ValueError("the cuda_ipc KV connector needs the KV cache on a CUDA GPU: on CPU nodes use "
                             "kv_transfer.connector nixl or tcp")
        if kv_cache.storage_offset() != 0 or not kv_cache.is_contiguous():
            raise ValueError("the cuda_ipc KV connector needs the KV cache as one contiguous tensor")
        self._handle_bytes = b""
        if self.config.is_producer:
            (device, handle, size, offset, rc_handle, rc_offset, ev_handle,
             ev_sync) = kv_cache.untyped_storage()._share_cuda_()
            self._handle_bytes = msgspec.msgpack.encode(IpcHandle(
                _boot_id(), int(device), bytes(handle), int(size), int(offset), bytes(rc_handle), int(rc_offset),
                bytes(ev_handle or b""), bool(ev_sync), list(kv_cache.shape), str(kv_cache.dtype).removeprefix("torch.")))

    def _transport_metadata(self) -> bytes:
        return self._handle_bytes

    def _connect(self, peer: Peer) -> torch.Tensor:
        try:
            h = msgspec.msgpack.decode(peer.handshake.transport, type=IpcHandle)
        except msgspec.DecodeError as e:
            raise TransferError(f"the producer at {peer.host}:{peer.port} did not send a CUDA IPC handle "
                                f"(is it running the cuda_ipc connector?): {e}") from e
        if h.boot_id != _boot_id():
            raise TransferError(f"the producer at {peer.host}:{peer.port} runs on another host: CUDA IPC works "
                                "within one host only; use kv_transfer.connector nixl (or tcp) across hosts")
        if h.dtype != str(self.kv_cache.dtype).removeprefix("torch.") or h.shape[1:] != list(self.kv_cache.shape[1:]):
            raise TransferError(f"the producer's KV cache is {h.dtype} {h.shape}, this one "
                                f"{self.kv_cache.dtype} {list(self.kv_cache.shape)}")
        storage = torch.UntypedStorage._new_shared_cuda(
            h.device, h.handle, h.storage_bytes, h.offset_bytes, h.ref_counter_handle, h.ref_counter_offset,
            h.event_handle or None, h.event_sync_required)
        remote = torch.empty(0, dtype=self.kv_cache.dtype, device=torch.device("cuda", h.device))
        remote.set_(storage, 0, h.shape)
        return remote

    def _read(self, peer: Peer, job: LoadJob, remote_ids: list[int], local_ids: list[int], deadline: float) -> None:
        remote: torch.Tensor = peer.transport
        with self.side_stream():
            for r, l, n in _runs(remote_ids, local_ids):
                self.kv_cache[l:l + n].copy_(remote[r:r + n], non_blocking=True)
            # Complete before the load is reported done (and before the producer may reuse them).
            torch.cuda.current_stream(self.kv_cache.device).synchronize()
