"""Performance-budget kit: figures, bounds, enforce vs report-only."""
from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest

from ci.kits import perf
from ci.kits.client import KitFailure
from ci.kits.thresholds import Bound, PerfBudget
from tests.fakes.openai_engine import fake_engine

GENEROUS = PerfBudget(requests=6, concurrency=3, max_tokens=8,
                      min_output_tok_s=Bound(1.0), max_ttft_p50_s=Bound(30.0),
                      max_ttft_p95_s=Bound(30.0), max_latency_p50_s=Bound(30.0),
                      max_latency_p95_s=Bound(30.0))
# Above what any machine can do: 10^9 tok/s and 1 ns first tokens.
IMPOSSIBLE = dataclasses.replace(GENEROUS, min_output_tok_s=Bound(1e9),
                                 max_ttft_p95_s=Bound(1e-9))


def test_percentile_interpolates_between_ranks():
    assert perf.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert perf.percentile([1.0, 2.0], 95) == pytest.approx(1.95)
    assert perf.percentile([5.0], 95) == 5.0
    assert math.isnan(perf.percentile([], 50))


def test_within_budget_passes_and_reports(tmp_path, capsys):
    summary = tmp_path / "summary.md"
    with fake_engine() as srv:
        result = perf.check_perf(srv, GENEROUS, enforce=True, summary_path=summary, title="cpu")
    assert result.output_tokens == 6 * 8 and not result.violations
    assert len(result.ttft_s) == 6 and all(t <= lat for t, lat in zip(result.ttft_s, result.latency_s))
    assert "output_tok_s" in capsys.readouterr().out
    text = summary.read_text()
    assert text.startswith("### cpu") and "within budget" in text and "| ttft_p95_s |" in text


def test_budget_above_reality_fails_when_enforced_listing_every_broken_bound():
    with fake_engine() as srv:
        with pytest.raises(KitFailure) as exc:
            perf.check_perf(srv, IMPOSSIBLE, enforce=True)
    lines = str(exc.value).splitlines()
    assert lines[0].startswith("performance budget broken: output ") and "< 1e+09" in lines[0]
    assert lines[1].strip().startswith("ttft_p95_s ") and lines[1].endswith("> 1e-09")


def test_budget_above_reality_is_reported_not_raised_when_not_enforced(tmp_path):
    summary = tmp_path / "summary.md"
    with fake_engine() as srv:
        result = perf.check_perf(srv, IMPOSSIBLE, enforce=False, summary_path=summary)
    assert len(result.violations) == 2
    assert "report only" in summary.read_text() and "tok/s < 1e+09" in summary.read_text()


def test_failed_requests_fail_even_when_not_enforced():
    # Figures from a partial run mean nothing, enforced or not.
    with fake_engine(fail_every=3) as srv:
        with pytest.raises(KitFailure, match=r"^perf run: 2/6 requests failed"):
            perf.check_perf(srv, GENEROUS, enforce=False)


def test_each_figure_is_printed_beside_its_bound_and_basis(capsys):
    budget = dataclasses.replace(GENEROUS, min_output_tok_s=Bound(1.0, "measured: h200, run 123"))
    with fake_engine() as srv:
        perf.check_perf(srv, budget, enforce=True)
    out = capsys.readouterr().out
    assert "bound >= 1        (measured: h200, run 123)" in out
    assert all(f"{name} " in out for name in perf.BOUND_OF)
    assert "ttft_p95_s" in out and "bound <= 30       (reference)" in out


def _run_e2e_test(summary, enforce: bool, reason: str = "measured: a cited run for the test"):
    # The e2e test itself (tests/e2e/test_perf.py), its fixtures filled in by hand, the
    # bounds rule the e2e conftest gives it (tests/unit/test_enforce.py covers estimates).
    import tests.e2e.conftest as e2e_conftest  # noqa: PLC0415  (test modules, imported for their code)
    from tests.e2e import test_perf as e2e_perf  # noqa: PLC0415

    profile = SimpleNamespace(name="cpu", default_model="tiny-llama")
    budget = dataclasses.replace(IMPOSSIBLE, **{
        f.name: Bound(getattr(IMPOSSIBLE, f.name).value, reason)
        for f in dataclasses.fields(IMPOSSIBLE) if isinstance(getattr(IMPOSSIBLE, f.name), Bound)})
    th = SimpleNamespace(perf=budget, enforce_perf=enforce)
    rule = e2e_conftest.bounds_rule(profile, lambda k, v: None, summary)
    with fake_engine() as srv:
        e2e_perf.test_performance_budget(srv, profile, th, summary, rule)


def test_the_e2e_test_is_check_perf_report_only_where_the_profile_does_not_enforce(tmp_path, caplog):
    summary = tmp_path / "kit-summary.md"
    _run_e2e_test(summary, enforce=False)
    text = summary.read_text()
    assert text.startswith("### perf on cpu (tiny-llama)") and "(report only)" in text
    assert "tok/s < 1e+09" in text
    assert "report only on cpu: measured bound broken: output " in caplog.text


def test_the_e2e_test_fails_where_the_profile_enforces_a_measured_bound(tmp_path):
    with pytest.raises(pytest.fail.Exception, match=r"^measured bound broken: output "):
        _run_e2e_test(tmp_path / "kit-summary.md", enforce=True)
