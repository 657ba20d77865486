"""Performance-budget kit: figures, bounds, enforce vs report-only."""
from __future__ import annotations

import dataclasses
import math

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
