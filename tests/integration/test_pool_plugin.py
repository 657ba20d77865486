"""The pool and the pytest plugin with real processes (the fault engine as the backend).

Each case runs a small e2e-style test file in a child pytest, as a user would,
and then checks that every server it launched is gone.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ci.engine.backends import generic
from ci.engine.server import Server, ServerExited
from ci.host import procs
from ci.session.pool import PoolError, ServerKey, ServerPool
from ci.warmup.markers import marker_path
from ci.warmup.specs import WarmupSpec

ROOT = Path(__file__).resolve().parents[2]
FAULT_ENGINE = ROOT / "tests" / "fakes" / "fault_engine.py"
# Child pytest runs launch a few fault engines; this bounds a hung run.
CHILD_TIMEOUT_S = 120


def _fault_backend(mode: str = "ok") -> str:
    return f"generic:{{python}} {shlex.quote(str(FAULT_ENGINE))} --port {{port}} --mode {mode}"


def _pool(tmp_path: Path, mode_of=lambda key: "ok", max_live: int = 2) -> ServerPool:
    def make(key: ServerKey, devices: tuple[int, ...]) -> Server:
        backend = generic(_fault_backend(mode_of(key))[len("generic:"):])
        return Server(backend, key.model, args=key.args, log_dir=tmp_path, launch_timeout_s=5,
                      grace_s=1, key=str(key))
    return ServerPool(make, max_live=max_live)


def test_one_launch_per_key_and_release_records_tests(tmp_path):
    pool = _pool(tmp_path)
    key = ServerKey("m", 1, ("--x",))
    try:
        a = pool.acquire(key)
        pool.release(a, "t::one")
        b = pool.acquire(key)
        pool.release(b, "t::two")
        assert a is b and pool.launches == 1
        assert a.record.tests == ["t::one", "t::two"]
        with pytest.raises(PoolError, match="already borrowed"):
            pool.acquire(key) and pool.acquire(key)
    finally:
        pool.close()
    assert procs.tagged(a.tree.tag) == []


def test_failed_launch_fails_later_borrowers_fast_with_the_first_cause(tmp_path):
    pool = _pool(tmp_path, mode_of=lambda key: "crash")
    key = ServerKey("m")
    with pytest.raises(ServerExited):
        pool.acquire(key)
    t0 = time.monotonic()
    with pytest.raises(PoolError, match="already failed in this run: .*exited with code 3"):
        pool.acquire(key)
    assert time.monotonic() - t0 < 0.5 and pool.launches == 1
    pool.close()


def test_prelaunch_starts_the_sessions_servers_together_and_keeps_a_failure_for_its_borrower(tmp_path):
    # Each fake engine is ready 1.5 s after it starts: together, three keys (max_live 3)
    # are ready in about one such wait, not three; the crashing one fails its borrower
    # with the first cause and no second launch.
    ready_after = 1.5
    modes = {"a": "ok", "b": "ok", "c": "crash"}

    def make(key: ServerKey, devices: tuple[int, ...]) -> Server:
        backend = generic(_fault_backend(modes[key.model])[len("generic:"):] + f" --ready-after {ready_after}")
        return Server(backend, key.model, log_dir=tmp_path, launch_timeout_s=10, grace_s=1, key=str(key))

    pool = ServerPool(make, max_live=3)
    keys = [ServerKey("a"), ServerKey("b"), ServerKey("a"), ServerKey("c")]
    try:
        t0 = time.monotonic()
        started = pool.prelaunch(keys)
        took = time.monotonic() - t0
        assert started == [ServerKey("a"), ServerKey("b")] and pool.launches == 3
        assert took < 2.5 * ready_after, f"three launches one after the other? {took:.2f} s"
        a = pool.acquire(ServerKey("a"))
        pool.release(a)
        with pytest.raises(PoolError, match="already failed in this run: .*exited with code 3"):
            pool.acquire(ServerKey("c"))
        assert pool.launches == 3  # borrowing started nothing new
        assert pool.prelaunch(keys) == []  # only at the session's start
    finally:
        pool.close()
    assert all(procs.tagged(s.tree.tag) == [] for s in pool.servers() if s.tree)


def test_full_pool_evicts_least_recently_used_idle_server(tmp_path):
    pool = _pool(tmp_path, max_live=2)
    servers = {}
    try:
        for name in ("a", "b", "a", "c"):
            s = pool.acquire(ServerKey(name))
            servers[name] = s
            pool.release(s)
        # c needed room: b was the least recently used, so b went, a stayed.
        assert procs.tagged(servers["b"].tree.tag) == []
        assert procs.tagged(servers["a"].tree.tag) != []
        assert pool.launches == 3
    finally:
        pool.close()
    assert all(procs.tagged(s.tree.tag) == [] for s in servers.values())


def test_server_that_died_between_tests_is_relaunched(tmp_path):
    pool = _pool(tmp_path)
    key = ServerKey("m")
    try:
        first = pool.acquire(key)
        pool.release(first)
        os.kill(first.tree.pid, signal.SIGKILL)  # the engine's root, not its supervisor
        deadline = time.monotonic() + 10
        while first.tree.poll() is None and time.monotonic() < deadline:
            time.sleep(procs.POLL_INTERVAL_S)  # bounded poll until the supervisor reports the exit
        second = pool.acquire(key)
        assert second is not first and pool.launches == 2
        assert "exited with code" in first.record.error
        pool.release(second)
    finally:
        pool.close()


TEST_FILE = textwrap.dedent('''
    import os, threading, pytest
    from pathlib import Path

    def _note(server):
        with open(os.environ["TAGS_FILE"], "a") as f:
            f.write(server.tree.tag + "\\n")

    @pytest.mark.model("fake", args=["--a"])
    def test_pass(server):
        _note(server)

    @pytest.mark.model("fake", args=["--a"])
    def test_fail(server):
        _note(server)
        assert False, "planned failure"

    @pytest.mark.model("fake", args=["--b"])
    def test_other_key(server):
        _note(server)
        if os.environ.get("BLOCK"):
            Path(os.environ["BLOCK"]).write_text("waiting")
            threading.Event().wait(60)
''')


def _run_child(tmp_path: Path, *extra: str, block: bool = False, targets: tuple[str, ...] = ()):
    """The child pytest on ``test_child.py``, or on ``targets`` when given (node ids, an @listing)."""
    (tmp_path / "test_child.py").write_text(TEST_FILE)
    env = {**os.environ, "TAGS_FILE": str(tmp_path / "tags"), "PYTHONPATH": str(ROOT),
           "KILN_CACHE_DIR": str(tmp_path / "cache")}
    if block:
        env["BLOCK"] = str(tmp_path / "blocked")
    argv = [sys.executable, "-m", "pytest", *(targets or [str(tmp_path / "test_child.py")]),
            "-p", "ci.session.pytest_plugin",
            "-p", "no:cacheprovider", f"--rootdir={tmp_path}", "--kiln-profile=cpu",
            f"--kiln-backend={_fault_backend()}", f"--kiln-reports={tmp_path / 'reports'}",
            f"--junitxml={tmp_path / 'junit.xml'}", *extra]
    return subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _tags(tmp_path: Path) -> set[str]:
    return set((tmp_path / "tags").read_text().split())


def test_plugin_shares_servers_releases_on_failure_and_stops_all(tmp_path):
    # A warmup marker for one key: its launch depends on warmed caches.
    marker = marker_path(tmp_path / "cache", WarmupSpec("fake", 1, ("--a",), "generic"))
    marker.parent.mkdir(parents=True)
    marker.write_text("{}")
    child = _run_child(tmp_path)
    out, _ = child.communicate(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == 1, out  # test_fail failed, as planned
    assert "1 failed, 2 passed" in out
    # The failing test's report carries its server's log tail.
    assert "kiln server fake|tp=1|--a — last" in out and "fault engine pid" in out
    tags = _tags(tmp_path)
    assert len(tags) == 2, "two keys -> two servers, shared across tests"
    assert all(procs.tagged(t) == [] for t in tags)
    records = json.loads((tmp_path / "reports" / "servers-e2e-cpu.json").read_text())
    assert sorted(len(r["tests"]) for r in records) == [1, 2]
    assert all(r["stopped"] and r["ready"] for r in records)
    assert {r["key"]: r["warm_dependent"] for r in records} == {"fake|tp=1|--a": True, "fake|tp=1|--b": False}
    junit = (tmp_path / "junit.xml").read_text()
    assert 'name="kiln_server" value="fake|tp=1|--a"' in junit


def test_prelaunch_starts_only_the_servers_of_this_shards_tests(tmp_path):
    # A shard runs pytest on its listing (@file, as --shard writes it): the
    # other shards' tests are never collected, so the pool prelaunches only
    # what this shard borrows -- here key --a alone, never test_other_key's --b.
    listing = tmp_path / "shard-e2e-cpu-1of2.txt"
    listing.write_text("test_child.py::test_pass\ntest_child.py::test_fail\n")
    child = _run_child(tmp_path, targets=(f"@{listing}",))
    out, _ = child.communicate(timeout=CHILD_TIMEOUT_S)
    assert "1 failed, 1 passed" in out, out
    records = [r for f in (tmp_path / "reports").glob("servers-*.json") for r in json.loads(f.read_text())]
    assert [r["key"] for r in records] == ["fake|tp=1|--a"] and len(_tags(tmp_path)) == 1


def test_sigterm_mid_test_still_stops_every_server(tmp_path):
    child = _run_child(tmp_path, "-k", "other_key", block=True)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not (tmp_path / "blocked").exists():
        assert child.poll() is None, child.stdout.read()
        assert time.monotonic() < deadline, "child never reached the blocking test"
        time.sleep(procs.POLL_INTERVAL_S)
    tags = _tags(tmp_path)
    assert all(procs.tagged(t) for t in tags), "server should be running now"
    child.send_signal(signal.SIGTERM)  # our own child: CI cancelling the job
    out, _ = child.communicate(timeout=CHILD_TIMEOUT_S)
    assert child.returncode != 0
    assert all(procs.tagged(t) == [] for t in tags), out


CAPACITY_FILE = textwrap.dedent('''
    import pytest

    @pytest.mark.model("fake", tp=2)
    def test_needs_two(server):
        pass

    @pytest.mark.gpus(1)
    def test_needs_a_gpu():
        pass

    def test_plain(server):
        pass
''')


def _run_capacity(tmp_path: Path, profile: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_cap.py").write_text(CAPACITY_FILE)
    argv = [sys.executable, "-m", "pytest", str(tmp_path / "test_cap.py"), "-p", "ci.session.pytest_plugin",
            "-p", "no:cacheprovider", f"--rootdir={tmp_path}", f"--kiln-profile={profile}",
            f"--kiln-backend={_fault_backend()}", f"--kiln-reports={tmp_path / 'reports'}", "-rs"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "-1"}
    return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S)


def test_capacity_skips_carry_model_tp_needed_and_available(tmp_path):
    out = _run_capacity(tmp_path, "cpu")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed, 2 skipped" in out.stdout
    assert "capacity: fake tp=2 needs 2 GPUs; the cpu profile serves tp=1" in out.stdout
    assert "capacity: needs 1 GPU(s); the cpu profile has none" in out.stdout


def test_all_skipped_for_capacity_fails_loudly_instead_of_green(tmp_path):
    # No GPU here (and CUDA_VISIBLE_DEVICES=-1): every test of a GPU profile skips.
    out = _run_capacity(tmp_path, "h100-1")
    assert out.returncode == pytest.ExitCode.USAGE_ERROR, out.stdout + out.stderr
    assert ("kiln: all 3 e2e tests were skipped on profile h100-1 (0 GPU(s) available), so this run "
            "tested nothing: 3 capacity. First reason: capacity: fake tp=2 needs 2 GPU(s), 0 available "
            "on this runner") in out.stderr


def test_crash_signature_ends_a_launch_long_before_its_timeout(tmp_path):
    # The engine prints a traceback and lingers without ever serving health.
    crashy = ROOT / "tests" / "fakes" / "crashy_engine.py"

    def make(key: ServerKey, devices: tuple[int, ...]) -> Server:
        return Server(generic(f"{{python}} {shlex.quote(str(crashy))} --port {{port}} --health never --traceback-after 0.5"), key.model,
                      log_dir=tmp_path, launch_timeout_s=60, grace_s=1, key=str(key))

    pool = ServerPool(make)
    t0 = time.monotonic()
    with pytest.raises(ServerExited, match=r"crash signature \(Traceback\) in the log during launch"):
        pool.acquire(ServerKey("m"))
    assert time.monotonic() - t0 < 15, "the launch should end at the crash, not the 60 s timeout"
    pool.close()
    assert all(procs.tagged(s.tree.tag) == [] for s in pool.servers())
