"""Harness flags taken out of a session's posargs before pytest sees them.

``nox -s e2e-cpu -- --kiln-model X --shard 2/3 tests/e2e/test_api.py``: the
noxfile takes ``--kiln-model`` and ``--shard`` (``FLAG VALUE`` or
``FLAG=VALUE``) and hands the rest to pytest. Everything after a literal ``--``
belongs to pytest and is never read. One parser, so every harness flag behaves
the same: a flag without its value or given twice is one clear line.
"""
from __future__ import annotations

from typing import Sequence


class PosargError(ValueError):
    """A harness flag in the posargs is malformed; the message names it."""


def take_value(posargs: Sequence[str], flag: str, *, hint: str = "") -> tuple[str | None, list[str]]:
    """(value, rest) for ``flag VALUE`` / ``flag=VALUE`` in ``posargs``; (None, posargs) when absent.

    ``hint`` completes the "needs a value" message (e.g. ``i/n (e.g. --shard 2/4)``).
    """
    value: str | None = None
    rest: list[str] = []
    args = list(posargs)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i:])
            break
        if arg == flag or arg.startswith(flag + "="):
            if arg == flag:
                if i + 1 >= len(args):
                    raise PosargError(f"{flag} needs a value" + (f" {hint}" if hint else ""))
                found, i = args[i + 1], i + 2
            else:
                found, i = arg.split("=", 1)[1], i + 1
            if value is not None:
                raise PosargError(f"{flag} given twice")
            value = found
            continue
        rest.append(arg)
        i += 1
    return value, rest
