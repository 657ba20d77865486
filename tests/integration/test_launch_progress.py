"""A launch that waits says so: elapsed, deadline, health answer and the engine's last log line."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ci.engine import server as server_mod
from ci.engine.backends import generic
from ci.engine.server import Server, ServerTimeout

FAULT_ENGINE = Path(__file__).resolve().parents[1] / "fakes" / "fault_engine.py"
# Progress every 0.4 s over a 2.5 s deadline: several lines, in about 3 s of test.
INTERVAL_S = 0.4
DEADLINE_S = 2.5


def test_waiting_launch_logs_progress_until_its_deadline(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(server_mod, "PROGRESS_INTERVAL_S", INTERVAL_S)
    caplog.set_level("INFO", logger="ci.engine.server")
    cmd = f"{{python}} {shlex.quote(str(FAULT_ENGINE))} --port {{port}} --mode unhealthy"
    s = Server(generic(cmd, name="fault-unhealthy"), "fault-model", log_dir=tmp_path,
               launch_timeout_s=DEADLINE_S, grace_s=2.0)
    with pytest.raises(ServerTimeout):
        s.start()
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for ")]
    # A loaded box may run the loop late, never early: at least half the ideal count.
    assert len(notes) >= int(DEADLINE_S / INTERVAL_S) // 2, notes
    pattern = re.compile(r"waiting for .*: (\d+) s of 2 s; health: (HTTP 503|\w+); last log line: (.+)")
    parsed = [pattern.fullmatch(n) for n in notes]
    assert all(parsed), notes
    assert any(m[2] == "HTTP 503" and m[3].startswith("health ") for m in parsed), notes
