"""A cgroup per engine tree, where the host allows one: membership no process can shed.

The supervisor (ci/host/supervisor.py) is a child subreaper, which already keeps
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

Stdlib only, and light (no pathlib/dataclasses: the supervisor imports this
on every engine launch, under ``python -I -S``). Paths are plain strings.
"""
from __future__ import annotations

import errno
import os
import _signal as signal  # the C module: `signal` imports enum, ~5 ms a launch
import time

MODE_ENV = "KILN_CONTAINMENT"
# A mount table read instead of /proc/self/mountinfo. The host's layout decides
# the mode, so a test cannot pick v1 or v2 by asking: it shows kiln another
# layout instead -- the host's table with one kind of hierarchy left out
# (tests/integration/test_containment.py), or a fake cgroup root
# (tests/fakes/cgroupfs.py). It travels to the supervisor in the environment.
MOUNTINFO_ENV = "KILN_CGROUP_MOUNTINFO"
PROC_MOUNTINFO = "/proc/self/mountinfo"
PROC_CGROUP = "/proc/self/cgroup"
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


def _join(mount: str, own: str) -> str:
    return mount if own in ("", "/") else mount + own.rstrip("/")


class Layout:
    """What this process sees of cgroupfs: its mounts, and its own cgroup in each hierarchy.

    Hosts differ, and the mode a tree gets follows from this, never from a
    caller's assumption: GitHub's Ubuntu runners mount only v2
    (``/sys/fs/cgroup``), older distributions only v1 controllers, systemd's
    hybrid setup both (v2 at ``/sys/fs/cgroup/unified``).
    """

    __slots__ = ("mounts", "own")

    def __init__(self, mounts: list[tuple[str, str, str]], own: dict[str, str]):
        self.mounts = mounts  # (mount point, fs type, super options)
        self.own = own  # "" for v2, controller names (and name=...) for v1

    @classmethod
    def parse(cls, mountinfo: str, cgroup: str) -> "Layout":
        """From the text of a mountinfo table and of a /proc/<pid>/cgroup file."""
        mounts = []
        for line in mountinfo.splitlines():
            pre, _, post = line.partition(" - ")
            fields, tail = pre.split(), post.split()
            if len(fields) >= 5 and len(tail) >= 3:
                mounts.append((fields[4].replace("\\040", " "), tail[0], tail[2]))
        own = {}
        for line in cgroup.splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3:
                for name in parts[1].split(",") if parts[1] else [""]:
                    own[name] = parts[2]
        return cls(mounts, own)

    @classmethod
    def read(cls, mountinfo: str | None = None, cgroup: str = PROC_CGROUP) -> "Layout":
        """This process's layout; the mount table from ``mountinfo``, ``$KILN_CGROUP_MOUNTINFO``
        or /proc/self/mountinfo, first given first."""
        table = mountinfo or os.environ.get(MOUNTINFO_ENV) or PROC_MOUNTINFO
        return cls.parse(_read(table), _read(cgroup))

    def v2_base(self) -> str | None:
        """Our own cgroup in the v2 hierarchy, or None when there is none."""
        own = self.own.get("")
        for mount, fstype, _ in self.mounts:
            # "/.." prefixes: our cgroup lies outside this namespace's view of the tree.
            if fstype == "cgroup2" and own is not None and not own.startswith("/.."):
                return _join(mount, own)
        return None

    def v1_base(self, controller: str = "freezer") -> str | None:
        """Our own cgroup in the v1 hierarchy of ``controller``, or None."""
        own = self.own.get(controller)
        for mount, fstype, opts in self.mounts:
            if fstype == "cgroup" and controller in opts.split(",") and own is not None:
                return _join(mount, own)
        return None

    def hierarchies(self) -> list[str]:
        """The cgroup mechanisms this layout mounts, best first (mounted is not yet writable)."""
        return [v for v, base in ((V2, self.v2_base), (V1, self.v1_base)) if base() is not None]


def v2_base() -> str | None:
    """Our own cgroup in the v2 hierarchy on this host, or None when there is none."""
    return Layout.read().v2_base()


def v1_base(controller: str = "freezer") -> str | None:
    """Our own cgroup in the v1 hierarchy of ``controller`` on this host, or None."""
    return Layout.read().v1_base(controller)


class Cgroup:
    """One tree's cgroup: ``path`` (a directory) in a hierarchy of ``version`` (V2 or V1)."""

    __slots__ = ("path", "version")

    def __init__(self, path, version: str):
        self.path = str(path)
        self.version = version

    def __repr__(self) -> str:
        return f"Cgroup({self.path!r}, {self.version})"

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @staticmethod
    def _write(path: str, text: str) -> None:
        with open(path, "w") as f:
            f.write(text)

    @property
    def parent(self) -> str:
        return os.path.dirname(self.path)

    def add(self, pid: int) -> None:
        """Move ``pid`` (and so its future children) into this cgroup."""
        self._write(self._file("cgroup.procs"), f"{pid}\n")

    def leave(self, pid: int) -> None:
        """Move ``pid`` back to the cgroup this one was created in."""
        self._write(os.path.join(self.parent, "cgroup.procs"), f"{pid}\n")

    def pids(self) -> list[int]:
        """Members now (zombies may still be listed until reaped)."""
        try:
            with open(self._file("cgroup.procs")) as f:
                text = f.read()
        except OSError:
            return []
        return [int(x) for x in text.split()]

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def kill(self) -> list[int]:
        """SIGKILL every member at once; returns the pids that were members."""
        members = self.pids()
        if not members:
            return []
        if self.version == V2:
            self._write(self._file("cgroup.kill"), "1\n")
            return members
        state = self._file("freezer.state")
        self._write(state, "FROZEN\n")
        deadline = time.monotonic() + FREEZE_DEADLINE_S
        while _read(state) != "FROZEN" and time.monotonic() < deadline:
            time.sleep(POLL_S)  # bounded poll: the kernel offers no event for it
        members = self.pids()
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)  # frozen: no member can fork or be reused
            except ProcessLookupError:
                pass
        self._write(state, "THAWED\n")  # a killed task dies only once it runs again
        return members

    def remove(self) -> bool:
        """rmdir the cgroup; False while it still has members."""
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
                return False
            raise
        return True


def _read(path: str) -> str:
    """The file's text, stripped; "" when it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _make(base: str | None, version: str, name: str) -> Cgroup:
    if base is None:
        raise CgroupError(f"no {version} hierarchy mounted for this process")
    path = os.path.join(base, name)
    try:
        os.mkdir(path)
    except OSError as exc:
        raise CgroupError(f"cannot create {path}: {exc.strerror or exc}") from None
    group = Cgroup(path, version)
    if version == V2 and not os.path.exists(os.path.join(path, "cgroup.kill")):
        group.remove()
        raise CgroupError("this kernel has no cgroup.kill (Linux < 5.14)")
    if version == V1 and not os.path.exists(os.path.join(path, "freezer.state")):
        group.remove()
        raise CgroupError(f"{base} is not a freezer hierarchy")
    return group


def create(tree_id: str, mode: str | None = None,
           layout: Layout | None = None) -> tuple[Cgroup | None, str]:
    """A new cgroup for one tree, by ``mode``; (None, why) when only the subreaper applies.

    An explicitly requested cgroup mechanism that cannot be had raises
    CgroupError: asked-for containment must never silently weaken.
    ``layout`` defaults to this host's (``Layout.read``).
    """
    mode = mode or os.environ.get(MODE_ENV) or "auto"
    if mode not in MODES:
        raise CgroupError(f"{MODE_ENV}={mode!r} is not one of {', '.join(MODES)}")
    if mode == NONE:
        return None, f"{MODE_ENV}={NONE}"
    name = f"{PREFIX}{tree_id}"
    layout = layout if layout is not None else Layout.read()
    tried = []
    for version, base in ((V2, layout.v2_base), (V1, layout.v1_base)):
        if mode not in ("auto", version):
            continue
        try:
            return _make(base(), version, name), ""
        except (CgroupError, OSError) as exc:
            if mode == version:
                raise CgroupError(f"{MODE_ENV}={mode} asked for, but: {exc}") from None
            tried.append(f"{version}: {exc}")
    return None, "; ".join(tried)


def detect(mode: str | None = None, layout: Layout | None = None) -> tuple[str, str]:
    """(mechanism, detail) new trees get here: V2, V1 or NONE; detail is the cgroups'
    parent directory, or why no cgroup.

    Found by creating and removing a probe cgroup, so permissions (not root,
    read-only /sys/fs/cgroup) count as well as mounts. CgroupError as ``create``.
    """
    group, why = create(f"probe-{os.getpid()}", mode, layout)
    if group is None:
        return NONE, why
    group.remove()
    return group.version, group.parent


def probe(mode: str | None = None) -> str:
    """One line: the mechanism new trees get on this host, and why not a better one."""
    try:
        mechanism, detail = detect(mode)
    except CgroupError as exc:
        return f"error: {exc}"
    if mechanism == NONE:
        return f"{NONE} only ({detail})"
    return f"{NONE} + {mechanism} ({detail})"
