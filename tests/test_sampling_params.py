"""SamplingParams: vLLM's names and defaults, clear validation errors, a lossless wire form."""

from __future__ import annotations

import msgspec
import pytest

from engine.sampling_params import MAX_LOGPROBS, SamplingParams, SamplingType


class WordTokenizer:
    """A toy tokenizer: a fixed table from text to ids, like a BPE that marks word starts."""

    vocab_size = 32
    eos_token_ids = frozenset({2, 3})
    table = {
        "hello": [10], " hello": [11],            # a leading space makes another token: both banned
        "bad word": [12, 13], " bad word": [14, 13],
        "same": [15, 16], " same": [15, 16],      # same tokens either way: kept once
        "longer": [17], " longer": [18, 17],      # the spaced form has more tokens: not added (vLLM)
        "oov": [40], " oov": [40],
    }

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        return list(self.table[text])


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1, 1.0, 1.0, 0, 0.0, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs) == (16, 0, None)
    assert p.stop == [] and p.stop_token_ids == [] and p.bad_words == []
    assert p.skip_special_tokens and p.spaces_between_special_tokens and p.detokenize
    assert not p.include_stop_str_in_output and not p.ignore_eos


def test_stop_and_ids_are_normalised_to_lists():
    p = SamplingParams(stop="\n\n", stop_token_ids=(7, 8), bad_words=("x",), top_k=-1)
    assert p.stop == ["\n\n"] and p.stop_token_ids == [7, 8] and p.bad_words == ["x"]
    assert p.top_k == 0  # -1 and 0 both mean "no top-k"; stored as 0


def test_greedy_and_sampling_type():
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=1e-6).sampling_type is SamplingType.GREEDY
    assert SamplingParams(temperature=0.7).sampling_type is SamplingType.RANDOM
    assert SamplingParams(temperature=0.7, seed=3).sampling_type is SamplingType.RANDOM_SEED


def test_n_above_one_is_rejected():
    with pytest.raises(ValueError, match="only n=1 is supported"):
        SamplingParams(n=2)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.1}, r"temperature=-0.1: must be between 0 \(greedy\) and 10000"),
    ({"temperature": float("nan")}, r"temperature=nan: must be between 0"),
    ({"temperature": 1e39}, r"temperature=1e\+39: must be between 0"),  # inf in float32
    ({"temperature": "hot"}, r"temperature='hot': must be a number"),
    ({"top_p": 0.0}, r"top_p=0.0: must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p=1.5: must be in \(0, 1\]"),
    ({"top_k": -2}, r"top_k=-2: must be -1 or 0 \(disabled\) or between 1 and 2147483647"),
    ({"top_k": 2**70}, r"top_k=1180591620717411303424: must be -1 or 0"),  # no longer a msgpack integer
    ({"top_k": 2.5}, r"top_k=2.5: must be an integer"),
    ({"min_p": 1.1}, r"min_p=1.1: must be in \[0, 1\]"),
    ({"presence_penalty": 2.5}, r"presence_penalty=2.5: must be in \[-2, 2\]"),
    ({"frequency_penalty": -3}, r"frequency_penalty=-3: must be in \[-2, 2\]"),
    ({"repetition_penalty": 0.0}, r"repetition_penalty=0.0: must be between 0.0001 and 10000"),
    ({"repetition_penalty": 1e-300}, r"repetition_penalty=1e-300: must be between"),  # 0 in float32
    ({"max_tokens": 0}, r"max_tokens=0: must be between 1 and 2147483647, or None"),
    ({"max_tokens": 2**64}, r"max_tokens=18446744073709551616: must be between 1"),
    ({"min_tokens": -1}, r"min_tokens=-1: must be between 0 and"),
    ({"logprobs": -1}, rf"logprobs=-1: must be between 0 and {MAX_LOGPROBS}"),
    ({"logprobs": MAX_LOGPROBS + 1}, rf"logprobs={MAX_LOGPROBS + 1}: must be between 0 and {MAX_LOGPROBS}"),
    ({"seed": 1.5}, r"seed=1.5: must be an integer"),
    ({"stop": ["ok", ""]}, r"stop contains an empty string"),
    ({"stop": ["ok"], "detokenize": False}, r"stop strings need the text: drop detokenize=false"),
    ({"stop_token_ids": [-1]}, r"stop_token_ids=\[-1\]: must be a list of token ids"),
    ({"stop_token_ids": [5, 2**64]}, r"stop_token_ids=\[5, 18446744073709551616\]: must be a list of token ids "
                                     r"\(integers from 0 to 2147483647\)"),
    ({"bad_words": ["  "]}, r"bad_words contains an empty or whitespace-only word"),
])
def test_invalid_values_name_the_field_and_the_allowed_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_min_tokens_needs_no_max_when_max_tokens_is_none():
    assert SamplingParams(max_tokens=None, min_tokens=100).min_tokens == 100


def test_update_from_tokenizer_encodes_bad_words_like_vllm():
    p = SamplingParams(bad_words=["hello", " bad word", "same", "longer"])
    p.update_from_tokenizer(WordTokenizer())
    assert p.bad_words_token_ids == [[10], [11], [12, 13], [14, 13], [15, 16], [17]]
    assert p.eos_token_ids == frozenset({2, 3})
    p.update_from_tokenizer(WordTokenizer())  # idempotent: shared params, or a second node
    assert p.bad_words_token_ids == [[10], [11], [12, 13], [14, 13], [15, 16], [17]]


def test_ignore_eos_leaves_no_eos_ids():
    p = SamplingParams(ignore_eos=True)
    p.update_from_tokenizer(WordTokenizer())
    assert p.eos_token_ids == frozenset()


def test_bad_words_outside_the_vocabulary_are_rejected():
    with pytest.raises(ValueError, match=r"token ids \[40\] outside the vocabulary \[0, 32\)"):
        SamplingParams(bad_words=["oov"]).update_from_tokenizer(WordTokenizer())


def _completed_params() -> SamplingParams:
    p = SamplingParams(temperature=0.6, top_p=0.9, top_k=40, min_p=0.05, seed=2**63 + 5, presence_penalty=0.5,
                       frequency_penalty=-0.5, repetition_penalty=1.1, max_tokens=None, min_tokens=3,
                       stop=["###"], stop_token_ids=[9], logprobs=5, bad_words=["hello", "bad word"])
    p.update_from_tokenizer(WordTokenizer())
    return p


def test_to_dict_from_dict_round_trips_with_derived_fields():
    p = _completed_params()
    again = SamplingParams.from_dict(p.to_dict())
    assert again == p
    assert again.eos_token_ids == frozenset({2, 3}) and again.bad_words_token_ids == [[10], [11], [12, 13], [14, 13]]


def test_round_trip_through_msgspec_json_and_msgpack():
    p = _completed_params()
    for codec in (msgspec.json, msgspec.msgpack):
        assert SamplingParams.from_dict(codec.decode(codec.encode(p.to_dict()))) == p
        assert SamplingParams.from_dict(codec.decode(codec.encode(p))) == p  # the dataclass itself


def test_from_dict_refuses_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown sampling params \['beam_width'\].*same version"):
        SamplingParams.from_dict({"temperature": 0.5, "beam_width": 4})


def test_from_dict_validates_like_the_constructor():
    with pytest.raises(ValueError, match="top_p=2"):
        SamplingParams.from_dict({"top_p": 2})


def test_values_are_stored_wire_safe_without_changing_what_is_sampled():
    # Seeds are used modulo 2**64 (engine/sampler.py), so they are stored that way: any int fits msgpack.
    assert SamplingParams(seed=2**64 + 5).seed == 5
    assert SamplingParams(seed=-1).seed == 2**64 - 1
    # A top_p that float32 rounds to 0 keeps only the top token either way; stored as the smallest safe value.
    from engine.sampling_params import MIN_TOP_P
    assert SamplingParams(top_p=1e-300).top_p == MIN_TOP_P
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(SamplingParams(seed=10**30, top_p=1e-300).to_dict()))
    assert SamplingParams.from_dict(wire).seed == 10**30 % 2**64
