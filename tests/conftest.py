"""Shared fixtures: small checkpoints written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep created built-in models inside the test session's temp area, not in ~/.cache.
os.environ.setdefault("PDCLUSTER_CACHE", str(Path(os.environ.get("PYTEST_TMPDIR", "/tmp")) / "pdcluster-test-cache"))

import torch  # noqa: E402

# Triton kernels run on the CPU through Triton's interpreter where there is no GPU; the
# variable must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

ARCH_PRESETS = ["tiny", "tiny-tied", "tiny-llama3-rope", "tiny-mistral", "tiny-qwen2", "tiny-qwen3"]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """preset name -> a Hugging Face-format directory with random float32 weights."""
    from engine.builtin_models import make_model

    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for preset in ARCH_PRESETS:
        make_model(root / preset, preset=preset)
        out[preset] = root / preset
    return out
