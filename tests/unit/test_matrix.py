"""invoke merge: one report for every shard of a matrix; a missing shard is red, never green.

Each shard here is what a shard job uploads: its JUnit (kiln's properties), its
server records and its shard record, in a folder named like the artefact,
written by ci/session/shard.py's own record writer.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ci.report import artefacts, matrix
from ci.report.outcome import CLASS_PROPERTY, PROFILE_PROPERTY, REASON_PROPERTY
from ci.session import shard
from ci.session.shard import Shard

ROOT = Path(__file__).resolve().parents[2]
INVOKE_TIMEOUT_S = 60  # importing tasks.py and merging three small files: ~1 s
T = "tests/e2e/t.py"
SUITE = [f"{T}::test_{i}" for i in range(6)]
PLAN = [[SUITE[0], SUITE[1]], [SUITE[2], SUITE[3]], [SUITE[4], SUITE[5]]]
STORE = "0" * 64
SECRET = "hunter2-very-secret-token"


def _case(nodeid: str, seconds: float, failed: str = "") -> str:
    name = nodeid.split("::")[1]
    props = '<property name="kiln_server" value="tiny-llama|tp=1|"/>'
    inner = ""
    if failed:
        props += (f'<property name="{CLASS_PROPERTY}" value="test"/>'
                  f'<property name="{REASON_PROPERTY}" value="an assertion against a healthy server"/>')
        inner = f'<failure message="{failed}">E   AssertionError: {failed}</failure>'
    return (f'<testcase classname="tests.e2e.t" name="{name}" file="{T}" time="{seconds}">'
            f"<properties>{props}</properties>{inner}</testcase>")


def _shard(root: Path, index: int, tests=None, *, failed: dict | None = None, store: str = STORE,
           collected=SUITE, record: bool = True) -> Path:
    """Shard ``index`` of 3 as its job uploads it, under shards/shard-e2e-cpu-<i>of3/."""
    folder = root / f"shard-e2e-cpu-{index}of3"
    folder.mkdir(parents=True)
    tests = PLAN[index - 1] if tests is None else tests
    stem = artefacts.stem("e2e-cpu", (index, 3))
    cases = "".join(_case(t, 10.0 * (i + 1), (failed or {}).get(t, "")) for i, t in enumerate(tests))
    artefacts.junit(folder, stem).write_text(
        f'<testsuites><testsuite name="pytest" time="{60 + index}" timestamp="2026-12-05T10:0{index}:00+00:00">'
        f'<properties><property name="{PROFILE_PROPERTY}" value="cpu"/></properties>{cases}</testsuite></testsuites>')
    artefacts.servers(folder, stem).write_text(json.dumps([{
        "key": "tiny-llama|tp=1|", "model": "tiny-llama", "launched": 100.0 * index, "ready": 100.0 * index + 40,
        "stopped": 100.0 * index + 90, "tests": list(tests), "log_path": f"reports/logs/{stem}/server.log"}]))
    artefacts.kit_summary(folder, stem).write_text(f"### perf (shard {index}): pass\n")
    if record:
        shard.write_record(artefacts.shard_record(folder, "e2e-cpu", (index, 3)), session="e2e-cpu",
                           shard=Shard(index, 3), collected=collected, chosen=tests, loads=[30.0, 30.0, 30.0],
                           digest=store)
    return folder


def _green(root: Path) -> Path:
    for i in (1, 2, 3):
        _shard(root, i)
    return root


def test_three_green_shards_make_one_green_report_with_the_union_checked(tmp_path):
    report = matrix.build(_green(tmp_path), {"e2e-cpu": 3}, env={})
    md = report.markdown
    assert report.green
    assert md.startswith("## ✅ kiln e2e matrix: all 3 shards reported, every test passed")
    assert "| `e2e-cpu` | 2/3 | 2 | ✅ 2 passed | 1m 02s | ~30s |" in md
    assert ("**union** `e2e-cpu`: 3 of 3 shards ran 6 of 6 collected tests, none twice, one durations store "
            f"(sha256 {STORE[:12]}): exactly the suite") in md
    # One session report of the merged results: every case, every shard's server on one timeline.
    assert "`e2e-cpu` passed: 6 passed in 1m 03s" in md
    assert md.count("tiny-llama") >= 3
    # The job summary carries every shard's kit sections after the report.
    summary = report.job_summary()
    assert summary.index("### perf (shard 1): pass") > summary.index("kiln e2e matrix")
    assert all(f"#### kit sections: e2e-cpu shard {i}/3" in summary for i in (1, 2, 3))


def test_a_missing_shard_is_reported_missing_and_never_green(tmp_path):
    _shard(tmp_path, 1)
    _shard(tmp_path, 3)
    report = matrix.build(tmp_path, {"e2e-cpu": 3}, env={})
    md = report.markdown
    assert not report.green
    assert md.startswith("## ❌ kiln e2e matrix: 1 of 3 shards missing — not green")
    assert f"| `e2e-cpu` | 2/3 | — | ⚠️ **missing**: {matrix.MISSING} | — | — |" in md
    # The session's own verdict is red too, though every test that did run passed.
    assert "### ❌ `e2e-cpu` incomplete (shard 2/3 missing): 4 passed" in md
    assert "2 of 3 shards ran 4 of 6 collected tests" in md and "exactly the suite" not in md
    # Nothing at all uploaded: every shard missing, still a report, still red.
    empty = tmp_path / "nothing"
    empty.mkdir()
    none = matrix.build(empty, {"e2e-cpu": 3}, env={})
    assert not none.green and "3 of 3 shards missing" in none.markdown
    assert "### ❌ `e2e-cpu` incomplete (shards 1/3, 2/3, 3/3 missing): no test results" in none.markdown


def test_a_failure_keeps_its_shard_its_class_and_a_repro_of_exactly_that_test(tmp_path):
    _green_but = {SUITE[3]: f"expected 4 tokens, got 3 ({SECRET})"}
    _shard(tmp_path, 1)
    _shard(tmp_path, 2, failed=_green_but)
    _shard(tmp_path, 3)
    report = matrix.build(tmp_path, {"e2e-cpu": 3}, env={"KILN_MODEL": "tiny-llama", "HF_TOKEN": SECRET})
    md = report.markdown
    assert not report.green and md.startswith("## ❌ kiln e2e matrix: 3 shards reported, not green")
    assert "| `e2e-cpu` | 2/3 | 2 | ❌ 1 failed, 1 passed |" in md
    block = md.split(f"#### ❌ `{SUITE[3]}`", 1)[1]
    assert block.lstrip().startswith("**Shard** `2/3`")
    assert "**Class** **test**: `an assertion against a healthy server`" in block
    assert f"KILN_MODEL=tiny-llama nox -s e2e-cpu -- '{SUITE[3]}'" in block
    assert SECRET not in md and "expected 4 tokens, got 3 (***)" in md


def test_a_split_that_is_not_one_partition_is_red(tmp_path):
    # Shard 3 split by another store and also took a test of shard 2's; shard 1 lost a result.
    _shard(tmp_path, 1, tests=PLAN[0])
    (tmp_path / "shard-e2e-cpu-1of3" / "junit-e2e-cpu-shard1of3.xml").write_text(
        '<testsuites><testsuite name="pytest" time="5">' + _case(SUITE[0], 1.0) + "</testsuite></testsuites>")
    _shard(tmp_path, 2)
    _shard(tmp_path, 3, tests=[SUITE[3], SUITE[4], SUITE[5]], store="1" * 64)
    report = matrix.build(tmp_path, {"e2e-cpu": 3}, env={})
    md = report.markdown
    assert not report.green
    assert "❌ the shards split by different durations stores: the split is not one partition" in md
    assert f"❌ 1 tests on more than one shard, e.g. {SUITE[3]}" in md
    assert f"❌ 1 assigned tests have no result, e.g. {SUITE[1]}" in md


def test_shards_that_collected_another_suite_or_left_a_gap_are_red(tmp_path):
    _shard(tmp_path, 1)
    _shard(tmp_path, 2)
    _shard(tmp_path, 3, tests=[SUITE[4]], collected=SUITE)  # SUITE[5] was given to nobody
    report = matrix.build(tmp_path, {"e2e-cpu": 3}, env={})
    assert not report.green and "❌ the shards hold 5 tests but 6 were collected" in report.markdown
    other = tmp_path / "other"
    for i in (1, 2, 3):
        _shard(other, i, collected=SUITE if i < 3 else SUITE + ["t.py::extra"])
    assert "❌ the shards collected different suites" in matrix.build(other, {"e2e-cpu": 3}, env={}).markdown


def test_files_of_a_shard_the_plan_did_not_ask_for_are_named_not_counted(tmp_path):
    _green(tmp_path)
    stray = tmp_path / "old"
    stray.mkdir()
    artefacts.junit(stray, artefacts.stem("e2e-cpu", (4, 4))).write_text(
        '<testsuites><testsuite name="pytest">' + _case(SUITE[0], 1.0) + "</testsuite></testsuites>")
    report = matrix.build(tmp_path, {"e2e-cpu": 3}, env={})
    assert report.green and "ignored e2e-cpu shard 4/4: not in the plan (e2e-cpu:3)" in report.markdown


@pytest.mark.parametrize("text,message", [
    ("", "--expect is empty"),
    ("e2e-cpu", "SESSION:SHARDS items"),
    ("e2e-cpu:0", "SESSION:SHARDS items"),
    ("e2e-cpu:3 e2e-cpu:2", "names e2e-cpu twice"),
    ("e2e-cpu:x", "SESSION:SHARDS items"),
])
def test_parse_expected_rejects_bad_input_in_one_line(text, message):
    with pytest.raises(matrix.MatrixError, match=message):
        matrix.parse_expected(text)


def test_parse_expected_reads_the_plans_line():
    assert matrix.parse_expected("e2e-cpu:3 e2e-h100-4:2,e2e-mi300-8:1") == {
        "e2e-cpu": 3, "e2e-h100-4": 2, "e2e-mi300-8": 1}


def test_invoke_merge_writes_the_report_and_fails_a_red_matrix(tmp_path):
    _shard(tmp_path / "s", 1)
    _shard(tmp_path / "s", 3)
    out = tmp_path / "report.md"
    summary = tmp_path / "summary.md"
    done = subprocess.run([sys.executable, "-m", "invoke", "merge", "--shards", str(tmp_path / "s"),
                           "--expect", "e2e-cpu:3", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=INVOKE_TIMEOUT_S, stdin=subprocess.DEVNULL,
                          env={"PATH": "/usr/bin:/bin", "GITHUB_STEP_SUMMARY": str(summary)})
    assert done.returncode == 1
    assert out.read_text() == done.stdout and "1 of 3 shards missing" in done.stdout
    assert "### perf (shard 3): pass" in summary.read_text()
    assert done.stderr.strip().endswith("merge: the matrix is not green (above: what failed or is missing)")
    bad = subprocess.run([sys.executable, "-m", "invoke", "merge", "--shards", str(tmp_path / "absent"),
                          "--expect", "e2e-cpu:3"], cwd=ROOT, capture_output=True, text=True,
                         timeout=INVOKE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert bad.returncode == 2 and bad.stderr.strip() == f"merge: {tmp_path / 'absent'}: no such directory of shard artefacts"


@pytest.mark.parametrize("session,shard,name", [("e2e-cpu", None, "e2e-cpu"), ("e2e-cpu", (2, 3), "e2e-cpu-shard2of3"),
                                                ("e2e-h100-1-sglang", (10, 12), "e2e-h100-1-sglang-shard10of12")])
def test_a_shards_files_carry_its_shard_and_read_back(session, shard, name):
    assert artefacts.stem(session, shard) == name
    assert artefacts.parse_stem(name) == (session, shard)
    assert artefacts.junit_stem(artefacts.junit("reports", name)) == name
    # Not a shard: a stem whose "shard" is out of range, or any other file name.
    assert artefacts.parse_stem("e2e-cpu-shard4of3") == ("e2e-cpu-shard4of3", None)
    assert artefacts.junit_stem("reports/servers-e2e-cpu.json") is None
