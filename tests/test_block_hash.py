"""The block hash is a public contract (engine/hashing.py): pinned values, the same in
every process, and recomputable from its written definition alone."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from engine.hashing import (ROOT_BLOCK_HASH, external_block_hash, hash_block_tokens, internal_block_hash,
                            prefix_block_hashes, root_block_hash)

TOKENS = list(range(1, 33))  # two blocks of 16


def test_block_hashes_have_the_pinned_values_of_contract_v1():
    assert ROOT_BLOCK_HASH == 0xEA078BF2FC990C2E
    assert prefix_block_hashes(TOKENS, 16) == [0xB44F04DB23121EFB, 0xBDE993DBAA8F617F]
    assert prefix_block_hashes(TOKENS, 16, "sha256") == [0x2EDDCFC2CCA28CA65CA176FCAF9F984D,
                                                         0xE57B694C38CDFB329E01C3F47588399B]
    assert prefix_block_hashes(TOKENS[:16], 16, extra_key="tenant-a") == [0x321F38563E23AE50]
    assert root_block_hash("sha256") == 0xEA078BF2FC990C2E52D45AB99C0458EB


def test_the_written_definition_alone_gives_the_same_keys():
    def h(data: bytes) -> int:
        return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")
    parent = h(b"pdcluster-block-hash-v1")
    keys = []
    for start in (0, 16):
        parent = h(parent.to_bytes(8, "big") + b"".join(t.to_bytes(4, "big") for t in TOKENS[start:start + 16]))
        keys.append(parent)
    assert keys == prefix_block_hashes(TOKENS + [99], 16)  # the partial tail block has no key
    assert hash_block_tokens(keys[0], TOKENS[16:]) == keys[1]


@pytest.mark.parametrize("algo", ["sha256_64", "sha256"])
def test_block_hashes_are_equal_across_processes_whatever_the_hash_seed(algo):
    code = (f"from engine.hashing import prefix_block_hashes; "
            f"print(prefix_block_hashes(list(range(1, 33)), 16, {algo!r}))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert outs == {str(prefix_block_hashes(TOKENS, 16, algo))}


def test_keys_travel_as_ints_below_2_64_and_as_16_bytes_above():
    small, big = prefix_block_hashes(TOKENS, 16)[0], prefix_block_hashes(TOKENS, 16, "sha256")[0]
    assert external_block_hash(small) == small
    assert external_block_hash(big) == big.to_bytes(16, "big")
    assert internal_block_hash(external_block_hash(big)) == big


def test_an_unknown_algorithm_is_refused():
    with pytest.raises(ValueError, match="use sha256_64 or sha256"):
        prefix_block_hashes(TOKENS, 16, "builtin")
