"""Containment against the real engine: a wedged (SIGSTOPped) engine still ends with nothing left.

vLLM renames EngineCore and its workers (``VLLM::EngineCore``), erasing the
environment tag; this stops every process of the real tree -- API server
included -- so nothing can exit on SIGTERM, then has the pool stop everything
as the session end does. The stop must need SIGKILL, say so in the server
record (and so in the report), and leave no engine process, counted by name
and command line against what was running before the session.
"""
from __future__ import annotations

import os
import signal

import pytest

from ci.host import procfs
from ci.session.pool import ServerKey
from ci.session.pytest_plugin import new_engine_processes

# The engine is stopped: nothing can happen during a grace period, so a short
# one keeps this test from waiting the profile's full 15 s.
WEDGED_GRACE_S = 2.0


@pytest.mark.kiln_disruptive(pool=True)  # it stops the whole pool: after the other disruptive tests
def test_a_stopped_engine_is_killed_and_nothing_is_left(kiln_pool, kiln_profile, pytestconfig):
    srv = kiln_pool.acquire(ServerKey(kiln_profile.default_model))
    try:
        members = srv.tree.member_pids()
        names = [st.comm for p in members if (st := procfs.stat(p))]
        print(f"engine tree ({srv.tree.mechanism}): {len(members)} processes: {names}")
        # vLLM: API server + VLLM::EngineCore; SGLang: launcher + sglang::scheduler + detokenizer.
        assert len(members) >= 2, "an engine runs a server process and at least one renamed engine process"
        # The renamed ones (setproctitle: VLLM::<role>, sglang::<role>) that only a name scan can see.
        renamed = tuple(m for m in srv.backend.process_names if m.endswith("::"))
        if renamed:
            assert any(n.startswith(renamed) for n in names), f"expected renamed processes {renamed}: {names}"
        for pid in members:
            os.kill(pid, signal.SIGSTOP)  # members of our own tree only
        srv.grace_s = WEDGED_GRACE_S
    finally:
        kiln_pool.release(srv)
    kiln_pool.close()  # what the session end does: stop_many over every live server
    assert srv.record.stop_killed, "a stopped engine cannot exit on SIGTERM: the stop needs SIGKILL"
    print(f"stop took {srv.record.stop_seconds} s; SIGKILLed: {srv.record.stop_killed}")
    left = [procfs.label(st.pid) for st in new_engine_processes(pytestconfig)]
    assert left == [], f"engine processes left after the stop: {left}"
    assert not [p for p in members if (st := procfs.stat(p)) and not st.zombie]
