"""Fault injection for a *real* engine: idle after every step that ran the model.

Put this directory first on a server's ``PYTHONPATH`` and set
``KILN_THROTTLE_IDLE_S`` (seconds): Python imports ``sitecustomize`` at start
in every process of the server, and this one wraps the engine's step when its
module is first imported, so the engine sleeps after each step that executed
the model -- the "scheduler idles between decode steps" regression a busy
check must catch (issue 13; sglang #25886's fwd_occupancy kit exists for it):

- vLLM: ``vllm.v1.engine.core.EngineCore.step`` (sleeps when it executed).
- SGLang: ``sglang.srt.managers.scheduler.Scheduler.run_batch`` (every batch it
  runs; with the overlap scheduler the GPU finishes the launched batch during
  the sleep, so a sleep longer than a decode step leaves the GPU idle).

Used by bench/throttled.py, bench/vllm_idle_signals.py and the GPU fault runs
(bench/gpu_verify.sh); never by a normal run (it does nothing without the variable).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time

IDLE_S = float(os.environ.get("KILN_THROTTLE_IDLE_S") or 0.0)


def _patch_vllm(module) -> None:
    original = module.EngineCore.step

    def step(self):
        outputs, executed = original(self)
        if executed:
            time.sleep(IDLE_S)  # the fault itself: idle between steps
        return outputs, executed

    module.EngineCore.step = step


def _patch_sglang(module) -> None:
    original = module.Scheduler.run_batch

    def run_batch(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        time.sleep(IDLE_S)  # the fault itself: idle between batches
        return result

    module.Scheduler.run_batch = run_batch


# Module -> how to break it; each hook removes itself once its module is patched.
TARGETS = {"vllm.v1.engine.core": _patch_vllm, "sglang.srt.managers.scheduler": _patch_sglang}


class _Hook(importlib.abc.MetaPathFinder):
    def __init__(self) -> None:
        self.pending = dict(TARGETS)

    def find_spec(self, name, path, target=None):
        patch = self.pending.pop(name, None)
        if patch is None:
            return None
        if not self.pending:
            sys.meta_path.remove(self)
        # Let the normal finders locate the real module (this hook skips it now).
        spec = next((s for s in (f.find_spec(name, path) for f in sys.meta_path
                                 if f is not self and hasattr(f, "find_spec")) if s is not None), None)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if IDLE_S > 0:
    sys.meta_path.insert(0, _Hook())
