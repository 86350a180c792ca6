"""An engine in a child process, driven over a pipe with msgspec-encoded commands.

Tests use it to put a producer and a consumer engine in separate processes (real NIXL or
TCP transfers between them) before the node services exist to do it. Commands and
replies are msgpack, never pickle.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from typing import Any

import msgspec


def _engine(spec: dict[str, Any]):
    from engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from engine.llm_engine import LLMEngine
    from kv_connector.config import KVTransferConfig

    kv = KVTransferConfig(**spec["kv_transfer"]) if spec.get("kv_transfer") else None
    return LLMEngine(EngineConfig(model=spec["model"], dtype="float32", device="cpu",
                                  cache=CacheConfig(block_size=spec.get("block_size", 4),
                                                    num_blocks=spec.get("num_blocks", 128)),
                                  scheduler=SchedulerConfig(max_num_batched_tokens=spec.get("budget", 2048),
                                                            max_num_seqs=spec.get("max_num_seqs", 256)),
                                  kv_transfer=kv))


def _run(engine, requests: list[dict[str, Any]], timeout_s: float, step_delay_s: float = 0.0) -> dict[str, Any]:
    """Add each request at its `add_at_step` and step until all finish. Reports tokens,
    and for every token the step it came out of. `step_delay_s` stands for a slower
    device: a pause after every step that ran the model."""
    from engine.sampling_params import SamplingParams

    pending = sorted(requests, key=lambda r: r.get("add_at_step", 0))
    results: dict[str, dict[str, Any]] = {}
    step = 0
    deadline = time.monotonic() + timeout_s
    while pending or engine.has_unfinished_requests:
        while pending and pending[0].get("add_at_step", 0) <= step:
            r = pending.pop(0)
            engine.add_request(r["id"], r["prompt"], SamplingParams.from_dict(r["params"]),
                               output_token_ids=r.get("output_token_ids"),
                               kv_transfer_params=r.get("kv_transfer_params"))
            results[r["id"]] = {"added_at_step": step, "steps": [], "tokens": [], "finished": False}
        for out in engine.step():
            res = results[out.request_id]
            res["tokens"] += out.new_token_ids
            res["steps"] += [step] * len(out.new_token_ids)
            if out.finished:
                res.update(finished=True, token_ids=list(out.outputs[0].token_ids), text=out.outputs[0].text,
                           finish_reason=out.outputs[0].finish_reason, error=out.error,
                           kv_transfer_params=out.kv_transfer_params, prompt_token_ids=out.prompt_token_ids)
        if engine.idle:
            time.sleep(0.002)
        elif step_delay_s:
            time.sleep(step_delay_s)
        step += 1
        if time.monotonic() > deadline:
            raise TimeoutError(f"requests still unfinished after {timeout_s}s: {[r for r in results if not results[r]['finished']]}")
    return results


def _stats(engine) -> dict[str, Any]:
    from dataclasses import asdict

    out = asdict(engine.stats())
    out["num_tokens_computed"] = engine.num_tokens_computed
    out["ref_counts_zero"] = all(rc == 0 for rc in engine.pool.ref_counts)
    if engine.connector is not None and hasattr(engine.connector, "service") and engine.connector.service:
        out["service_port"] = engine.connector.service.port
    if engine.connector is not None:
        out["kv_engine_id"] = engine.connector.config.engine_id
    return out


def worker_main(conn, spec: dict[str, Any]) -> None:
    try:
        engine = _engine(spec)
        conn.send_bytes(msgspec.msgpack.encode({"ok": True, "stats": _stats(engine)}))
    except Exception:
        conn.send_bytes(msgspec.msgpack.encode({"ok": False, "error": traceback.format_exc()}))
        return
    while True:
        cmd = msgspec.msgpack.decode(conn.recv_bytes())
        try:
            op = cmd["op"]
            if op == "exit":
                engine.close()
                conn.send_bytes(msgspec.msgpack.encode({"ok": True}))
                return
            if op == "run":
                reply = {"ok": True, "results": _run(engine, cmd["requests"], cmd.get("timeout_s", 120),
                                                     cmd.get("step_delay_s", 0.0))}
            elif op == "tick":  # let background work (lease expiry, releases) land
                end = time.monotonic() + cmd["seconds"]
                while time.monotonic() < end:
                    engine.step()
                    time.sleep(0.01)
                reply = {"ok": True}
            elif op == "set_faults":
                engine.connector.set_fault_injection(cmd["faults"])
                reply = {"ok": True}
            elif op == "tokenize":
                reply = {"ok": True, "token_ids": [engine.tokenizer.encode(t) for t in cmd["texts"]]}
            elif op == "stats":
                reply = {"ok": True}
            else:
                reply = {"ok": False, "error": f"unknown op {op}"}
            reply["stats"] = _stats(engine)
        except Exception:
            reply = {"ok": False, "error": traceback.format_exc()}
        conn.send_bytes(msgspec.msgpack.encode(reply))


class EngineProcess:
    """The parent's handle: `call(op=..., ...)` sends a command and waits for the reply."""

    def __init__(self, spec: dict[str, Any], start_timeout_s: float = 120):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, spec), daemon=True)
        self.proc.start()
        child.close()
        self.ready = self._recv(start_timeout_s)

    def _recv(self, timeout_s: float) -> dict[str, Any]:
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"engine process did not answer within {timeout_s}s")
        reply = msgspec.msgpack.decode(self.conn.recv_bytes())
        if not reply.get("ok"):
            raise RuntimeError(f"engine process error:\n{reply.get('error')}")
        return reply

    def send(self, **cmd) -> None:
        self.conn.send_bytes(msgspec.msgpack.encode(cmd))

    def recv(self, timeout_s: float = 180) -> dict[str, Any]:
        return self._recv(timeout_s)

    def call(self, timeout_s: float = 180, **cmd) -> dict[str, Any]:
        self.send(**cmd)
        return self._recv(timeout_s)

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=10)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.call(op="exit", timeout_s=10)
            except Exception:
                pass
        self.kill()
