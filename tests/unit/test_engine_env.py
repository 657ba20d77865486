"""ci.install.engine_env: add-only installs into a real interpreter (a venv made here), offline.

The venv stands for the engine's interpreter (an engine image's Python or a dev
box's venv); wheels come from a local find-links dir (tests/unit/test_wheelhouse.py
makes them), so pip resolves and installs for real with no index.
"""
from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

from ci.install import engine_env
from ci.install.engine_env import EngineEnvError
from tests.unit.test_wheelhouse import make_wheel


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> tuple[str, Path]:
    """(python of a fresh venv that 'holds the engine' and lib-b 1.0, the wheel dir)."""
    root = tmp_path_factory.mktemp("engine-env")
    wheels = root / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "lib-b", "1.0")
    make_wheel(wheels, "lib-b", "2.0")
    make_wheel(wheels, "harness-a", "1.0", ["lib-b>=2"])
    make_wheel(wheels, "harness-c", "1.0", ["lib-b"])
    make_wheel(wheels, "fake-engine", "0.1", ["lib-b==1.0"])
    venv.create(root / "venv", with_pip=True)
    py = str(root / "venv" / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
                    "fake-engine", "lib-b==1.0"], check=True)
    return py, wheels


def test_installed_reads_the_target_interpreters_own_packages(engine):
    py, _ = engine
    have = engine_env.installed(py)
    assert have["fake-engine"] == "0.1" and have["lib-b"] == "1.0"
    assert "pytest" not in have  # this process's packages are not the venv's
    assert engine_env.installed(sys.executable)["pytest"]


def test_missing_keeps_a_present_name_whatever_its_version(caplog):
    have = {"numpy": "1.26.4", "psutil": "7.0"}
    assert engine_env.missing(["numpy>=2", "psutil>=5", "pytest>=8"], have) == ["pytest>=8"]
    assert "keeping the engine's numpy 1.26.4 (the harness asks numpy>=2)" in caplog.text


def test_an_install_that_would_replace_an_engine_package_is_refused_and_nothing_changes(engine):
    py, wheels = engine
    before = engine_env.installed(py)
    with pytest.raises(EngineEnvError) as err:
        engine_env.add_only(py, ["harness-a"], wheels)
    assert "\n" not in str(err.value)
    assert "would replace the engine's own lib-b 1.0 -> 2.0" in str(err.value)
    assert engine_env.installed(py) == before


def test_a_missing_harness_package_is_added_and_every_version_kept(engine):
    py, wheels = engine
    before = engine_env.installed(py)
    assert engine_env.add_only(py, ["harness-c", "lib-b>=2"], wheels) == ["harness-c"]
    after = engine_env.installed(py)
    assert after["harness-c"] == "1.0"
    assert {n: after[n] for n in before} == before
    assert engine_env.add_only(py, ["harness-c"], wheels) == []  # second run: nothing to do


def test_cli_reports_one_line_on_a_bad_interpreter(capsys):
    assert engine_env.main(["--python", "/nonexistent/python3", "-r", "requirements/e2e-gpu.txt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kiln: engine environment: cannot list the packages of /nonexistent/python3")
    assert "\n" not in err


def test_gpu_requirements_are_lower_bounds_never_pins():
    from ci.install import wheelhouse
    for line in wheelhouse.read_requirements(Path("requirements/e2e-gpu.txt")):
        assert "==" not in line, line
