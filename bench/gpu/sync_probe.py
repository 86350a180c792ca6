"""Which sampler operation makes the host wait for the device: each runs right after a
kernel that spins for about half a second; one that returns only after it synchronized.

    PYTHONPATH=. python bench/gpu/sync_probe.py
"""

from __future__ import annotations

import time

import numpy as np
import torch

from engine.sampler import Sampler, SamplingRow, apply_bans, apply_penalties
from engine.sampling_params import SamplingParams
from kernels.host_copy import host_to_device, to_device
from kernels.sampling import exponential_race_triton


def probe(name: str, fn) -> None:
    for attempt in range(3):
        torch.cuda._sleep(1_000_000_000)
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        torch.cuda.synchronize()
        print(f"{name:>28} try {attempt}: {dt * 1e3:8.2f} ms {'SYNC' if dt > 0.15 else ''}", flush=True)


def main() -> None:
    dev = "cuda"
    logits = torch.randn(4, 128_256, device=dev)
    rules = {"greedy": SamplingParams(temperature=0.0), "logprobs": SamplingParams(temperature=0.0, logprobs=2),
             "temperature": SamplingParams(temperature=0.8), "top_k": SamplingParams(temperature=0.8, top_k=50),
             "top_p": SamplingParams(temperature=0.8, top_p=0.9), "min_p": SamplingParams(temperature=0.8, min_p=0.05),
             "penalty": SamplingParams(temperature=0.0, repetition_penalty=1.2),
             "freq": SamplingParams(temperature=0.0, frequency_penalty=0.5),
             "min_tokens": SamplingParams(temperature=0.0, min_tokens=4, stop_token_ids=[9])}
    sampler = Sampler(4, dev)
    probe("to_device", lambda: to_device([1.0, 2.0], torch.float32, dev))
    probe("host_to_device numpy", lambda: host_to_device(torch.from_numpy(np.arange(10)), dev))
    probe("event record", lambda: torch.cuda.Event().record())
    probe("race kernel", lambda: exponential_race_triton(logits, [1, 2, 3, 4], [5, 6, 7, 8]))
    for name, p in rules.items():
        rows = [SamplingRow(p, i, [1, 2, 3], [5, 6]) for i in range(4)]
        probe(f"sample {name}", lambda rows=rows: sampler.sample(logits, rows))
        if name in ("penalty", "freq"):
            probe(f"apply_penalties {name}", lambda rows=rows: apply_penalties(logits, rows))
        if name == "min_tokens":
            probe("apply_bans", lambda rows=rows: apply_bans(logits, rows))


if __name__ == "__main__":
    main()
