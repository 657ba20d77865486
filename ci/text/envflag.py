"""Yes/no environment variables, read one way: ``CI=false`` means false.

``os.environ.get("CI")`` is truthy for ``CI=false`` and ``CI=0`` alike, so a
developer who turned CI mode off got it on. A value that is neither a yes nor
a no (``CI=maybe``, ``CI=ture``) is an error naming the value, never a guess:
guessing "on" fails tests that would skip, guessing "off" skips tests that
should fail.
"""
from __future__ import annotations

import os
from typing import Mapping

CI_ENV = "CI"
# GitHub Actions and .ci/run set CI=true; other CI systems use 1 or yes.
TRUE_WORDS = ("1", "true", "yes", "on")
# Empty counts as unset: `CI= cmd` is how a shell clears it for one command.
FALSE_WORDS = ("0", "false", "no", "off", "")


class FlagError(ValueError):
    """A yes/no variable holds something else; the message names it and its value."""


def parse(name: str, value: str | None) -> bool:
    """``value`` of variable ``name`` as a bool (None: unset, so False); FlagError otherwise."""
    if value is None:
        return False
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise FlagError(f"{name}={value!r} is neither yes nor no: use one of {'/'.join(TRUE_WORDS)} "
                    f"or {'/'.join(w for w in FALSE_WORDS if w)}, or leave it unset")


def env_flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """The yes/no variable ``name`` of ``environ`` (default: this process's environment)."""
    return parse(name, (os.environ if environ is None else environ).get(name))


def in_ci(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``CI`` says yes: a missing prerequisite then fails instead of skipping."""
    return env_flag(CI_ENV, environ)
