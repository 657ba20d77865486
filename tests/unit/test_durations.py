"""The durations store: p90 per test and server key, per profile, in a bounded window, and its fallbacks.

The JUnit here is what pytest writes with kiln's plugin (xunit1, ``kiln_profile``
suite property, ``kiln_server`` per test), cut to the fields the store reads.
"""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from ci.report import durations, flakes
from ci.report.durations import DEFAULT, FILE_MEDIAN, HISTORY, SUITE_MEDIAN, Store
from ci.report.outcome import CLASS_PROPERTY, PROFILE_PROPERTY

ROOT = Path(__file__).resolve().parents[2]
INVOKE_TIMEOUT_S = 60  # importing tasks.py and reading a few small files: ~1 s
NOW = datetime(2026, 12, 5, 12, 0, tzinfo=timezone.utc)
API = "tests/e2e/test_api.py"
TINY = "tiny-llama|tp=1|"


def _junit(when: datetime, cases: list[tuple], profile: str = "cpu") -> str:
    """``cases``: (name, seconds[, outcome[, server[, more properties]]]); outcome pass / fail / infra /
    engine / skip / xfail; more properties: (name, value) pairs, e.g. the wait and the launches."""
    body = []
    for name, seconds, *rest in cases:
        what = rest[0] if rest else "pass"
        server = rest[1] if len(rest) > 1 else TINY
        props = [("kiln_server", server)] if server else []
        props += rest[2] if len(rest) > 2 else []
        inner = ""
        if what in ("fail", "infra", "engine"):
            props.append((CLASS_PROPERTY, "test" if what == "fail" else what))
            inner = '<failure message="boom"/>'
        elif what == "skip":
            inner = '<skipped message="capacity"/>'
        elif what == "xfail":
            inner = '<skipped type="pytest.xfail" message="known"/>'
        plist = "".join(f'<property name="{k}" value="{v}"/>' for k, v in props)
        body.append(f'<testcase classname="tests.e2e.test_api" name="{name}" file="{API}" time="{seconds}">'
                    f"<properties>{plist}</properties>{inner}</testcase>")
    return (f'<testsuites><testsuite name="pytest" timestamp="{when.isoformat()}"><properties>'
            f'<property name="{PROFILE_PROPERTY}" value="{profile}"/></properties>{"".join(body)}'
            f"</testsuite></testsuites>")


def _store(tmp_path, runs: list[list[tuple]], *, profile="cpu", start=None, name="junit-e2e-cpu") -> Store:
    start = start or NOW - timedelta(days=2)
    folder = tmp_path / "history"
    folder.mkdir(parents=True, exist_ok=True)
    for i, cases in enumerate(runs):
        (folder / f"{name}-{i:03d}.xml").write_text(_junit(start + timedelta(hours=i), cases, profile))
    store = Store()
    store.ingest(flakes.read_history(folder))
    return store


def test_p90_is_the_inclusive_90th_percentile():
    assert durations.p90([5.0]) == 5.0
    assert durations.p90([float(x) for x in range(1, 11)]) == pytest.approx(9.1)
    # Never beyond the largest sample, never below the p90 of what was seen.
    assert durations.p90([1.0, 1.0, 1.0, 100.0]) == pytest.approx(70.3)
    with pytest.raises(ValueError):
        durations.p90([])


def test_estimates_are_p90_per_test_from_passes_and_test_failures_only(tmp_path):
    runs = [[("test_chat", s), ("test_stream", 2.0, "fail"), ("test_gone", 1.0, "skip"), ("test_x", 3.0, "xfail"),
             ("test_launch", 240.0, "infra"), ("test_crash", 0.5, "engine")] for s in range(1, 11)]
    known = _store(tmp_path, runs).estimates("cpu")
    assert known.p90[f"{API}::test_chat"] == pytest.approx(9.1)
    # A test that failed against a healthy server still took its time.
    assert known.p90[f"{API}::test_stream"] == 2.0
    # Skips, xfails and infra/engine failures say nothing about how long the test takes.
    assert {f"{API}::test_gone", f"{API}::test_x", f"{API}::test_launch", f"{API}::test_crash"}.isdisjoint(known.p90)
    assert known.servers[f"{API}::test_chat"] == TINY
    assert known.runs == 10 and known.newest == NOW - timedelta(days=2) + timedelta(hours=9)


def test_a_changed_server_key_drops_the_old_timings(tmp_path):
    # Timed against the tiny model for 5 runs, then its marker moved it to another server.
    runs = [[("test_chat", 100.0)]] * 5 + [[("test_chat", 3.0, "pass", "other|tp=1|")]] * 2
    known = _store(tmp_path, runs).estimates("cpu")
    assert known.p90[f"{API}::test_chat"] == 3.0 and known.servers[f"{API}::test_chat"] == "other|tp=1|"


def test_profiles_are_kept_apart(tmp_path):
    store = _store(tmp_path, [[("test_chat", 5.0)]])
    store.ingest(flakes.read_history(_history_dir(tmp_path, "h100-4", [[("test_chat", 50.0)]])))
    assert store.estimates("cpu").p90[f"{API}::test_chat"] == 5.0
    assert store.estimates("h100-4").p90[f"{API}::test_chat"] == 50.0
    assert store.estimates("mi300-8").p90 == {}


def _history_dir(tmp_path, profile, runs):
    folder = tmp_path / f"history-{profile}"
    folder.mkdir()
    for i, cases in enumerate(runs):
        (folder / f"junit-e2e-{profile}-{i}.xml").write_text(_junit(NOW - timedelta(hours=i), cases, profile))
    return folder


def test_feeding_the_same_runs_twice_adds_nothing(tmp_path):
    store = _store(tmp_path, [[("test_chat", 5.0)], [("test_chat", 7.0)]])
    assert store.ingest(flakes.read_history(tmp_path / "history")) == 0
    assert len(store.tests["cpu"][f"{API}::test_chat"]) == 2


def test_the_window_is_bounded_in_days_and_samples(tmp_path):
    old = _store(tmp_path, [[("test_old", 9.0)]], start=NOW - timedelta(days=durations.WINDOW_DAYS + 1))
    old.prune(NOW)
    assert old.tests == {}
    many = _store(tmp_path / "m", [[("test_chat", float(i))] for i in range(30)], start=NOW - timedelta(days=3))
    many.prune(NOW)
    kept = many.tests["cpu"][f"{API}::test_chat"]
    assert len(kept) == durations.MAX_SAMPLES and [s.seconds for s in kept] == [float(i) for i in range(10, 30)]


def test_reading_never_drops_a_sample_by_date(tmp_path):
    # Shards of one matrix start minutes apart: were the window applied on
    # reading, a sample crossing the 14-day line between two starts would give
    # them different figures. Reading trusts the store; only building prunes.
    old = NOW - timedelta(days=durations.WINDOW_DAYS + 30)
    store = _store(tmp_path, [[("test_chat", 7.0)]], start=old)
    again = Store.load(store.save(tmp_path / "d.json"))
    assert again.estimates("cpu").p90 == {f"{API}::test_chat": 7.0}
    assert again.estimates("cpu").newest == old and again.digest() == store.digest()
    again.prune(NOW)
    assert again.estimates("cpu").p90 == {}


def test_a_test_with_no_history_gets_its_files_median_then_the_suites(tmp_path):
    store = _store(tmp_path, [[("test_a", 10.0), ("test_b", 30.0), ("test_c", 50.0)]])
    other = "tests/e2e/test_new_file.py::test_z"
    found = store.estimates("cpu").lookup([f"{API}::test_a", f"{API}::test_new", other])
    assert found == {f"{API}::test_a": (10.0, HISTORY), f"{API}::test_new": (30.0, FILE_MEDIAN),
                     other: (30.0, SUITE_MEDIAN)}
    # Another file's median, not the suite's, when the file has history.
    store.ingest(flakes.read_history(_history_dir(tmp_path, "cpu", [[("test_d", 2.0)]])))
    assert store.estimates("cpu").lookup([f"{API}::test_new"])[f"{API}::test_new"][1] == FILE_MEDIAN
    # No history at all for a profile: the default, and the age line says the split is by count.
    none = store.estimates("h100-8")
    assert none.lookup(["t.py::x"]) == {"t.py::x": (durations.DEFAULT_ESTIMATE_S, DEFAULT)}
    assert "no history for profile h100-8" in none.age_line() and "by count" in none.age_line()


def test_coverage_and_age_lines_say_where_the_figures_come_from(tmp_path):
    store = _store(tmp_path, [[("test_a", 10.0), ("test_b", 30.0)]], start=NOW - timedelta(minutes=95))
    known = store.estimates("cpu")
    line = known.coverage([f"{API}::test_a", f"{API}::test_b", f"{API}::test_new",
                           "tests/e2e/test_other.py::t"]).line()
    assert line == (f"history for 2 of 4 tests, 1 at the file median ({API}), 1 at the suite median")
    assert known.age_line(NOW) == ("1 run of profile cpu, newest 2026-12-05 10:25 UTC (1 h old), "
                                   f"window {durations.WINDOW_DAYS} days / {durations.MAX_SAMPLES} samples a test; "
                                   "no server launches yet (each costs 0 s)")
    booted = _store(tmp_path / "l", [[("test_a", 10.0, "pass", TINY, [(durations.LAUNCH_PROPERTY, f"{TINY}=9")])]])
    assert booted.estimates("cpu").age_line(NOW).endswith("samples a test; launches of 1 server key")


SMOL = "SmolLM2-135M-Instruct|tp=1|"


def _waited(wait: str, *launches: str) -> list[tuple[str, str]]:
    """The properties the plugin writes on a test that waited: the wait, then one per launch."""
    return [(durations.WAIT_PROPERTY, wait), *((durations.LAUNCH_PROPERTY, x) for x in launches)]


def test_the_wait_is_taken_out_of_a_test_and_each_launch_is_a_sample_of_its_key(tmp_path):
    # The unsharded cpu run: the first tiny test's setup waited for the prelaunch of both servers (56.5 s);
    # the real-model test waited for nothing. Run 2 is sharded: the real-model test launched its own.
    runs = [[("test_first", 60.0, "pass", TINY, _waited("56.500", f"{TINY}=20.000", f"{SMOL}=56.000")),
             ("test_hellaswag", 70.0, "pass", SMOL, _waited("0.000")),
             ("test_old_junit", 5.0)],
            [("test_first", 4.0, "pass", TINY, _waited("1.200", f"{TINY}=1.000")),
             ("test_hellaswag", 130.0, "pass", SMOL, _waited("60.000", f"{SMOL}=60.000")),
             ("test_old_junit", 5.0)]]
    store = _store(tmp_path, runs)
    known = store.estimates("cpu")
    # A test's own time: 3.5 and 2.8 s, never its server's launch; JUnit without a wait reads as none.
    assert known.p90[f"{API}::test_first"] == pytest.approx(3.5 - 0.07)
    assert known.p90[f"{API}::test_hellaswag"] == pytest.approx(70.0)
    assert known.p90[f"{API}::test_old_junit"] == 5.0
    # Each launch once, under the key kiln_server spells ('=' inside the key too), p90 over its samples.
    assert [s.seconds for s in store.launches["cpu"][SMOL]] == [56.0, 60.0]
    assert known.launches == {TINY: pytest.approx(20.0 - 1.9), SMOL: pytest.approx(59.6)}


def test_a_wait_longer_than_the_test_is_zero_and_a_launch_counts_whatever_the_test_did(tmp_path):
    runs = [[("test_a", 1.0, "pass", TINY, _waited("3.000")),
             ("test_b", 2.0, "infra", TINY, _waited("2.000", f"{TINY}=1.500")),
             ("test_c", 2.0, "pass", TINY, _waited("junk", "no key", f"{TINY}=x"))]]
    store = _store(tmp_path, runs)
    known = store.estimates("cpu")
    assert known.p90 == {f"{API}::test_a": 0.0, f"{API}::test_c": 2.0}  # the infra failure is not timed
    # The launch of test_b's server reached ready: it took its time (a malformed value reads as 0 s).
    assert [s.seconds for s in store.launches["cpu"][TINY]] == [1.5, 0.0]


def test_launches_are_kept_in_the_same_window_as_the_tests(tmp_path):
    many = _store(tmp_path, [[("t", 1.0, "pass", TINY, _waited("1", f"{TINY}={i}"))] for i in range(30)],
                  start=NOW - timedelta(days=3))
    many.prune(NOW)
    assert [s.seconds for s in many.launches["cpu"][TINY]] == [float(i) for i in range(10, 30)]
    old = _store(tmp_path / "o", [[("t", 1.0, "pass", TINY, _waited("1", f"{TINY}=5"))]],
                 start=NOW - timedelta(days=durations.WINDOW_DAYS + 1))
    old.prune(NOW)
    assert old.launches == {} and old.estimates("cpu").launches == {}


def test_a_format_1_store_still_loads_with_no_launches(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"kiln_durations": 1, "runs": ["r"],
                                "profiles": {"cpu": {"t.py::a": [["2026-12-05T10:00:00+00:00", 7.0, TINY]]}}}))
    old = Store.load(path)
    assert old.estimates("cpu").p90 == {"t.py::a": 7.0} and old.estimates("cpu").launches == {}
    assert Store.load(old.save(path)).to_json()["kiln_durations"] == durations.STORE_FORMAT == 2
    path.write_text(json.dumps({"kiln_durations": 2, "launches": {"cpu": {TINY: [["then", 1.0]]}}}))
    with pytest.raises(durations.DurationsError, match=r"launch of tiny-llama\|tp=1\|: bad timestamp 'then'"):
        Store.load(path)


def test_save_and_load_round_trip_with_a_stable_digest(tmp_path):
    store = _store(tmp_path, [[("test_a", 10.0, "pass", TINY, _waited("4", f"{TINY}=3.25")),
                               ("test_b", 30.0, "pass", "")]])
    path = store.save(tmp_path / "sub" / "durations.json")
    again = Store.load(path)
    assert again.to_json() == store.to_json() and again.digest() == store.digest()
    assert again.estimates("cpu").p90 == store.estimates("cpu").p90
    assert again.estimates("cpu").launches == {TINY: 3.25} and again.estimates("cpu").p90[f"{API}::test_a"] == 6.0
    assert f"{API}::test_b" not in again.estimates("cpu").servers  # no server key: no group
    # A changed store has another digest: shards that split by two stores are caught by it.
    again.ingest(flakes.read_history(_history_dir(tmp_path, "cpu", [[("test_a", 11.0)]])))
    assert again.digest() != store.digest()
    assert not list(path.parent.glob(".durations-*")), "the atomic write left its temporary file"


def test_a_missing_store_is_empty_and_a_broken_one_is_one_line(tmp_path):
    assert Store.load(tmp_path / "absent.json").tests == {}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(durations.DurationsError, match=r"bad.json: not a readable durations store"):
        Store.load(bad)
    bad.write_text(json.dumps({"profiles": {}}))
    with pytest.raises(durations.DurationsError, match=r"not a kiln durations store .* invoke durations --junit"):
        Store.load(bad)
    bad.write_text(json.dumps({"kiln_durations": 1, "profiles": {"cpu": {"t": [["yesterday", 1, ""]]}}}))
    with pytest.raises(durations.DurationsError, match=r"t: bad timestamp 'yesterday'"):
        Store.load(bad)


def test_runs_without_a_profile_are_not_added(tmp_path):
    folder = tmp_path / "h"
    folder.mkdir()
    (folder / "junit-tests.xml").write_text(
        '<testsuite timestamp="2026-12-05T10:00:00+00:00"><testcase classname="tests.unit.test_x" '
        'name="test_y" file="tests/unit/test_x.py" time="1.0"/></testsuite>')
    store = Store()
    assert store.ingest(flakes.read_history(folder)) == 0 and store.tests == {}


def test_default_path_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(durations.STORE_ENV, str(tmp_path / "d.json"))
    assert durations.default_path() == tmp_path / "d.json"
    monkeypatch.delenv(durations.STORE_ENV)
    assert durations.default_path().parts[-2:] == (".kiln", "durations.json")


def test_invoke_durations_builds_the_store_from_a_folder_and_says_what_it_holds(tmp_path):
    history = tmp_path / "artefacts"
    history.mkdir()
    (history / "junit-e2e-cpu-shard1of2.xml").write_text(_junit(datetime.now(timezone.utc), [("test_chat", 4.0)]))
    store = tmp_path / "d.json"

    def run(*args):
        return subprocess.run([sys.executable, "-m", "invoke", "durations", "--store", str(store), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=INVOKE_TIMEOUT_S, stdin=subprocess.DEVNULL)

    done = run("--junit", str(history))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"durations store {store}: 1 new run(s) added"
    assert "cpu: 1 tests; 1 run of profile cpu" in done.stdout
    assert Store.load(store).estimates("cpu").p90 == {f"{API}::test_chat": 4.0}
    assert run("--junit", str(history)).stdout.splitlines()[0].endswith(": 0 new run(s) added")
    # The window is applied here, when the store is built: a run older than it adds nothing to read.
    stale = tmp_path / "stale"
    stale.mkdir()
    when = datetime.now(timezone.utc) - timedelta(days=durations.WINDOW_DAYS + 1)
    (stale / "junit-e2e-cpu.xml").write_text(_junit(when, [("test_old", 9.0)]))
    assert run("--junit", str(stale)).returncode == 0
    assert Store.load(store).estimates("cpu").p90 == {f"{API}::test_chat": 4.0}
    bad = run("--junit", str(tmp_path / "nope"))
    assert bad.returncode == 1 and bad.stderr.strip() == f"durations: {tmp_path / 'nope'}: no such directory of JUnit files"
