"""Performance budget (ci/kits/perf.py): always reported; enforced where the profile says."""
from __future__ import annotations

import os

from ci import thresholds
from ci.kits import perf


def test_performance_budget(server, kiln_profile):
    th = thresholds.for_profile(kiln_profile.name)
    perf.check_perf(server, th.perf, enforce=th.enforce_perf,
                    summary_path=os.environ.get("GITHUB_STEP_SUMMARY"),
                    title=f"perf on {kiln_profile.name}")
