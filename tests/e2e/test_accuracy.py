"""Accuracy floor per (profile, model) on the shipped multiple-choice set (ci/kits/accuracy.py)."""
from __future__ import annotations

from ci.kits import accuracy


def test_accuracy_is_above_the_floor(server, kiln_profile, kiln_thresholds):
    # These tests run the profile's default model (no model marker; --kiln-model replaces it).
    floor = kiln_thresholds.accuracy_floor(kiln_profile.default_model)
    print(f"accuracy floor {floor.value:g} for {kiln_profile.default_model} on {kiln_profile.name} "
          f"({floor.reason})")
    accuracy.check_accuracy_floor(server, floor=floor.value)
