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


def test_engine_that_agrees_with_the_reference_passes(caplog):
    caplog.set_level("INFO", logger="ci.kits.reference")
    with fake_engine() as srv:
        result = reference.check_reference(srv, FakeReference(), **KW)
    assert result.matched == 2 * 12 and result.max_diff == 0.0
    assert ("24 greedy tokens equal to the reference, 0 near-tie stop(s); max top-k logprob difference "
            "0.00e+00 over 72 shared top-k entries (tolerance 0.05; float32; p50 0.00e+00") in caplog.text


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
    assert "### reference (fake-model, float32): pass" in text and "### reference (fake-model, float32): FAIL" in text
    assert "24 greedy tokens equal to the reference" in text


# -- the bfloat16 rule (vLLM's check_logprobs_close): equal until the first difference,
# there each token in the other's top-k, then stop.

def test_bf16_identical_decodes_pass_and_record_every_shared_logprob():
    top = {"a": -0.1, "b": -2.5, "c": -4.0}
    ref = _decode(["a", "a", "a"], [top] * 3)
    cmp = reference.compare_topk(ref, ref, n_tokens=3, top_k=3)
    assert cmp.failure is None and cmp.tie_at is None and cmp.matched == 3
    assert cmp.diffs == [0.0] * 9 and cmp.max_diff == 0.0


def test_bf16_near_tie_swap_inside_both_top_k_passes_and_stops_the_comparison():
    same = {"a": -0.1, "b": -3.0}
    ref = _decode(["a", "x", "a"], [same, {"x": -0.69, "y": -0.70}, same])
    # After the swap the engine continues from another token: nothing there is compared.
    eng = _decode(["a", "y", "zzz"], [same, {"y": -0.68, "x": -0.71}, {"zzz": -0.01}])
    cmp = reference.compare_topk(eng, ref, n_tokens=3, top_k=2)
    assert cmp.failure is None and cmp.tie_at == 1 and cmp.matched == 1 and cmp.compared == 1


def test_bf16_swap_outside_top_k_fails_in_one_line_naming_position_and_tokens():
    same = {"a": -0.1, "b": -3.0}
    ref = _decode(["a", "a", "x"], [same, same, {"x": -0.2, "w": -1.9}])
    eng = _decode(["a", "a", "y"], [same, same, {"y": -0.3, "x": -1.5}])
    cmp = reference.compare_topk(eng, ref, n_tokens=3, top_k=2)
    assert cmp.failure == "greedy token 2 is 'y', reference 'x': engine's 'y' is not in the reference's top 2"
    assert "\n" not in cmp.failure
    # Both sides missing: both named.
    eng2 = _decode(["a", "a", "y"], [same, same, {"y": -0.3, "v": -1.5}])
    both = reference.compare_topk(eng2, ref, n_tokens=3, top_k=2).failure
    assert both.endswith("engine's 'y' is not in the reference's top 2; "
                         "reference's 'x' is not in the engine's top 2")


def test_bf16_rule_through_the_kit_measures_without_failing_on_logprobs_unless_given_a_tolerance():
    with fake_engine(logprob_skew=0.2) as srv:
        measured = reference.check_reference(srv, FakeReference(), **{**KW, "logprob_tol": None},
                                             dtype="bfloat16")
        assert measured.max_diff == pytest.approx(0.2) and measured.matched == 24
        assert "(measured only; bfloat16;" in measured.line()
        with pytest.raises(KitFailure, match=r"logprob differs by more than 0.05 at token 0"):
            reference.check_reference(srv, FakeReference(), **KW, dtype="bfloat16")


def test_bf16_rule_through_the_kit_accepts_a_swap_and_fails_a_token_outside_top_k():
    # The fake diverges at 5 to a token 2 nats behind in the reference's top 3, and keeps the
    # reference's token in its own top 3: the float32 rule fails that (no near tie), the bf16
    # rule accepts it as a swap and stops there.
    with fake_engine(diverge_at=5) as srv:
        result = reference.check_reference(srv, FakeReference(), **KW, dtype="bfloat16")
    assert [c.tie_at for c in result.comparisons] == [5, 5] and result.matched == 10

    class FarReference:
        """The fake's decode, but position 2's top-k holds none of the engine's tokens."""

        def greedy(self, prompt, n_tokens, top_k):
            steps = list(FakeReference().greedy(prompt, n_tokens, top_k).steps)
            steps[2] = Step(" far", -0.1, {" far": -0.1, " farther": -2.0})
            return Decode(prompt, tuple(steps))

    with fake_engine() as srv:
        with pytest.raises(KitFailure, match=r"^engine disagrees with the reference on 2/2 prompt\(s\); "
                                             r"first .*: greedy token 2 is ' t\d+', reference ' far': "
                                             r"engine's ' t\d+' is not in the reference's top 3; "
                                             r"reference's ' far' is not in the engine's top 3$"):
            reference.check_reference(srv, FarReference(), **KW, dtype="bfloat16")


def test_an_unknown_dtype_has_no_rule():
    with fake_engine() as srv, pytest.raises(ValueError, match="no reference rule for dtype 'float16'"):
        reference.check_reference(srv, FakeReference(), **KW, dtype="float16")


def test_quantile_is_nearest_rank_and_nan_when_empty():
    assert reference.quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert reference.quantile([1.0, 2.0], 1.0) == 2.0
    assert reference.quantile([], 0.5) != reference.quantile([], 0.5)  # NaN
