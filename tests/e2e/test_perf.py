"""Performance budget (ci/kits/perf.py): always reported; a measured bound enforced where the
profile says, an estimate never (ci/kits/enforce.py: it reports "uncalibrated").

The test is the kit's own ``check_perf`` -- the code its unit tests
(tests/unit/test_kits_perf.py) cover -- with this run's budget, mode and the bounds rule.
"""
from __future__ import annotations

from ci.kits import perf


def test_performance_budget(server, kiln_profile, kiln_thresholds, kit_summary, enforce_bounds):
    perf.check_perf(server, kiln_thresholds.perf, enforce=kiln_thresholds.enforce_perf,
                    summary_path=kit_summary, rule=enforce_bounds,
                    title=f"perf on {kiln_profile.name} ({kiln_profile.default_model})")
