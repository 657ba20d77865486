"""Build-once cache directories: built under a lock, published atomically, checked by manifest.

kiln's local models (ci/engine/tinymodel.py, ci/engine/realmodel.py) are directories that
cost seconds to minutes to make and are read by running engines, possibly of
several jobs sharing one cache. So a build happens in a temporary sibling
directory while holding a lock; its manifest, written last, names the build's
key and every file's sha256; and the finished directory replaces the old one
by rename. A reader trusts a directory only when the manifest's key matches
and every file still hashes to what it names; anything else (a torn build, a
file changed by hand, another generator's output) is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable

import filelock

log = logging.getLogger(__name__)

MANIFEST_NAME = "kiln-manifest.json"
# Every kiln cache (JIT caches, local models, capability probes) lives under
# one root, so one variable moves them all (a runner's big disk, a CI cache).
ROOT_ENV = "KILN_CACHE_DIR"
# <repo>/.kiln/cache: beside the checkout and gitignored, so a fresh clone
# starts cold and `git clean -X` empties it.
_REPO = Path(__file__).resolve().parents[2]
# Read size for hashing: model files are up to hundreds of MiB.
_HASH_CHUNK = 1 << 20


def default_root() -> Path:
    """``$KILN_CACHE_DIR``, else ``<repo>/.kiln/cache``."""
    env = os.environ.get(ROOT_ENV)
    return Path(env) if env else _REPO / ".kiln" / "cache"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def is_complete(target: Path, key: str, label: str = "cache") -> bool:
    """True when ``target`` holds a finished build for ``key``, every file intact."""
    try:
        manifest = json.loads((target / MANIFEST_NAME).read_text())
        files = manifest["files"]
        if manifest.get("key") != key or not files:
            return False
        for name, digest in files.items():
            if sha256_of(target / name) != digest:
                log.warning("%s file %s does not match its manifest; rebuilding", label, name)
                return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False  # missing or torn manifest or file: an unfinished build
    return True


def ensure(target: Path, key: str, build: Callable[[Path], list[str]], *,
           manifest: dict | None = None, label: str, lock_timeout_s: float) -> Path:
    """``target``, built first by ``build(tmp_dir) -> file names`` unless already complete for ``key``.

    ``manifest`` adds fields to the manifest (what the build came from).
    """
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"kiln cache path {parent} is not a directory") from None
    lock = filelock.FileLock(str(parent / f".{target.name}.lock"), timeout=lock_timeout_s)
    try:
        with lock:
            if is_complete(target, key, label):
                log.info("reusing %s at %s", label, target)
                return target
            _sweep_leftovers(parent, target.name)
            log.info("building %s at %s", label, target)
            _build_atomically(target, key, build, manifest or {})
    except filelock.Timeout:
        raise RuntimeError(f"another builder held {lock.lock_file} for over {lock_timeout_s:.0f} s; "
                           f"is a stale {label} build hung?") from None
    return target


def _sweep_leftovers(parent: Path, name: str) -> None:
    # Temp dirs of builders that died mid-build. Only lock holders create them
    # and we hold the lock, so none of these is in use.
    for stale in parent.glob(f".{name}.*-*"):
        if stale.is_dir():
            log.info("removing leftover %s", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _build_atomically(target: Path, key: str, build: Callable[[Path], list[str]],
                      extra: dict) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        files = build(tmp)
        manifest = {**extra, "key": key, "files": {n: sha256_of(tmp / n) for n in sorted(files)}}
        # The manifest is written last: its presence marks a finished build.
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        # mkdtemp makes 0700 and safetensors writes 0600; other users of a
        # shared cache must be able to read it.
        tmp.chmod(0o755)
        for name in files:
            (tmp / name).chmod(0o644)
        old = None
        if target.exists() or target.is_symlink():
            # A directory cannot be renamed over a non-empty one: move the torn
            # or outdated build aside first, then drop it.
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
