"""What a test waited for its servers, written to its JUnit for the durations store.

Each borrow records the server key it asked for (``kiln_server``), how long the
test waited (``kiln_server_wait_s``: the session's prelaunch for the first test
to borrow, then its own borrow) and one ``kiln_launch`` per launch that
completed in that wait. The store (ci/report/durations.py) takes the wait out
of the test's time and books each launch to its server key, so the packer can
charge a launch to every shard that pays it. Booked on whichever test happened
to wait, the cpu lane's first tiny-model test carried both servers' prelaunch
(~56 s) and the real-model tests none: the shard holding them ran ~40-60 s
over its estimate (3 shards at 144 / 98 / 156 s, a 59 % spread).

The fixtures (ci/session/pytest_plugin.py, ci/session/topologies.py) call
these two functions instead of the pool's own ``prelaunch``/``acquire``.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import pytest

from ci.report.durations import LAUNCH_PROPERTY, SERVER_PROPERTY, WAIT_PROPERTY
from ci.session.pool import Key, ServerKey, ServerPool, Unit

# Seconds the session's prelaunch took, until the first borrower books them.
_PRELAUNCH_WAIT = pytest.StashKey[float]()


def prelaunch(config: pytest.Config, pool: ServerPool, keys: Sequence[ServerKey]) -> list[ServerKey]:
    """``pool.prelaunch(keys)``, its seconds kept for the first test that borrows to book."""
    start = time.monotonic()
    try:
        return pool.prelaunch(keys)
    finally:
        config.stash[_PRELAUNCH_WAIT] = time.monotonic() - start


def acquire(config: pytest.Config, pool: ServerPool, key: Key,
            record_property: Callable[[str, object], None]) -> Unit:
    """``pool.acquire(key)``, recording the key, the wait and the launches it waited for.

    The properties are written even when the borrow fails: the launches that
    did complete still took their time (the failed test itself is not timed).
    """
    # The report maps a failure to its servers by this property, and names the
    # server (or topology) in the failure's server line.
    record_property(SERVER_PROPERTY, str(key))
    waited = config.stash.get(_PRELAUNCH_WAIT, 0.0)
    if _PRELAUNCH_WAIT in config.stash:
        del config.stash[_PRELAUNCH_WAIT]  # booked once, by the first borrower
    start = time.monotonic()
    try:
        return pool.acquire(key)
    finally:
        record_property(WAIT_PROPERTY, f"{waited + time.monotonic() - start:.3f}")
        for name, seconds in pool.take_launches():
            record_property(LAUNCH_PROPERTY, f"{name}={seconds:.3f}")
