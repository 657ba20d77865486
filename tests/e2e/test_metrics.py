"""Metrics sanity against the real engine (ci/kits/metrics.py)."""
from __future__ import annotations

from ci.kits import metrics


def test_metrics_expose_the_kit_gauges(server):
    metrics.check_metrics_exposed(server)


def test_running_and_waiting_return_to_zero_after_load(server):
    metrics.check_gauges_return_to_zero(server)


def test_generation_counter_matches_tokens_returned(server):
    metrics.check_generation_counter(server)
