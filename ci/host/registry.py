"""The host-wide list of live engine trees: who owns each, and how to find its members.

A harness SIGKILLed by a CI cancel cannot clean up after itself, and its
supervisor may die with it (an OOM kill takes what it likes). So every tree
is written down here when it starts and struck off once its stop is verified:
owner (pid + start time), supervisor, engine root, containment mechanism and
cgroup. ``ci/host/reaper.py`` reads it at the start of every run and stops the
trees whose owner is gone; a tree whose owner still runs (another job on the
same host) is never touched.

One JSON file per tree, written atomically under a host-wide lock, in
``$KILN_STATE_DIR/trees`` (default ``<tmp>/kiln-<uid>/trees``).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import filelock

from ci.host import procfs

log = logging.getLogger(__name__)

STATE_DIR_ENV = "KILN_STATE_DIR"
# Registry edits are a few small file writes; a lock held longer than this is
# a wedged process, and failing loudly beats hanging the job.
LOCK_TIMEOUT_S = 30.0


def state_dir() -> Path:
    """Where kiln keeps host-wide state (``$KILN_STATE_DIR`` or a per-user temp folder)."""
    env = os.environ.get(STATE_DIR_ENV)
    return Path(env) if env else Path(tempfile.gettempdir()) / f"kiln-{os.getuid()}"


@dataclass
class TreeEntry:
    """One live tree as its owner registered it."""

    tree_id: str
    tag: str
    owner: tuple[int, int]  # (pid, start ticks) of the harness process
    supervisor: tuple[int, int] | None
    root: tuple[int, int] | None
    mechanism: str
    cgroup: str | None
    command: str
    log_path: str
    created: float = field(default_factory=time.time)

    def owner_alive(self) -> bool:
        return procfs.is_alive(self.owner)

    def describe(self) -> str:
        return (f"tree {self.tree_id} (owner pid {self.owner[0]}, {self.mechanism}, "
                f"{self.command[:80]})")

    @classmethod
    def from_json(cls, data: dict) -> "TreeEntry":
        for key in ("owner", "supervisor", "root"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


class Registry:
    """The tree files under ``root`` (default: ``state_dir()/trees``)."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else state_dir() / "trees"

    def _lock(self) -> filelock.FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(str(self.root / ".lock"), timeout=LOCK_TIMEOUT_S)

    def _path(self, tree_id: str) -> Path:
        return self.root / f"{tree_id}.json"

    def add(self, entry: TreeEntry) -> None:
        with self._lock():
            tmp = self._path(entry.tree_id).with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(entry)))
            tmp.replace(self._path(entry.tree_id))

    def remove(self, tree_id: str) -> None:
        with self._lock():
            self._path(tree_id).unlink(missing_ok=True)

    def entries(self) -> list[TreeEntry]:
        """Every registered tree; an unreadable file is logged and left for a human."""
        if not self.root.is_dir():
            return []
        found = []
        with self._lock():
            for path in sorted(self.root.glob("*.json")):
                try:
                    found.append(TreeEntry.from_json(json.loads(path.read_text())))
                except (OSError, ValueError, TypeError) as exc:
                    log.warning("unreadable tree record %s: %s", path, exc)
        return found
