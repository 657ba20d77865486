"""Warmup markers: one JSON file per spec, written atomically, read defensively.

A marker says "this spec was warmed under this version key". A torn, foreign
or other-key marker reads as absent (and is logged), so the worst a bad
marker can cost is one cold warmup, never a false warm.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import filelock

from ci.engine import caches
from ci.warmup import key as warmup_key
from ci.warmup.specs import WarmupSpec

log = logging.getLogger(__name__)

MARKER_FORMAT = 1
# Marker writes take milliseconds; a lock held this long belongs to a hung process.
MARKER_LOCK_TIMEOUT_S = 60.0


def marker_path(root: Path | None, spec: WarmupSpec) -> Path:
    """One marker file per spec, inside its engine's cache tree (cleared with it)."""
    ident = hashlib.sha256(json.dumps([spec.backend, spec.model, spec.tp, list(spec.args)]).encode()).hexdigest()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{spec.model}-tp{spec.tp}")[-60:]
    return caches.markers_dir(spec.backend, root) / f"{slug}-{ident[:16]}.json"


def read_marker(path: Path, key: str, current: dict[str, str] | None = None) -> dict | None:
    """The marker if it is a whole kiln marker for ``key``; None (logged) when absent, torn or foreign."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("marker %s unreadable (%s); treating as absent", path, exc)
        return None
    try:
        data = json.loads(text)
    except ValueError:
        log.warning("marker %s is torn or not JSON (%d bytes); treating as absent", path, len(text))
        return None
    if not (isinstance(data, dict) and data.get("format") == MARKER_FORMAT
            and isinstance(data.get("components"), dict) and isinstance(data.get("key"), str)):
        log.warning("marker %s is not a kiln warmup marker (format %r); treating as absent", path,
                    data.get("format") if isinstance(data, dict) else type(data).__name__)
        return None
    if data["key"] != key:
        changed = warmup_key.diff(data["components"], current or {}) if current else []
        log.warning("marker %s is for another version key; treating as absent%s", path,
                    f" (changed: {'; '.join(changed)})" if changed else "")
        return None
    return data


def write_marker(path: Path, record: dict) -> None:
    """Write ``record`` atomically (temp file + rename) under the markers' lock.

    The rename makes a reader see the old marker or the new one, never half;
    the lock orders writers and lets each sweep temp files a killed writer left.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(path.parent / ".lock"), timeout=MARKER_LOCK_TIMEOUT_S):
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
