"""Engine occupancy while a long request decodes (ci/kits/occupancy.py), per-profile threshold."""
from __future__ import annotations

from ci.kits import occupancy


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
