"""Is the engine busy while a long request decodes? Each engine by its own instrument.

- A forward-occupancy gauge (SGLang's ``sglang:fwd_occupancy``, from CUDA events:
  forward time / wall time, sglang #25886): ci/kits/occupancy.py samples it.
- A per-step timer in the log (vLLM's iteration details): ci/kits/steps.py.
  vLLM has no occupancy gauge -- its running-request count reads 1 while the
  engine idles 10 ms a step (measured, docs/real-model-checks.md) -- so the
  gauge test is not run on it (the kit's "busy" mode over that count is for
  spotting one idle data-parallel rank): the step test is its check.

Both measure and print always; the bounds rule (ci/kits/enforce.py) then fails a
broken measured bound and reports an estimate as "uncalibrated".
"""
from __future__ import annotations

import pytest

from ci.kits import occupancy, steps
from ci.kits.enforce import Check
from ci.text.summary import append_section


def test_engine_stays_busy_during_a_long_request(server, kiln_thresholds, record_property, kit_summary,
                                                 enforce_bounds):
    occ = kiln_thresholds.occupancy
    if server.backend.gauges.occupancy is None or occ.mode == "busy":
        # "busy" reads a running-request count (vLLM's): busy whatever happens between
        # steps, so it cannot fail as named; it stays in the kit for one idle DP rank.
        pytest.skip(f"{server.backend.name} has no forward-occupancy gauge (its running-request "
                    f"count reads busy while the engine idles between steps); "
                    f"test_engine_does_not_idle_between_steps checks it with the engine's step timer")
    print(f"occupancy bound: {occ.aggregation} >= {occ.threshold.value:g} over >= "
          f"{int(occ.min_samples.value)} samples ({occ.threshold.reason or 'reference'})")
    # threshold 0: the kit measures (and still fails on too few samples or a failed
    # request); the rule below judges the figure against the bound.
    result = occupancy.check_occupancy(
        server, threshold=0.0, min_samples=int(occ.min_samples.value),
        aggregation=occ.aggregation, mode=occ.mode, long_max_tokens=occ.long_max_tokens,
        interval_s=occ.interval_s, max_rounds=occ.max_rounds)
    line = (f"{result.gauge}: {occ.aggregation} {result.statistic:.3f} over {len(result.kept)} samples "
            f"(bound {occ.threshold.value:g})")
    print(f"occupancy measured: {line}")
    # A green run keeps its figure too: the bound's next calibration reads it there.
    record_property("kiln_occupancy", line)
    ok = result.statistic >= occ.threshold.value
    append_section(kit_summary, f"### occupancy ({server.served_model}): {'pass' if ok else 'below bound'}"
                                f"\n\n{line}")
    enforce_bounds([Check("occupancy.threshold", occ.threshold, ok,
                          "" if ok else f"occupancy {result.statistic:.3f} < {occ.threshold.value:g} "
                                        f"({occ.mode} of {result.gauge}, {len(result.kept)} samples)")])


def test_engine_does_not_idle_between_steps(server, kiln_thresholds, record_property, kit_summary,
                                            enforce_bounds):
    bound = kiln_thresholds.occupancy.step_busy_min
    if server.backend.step_timer is None:
        pytest.skip(f"{server.backend.name} reports no per-step timing; "
                    f"test_engine_stays_busy_during_a_long_request reads its occupancy gauge")
    if bound is None:
        pytest.skip(f"no step-occupancy bound for profile {kiln_thresholds.profile} "
                    f"(ci/kits/thresholds.py); `invoke calibrate --profile {kiln_thresholds.profile}` measures one")
    result = steps.check_step_occupancy(server, threshold=0.0)
    record_property("kiln_step_occupancy", result.line())
    ok = result.busy >= bound.value
    append_section(kit_summary, f"### step occupancy ({server.served_model}): {'pass' if ok else 'below bound'}"
                                f"\n\n{result.line()} (bound {bound.value:g})")
    print(f"step occupancy measured: {result.busy:.3f} (bound {bound.value:g}: {bound.reason})")
    enforce_bounds([Check("occupancy.step_busy_min", bound, ok,
                          "" if ok else f"step occupancy {result.busy:.3f} < {bound.value:g}: the engine "
                                        f"idled between steps ({result.line()})")])
