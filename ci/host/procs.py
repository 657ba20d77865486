"""Process trees kiln starts: owned through a supervisor, stopped without collateral.

Every engine (and every warmup launch) runs under ``ci/host/supervisor.py``, a
child subreaper -- in a cgroup of its own where the host allows -- so the
tree is *the supervisor's descendants and the cgroup's members*, whatever the
engine's processes call themselves. The environment tag (``KILN_TREE_TAG``)
is kept only as a cross-check: engines that ``setproctitle`` erase it
(vLLM's ``VLLM::EngineCore``/workers, SGLang's scheduler), so it never proves
membership or absence alone.

Stop policy (sglang #24253 killed other jobs' schedulers with ``pkill -f``):
SIGTERM to the engine's root only, because engines coordinate their own
shutdown; after a grace period SIGKILL to every member; reap; verify with the
same membership. A process outside the tree is never signalled. If the
harness dies, the supervisor notices and applies the same policy; if the
supervisor dies too, the registry (ci/host/registry.py) lets the next run reap.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import psutil

from ci.host import cgroups, procfs
from ci.host.registry import Registry, TreeEntry

log = logging.getLogger(__name__)

TAG_ENV = "KILN_TREE_TAG"
SUPERVISOR = Path(__file__).with_name("supervisor.py")
# vLLM-CPU takes 2-5 s to unwind its engine core after SIGTERM; 15 s covers a
# loaded runner without letting a wedged engine stall the job.
DEFAULT_GRACE_S = 15.0
# After SIGKILL the kernel needs only to reap; longer means D-state or a bug.
KILL_DEADLINE_S = 10.0
# The supervisor answers "started" within milliseconds (python -I -S, stdlib
# only); a box loaded by a compiling engine may take seconds.
START_DEADLINE_S = 20.0
# On top of grace + kill deadline, how long a stop waits for the supervisor's
# own report before the harness kills the tree itself.
SUPERVISOR_MARGIN_S = 5.0
# Bounded poll interval for exit checks: short enough for the < 1 s crash
# report, long enough not to spin a core.
POLL_INTERVAL_S = 0.02


class SurvivorsError(RuntimeError):
    """Members of a tree were still alive after SIGKILL: reported, never ignored."""


def new_tag(prefix: str = "kiln") -> str:
    """A fresh run tag, unique per process tree."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def _carries(proc: psutil.Process, tag: str) -> bool:
    try:
        return proc.environ().get(TAG_ENV) == tag
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
        return False


def tagged(tag: str) -> list[psutil.Process]:
    """Every live (non-zombie) process whose environment still carries ``tag`` (a cross-check)."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if _carries(proc, tag):
            found.append(proc)
    return found


def describe(procs: Sequence[psutil.Process]) -> str:
    """``pid name (cmdline)`` for each process, for error messages."""
    return ", ".join(procfs.label(p.pid) for p in procs)


@dataclass
class StopReport:
    """What stopping a tree took."""

    exit_code: int | None
    terminated_gracefully: bool
    killed: list[int] = field(default_factory=list)
    seconds: float = 0.0
    killed_names: list[str] = field(default_factory=list)
    mechanism: str = cgroups.NONE
    reason: str = ""


def _live(pids: Sequence[int]) -> list[psutil.Process]:
    out = []
    for pid in pids:
        st = procfs.stat(pid)
        if st is not None and not st.zombie:
            with contextlib.suppress(psutil.NoSuchProcess):
                out.append(psutil.Process(pid))
    return out


class ProcessTree:
    """A command started under its own supervisor, and everything it spawns."""

    def __init__(self, popen: subprocess.Popen, tag: str, log_path: Path, *, status_fd: int,
                 control_fd: int, registry: Registry | None):
        self.popen = popen  # the supervisor
        self.tag = tag
        self.log_path = log_path
        self._status_fd = status_fd
        self._control_fd = control_fd
        self._buf = b""
        self._events: dict[str, dict] = {}
        self._registry = registry
        self._stopped: StopReport | None = None
        self.root_pid: int | None = None
        self.mechanism = cgroups.NONE
        self.cgroup: cgroups.Cgroup | None = None

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        tag: str | None = None,
        registry: Registry | None = None,
        containment: str | None = None,
    ) -> "ProcessTree":
        """Start ``argv`` under a supervisor, output appended to ``log_path`` (never a pipe).

        A pipe nobody drains fills at 64 KiB and wedges a chatty engine; a file
        also survives the process for the log tail. Returns once the engine
        process exists; raises RuntimeError (one line) when it cannot start.
        """
        tag = tag or new_tag()
        full_env = dict(os.environ if env is None else env)
        full_env[TAG_ENV] = tag
        registry = registry if registry is not None else Registry()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        status_r, status_w = os.pipe()
        control_r, control_w = os.pipe()  # only we hold the write end: its EOF = we are gone
        argv_sup = [sys.executable, "-I", "-S", str(SUPERVISOR), "--tree-id", tag,
                    "--status-fd", str(status_w), "--control-fd", str(control_r),
                    "--owner", str(os.getpid()), "--kill-deadline", str(KILL_DEADLINE_S)]
        if containment:
            argv_sup += ["--containment", containment]
        try:
            with open(log_path, "ab") as out:
                popen = subprocess.Popen(
                    [*argv_sup, "--", *argv], stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, env=full_env, cwd=cwd, start_new_session=True,
                    pass_fds=(status_w, control_r))
        except OSError as exc:
            for fd in (status_r, status_w, control_r, control_w):
                os.close(fd)
            raise RuntimeError(f"cannot start the supervisor for {argv[0]!r}: "
                               f"{exc.strerror or exc}") from exc
        os.close(status_w)
        os.close(control_r)
        os.set_blocking(status_r, False)
        tree = cls(popen, tag, log_path, status_fd=status_r, control_fd=control_w, registry=registry)
        tree._await_start(argv)
        log.debug("started %s under supervisor %d (%s) tag %s: %s", tree.root_pid, popen.pid,
                  tree.mechanism, tag, " ".join(argv))
        return tree

    def _await_start(self, argv: Sequence[str]) -> None:
        deadline = time.monotonic() + START_DEADLINE_S
        while "started" not in self._events and "error" not in self._events:
            self._read_status(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            if self.popen.poll() is not None and not self._events:
                break
            if time.monotonic() >= deadline:
                self._abandon()
                raise RuntimeError(f"supervisor for {argv[0]!r} did not start within "
                                   f"{START_DEADLINE_S:.0f} s")
        if "started" not in self._events:
            msg = self._events.get("error", {}).get("message") or \
                f"supervisor exited with code {self.popen.wait()}"
            self.popen.wait()
            self._close_fds()
            raise RuntimeError(msg)
        started = self._events["started"]
        self.root_pid = started["root"]
        self.mechanism = started["mechanism"]
        if started.get("cgroup"):
            self.cgroup = cgroups.Cgroup(Path(started["cgroup"]), self.mechanism)
        if self._registry is not None:
            self._registry.add(TreeEntry(
                tree_id=self.tag, tag=self.tag, owner=procfs.identity(os.getpid()),
                supervisor=procfs.identity(self.popen.pid),
                root=(self.root_pid, started.get("root_start") or 0),
                mechanism=self.mechanism, cgroup=started.get("cgroup"),
                command=" ".join(argv)[:300], log_path=str(self.log_path)))

    def _read_status(self, timeout: float = 0.0) -> None:
        if self._status_fd < 0:
            return
        if timeout > 0:
            select.select([self._status_fd], [], [], timeout)
        while True:
            try:
                chunk = os.read(self._status_fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._buf += chunk
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                self._events[event.pop("event")] = event

    # -- facts -------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        """The engine's root process (not the supervisor)."""
        return self.root_pid if self.root_pid is not None else self.popen.pid

    @property
    def supervisor_pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        """The engine root's exit code (Popen-style), or None while it runs."""
        self._read_status()
        if "root-exit" in self._events:
            return self._events["root-exit"]["code"]
        code = self.popen.poll()
        if code is not None:
            self._read_status()
            if "root-exit" in self._events:
                return self._events["root-exit"]["code"]
            return code  # the supervisor itself died: the tree has lost its keeper
        return None

    def member_pids(self) -> list[int]:
        """Pids of live members: the supervisor's descendants and the cgroup's."""
        found = set()
        if self.popen.poll() is None:
            found.update(st.pid for st in procfs.descendants(self.popen.pid) if not st.zombie)
        if self.cgroup is not None:
            found.update(self.cgroup.pids())
        found.discard(self.popen.pid)
        return sorted(pid for pid in found if (st := procfs.stat(pid)) and not st.zombie)

    def members(self) -> list[psutil.Process]:
        """Live processes of this tree (membership, not names or the tag, decides)."""
        return _live(self.member_pids())

    # -- stop --------------------------------------------------------------------------
    def stop(self, grace_s: float = DEFAULT_GRACE_S) -> StopReport:
        """SIGTERM the root, give the tree ``grace_s``, SIGKILL every member, verify.

        The supervisor runs the policy; this side waits for its report, takes
        over if it does not answer, and verifies by membership plus the tag.
        Idempotent: a second call returns the first report. Raises
        SurvivorsError when any member outlives SIGKILL.
        """
        if self._stopped is not None:
            return self._stopped
        start = time.monotonic()
        if self.popen.poll() is None:
            try:
                os.write(self._control_fd, f"stop {grace_s}\n".encode())
            except OSError:
                pass  # the supervisor is gone: the checks below take over
        deadline = start + grace_s + KILL_DEADLINE_S + SUPERVISOR_MARGIN_S
        while self.popen.poll() is None and time.monotonic() < deadline:
            self._read_status(timeout=POLL_INTERVAL_S * 5)
        self._read_status()
        took_over: list[int] = []
        if self.popen.poll() is None:
            log.error("supervisor %d of tree %s did not finish its stop in %.0f s; killing the "
                      "tree from here", self.popen.pid, self.tag, deadline - start)
            took_over = self._kill_members()
            self.popen.kill()
            self.popen.wait()
        report = self._events.get("stopped", {})
        strays = self._cross_check()
        survivors = self._wait_members_gone(time.monotonic() + KILL_DEADLINE_S)
        killed_names = list(report.get("killed", [])) + [procfs.label(p) for p in took_over + strays]
        self._stopped = StopReport(
            exit_code=self.poll(),
            terminated_gracefully=not killed_names,
            killed=[int(n.split()[0]) for n in killed_names],
            seconds=time.monotonic() - start,
            killed_names=killed_names,
            mechanism=self.mechanism,
            reason=report.get("reason") or ("engine exited by itself" if "root-exit" in self._events
                                            else "supervisor gone"))
        self._close_fds()
        if survivors or report.get("survivors"):
            raise SurvivorsError(
                f"tree {self.tag}: {len(survivors)} process(es) survived SIGKILL: "
                f"{describe(survivors) or ', '.join(report['survivors'])}")
        if self._registry is not None:
            self._registry.remove(self.tag)
        return self._stopped

    def _kill_members(self) -> list[int]:
        pids = self.member_pids()
        if self.cgroup is not None:
            with contextlib.suppress(OSError):
                self.cgroup.kill()
        for proc in _live(pids):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()  # psutil re-checks the process's start time before signalling
        return pids

    def _cross_check(self) -> list[int]:
        """Processes still carrying our tag outside the tree (escaped its keeper): killed."""
        strays = [p for p in tagged(self.tag) if p.pid not in (self.popen.pid,)]
        if strays:
            log.error("tree %s: %d process(es) carrying its tag outlived the stop: %s; killing",
                      self.tag, len(strays), describe(strays))
            for proc in strays:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
        return [p.pid for p in strays]

    def _wait_members_gone(self, deadline: float) -> list[psutil.Process]:
        while True:
            left = _live(self.member_pids()) + tagged(self.tag)
            if not left or time.monotonic() >= deadline:
                if self.cgroup is not None and not left:
                    self.cgroup.remove()
                return left
            time.sleep(POLL_INTERVAL_S)  # bounded poll on the condition above

    def _abandon(self) -> None:
        with contextlib.suppress(OSError):
            self.popen.send_signal(signal.SIGTERM)  # our own child: it stops what it started
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(KILL_DEADLINE_S)
        self._close_fds()

    def _close_fds(self) -> None:
        for attr in ("_status_fd", "_control_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, attr, -1)


def run_contained(argv: Sequence[str], *, timeout_s: float, env: Mapping[str, str] | None = None,
                  cwd: Path | None = None) -> tuple[int, str]:
    """Run a short command as a supervised tree; (exit code, stdout+stderr).

    For the engine commands kiln runs besides servers (``--help`` probes): an
    engine's import may start helpers, and a timeout must not leave them.
    Raises TimeoutError after stopping the tree when ``timeout_s`` passes.
    """
    import tempfile  # noqa: PLC0415 (only this helper needs it)

    with tempfile.TemporaryDirectory(prefix="kiln-run-") as tmp:
        out = Path(tmp) / "output.log"
        tree = ProcessTree.spawn(argv, log_path=out, env=env, cwd=cwd)
        deadline = time.monotonic() + timeout_s
        try:
            while tree.poll() is None:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{argv[0]} did not finish in {timeout_s:g} s")
                tree._read_status(timeout=POLL_INTERVAL_S * 5)  # wakes on the exit report
        finally:
            report = tree.stop(grace_s=1.0)
        text = out.read_text(errors="replace")
        # The supervisor's own closing note is ours, not the command's output.
        lines = [ln for ln in text.splitlines() if not ln.startswith("[kiln-supervisor ")]
        return report.exit_code if report.exit_code is not None else -1, "\n".join(lines)
