"""kiln's JIT cache tree: the env that points engines at it, and clearing only what kiln owns."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from ci.engine import caches
from ci.engine.crashwatch import crash_signature
from ci.host import cachedir


def test_env_points_every_cache_inside_the_engine_tree(tmp_path):
    env = caches.engine_cache_env("sglang", tmp_path)
    base = tmp_path / "jit" / "sglang"
    for var in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "SGLANG_CACHE_DIR", "SGLANG_DG_CACHE_DIR",
                "DG_JIT_CACHE_DIR", "FLASHINFER_WORKSPACE_BASE", "CUDA_CACHE_PATH"):
        assert os.path.isabs(env[var]) and env[var].startswith(str(base) + os.sep), var
    # SGLang overwrites DG_JIT_CACHE_DIR from SGLANG_DG_CACHE_DIR: they must agree.
    assert env["DG_JIT_CACHE_DIR"] == env["SGLANG_DG_CACHE_DIR"]
    assert caches.is_owned(base)


def test_engine_specific_vars():
    vllm = dict(caches.cache_vars("vllm"))
    cpu = dict(caches.cache_vars("vllm-cpu"))
    other = dict(caches.cache_vars("my-engine"))
    assert "VLLM_CACHE_ROOT" in vllm and "VLLM_CACHE_ROOT" in cpu
    assert "FLASHINFER_WORKSPACE_BASE" in vllm and "FLASHINFER_WORKSPACE_BASE" not in cpu
    assert set(other) == {"TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "CUDA_CACHE_PATH"}


def test_default_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "c"))
    assert cachedir.default_root() == tmp_path / "c"
    monkeypatch.delenv("KILN_CACHE_DIR")
    assert cachedir.default_root().parts[-2:] == (".kiln", "cache")


def test_bad_names_and_paths_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no usable characters"):
        caches.engine_dir("///", tmp_path)
    (tmp_path / "jit").write_text("a file where a directory belongs")
    with pytest.raises(ValueError, match="is not a directory"):
        caches.engine_cache_env("vllm", tmp_path)


def test_clear_removes_only_kiln_owned_trees_of_selected_engines(tmp_path):
    for engine in ("vllm-cpu", "sglang"):
        env = caches.engine_cache_env(engine, tmp_path)
        os.makedirs(env["TRITON_CACHE_DIR"])
        open(os.path.join(env["TRITON_CACHE_DIR"], "k.bin"), "w").close()
    stranger = tmp_path / "jit" / "vllm"  # same layout, not made by kiln
    (stranger / "triton").mkdir(parents=True)
    (stranger / "triton" / "k.bin").write_text("someone else's")
    models = tmp_path / "models" / "tiny-llama"
    models.mkdir(parents=True)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    os.symlink(outside, tmp_path / "jit" / "sglang" / "link-to-outside")

    removed = caches.clear(tmp_path, [SimpleNamespace(backend="sglang"), "vllm"])

    assert removed == [tmp_path / "jit" / "sglang"]
    assert not (tmp_path / "jit" / "sglang").exists()
    assert (outside / "keep").read_text() == "x", "a symlink inside kiln's tree was followed"
    assert (tmp_path / "jit" / "vllm-cpu" / "triton" / "k.bin").exists(), "an unselected engine was cleared"
    assert (stranger / "triton" / "k.bin").exists(), "a directory kiln did not create was cleared"
    assert models.is_dir()
    assert caches.clear(tmp_path, ["sglang"]) == []  # already gone: nothing to do


def test_clear_refuses_a_symlinked_engine_dir(tmp_path):
    target = tmp_path / "shared-cache"
    caches.ensure_owned(target)  # even carrying the sentinel
    (tmp_path / "root" / "jit").mkdir(parents=True)
    os.symlink(target, tmp_path / "root" / "jit" / "vllm")
    assert caches.clear(tmp_path / "root", ["vllm"]) == []
    assert (target / caches.SENTINEL).exists()
    with pytest.raises(ValueError, match="symlink"):
        caches.engine_cache_env("vllm", tmp_path / "root")


def test_existing_foreign_directory_is_used_but_never_claimed(tmp_path):
    foreign = tmp_path / "jit" / "vllm"
    foreign.mkdir(parents=True)
    (foreign / "data").write_text("x")
    caches.engine_cache_env("vllm", tmp_path)
    assert not caches.is_owned(foreign)
    assert caches.clear(tmp_path, ["vllm"]) == []
    assert (foreign / "data").exists()


@pytest.mark.parametrize("line,expected", [
    ("(APIServer pid=16015) ERROR 11-21 05:44:55 [async_llm.py:906] Traceback (most recent call last):", "Traceback"),
    ("RuntimeError: CUDA error: an illegal memory access was encountered", "CUDA error"),
    ("CUDA_ERROR_ILLEGAL_ADDRESS raised by cuLaunchKernel", "CUDA error"),
    ("Fatal Python error: Segmentation fault", "segfault"),
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "out of memory"),
    ("Available memory 3GB is less than required; reducing max_m to 4096 to avoid out of memory", None),
    ("(Worker pid=1) INFO [cpu_model_runner.py:87] Warming up model for the compilation...", None),
    ("INFO: error rate 0.0, memory fine", None),
])
def test_crash_signatures(line, expected):
    assert crash_signature(line) == expected
