"""KV block transfer bandwidth: a NIXL READ between two processes vs torch's peer copy.

Two processes, each holding the engine's KV layout (num_blocks, num_layers, 2, block_size,
num_kv_heads, head_dim) for the Llama-3-8B shape (32 layers, 8 KV heads, head_dim 128,
bf16, block_size 16: 2 MiB per block) filled with random bytes: the producer on cuda:0, the
consumer on cuda:1. The consumer handshakes over ZeroMQ (kv_connector.handshake), adds the
producer as a NIXL peer and pulls one 4k-token request (256 blocks, 512 MiB) into its own
blocks 1..256, with the producer's block ids

    contiguous   one run            -> NIXL merges it into 1 descriptor of 512 MiB
    runs16       16 runs of 16      -> 16 descriptors of 32 MiB (a fragmented pool)
    scattered    256 lone blocks    -> 256 descriptors of 2 MiB (worst case)

Each READ is timed end to end from the consumer's host (read_blocks + polling to DONE,
notification included), after warm-up; the median is reported. Before timing, each
pattern is checked: the consumer's cache is poisoned, one READ runs, and the received
blocks' sha256 must equal the producer's while every other block keeps the poison.

The reference is torch's peer copy: 1 GiB cuda:0 -> cuda:1 in one process, CUDA events,
median. Goal (ARCHITECTURE.md §4): NIXL >= 0.85 x peer copy.

Variants (`--variants`) rerun the pair with other UCX settings, one spec per variant:
`name` or `name:threads=4,split=16,UCX_SOME_VAR=value` (threads/split are the NIXL UCX
backend's num_threads/split_batch_size; other keys become environment variables of both
processes).

    python bench/gpu/kv_transfer_bench.py                      # GPU: cuda:0 -> cuda:1
    python bench/gpu/kv_transfer_bench.py --device cpu         # CPU smoke test (DRAM, smaller)

Prints a table last and writes $OUT/kv_transfer.json (and the processes' logs to
$OUT/kv_transfer_logs.txt) when OUT is set.

Measured 2026-11-23 on 2x H200 (NV18), nixl_cu13 1.5.1, torch 2.11+cu130, with
`bash bench/gpu/run_kv_transfer.sh` (device kind nvidia-h200-x2): torch peer copy 394 GB/s;
NIXL READ with NixlTransport's defaults (8 UCX threads, runs cut at 32 MiB), two runs:
contiguous 316/320 GB/s (0.80/0.81), runs16 334/324 (0.85/0.82), scattered 216/213
(0.55/0.54); without threads or cutting: 250 / 245 / 163. Every READ bit-exact, every
notification delivered. The copy-engine reference explains the rest: one pull copy of
512 MiB 393 GB/s, 16 x 32 MiB pulls on 8 streams 361, 256 x 2 MiB pulls 135 (1 stream) /
177 (8 streams), pushes 266. kv_connector/nixl_transport.py draws the conclusions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

# Llama-3-8B KV shape.
NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
# NixlTransport's defaults twice (the second run shows the spread), the first call's plain setup
# (no threads, no chunking), then sweeps of UCX worker threads and descriptor size (MiB).
DEFAULT_VARIANTS = ["default", "repeat", "nothreads:threads=0,chunk=none", "t4c32:threads=4,split=4,chunk=32",
                    "t8c8:threads=8,chunk=8", "t8c16:threads=8,chunk=16", "t8c64:threads=8,chunk=64",
                    "t16c32:threads=16,split=16,chunk=32"]
POISON = 0x5A
TARGET_RATIO = 0.85


def kv_shape(num_blocks: int) -> tuple[int, ...]:
    return (num_blocks, NUM_LAYERS, 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)


def block_bytes() -> int:
    return NUM_LAYERS * 2 * BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize


def compat():
    from kv_connector.handshake import KVCompat

    return KVCompat(model_name="llama-3-8b-shape", dtype="bfloat16", block_size=BLOCK_SIZE, num_layers=NUM_LAYERS,
                    num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, kv_layout="NL2BHD")


def plans(num_blocks: int, n: int, seed: int = 0) -> dict[str, list[int]]:
    """Producer block ids per pattern (the consumer always reads into its blocks 1..n)."""
    rng = np.random.default_rng(seed)
    if n + 1 > num_blocks or 2 * n > num_blocks:
        raise SystemExit(f"--num-blocks {num_blocks} is too small for {n}-block requests (need >= {2 * n})")
    start = num_blocks // 3
    out = {"contiguous": list(range(start, start + n))}
    runs = max(1, n // 16)
    slots = rng.choice(num_blocks // 16, runs, replace=False)
    out["runs16"] = [int(s) * 16 + i for s in slots for i in range(16)][:n]
    # Even ids only, random order: no two requested blocks are adjacent, so nothing merges.
    out["scattered"] = [int(b) for b in rng.choice(np.arange(0, num_blocks, 2), n, replace=False)]
    return out


def parse_variant(spec: str) -> dict:
    """`name[:key=value,...]`: threads, split (UCX num_threads, split_batch_size), chunk (max descriptor
    MiB, or none); other keys are environment variables. Unnamed settings keep NixlTransport's defaults."""
    name, _, rest = spec.partition(":")
    v = {"name": name, "transport": {}, "env": {}}
    for item in filter(None, rest.split(",")):
        key, _, val = item.partition("=")
        if key == "threads":
            v["transport"]["num_threads"] = int(val)
        elif key == "split":
            v["transport"]["split_batch_size"] = int(val)
        elif key == "chunk":
            v["transport"]["max_desc_bytes"] = None if val == "none" else int(val) << 20
        else:
            v["env"][key] = val
    return v


def device_for(args) -> torch.device:
    if args.device == "cpu":
        return torch.device("cpu")
    torch.cuda.set_device(args.device_index)
    return torch.device("cuda", args.device_index)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def digest(kv_u8: torch.Tensor, ids: list[int]) -> str:
    """sha256 of the given blocks' bytes, in order."""
    h = hashlib.sha256()
    for i in range(0, len(ids), 64):  # bounded host memory
        h.update(kv_u8[ids[i:i + 64]].contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def random_kv(num_blocks: int, dev: torch.device, seed: int) -> torch.Tensor:
    kv = torch.empty(kv_shape(num_blocks), dtype=DTYPE, device=dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    kv.view(torch.int32).random_(generator=gen)  # random bit patterns; never time on zeros
    return kv


def wait_for_file(path: Path, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s} s")
        time.sleep(0.02)
    return path.read_text()


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.rename(path)


# ---------------------------------------------------------------------------- producer
def run_producer(args) -> None:
    from kv_connector.handshake import HandshakeResponse, HandshakeServer
    from kv_connector.nixl_transport import NixlTransport

    v = parse_variant(args.variant)
    dev = device_for(args)
    work = Path(args.workdir)
    kv = random_kv(args.num_blocks, dev, seed=1)
    sync(dev)
    transport = NixlTransport(f"bench-producer-{os.getpid()}", **v["transport"])
    layout = transport.register_kv_cache(kv, block_bytes())
    kv_u8 = kv.view(torch.uint8)
    digests = {p: digest(kv_u8, ids) for p, ids in plans(args.num_blocks, args.request_blocks).items()}
    write_atomic(work / "digests.json", json.dumps(digests))
    c = compat()
    server = HandshakeServer(HandshakeResponse(engine_id="bench-producer", agent_metadata=transport.agent_metadata(),
                                               layout=layout, compat=c, compat_hash=c.fingerprint()),
                             "127.0.0.1", 0)
    write_atomic(work / "port", str(server.start()))
    received = 0
    deadline = time.monotonic() + args.timeout
    done = False
    while not done and time.monotonic() < deadline:
        for msgs in transport.get_notifs().values():
            received += sum(1 for m in msgs if m.startswith(b"bench:"))
            done = done or b"bye" in msgs
        time.sleep(0.001)
    write_atomic(work / "producer.json", json.dumps({"notifs_received": received, "saw_bye": done}))
    server.stop()
    transport.close()


# ---------------------------------------------------------------------------- consumer
def run_consumer(args) -> None:
    from kv_connector.handshake import check_compat, fetch_handshake
    from kv_connector.nixl_transport import NixlTransport

    v = parse_variant(args.variant)
    dev = device_for(args)
    work = Path(args.workdir)
    kv = torch.empty(kv_shape(args.num_blocks), dtype=DTYPE, device=dev)
    kv_u8 = kv.view(torch.uint8)  # (num_blocks, ..., head_dim * 2)
    transport = NixlTransport(f"bench-consumer-{os.getpid()}", **v["transport"])
    transport.register_kv_cache(kv, block_bytes())
    port = int(wait_for_file(work / "port", args.timeout))
    reply = fetch_handshake("127.0.0.1", port, timeout_s=30, engine_id="bench-consumer")
    problem = check_compat(compat(), reply.compat)
    if problem:
        raise SystemExit(problem)
    peer = transport.add_peer(reply.agent_metadata, reply.layout)
    expected = json.loads(wait_for_file(work / "digests.json", args.timeout))
    n = args.request_blocks
    local_ids = list(range(1, 1 + n))
    others = torch.tensor([b for b in range(args.num_blocks) if not 1 <= b <= n], device=dev)
    results = []
    sent = 0
    for pattern, remote_ids in plans(args.num_blocks, n).items():
        # Exactness: poison, one READ, compare digests, check nothing else was written.
        kv_u8.fill_(POISON)
        sync(dev)
        h = transport.read_blocks(peer, remote_ids, local_ids, notif=f"bench:{pattern}:check".encode())
        transport.wait(h)
        transport.release(h)
        sent += 1
        sync(dev)
        bytes_ok = digest(kv_u8, local_ids) == expected[pattern]
        untouched_ok = bool((kv_u8[others] == POISON).all())
        # Timing: read_blocks (validate + make_prepped_xfer + post) then poll to DONE.
        post_s, total_s = [], []
        for i in range(args.warmup + args.iters):
            t0 = time.perf_counter()
            h = transport.read_blocks(peer, remote_ids, local_ids, notif=f"bench:{pattern}:{i}".encode())
            t1 = time.perf_counter()
            transport.wait(h)
            t2 = time.perf_counter()
            transport.release(h)
            sent += 1
            if i >= args.warmup:
                post_s.append(t1 - t0)
                total_s.append(t2 - t0)
        nbytes = h.nbytes
        med = statistics.median(total_s)
        qs = statistics.quantiles(total_s, n=10) if len(total_s) >= 2 else [med] * 9
        results.append({
            "variant": v["name"], "pattern": pattern, "blocks": n, "bytes": nbytes, "num_descs": h.num_descs,
            "median_ms": med * 1e3, "gbps": nbytes / med / 1e9,
            "gbps_p10": nbytes / qs[8] / 1e9, "gbps_p90": nbytes / qs[0] / 1e9,
            "post_us_median": statistics.median(post_s) * 1e6, "iters": len(total_s),
            "bytes_identical": bytes_ok, "untouched_ok": untouched_ok,
        })
        print(f"[consumer] {v['name']:>10} {pattern:>10}: {results[-1]['gbps']:.1f} GB/s, descs {h.num_descs}, "
              f"ok={bytes_ok and untouched_ok}", flush=True)
    transport.send_notif(peer, b"bye")
    write_atomic(work / "consumer.json", json.dumps({"results": results, "notifs_sent": sent}))
    time.sleep(0.2)  # let the notification leave before the agent goes
    transport.close()


# ---------------------------------------------------------------------------- orchestrator
def peer_copy_gbps(args) -> dict:
    """Reference bandwidth: torch copy of 1 GiB (cuda:0 -> cuda:1, or DRAM -> DRAM on CPU)."""
    nbytes = args.peer_copy_mib << 20
    if args.device == "cpu":
        src = torch.empty(nbytes, dtype=torch.uint8).random_()
        dst = torch.empty_like(src)
        times = []
        for i in range(args.warmup + args.iters):
            t0 = time.perf_counter()
            dst.copy_(src)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        ok = torch.equal(src, dst)
        return {"what": f"torch copy DRAM->DRAM, {args.peer_copy_mib} MiB, one process", "bytes": nbytes,
                "median_ms": statistics.median(times) * 1e3, "gbps": nbytes / statistics.median(times) / 1e9,
                "bytes_identical": ok}
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0").random_()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
    times = []
    with torch.cuda.device(0):  # torch copies between devices on the source device's current stream
        for i in range(args.warmup + max(args.iters, 20)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            if i >= args.warmup:
                times.append(start.elapsed_time(end) / 1e3)
    torch.cuda.synchronize(1)
    ok = torch.equal(src.to("cuda:1"), dst)
    med = statistics.median(times)
    out = {"what": f"torch copy cuda:0 -> cuda:1, {args.peer_copy_mib} MiB, CUDA events", "bytes": nbytes,
           "median_ms": med * 1e3, "gbps": nbytes / med / 1e9, "bytes_identical": ok,
           "p2p_access": torch.cuda.can_device_access_peer(1, 0)}
    del src, dst
    torch.cuda.empty_cache()
    return out


def copy_engine_reference(args) -> dict:
    """Diagnostics, one process: cudaMemcpyAsync of the same bytes, pulled (issued on cuda:1, like a
    NIXL READ over CUDA IPC) or pushed (issued on cuda:0, like torch's peer copy), as one copy or as
    per-block 2 MiB copies, on one or several streams. Needs cupy; skipped without it."""
    try:
        import cupy as cp
    except Exception as e:  # an optional diagnostic
        return {"skipped": f"cupy unavailable: {e}"}
    n, bb = args.request_blocks, block_bytes()
    src = torch.empty((2 * n, bb), dtype=torch.uint8, device="cuda:0").random_()
    dst = torch.empty((n, bb), dtype=torch.uint8, device="cuda:1")
    torch.cuda.synchronize(0)  # cupy's streams do not wait for torch's
    for dev, peer in ((1, 0), (0, 1)):
        with cp.cuda.Device(dev):
            try:
                cp.cuda.runtime.deviceEnablePeerAccess(peer)
            except cp.cuda.runtime.CUDARuntimeError:
                pass  # already enabled
    scattered = [2 * i for i in range(n)]
    cases = {
        "pull 1 copy": (1, [(0, 0, n)]),
        "pull 16x32MiB, 8 streams": (8, [(16 * i, 16 * i, 16) for i in range(n // 16)]),
        "pull 256x2MiB scattered, 1 stream": (1, [(s, i, 1) for i, s in enumerate(scattered)]),
        "pull 256x2MiB scattered, 8 streams": (8, [(s, i, 1) for i, s in enumerate(scattered)]),
        "push 256x2MiB scattered, 1 stream": (1, [(s, i, 1) for i, s in enumerate(scattered)]),
        "push 256x2MiB scattered, 8 streams": (8, [(s, i, 1) for i, s in enumerate(scattered)]),
    }
    out = {}
    for name, (num_streams, copies) in cases.items():
        dev = 0 if name.startswith("push") else 1
        with cp.cuda.Device(dev):
            main = cp.cuda.Stream(non_blocking=True)
            streams = [cp.cuda.Stream(non_blocking=True) for _ in range(num_streams)]
            times = {"gpu": [], "with_enqueue": []}
            for it in range(2 * (3 + 20)):
                gated = it % 2 == 0
                if gated:  # a ~5 ms spin first, so all copies are queued before the clock starts
                    with torch.cuda.stream(torch.cuda.ExternalStream(main.ptr, device=torch.device("cuda", dev))):
                        torch.cuda._sleep(10_000_000)
                start, end = cp.cuda.Event(), cp.cuda.Event()
                start.record(main)
                for st in streams:
                    st.wait_event(start)
                for k, (s_blk, d_blk, cnt) in enumerate(copies):
                    cp.cuda.runtime.memcpyAsync(dst.data_ptr() + d_blk * bb, src.data_ptr() + s_blk * bb, cnt * bb,
                                                cp.cuda.runtime.memcpyDefault, streams[k % num_streams].ptr)
                for st in streams:
                    ev = cp.cuda.Event()
                    ev.record(st)
                    main.wait_event(ev)
                end.record(main)
                end.synchronize()
                if it >= 6:
                    times["gpu" if gated else "with_enqueue"].append(cp.cuda.get_elapsed_time(start, end) / 1e3)
        out[name] = {k: n * bb / statistics.median(v) / 1e9 for k, v in times.items()}
    del src, dst
    torch.cuda.empty_cache()
    return out


def run_pair(args, spec: str, log_parts: list[str]) -> tuple[list[dict], dict]:
    v = parse_variant(spec)
    work = Path(tempfile.mkdtemp(prefix=f"kvbench-{v['name']}-"))
    env = os.environ.copy()  # keeps the machine's required variables (e.g. NCCL_NVLS_ENABLE=0)
    env.update(v["env"])
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    common = ["--device", args.device, "--num-blocks", str(args.num_blocks), "--request-blocks",
              str(args.request_blocks), "--iters", str(args.iters), "--warmup", str(args.warmup), "--timeout",
              str(args.timeout), "--workdir", str(work), "--variant", spec]
    procs = {}
    for role, idx in (("producer", 0), ("consumer", 1)):
        log = open(work / f"{role}.log", "w")
        procs[role] = (subprocess.Popen([sys.executable, __file__, "--role", role, "--device-index", str(idx), *common],
                                        env=env, stdout=log, stderr=subprocess.STDOUT), log)
    status = {}
    try:
        deadline = time.monotonic() + args.timeout + 60
        for role in ("consumer", "producer"):
            proc, _ = procs[role]
            try:
                status[role] = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                status[role] = "timeout"
    finally:
        for role, (proc, log) in procs.items():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
            log_parts.append(f"===== variant {v['name']} {role} (exit {status.get(role)}) =====\n"
                             + (work / f"{role}.log").read_text(errors="replace"))
    consumer = json.loads((work / "consumer.json").read_text()) if (work / "consumer.json").exists() else {}
    producer = json.loads((work / "producer.json").read_text()) if (work / "producer.json").exists() else {}
    info = {"variant": v, "exit": status, "notifs_sent": consumer.get("notifs_sent"),
            "notifs_received": producer.get("notifs_received")}
    if not consumer:
        print(f"variant {v['name']} failed (exit codes {status}); logs:\n" + "\n".join(log_parts[-2:])[-4000:],
              flush=True)
    return consumer.get("results", []), info


def read_protocols(log: str) -> list[str]:
    """The UCX_PROTO_INFO tables for RMA reads (ucp_get), timestamps stripped, each once."""
    lines = [ln.split("]", 2)[-1] for ln in log.splitlines()]
    out: list[str] = []
    for i, ln in enumerate(lines):
        if "read by ucp_get" in ln:
            table = lines[i:i + 8]
            out += [t for t in table if t not in out]
    return out[:40]


def orchestrate(args) -> int:
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    from kv_connector import nixl_compat

    env = {"python": platform.python_version(), "torch": torch.__version__, "nixl_module": nixl_compat.NIXL_MODULE_NAME,
           "device": args.device}
    if args.device == "cuda":
        if torch.cuda.device_count() < 2:
            raise SystemExit(f"needs two GPUs, found {torch.cuda.device_count()}: "
                             "run with --device cpu for a smoke test")
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(2)]
    print(f"env: {env}", flush=True)
    peer = peer_copy_gbps(args)
    print(f"reference: {peer['what']}: {peer['gbps']:.1f} GB/s (bytes identical: {peer['bytes_identical']})",
          flush=True)
    try:
        ce = copy_engine_reference(args) if args.device == "cuda" else {"skipped": "cpu"}
    except Exception as e:  # a diagnostic only: report and go on to the NIXL runs
        ce = {"skipped": f"failed: {e!r}"}
        print(f"copy-engine reference failed: {e!r}", flush=True)
    rows, variants, logs = [], [], []
    for spec in args.variants:
        res, info = run_pair(args, spec, logs)
        rows += res
        variants.append(info)
    for r in rows:
        r["ratio_to_peer_copy"] = r["gbps"] / peer["gbps"]
    report = {"env": env, "config": {"num_blocks": args.num_blocks, "request_blocks": args.request_blocks,
                                     "block_bytes": block_bytes(), "iters": args.iters, "warmup": args.warmup},
              "peer_copy": peer, "copy_engine_reference": ce, "variants": variants, "results": rows}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "kv_transfer.json").write_text(json.dumps(report, indent=2))
        (out_dir / "kv_transfer_logs.txt").write_text("\n".join(logs)[-8_000_000:])
    ok = all(r["bytes_identical"] and r["untouched_ok"] for r in rows) and len(rows) == 3 * len(args.variants)
    print(f"\nKV transfer, {args.request_blocks} blocks x {block_bytes() / 2**20:.0f} MiB per READ, median of "
          f"{args.iters} after {args.warmup} warm-up; reference {peer['gbps']:.1f} GB/s ({peer['what']})")
    print(f"{'variant':>10} {'pattern':>10} {'descs':>5} {'ms':>7} {'GB/s':>7} {'p10-p90 GB/s':>15} {'ratio':>6} "
          f"{'post us':>8} {'exact':>5}")
    for r in rows:
        print(f"{r['variant']:>10} {r['pattern']:>10} {r['num_descs']:>5} {r['median_ms']:>7.3f} {r['gbps']:>7.1f} "
              f"{r['gbps_p10']:>7.1f}-{r['gbps_p90']:<7.1f} {r['ratio_to_peer_copy']:>6.2f} "
              f"{r['post_us_median']:>8.0f} "
              f"{'yes' if r['bytes_identical'] and r['untouched_ok'] else 'NO':>5}")
    if "skipped" not in ce:
        print(f"copy-engine reference, same {args.request_blocks} blocks by cudaMemcpyAsync in one process (cupy), "
              "GB/s: GPU time (copies queued first) / including the host's enqueueing")
        for name, r in ce.items():
            print(f"  {name:<36} {r['gpu']:7.1f} / {r['with_enqueue']:7.1f}  ratio {r['gpu'] / peer['gbps']:.2f}")
    for info in variants:
        print(f"variant {info['variant']['name']} {info['variant']['transport'] or ''}: exits {info['exit']}, "
              f"notifications sent {info['notifs_sent']}, "
              f"received {info['notifs_received']}")
    proto = read_protocols("\n".join(logs))
    if proto:
        print("UCX protocols chosen for READ (UCX_PROTO_INFO, first variant):\n" + "\n".join(proto))
    print(f"goal: ratio >= {TARGET_RATIO}; all bytes identical: {ok}")
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks per process (cuda 2048, cpu 192)")
    p.add_argument("--request-blocks", type=int, default=None, help="blocks per READ (cuda 256 = 4k tokens, cpu 64)")
    p.add_argument("--iters", type=int, default=None, help="timed READs per pattern (cuda 50, cpu 8)")
    p.add_argument("--warmup", type=int, default=None, help="untimed READs first (cuda 5, cpu 2)")
    p.add_argument("--peer-copy-mib", type=int, default=1024)
    p.add_argument("--variants", nargs="+", default=None,
                   help=f"variant specs (default: {' '.join(DEFAULT_VARIANTS)}; cpu: default)")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds a producer/consumer pair may take")
    p.add_argument("--role", choices=["orchestrator", "producer", "consumer"], default="orchestrator",
                   help=argparse.SUPPRESS)
    p.add_argument("--device-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    args = p.parse_args()
    gpu = args.device == "cuda"
    args.num_blocks = args.num_blocks or (2048 if gpu else 192)
    args.request_blocks = args.request_blocks or (256 if gpu else 64)
    args.iters = args.iters or (50 if gpu else 8)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    args.variants = args.variants or (DEFAULT_VARIANTS if gpu else ["default"])
    if args.role == "producer":
        run_producer(args)
        return 0
    if args.role == "consumer":
        run_consumer(args)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
