"""Where a KV load's time goes, end to end, on a 1P1D cluster: handshake, read, release
(with the producer's checksums), verify. Warm loads only (after a few warm-up requests).

    DEVICES=cuda:0,cuda:1 PYTHONPATH=. python bench/gpu/kv_load_latency.py   # DEVICES=cpu,cpu on a CPU

NIXL_NUM_THREADS and NIXL_PROGRESS_DELAY_US set the connector's options of those names.
"""

from __future__ import annotations

import os
import time

import httpx

from cluster.config import ClusterConfig
from cluster.launcher import LocalCluster

DEVICES = os.environ.get("DEVICES", "cuda:0,cuda:1").split(",")
PHASES = ("handshake", "claim", "read", "release", "verify")


def decode_stats(url: str) -> dict:
    time.sleep(1.2)  # node stats are polled every 0.5 s
    return next(n for n in httpx.get(url + "/cluster").json()["nodes"] if n["role"] == "decode")["kv_transfer"]


def main() -> None:
    config = ClusterConfig.model_validate({
        "model": {"path": "builtin:tiny", "dtype": "float32"}, "router": {"port": 0},
        "kv_transfer": {"connector": os.environ.get("CONNECTOR", "nixl"),
                        "extra": {k.lower(): int(v) for k, v in os.environ.items() if k.startswith(("NIXL_NUM_THREADS", "NIXL_PROGRESS_DELAY_US"))}},
        "engine": {"num_blocks": 1024, "block_size": 16},
        "prefill": {"replicas": 1, "devices": [DEVICES[0]]}, "decode": {"replicas": 1, "devices": [DEVICES[1]]}})
    with LocalCluster(config) as cluster, httpx.Client(timeout=60) as http:
        def ask(i: int) -> float:
            t0 = time.perf_counter()
            http.post(cluster.url + "/v1/completions", json={"prompt": f"request {i}: " + "word " * 100,
                                                             "max_tokens": 2, "temperature": 0}).raise_for_status()
            return time.perf_counter() - t0
        for i in range(6):
            ask(i)
        before = decode_stats(cluster.url)
        e2e = [ask(100 + i) for i in range(20)]
        after = decode_stats(cluster.url)
    n = after["loads"] - before["loads"]
    print(f"{n:.0f} warm loads, {DEVICES}: request e2e median {sorted(e2e)[len(e2e) // 2] * 1e3:.1f} ms")
    for p in ("load", *[f"load_{p}" for p in PHASES]):
        key = f"{p}_seconds"
        print(f"  {key:24s} {1e3 * (after[key] - before[key]) / max(n, 1):7.2f} ms per load")


if __name__ == "__main__":
    main()
