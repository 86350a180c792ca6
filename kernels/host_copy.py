"""Host values onto the device without waiting for the device.

A plain `torch.tensor(values, device="cuda")` (or `.to("cuda")` of a pageable tensor)
copies from pageable memory and synchronizes the stream: the host waits until every
queued kernel has run. In a decode step that is the forward just queued, so the host's
work for the previous step (detokenizing, grammar masks) no longer overlaps the device's
and the device idles while the host catches up (the sampler's per-row parameters made a
sampled step 10-36% slower than a greedy one on an H200, bench/gpu/sampler_cost.py).
These helpers stage through pinned memory and copy asynchronously; torch's pinned-memory
cache reuses a staging block only once its copy has completed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def host_to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` (on the host) on `device`."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A host list (or nested lists) as a `dtype` tensor on `device`."""
    return host_to_device(torch.tensor(values, dtype=dtype), device)
