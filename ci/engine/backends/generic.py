"""A backend from a command template, for engines kiln has no spec for.

The template is a shell-like string with ``{python}``, ``{model}``, ``{port}``
and ``{tp}`` placeholders, split with shlex (never run through a shell), e.g.
``generic:{python} -m myengine.serve --model {model} --port {port}``.
"""
from __future__ import annotations

import shlex
from typing import Sequence

from ci.engine.backends.spec import BackendSpec, python

_PLACEHOLDERS = ("{python}", "{model}", "{port}", "{tp}")


def generic(template: str, *, health_path: str = "/health", name: str = "generic") -> BackendSpec:
    """Build a BackendSpec whose argv comes from ``template``."""
    words = shlex.split(template)
    if not words:
        raise ValueError("generic backend: empty command template")
    if not any("{port}" in w for w in words):
        # kiln allocates the port; an engine that ignores it would be a stale-server trap.
        raise ValueError(f"generic backend: template must contain {{port}}: {template!r}")

    def _argv(model: str, port: int, tp: int, args: Sequence[str]) -> list[str]:
        values = {"python": python(), "model": model, "port": str(port), "tp": str(tp)}
        try:
            return [w.format(**values) for w in words] + list(args)
        except (KeyError, IndexError) as exc:
            raise ValueError(f"generic backend: unknown placeholder {exc} in {template!r}; "
                             f"known: {', '.join(_PLACEHOLDERS)}") from None

    return BackendSpec(name=name, argv=_argv, health_path=health_path)
