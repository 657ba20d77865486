"""Accuracy floor per (model, profile) on the shipped multiple-choice set (ci/kits/accuracy.py)."""
from __future__ import annotations

from ci import thresholds
from ci.kits import accuracy


def test_accuracy_is_above_the_floor(server, kiln_profile):
    # These tests run the profile's default model (no model marker).
    floor = thresholds.for_profile(kiln_profile.name).accuracy_floor(kiln_profile.default_model)
    accuracy.check_accuracy_floor(server, floor=floor.value)
