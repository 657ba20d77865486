"""Scheduler stress against the real engine (ci/kits/stress.py): outcomes only, no timing."""
from __future__ import annotations

from ci.kits import stress


def test_concurrent_requests_all_succeed(server):
    stress.check_concurrent(server)


def test_streaming_under_load(server):
    stress.check_streaming_under_load(server)
