"""A serving node as a Ray actor: the same role service the local backend runs as a
process (`python -m prefill_node` / `decode_node`), here in the actor's worker process.

The actor binds its ZeroMQ and KV ports on the address of the Ray node it landed on (not
127.0.0.1: the router and the other nodes may be on other machines) and reports where it
is through `info()`. Ray restarts the actor when its process dies (max_restarts); the
restarted actor picks fresh ports and draws a fresh engine_id, and the launcher, which
polls `info()`, tells the router the new address. Only this module imports Ray on the
node side; the service itself knows nothing of it.

Its device comes from the GPUs Ray reserved for the actor (`get_accelerator_ids()`), never
from what torch can see: an actor that asked Ray for no GPU runs on the CPU and sees no GPU.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import msgspec

log = logging.getLogger(__name__)


class NodeActor:
    """Wrapped with `ray.remote(...)` by cluster/ray_launcher.py (options per role)."""

    def __init__(self, spec_json: str, kv_role: str | None, placement: dict[str, Any]):
        import ray

        # First, before anything imports torch or could start CUDA: which GPUs this node may see.
        device, gpu_ids = pick_device(msgspec.json.decode(spec_json)["device"])

        from engine.node_server import NodeLaunchSpec, engine_config_from_spec

        spec = msgspec.json.decode(spec_json, type=NodeLaunchSpec)
        spec.device = device
        logging.basicConfig(level=spec.log_level.upper(),
                            format=f"%(asctime)s %(levelname)s node={spec.node_id} %(name)s: %(message)s")
        ip = ray.util.get_node_ip_address()
        port, kv_port = _free_ports(ip, 2)
        if spec.model.startswith("builtin:"):  # made here, on this machine, the same bytes everywhere
            from engine.builtin_models import resolve_builtin
            spec.model = str(resolve_builtin(spec.model))
        if spec.cpu_threads:
            import torch
            torch.set_num_threads(spec.cpu_threads)
        spec.host, spec.port = ip, port
        if spec.kv_transfer is not None:
            spec.kv_transfer = {**spec.kv_transfer, "kv_ip": ip, "kv_port": kv_port,
                                "kv_buffer_device": "cpu" if spec.device == "cpu" else "cuda"}
        self.spec = spec
        self.server = server_class(spec.role)(spec.node_id, spec.role, engine_config_from_spec(spec, kv_role), ip,
                                              port)
        ctx = ray.get_runtime_context()
        self._info = {"id": spec.node_id, "role": spec.role, "address": f"tcp://{ip}:{port}", "pid": os.getpid(),
                      "placement": {"ray_node_id": ctx.get_node_id(), "ip": ip, "device": spec.device,
                                    "gpu_ids": gpu_ids, **placement},
                      "started": time.time()}
        self._thread = threading.Thread(target=self._serve, name=f"node-{spec.node_id}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            self.server.serve_forever(handle_signals=False)
        except Exception:
            log.exception("node %s: the serving loop failed", self.spec.node_id)
            os._exit(1)  # let Ray restart the actor rather than keep a node that serves nothing

    def info(self) -> dict[str, Any]:
        return {**self._info, "serving": self._thread.is_alive()}

    def drain(self, timeout_s: float) -> bool:
        """Stop as the local node stops on SIGTERM; True once the loop has exited."""
        self.server.request_stop()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()


def pick_device(requested: str) -> tuple[str, list[str]]:
    """In the actor: its torch device (device_for) and the GPUs Ray gave it. An actor given
    no GPU sees none afterwards: Ray (2.60) leaves CUDA_VISIBLE_DEVICES unset for it, so it
    would see every GPU of its machine, and torch, NCCL or UCX could touch one that Ray gave
    to another actor. CUDA reads the variable at its first use, which is later."""
    import ray

    gpu_ids = [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
    device = device_for(requested, gpu_ids, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if not gpu_ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return device, gpu_ids


def device_for(requested: str, gpu_ids: list[str], visible: str | None) -> str:
    """The torch device of a node whose actor Ray gave the GPUs `gpu_ids` (Ray's ids, from
    `get_accelerator_ids()`), in a process whose CUDA_VISIBLE_DEVICES is `visible`.

    `auto`: the first GPU Ray gave it, else `cpu` -- never a GPU Ray did not reserve for this
    actor (another actor may have it). `cpu`: cpu. An explicit `cuda:N` (the config refuses
    it with backend ray; a hand-made spec may carry it) is refused unless Ray gave the
    actor GPU N of its machine.
    """
    if requested == "cpu" or (requested == "auto" and not gpu_ids):
        return "cpu"
    if requested == "auto":
        wanted = gpu_ids[0]
    elif requested.startswith("cuda:") and requested[5:] in gpu_ids:
        wanted = requested[5:]
    else:
        raise RuntimeError(f"device {requested}: Ray reserved {'GPUs ' + ', '.join(gpu_ids) if gpu_ids else 'no GPU'} "
                           "for this node: ask Ray for GPUs in the role's resources (e.g. {GPU: 1}) and leave "
                           "devices at auto")
    # Ray normally narrows CUDA_VISIBLE_DEVICES to the actor's GPUs (then its first one is
    # cuda:0); with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES it does not, and torch's
    # ordinals index whatever the variable lists (or every GPU, when it is unset).
    order = [d.strip() for d in visible.split(",")] if visible is not None else None
    if order is None:
        return f"cuda:{int(wanted)}"
    if wanted not in order:
        raise RuntimeError(f"Ray gave this node GPU {wanted}, but CUDA_VISIBLE_DEVICES={visible!r} hides it")
    return f"cuda:{order.index(wanted)}"


def server_class(role: str):
    """The role's NodeServer, as `python -m prefill_node` / `decode_node` run it."""
    if role == "prefill":
        from prefill_node.service import PrefillNodeServer
        return PrefillNodeServer
    from decode_node.service import ColocatedNodeServer, DecodeNodeServer
    return ColocatedNodeServer if role == "both" else DecodeNodeServer


def _free_ports(ip: str, n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
            s.bind((ip, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
