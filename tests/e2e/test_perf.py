"""Performance budget (ci/kits/perf.py): always reported; a measured bound enforced where the
profile says, an estimate never (ci/kits/enforce.py: it reports "uncalibrated")."""
from __future__ import annotations

from ci.kits import perf


def test_performance_budget(server, kiln_profile, kiln_thresholds, kit_summary, beside_bounds,
                            enforce_bounds):
    budget, enforce = kiln_thresholds.perf, kiln_thresholds.enforce_perf
    result = perf.measure(server, requests=budget.requests, concurrency=budget.concurrency,
                          max_tokens=budget.max_tokens, enforced=enforce)
    checks = perf.checks(result, budget)
    result.violations = [c.detail for c in checks if not c.ok]
    print(result.table())
    beside_bounds("perf", result.figures(),
                  {name: getattr(budget, field) for name, field in perf.BOUND_OF.items()})
    with kit_summary.open("a", encoding="utf-8") as fh:
        fh.write(result.markdown(f"perf on {kiln_profile.name} ({kiln_profile.default_model})") + "\n")
    enforce_bounds(checks, enforced=enforce)
