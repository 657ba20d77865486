"""A small real suite with a genuinely intermittent test, to build a JUnit history for ``invoke flakes``.

Not collected by any session: bench/flake_history.py runs it N times through
kiln's plugin, one JUnit file per run, as CI runs would leave them, and
tests/integration/test_flake_history.py runs it a few times to read the files back.
Nothing is random by seed or by a coin flip: the one intermittent test has a
real data race whose outcome the thread scheduler decides.
"""
from __future__ import annotations

import sys
import threading

# Increments per thread. The race needs the two threads to overlap for many
# switch intervals; at 3,000 each, two threads lost an update in ~30 % of
# 200 runs on the 2-core CI machine (1,000: ~10 %; 300: never).
INCREMENTS = 3000
# Ask CPython to switch threads as often as it can, so the race shows in milliseconds.
SWITCH_INTERVAL_S = 1e-6


def _yield_point() -> None:
    """A call: CPython may switch threads here, between the read and the write below."""


def test_unlocked_counter_under_two_threads():
    """Intermittent: an unlocked read-modify-write loses an update whenever a switch falls between them."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    box = [0]
    gate = threading.Barrier(2)

    def work() -> None:
        gate.wait()
        for _ in range(INCREMENTS):
            value = box[0]
            _yield_point()
            box[0] = value + 1

    threads = [threading.Thread(target=work) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(before)
    assert box[0] == 2 * INCREMENTS, f"lost {2 * INCREMENTS - box[0]} updates"


def test_locked_counter_under_two_threads():
    """Stable: the same counter under a lock never loses one."""
    box, lock = [0], threading.Lock()

    def work() -> None:
        for _ in range(INCREMENTS):
            with lock:
                box[0] += 1

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert box[0] == 2 * INCREMENTS


def test_title_case_of_the_project_name():
    """Broken, not flaky: fails every run (above the quarantine band, so it is never quarantined)."""
    assert "kiln".title() == "KILN"
