"""ci/report/jobsummary.py: the report, then the kits' sections, appended to $GITHUB_STEP_SUMMARY."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ci.report import artefacts, jobsummary

ROOT = Path(__file__).resolve().parents[2]


def test_step_summary_appends_only_when_set(tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    assert jobsummary.append("# kiln", {"GITHUB_STEP_SUMMARY": str(summary)}) == summary
    assert jobsummary.append("more\n", {"GITHUB_STEP_SUMMARY": str(summary)}) == summary
    # Each section ends with a blank line (ci/text/summary.py): the next starts a new block.
    assert summary.read_text() == "earlier step\n# kiln\n\nmore\n\n"
    assert jobsummary.append("# kiln", {}) is None


def test_the_kits_sections_follow_the_report_when_there_are_any(tmp_path):
    assert jobsummary.with_kits("# kiln\n", tmp_path, "e2e-cpu") == "# kiln\n"
    artefacts.kit_summary(tmp_path, "e2e-cpu").write_text("### accuracy (m): pass\n")
    assert jobsummary.with_kits("# kiln\n", tmp_path, "e2e-cpu") == "# kiln\n\n### accuracy (m): pass\n"
    assert jobsummary.with_kits("# kiln\n", tmp_path, "e2e-h200-1") == "# kiln\n"


def test_invoke_report_puts_the_kits_sections_in_the_job_summary(tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "junit-e2e-cpu.xml").write_text(
        '<testsuite name="pytest" tests="1"><testcase classname="t" name="test_a" time="0.1"/></testsuite>')
    artefacts.kit_summary(reports, "e2e-cpu").write_text("### reference (m): pass\n\n120 tokens\n")
    summary = tmp_path / "summary.md"
    env = {**os.environ, "GITHUB_STEP_SUMMARY": str(summary)}
    done = subprocess.run([sys.executable, "-m", "invoke", "report", "--session", "e2e-cpu",
                           "--junit", str(reports / "junit-e2e-cpu.xml"), "--out", str(tmp_path / "r.md")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    text = summary.read_text()
    assert "### reference (m): pass" in text and "120 tokens" in text
    assert text.index("`e2e-cpu` passed") < text.index("### reference")  # the report, then the kits
