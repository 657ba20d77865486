"""Server against a misbehaving engine: each fault gives one clear cause + log tail, and leaves nothing.

Real processes on 127.0.0.1; the fault engine is tests/fakes/fault_engine.py.
"""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ci.engine.backends import generic
from ci.engine.server import Server, ServerExited, ServerTimeout
from ci.engine.teardown import stop_many
from ci.host import ports, procfs, procs

FAULT_ENGINE = Path(__file__).resolve().parents[1] / "fakes" / "fault_engine.py"
# The fault engine is a small Python process: ready in well under a second.
SHORT_DEADLINE_S = 4.0


def _backend(mode: str, *extra: str):
    cmd = f"{{python}} {shlex.quote(str(FAULT_ENGINE))} --port {{port}} --mode {mode} " + " ".join(extra)
    return generic(cmd, name=f"fault-{mode}")


def _server(tmp_path: Path, mode: str, *extra: str, **kw) -> Server:
    kw.setdefault("launch_timeout_s", SHORT_DEADLINE_S)
    kw.setdefault("grace_s", 2.0)
    return Server(_backend(mode, *extra), "fault-model", log_dir=tmp_path, **kw)


def _assert_nothing_left(server: Server, bystanders=()) -> None:
    assert server.tree is not None
    assert server.tree.member_pids() == [], "members of the tree survived"
    assert procs.tagged(server.tree.tag) == [], "tagged processes survived"
    # Independent of kiln's bookkeeping: nothing running the fault engine at all.
    assert procfs.matching([FAULT_ENGINE.name], exclude=bystanders) == [], \
        "a fault engine process survived"
    assert ports.is_bindable(server.port), f"port {server.port} still held"


def test_ready_then_stop_leaves_nothing(tmp_path, caplog):
    caplog.set_level("INFO", logger="ci.engine.server")
    s = _server(tmp_path, "ok", "--ready-after", "0.3").start()
    assert s.record.ready is not None and s.record.ready >= s.record.launched
    assert "is ready" in caplog.text and "fault engine pid" in caplog.text  # tail on success too
    s.stop()
    s.stop()  # idempotent
    _assert_nothing_left(s)
    assert "stopped" in caplog.text


def test_crash_at_start_reported_within_one_second(tmp_path):
    s = _server(tmp_path, "crash", "--ready-after", "0.5", launch_timeout_s=60)
    t0 = time.monotonic()
    with pytest.raises(ServerExited) as err:
        s.start()
    elapsed = time.monotonic() - t0
    # 0.5 s of simulated load + interpreter start; the report must follow the exit within 1 s.
    assert elapsed < 0.5 + 1.0 + 1.0, elapsed
    assert "exited with code 3 before it was ready" in err.value.cause
    assert "injected crash" in err.value.tail
    assert "\n" not in err.value.cause
    _assert_nothing_left(s)


def test_exit_zero_before_ready_is_a_failure(tmp_path):
    s = _server(tmp_path, "exit0", launch_timeout_s=60)
    with pytest.raises(ServerExited) as err:
        s.start()
    assert "exited with code 0" in err.value.cause
    assert "exiting 0 before ready" in err.value.tail
    _assert_nothing_left(s)


def test_health_503_forever_hits_deadline_with_bounded_polls(tmp_path):
    s = _server(tmp_path, "unhealthy", launch_timeout_s=2.0)
    t0 = time.monotonic()
    with pytest.raises(ServerTimeout) as err:
        s.start()
    assert 2.0 <= time.monotonic() - t0 < 2.0 + 3.0
    assert "HTTP 503" in err.value.cause
    # One poll per interval at most (+1 for the first): no busy spin.
    from ci.engine.server import HEALTH_POLL_INTERVAL_S
    assert 1 <= s.health_polls <= 2.0 / HEALTH_POLL_INTERVAL_S + 2
    _assert_nothing_left(s)


def test_accepts_but_never_answers_times_out_per_request(tmp_path):
    s = _server(tmp_path, "hang", launch_timeout_s=2.5)
    t0 = time.monotonic()
    with pytest.raises(ServerTimeout) as err:
        s.start()
    # Each request gives up after HEALTH_REQUEST_TIMEOUT_S, so the deadline holds.
    assert time.monotonic() - t0 < 2.5 + 3.0
    assert "ReadTimeout" in err.value.cause
    assert "answering nothing" in err.value.tail
    _assert_nothing_left(s)


def test_sigterm_ignored_escalates_to_sigkill(tmp_path):
    s = _server(tmp_path, "ignore-term", grace_s=1.0).start()
    t0 = time.monotonic()
    s.stop()
    assert 1.0 <= time.monotonic() - t0 < 1.0 + 3.0
    assert s.tree.stop().killed == [s.tree.pid]
    assert "SIGTERM ignored" in s.log_tail()
    _assert_nothing_left(s)


def test_setsid_grandchild_holding_the_port_is_found_and_killed(tmp_path):
    s = _server(tmp_path, "grandchild", grace_s=1.0).start()
    holders = [p for p in s.tree.members() if p.pid != s.tree.pid]
    assert holders, "grandchild not found by tag"
    grandchild = holders[0]
    assert grandchild.pid != s.tree.pid
    assert grandchild.pid in {p.pid for p in ports.holders(s.port)}  # it holds the port
    assert os.getsid(grandchild.pid) == grandchild.pid  # it left our session
    s.stop()
    assert not psutil.pid_exists(grandchild.pid) or \
        psutil.Process(grandchild.pid).status() == psutil.STATUS_ZOMBIE
    _assert_nothing_left(s)


def test_port_held_by_stranger_is_a_clear_error_and_stranger_untouched(tmp_path):
    stranger = socket.socket()
    stranger.bind(("127.0.0.1", 0))
    stranger.listen(1)
    port = stranger.getsockname()[1]
    try:
        s = _server(tmp_path, "ok", port=port)
        with pytest.raises(ports.PortError) as err:
            s.start()
        assert f"port {port} is already in use" in str(err.value)
        # The stranger is this very test process: it must still be listening.
        probe = socket.create_connection(("127.0.0.1", port), timeout=1)
        probe.close()
    finally:
        stranger.close()


def test_bystander_with_same_command_line_is_never_signalled(tmp_path):
    # A process started by "someone else" with exactly the server's argv shape.
    bystander_port = ports.reserve()
    argv = [sys.executable, str(FAULT_ENGINE), "--port", str(bystander_port.port), "--mode", "ignore-term"]
    bystander = subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        s = _server(tmp_path, "ignore-term", grace_s=0.5).start()
        s.stop()
        _assert_nothing_left(s, bystanders=[bystander.pid])
        assert bystander.poll() is None, "bystander was signalled"
    finally:
        bystander.kill()
        bystander.wait()
        bystander_port.release()


def test_stop_many_stops_all_and_keeps_every_error(tmp_path):
    servers = [_server(tmp_path, "ignore-term", grace_s=1.0).start() for _ in range(3)]
    t0 = time.monotonic()
    stop_many(servers)
    # In parallel: about one grace period, not three.
    assert time.monotonic() - t0 < 1.0 * 2 + 1.5
    for s in servers:
        _assert_nothing_left(s)


def test_stop_many_raises_every_failure(tmp_path):
    class Boom(RuntimeError):
        pass

    class Failing:
        def __init__(self, n):
            self.n = n

        def terminate(self):
            raise Boom(f"server {self.n}")

        def wait_memory(self):
            pass

    with pytest.raises(ExceptionGroup) as err:
        stop_many([Failing(1), Failing(2)])
    assert sorted(str(e) for e in err.value.exceptions) == ["server 1", "server 2"]
