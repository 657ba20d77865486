"""Engine occupancy while a long request decodes (ci/kits/occupancy.py), per-profile threshold."""
from __future__ import annotations

import pytest

from ci.kits import occupancy, steps


def test_engine_stays_busy_during_a_long_request(server, kiln_thresholds):
    occ = kiln_thresholds.occupancy
    print(f"occupancy bound: {occ.aggregation} >= {occ.threshold.value:g} over >= "
          f"{int(occ.min_samples.value)} samples ({occ.threshold.reason or 'reference'})")
    result = occupancy.check_occupancy(
        server, threshold=occ.threshold.value, min_samples=int(occ.min_samples.value),
        aggregation=occ.aggregation, mode=occ.mode, long_max_tokens=occ.long_max_tokens,
        interval_s=occ.interval_s, max_rounds=occ.max_rounds)
    print(f"occupancy measured: {result.statistic:.3f} over {len(result.kept)} samples "
          f"(bound {occ.threshold.value:g})")


def test_engine_does_not_idle_between_steps(server, kiln_thresholds, record_property, kit_summary):
    # vLLM's running gauge reads busy whatever happens between steps; the step
    # timer (ci/kits/steps.py) is what shows an engine idling between them.
    bound = kiln_thresholds.occupancy.step_busy_min
    if bound is None:
        pytest.skip(f"no step-occupancy bound measured for profile {kiln_thresholds.profile} "
                    f"(ci/kits/thresholds.py; measured on the cpu lane)")
    if server.backend.step_timer is None:
        pytest.skip(f"{server.backend.name} reports no per-step timing")
    result = steps.check_step_occupancy(server, threshold=bound.value)
    record_property("kiln_step_occupancy", result.line())
    with kit_summary.open("a", encoding="utf-8") as fh:
        fh.write(f"### step occupancy ({server.served_model}): pass\n\n{result.line()} "
                 f"(bound {bound.value:g})\n\n")
    print(f"step occupancy measured: {result.busy:.3f} (bound {bound.value:g}: {bound.reason})")
