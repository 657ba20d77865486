"""Reference kit: agreement passes; a wrong token or a skewed logprob fails, naming where."""
from __future__ import annotations

import pytest

from ci.kits import reference
from ci.kits.client import KitFailure
from ci.kits.reference import Decode, Step
from tests.fakes.openai_engine import FakeReference, fake_engine

PROMPTS = ("The capital of France is", "Once upon a time")
TOL = 0.05
KW = dict(prompts=PROMPTS, n_tokens=12, min_tokens=4, top_k=3, logprob_tol=TOL, tie_margin=0.1)


def test_engine_that_agrees_with_the_reference_passes(capsys):
    with fake_engine() as srv:
        result = reference.check_reference(srv, FakeReference(), **KW)
    assert result.matched == 2 * 12 and result.max_diff == 0.0
    assert "24 greedy tokens equal to the reference, 0 near-tie stop(s); max top-k logprob difference 0.00e+00 over 72 shared" in capsys.readouterr().out


def test_engine_whose_greedy_token_diverges_fails_naming_the_position():
    # Diverging to a token the reference trails by 2 nats is no near tie.
    with fake_engine(diverge_at=5) as srv:
        with pytest.raises(KitFailure, match=r"^engine disagrees with the reference on 2/2 "
                                             r"prompt\(s\); .*greedy token 5 is ' t\d+', reference "
                                             r"' t\d+' \(reference prefers it by 2.000 nats\)"):
            reference.check_reference(srv, FakeReference(), **KW)


def test_engine_with_skewed_logprobs_fails_though_every_token_matches():
    with fake_engine(logprob_skew=0.2) as srv:
        with pytest.raises(KitFailure, match=r"logprob differs by more than 0.05 at token 0"):
            reference.check_reference(srv, FakeReference(), **KW)


def test_skew_within_the_tolerance_passes():
    with fake_engine(logprob_skew=0.01) as srv:
        result = reference.check_reference(srv, FakeReference(), **KW)
    assert result.max_diff == pytest.approx(0.01)


def _decode(tokens, tops):
    return Decode("p", tuple(Step(t, top[t], top) for t, top in zip(tokens, tops)))


def test_near_tie_after_min_tokens_stops_the_comparison_but_before_it_fails():
    same = {"a": -0.1, "b": -3.0}
    tie_ref = {"x": -0.70, "y": -0.72}
    tie_eng = {"y": -0.70, "x": -0.71}
    ref = _decode(["a", "a", "x", "a"], [same, same, tie_ref, same])
    eng = _decode(["a", "a", "y", "b"], [same, same, tie_eng, same])
    ok = reference.compare(eng, ref, n_tokens=4, min_tokens=2, top_k=2, logprob_tol=0.05,
                           tie_margin=0.05)
    assert ok.failure is None and ok.tie_at == 2 and ok.matched == 2
    early = reference.compare(eng, ref, n_tokens=4, min_tokens=3, top_k=2, logprob_tol=0.05,
                              tie_margin=0.05)
    assert early.failure and "greedy token 2 is 'y', reference 'x'" in early.failure


def test_more_near_ties_than_allowed_fail():
    class TiedReference:
        """Agrees with the fake engine except for a near tie at position 2 of every prompt."""

        def greedy(self, prompt, n_tokens, top_k):
            real = FakeReference().greedy(prompt, n_tokens, top_k)
            steps = list(real.steps)
            eng = steps[2].token
            other = f" t{int(eng.strip()[1:]) + 1}"  # the engine's own runner-up
            steps[2] = Step(other, -1.0, {other: -1.0, eng: -1.01})
            return Decode(prompt, tuple(steps))

    with fake_engine() as srv:
        with pytest.raises(KitFailure, match=r"^2 prompts stopped at a near tie \(at most 1 "
                                             r"allowed\): positions \[2, 2\]"):
            reference.check_reference(srv, TiedReference(), **{**KW, "min_tokens": 2})


def test_engine_stopping_early_fails():
    ref = _decode(["a", "a"], [{"a": -0.1}, {"a": -0.1}])
    eng = _decode(["a"], [{"a": -0.1}])
    cmp = reference.compare(eng, ref, n_tokens=2, min_tokens=1, top_k=1, logprob_tol=0.05,
                            tie_margin=0.05)
    assert cmp.failure == "engine stopped after 1 tokens, 2 asked"


def test_min_tokens_must_fit_in_n_tokens():
    with fake_engine() as srv:
        with pytest.raises(ValueError, match="need 0 < min_tokens <= n_tokens"):
            reference.check_reference(srv, FakeReference(), prompts=PROMPTS, n_tokens=4,
                                      min_tokens=5, logprob_tol=TOL, tie_margin=0.1)


def test_the_figures_reach_the_job_summary_pass_or_fail(tmp_path):
    summary = tmp_path / "step_summary.md"
    with fake_engine() as srv:
        reference.check_reference(srv, FakeReference(), summary_path=summary, **KW)
    with fake_engine(diverge_at=5) as srv, pytest.raises(KitFailure):
        reference.check_reference(srv, FakeReference(), summary_path=summary, **KW)
    text = summary.read_text()
    assert "### reference (fake-model): pass" in text and "### reference (fake-model): FAIL" in text
    assert "24 greedy tokens equal to the reference" in text
