"""Stale-run reaping: stop what a dead harness left behind, and nothing else.

A job cancelled with SIGKILL, or OOM-killed, leaves its engine trees to their
supervisors, which stop them; if a supervisor died too, its tree is still in
the registry (ci/host/registry.py). Every run calls :func:`reap` first (the e2e
plugin, warmup, ``invoke ci``), and ``invoke reap [--dry-run]`` does it by hand:

* a tree whose owner (pid + start time) still runs belongs to another job on
  this host and is never touched;
* a tree whose owner is gone is stopped with the supervisor's own policy --
  its supervisor asked first, then SIGKILL to every member still there --
  where membership is the tree's cgroup, the supervisor's descendants and the
  tag cross-check, never a name;
* each reaped tree is one line: what it was, what was left, how it ended.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from ci.host import cgroups, procfs
from ci.host.registry import Registry, TreeEntry

log = logging.getLogger(__name__)

# The supervisor's own stop after its owner died: orphan grace (3 s) plus
# reaping; past this the reaper kills the members itself.
SUPERVISOR_STOP_S = 8.0
# After SIGKILL only the kernel's reaping is left.
KILL_WAIT_S = 10.0
POLL_S = 0.02


@dataclass
class Reaped:
    """One stale tree and what reaping it found and did."""

    entry: TreeEntry
    members: list[str] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)
    survivors: list[str] = field(default_factory=list)
    dry_run: bool = False

    def line(self) -> str:
        e = self.entry
        head = f"{'would reap' if self.dry_run else 'reaped'} {e.describe()}: owner gone"
        if not self.members:
            return f"{head}; nothing left running"
        body = f"{len(self.members)} process(es) left: {', '.join(self.members)}"
        if self.dry_run:
            return f"{head}; {body}"
        tail = f"; SIGKILLed {len(self.killed)}" if self.killed else "; stopped by its supervisor"
        if self.survivors:
            tail += f"; SURVIVORS: {', '.join(self.survivors)}"
        return f"{head}; {body}{tail}"


def member_pids(entry: TreeEntry) -> list[int]:
    """Live members of ``entry`` now: cgroup, supervisor's descendants, the root, the tag."""
    from ci.host.procs import tagged  # psutil-based tag cross-check

    found: set[int] = set()
    if entry.cgroup:
        found.update(cgroups.Cgroup(Path(entry.cgroup), entry.mechanism).pids())
    if entry.supervisor and procfs.is_alive(entry.supervisor):
        found.update(st.pid for st in procfs.descendants(entry.supervisor[0]))
    if entry.root and procfs.is_alive(entry.root):
        found.add(entry.root[0])
    found.update(p.pid for p in tagged(entry.tag))
    if entry.supervisor:
        found.discard(entry.supervisor[0])
    found.discard(os.getpid())
    return sorted(p for p in found if (st := procfs.stat(p)) is not None and not st.zombie)


def _kill_member(pid: int, entry: TreeEntry) -> None:
    """SIGKILL ``pid`` if it is still a member of ``entry`` (checked after a pidfd is open)."""
    ident = procfs.identity(pid)
    if ident is not None:
        procfs.send_signal(ident, signal.SIGKILL, still_ours=lambda: pid in member_pids(entry))


def _wait_gone(entry: TreeEntry, deadline: float, *, supervisor: bool) -> list[int]:
    while True:
        left = member_pids(entry)
        sup_alive = supervisor and entry.supervisor is not None and procfs.is_alive(entry.supervisor)
        if (not left and not sup_alive) or time.monotonic() >= deadline:
            return left
        time.sleep(POLL_S)  # bounded poll on the condition above


def reap_tree(entry: TreeEntry, registry: Registry, *, dry_run: bool = False) -> Reaped:
    """Stop one stale tree (its owner is gone); verified by membership, never by name."""
    result = Reaped(entry, [procfs.label(p) for p in member_pids(entry)], dry_run=dry_run)
    if dry_run:
        return result
    sup = entry.supervisor
    if sup is not None and procfs.is_alive(sup):
        # Its supervisor is the tree's keeper: let it run the stop policy first.
        procfs.send_signal(sup, signal.SIGTERM)
        _wait_gone(entry, time.monotonic() + SUPERVISOR_STOP_S, supervisor=True)
    left = member_pids(entry)
    if left:
        names = {p: procfs.label(p) for p in left}
        if entry.cgroup and Path(entry.cgroup).is_dir():
            with contextlib.suppress(OSError):
                cgroups.Cgroup(Path(entry.cgroup), entry.mechanism).kill()
        for pid in left:
            _kill_member(pid, entry)
        result.killed = list(names.values())
        left = _wait_gone(entry, time.monotonic() + KILL_WAIT_S, supervisor=False)
    result.survivors = [procfs.label(p) for p in left]
    if sup is not None and procfs.is_alive(sup):
        # A wedged supervisor (stopped, or stuck in its own stop) outlived its
        # tree; it is ours by identity, and nothing is left for it to keep.
        procfs.send_signal(sup, signal.SIGKILL)
    if entry.cgroup:
        with contextlib.suppress(OSError):
            cgroups.Cgroup(Path(entry.cgroup), entry.mechanism).remove()
    if not result.survivors:
        registry.remove(entry.tree_id)
    return result


def stale(registry: Registry) -> list[TreeEntry]:
    """Registered trees whose owner process is gone."""
    return [e for e in registry.entries() if not e.owner_alive()]


def reap(registry: Registry | None = None, *, dry_run: bool = False) -> list[Reaped]:
    """Stop every stale tree on this host; trees of live owners are left alone."""
    registry = registry or Registry()
    done = []
    for entry in stale(registry):
        result = reap_tree(entry, registry, dry_run=dry_run)
        (log.error if result.survivors else log.warning)("%s", result.line())
        done.append(result)
    return done
