"""Process trees kiln starts, found again by a run tag and stopped without collateral.

An engine forks workers, and some of those call ``setsid`` and get re-parented
to init, so "the children of my Popen" is not the tree. Every process kiln
starts carries a unique tag in its environment (inherited by every descendant
that does not scrub its environment), and the tree is whatever carries the tag.

Stop policy (sglang #24253 killed other jobs' schedulers with ``pkill -f``):
SIGTERM goes to the root only, because engines coordinate their own shutdown;
after a grace period every process that still carries *our* tag gets SIGKILL.
A process without the tag is never signalled, whatever its command line.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import psutil

log = logging.getLogger(__name__)

TAG_ENV = "KILN_TREE_TAG"
# vLLM-CPU takes 2-5 s to unwind its engine core after SIGTERM; 15 s covers a
# loaded runner without letting a wedged engine stall the job.
DEFAULT_GRACE_S = 15.0
# After SIGKILL the kernel needs only to reap; longer means D-state or a bug.
KILL_DEADLINE_S = 10.0
# Bounded poll interval for exit checks: short enough for the < 1 s crash
# report, long enough not to spin a core.
POLL_INTERVAL_S = 0.02
# How often a stopping tree is rescanned by tag for processes forked during
# shutdown: a /proc walk per tree per poll would cost more CPU than the
# engines' own shutdown when many trees stop at once (stop_many on 2 cores).
RESCAN_INTERVAL_S = 0.5


class SurvivorsError(RuntimeError):
    """Tagged processes were still alive after SIGKILL: reported, never ignored."""


def new_tag(prefix: str = "kiln") -> str:
    """A fresh run tag, unique per process tree."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def _carries(proc: psutil.Process, tag: str) -> bool:
    try:
        return proc.environ().get(TAG_ENV) == tag
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
        return False


def tagged(tag: str) -> list[psutil.Process]:
    """Every live (non-zombie) process whose environment carries ``tag``."""
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
    """``pid (cmdline)`` for each process, for error messages."""
    parts = []
    for p in procs:
        try:
            cmd = " ".join(p.cmdline())[:120]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            cmd = "?"
        parts.append(f"{p.pid} ({cmd})")
    return ", ".join(parts)


@dataclass
class StopReport:
    """What stopping a tree took."""

    exit_code: int | None
    terminated_gracefully: bool
    killed: list[int] = field(default_factory=list)
    seconds: float = 0.0


class ProcessTree:
    """A command started in its own session with a unique tag, and everything it spawns."""

    def __init__(self, popen: subprocess.Popen, tag: str, log_path: Path):
        self.popen = popen
        self.tag = tag
        self.log_path = log_path
        self._stopped: StopReport | None = None

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        tag: str | None = None,
    ) -> "ProcessTree":
        """Start ``argv`` with stdout+stderr appended to ``log_path`` (never a pipe).

        A pipe nobody drains fills at 64 KiB and wedges a chatty engine; a file
        also survives the process for the log tail.
        """
        tag = tag or new_tag()
        full_env = dict(os.environ if env is None else env)
        full_env[TAG_ENV] = tag
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            try:
                popen = subprocess.Popen(
                    list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    env=full_env, cwd=cwd, start_new_session=True,
                )
            except OSError as exc:
                raise RuntimeError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from exc
        log.debug("started pid %d tag %s: %s", popen.pid, tag, " ".join(argv))
        return cls(popen, tag, log_path)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        """The root's exit code, or None while it runs."""
        return self.popen.poll()

    def members(self) -> list[psutil.Process]:
        """Live processes of this tree (the tag, not parentage, decides)."""
        return tagged(self.tag)

    def stop(self, grace_s: float = DEFAULT_GRACE_S) -> StopReport:
        """SIGTERM the root, give the tree ``grace_s``, SIGKILL tagged survivors, verify.

        Idempotent: a second call returns the first report. Raises
        SurvivorsError when tagged processes outlive SIGKILL.
        """
        if self._stopped is not None:
            return self._stopped
        start = time.monotonic()
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        remaining = self._wait_gone(start + grace_s)
        graceful = not remaining
        killed: list[int] = []
        if remaining:
            log.warning("tree %s: %d process(es) ignored SIGTERM for %.1f s, killing: %s",
                        self.tag, len(remaining), grace_s, describe(remaining))
            for proc in remaining:
                if _carries(proc, self.tag):  # re-check: the pid may have been reused
                    try:
                        proc.send_signal(signal.SIGKILL)
                        killed.append(proc.pid)
                    except psutil.NoSuchProcess:
                        pass
            survivors = self._wait_gone(time.monotonic() + KILL_DEADLINE_S)
            if survivors:
                raise SurvivorsError(
                    f"tree {self.tag}: {len(survivors)} process(es) survived SIGKILL: "
                    f"{describe(survivors)}")
        self._stopped = StopReport(self.popen.poll(), graceful, killed, time.monotonic() - start)
        return self._stopped

    def _wait_gone(self, deadline: float) -> list[psutil.Process]:
        """Wait until no tagged process is left (reaping the root); return survivors.

        Processes found by the tag are then watched by pid: an exiting
        process's environ can no longer be read, so a fresh scan would drop
        it while it still holds memory or a port. The tag scan (a walk over
        /proc) reruns only every RESCAN_INTERVAL_S and once more when all
        known members are gone, to catch late forks.
        """
        known: dict[int, psutil.Process] = {}
        if self.popen.returncode is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                known[self.pid] = psutil.Process(self.pid)
        next_scan = 0.0
        while True:
            self._reap_root()
            now = time.monotonic()
            if now >= next_scan:
                known.update({p.pid: p for p in self.members() if p.pid not in known})
                next_scan = now + RESCAN_INTERVAL_S
            left = [p for p in known.values() if self._alive(p)]
            if not left:
                late = [p for p in self.members() if p.pid not in known]
                if not late:
                    return []
                known.update({p.pid: p for p in late})
                continue
            if now >= deadline:
                return left
            time.sleep(POLL_INTERVAL_S)

    def _alive(self, proc: psutil.Process) -> bool:
        if proc.pid == self.pid:
            return self.popen.returncode is None  # our child: poll() keeps its exit code
        try:
            return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def _reap_root(self) -> None:
        # The root is our child: until it is reaped it is a zombie that still
        # holds its pid, so poll() (which reaps) runs on every pass.
        self.popen.poll()
