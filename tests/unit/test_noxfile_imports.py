"""The ``ci`` modules the noxfile imports need nothing nox itself does not bring.

nox runs the noxfile in whatever interpreter has nox (on a runner, or in the
chain's container: ``python3 -m nox`` with only requirements/nox.txt), never
in a session's venv. When the shard packer imported ServerKey from the launch
path (psutil, requests), every e2e session died before its first command inside
the container: ``ModuleNotFoundError: No module named 'psutil'``.
"""
from __future__ import annotations

import ast
import importlib.metadata as metadata
import json
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
IMPORT_TIMEOUT_S = 60  # a handful of small modules: well under a second
_LOADED = "import sys, json; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"


def _ci_imports(source: Path) -> list[str]:
    """Every import of a ``ci`` module in ``source``, at its top or inside a function, as a statement."""
    found = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ci":
            found.add(ast.unparse(node))
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "ci" for a in node.names):
            found.add(ast.unparse(node))
    return sorted(found)


def _with_dependencies(dist: str) -> set[str]:
    """``dist`` and everything it requires here (markers evaluated, extras not taken), canonical names."""
    seen, todo = set(), [dist]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        for line in metadata.requires(name) or ():
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def test_the_noxfile_imports_the_shard_packer():
    assert "from ci.session import shard as sharding" in _ci_imports(ROOT / "noxfile.py")


def test_the_noxfiles_ci_imports_load_with_what_nox_brings():
    code = "\n".join([*_ci_imports(ROOT / "noxfile.py"), _LOADED])
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=IMPORT_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    owners = metadata.packages_distributions()
    used = {canonicalize_name(d) for m in json.loads(done.stdout) for d in owners.get(m, ())}
    assert used - _with_dependencies("nox") == set(), "the noxfile's ci imports need more than nox brings"
