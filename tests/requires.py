"""Missing prerequisites: a skip on a developer's machine, a failure in CI.

A CI job that skips every Docker test goes green having tested no Docker path
(issue 14: the PR job ran as a non-root user and skipped them all). With ``CI``
set (GitHub Actions and .ci/run set it) a missing engine, registry, tool or
package fails the test, naming the cause; elsewhere it skips with the same words.
``CI`` is read as yes/no by ``ci.text.envflag`` (``CI=false`` is off; ``CI=maybe``
fails the test in one line naming the value).
"""
from __future__ import annotations

import importlib
from types import ModuleType

import pytest

from ci.text import envflag


def in_ci() -> bool:
    """True where ``CI`` says yes (Actions sets CI=true); FlagError for a value that is neither."""
    return envflag.in_ci()


def missing(why: str) -> None:
    """Stop the test because ``why``: fail under CI, skip elsewhere. Never returns.

    A ``CI`` that is neither yes nor no fails the test in one line naming the
    value: skipping would hide the test where CI meant yes.
    """
    try:
        ci = in_ci()
    except envflag.FlagError as exc:
        pytest.fail(f"{exc} (needed to decide whether '{why}' fails or skips)", pytrace=False)
    if ci:
        pytest.fail(f"{why} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(why)


def module(name: str) -> ModuleType:
    """``import name``, or :func:`missing` naming the package to install."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"{name} not importable ({exc}); it is in requirements/tests.txt")
        raise  # unreachable: missing() raises
