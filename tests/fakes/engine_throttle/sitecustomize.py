"""Fault injection for a *real* vLLM engine: idle after every step that ran the model.

Put this directory first on a vLLM server's ``PYTHONPATH`` and set
``KILN_THROTTLE_IDLE_S`` (seconds): Python imports ``sitecustomize`` at start
in every process of the server, and this one wraps ``EngineCore.step`` when
``vllm.v1.engine.core`` is first imported, so the engine core sleeps after
each step that executed the model -- the "scheduler idles between decode
steps" regression a busy check must catch (issue 13). Used by bench/vllm_idle_signals.py; never by a normal run (it does
nothing without the variable).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time

TARGET = "vllm.v1.engine.core"
IDLE_S = float(os.environ.get("KILN_THROTTLE_IDLE_S") or 0.0)


def _patch(module) -> None:
    original = module.EngineCore.step

    def step(self):
        outputs, executed = original(self)
        if executed:
            time.sleep(IDLE_S)  # the fault itself: idle between steps
        return outputs, executed

    module.EngineCore.step = step


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # let the normal finders locate the real module
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if IDLE_S > 0:
    sys.meta_path.insert(0, _Hook())
