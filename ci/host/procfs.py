"""The Linux process table read straight from /proc: parents, identities, scans by name.

Stdlib only, on purpose: ``ci/host/supervisor.py`` imports this module while it
runs with ``python -I -S`` (no site-packages), so that starting an engine under
it costs milliseconds and cannot break when a venv's packages do.

A pid alone is not an identity: pids are reused. A process is named here by
``(pid, start ticks)`` -- field 22 of ``/proc/PID/stat``, fixed for the life of
the process -- and every "is it still that process?" check compares both.

Names come from ``comm`` and the command line, which engines overwrite with
``setproctitle`` (``VLLM::EngineCore``, ``sglang::scheduler``): that is exactly
what an independent leak scan must match, because the environment tag they
erased cannot be read back.
"""
from __future__ import annotations

import os
import _signal as signal  # the C module: `signal` imports enum, ~5 ms a launch

# No dataclasses/typing/pathlib here: each costs the supervisor's start
# milliseconds (python -X importtime), and it starts once per engine launch.
PROC = "/proc"


class Identity(tuple):
    """A process as it was seen: ``(pid, start ticks since boot)``."""

    __slots__ = ()

    def __new__(cls, pid, start=None):
        if start is None:  # Identity((pid, start)), as copy/dataclasses.asdict rebuild it
            pid, start = pid
        return tuple.__new__(cls, (int(pid), int(start)))

    def __getnewargs__(self):
        return tuple(self)

    pid = property(lambda self: self[0])
    start = property(lambda self: self[1])


class Stat:
    """The fields of ``/proc/PID/stat`` kiln needs."""

    __slots__ = ("pid", "comm", "state", "ppid", "start")

    def __init__(self, pid: int, comm: str, state: str, ppid: int, start: int):
        self.pid, self.comm, self.state, self.ppid, self.start = pid, comm, state, ppid, start

    def __repr__(self) -> str:
        return f"Stat(pid={self.pid}, comm={self.comm!r}, state={self.state}, ppid={self.ppid})"

    @property
    def zombie(self) -> bool:
        # Z: exited, not yet reaped; X: dead. Neither holds memory, ports or GPUs.
        return self.state in ("Z", "X")

    @property
    def identity(self) -> Identity:
        return Identity(self.pid, self.start)


def stat(pid: int) -> Stat | None:
    """``/proc/PID/stat`` parsed, or None when the process is gone."""
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as f:
            raw = f.read().decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm sits in parentheses and may itself contain ") " (a renamed process
    # can call itself anything): the last ')' ends it.
    head, _, rest = raw.rpartition(")")
    comm = head.partition("(")[2]
    fields = rest.split()
    try:
        return Stat(pid=pid, comm=comm, state=fields[0], ppid=int(fields[1]), start=int(fields[19]))
    except (IndexError, ValueError):
        return None


def pids():
    """Every pid in the table right now (threads are not listed)."""
    for name in os.listdir(PROC):
        if name.isdigit():
            yield int(name)


def table() -> dict[int, Stat]:
    """A snapshot of every process's stat, keyed by pid."""
    out = {}
    for pid in pids():
        st = stat(pid)
        if st is not None:
            out[pid] = st
    return out


def identity(pid: int) -> Identity | None:
    st = stat(pid)
    return None if st is None else st.identity


def is_alive(ident: Identity | tuple[int, int]) -> bool:
    """True while the very process ``ident`` names runs (a zombie counts as gone)."""
    st = stat(ident[0])
    return st is not None and st.start == ident[1] and not st.zombie


def descendants(root: int, snapshot: dict[int, Stat] | None = None) -> list[Stat]:
    """Every process below ``root`` (not ``root`` itself), zombies included, by parent links."""
    snap = table() if snapshot is None else snapshot
    children: dict[int, list[Stat]] = {}
    for st in snap.values():
        children.setdefault(st.ppid, []).append(st)
    found: list[Stat] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            found.append(child)
            stack.append(child.pid)
    return found


def ancestors(pid: int, snapshot: dict[int, Stat] | None = None) -> list[int]:
    """Parents of ``pid`` upward, nearest first, stopping before init (pid 1) and the kernel (0)."""
    snap = table() if snapshot is None else snapshot
    chain: list[int] = []
    st = snap.get(pid)
    while st is not None and st.ppid > 1 and len(chain) < 4096:
        chain.append(st.ppid)
        st = snap.get(st.ppid)
    return chain


def is_descendant(pid: int, root: int) -> bool:
    """True when ``root`` is an ancestor of ``pid`` now (walks parent links upward)."""
    seen = 0
    while pid > 1 and seen < 4096:  # bounded: a corrupt chain must not loop forever
        st = stat(pid)
        if st is None:
            return False
        if st.ppid == root:
            return True
        pid, seen = st.ppid, seen + 1
    return False


def cmdline(pid: int) -> str:
    """The command line as one string ('' when gone or unreadable)."""
    try:
        with open(f"{PROC}/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def label(pid: int) -> str:
    """``pid name [command line]`` for messages; names survive setproctitle."""
    st = stat(pid)
    comm = st.comm if st else "?"
    return f"{pid} {comm} [{cmdline(pid)[:100]}]"


def matching(patterns, *, exclude=()) -> list[Stat]:
    """Live (non-zombie) processes whose name or command line contains any of ``patterns``.

    The independent check behind "nothing left": it reads no tag, registry or
    cgroup kiln wrote, only what every process shows about itself.
    """
    pats = [p for p in patterns if p]
    skip = {os.getpid(), *exclude}
    found = []
    for pid in pids():
        if pid in skip:
            continue
        st = stat(pid)
        if st is None or st.zombie:
            continue
        text = f"{st.comm}\0{cmdline(pid)}"
        if any(p in text for p in pats):
            found.append(st)
    return found


def send_signal(ident, sig: int, still_ours=None) -> bool:
    """Signal the very process ``ident`` names; True when it was sent.

    A pidfd is opened first and the identity (and ``still_ours()``, e.g. "is
    it still in the tree") re-checked after, so a pid reused in between is
    never hit. Without pidfds (Linux < 5.3) the same checks precede a kill().
    """
    fd = None
    try:
        fd = os.pidfd_open(ident[0])
    except AttributeError:
        pass
    except OSError:
        return False  # gone already
    try:
        if not is_alive(ident) or (still_ours is not None and not still_ours()):
            return False
        if fd is not None:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(ident[0], sig)
        return True
    except OSError:
        return False
    finally:
        if fd is not None:
            os.close(fd)
