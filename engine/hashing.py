"""Hashes the engine relies on: config fingerprints and prefix-cache block keys.

Two different needs, two functions:

* `safe_hash` fingerprints configuration (compatibility checks between producer and
  consumer, cache folder names). md5 is fast and plenty for that, but FIPS builds of
  OpenSSL refuse it, so it falls back to sha256 there. It is defined in
  kv_connector/fingerprint.py, which both packages use.
* `hash_block_tokens` keys the prefix cache. Each block's key chains its parent's key, so
  equal keys mean equal *prefixes*, not just equal blocks. The default (`builtin`) uses
  Python's tuple hash: fast, 64-bit, fine for one tenant; `sha256` makes collisions
  infeasible when prompts from mutually untrusted tenants share one cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

from kv_connector.fingerprint import safe_hash  # noqa: F401 - part of this module's API

PrefixHashAlgo = Literal["builtin", "sha256"]

# The parent key of a request's first block. Folding in a nonzero constant keeps the first
# block's key from colliding with a tuple hash of the bare tokens.
ROOT_BLOCK_HASH = 0x5043_4C55_5354_4552  # "PCLUSTER"


def hash_block_tokens(parent_hash: int, token_ids: Sequence[int], algo: PrefixHashAlgo = "builtin",
                      extra_key: int | str | None = None) -> int:
    """Key of one full block given its parent's key (chained prefix hash).

    `extra_key` separates caches that must not share blocks though their tokens match
    (for example a LoRA adapter or a tenant salt).
    """
    if algo == "builtin":
        # Tuples of ints hash the same in every process (unlike str, which PYTHONHASHSEED
        # randomises), so the router and every node agree on keys.
        if isinstance(extra_key, str):
            extra_key = int.from_bytes(safe_hash(extra_key.encode(), usedforsecurity=False).digest()[:8], "little")
        return hash((parent_hash, tuple(token_ids), extra_key))
    if algo == "sha256":
        h = hashlib.sha256()
        h.update(parent_hash.to_bytes(32, "little", signed=True))
        h.update(b"".join(int(t).to_bytes(4, "little") for t in token_ids))
        if extra_key is not None:
            h.update(str(extra_key).encode())
        return int.from_bytes(h.digest()[:16], "little", signed=True)
    raise ValueError(f"unknown prefix hash algorithm {algo!r}: use 'builtin' or 'sha256'")


def prefix_block_hashes(token_ids: Sequence[int], block_size: int, algo: PrefixHashAlgo = "builtin",
                        extra_key: int | str | None = None) -> list[int]:
    """Chained keys of every *full* block of `token_ids` (a partial tail block has none)."""
    hashes: list[int] = []
    parent = ROOT_BLOCK_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start:start + block_size], algo, extra_key)
        hashes.append(parent)
    return hashes
