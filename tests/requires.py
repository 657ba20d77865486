"""Missing prerequisites: a skip on a developer's machine, a failure in CI.

A CI job that skips every Docker test goes green having tested no Docker path
(issue 14: the PR job ran as a non-root user and skipped them all). With ``CI``
set (GitHub Actions and .ci/run set it) a missing engine, registry, tool or
package fails the test, naming the cause; elsewhere it skips with the same words.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def in_ci() -> bool:
    """True where CI is set to anything but empty/false/0 (Actions sets CI=true)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(why: str) -> None:
    """Stop the test because ``why``: fail under CI, skip elsewhere. Never returns."""
    if in_ci():
        pytest.fail(f"{why} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(why)


def module(name: str) -> ModuleType:
    """``import name``, or :func:`missing` naming the package to install."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"{name} not importable ({exc}); it is in requirements/tests.txt")
        raise  # unreachable: missing() raises
