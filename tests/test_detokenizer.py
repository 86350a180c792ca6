"""engine.detokenizer: streamed text is exactly the full decode, never shows half a
character or part of a stop string, and requests stop for the right reason."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, normalizers

from engine.builtin_models import make_model
from engine.detokenizer import DetokenizerUpdate, IncrementalDetokenizer, check_stop
from engine.tokenizer import Tokenizer


@dataclass
class Params:
    """The SamplingParams fields these modules read, with vLLM's names and defaults."""

    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    max_tokens: int | None = 16


class CharTokenizer:
    """One token per character (id = code point), so stop-string tests control exactly
    where token boundaries fall. Ids >= 0x110000 are 'special' and decode as <N>."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) if i < 0x110000 else ("" if skip_special_tokens else f"<{i}>") for i in ids)


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def stream(det: IncrementalDetokenizer, token_ids: list[int]) -> list[DetokenizerUpdate]:
    """Feed tokens one at a time, as the engine does, until a stop string matches."""
    updates = []
    for t in token_ids:
        updates.append(det.append([t]))
        if updates[-1].stop_str is not None:
            break
    return updates


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_pretrained(make_model(tmp_path_factory.mktemp("tiny"), "tiny", with_weights=False))


# --- text -------------------------------------------------------------------------------
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_streamed_text_equals_the_full_decode_for_any_tokens(tiny_tokenizer, skip_special_tokens):
    """Random ids include lone UTF-8 continuation bytes and special tokens: the hardest case."""
    rng = random.Random(0)
    prompt = tiny_tokenizer.encode("A prompt")
    for _ in range(200):
        ids = [rng.randrange(tiny_tokenizer.vocab_size) for _ in range(rng.randrange(1, 30))]
        det = IncrementalDetokenizer(tiny_tokenizer, prompt, Params(skip_special_tokens=skip_special_tokens))
        streamed = "".join(det.append([t]).text for t in ids) + det.finish()
        assert streamed == det.text == tiny_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_characters_split_across_tokens_appear_once_complete(tiny_tokenizer):
    text = "日本語 😀 👨‍👩‍👧 café"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tiny_tokenizer.decode([i]) for i in ids)  # the byte-level BPE splits characters
    det = IncrementalDetokenizer(tiny_tokenizer, [], Params())
    deltas = [u.text for u in stream(det, ids)]
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # a token that ends mid-character emits nothing...
    assert "".join(deltas) + det.finish() == text  # ...and the character comes whole later


def test_an_unfinished_character_is_flushed_as_replacement_at_the_end(tiny_tokenizer):
    ids = tiny_tokenizer.encode("ok 😀", add_special_tokens=False)[:-1]  # cut inside the emoji
    det = IncrementalDetokenizer(tiny_tokenizer, [], Params())
    streamed = "".join(u.text for u in stream(det, ids))
    assert "\ufffd" not in streamed
    assert streamed + det.finish() == tiny_tokenizer.decode(ids)


def test_batches_of_tokens_stream_the_same_text(tiny_tokenizer):
    """A decode node continues a request with the tokens the prefill node sampled."""
    ids = tiny_tokenizer.encode("Grüße aus München! 🚀 done", add_special_tokens=False)
    det = IncrementalDetokenizer(tiny_tokenizer, [], Params())
    first = det.append(ids[:5]).text
    assert first + "".join(u.text for u in stream(det, ids[5:])) + det.finish() == tiny_tokenizer.decode(ids)


def test_each_step_decodes_a_small_window_not_the_whole_output(tiny_tokenizer):
    calls: list[int] = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return tiny_tokenizer.decode(ids, skip_special_tokens)

    ids = tiny_tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 20, add_special_tokens=False)
    det = IncrementalDetokenizer(Counting(), tiny_tokenizer.encode("prompt " * 50), Params())
    stream(det, ids)
    assert len(ids) > 150 and max(calls) <= 8


def test_skip_special_tokens_decides_whether_they_show(tiny_tokenizer):
    ids = tiny_tokenizer.encode("<|im_start|>hi<|im_end|>", add_special_tokens=False)
    for skip, expected in [(True, "hi"), (False, "<|im_start|>hi<|im_end|>")]:
        det = IncrementalDetokenizer(tiny_tokenizer, [], Params(skip_special_tokens=skip))
        assert "".join(u.text for u in stream(det, ids)) + det.finish() == expected


def test_first_word_keeps_its_space_with_a_sentencepiece_decoder():
    """Metaspace decoders drop a decode's leading space; prompt context keeps it."""
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "▁again": 3, "!": 4}
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok = Tokenizer(backend)
    det = IncrementalDetokenizer(tok, [1, 2], Params())  # prompt: "Hello world"
    assert [u.text for u in stream(det, [3, 4])] == [" again", "!"]


# --- stop strings -----------------------------------------------------------------------
def test_a_stop_string_spanning_tokens_cuts_the_output_before_it():
    det = IncrementalDetokenizer(CharTokenizer(), [], Params(stop=["STOP"]))
    updates = stream(det, chars("Hello STOP and more"))
    assert updates[-1].stop_str == "STOP"
    assert det.text == "".join(u.text for u in updates) == "Hello "
    assert det.finish() == ""


class ByteTokenizer:
    """Tokens of raw bytes, so a token can end part-way through a character."""

    VOCAB = {1: b"ab", 2: b"cd\xe4", 9: b"x"}

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(self.VOCAB[i] for i in ids).decode("utf-8", errors="replace")


def test_a_stop_string_the_final_flush_completes_still_sends_the_text_before_it():
    det = IncrementalDetokenizer(ByteTokenizer(), [9], Params(stop=["bq", "cd"]))
    deltas = [det.append([1]).text, det.append([2]).text]  # "b" held back (it may start "bq"); "cd\xe4" unfinished
    assert deltas == ["a", ""]
    deltas.append(det.finish())  # the end flushes "cd\ufffd": "cd" is a stop string
    assert "".join(deltas) == det.text == "ab" and det.stop_str == "cd"


def test_include_stop_str_in_output_keeps_the_stop_string():
    det = IncrementalDetokenizer(CharTokenizer(), [], Params(stop=["STOP"], include_stop_str_in_output=True))
    updates = stream(det, chars("Hello STOP and more"))
    assert det.text == "".join(u.text for u in updates) == "Hello STOP"


def test_text_that_may_start_a_stop_string_is_held_back_until_known():
    det = IncrementalDetokenizer(CharTokenizer(), [], Params(stop=["world!"]))
    deltas = [u.text for u in stream(det, chars("hello wor"))]
    assert "".join(deltas) == "hello "  # "wor" could become "world!"
    assert det.append(chars("m")).text == "worm"  # now it cannot
    assert det.append(chars(" wo")).text == " "
    assert det.finish() == "wo"  # the end: nothing can complete it


def test_a_stream_never_shows_part_of_a_stop_string(tiny_tokenizer):
    text = "Some text, then the end marker: </answer> and trailing junk"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    for stop in ["</answer>", "r: </", "junk", "\n\n"]:
        det = IncrementalDetokenizer(tiny_tokenizer, [], Params(stop=[stop]))
        streamed = "".join(u.text for u in stream(det, ids)) + det.finish()
        assert streamed == det.text == text.split(stop)[0]


def expected_output(text: str, stops: list[str], include: bool) -> str:
    """The contract: cut at the stop string that completes first (the longest if two end
    together), before it or, with include_stop_str_in_output, after it."""
    for end in range(1, len(text) + 1):
        matches = [s for s in stops if text[:end].endswith(s)]
        if matches:
            s = max(matches, key=len)
            return text[:end] if include else text[:end - len(s)]
    return text


@pytest.mark.parametrize("include", [False, True])
def test_streams_match_the_stop_string_contract_for_random_texts(include):
    rng = random.Random(1)
    for _ in range(500):
        text = "".join(rng.choice("ab.") for _ in range(rng.randrange(1, 20)))
        stops = ["".join(rng.choice("ab.") for _ in range(rng.randrange(1, 4))) for _ in range(rng.randrange(1, 3))]
        det = IncrementalDetokenizer(CharTokenizer(), [], Params(stop=stops, include_stop_str_in_output=include))
        final = expected_output(text, stops, include)
        streamed, ids = "", chars(text)
        while ids and not det.finished:
            n = rng.randrange(1, 4)  # engines append one token, or several at once
            update = det.append(ids[:n])
            ids = ids[n:]
            streamed += update.text
            assert final.startswith(streamed), (text, stops)  # nothing shown is ever taken back
        streamed += det.finish()
        assert streamed == det.text == final, (text, stops)


def test_the_stop_string_that_completes_first_wins():
    det = IncrementalDetokenizer(CharTokenizer(), [], Params(stop=["abcd", "bc", "zz"]))
    updates = stream(det, chars("xabcdzz"))
    assert updates[-1].stop_str == "bc" and det.text == "xa"


def test_several_tokens_in_one_append_stop_at_the_first_stop_string():
    det = IncrementalDetokenizer(CharTokenizer(), [], Params(stop=["."]))
    update = det.append(chars("One. Two. Three."))
    assert update == DetokenizerUpdate("One", ".")
    assert det.append(chars("more")) == DetokenizerUpdate()  # finished: later tokens are ignored


def test_stop_strings_do_not_count_before_min_tokens():
    det = IncrementalDetokenizer(CharTokenizer(), [], Params(stop=["."], min_tokens=4))
    updates = stream(det, chars("a.b.c"))
    assert updates[-1].stop_str == "." and det.text == "a.b"


def test_the_text_of_an_eos_that_ends_the_request_is_left_out():
    eos = 0x110000
    det = IncrementalDetokenizer(CharTokenizer(), [], Params(skip_special_tokens=False))
    assert det.append(chars("hi")).text == "hi"
    assert det.append([eos], last_is_stop_token=True).text == ""
    assert det.finish() == "" and det.text == "hi" and det.num_output_tokens == 3
    kept = IncrementalDetokenizer(CharTokenizer(), [],
                                  Params(skip_special_tokens=False, include_stop_str_in_output=True))
    kept.append(chars("hi"))
    kept.append([eos], last_is_stop_token=True)
    assert kept.text == "hi<1114112>"


# --- token-level stops ------------------------------------------------------------------
EOS = 2


@pytest.mark.parametrize("token, n, params, expected", [
    (5, 1, Params(), None),
    (EOS, 1, Params(), ("stop", None)),
    (EOS, 1, Params(ignore_eos=True), None),
    (EOS, 2, Params(min_tokens=3), None),
    (EOS, 3, Params(min_tokens=3), ("stop", None)),
    (7, 1, Params(stop_token_ids=[7]), ("stop", 7)),
    (7, 1, Params(stop_token_ids=[7], ignore_eos=True), ("stop", 7)),
    (7, 1, Params(stop_token_ids=[7], min_tokens=2), None),
    (5, 16, Params(max_tokens=16), ("length", None)),
    (EOS, 16, Params(max_tokens=16), ("stop", None)),  # stopping on the last allowed token is a choice
    (EOS, 16, Params(max_tokens=16, min_tokens=20), ("length", None)),
    (5, 100, Params(max_tokens=None), None),
])
def test_check_stop_precedence(token, n, params, expected):
    assert check_stop(token, n, params, {EOS}, None) == expected


def test_check_stop_prefers_the_engines_max_tokens():
    """The engine caps max_tokens by the room left in the context."""
    assert check_stop(5, 4, Params(max_tokens=16), {EOS}, max_tokens=4) == ("length", None)
    assert check_stop(5, 4, Params(max_tokens=16), {EOS}, max_tokens=8) is None
