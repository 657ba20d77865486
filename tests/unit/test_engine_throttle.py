"""tests/fakes/engine_throttle: the idle-between-steps fault reaches each engine's step.

The GPU fault runs (bench/gpu_verify.sh) and the CPU benchmarks put this shim on a
real engine's PYTHONPATH; here stand-in modules with the engines' module and
method names show the hook patches each one in a fresh interpreter, and only
when the variable is set.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SHIM = Path(__file__).resolve().parents[1] / "fakes" / "engine_throttle"
IDLE_S = 0.2

STANDINS = {
    "vllm/v1/engine/core.py": """
        class EngineCore:
            def step(self):
                return "out", True
    """,
    "sglang/srt/managers/scheduler.py": """
        class Scheduler:
            def run_batch(self, batch):
                return ("ran", batch)
    """,
}
CALLS = {
    "vllm": "from vllm.v1.engine.core import EngineCore as C; r = C().step(); assert r == ('out', True), r",
    "sglang": "from sglang.srt.managers.scheduler import Scheduler as C; r = C().run_batch(7); "
              "assert r == ('ran', 7), r",
}


@pytest.fixture
def standins(tmp_path) -> Path:
    for rel, body in STANDINS.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for pkg in path.relative_to(tmp_path).parents:
            if str(pkg) != ".":
                (tmp_path / pkg / "__init__.py").touch()
        path.write_text(textwrap.dedent(body))
    return tmp_path


def elapsed(standins: Path, engine: str, idle: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "KILN_THROTTLE_IDLE_S"}
    env["PYTHONPATH"] = f"{SHIM}{os.pathsep}{standins}"
    if idle is not None:
        env["KILN_THROTTLE_IDLE_S"] = idle
    code = f"import time; t = time.monotonic(); {CALLS[engine]}; print(time.monotonic() - t)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


@pytest.mark.parametrize("engine", sorted(CALLS))
def test_the_step_idles_only_when_asked(standins, engine):
    assert elapsed(standins, engine, str(IDLE_S)) >= IDLE_S
    assert elapsed(standins, engine, None) < IDLE_S
