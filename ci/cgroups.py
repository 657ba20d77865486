"""A cgroup per engine tree, where the host allows one: membership no process can shed.

The supervisor (ci/supervisor.py) is a child subreaper, which already keeps
every orphan of the tree as its descendant. A cgroup adds what a parent link
cannot: membership that survives the supervisor itself being killed, and a
kill of the whole group in one write, with no race against a tree that forks
while it is being killed (systemd's ``KillMode=control-group``).

Mechanisms, best first (``KILN_CONTAINMENT`` forces one; ``auto`` takes the
best that works here):

* ``cgroup-v2`` -- a child of our own v2 cgroup; stopped by ``cgroup.kill``
  (Linux >= 5.14).
* ``cgroup-v1`` -- a child of our own v1 ``freezer`` cgroup; stopped by
  freezing it, SIGKILLing every member, thawing (frozen processes cannot fork
  or exit, so the member list is exact).
* ``subreaper`` -- no cgroup (not root, read-only /sys/fs/cgroup in a
  container): the supervisor's descendants are the tree.

Stdlib only: imported by the supervisor under ``python -I -S``.
"""
from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

MODE_ENV = "KILN_CONTAINMENT"
V2, V1, NONE = "cgroup-v2", "cgroup-v1", "subreaper"
MODES = ("auto", V2, V1, NONE)
# Every kiln cgroup is named so; the reaper and humans can tell them apart.
PREFIX = "kiln-"
# A freezer cgroup reports FREEZING until every task has stopped; a task in
# uninterruptible sleep can delay that. Past this the kill goes ahead anyway
# and the caller's verification decides.
FREEZE_DEADLINE_S = 2.0
POLL_S = 0.005


class CgroupError(RuntimeError):
    """A cgroup could not be created or joined (the caller falls back or fails)."""


def _mountinfo() -> list[tuple[str, str, str]]:
    """(mount point, fs type, super options) for each mount of this process."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                fields, tail = pre.split(), post.split()
                if len(fields) >= 5 and len(tail) >= 3:
                    out.append((fields[4].replace("\\040", " "), tail[0], tail[2]))
    except OSError:
        pass
    return out


def _own_paths() -> dict[str, str]:
    """Our cgroup path per hierarchy: ``""`` for v2, controller names for v1."""
    paths = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for name in controllers.split(",") if controllers else [""]:
                    paths[name] = path
    except (OSError, ValueError):
        pass
    return paths


def v2_base() -> Path | None:
    """Our own cgroup in the v2 hierarchy, or None when there is none."""
    own = _own_paths().get("")
    for mount, fstype, _ in _mountinfo():
        if fstype == "cgroup2" and own is not None and not own.startswith("/.."):
            return Path(mount + own.rstrip("/")) if own != "/" else Path(mount)
    return None


def v1_base(controller: str = "freezer") -> Path | None:
    """Our own cgroup in the v1 hierarchy of ``controller``, or None."""
    own = _own_paths().get(controller)
    for mount, fstype, opts in _mountinfo():
        if fstype == "cgroup" and controller in opts.split(",") and own is not None:
            return Path(mount + own.rstrip("/")) if own != "/" else Path(mount)
    return None


@dataclass(frozen=True)
class Cgroup:
    """One tree's cgroup: ``path`` in a hierarchy of ``version`` (V2 or V1)."""

    path: Path
    version: str

    @property
    def parent(self) -> Path:
        return self.path.parent

    def add(self, pid: int) -> None:
        """Move ``pid`` (and so its future children) into this cgroup."""
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def leave(self, pid: int) -> None:
        """Move ``pid`` back to the cgroup this one was created in."""
        (self.parent / "cgroup.procs").write_text(f"{pid}\n")

    def pids(self) -> list[int]:
        """Members now (zombies may still be listed until reaped)."""
        try:
            text = (self.path / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(x) for x in text.split()]

    def exists(self) -> bool:
        return self.path.is_dir()

    def kill(self) -> list[int]:
        """SIGKILL every member at once; returns the pids that were members."""
        members = self.pids()
        if not members:
            return []
        if self.version == V2:
            (self.path / "cgroup.kill").write_text("1\n")
            return members
        state = self.path / "freezer.state"
        state.write_text("FROZEN\n")
        deadline = time.monotonic() + FREEZE_DEADLINE_S
        while state.read_text().strip() != "FROZEN" and time.monotonic() < deadline:
            time.sleep(POLL_S)  # bounded poll: the kernel offers no event for it
        members = self.pids()
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)  # frozen: no member can fork or be reused
            except ProcessLookupError:
                pass
        state.write_text("THAWED\n")  # a killed task dies only once it runs again
        return members

    def remove(self) -> bool:
        """rmdir the cgroup; False while it still has members."""
        try:
            self.path.rmdir()
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
                return False
            raise
        return True


def _make(base: Path | None, version: str, name: str) -> Cgroup:
    if base is None:
        raise CgroupError(f"no {version} hierarchy mounted for this process")
    path = base / name
    try:
        path.mkdir()
    except OSError as exc:
        raise CgroupError(f"cannot create {path}: {exc.strerror or exc}") from None
    group = Cgroup(path, version)
    if version == V2 and not (path / "cgroup.kill").exists():
        group.remove()
        raise CgroupError("this kernel has no cgroup.kill (Linux < 5.14)")
    if version == V1 and not (path / "freezer.state").exists():
        group.remove()
        raise CgroupError(f"{base} is not a freezer hierarchy")
    return group


def create(tree_id: str, mode: str | None = None) -> tuple[Cgroup | None, str]:
    """A new cgroup for one tree, by ``mode``; (None, why) when only the subreaper applies.

    An explicitly requested cgroup mechanism that cannot be had raises
    CgroupError: asked-for containment must never silently weaken.
    """
    mode = mode or os.environ.get(MODE_ENV) or "auto"
    if mode not in MODES:
        raise CgroupError(f"{MODE_ENV}={mode!r} is not one of {', '.join(MODES)}")
    if mode == NONE:
        return None, f"{MODE_ENV}={NONE}"
    name = f"{PREFIX}{tree_id}"
    tried = []
    for version, base in ((V2, v2_base), (V1, v1_base)):
        if mode not in ("auto", version):
            continue
        try:
            return _make(base(), version, name), ""
        except (CgroupError, OSError) as exc:
            if mode == version:
                raise CgroupError(f"{MODE_ENV}={mode} asked for, but: {exc}") from None
            tried.append(f"{version}: {exc}")
    return None, "; ".join(tried)


def probe(mode: str | None = None) -> str:
    """One line: the mechanism new trees get on this host, and why not a better one."""
    try:
        group, why = create(f"probe-{os.getpid()}", mode)
    except CgroupError as exc:
        return f"error: {exc}"
    if group is None:
        return f"{NONE} only ({why})"
    group.remove()
    return f"{NONE} + {group.version} ({group.parent})"
