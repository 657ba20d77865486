"""A bound is enforced only when measured (ci/kits/enforce.py), shown on the e2e tests themselves.

The perf and accuracy e2e tests (tests/e2e/) are driven here against the fake
engine with the rule the e2e conftest gives them: an estimate that the
engine breaks reports "uncalibrated" and the test passes; the same bound,
measured, fails the test.
"""
from __future__ import annotations

import dataclasses
import logging
from types import MappingProxyType

import pytest

import tests.e2e.conftest as e2e_conftest
import tests.e2e.test_accuracy as e2e_accuracy
import tests.e2e.test_perf as e2e_perf
from ci.kits import enforce, thresholds
from ci.kits.thresholds import Bound
from ci.profiles.runners import PROFILES
from ci.report import render
from ci.report.junit import PASSED, CaseResult, RunResult
from tests.fakes.openai_engine import fake_engine

H100 = PROFILES["h100-1"]  # perf enforced there; its default model is Qwen
EST = "estimate: a guess for the test"
MEAS = "measured: a cited run for the test"


def budget(reason: str) -> thresholds.PerfBudget:
    """A small load whose throughput floor (10^9 tok/s) no machine reaches; the rest generous."""
    return thresholds.PerfBudget(requests=6, concurrency=3, max_tokens=8,
                                 min_output_tok_s=Bound(1e9, reason), max_ttft_p50_s=Bound(30.0, reason),
                                 max_ttft_p95_s=Bound(30.0, reason), max_latency_p50_s=Bound(30.0, reason),
                                 max_latency_p95_s=Bound(30.0, reason))


@pytest.fixture
def e2e(tmp_path):
    """(rule, summary file, recorded properties) as the e2e conftest would hand them to a test on h100-1."""
    summary, recorded = tmp_path / "kit-summary-e2e-h100-1.md", []
    rule = e2e_conftest.bounds_rule(H100, lambda k, v: recorded.append((k, v)), summary)
    return rule, summary, recorded


def run_perf_test(rule, summary, perf_budget):
    th = dataclasses.replace(thresholds.for_profile("h100-1"), perf=perf_budget)
    with fake_engine() as srv:
        e2e_perf.test_performance_budget(srv, H100, th, summary, rule)


def test_a_broken_estimate_reports_uncalibrated_and_the_test_passes(e2e, caplog):
    rule, summary, recorded = e2e
    with caplog.at_level(logging.WARNING, logger="kiln.e2e"):
        run_perf_test(rule, summary, budget(EST))  # returns: no failure
    hint = "uncalibrated: run `invoke calibrate --profile h100-1`"
    # Logged, so a passing test shows it live (e2e sessions run with log_cli).
    out = caplog.text
    assert hint in out and "would break: output " in out and "< 1e+09" in out
    assert [k for k, _ in recorded] == [render.UNCALIBRATED_PROPERTY] and recorded[0][1].startswith(hint)
    text = summary.read_text()
    assert "### perf on h100-1" in text and "**uncalibrated**: run `invoke calibrate --profile h100-1`" in text


def test_the_same_bound_measured_fails_the_test(e2e):
    rule, summary, recorded = e2e
    with pytest.raises(pytest.fail.Exception, match=r"^measured bound broken: output .* tok/s < 1e\+09$"):
        run_perf_test(rule, summary, budget(MEAS))
    assert recorded == [] and "uncalibrated" not in summary.read_text()


def test_only_the_estimates_go_unenforced_in_a_mixed_budget(e2e):
    rule, summary, recorded = e2e
    mixed = dataclasses.replace(budget(MEAS), min_output_tok_s=Bound(1e9, EST))
    run_perf_test(rule, summary, mixed)  # the broken bound is the estimate; the measured ones hold
    assert "estimates, not enforced: perf.min_output_tok_s 1e+09;" in recorded[0][1]
    assert "max_ttft" not in recorded[0][1]


def test_an_estimate_accuracy_floor_is_reported_a_measured_one_fails(e2e):
    rule, summary, recorded = e2e
    qwen = H100.default_model
    row = thresholds.for_profile("h100-1")
    for reason, fails in ((EST, False), (MEAS, True)):
        th = dataclasses.replace(row, accuracy_floors=MappingProxyType({qwen: Bound(0.6, reason)}))
        with fake_engine(mc_skill=0.5) as srv:
            if fails:
                with pytest.raises(pytest.fail.Exception, match=r"accuracy acc_norm 0.500 < floor 0.6 over 60"):
                    e2e_accuracy.test_accuracy_is_above_the_floor(srv, H100, th, rule)
            else:
                e2e_accuracy.test_accuracy_is_above_the_floor(srv, H100, th, rule)
    assert len(recorded) == 1 and "accuracy 0.6; would break: accuracy acc_norm 0.500" in recorded[0][1]


def test_perf_report_only_profiles_never_fail_even_on_a_measured_bound(e2e, caplog):
    rule, summary, _ = e2e
    broken = enforce.Check("perf.min_output_tok_s", Bound(1e9, MEAS), False, "output 5 tok/s < 1e+09")
    judged = rule([broken], enforced=False)  # returns: the profile makes perf report-only
    assert judged.failure() and "report only on h100-1: measured bound broken" in caplog.text


def test_judge_splits_and_an_unlabelled_bound_counts_as_an_estimate():
    checks = [enforce.Check("a", Bound(1, MEAS), False, "a broke"), enforce.Check("b", Bound(2, MEAS), True),
              enforce.Check("c", Bound(3, EST), True), enforce.Check("d", Bound(4), False, "d broke")]
    j = enforce.judge(checks, "cpu", model="smollm2-135m")
    assert [c.name for c in j.failures] == ["a"] and [c.name for c in j.uncalibrated] == ["c", "d"]
    assert j.failure() == "measured bound broken: a broke"
    assert j.uncalibrated_line() == ("uncalibrated: run `invoke calibrate --profile cpu --model smollm2-135m` "
                                     "(estimates, not enforced: c 3, d 4; would break: d broke)")
    assert enforce.judge(checks[:2], "cpu").uncalibrated_line() is None
    assert enforce.judge(checks[1:3], "cpu").failure() is None


def test_the_report_verdict_counts_uncalibrated_passes():
    cases = (CaseResult("t::perf", PASSED, properties=((render.UNCALIBRATED_PROPERTY, "uncalibrated: x"),)),
             CaseResult("t::api", PASSED))
    line = render.verdict(RunResult(cases, duration=3.0), "e2e-h100-1")
    assert "passed: 2 passed (1 uncalibrated: estimates not enforced) in" in line
    assert "uncalibrated" not in render.verdict(RunResult(cases[1:], duration=3.0), "e2e-h100-1")
