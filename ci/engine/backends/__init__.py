"""Engine backends: small specs that say how to launch and probe one engine.

A backend is data plus one command builder, not a class hierarchy: the Server
owns the lifecycle, the backend answers "what command, which endpoints, which
metric names", and carries every engine fact the rest of kiln needs (JIT cache
variables, decode quirks, step timer, reference thresholds row, process
names). Add an engine by adding a spec here, or by :func:`register` at run
time; nothing else is keyed by an engine's name.
"""
from __future__ import annotations

from ci.engine.backends.generic import generic
from ci.engine.backends.sglang import SGLANG
from ci.engine.backends.spec import BackendSpec, Gauges
from ci.engine.backends.vllm import VLLM, VLLM_CPU

BACKENDS: dict[str, BackendSpec] = {b.name: b for b in (VLLM, VLLM_CPU, SGLANG)}


def register(spec: BackendSpec) -> BackendSpec:
    """Make ``spec`` known by its name to every part of kiln; a name already taken is an error."""
    if spec.name in BACKENDS or spec.name.startswith("generic:"):
        raise ValueError(f"backend name {spec.name!r} is taken")
    BACKENDS[spec.name] = spec
    return spec


def get_backend(name: str) -> BackendSpec:
    """Return the backend called ``name``; ``generic:<template>`` builds one from a template."""
    if name.startswith("generic:"):
        return generic(name.split(":", 1)[1])
    try:
        return BACKENDS[name]
    except KeyError:
        known = ", ".join(sorted(BACKENDS)) + ", generic:<command template>"
        raise ValueError(f"unknown backend {name!r}; known: {known}") from None


__all__ = ["BACKENDS", "BackendSpec", "Gauges", "get_backend", "generic", "register"]
