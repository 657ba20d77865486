"""cgroup layouts a host may not have: a fake cgroup root, and the host's mount table trimmed.

The containment mode is the host's (ci/host/cgroups.py reads the mount table),
so a v2-only GitHub runner never runs the v1 freezer path for real, nor a
v1-only host the v2 one. Two stand-ins show kiln the other layouts:

* :class:`FakeCgroupFs` -- a directory tree, a mount table and a
  ``/proc/self/cgroup`` shaped like one of :data:`LAYOUTS` (v2-only, v1-only,
  hybrid, none, ...), for ``cgroups.Layout.read`` and ``cgroups.create``. It
  plays the kernel where cgroups.py relies on it: a new cgroup directory comes
  with its hierarchy's control files, and rmdir of a cgroup with a live member
  is EBUSY. It does not move or kill processes: a write to ``cgroup.procs``
  or ``cgroup.kill`` is only recorded, so tests read what kiln wrote.
* :func:`trim_mountinfo` -- this host's own mount table with one kind of
  hierarchy left out, handed to kiln (and its supervisors) through
  ``$KILN_CGROUP_MOUNTINFO``: a hybrid host then looks v2-only or v1-only
  while the real kernel does the containing.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

V2_ONLY, V1_ONLY = "v2-only", "v1-only"
# Which mount-table file system types each trimmed layout keeps.
KEEP = {V2_ONLY: "cgroup2", V1_ONLY: "cgroup"}
# The control files a new cgroup directory has, by hierarchy (the ones kiln reads or writes).
V2_FILES = {"cgroup.procs": "", "cgroup.events": "populated 0\nfrozen 0\n", "cgroup.kill": ""}
V1_FREEZER_FILES = {"cgroup.procs": "", "tasks": "", "freezer.state": "THAWED\n"}
V1_FILES = {"cgroup.procs": "", "tasks": ""}


class LayoutError(ValueError):
    """A layout name this module does not know; the message lists the known ones."""


def trim_mountinfo(table: str, keep: str) -> str:
    """``table`` (mountinfo text) without the cgroup mounts ``keep`` (V2_ONLY or V1_ONLY) hides."""
    if keep not in KEEP:
        raise LayoutError(f"cgroup layout {keep!r} is not one of {', '.join(KEEP)}")
    out = []
    for line in table.splitlines():
        fields = line.partition(" - ")[2].split()
        fstype = fields[0] if fields else ""
        if fstype in ("cgroup", "cgroup2") and fstype != KEEP[keep]:
            continue
        out.append(line)
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class LayoutSpec:
    """One host's cgroup layout: its cgroup mounts and what ``/proc/self/cgroup`` says."""

    name: str
    # (mount point under the fake root, fs type, super options), as mountinfo lists them.
    mounts: tuple[tuple[str, str, str], ...]
    # /proc/self/cgroup: "hierarchy-id:controllers:path" lines.
    cgroup: str


_V1_MOUNTS = (("/sys/fs/cgroup/systemd", "cgroup", "rw,xattr,name=systemd"),
              ("/sys/fs/cgroup/freezer", "cgroup", "rw,freezer"),
              ("/sys/fs/cgroup/cpu,cpuacct", "cgroup", "rw,cpu,cpuacct"),
              ("/sys/fs/cgroup/memory", "cgroup", "rw,memory"))
_V1_OWN = "9:freezer:/\n4:memory:/system.slice/runner.service\n3:cpu,cpuacct:/system.slice/runner.service\n" \
          "1:name=systemd:/system.slice/runner.service\n"
LAYOUTS = {spec.name: spec for spec in (
    # GitHub's Ubuntu runners (22.04, 24.04): the unified hierarchy alone.
    LayoutSpec(V2_ONLY, (("/sys/fs/cgroup", "cgroup2", "rw,nsdelegate,memory_recursiveprot"),),
               "0::/system.slice/runner.service\n"),
    # Older distributions (CentOS 7, Ubuntu 18.04 without systemd's unified mount).
    LayoutSpec(V1_ONLY, _V1_MOUNTS, _V1_OWN),
    # systemd's hybrid setup (Ubuntu 20.04, this project's CI box): both kinds.
    LayoutSpec("hybrid", (*_V1_MOUNTS, ("/sys/fs/cgroup/unified", "cgroup2", "rw,nsdelegate")),
               "0::/user.slice/session-1.scope\n" + _V1_OWN),
    # A container without cgroupfs: nothing mounted, the kernel still answers /proc/self/cgroup.
    LayoutSpec("none", (), "0::/\n"),
    # A cgroup namespace whose root is not our cgroup: v2 is mounted but our
    # cgroup is outside what the mount shows ("/.." paths).
    LayoutSpec("v2-outside-namespace", (("/sys/fs/cgroup", "cgroup2", "rw"),), "0::/../other.scope\n"),
)}


class FakeCgroupFs:
    """A fake cgroup root under ``root`` laid out as ``LAYOUTS[name]``.

    ``has_kill_file=False`` plays a kernel older than 5.14 (v2 without ``cgroup.kill``).
    """

    def __init__(self, root: Path, name: str, *, has_kill_file: bool = True):
        if name not in LAYOUTS:
            raise LayoutError(f"cgroup layout {name!r} is not one of {', '.join(LAYOUTS)}")
        self.root = Path(root)
        self.spec = LAYOUTS[name]
        self.has_kill_file = has_kill_file
        self.mountinfo = self.root / "mountinfo"
        self.proc_cgroup = self.root / "proc-self-cgroup"
        # Real mkdir/rmdir, kept before a test swaps them for the ones below.
        self._mkdir, self._rmdir = os.mkdir, os.rmdir
        self.root.mkdir(parents=True, exist_ok=True)
        lines = [f"{20 + i} 1 0:{40 + i} / {self.root}{point} rw,relatime - {fstype} cgroup {opts}"
                 for i, (point, fstype, opts) in enumerate(self.spec.mounts)]
        self.mountinfo.write_text("\n".join(["1 0 0:1 / / rw - ext4 /dev/root rw", *lines]) + "\n")
        self.proc_cgroup.write_text(self.spec.cgroup)
        own = self._own_paths()
        for point, fstype, opts in self.spec.mounts:
            mount = Path(f"{self.root}{point}")
            mount.mkdir(parents=True, exist_ok=True)
            self._populate(mount, fstype, opts)
            path = own.get("" if fstype == "cgroup2" else self._key(opts))
            if path and not path.startswith("/.."):
                here = mount
                for part in Path(path).parts[1:]:
                    here = here / part
                    here.mkdir(exist_ok=True)
                    self._populate(here, fstype, opts)

    def _own_paths(self) -> dict[str, str]:
        out = {}
        for line in self.spec.cgroup.splitlines():
            _, controllers, path = line.split(":", 2)
            out[controllers] = path
        return out

    @staticmethod
    def _key(opts: str) -> str:
        """The /proc/self/cgroup controller field a v1 mount's options stand for."""
        names = [o for o in opts.split(",") if o not in ("rw", "ro", "xattr")]
        return ",".join(names)

    def _hierarchy(self, path: str | os.PathLike) -> tuple[str, str] | None:
        """(fs type, options) of the fake mount ``path`` lies under, or None."""
        path = os.path.abspath(path)
        for point, fstype, opts in self.spec.mounts:
            mount = f"{self.root}{point}"
            if path == mount or path.startswith(mount + os.sep):
                return fstype, opts
        return None

    def _populate(self, path: Path, fstype: str, opts: str) -> None:
        if fstype == "cgroup2":
            files = {k: v for k, v in V2_FILES.items() if k != "cgroup.kill" or self.has_kill_file}
        else:
            files = V1_FREEZER_FILES if "freezer" in opts.split(",") else V1_FILES
        for name, text in files.items():
            (path / name).write_text(text)

    # -- the kernel's part --------------------------------------------------------------
    def mkdir(self, path, mode=0o777, *, dir_fd=None) -> None:
        """mkdir; inside a fake hierarchy the new cgroup gets its control files, as from the kernel."""
        self._mkdir(path, mode, dir_fd=dir_fd)
        where = self._hierarchy(path)
        if where is not None:
            self._populate(Path(path), *where)

    def rmdir(self, path, *, dir_fd=None) -> None:
        """rmdir; a fake cgroup with a live member is EBUSY, an empty one goes with its files."""
        if self._hierarchy(path) is None or not (Path(path) / "cgroup.procs").exists():
            return self._rmdir(path, dir_fd=dir_fd)
        if self.members(path):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(path))
        for child in Path(path).iterdir():
            if child.is_file():
                child.unlink()
        self._rmdir(path, dir_fd=dir_fd)

    @staticmethod
    def members(path) -> list[int]:
        """Pids listed in ``path``'s cgroup.procs that still run (the kernel drops exited ones)."""
        text = (Path(path) / "cgroup.procs").read_text()
        return [int(p) for p in text.split() if os.path.exists(f"/proc/{p}")]

    def install(self, monkeypatch, module) -> None:
        """Give ``module`` (ci.host.cgroups) this fake's mkdir/rmdir; every other os call is the real one."""
        monkeypatch.setattr(module, "os", _OsWithKernel(self))


class _OsWithKernel:
    """The os module, but mkdir/rmdir go through a FakeCgroupFs."""

    def __init__(self, fs: FakeCgroupFs):
        self.mkdir, self.rmdir = fs.mkdir, fs.rmdir

    def __getattr__(self, name: str):
        return getattr(os, name)
