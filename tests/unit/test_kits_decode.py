"""Decode-correctness kit against the fake engine."""
from __future__ import annotations

import dataclasses

import pytest

from ci.kits import decode
from ci.kits.client import KitFailure
from tests.fakes.openai_engine import FAKE_BACKEND, fake_engine

# A fake that, like vLLM, accepts ignore_eos (so the exact-count path runs).
IGNORE_EOS_FAKE = dataclasses.replace(FAKE_BACKEND, accepts_ignore_eos=True)


def test_decode_checks_pass_against_a_deterministic_engine():
    with fake_engine(backend=IGNORE_EOS_FAKE) as srv:
        decode.check_decode(srv)


def test_nondeterministic_greedy_fails_naming_the_divergence():
    with fake_engine(deterministic=False) as srv:
        with pytest.raises(KitFailure, match=r"temperature 0 is not deterministic \(run 1 vs 2\): "
                                             r"tokens diverge at position \d+"):
            decode.check_greedy_deterministic(srv)


def test_too_many_tokens_fails():
    with fake_engine(backend=IGNORE_EOS_FAKE, extra_tokens=1) as srv:
        with pytest.raises(KitFailure, match="max_tokens=1 exceeded: 2 tokens generated"):
            decode.check_max_tokens(srv)


def test_too_few_tokens_with_ignore_eos_fails():
    with fake_engine(backend=IGNORE_EOS_FAKE, extra_tokens=-1) as srv:
        with pytest.raises(KitFailure, match=r"max_tokens=7 with ignore_eos gave 6 tokens"):
            decode.check_max_tokens(srv, cases=(7,))


def test_too_few_tokens_reported_as_length_fails_even_without_ignore_eos():
    with fake_engine(extra_tokens=-1) as srv:
        with pytest.raises(KitFailure, match="finish_reason 'length' after only 6 tokens"):
            decode.check_max_tokens(srv, cases=(7,), ignore_eos=False)


def test_usage_disagreeing_with_the_tokens_fails():
    with fake_engine(usage_skew=1) as srv:
        with pytest.raises(KitFailure, match="usage says 2 completion tokens but logprobs list 1"):
            decode.check_max_tokens(srv)


def test_batch_that_decodes_differently_fails():
    with fake_engine(batch_differs=True) as srv:
        with pytest.raises(KitFailure, match=r"prompt 0 decodes differently in a batch of 4 than alone"):
            decode.check_batch_equals_singles(srv)


def test_first_divergence():
    assert decode.first_divergence(["a", "b"], ["a", "b"]) is None
    assert decode.first_divergence(["a", "b"], ["a", "c"]) == 1
    assert decode.first_divergence(["a"], ["a", "b"]) == 1


def test_ignore_eos_is_only_sent_to_engines_that_accept_it():
    assert decode.supports_ignore_eos(IGNORE_EOS_FAKE)
    assert not decode.supports_ignore_eos(FAKE_BACKEND)


def test_logprob_lists_is_the_one_shape_check():
    from ci.kits.decode import logprob_lists  # noqa: PLC0415

    good = {"tokens": ["a", "b"], "token_logprobs": [-0.1, -0.2], "top_logprobs": [{"a": -0.1}, {"b": -0.2}]}
    assert logprob_lists(good, "x") == (good["tokens"], good["token_logprobs"], good["top_logprobs"])
    assert logprob_lists({"tokens": ["a"], "token_logprobs": [-1.0]}, "x", with_top=False)[2] == []
    with pytest.raises(KitFailure, match=r"^item 3: logprobs tokens/token_logprobs/top_logprobs missing or of "
                                         r"different lengths"):
        logprob_lists({**good, "top_logprobs": [{"a": -0.1}]}, "item 3")
    with pytest.raises(KitFailure, match="missing or of different lengths"):
        logprob_lists(None, "item 4", with_top=False)
