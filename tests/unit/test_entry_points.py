"""Every ``python -m ci.<module>`` the sessions and tasks run is a module that does something.

``python -m`` runs a module without a ``__main__`` guard silently and exits 0:
the e2e sessions' model preparation (``-m ci.engine.tinymodel`` and
``-m ci.engine.realmodel``) did nothing once the two CLIs moved to
``ci.engine.models`` (f227f9e), and on a fresh cache the real model was then
fetched and converted inside the first test that asked for it, billed to that test.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CALLERS = ("noxfile.py", "tasks.py")
_MODULE_ARG = re.compile(r'"-m",\s*"(ci(?:\.\w+)+)"')


def _runnable(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    if (path / "__main__.py").is_file():
        return True
    source = path.with_suffix(".py")
    return source.is_file() and re.search(r'^if __name__ == "__main__":', source.read_text(), re.M) is not None


def _modules() -> list[tuple[str, str]]:
    return sorted({(caller, m) for caller in CALLERS
                   for m in _MODULE_ARG.findall((ROOT / caller).read_text())})


def test_the_callers_run_some_ci_modules():
    assert ("noxfile.py", "ci.engine.models") in _modules()


@pytest.mark.parametrize("caller, module", _modules())
def test_each_module_run_with_dash_m_has_an_entry_point(caller, module):
    assert _runnable(module), (f"{caller} runs `python -m {module}`, which has no __main__ guard "
                               f"(nor __main__.py): it would exit 0 having done nothing")


def test_a_module_without_an_entry_point_is_caught():
    # ci.engine.realmodel is a library module: exactly what the noxfile used to run.
    assert not _runnable("ci.engine.realmodel") and _runnable("ci.engine.models")
