"""`Tokenizer.encode_untrusted`: what the router uses on client text. Same ids as
`encode`; text far beyond the limit refused after tokenizing a piece of it; text that is
not Unicode refused with a message; and the tokenizing itself lets other threads run."""

from __future__ import annotations

import random
import string
import threading
import time

import pytest

from engine.builtin_models import resolve_builtin
from engine.tokenizer import PromptTooLong, Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(resolve_builtin("tiny"))


def words(n_chars: int, seed: int = 0) -> str:
    r = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        w = "".join(r.choice(string.ascii_lowercase) for _ in range(r.randint(2, 9)))
        out.append(w)
        size += len(w) + 1
    return " ".join(out)


def test_same_ids_as_encode(tok):
    for text in ("Hello world", words(200_000, seed=1)):  # one piece, and several
        assert tok.encode_untrusted(text, max_tokens=10**6) == tok.encode(text)
        assert tok.encode_untrusted(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)


def test_far_too_long_is_refused_quickly(tok):
    text = words(2 << 20, seed=2)
    t0 = time.monotonic()
    with pytest.raises(PromptTooLong, match="at most 2048 fit"):
        tok.encode_untrusted(text, max_tokens=2048)
    assert time.monotonic() - t0 < 0.5 * max(1.0, _encode_seconds(tok, text))


def _encode_seconds(tok, text) -> float:
    t0 = time.monotonic()
    tok.encode(text[: len(text) // 4])
    return 4 * (time.monotonic() - t0)


def test_lone_surrogates_are_a_value_error(tok):
    with pytest.raises(ValueError, match="not valid Unicode"):
        tok.encode_untrusted("half a pair: \ud800")


def test_other_threads_run_while_it_tokenizes(tok):
    text = words(600_000, seed=3)
    beats: list[float] = []
    done = threading.Event()

    def heartbeat():
        while not done.is_set():
            beats.append(time.monotonic())
            time.sleep(0.002)

    t = threading.Thread(target=heartbeat)
    t.start()
    t0 = time.monotonic()
    tok.encode_untrusted(text)
    took = time.monotonic() - t0
    done.set()
    t.join()
    gaps = [b - a for a, b in zip(beats, beats[1:])]
    assert len(gaps) > 10 and max(gaps) < max(0.1, took / 3), (max(gaps), took)
