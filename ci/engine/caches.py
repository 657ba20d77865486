"""The on-disk JIT caches kiln owns, and the environment that points engines at them.

CUDA graphs die with their process; compile caches on disk survive it. kiln
points every engine it launches (warmup and e2e alike) at one cache tree it
owns, so a runner can persist that tree between jobs and ``--cold`` can clear
it without touching anything else on the machine::

    <root>/                 $KILN_CACHE_DIR, else <repo>/.kiln/cache (shared with ci.engine.tinymodel)
      jit/<engine>/         one per engine kind (vllm, vllm-cpu, sglang, ...)
        .kiln-owned         sentinel: only directories carrying it are ever deleted
        triton/ inductor/ vllm/ sglang/ deep_gemm/ flashinfer/ ...
        .warmup/            ci.warmup.run's markers for this engine's specs

Caches are per engine kind, not per spec: Triton and Inductor kernels are
shared between models, and that sharing is much of the value. So clearing the
caches of a spec clears its engine's tree, markers included: a marker of
another spec of that engine would otherwise claim caches that are gone.

Standard library only: bench/triton_warm.py imports this on a GPU machine
that has torch and triton but not kiln's test dependencies.
"""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Iterable

from ci.engine import backends
from ci.engine.backends.spec import COMMON_CACHES
from ci.host import cachedir

log = logging.getLogger(__name__)

JIT_DIR = "jit"
# A directory is kiln's to delete only when it carries this file: a cache root
# pointed at a shared place (~/.cache, a mounted volume) must never lose a
# directory someone else made, even if it happens to have an engine's name.
SENTINEL = ".kiln-owned"
MARKERS_DIR = ".warmup"

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def engine_dir(backend_name: str, root: Path | None = None) -> Path:
    """The cache tree of one engine kind (nothing is created)."""
    name = _SAFE.sub("_", backend_name).strip("._")
    if not name:
        raise ValueError(f"backend name {backend_name!r} has no usable characters for a cache dir")
    return Path(root if root is not None else cachedir.default_root()) / JIT_DIR / name


def cache_vars(backend_name: str) -> tuple[tuple[str, str], ...]:
    """(variable, subdirectory) pairs kiln sets for this engine (its spec's ``cache_vars``);
    an engine kiln has no spec for gets the common ones."""
    try:
        return backends.get_backend(backend_name).cache_vars
    except ValueError:
        return COMMON_CACHES


def engine_cache_env(backend_name: str, root: Path | None = None) -> dict[str, str]:
    """Environment that points an engine's JIT caches into kiln's tree.

    Creates the engine directory and its ownership sentinel (idempotent), so
    whatever the engine then writes there is kiln's to clear. Values are
    absolute paths: engines resolve relative ones against their own cwd.
    """
    base = engine_dir(backend_name, root).absolute()
    ensure_owned(base)
    return {var: str(base / sub) for var, sub in cache_vars(backend_name)}


def ensure_owned(path: Path) -> Path:
    """Create ``path`` as a kiln-owned directory (sentinel inside); refuse a foreign one."""
    if path.is_symlink():
        raise ValueError(f"kiln cache dir {path} is a symlink; refusing to own what it points at")
    existed = path.is_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"kiln cache path {path} exists and is not a directory") from None
    sentinel = path / SENTINEL
    if not sentinel.exists():
        if existed and any(p.name != SENTINEL for p in path.iterdir()):
            # Someone else's non-empty directory: using it is fine, claiming it is not.
            log.warning("cache dir %s existed without %s; kiln will not delete it", path, SENTINEL)
            return path
        try:
            with open(sentinel, "x") as f:
                f.write("created by kiln (ci/engine/caches.py); safe to delete with `invoke warmup --cold`\n")
        except FileExistsError:
            pass  # a concurrent launcher wrote it first
    return path


def is_owned(path: Path) -> bool:
    """True when ``path`` is a real directory (not a symlink) carrying kiln's sentinel."""
    return path.is_dir() and not path.is_symlink() and (path / SENTINEL).is_file()


def markers_dir(backend_name: str, root: Path | None = None) -> Path:
    """Where ci.warmup.run keeps this engine's markers (inside the tree they describe)."""
    return engine_dir(backend_name, root) / MARKERS_DIR


def clear(root: Path | None, specs: Iterable[object]) -> list[Path]:
    """Remove kiln's cache tree of every engine the selected specs use; return what was removed.

    ``specs`` holds backend names or objects with a ``backend`` attribute (a
    ci.warmup.run.WarmupSpec). Only ``<root>/jit/<engine>`` directories carrying
    the sentinel are removed; a symlink or a directory kiln did not create is
    left alone and logged. Nothing outside those directories is touched.
    """
    engines = sorted({s if isinstance(s, str) else s.backend for s in specs})
    removed: list[Path] = []
    for engine in engines:
        path = engine_dir(engine, root)
        if not path.exists() and not path.is_symlink():
            continue
        if not is_owned(path):
            log.warning("not clearing %s: not a kiln-owned directory (no %s, or a symlink)",
                        path, SENTINEL)
            continue
        # rmtree never follows symlinks inside the tree: a link an engine left
        # to a shared cache is unlinked, its target kept.
        shutil.rmtree(path)
        log.info("cleared kiln's %s caches: %s", engine, path)
        removed.append(path)
    return removed
