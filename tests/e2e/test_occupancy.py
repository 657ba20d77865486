"""Engine occupancy while a long request decodes (ci/kits/occupancy.py), per-profile threshold."""
from __future__ import annotations

import pytest

from ci import thresholds
from ci.kits import occupancy, step_occupancy


def test_engine_stays_busy_during_a_long_request(server, kiln_profile):
    occ = thresholds.for_profile(kiln_profile.name).occupancy
    occupancy.check_occupancy(
        server, threshold=occ.threshold.value, min_samples=int(occ.min_samples.value),
        aggregation=occ.aggregation, mode=occ.mode, long_max_tokens=occ.long_max_tokens,
        interval_s=occ.interval_s, max_rounds=occ.max_rounds)


def test_engine_steps_back_to_back_while_decoding(server, kiln_profile):
    # The running gauge above reads 1 for a scheduler that sleeps between
    # steps; the step-time / token-gap ratio does not (ci/kits/step_occupancy.py).
    bound = thresholds.for_profile(kiln_profile.name).occupancy.step_threshold
    if bound is None:
        pytest.skip(f"no measured step-occupancy threshold for profile {kiln_profile.name} "
                    f"(ci/thresholds.py)")
    step_occupancy.check_step_occupancy(server, threshold=bound.value)
