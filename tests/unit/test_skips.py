"""Counting an e2e session's skips (ci/session/skips.py); real runs in tests/integration/test_tested_nothing.py."""
from __future__ import annotations

from types import SimpleNamespace

from ci.session import skips


def _report(nodeid, when, outcome, reason=None, wasxfail=None):
    rep = SimpleNamespace(nodeid=nodeid, when=when, skipped=outcome == "skipped", failed=outcome == "failed",
                          passed=outcome == "passed",
                          longrepr=("t.py", 3, f"Skipped: {reason}") if reason else None)
    if wasxfail is not None:
        rep.wasxfail = wasxfail
    return rep


def test_reasons_are_counted_by_label_most_first_and_long_ones_cut():
    long = "x" * 80 + ": detail"
    assert skips.label("capacity: m tp=2 needs 2 GPU(s)") == "capacity"
    assert skips.label(long) == "x" * 59 + "…"
    assert skips.label("") == "no reason given"
    assert skips.count_reasons(["b: 1", "a: 2", "b: 3", "c"]) == "2 b, 1 a, 1 c"


def test_the_line_only_when_every_e2e_test_was_skipped():
    assert skips.tested_nothing_line(0, [], "cpu") is None
    assert skips.tested_nothing_line(2, ["capacity: x"], "cpu") is None  # one was not skipped
    assert skips.tested_nothing_line(2, ["capacity: x", "capacity: y"], "cpu", ran=1) is None
    assert skips.tested_nothing_line(2, ["capacity: x", "lane: y"], "h100-1", context="0 GPU(s) available") == (
        "all 2 e2e tests were skipped on profile h100-1 (0 GPU(s) available), so this run tested nothing: "
        "1 capacity, 1 lane. First reason: capacity: x")


def test_tally_counts_skips_from_any_phase_and_xfail_as_run():
    tally = skips.Tally(["t::a", "t::b", "t::c"])
    tally.record(_report("t::a", "setup", "skipped", "no bound: here"))
    tally.record(_report("t::b", "call", "skipped", "missing dockerd"))
    tally.record(_report("t::unit", "call", "passed"))  # not e2e: ignored
    assert tally.line("cpu") is None  # t::c has not reported yet
    tally.record(_report("t::c", "call", "skipped", "xfail reason", wasxfail="known"))
    assert tally.line("cpu") is None  # an xfail ran the test
    tally = skips.Tally(["t::a", "t::b"])
    tally.record(_report("t::a", "setup", "skipped", "no bound: here"))
    tally.record(_report("t::b", "setup", "skipped", "no bound: there"))
    assert tally.line("cpu").endswith("tested nothing: 2 no bound. First reason: no bound: here")
