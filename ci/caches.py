"""The on-disk JIT caches kiln owns, and the environment that points engines at them.

CUDA graphs die with their process; compile caches on disk survive it. kiln
points every engine it launches (warmup and e2e alike) at one cache tree it
owns, so a runner can persist that tree between jobs and ``--cold`` can clear
it without touching anything else on the machine::

    <root>/                 $KILN_CACHE_DIR, else <repo>/.kiln/cache (shared with ci.tinymodel)
      jit/<engine>/         one per engine kind (vllm, vllm-cpu, sglang, ...)
        .kiln-owned         sentinel: only directories carrying it are ever deleted
        triton/ inductor/ vllm/ sglang/ deep_gemm/ flashinfer/ ...
        .warmup/            ci.warmup's markers for this engine's specs

Caches are per engine kind, not per spec: Triton and Inductor kernels are
shared between models, and that sharing is much of the value. So clearing the
caches of a spec clears its engine's tree, markers included: a marker of
another spec of that engine would otherwise claim caches that are gone.

Standard library only: bench/triton_warm.py imports this on a GPU machine
that has torch and triton but not kiln's test dependencies.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping

log = logging.getLogger(__name__)

ROOT_ENV = "KILN_CACHE_DIR"
JIT_DIR = "jit"
# A directory is kiln's to delete only when it carries this file: a cache root
# pointed at a shared place (~/.cache, a mounted volume) must never lose a
# directory someone else made, even if it happens to have an engine's name.
SENTINEL = ".kiln-owned"
MARKERS_DIR = ".warmup"

# Caches every engine may fill. Each variable is read by the library named:
#  - TRITON_CACHE_DIR: triton/knobs.py (`cache.dir`, default ~/.triton/cache).
#  - TORCHINDUCTOR_CACHE_DIR: torch/_inductor/runtime/cache_dir_utils.py
#    (default /tmp/torchinductor_<user>, which other jobs on the host share).
#  - TORCH_EXTENSIONS_DIR: torch.utils.cpp_extension.load() build directory.
#  - CUDA_CACHE_PATH: the NVIDIA driver's PTX JIT cache (CUDA C Programming
#    Guide, "CUDA Environment Variables"; default ~/.nv/ComputeCache).
_COMMON = (
    ("TRITON_CACHE_DIR", "triton"),
    ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
    ("TORCH_EXTENSIONS_DIR", "torch_extensions"),
    ("CUDA_CACHE_PATH", "cuda_compute_cache"),
)
# FlashInfer JIT: flashinfer/jit/env.py builds its cache at
# $FLASHINFER_WORKSPACE_BASE/.cache/flashinfer (default base: $HOME).
_FLASHINFER = (("FLASHINFER_WORKSPACE_BASE", "flashinfer"),)
# DeepGEMM JIT kernels: deep_gemm reads DG_JIT_CACHE_DIR (default ~/.deep_gemm).
_DEEPGEMM = (("DG_JIT_CACHE_DIR", "deep_gemm"),)
# vLLM keeps its torch.compile/AOT artefacts under VLLM_CACHE_ROOT (vllm/envs.py,
# default ~/.cache/vllm); its decorators.py re-points TORCHINDUCTOR_CACHE_DIR at
# $VLLM_CACHE_ROOT/torch_compile_cache/.../inductor_cache, so this one variable
# is what makes vLLM-CPU's "Warming up model for the compilation" warm.
_VLLM = (("VLLM_CACHE_ROOT", "vllm"),)
# SGLang (python/sglang/srt/environ.py): SGLANG_CACHE_DIR (default
# ~/.cache/sglang). Its deep_gemm_wrapper/compile_utils.py *overwrites*
# DG_JIT_CACHE_DIR with SGLANG_DG_CACHE_DIR (default ~/.cache/deep_gemm) at
# import, so DG_JIT_CACHE_DIR alone would be silently ignored; both point at
# the same directory here.
_SGLANG = (("SGLANG_CACHE_DIR", "sglang"), ("SGLANG_DG_CACHE_DIR", "deep_gemm"))

ENGINE_CACHES: Mapping[str, tuple[tuple[str, str], ...]] = MappingProxyType({
    "vllm": _COMMON + _VLLM + _FLASHINFER + _DEEPGEMM,
    "vllm-cpu": _COMMON + _VLLM,
    "sglang": _COMMON + _SGLANG + _DEEPGEMM + _FLASHINFER,
})
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def default_root() -> Path:
    """``$KILN_CACHE_DIR``, else ``<repo>/.kiln/cache`` (the same root ci.tinymodel uses)."""
    env = os.environ.get(ROOT_ENV)
    return Path(env) if env else Path(__file__).resolve().parent.parent / ".kiln" / "cache"


def engine_dir(backend_name: str, root: Path | None = None) -> Path:
    """The cache tree of one engine kind (nothing is created)."""
    name = _SAFE.sub("_", backend_name).strip("._")
    if not name:
        raise ValueError(f"backend name {backend_name!r} has no usable characters for a cache dir")
    return Path(root if root is not None else default_root()) / JIT_DIR / name


def cache_vars(backend_name: str) -> tuple[tuple[str, str], ...]:
    """(variable, subdirectory) pairs kiln sets for this engine; unknown engines get the common ones."""
    return ENGINE_CACHES.get(backend_name, _COMMON)


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
                f.write("created by kiln (ci/caches.py); safe to delete with `invoke warmup --cold`\n")
        except FileExistsError:
            pass  # a concurrent launcher wrote it first
    return path


def is_owned(path: Path) -> bool:
    """True when ``path`` is a real directory (not a symlink) carrying kiln's sentinel."""
    return path.is_dir() and not path.is_symlink() and (path / SENTINEL).is_file()


def markers_dir(backend_name: str, root: Path | None = None) -> Path:
    """Where ci.warmup keeps this engine's markers (inside the tree they describe)."""
    return engine_dir(backend_name, root) / MARKERS_DIR


def clear(root: Path | None, specs: Iterable[object]) -> list[Path]:
    """Remove kiln's cache tree of every engine the selected specs use; return what was removed.

    ``specs`` holds backend names or objects with a ``backend`` attribute (a
    ci.warmup.WarmupSpec). Only ``<root>/jit/<engine>`` directories carrying
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
