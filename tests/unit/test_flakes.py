"""Flakes by data: the figures per (test, profile) and vLLM's quarantine rule, edge by edge.

The JUnit text here is what pytest writes with kiln's plugin (xunit1, kiln's
properties), cut to the fields the reader uses; tests/integration/test_flake_history.py
reads files made by real runs.
"""
from __future__ import annotations

import json
import zipfile
from datetime import datetime, timedelta, timezone

import pytest

from ci.report import flakes, quarantine
from ci.report.outcome import CLASS_PROPERTY, PROFILE_PROPERTY, QUARANTINE_PROPERTY

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=timezone.utc)
T = "tests/e2e/test_api.py::test_chat"


def _junit(when: datetime, cases: dict[str, str], profile: str | None = "cpu") -> str:
    """A JUnit file: ``cases`` maps a test name to pass / fail / infra / error / skip / qfail / qpass."""
    body = []
    for name, what in cases.items():
        props = []
        inner = ""
        if what in ("fail", "infra", "error"):
            props.append((CLASS_PROPERTY, "infra" if what == "infra" else "test"))
            inner = '<error message="boom"/>' if what == "error" else '<failure message="boom"/>'
        elif what == "skip":
            inner = '<skipped message="capacity"/>'
        elif what in ("qfail", "qpass"):
            props.append((QUARANTINE_PROPERTY, "fail rate 40%"))
            if what == "qfail":
                props.append((CLASS_PROPERTY, "test"))
                inner = '<skipped type="pytest.xfail" message="quarantined on cpu"/>'
        plist = "".join(f'<property name="{k}" value="{v}"/>' for k, v in props)
        body.append(f'<testcase classname="tests.e2e.test_api" name="{name}" file="tests/e2e/test_api.py">'
                    f"<properties>{plist}</properties>{inner}</testcase>")
    suite_props = f'<properties><property name="{PROFILE_PROPERTY}" value="{profile}"/></properties>' if profile else ""
    return (f'<testsuites><testsuite name="pytest" timestamp="{when.isoformat()}">{suite_props}'
            f'{"".join(body)}</testsuite></testsuites>')


def _history(tmp_path, outcomes: list[str], name: str = "test_chat", profile: str | None = "cpu", start=None):
    start = start or NOW - timedelta(days=3)
    for i, what in enumerate(outcomes):
        (tmp_path / f"junit-e2e-{profile or 'h100-4'}-{i:03d}.xml").write_text(
            _junit(start + timedelta(hours=i), {name: what}, profile))
    return tmp_path


def _review(tmp_path, outcomes, entries=(), **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    q = tmp_path / "q.json"
    if entries:
        q.write_text(quarantine.dump(entries))
    (tmp_path / "h").mkdir()
    return quarantine.review(_history(tmp_path / "h", outcomes, **kw), q, now=NOW)


@pytest.mark.parametrize("outcomes, decision", [
    (["pass"] * 9 + ["fail"], "quarantine"),            # 10 %: the band's lower edge is in
    (["pass"] * 10 + ["fail"], ""),                      # 9 %: below, read each failure
    (["fail"] * 9 + ["pass"], "quarantine"),             # 90 %: the upper edge is in
    (["fail"] * 10 + ["pass"], "broken"),                # 91 %: broken, not flaky: stays red
    (["fail", "pass", "fail", "pass"], ""),              # 4 runs: too few to judge
    (["fail", "pass", "fail", "pass", "pass"], "quarantine"),  # 5 runs at 40 %
])
def test_the_vllm_band_decides_who_goes_in(tmp_path, outcomes, decision):
    r = _review(tmp_path, outcomes)
    assert r.decided.get((T, "cpu"), "") == decision
    assert (T in r.after) == (decision == "quarantine")
    if decision == "quarantine":
        reason = json.loads(r.after)["quarantined"][0]["reason"]
        fails = outcomes.count("fail")
        assert reason.startswith(f"fail rate {fails / len(outcomes):.0%} ({fails} of {len(outcomes)} runs, ")


def test_infra_failures_and_skips_are_not_runs_of_the_test(tmp_path):
    r = _review(tmp_path, ["pass", "infra", "fail", "skip", "pass", "infra", "pass", "pass", "error"])
    (row,) = r.rows
    assert (row.runs, row.fails, row.infra) == (6, 2, 2)
    assert row.straight_passes() == 0  # the last result was an error


def test_a_quarantined_test_comes_out_after_five_straight_passes_not_before(tmp_path):
    held = [quarantine.Entry(T, "cpu", "fail rate 40% (2 of 5 runs)", "2026-12-01")]
    four = _review(tmp_path / "a", ["qfail", "qpass", "qfail", "qpass", "qpass", "qpass", "qpass"], held)
    assert four.decided[(T, "cpu")] == "stays" and not four.changed()
    five = _review(tmp_path / "b", ["qfail", "qfail", "qpass", "qpass", "qpass", "qpass", "qpass"], held)
    assert five.decided[(T, "cpu")] == "restored"
    assert json.loads(five.after)["quarantined"] == [] and f'-   "nodeid": "{T}"' in five.diff()


def test_quarantined_xfails_count_as_fails(tmp_path):
    r = _review(tmp_path, ["qfail", "qpass", "qfail"])
    assert (r.rows[0].runs, r.rows[0].fails) == (3, 2)


def test_a_quarantine_without_runs_in_the_window_stays(tmp_path):
    held = [quarantine.Entry("tests/e2e/test_old.py::test_gone", "cpu", "fail rate 50%", "2026-11-01")]
    r = _review(tmp_path, ["pass"] * 3, held)
    assert [e["nodeid"] for e in json.loads(r.after)["quarantined"]] == ["tests/e2e/test_old.py::test_gone"]


def test_the_window_and_the_profiles_split_the_history(tmp_path):
    hist = tmp_path / "h"
    hist.mkdir()
    old = NOW - timedelta(days=8)
    for i in range(5):  # a week and a day ago: all failing, outside the window
        (hist / f"old-{i}.xml").write_text(_junit(old + timedelta(minutes=i), {"test_chat": "fail"}))
    for i in range(5):  # this week: on cpu it passes; on h100-4 (named by its file) it flakes
        (hist / f"junit-e2e-cpu-{i}.xml").write_text(_junit(NOW - timedelta(hours=i), {"test_chat": "pass"}))
        (hist / f"junit-e2e-h100-4-{i}.xml").write_text(
            _junit(NOW - timedelta(hours=i), {"test_chat": "fail" if i % 2 else "pass"}, profile=None))
    rows = {s.profile: s for s in flakes.series(flakes.read_history(hist), window=quarantine.WINDOW, now=NOW)}
    assert (rows["cpu"].runs, rows["cpu"].fails) == (5, 0)
    assert (rows["h100-4"].runs, rows["h100-4"].fails) == (5, 2)


def test_zip_artefacts_as_github_serves_them_are_read(tmp_path):
    with zipfile.ZipFile(tmp_path / "junit-e2e-cpu.zip", "w") as zf:
        for i in range(3):
            zf.writestr(f"run{i}/junit-e2e-cpu.xml", _junit(NOW - timedelta(hours=i), {"test_chat": "pass"}))
    (tmp_path / "notes.xml").write_text("<html>not junit</html>")
    runs = flakes.read_history(tmp_path)
    assert len(runs) == 3 and all(r.profile == "cpu" for r in runs)


def test_bad_input_is_one_line_naming_the_cause(tmp_path):
    with pytest.raises(flakes.HistoryError, match=r"no such directory of JUnit files$"):
        flakes.read_history(tmp_path / "absent")
    with pytest.raises(flakes.HistoryError, match=r"no JUnit XML files"):
        flakes.read_history(tmp_path)
    bad = tmp_path / "q.json"
    bad.write_text('{"quarantined": [{"nodeid": "x"}]}')
    with pytest.raises(quarantine.QuarantineError, match=r"q.json: entry 0 needs non-empty nodeid, profile and"):
        quarantine.load(bad)
    bad.write_text("{not json")
    with pytest.raises(quarantine.QuarantineError, match=r"unreadable quarantine file"):
        quarantine.load(bad)
    assert quarantine.load(tmp_path / "none.json") == []


def test_the_file_round_trips_sorted(tmp_path):
    entries = [quarantine.Entry("t::b", "cpu", "r2"), quarantine.Entry("t::a", "cpu", "r1", "2026-12-01")]
    path = tmp_path / "q.json"
    path.write_text(quarantine.dump(entries))
    assert [e.nodeid for e in quarantine.load(path)] == ["t::a", "t::b"]
