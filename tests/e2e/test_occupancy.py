"""Engine occupancy while a long request decodes (ci/kits/occupancy.py), per-profile threshold."""
from __future__ import annotations

from ci import thresholds
from ci.kits import occupancy


def test_engine_stays_busy_during_a_long_request(server, kiln_profile):
    occ = thresholds.for_profile(kiln_profile.name).occupancy
    occupancy.check_occupancy(
        server, threshold=occ.threshold.value, min_samples=int(occ.min_samples.value),
        aggregation=occ.aggregation, mode=occ.mode, long_max_tokens=occ.long_max_tokens,
        interval_s=occ.interval_s, max_rounds=occ.max_rounds)
