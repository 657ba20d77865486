"""The harness's own cost per e2e test, against a trivial live server (issue 25: goal <= 20 ms).

    python bench/harness_overhead.py [--tests 1500] [--repeats 5]

Runs child pytests the way ``nox -s e2e-<profile>`` runs the e2e suites (JUnit
file, live INFO logs, a per-test timeout), on generated test files of N
trivial tests:

- ``pytest alone``: ``def test(): pass`` without kiln's plugin (pytest's own floor);
- ``kiln plugin, no server``: the same tests with the plugin loaded (its hooks);
- ``kiln, server``: ``def test(server, enforce_bounds, kit_summary)`` with the
  plugin and tests/e2e/conftest.py's fixtures: the whole per-test path of an
  e2e test (model marker, pool borrow and release, properties, the bounds rule)
  against a real process that answers /health at once (tests/fakes/fault_engine.py).

Each variant runs with N tests and with 1 test; (wall(N) - wall(1)) / (N - 1)
is the cost of one more test, start-up, collection of the file and the one
launch excluded. Each is measured ``--repeats`` times, alternating, and the
medians are printed with kiln's share (``kiln, server`` minus ``pytest alone``).
The fake's generic backend names no installed distribution; against vLLM the
server fixture also looks the engine's version up (importlib.metadata, ~1 ms
a test in the e2e-cpu venv).
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAULT_ENGINE = ROOT / "tests" / "fakes" / "fault_engine.py"
GOAL_MS = 20.0
# A child run of a few hundred trivial tests takes seconds; this bounds a hung one.
CHILD_TIMEOUT_S = 600

PLAIN = "def test_{k}():\n    pass\n"
WITH_SERVER = ("@pytest.mark.model('bench-model')\n"
               "def test_{k}(server, enforce_bounds, kit_summary):\n"
               "    assert server.base_url\n")
VARIANTS = {
    "pytest alone": (PLAIN, False),
    "kiln plugin, no server": (PLAIN, True),
    "kiln, server": (WITH_SERVER, True),
}


def write_tests(folder: Path, body: str, n: int) -> Path:
    path = folder / f"test_bench_{n}.py"
    path.write_text("import pytest\n\n\n" + "\n\n".join(body.format(k=k) for k in range(n)))
    return path


def run_child(test_file: Path, kiln: bool, reports: Path) -> float:
    """Wall seconds of one child pytest run (it writes its JUnit file, as the sessions do)."""
    junit = reports / f"junit-{test_file.stem}-{int(kiln)}.xml"
    backend = f"generic:{{python}} {shlex.quote(str(FAULT_ENGINE))} --port {{port}} --mode ok"
    args = [sys.executable, "-m", "pytest", str(test_file), "-q", "-p", "no:cacheprovider",
            f"--junitxml={junit}", "-o", "junit_family=xunit1", "--timeout=300",
            "-o", "log_cli=true", "--log-cli-level=INFO", f"--rootdir={test_file.parent}"]
    if kiln:
        args += ["-p", "ci.session.pytest_plugin", "-p", "tests.e2e.conftest",
                 "--kiln-profile=cpu", f"--kiln-backend={backend}", f"--kiln-reports={reports}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KILN_SESSION": "bench-overhead"}
    t0 = time.monotonic()
    proc = subprocess.run(args, cwd=test_file.parent, env=env, capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"child pytest failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 1500: the cost of 1500 more tests (~1-3 s) stands well above the ~0.2 s
    # spread of a child's start-up; 300 gave a negative run once.
    ap.add_argument("--tests", type=int, default=1500, help="trivial tests in the large run (default 1500)")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    per_test: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        folder, reports = Path(tmp) / "tests", Path(tmp) / "reports"
        files = {}
        for name, (body, kiln) in VARIANTS.items():
            sub = folder / name.replace(",", "").replace(" ", "_")
            sub.mkdir(parents=True)
            files[name] = (write_tests(sub, body, a.tests), write_tests(sub, body, 1), kiln)
        for _ in range(a.repeats):
            for name, (big, one, kiln) in files.items():
                wall_n = run_child(big, kiln, reports)
                wall_1 = run_child(one, kiln, reports)
                per_test[name].append((wall_n - wall_1) / (a.tests - 1))
    print(f"{a.tests} trivial tests a run, {a.repeats} repeats; load average {os.getloadavg()[0]:.2f}")
    med = {name: statistics.median(v) * 1000 for name, v in per_test.items()}
    for name in VARIANTS:
        print(f"{name:<24} {med[name]:6.2f} ms a test (wall, runs: "
              f"{', '.join(f'{x * 1000:.2f}' for x in per_test[name])})")
    kiln_ms = med["kiln, server"] - med["pytest alone"]
    print(f"kiln's per-test overhead: {kiln_ms:.2f} ms a test "
          f"({'within' if kiln_ms <= GOAL_MS else 'ABOVE'} the {GOAL_MS:g} ms goal)")


if __name__ == "__main__":
    main()
