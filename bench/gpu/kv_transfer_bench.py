"""KV block transfer bandwidth: NIXL READs between two processes, variants side by side, vs torch's peer copy.

Two processes hold the engine's KV layout (num_blocks, num_layers, 2, block_size,
num_kv_heads, head_dim) for the Llama-3-8B shape (32 layers, 8 KV heads, head_dim 128, bf16,
block_size 16: 2 MiB per block), filled with random bits: the producer on cuda:0, the consumer
on cuda:1. They meet the way the product's connectors do: the producer runs a ProducerService
answering `m.HandshakeRequest` with an `m.HandshakeResponse` (KVCacheInfo, and NixlPeerInfo in
`transport`); the consumer calls `call_struct`, checks `KVCacheInfo.mismatch`, adds the
producer as a NIXL peer and pulls one 4k-token request (256 blocks, 512 MiB) into its blocks
1..256, the producer's blocks being

    contiguous   one run            -> 16 descriptors of 32 MiB with the default cut
    runs16       16 runs of 16      -> 16 descriptors of 32 MiB (a fragmented pool)
    scattered    256 lone blocks    -> 256 descriptors of 2 MiB (worst case)
    gathered     the scattered blocks, first gathered on the producer (index_select, CUDA
                 events) into a staging run of 256 blocks registered with the cache, then
                 READ as one run: reported end to end = gather + READ

Each READ is timed end to end on the consumer's host (read_blocks + polling to DONE,
notification included) after warm-up; the median is reported. Before timing, each pattern
of each variant is checked: the consumer's cache is poisoned, one READ runs, the received
blocks' checksums (kv_connector.checksum, computed on the device on both sides) must equal
the producer's and every other block must still hold the poison.

Variants (`--variants`), one spec each: `name` or `name:key=value,...` with keys
    threads=N   UCX worker threads (NixlTransport num_threads; 0: none)
    split=N     NIXL split_batch_size (chunks of max(n // threads, split) descriptors)
    chunk=MiB   max_desc_bytes in MiB, or `none`
    k=N         reads_per_request: one request posted as up to N NIXL READs back to back
    prog=0|1    NIXL's progress thread (progress_thread)
    UPPER=val   an environment variable of the consumer process (UCX_*, NIXL_*); variants
                with equal variables share one producer/consumer pair, each variant its own
                NIXL agent in it
Unnamed settings keep NixlTransport's defaults (8 threads, split 8, 32 MiB, k=1, progress thread).

    python bench/gpu/kv_transfer_bench.py                      # GPU: cuda:0 -> cuda:1, all variants
    python bench/gpu/kv_transfer_bench.py --device cpu         # CPU smoke test (DRAM, smaller)
    bash bench/gpu/run_kv_transfer.sh --variants default k4:threads=8,split=1,k=4

Prints a table last (GB/s and ratio to the peer copy per variant and pattern) and writes
$OUT/kv_transfer.json and the processes' logs ($OUT/kv_transfer_logs.txt) when OUT is set.

Measured 2026-11-23 on 2x H200 (NV18), nixl_cu13 1.5.1, torch 2.11+cu130 (the previous
version of this bench, device kind nvidia-h200-x2): torch peer copy 394 GB/s; NixlTransport's
defaults, two runs: contiguous 316/320 GB/s (0.80/0.81), runs16 334/324 (0.85/0.82),
scattered 216/213 (0.55/0.54); without threads or cutting: 250 / 245 / 163. Copy-engine
reference: one pull copy of 512 MiB 393 GB/s, 16 x 32 MiB pulls on 8 streams 361, 256 x 2 MiB
pulls 135 (1 stream) / 177 (8 streams), pushes 266. kv_connector/nixl_transport.py draws the
conclusions.
"""

from __future__ import annotations

import argparse
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
PATTERNS = ("contiguous", "runs16", "scattered", "gathered")
# (a) one request as K READs, (b) descriptor size x threads, with split 1 so that every
# thread gets a chunk (NIXL 1.5.1 cuts max(n // threads, split)), (c) environment knobs,
# plus no-thread / no-progress-thread controls and the defaults twice for the spread.
SWEEP = "threads=8,split=1,chunk=32"
DEFAULT_VARIANTS = [
    "default",
    "t0c32:threads=0,chunk=32",
    "t0c32np:threads=0,chunk=32,prog=0",
    "t8c32s1:threads=8,split=1,chunk=32",
    "t8c16s1:threads=8,split=1,chunk=16",
    "t16c32s1:threads=16,split=1,chunk=32",
    "t16c16s1:threads=16,split=1,chunk=16",
    f"t8c32s1np:{SWEEP},prog=0",
    f"k2:{SWEEP},k=2",
    f"k4:{SWEEP},k=4",
    f"k8:{SWEEP},k=8",
    "repeat",
    # UCX's cuda_ipc batches a list of copies into one cuMemcpyBatchAsync when NIXL posts it
    # as a scatter-gather list (uct_cuda_ipc_ep_get_sgl_zcopy, CUDA 13 builds).
    "sgl:NIXL_UCX_SGL_ENABLE=y",
    "sgl-t0c32:threads=0,chunk=32,NIXL_UCX_SGL_ENABLE=y",
    f"sgl-t8c32s1:{SWEEP},NIXL_UCX_SGL_ENABLE=y",
    # Completions cuda_ipc picks per progress call (default 16; 256 copies per scattered READ).
    "poll256:UCX_CUDA_IPC_MAX_POLL=256",
    f"poll256-t8c32s1:{SWEEP},UCX_CUDA_IPC_MAX_POLL=256",
    # Control: cuda_ipc picks the stream by the remote GPU's index modulo MAX_STREAMS, so with
    # one peer GPU this should change nothing (uct_cuda_ipc_get_stream_and_event).
    "streams1:UCX_CUDA_IPC_MAX_STREAMS=1",
]
CPU_VARIANTS = ["default", "t0c32np:threads=0,chunk=32,prog=0", f"k4:{SWEEP},k=4",
                "poll64:threads=8,UCX_CUDA_IPC_MAX_POLL=64"]
POISON = 0x5A
POISON_I32 = int(np.array([POISON] * 4, dtype=np.uint8).view(np.int32)[0])
TARGET_RATIO = 0.85


def kv_shape(num_blocks: int) -> tuple[int, ...]:
    return (num_blocks, NUM_LAYERS, 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)


def block_bytes() -> int:
    return NUM_LAYERS * 2 * BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize


def kv_info():
    from kv_connector.base import KVCacheInfo

    return KVCacheInfo(model="llama-3-8b-shape", dtype="bfloat16", block_size=BLOCK_SIZE, num_layers=NUM_LAYERS,
                       num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, layout="NL2BHD")


def config_hash() -> str:
    from kv_connector.config import KVTransferConfig

    return KVTransferConfig(kv_connector="nixl").compute_hash()


def plans(num_blocks: int, n: int, seed: int = 0) -> dict[str, list[int]]:
    """Producer block ids per pattern (the consumer always reads into its blocks 1..n). The
    staging run for `gathered` is the producer's blocks num_blocks..num_blocks+n-1."""
    rng = np.random.default_rng(seed)
    if 2 * n > num_blocks:
        raise SystemExit(f"--num-blocks {num_blocks} is too small for {n}-block requests (need >= {2 * n})")
    start = num_blocks // 3
    out = {"contiguous": list(range(start, start + n))}
    runs = max(1, n // 16)
    slots = rng.choice(num_blocks // 16, runs, replace=False)
    out["runs16"] = [int(s) * 16 + i for s in slots for i in range(16)][:n]
    # Even ids only, random order: no two requested blocks are adjacent, so nothing merges.
    out["scattered"] = [int(b) for b in rng.choice(np.arange(0, num_blocks, 2), n, replace=False)]
    out["gathered"] = list(range(num_blocks, num_blocks + n))
    return out


def parse_variant(spec: str) -> dict:
    """`name[:key=value,...]` -> {"name", "transport": NixlTransport kwargs, "env": {VAR: value}}."""
    name, _, rest = spec.partition(":")
    if not name:
        raise SystemExit(f"variant {spec!r} has no name: write name[:key=value,...]")
    v: dict = {"name": name, "spec": spec, "transport": {}, "env": {}}
    for item in filter(None, rest.split(",")):
        key, eq, val = item.partition("=")
        if not eq:
            raise SystemExit(f"variant {spec!r}: {item!r} is not key=value")
        if key == "threads":
            v["transport"]["num_threads"] = int(val)
        elif key == "split":
            v["transport"]["split_batch_size"] = int(val)
        elif key == "chunk":
            v["transport"]["max_desc_bytes"] = None if val == "none" else int(val) << 20
        elif key == "k":
            v["transport"]["reads_per_request"] = int(val)
        elif key == "prog":
            v["transport"]["progress_thread"] = val not in ("0", "n", "no", "false")
        elif key.isupper():
            v["env"][key] = val
        else:
            raise SystemExit(f"variant {spec!r}: unknown key {key!r} (threads, split, chunk, k, prog, or an "
                             "UPPER_CASE environment variable)")
    return v


def group_variants(specs: list[str]) -> list[tuple[dict[str, str], list[str]]]:
    """Variants with equal environments, in order of first appearance: one process pair each."""
    groups: dict[tuple, tuple[dict[str, str], list[str]]] = {}
    names = set()
    for spec in specs:
        v = parse_variant(spec)
        if v["name"] in names:
            raise SystemExit(f"variant name {v['name']!r} is used twice")
        names.add(v["name"])
        key = tuple(sorted(v["env"].items()))
        groups.setdefault(key, (v["env"], []))[1].append(spec)
    return list(groups.values())


def device_for(args) -> torch.device:
    if args.device == "cpu":
        return torch.device("cpu")
    torch.cuda.set_device(args.device_index)
    return torch.device("cuda", args.device_index)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


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


def median_and_spread(times_s: list[float]) -> tuple[float, float, float]:
    """(median, p10, p90) in seconds."""
    med = statistics.median(times_s)
    if len(times_s) < 2:
        return med, med, med
    qs = statistics.quantiles(times_s, n=10)
    return med, qs[0], qs[8]


# ---------------------------------------------------------------------------- producer
def time_gather(kv: torch.Tensor, src_ids: list[int], num_blocks: int, dev: torch.device, warmup: int,
                iters: int) -> dict:
    """Gather the scattered blocks into the staging run kv[num_blocks:num_blocks+n] (one index_select
    on the device), timed with CUDA events (host clock on CPU). Leaves the staging run filled."""
    n = len(src_ids)
    idx = torch.tensor(src_ids, device=dev)
    source, staging = kv[:num_blocks], kv[num_blocks:num_blocks + n]  # disjoint views of the registered cache
    times = []
    for i in range(warmup + iters):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.index_select(source, 0, idx, out=staging)
            end.record()
            end.synchronize()  # the consumer's copy engine may read only what has landed
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            torch.index_select(source, 0, idx, out=staging)
            elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
    med, p10, p90 = median_and_spread(times)
    moved = 2 * n * block_bytes()  # read + write
    return {"median_ms": med * 1e3, "p10_ms": p10 * 1e3, "p90_ms": p90 * 1e3, "bytes_moved": moved,
            "gbps_read_plus_write": moved / med / 1e9, "iters": len(times)}


def run_producer(args) -> None:
    import msgspec

    from kv_connector import messages as m
    from kv_connector.checksum import block_checksums
    from kv_connector.nixl_connector import NixlPeerInfo
    from kv_connector.nixl_transport import NixlTransport
    from kv_connector.producer_service import ProducerService

    dev = device_for(args)
    work = Path(args.workdir)
    n = args.request_blocks
    kv = random_kv(args.num_blocks + n, dev, seed=1)  # the last n blocks are the staging run
    sync(dev)
    transport = NixlTransport(f"bench-producer-{os.getpid()}")
    layout = transport.register_kv_cache(kv, block_bytes())
    plan = plans(args.num_blocks, n)
    gather = time_gather(kv, plan["scattered"], args.num_blocks, dev, args.warmup, args.iters)
    sums = {p: block_checksums(kv, ids) for p, ids in plan.items()}
    sums["gathered_matches_scattered"] = sums["gathered"] == sums["scattered"]
    write_atomic(work / "checksums.json", json.dumps({"checksums": sums, "gather": gather}))

    h = config_hash()
    answer = m.HandshakeResponse(engine_id="bench-producer", config_hash=h, kv_info=kv_info(),
                                 num_blocks=layout.num_blocks, block_bytes=layout.block_bytes,
                                 transport=msgspec.msgpack.encode(NixlPeerInfo(transport.agent_metadata(), layout)))

    def on_handshake(req: m.HandshakeRequest):  # runs on the service thread: returns prebuilt bytes only
        if req.config_hash != h:
            return m.ErrorResponse(f"KV transfer settings differ: consumer {req.config_hash[:8]}, producer {h[:8]}")
        return answer

    service = ProducerService("127.0.0.1", 0, {m.HandshakeRequest: on_handshake}).start()
    write_atomic(work / "port", str(service.port))
    received: dict[str, int] = {}
    deadline = time.monotonic() + args.timeout
    done_at = None
    while time.monotonic() < deadline:
        for agent, msgs in transport.get_notifs().items():
            received[agent] = received.get(agent, 0) + sum(1 for msg in msgs if msg.startswith(b"bench:"))
        if done_at is None and (work / "consumer.done").exists():
            done_at = time.monotonic()
        if done_at is not None and time.monotonic() - done_at > 0.5:  # late notifications
            break
        time.sleep(0.001)
    write_atomic(work / "producer.json", json.dumps({"notifs_received": received}))
    service.close()
    transport.close()


# ---------------------------------------------------------------------------- consumer
def untouched_ok(kv: torch.Tensor, n: int) -> bool:
    """Blocks 0 and n+1.. still hold the poison (min and max of their int32 words, no big temporaries)."""
    for part in (kv[:1], kv[n + 1:]):
        words = part.view(torch.int32)
        if int(words.min()) != POISON_I32 or int(words.max()) != POISON_I32:
            return False
    return True


def run_variant(args, spec: str, index: int, kv: torch.Tensor, dev: torch.device, peer_info, expected: dict,
                gather: dict) -> tuple[list[dict], int]:
    from kv_connector.checksum import block_checksums
    from kv_connector.nixl_transport import NixlTransport

    v = parse_variant(spec)
    n = args.request_blocks
    local_ids = list(range(1, 1 + n))
    kv_u8 = kv.view(torch.uint8)
    rows, sent = [], 0
    t0 = time.perf_counter()
    transport = NixlTransport(f"bench-consumer-{os.getpid()}-{index}", **v["transport"])
    try:
        transport.register_kv_cache(kv, block_bytes())
        peer = transport.add_peer(peer_info.agent_metadata, peer_info.layout)
        setup_s = time.perf_counter() - t0
        for pattern, remote_ids in plans(args.num_blocks, n).items():
            # Exactness: poison, one READ, compare checksums, check nothing else was written.
            kv_u8.fill_(POISON)
            sync(dev)
            h = transport.read_blocks(peer, remote_ids, local_ids, notif=f"bench:{v['name']}:{pattern}:check".encode())
            transport.wait(h)
            transport.release(h)
            sent += 1
            sync(dev)
            bytes_ok = block_checksums(kv, local_ids) == expected[pattern]
            others_ok = untouched_ok(kv, n)
            # Timing: read_blocks (validate + make_prepped_xfer + post) then poll to DONE.
            post_s, total_s = [], []
            for i in range(args.warmup + args.iters):
                notif = f"bench:{v['name']}:{pattern}:{i}".encode()
                t0 = time.perf_counter()
                h = transport.read_blocks(peer, remote_ids, local_ids, notif=notif)
                t1 = time.perf_counter()
                transport.wait(h)
                t2 = time.perf_counter()
                transport.release(h)
                sent += 1
                if i >= args.warmup:
                    post_s.append(t1 - t0)
                    total_s.append(t2 - t0)
            med, p10, p90 = median_and_spread(total_s)
            row = {"variant": v["name"], "spec": spec, "env": v["env"], "pattern": pattern, "blocks": n,
                   "bytes": h.nbytes, "num_descs": h.num_descs, "num_reads": h.num_reads,
                   "read_median_ms": med * 1e3, "read_p10_ms": p10 * 1e3, "read_p90_ms": p90 * 1e3,
                   "post_us_median": statistics.median(post_s) * 1e6, "iters": len(total_s),
                   "bytes_identical": bytes_ok, "untouched_ok": others_ok, "agent_setup_s": setup_s}
            extra_ms = gather["median_ms"] if pattern == "gathered" else 0.0  # the producer's gather, end to end
            row["median_ms"] = row["read_median_ms"] + extra_ms
            row["gbps"] = h.nbytes / (row["median_ms"] / 1e3) / 1e9
            row["gbps_p10"] = h.nbytes / ((row["read_p90_ms"] + extra_ms) / 1e3) / 1e9
            row["gbps_p90"] = h.nbytes / ((row["read_p10_ms"] + extra_ms) / 1e3) / 1e9
            rows.append(row)
            print(f"[consumer] {v['name']:>16} {pattern:>10}: {row['gbps']:6.1f} GB/s, descs {h.num_descs}, "
                  f"reads {h.num_reads}, post {row['post_us_median']:.0f} us, ok={bytes_ok and others_ok}", flush=True)
        time.sleep(0.1)  # let the last notification leave before the agent goes
    finally:
        transport.close()
    return rows, sent


def run_consumer(args) -> None:
    import msgspec

    from kv_connector import messages as m
    from kv_connector.nixl_connector import NixlPeerInfo
    from kv_connector.producer_service import call_struct

    specs = json.loads(args.variant_specs)
    dev = device_for(args)
    work = Path(args.workdir)
    results: dict = {"rows": [], "errors": {}, "notifs_sent": {}}
    try:
        kv = torch.empty(kv_shape(args.num_blocks), dtype=DTYPE, device=dev)
        port = int(wait_for_file(work / "port", args.timeout))
        hs = call_struct("127.0.0.1", port, m.HandshakeRequest("bench-consumer", config_hash()), m.HandshakeResponse,
                         timeout_s=30)
        problem = kv_info().mismatch(hs.kv_info)
        if problem:
            raise SystemExit(problem)
        peer_info = msgspec.msgpack.decode(hs.transport, type=NixlPeerInfo)
        produced = json.loads(wait_for_file(work / "checksums.json", args.timeout))
        for i, spec in enumerate(specs):
            name = parse_variant(spec)["name"]
            try:
                rows, sent = run_variant(args, spec, i, kv, dev, peer_info, produced["checksums"], produced["gather"])
                results["rows"] += rows
                results["notifs_sent"][name] = sent
            except Exception as e:  # one variant failing must not hide the others
                results["errors"][name] = repr(e)
                print(f"[consumer] variant {name} failed: {e!r}", flush=True)
    finally:
        write_atomic(work / "consumer.json", json.dumps(results))
        (work / "consumer.done").touch()


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


def run_pair(args, group: int, env_extra: dict[str, str], specs: list[str], log_parts: list[str]) -> dict:
    """One producer and one consumer process; the consumer runs every variant in `specs`, one NIXL
    agent each, with `env_extra` in its environment."""
    work = Path(tempfile.mkdtemp(prefix=f"kvbench-g{group}-"))
    base = os.environ.copy()  # keeps the machine's required variables (e.g. NCCL_NVLS_ENABLE=0)
    base["PYTHONUNBUFFERED"] = "1"
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH")]))
    common = ["--device", args.device, "--num-blocks", str(args.num_blocks), "--request-blocks",
              str(args.request_blocks), "--iters", str(args.iters), "--warmup", str(args.warmup), "--timeout",
              str(args.timeout), "--workdir", str(work)]
    procs = {}
    t0 = time.perf_counter()
    for role, idx, env in (("producer", 0, base), ("consumer", 1, {**base, **env_extra})):
        log = open(work / f"{role}.log", "w")
        cmd = [sys.executable, __file__, "--role", role, "--device-index", str(idx), *common]
        if role == "consumer":
            cmd += ["--variant-specs", json.dumps(specs)]
        procs[role] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    status: dict[str, object] = {}
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
            log_parts.append(f"===== group {group} env {env_extra} {role} (exit {status.get(role)}) =====\n"
                             + (work / f"{role}.log").read_text(errors="replace"))
    consumer = json.loads((work / "consumer.json").read_text()) if (work / "consumer.json").exists() else {}
    producer = json.loads((work / "producer.json").read_text()) if (work / "producer.json").exists() else {}
    produced = json.loads((work / "checksums.json").read_text()) if (work / "checksums.json").exists() else {}
    names = [parse_variant(s)["name"] for s in specs]
    missing = [nm for nm in names if nm not in {r["variant"] for r in consumer.get("rows", [])}
               and nm not in consumer.get("errors", {})]
    if missing or consumer.get("errors"):
        print(f"group {group} ({env_extra or 'no extra env'}): failed variants {consumer.get('errors', {})}, "
              f"missing {missing}, exit codes {status}; log tail:\n" + "\n".join(log_parts[-2:])[-3000:], flush=True)
    return {"group": group, "env": env_extra, "variants": names, "exit": status, "seconds": time.perf_counter() - t0,
            "rows": consumer.get("rows", []), "errors": {**consumer.get("errors", {}),
                                                         **{nm: "no result (process died?)" for nm in missing}},
            "notifs_sent": consumer.get("notifs_sent", {}), "notifs_received": producer.get("notifs_received", {}),
            "gather": produced.get("gather"),
            "staging_checksums_ok": produced.get("checksums", {}).get("gathered_matches_scattered")}


def read_protocols(log: str) -> list[str]:
    """The UCX_PROTO_INFO tables for RMA reads (ucp_get), timestamps stripped, each once."""
    lines = [ln.split("]", 2)[-1].rstrip() for ln in log.splitlines()]
    tables: list[tuple[str, ...]] = []
    for i, ln in enumerate(lines):
        if "read by ucp_get" not in ln:
            continue
        table = [ln]
        for nxt in lines[i + 1:i + 12]:
            border = nxt.lstrip().startswith("+")
            if not (border or nxt.lstrip().startswith("|")) or "intra-node" in nxt or (
                    border and table[-1].lstrip().startswith("+") and len(table) > 3):  # the next table's top
                break
            table.append(nxt)
        if tuple(table) not in tables:
            tables.append(tuple(table))
    return [t for table in tables[:3] for t in table]


def print_table(args, peer: dict, groups: list[dict]) -> None:
    print(f"\nKV transfer, one request = {args.request_blocks} blocks x {block_bytes() / 2**20:.0f} MiB, median of "
          f"{args.iters} after {args.warmup} warm-up; GB/s (ratio to {peer['gbps']:.1f} GB/s, {peer['what']})")
    print(f"{'variant':>16} " + " ".join(f"{p:>15}" for p in PATTERNS) + f" {'post us':>8} {'exact':>5}  settings")
    for g in groups:
        by_name: dict[str, dict[str, dict]] = {}
        for r in g["rows"]:
            by_name.setdefault(r["variant"], {})[r["pattern"]] = r
        for name in g["variants"]:
            rows = by_name.get(name, {})
            spec = next((r["spec"] for r in rows.values()), name)
            if name in g["errors"]:
                print(f"{name:>16} FAILED: {g['errors'][name][:100]}")
                continue
            cells = [f"{rows[p]['gbps']:6.1f} ({rows[p]['gbps'] / peer['gbps']:.2f})" if p in rows else "-"
                     for p in PATTERNS]
            post = rows["contiguous"]["post_us_median"] if "contiguous" in rows else float("nan")
            exact = all(r["bytes_identical"] and r["untouched_ok"] for r in rows.values())
            print(f"{name:>16} " + " ".join(f"{c:>15}" for c in cells) + f" {post:>8.0f} {'yes' if exact else 'NO':>5}"
                  f"  {spec.partition(':')[2] or 'NixlTransport defaults'}")
    gather = next((g["gather"] for g in groups if g.get("gather")), None)
    if gather:
        print(f"gathered = producer gather (index_select of {args.request_blocks} scattered blocks into the staging "
              f"run: {gather['median_ms']:.3f} ms, {gather['gbps_read_plus_write']:.0f} GB/s read+write) + READ of "
              "the run; post us = read_blocks time for the contiguous pattern")


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
    started = time.perf_counter()
    peer = peer_copy_gbps(args)
    print(f"reference: {peer['what']}: {peer['gbps']:.1f} GB/s (bytes identical: {peer['bytes_identical']})",
          flush=True)
    try:
        ce = copy_engine_reference(args) if args.device == "cuda" else {"skipped": "cpu"}
    except Exception as e:  # a diagnostic only: report and go on to the NIXL runs
        ce = {"skipped": f"failed: {e!r}"}
        print(f"copy-engine reference failed: {e!r}", flush=True)
    groups, logs = [], []
    for gi, (env_extra, specs) in enumerate(group_variants(args.variants)):
        if gi == 0 and args.proto_info:
            env_extra = {"UCX_PROTO_INFO": "y", **env_extra}
        print(f"group {gi}: env {env_extra or '{}'}: {len(specs)} variants", flush=True)
        groups.append(run_pair(args, gi, env_extra, specs, logs))
    rows = [r for g in groups for r in g["rows"]]
    for r in rows:
        r["ratio_to_peer_copy"] = r["gbps"] / peer["gbps"]
    report = {"env": env, "config": {"num_blocks": args.num_blocks, "request_blocks": args.request_blocks,
                                     "block_bytes": block_bytes(), "iters": args.iters, "warmup": args.warmup,
                                     "variants": args.variants},
              "peer_copy": peer, "copy_engine_reference": ce, "groups": [{k: v for k, v in g.items() if k != "rows"}
                                                                          for g in groups],
              "results": rows, "seconds": time.perf_counter() - started}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "kv_transfer.json").write_text(json.dumps(report, indent=2))
        (out_dir / "kv_transfer_logs.txt").write_text("\n".join(logs)[-8_000_000:])
    if "skipped" not in ce:
        print(f"\ncopy-engine reference, same {args.request_blocks} blocks by cudaMemcpyAsync in one process (cupy), "
              "GB/s: GPU time (copies queued first) / including the host's enqueueing")
        for name, r in ce.items():
            print(f"  {name:<36} {r['gpu']:7.1f} / {r['with_enqueue']:7.1f}  ratio {r['gpu'] / peer['gbps']:.2f}")
    proto = read_protocols("\n".join(logs))
    if proto:
        print("UCX protocols chosen for READ (UCX_PROTO_INFO, first group):\n" + "\n".join(proto))
    for g in groups:
        sent, got = sum(g["notifs_sent"].values()), sum(g["notifs_received"].values())
        print(f"group {g['group']} env {g['env'] or '{}'}: {g['seconds']:.0f} s, exits {g['exit']}, "
              f"notifications sent {sent} received {got}, staging checksums ok {g['staging_checksums_ok']}")
    print_table(args, peer, groups)
    expected_rows = len(PATTERNS) * len(args.variants)
    ok = (all(r["bytes_identical"] and r["untouched_ok"] for r in rows) and len(rows) == expected_rows
          and all(g["staging_checksums_ok"] for g in groups))
    best = max((r for r in rows if r["pattern"] == "contiguous"), key=lambda r: r["gbps"], default=None)
    if best:
        print(f"best contiguous: {best['variant']} {best['gbps']:.1f} GB/s, ratio {best['ratio_to_peer_copy']:.2f} "
              f"(goal >= {TARGET_RATIO}); all {len(rows)}/{expected_rows} results exact: {ok}; "
              f"{time.perf_counter() - started:.0f} s in all")
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks per process (cuda 2048, cpu 192)")
    p.add_argument("--request-blocks", type=int, default=None, help="blocks per READ (cuda 256 = 4k tokens, cpu 64)")
    p.add_argument("--iters", type=int, default=None, help="timed READs per pattern and variant (cuda 30, cpu 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed READs first (cuda 3, cpu 1)")
    p.add_argument("--peer-copy-mib", type=int, default=1024)
    p.add_argument("--variants", nargs="+", default=None,
                   help="variant specs (module docstring; default: the GPU sweep, or a small CPU set)")
    p.add_argument("--no-proto-info", dest="proto_info", action="store_false",
                   help="do not set UCX_PROTO_INFO=y for the first group")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds one producer/consumer pair may take")
    p.add_argument("--role", choices=["orchestrator", "producer", "consumer"], default="orchestrator",
                   help=argparse.SUPPRESS)
    p.add_argument("--device-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--variant-specs", default="[]", help=argparse.SUPPRESS)
    args = p.parse_args()
    gpu = args.device == "cuda"
    args.num_blocks = args.num_blocks or (2048 if gpu else 192)
    args.request_blocks = args.request_blocks or (256 if gpu else 64)
    args.iters = args.iters or (30 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.variants = args.variants or (DEFAULT_VARIANTS if gpu else CPU_VARIANTS)
    if args.role == "producer":
        run_producer(args)
        return 0
    if args.role == "consumer":
        run_consumer(args)
        return 0
    group_variants(args.variants)  # bad specs fail here, before any process starts
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
