"""`safe_hash`: md5 for fingerprints (config compatibility checks between producer and
consumer, cache folder names), sha256 where FIPS builds of OpenSSL refuse md5.

It lives here, at the bottom of the import graph, because both kv_connector/ (the
compatibility hash of KVTransferConfig) and engine/ (model ids, prefix hashing) use it,
and kv_connector/ imports nothing from engine/.
"""

from __future__ import annotations

import hashlib


def safe_hash(data: bytes, usedforsecurity: bool = True):
    """md5 of `data`, or sha256 where FIPS forbids md5. Returns a hashlib object."""
    try:
        return hashlib.md5(data, usedforsecurity=usedforsecurity)
    except (ValueError, TypeError):  # FIPS: "unsupported hash type", or an old signature
        return hashlib.sha256(data)
