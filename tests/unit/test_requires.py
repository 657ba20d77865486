"""With CI set, a missing prerequisite fails the test naming the cause; elsewhere it skips."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
# Collecting one integration module and failing its fixture takes ~2 s; this
# bounds a hang on a loaded machine.
PYTEST_TIMEOUT_S = 180

NEEDS_A_TOOL = """
from tests import requires

def test_needs_a_tool():
    requires.missing("frobnicator not on PATH")
"""


@pytest.mark.parametrize(("ci", "outcome"), [("true", "failed"), ("1", "failed"), ("YES", "failed"),
                                             ("on", "failed"), (None, "skipped"), ("false", "skipped"),
                                             ("False", "skipped"), ("0", "skipped"), ("off", "skipped"),
                                             ("", "skipped")])
def test_missing_fails_in_ci_and_skips_elsewhere(pytester, monkeypatch, ci, outcome):
    monkeypatch.syspath_prepend(str(ROOT))
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    pytester.makepyfile(test_tool=NEEDS_A_TOOL)
    result = pytester.runpytest("-rfs", "-p", "no:cacheprovider")
    result.assert_outcomes(**{outcome: 1})
    result.stdout.fnmatch_lines(["*frobnicator not on PATH*"])


def test_a_ci_value_that_is_neither_yes_nor_no_fails_in_one_line_naming_it(pytester, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("CI", "maybe")
    pytester.makepyfile(test_tool=NEEDS_A_TOOL)
    result = pytester.runpytest("-rf", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*CI='maybe' is neither yes nor no: use one of 1/true/yes/on or "
                                 "0/false/no/off, or leave it unset (needed to decide whether "
                                 "'frobnicator not on PATH' fails or skips)*"])
    assert "Traceback" not in result.stdout.str()


def test_docker_tests_fail_naming_the_cause_when_ci_has_no_dockerd(tmp_path):
    # The real fixture path: PATH holds only this interpreter's directory, so no
    # dockerd, docker-registry, containerd or runc can be found.
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env.update(CI="true", PATH=str(Path(sys.executable).parent))
    test = "tests/integration/test_images.py::test_healthy_mirror_serves_and_image_gets_canonical_name"
    done = subprocess.run([sys.executable, "-m", "pytest", test, "-p", "no:cacheprovider", "-q",
                           f"--basetemp={tmp_path / 'pt'}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=PYTEST_TIMEOUT_S)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "1 error" in out and "skipped" not in out, out
    cause = ("dockerd needs root" if os.geteuid() != 0 else "missing dockerd")
    assert f"real Docker engine unavailable: {cause}" in out, out
