"""Flakes by data on JUnit files made by real runs: the history read back, the quarantine applied.

The suite is tests/faults/intermittent_suite.py (a real data race, a stable
test, a broken one), run in child pytests with kiln's plugin, one JUnit file
per run, as CI leaves them. What the race does in a given run is the
scheduler's business, so the checks on it hold for any outcome; the stable and
broken tests pin the figures exactly.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ci.report import outcome, quarantine
from ci.report.junit import read_junit

ROOT = Path(__file__).resolve().parents[2]
SUITE = "tests/faults/intermittent_suite.py"
RACY = f"{SUITE}::test_unlocked_counter_under_two_threads"
STABLE = f"{SUITE}::test_locked_counter_under_two_threads"
BROKEN = f"{SUITE}::test_title_case_of_the_project_name"
# Three trivial tests per run: a couple of seconds each on a loaded 2-core box.
RUN_TIMEOUT_S = 120


def _run(junit: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env.update(PYTHONPATH=str(ROOT), KILN_SESSION="e2e-cpu")
    return subprocess.run([sys.executable, "-m", "pytest", SUITE, "-q", "-p", "no:cacheprovider", f"--rootdir={ROOT}",
                           "--kiln-profile=cpu", f"--junitxml={junit}", f"--kiln-reports={junit.parent / 'r'}", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def test_a_history_of_real_runs_gives_exact_figures_and_the_rule_decides(tmp_path):
    hist = tmp_path / "hist"
    runs = 6
    for i in range(runs):
        _run(hist / f"junit-e2e-cpu-{i}.xml")
    review = quarantine.review(hist, tmp_path / "quarantine.json")
    rows = {s.nodeid: s for s in review.rows}
    assert review.runs == runs and set(rows) == {RACY, STABLE, BROKEN}
    assert (rows[STABLE].runs, rows[STABLE].fails) == (runs, 0)
    assert (rows[BROKEN].runs, rows[BROKEN].fails) == (runs, runs)
    assert review.decided.get((BROKEN, "cpu")) == "broken"  # 100 %: red until fixed, never quarantined
    racy = rows[RACY]
    assert racy.runs == runs and racy.profile == "cpu"
    expected = "quarantine" if quarantine.in_band(racy) else ""
    assert review.decided.get((RACY, "cpu"), "") == expected
    print(review.text(everything=True))


def test_a_quarantined_test_runs_and_reports_but_does_not_fail_the_job(tmp_path):
    q = tmp_path / "quarantine.json"
    q.write_text(quarantine.dump([quarantine.Entry(BROKEN, "cpu", "fail rate 100% (6 of 6 runs); by hand here"),
                                  quarantine.Entry(RACY, "cpu", "fail rate 33% (2 of 6 runs)")]))
    junit = tmp_path / "junit-e2e-cpu.xml"
    proc = _run(junit, f"--kiln-quarantine={q}")
    assert proc.returncode == 0, proc.stdout  # both ran; neither failed the job
    cases = {c.nodeid: c for c in read_junit(junit, root=ROOT).cases}
    broken = cases[BROKEN]
    assert broken.outcome == "xfailed" and broken.message.startswith("quarantined on cpu: fail rate 100%")
    assert broken.prop(outcome.QUARANTINE_PROPERTY) == "fail rate 100% (6 of 6 runs); by hand here"
    assert broken.prop(outcome.CLASS_PROPERTY) == outcome.TEST  # still typed: it did fail
    assert outcome.quarantined_fail(broken)
    assert cases[RACY].outcome in ("xfailed", "passed")  # ran: the race decides which
    # On another profile the same file quarantines nothing: the broken test fails the job there.
    other = _run(tmp_path / "other.xml", f"--kiln-quarantine={q}", "--kiln-profile=h100-1", "-k", "title_case")
    assert other.returncode == 1, other.stdout


def test_a_quarantined_test_comes_out_after_five_straight_real_passes(tmp_path):
    q = tmp_path / "quarantine.json"
    q.write_text(quarantine.dump([quarantine.Entry(STABLE, "cpu", "fail rate 20% (1 of 5 runs)", "2026-12-01")]))
    hist = tmp_path / "hist"
    for i in range(quarantine.RESTORE_PASSES - 1):
        _run(hist / f"junit-e2e-cpu-{i}.xml", f"--kiln-quarantine={q}", "-k", "locked and not unlocked")
    assert quarantine.review(hist, q).decided[(STABLE, "cpu")] == "stays"
    _run(hist / "junit-e2e-cpu-last.xml", f"--kiln-quarantine={q}", "-k", "locked and not unlocked")
    review = quarantine.review(hist, q)
    assert review.decided[(STABLE, "cpu")] == "restored"
    assert json.loads(review.after)["quarantined"] == []
    assert f'-   "nodeid": "{STABLE}",' in review.diff()


def test_invoke_flakes_bad_input_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "invoke", "flakes", "--junit", str(tmp_path / "absent")],
                          cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"flakes: {tmp_path / 'absent'}: no such directory of JUnit files"]
