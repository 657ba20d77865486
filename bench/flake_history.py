"""A JUnit history made by real runs, for ``invoke flakes``: a small suite, N runs, one JUnit file each.

    python bench/flake_history.py --runs 24 --out reports/flake-history
    invoke flakes --junit reports/flake-history

Each run is ``pytest tests/faults/intermittent_suite.py`` with kiln's plugin,
as an e2e session would run it: kiln types every failure (the JUnit carries
``kiln_failure_class``) and records the profile as a suite property. The
suite has a test with a real data race (it fails in roughly a third of the
runs), a stable one and a broken one; nothing is injected. It prints each
run's outcome and the command that reads the history back.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "tests" / "faults" / "intermittent_suite.py"
# One run collects three tests and runs them in milliseconds; start-up is
# ~1-2 s. A minute means something hangs.
RUN_TIMEOUT_S = 60


def run_once(index: int, out: Path, profile: str) -> str:
    """One pytest run of the suite; returns its summary line."""
    junit = out / f"junit-e2e-{profile}-{index:03d}.xml"
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env.update(PYTHONPATH=str(ROOT), KILN_SESSION=f"e2e-{profile}")
    proc = subprocess.run([sys.executable, "-m", "pytest", str(SUITE), "-q", "-p", "no:cacheprovider",
                           f"--rootdir={ROOT}", f"--kiln-profile={profile}", f"--junitxml={junit}",
                           f"--kiln-reports={out / 'reports'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if not junit.is_file():
        raise SystemExit(f"run {index}: pytest wrote no JUnit (exit {proc.returncode}):\n{proc.stdout[-2000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit {proc.returncode}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=24, help="how many runs (default 24)")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "flake-history", help="where the JUnit files go")
    ap.add_argument("--profile", default="cpu", help="runner profile the runs record (default cpu)")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    for i in range(1, args.runs + 1):
        print(f"run {i:3d}/{args.runs}: {run_once(i, args.out, args.profile)}", flush=True)
    print(f"\n{args.runs} JUnit files in {args.out}; read them back with:\n  invoke flakes --junit {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
