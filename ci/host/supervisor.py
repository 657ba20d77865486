"""The small process every engine tree kiln starts runs under: it owns the tree, whatever the tree does.

    python -I -S ci/host/supervisor.py --tree-id ID --status-fd N --control-fd N --owner PID \\
        [--orphan-grace S] [--kill-deadline S] [--containment MODE] -- ENGINE ARGV...

Why it exists: engines rename themselves (vLLM's ``VLLM::EngineCore`` and
workers, SGLang's ``sglang::scheduler`` call ``setproctitle``, which erases
the environment that ``/proc/PID/environ`` shows), fork daemons that
``setsid``, and outlive a harness killed by a CI cancel. An environment tag
finds none of those. So, like tini and Bazel's process-wrapper:

* it is a *child subreaper* (``PR_SET_CHILD_SUBREAPER``): every orphan of the
  tree -- renamed, double-forked, environment scrubbed -- is re-parented to it
  and stays its descendant; it reaps them all;
* where the host allows, the engine runs in a cgroup of its own
  (ci/host/cgroups.py), stopped with ``cgroup.kill`` or freeze-then-kill;
* it watches its owner (the harness) through a pipe only the owner holds and a
  pidfd: when the owner dies -- SIGKILL, OOM, CI cancel -- it stops the tree.

Stop policy (the owner's ``stop``, the owner's death, or SIGTERM/SIGINT/SIGHUP
to the supervisor): SIGTERM to the engine's root only (engines coordinate
their own shutdown), a grace period, then SIGKILL to every member, reap, and
verify with the same membership. What it did goes back to the owner as one
JSON line on the status pipe, and one line into the engine log.

Status lines (supervisor -> owner): ``started`` {root, root_start, mechanism,
cgroup, why}, ``error`` {message}, ``root-exit`` {code}, ``stopped``
{graceful, killed, survivors, seconds, reason}. Control (owner ->
supervisor): ``stop GRACE_S``; end of file means the owner is gone.

Stdlib only and run with ``-I -S``: it starts in milliseconds and never
depends on the venv it supervises.
"""
from __future__ import annotations

import ctypes
import os
import select
import _signal as signal  # the C module: `signal` imports enum, ~5 ms a launch
import sys
import time

if __package__ in (None, ""):  # run as a file: make ``ci`` importable (stdlib-only modules)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ci.host import cgroups, procfs  # noqa: E402

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
# Grace when the owner is gone: nobody waits for a clean shutdown any more, and
# the tree must be gone within seconds (a CI cancel gives the job ~7.5 s).
DEFAULT_ORPHAN_GRACE_S = 3.0
# After SIGKILL only reaping is left; longer means D-state or a kernel bug.
DEFAULT_KILL_DEADLINE_S = 10.0
# Bounded wait between membership checks while a tree stops: exits of deeper
# descendants send us no SIGCHLD, so we look again at this pace.
STOP_POLL_S = 0.02
# While the tree runs, the loop wakes at least this often to check the owner
# where no pidfd is available (Linux < 5.3) and an exited root's leftovers.
IDLE_POLL_S = 0.5
EXIT_NOT_STARTED = 127


def _json(value) -> str:
    """JSON for the few shapes status lines hold (the json module pulls in re: ~10 ms a launch)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        out = ['"']
        for ch in value:
            out.append(ch if ch >= " " and ch not in '"\\' else f"\\u{ord(ch):04x}")
        return "".join(out) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_json(v) for v in value) + "]"
    return "{" + ",".join(f"{_json(str(k))}:{_json(v)}" for k, v in value.items()) + "}"


def _say(fd: int, event: str, **fields) -> None:
    """One status line to the owner; an owner that is gone is not an error here."""
    try:
        os.write(fd, (_json({"event": event, **fields}) + "\n").encode())
    except OSError:
        pass


def _note(text: str) -> None:
    """One line into the engine log (our stderr), so the log tail says what happened."""
    try:
        os.write(2, f"[kiln-supervisor {os.getpid()}] {text}\n".encode())
    except OSError:
        pass


def _exit_code(status: int) -> int:
    """Popen-style code: the exit status, or -N for a death by signal N."""
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


class Supervisor:
    def __init__(self, opts: Options):
        self.opts = opts
        self.me = os.getpid()
        self.root: int | None = None
        self.root_code: int | None = None
        self.group: cgroups.Cgroup | None = None
        self.stop_signal = False
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)

    # -- membership ----------------------------------------------------------------
    def members(self) -> list[procfs.Stat]:
        """Live members: our descendants, plus the cgroup's (zombies aside)."""
        snap = procfs.table()
        found = {st.pid: st for st in procfs.descendants(self.me, snap) if not st.zombie}
        if self.group is not None:
            for pid in self.group.pids():
                st = snap.get(pid)
                if st is not None and not st.zombie:
                    found[pid] = st
        return list(found.values())

    def reap(self) -> None:
        """Reap every exited child (ours, and every orphan re-parented to us)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.root and self.root_code is None:
                self.root_code = _exit_code(status)
                _say(self.opts.status_fd, "root-exit", code=self.root_code)

    def _wait(self, timeout: float) -> None:
        """Sleep until a signal (SIGCHLD included) arrives or ``timeout`` passes."""
        select.select([self.wake_r], [], [], max(0.0, timeout))
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def wait_empty(self, deadline: float) -> list[procfs.Stat]:
        """Reap until no member is left or ``deadline``; the members still there."""
        while True:
            self.reap()
            left = self.members()
            if not left or time.monotonic() >= deadline:
                return left
            self._wait(min(STOP_POLL_S, deadline - time.monotonic()))

    def kill_all(self, deadline: float) -> list[str]:
        """SIGKILL every member; labels of those it hit."""
        # Labels first: a killed process's command line reads empty.
        named = {st.pid: procfs.label(st.pid) for st in self.members()}
        hit: dict[int, str] = {}
        if self.group is not None:
            for pid in self.group.kill():
                hit[pid] = named.get(pid) or str(pid)
        # Descendants outside the cgroup (none expected) and the subreaper-only
        # case: walk, signal through a pidfd opened *after* re-checking the
        # parent chain, so a reused pid is never hit; repeat for late forks.
        while time.monotonic() < deadline:
            left = [st for st in procfs.descendants(self.me) if not st.zombie]
            if not left:
                break
            for st in left:
                hit.setdefault(st.pid, named.get(st.pid) or procfs.label(st.pid))
                self._kill_descendant(st)
            self.reap()
            self._wait(STOP_POLL_S)
        return list(hit.values())

    def _kill_descendant(self, st: procfs.Stat) -> None:
        procfs.send_signal(st.identity, signal.SIGKILL,
                           still_ours=lambda: procfs.is_descendant(st.pid, self.me))

    # -- stop ------------------------------------------------------------------------
    def stop(self, grace_s: float, reason: str) -> int:
        start = time.monotonic()
        if self.root is not None and self.root_code is None:
            try:
                os.kill(self.root, signal.SIGTERM)  # our child, not yet reaped: the pid is its
            except ProcessLookupError:
                pass
        else:
            # The root is gone (a crash): its orphans were re-parented to us and
            # are the roots now -- e.g. vLLM's EngineCore after the API server died.
            for st in procfs.descendants(self.me):
                if st.ppid == self.me and not st.zombie:
                    procfs.send_signal(st.identity, signal.SIGTERM,
                                       still_ours=lambda st=st: procfs.is_descendant(st.pid, self.me))
        left = self.wait_empty(start + grace_s)
        killed: list[str] = []
        if left:
            killed = self.kill_all(time.monotonic() + self.opts.kill_deadline)
            left = self.wait_empty(time.monotonic() + self.opts.kill_deadline)
        survivors = [procfs.label(st.pid) for st in left]
        seconds = round(time.monotonic() - start, 3)
        _say(self.opts.status_fd, "stopped", graceful=not killed, killed=killed,
             survivors=survivors, seconds=seconds, reason=reason, code=self.root_code)
        how = f"SIGKILLed {len(killed)}: {', '.join(killed)}" if killed else "all exited on SIGTERM"
        _note(f"tree stopped ({reason}) in {seconds:.2f} s; {how}"
              + (f"; SURVIVORS: {', '.join(survivors)}" if survivors else ""))
        self._remove_group()
        if survivors:
            return 1
        code = self.root_code if self.root_code is not None else 0
        return 128 - code if code < 0 else code

    def _remove_group(self) -> None:
        if self.group is None:
            return
        deadline = time.monotonic() + self.opts.kill_deadline
        while not self.group.remove() and time.monotonic() < deadline:
            self._wait(STOP_POLL_S)  # zombies leave the cgroup once reaped

    # -- run -------------------------------------------------------------------------
    def start(self, argv: list[str]) -> bool:
        try:
            self.group, why = cgroups.create(self.opts.tree_id, self.opts.containment)
        except cgroups.CgroupError as exc:
            _say(self.opts.status_fd, "error", message=str(exc))
            return False
        try:
            if self.group is not None:
                self.group.add(self.me)  # the engine inherits it at spawn ...
            try:
                # Python ignores SIGPIPE/SIGXFSZ for itself; an ignored signal
                # survives exec, so hand the engine the defaults (as Popen does).
                self.root = os.posix_spawnp(argv[0], argv, os.environ,
                                            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
            finally:
                if self.group is not None:
                    self.group.leave(self.me)  # ... and we step out: a group kill spares us
        except OSError as exc:
            _say(self.opts.status_fd, "error",
                 message=f"cannot start {argv[0]!r}: {exc.strerror or exc}")
            if self.group is not None:
                self.group.remove()
            return False
        root = procfs.identity(self.root)
        _say(self.opts.status_fd, "started", root=self.root, root_start=root.start if root else None,
             mechanism=self.group.version if self.group else cgroups.NONE,
             cgroup=str(self.group.path) if self.group else None, why=why)
        return True

    def run(self, argv: list[str]) -> int:
        opts = self.opts
        owner_fd = None
        try:
            owner_fd = os.pidfd_open(opts.owner)
        except (OSError, AttributeError):
            pass  # no pidfd: the control pipe's EOF and the parent check below still work
        if os.getppid() != opts.owner:
            _say(opts.status_fd, "error", message=f"owner {opts.owner} is gone before the start")
            return EXIT_NOT_STARTED
        if not self.start(argv):
            return EXIT_NOT_STARTED
        watch = [opts.control_fd, self.wake_r] + ([owner_fd] if owner_fd is not None else [])
        buf = b""
        while True:
            ready, _, _ = select.select(watch, [], [], IDLE_POLL_S)
            self._wait(0)  # drain signal wakeups
            self.reap()
            if self.stop_signal:
                return self.stop(opts.orphan_grace, "signal to the supervisor")
            if owner_fd in ready or (owner_fd is None and os.getppid() != opts.owner):
                return self.stop(opts.orphan_grace, f"owner {opts.owner} is gone")
            if opts.control_fd in ready:
                data = os.read(opts.control_fd, 4096)
                if not data:
                    return self.stop(opts.orphan_grace, f"owner {opts.owner} is gone")
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    cmd, _, arg = line.decode().partition(" ")
                    if cmd == "stop":
                        return self.stop(float(arg or opts.orphan_grace), "stop requested")
            if self.root_code is not None and not self.members():
                _note(f"engine exited with code {self.root_code}; nothing left in its tree")
                self._remove_group()
                return self.root_code if self.root_code >= 0 else 128 - self.root_code


class Options:
    """The supervisor's options (hand-parsed: argparse alone costs ~14 ms of every launch)."""

    def __init__(self, tree_id: str, status_fd: int, control_fd: int, owner: int,
                 orphan_grace: float = DEFAULT_ORPHAN_GRACE_S,
                 kill_deadline: float = DEFAULT_KILL_DEADLINE_S, containment: str | None = None):
        self.tree_id, self.status_fd, self.control_fd, self.owner = tree_id, status_fd, control_fd, owner
        self.orphan_grace, self.kill_deadline, self.containment = orphan_grace, kill_deadline, containment


_OPTIONS = {"--tree-id": ("tree_id", str), "--status-fd": ("status_fd", int),
            "--control-fd": ("control_fd", int), "--owner": ("owner", int),
            "--orphan-grace": ("orphan_grace", float), "--kill-deadline": ("kill_deadline", float),
            "--containment": ("containment", str)}
USAGE = ("usage: supervisor.py --tree-id ID --status-fd N --control-fd N --owner PID "
         "[--orphan-grace S] [--kill-deadline S] [--containment MODE] -- COMMAND [ARGS...]")


def _parse(argv: list[str]) -> tuple[Options, list[str]]:
    if "--" not in argv:
        raise SystemExit(USAGE)
    cut = argv.index("--")
    head, command = argv[:cut], argv[cut + 1:]
    if len(head) % 2 or not command:
        raise SystemExit(USAGE)
    given = {}
    for flag, value in zip(head[::2], head[1::2]):
        if flag not in _OPTIONS:
            raise SystemExit(f"supervisor.py: unknown option {flag}\n{USAGE}")
        name, kind = _OPTIONS[flag]
        try:
            given[name] = kind(value)
        except ValueError:
            raise SystemExit(f"supervisor.py: bad value for {flag}: {value!r}") from None
    missing = [f for f, (n, _) in _OPTIONS.items() if n in ("tree_id", "status_fd", "control_fd", "owner")
               and n not in given]
    if missing:
        raise SystemExit(f"supervisor.py: missing {', '.join(missing)}\n{USAGE}")
    if given.get("containment") not in (None, *cgroups.MODES):
        raise SystemExit(f"supervisor.py: --containment must be one of {', '.join(cgroups.MODES)}")
    return Options(**given), command


def main(argv: list[str] | None = None) -> int:
    opts, command = _parse(sys.argv[1:] if argv is None else argv)
    sup = Supervisor(opts)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        _say(opts.status_fd, "error", message=f"prctl(PR_SET_CHILD_SUBREAPER): "
                                              f"{os.strerror(ctypes.get_errno())}")
        return EXIT_NOT_STARTED

    def on_stop(signum, frame):
        sup.stop_signal = True

    signal.set_wakeup_fd(sup.wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda s, f: None)  # wakes select through the wakeup fd
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_stop)
    return sup.run(command)


if __name__ == "__main__":
    sys.exit(main())
