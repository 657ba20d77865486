"""Performance budget (ci/kits/perf.py): always reported; enforced where the profile says."""
from __future__ import annotations

import pytest

from ci.kits import perf

# Kit figure name -> the PerfBudget field that bounds it.
_BOUND_OF = {"output_tok_s": "min_output_tok_s", "ttft_p50_s": "max_ttft_p50_s",
             "ttft_p95_s": "max_ttft_p95_s", "latency_p50_s": "max_latency_p50_s",
             "latency_p95_s": "max_latency_p95_s"}


def test_performance_budget(server, kiln_profile, kiln_thresholds, kit_summary, beside_bounds):
    budget, enforce = kiln_thresholds.perf, kiln_thresholds.enforce_perf
    result = perf.measure(server, requests=budget.requests, concurrency=budget.concurrency,
                          max_tokens=budget.max_tokens, enforced=enforce)
    result.violations = perf.violations(result, budget)
    print(result.table())
    beside_bounds("perf", result.figures(),
                  {name: getattr(budget, field) for name, field in _BOUND_OF.items()})
    with kit_summary.open("a", encoding="utf-8") as fh:
        fh.write(result.markdown(f"perf on {kiln_profile.name} ({kiln_profile.default_model})") + "\n")
    if enforce and result.violations:
        pytest.fail("performance budget broken: " + "; ".join(result.violations), pytrace=False)
