"""The engine's own Python: add what the harness lacks, never replace what the engine has.

GPU e2e sessions run the tests in the interpreter that holds the engine (the
image's system Python, or a dev box's venv): a nox venv with
``--system-site-packages`` sees only the *base* interpreter, so an engine in a
venv is invisible to it, and installing pinned harness requirements there put
numpy/tokenizers/safetensors/huggingface-hub versions over the image's own
(issue 12). Here every install is *add-only*:

1. read the interpreter's installed distributions (name -> version);
2. keep only the requirements whose name it lacks;
3. ask pip for a dry-run report and refuse, in one line, if the install would
   change any version the interpreter already has;
4. install, then read the versions again and fail if any changed.

``--wheelhouse DIR`` (ci/install/wheelhouse.py) installs with no index at all.

    python -m ci.install.engine_env --python PY -r requirements/e2e-gpu.txt [--wheelhouse DIR]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ci.install import wheelhouse

log = logging.getLogger(__name__)

ENGINE_PYTHON_ENV = "KILN_ENGINE_PYTHON"
WHEELHOUSE_ENV = "KILN_WHEELHOUSE"
# First distribution of a name on sys.path wins, as import does: a name in
# PYTHONPATH shadows the same name in site-packages.
_LIST = ("import importlib.metadata as m, json\nout = {}\n"
         "for d in m.distributions():\n"
         "    n = d.metadata['Name']\n"
         "    if n and n not in out: out[n] = d.version\n"
         "print(json.dumps(out))")


class EngineEnvError(RuntimeError):
    """The engine's interpreter cannot be used or extended; one line naming the cause."""


def engine_python() -> str:
    """The interpreter that holds the engine: $KILN_ENGINE_PYTHON, else ``python3`` on PATH."""
    chosen = os.environ.get(ENGINE_PYTHON_ENV) or shutil.which("python3") or sys.executable
    if not shutil.which(chosen):
        raise EngineEnvError(f"engine interpreter {chosen!r} (${ENGINE_PYTHON_ENV}) is not executable")
    return chosen


def installed(python: str) -> dict[str, str]:
    """Canonical name -> version of every distribution ``python`` imports."""
    try:
        proc = subprocess.run([python, "-c", _LIST], capture_output=True, text=True)
    except OSError as exc:
        raise EngineEnvError(f"cannot list the packages of {python}: {exc.strerror}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EngineEnvError(f"cannot list the packages of {python}: {last}")
    return {canonicalize_name(n): v for n, v in json.loads(proc.stdout).items()}


def missing(requirements: list[str], have: dict[str, str]) -> list[str]:
    """Requirements whose name ``have`` lacks. A present name is kept whatever its version:
    the engine's pin wins (a version outside the harness's bound is logged)."""
    out = []
    for line in requirements:
        req = Requirement(line)
        version = have.get(canonicalize_name(req.name))
        if version is None:
            out.append(line)
        elif not req.specifier.contains(version, prereleases=True):
            log.warning("keeping the engine's %s %s (the harness asks %s)", req.name, version, req)
    return out


def _pip(python: str, args: list[str], wheel_dir: Path | None, no_deps: bool) -> subprocess.CompletedProcess:
    index = ["--no-index", "--find-links", str(wheel_dir)] if wheel_dir else []
    flags = ["--no-deps"] if no_deps else []
    return subprocess.run([python, "-m", "pip", "install", "--disable-pip-version-check", *index, *flags,
                           *args], capture_output=True, text=True)


def would_replace(python: str, to_add: list[str], have: dict[str, str],
                  wheel_dir: Path | None = None, no_deps: bool = False) -> list[str]:
    """'name old -> new' for each installed distribution pip would change to add ``to_add``."""
    proc = _pip(python, ["--dry-run", "--quiet", "--report", "-", *to_add], wheel_dir, no_deps)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EngineEnvError(f"pip cannot add {', '.join(to_add)} to {python}: {last}")
    report = json.loads(proc.stdout)
    out = []
    for item in report.get("install", []):
        meta = item["metadata"]
        name = canonicalize_name(meta["name"])
        if name in have and have[name] != meta["version"]:
            out.append(f"{meta['name']} {have[name]} -> {meta['version']}")
    return out


def add_only(python: str, requirements: list[str], wheel_dir: Path | None = None,
             no_deps: bool = False) -> list[str]:
    """Install into ``python`` the requirements it lacks, verified add-only; returns what was added.

    ``wheel_dir``: install from there with no index. ``no_deps``: for a kiln
    wheelhouse, already the closure of what the image lacks, so pip must not
    "fix" an image's own version that an engine's pin disagrees with.
    """
    before = installed(python)
    to_add = missing(requirements, before)
    if not to_add:
        return []
    replaced = would_replace(python, to_add, before, wheel_dir, no_deps)
    if replaced:
        raise EngineEnvError(f"adding {', '.join(to_add)} would replace the engine's own "
                             f"{'; '.join(replaced)}; install the harness's needs in the image instead")
    proc = _pip(python, ["--quiet", *to_add], wheel_dir, no_deps)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EngineEnvError(f"pip install into {python} failed: {last}")
    after = installed(python)
    changed = [f"{n} {v} -> {after.get(n, 'gone')}" for n, v in before.items() if after.get(n) != v]
    if changed:
        raise EngineEnvError(f"the install changed the engine's packages: {'; '.join(changed)}")
    return to_add


def wheelhouse_requirements(wheel_dir: Path) -> list[str]:
    """The pins of a built wheelhouse (its engine and every dependency it carries)."""
    wheelhouse.load(wheel_dir)  # a clear error when it is not one
    return wheelhouse.read_requirements(Path(wheel_dir) / wheelhouse.PINS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ci.install.engine_env", description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=None, help=f"engine interpreter (default ${ENGINE_PYTHON_ENV} "
                                                    "or python3 on PATH)")
    ap.add_argument("-r", "--requirement", action="append", default=[], type=Path)
    ap.add_argument("--wheelhouse", type=Path, default=os.environ.get(WHEELHOUSE_ENV) or None,
                    help=f"install from this kiln wheelhouse with no index (${WHEELHOUSE_ENV})")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        python = a.python or engine_python()
        reqs = [r for f in a.requirement for r in wheelhouse.read_requirements(f)]
        if a.wheelhouse:
            reqs = wheelhouse_requirements(a.wheelhouse) + reqs
        added = add_only(python, reqs, a.wheelhouse, no_deps=bool(a.wheelhouse))
    except (EngineEnvError, wheelhouse.WheelhouseError, OSError) as exc:
        print(f"kiln: engine environment: {exc}", file=sys.stderr)
        return 2
    print(f"engine python {python}: added {', '.join(added) or 'nothing'}; "
          f"every version it had is unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
