"""Running a fault suite in a child pytest with kiln's plugin, and reading back what kiln typed.

The suites under tests/faults/ fail on purpose; the tests that run them check
the JUnit properties and the report kiln made of each failure. Shared by the
cpu lane's e2e test (real vLLM-CPU) and the integration tests (real Docker).
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ci.report import outcome, render
from ci.report.junit import CaseResult, RunResult, read_junit

ROOT = Path(__file__).resolve().parents[2]
SESSION = "faults"
TYPED = (outcome.CLASS_PROPERTY, outcome.REASON_PROPERTY, outcome.RETRY_PROPERTY, outcome.ATTEMPT_PROPERTY,
         outcome.OUTCOME_PROPERTY)


@dataclass
class ChildRun:
    """A finished child run: its exit code, output, JUnit and the report kiln rendered from them."""

    returncode: int
    output: str
    run: RunResult
    report: str
    reports_dir: Path

    def case(self, name: str) -> CaseResult:
        found = [c for c in self.run.cases if c.nodeid.endswith(f"::{name}")]
        assert len(found) == 1, f"{name}: {len(found)} JUnit cases (retries must not add cases)\n{self.output}"
        return found[0]


def run_suite(suite: str, tmp_path: Path, *args: str, env: dict | None = None, timeout_s: float) -> ChildRun:
    """Run ``tests/faults/<suite>`` under kiln's plugin (repo rootdir, so pyproject's settings apply)."""
    reports = tmp_path / "reports"
    junit = reports / f"junit-{SESSION}.xml"
    argv = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "faults" / suite), "-v", "-p", "no:cacheprovider",
            f"--rootdir={ROOT}", f"--kiln-reports={reports}", f"--junitxml={junit}", *args]
    child_env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    child_env.update(PYTHONPATH=str(ROOT), KILN_SESSION=SESSION, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run(argv, cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=timeout_s)
    output = proc.stdout + proc.stderr
    assert junit.is_file(), f"the child wrote no JUnit:\n{output}"
    report = render.build_report(junit, SESSION, root=ROOT, env={})
    return ChildRun(proc.returncode, output, read_junit(junit, root=ROOT), report, reports)


def typed_properties(case: CaseResult) -> list[tuple[str, str]]:
    """The kiln_* properties that say whose fault a case is and what the retry did."""
    return [(k, v) for k, v in case.properties if k in TYPED]


def show(child: ChildRun, names: list[str]) -> None:
    """Print each case's typed properties as JUnit has them, then the report's lines about it (pytest -s)."""
    for name in names:
        case = child.case(name)
        print(f"\n--- {case.nodeid}: {case.outcome}")
        for key, value in typed_properties(case):
            print(f'<property name="{key}" value="{value}"/>')
    print("\n--- report (the failures and retried passes sections)")
    for line in child.report.splitlines():
        if line.startswith(("### ", "#### ", "**Class**", "- `", "<details><summary>🏗️")):
            print(line)
