"""The import contracts of `nox -s lint` hold on the tree, and catch a backwards import.

The contracts live in pyproject.toml ([tool.importlinter]); lint-imports comes
from import-linter (requirements/tests.txt, requirements/lint.txt). Each check
runs on a copy of ci/ in a temp directory, so a planted import never touches
the tree. Outside CI a missing lint-imports skips, saying so; with ``CI`` set
it fails, so the check cannot silently stop running.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import requires

ROOT = Path(__file__).resolve().parents[2]
# lint-imports builds the graph of ~100 modules in well under a second; this
# only stops a hang on a loaded machine.
LINT_TIMEOUT_S = 120


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    beside_python = Path(sys.executable).parent / "lint-imports"
    binary = str(beside_python) if beside_python.is_file() else shutil.which("lint-imports")
    if binary is None:
        requires.missing("lint-imports not found (pip install import-linter==2.17); import contracts not checked")
    return subprocess.run([binary, "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          timeout=LINT_TIMEOUT_S)


@pytest.fixture
def tree(tmp_path):
    """A copy of ci/ and pyproject.toml: the contracts' whole input."""
    shutil.copytree(ROOT / "ci", tmp_path / "ci", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def plant(tree: Path, module: str, line: str) -> None:
    path = tree / "ci" / f"{module.replace('.', '/')}.py"
    path.write_text(path.read_text() + f"\n{line}  # planted by the test\n")


def test_contracts_hold_on_the_tree(tree):
    result = lint_imports(tree)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kept, 0 broken" in result.stdout and "BROKEN" not in result.stdout


LAYERS = "The ci/ packages import one way"


@pytest.mark.parametrize(("module", "line", "contract", "chain"), [
    ("host.ports", "from ci.engine import server", LAYERS, "ci.host.ports -> ci.engine.server"),
    ("engine.server", "from ci.session import pool", LAYERS, "ci.engine.server -> ci.session.pool"),
    # What warmup's specs did before ci/engine/launch.py: reach into the plugin (and pytest with it).
    ("warmup.specs", "from ci.session import pytest_plugin", LAYERS,
     "ci.warmup.specs -> ci.session.pytest_plugin"),
    # Siblings on one floor may not import each other either.
    ("report.render", "from ci.kits import client", LAYERS, "ci.report.render -> ci.kits.client"),
    # Calibrate shares warmup's floor (both launch servers); kits start nothing, so never calibrate.
    ("calibrate.run", "from ci.warmup import run as warm", LAYERS, "ci.calibrate.run -> ci.warmup.run"),
    ("kits.perf", "from ci.calibrate import derive", LAYERS, "ci.kits.perf -> ci.calibrate.derive"),
    ("text.ansi", "from ci.host import procfs", LAYERS, "ci.text.ansi -> ci.host.procfs"),
    ("host.procs", "import pytest", "Only the session imports pytest", "ci.host.procs -> pytest"),
    ("engine.server", "import pytest", "Only the session imports pytest", "ci.engine.server -> pytest"),
    ("report.render", "from ci.host import procs", "The report reads records", "ci.report.render -> ci.host.procs"),
    ("host.supervisor", "import psutil", "The supervisor imports only the stdlib", "ci.host.supervisor -> psutil"),
    # The pool importing the plugin that imports it: a cycle inside one package.
    ("session.pool", "from ci.session import pytest_plugin", "No import cycles among siblings",
     "No cycles are allowed in ci.session."),
], ids=["host->engine", "engine->session", "warmup->plugin", "report->kits", "calibrate->warmup",
        "kits->calibrate", "text->host", "host->pytest",
        "engine->pytest", "report->host", "supervisor->psutil",
        "pool<->plugin"])
def test_a_backwards_import_breaks_its_contract(tree, module, line, contract, chain):
    plant(tree, module, line)
    result = lint_imports(tree)
    assert result.returncode != 0
    broken = [ln for ln in result.stdout.splitlines() if ln.endswith("BROKEN")]
    # One planted import can break more than one contract (report -> host
    # breaks the floors too), so the named contract must be among the broken.
    assert any(b.startswith(contract) for b in broken), result.stdout
    assert chain in result.stdout
