"""Hashes the engine relies on: config fingerprints and prefix-cache block keys.

Two different needs, two functions:

* `safe_hash` fingerprints configuration (compatibility checks between producer and
  consumer, cache folder names). md5 is fast and plenty for that, but FIPS builds of
  OpenSSL refuse it, so it falls back to sha256 there. It is defined in
  kv_connector/fingerprint.py, which both packages use.
* `hash_block_tokens` keys the prefix cache, and is a public contract: nodes publish
  these keys in their KV events (engine/kv_events.py) and a router, ours or a third
  party's, recomputes them from a prompt's tokens to find which node holds the prompt's
  prefix. So the key of the same tokens must be the same on every node, in every Python
  process, after every restart, and computable outside Python.

The block hash contract (version 1)
-----------------------------------
A prompt is cut into blocks of `block_size` tokens; only full blocks have keys. Block i's
key chains block i-1's key (the first block chains `ROOT_BLOCK_HASH`), so equal keys mean
equal *prefixes*, not just equal blocks:

    key(i) = H(key(i-1) || tokens(i) || extra)

* `sha256_64` (the default): H = the first 8 bytes of SHA-256, read as a big-endian
  unsigned integer (0 <= key < 2**64). The parent key enters as 8 bytes big-endian, each
  token id as 4 bytes big-endian unsigned, then, only when an extra key (a salt) is
  given, one 0x00 byte and its UTF-8 bytes. `ROOT_BLOCK_HASH` is H of the ASCII bytes
  `pdcluster-block-hash-v1` alone. Collisions become likely only past ~4e9 distinct
  blocks, far beyond any cache.
* `sha256`: the same with 16 bytes (the parent enters as 16 bytes, the key is the first
  16 bytes of the digest): for caches shared by mutually untrusted tenants, where a
  crafted collision must be infeasible. In KV events such keys travel as 16-byte
  big-endian `bytes`, as vLLM sends its sha256 keys (msgpack integers stop at 64 bits).

tests/test_block_hash.py pins known values; changing any of the above is a breaking
change of the KV events contract and needs a new version name.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from functools import cache
from typing import Literal

from kv_connector.fingerprint import safe_hash  # noqa: F401 - part of this module's API

PrefixHashAlgo = Literal["sha256_64", "sha256"]
HASH_ALGOS: tuple[str, ...] = ("sha256_64", "sha256")
HASH_CONTRACT = "pdcluster-block-hash-v1"
_WIDTH = {"sha256_64": 8, "sha256": 16}


def _width(algo: str) -> int:
    try:
        return _WIDTH[algo]
    except KeyError:
        raise ValueError(f"unknown prefix hash algorithm {algo!r}: use {' or '.join(HASH_ALGOS)}") from None


@cache
def root_block_hash(algo: PrefixHashAlgo = "sha256_64") -> int:
    """The parent key of a request's first block."""
    return int.from_bytes(hashlib.sha256(HASH_CONTRACT.encode()).digest()[:_width(algo)], "big")


ROOT_BLOCK_HASH = root_block_hash("sha256_64")


def hash_block_tokens(parent_hash: int, token_ids: Sequence[int], algo: PrefixHashAlgo = "sha256_64",
                      extra_key: str | None = None) -> int:
    """Key of one full block given its parent's key (the contract above).

    `extra_key` separates caches that must not share blocks though their tokens match
    (a tenant salt, say)."""
    width = _width(algo)
    h = hashlib.sha256(parent_hash.to_bytes(width, "big"))
    h.update(struct.pack(f">{len(token_ids)}I", *token_ids))
    if extra_key is not None:
        h.update(b"\x00" + extra_key.encode())
    return int.from_bytes(h.digest()[:width], "big")


def prefix_block_hashes(token_ids: Sequence[int], block_size: int, algo: PrefixHashAlgo = "sha256_64",
                        extra_key: str | None = None) -> list[int]:
    """Chained keys of every *full* block of `token_ids` (a partial tail block has none)."""
    hashes: list[int] = []
    parent = root_block_hash(algo)
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start:start + block_size], algo, extra_key)
        hashes.append(parent)
    return hashes


def external_block_hash(key: int) -> int | bytes:
    """A key as KV events carry it: an integer when it fits msgpack's 64 bits, else 16
    big-endian bytes (sha256 keys)."""
    return key if key < 1 << 64 else key.to_bytes(16, "big")


def internal_block_hash(key: int | bytes) -> int:
    """The inverse of `external_block_hash`."""
    return int.from_bytes(key, "big") if isinstance(key, bytes) else key
