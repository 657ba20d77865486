"""--shard i/n: argument handling, LPT packing, estimates from JUnit history."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ci.session import shard
from ci.session.shard import Shard, ShardError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "junit"


@pytest.mark.parametrize("posargs,expected_shard,rest", [
    ([], None, []),
    (["--shard", "2/4"], Shard(2, 4), []),
    (["--shard=1/1", "-k", "chat"], Shard(1, 1), ["-k", "chat"]),
    (["tests/e2e/test_api.py", "--shard", "3/3", "-x"], Shard(3, 3), ["tests/e2e/test_api.py", "-x"]),
    # After a literal "--" everything is pytest's, even something spelled --shard.
    (["--shard", "1/2", "--", "--shard", "x"], Shard(1, 2), ["--", "--shard", "x"]),
    (["tests/e2e/test_api.py::test_chat[a b]"], None, ["tests/e2e/test_api.py::test_chat[a b]"]),
])
def test_split_shard_arg(posargs, expected_shard, rest):
    assert shard.split_shard_arg(posargs) == (expected_shard, rest)


@pytest.mark.parametrize("posargs,message", [
    (["--shard"], "needs a value"),
    (["--shard", "0/4"], "1 <= i <= n"),
    (["--shard", "5/4"], "1 <= i <= n"),
    (["--shard", "1/0"], "1 <= i <= n"),
    (["--shard", "two/4"], "expects i/n"),
    (["--shard=1-4"], "expects i/n"),
    (["--shard", "1/2", "--shard", "2/2"], "given twice"),
])
def test_split_shard_arg_rejects_bad_input(posargs, message):
    with pytest.raises(ShardError, match=message):
        shard.split_shard_arg(posargs)


def test_lpt_balances_and_covers_every_test_once():
    rng = random.Random(7)
    ids = [f"tests/e2e/t.py::test_{i}" for i in range(200)]
    est = {t: rng.lognormvariate(2.0, 1.0) for t in ids}
    bins = shard.assign(ids, est, 4)
    assert sorted(t for b in bins for t in b) == sorted(ids)
    loads = [sum(est[t] for t in b) for b in bins]
    bound = max(max(est.values()), sum(est.values()) / 4)
    assert max(loads) / bound <= 1.05
    # Each shard keeps collection order (pytest reuses servers in that order).
    for b in bins:
        assert b == sorted(b, key=ids.index)


def test_lpt_is_deterministic_and_breaks_ties_by_nodeid():
    ids = [f"t.py::test_{c}" for c in "dcba"]
    est = dict.fromkeys(ids, 10.0)
    first = shard.assign(ids, est, 2)
    assert first == shard.assign(ids, est, 2)
    # The same tests collected in another order land on the same shards.
    assert [set(b) for b in shard.assign(list(reversed(ids)), est, 2)] == [set(b) for b in first]
    # Equal weights: a, b, c, d go to shards 0, 1, 0, 1 in node id order.
    assert first == [["t.py::test_c", "t.py::test_a"], ["t.py::test_d", "t.py::test_b"]]


def test_lpt_then_refinement_reaches_the_optimum_on_a_classic_case():
    # Plain LPT on 7,6,5,4,3 into 2 shards gives 14 | 11 (7+4+3 | 6+5);
    # the optimum is 13 | 12, which the move/swap refinement finds.
    est = {"a": 7.0, "b": 6.0, "c": 5.0, "d": 4.0, "e": 3.0}
    bins = shard.assign(list(est), est, 2)
    assert sorted(sum(est[t] for t in b) for b in bins) == [12.0, 13.0]
    assert bins == [["b", "d", "e"], ["a", "c"]]


def test_refinement_fixes_lpt_worst_case():
    # Graham's tight example for m=3: jobs 5,5,4,4,3,3,3. LPT: 11 | 9 | 7... optimum 9 | 9 | 9.
    weights = [5, 5, 4, 4, 3, 3, 3]
    est = {f"t{i}": float(w) for i, w in enumerate(weights)}
    bins = shard.assign(list(est), est, 3)
    assert max(sum(est[t] for t in b) for b in bins) == 9.0


def test_unknown_tests_cost_the_median_and_no_history_a_constant():
    est = {"a": 1.0, "b": 100.0, "c": 3.0}
    assert shard.default_estimate(est) == 3.0
    assert shard.default_estimate({}) == shard.DEFAULT_ESTIMATE_S
    bins = shard.assign(["a", "b", "c", "new1", "new2"], est, 2)
    assert bins == [["b"], ["a", "c", "new1", "new2"]]


def test_more_shards_than_tests_leaves_empty_shards():
    bins = shard.assign(["a", "b"], {}, 4)
    assert sorted(map(len, bins)) == [0, 0, 1, 1]
    assert shard.select(["a", "b"], {}, Shard(4, 4)) == []
    with pytest.raises(ShardError):
        shard.assign(["a"], {}, 0)


def test_no_shard_is_left_empty_while_there_are_tests_to_spread():
    # Tests whose history says 0 s would all tie at load 0 and pile onto shard 1.
    ids = [f"t{i}" for i in range(5)]
    bins = shard.assign(ids, dict.fromkeys(ids, 0.0), 4)
    assert sorted(map(len, bins)) == [1, 1, 1, 2]
    # A server group within a fair share stays one item: three tests, two items, one empty shard.
    bins = shard.assign(["long", "a", "b"], {"long": 100.0, "a": 1.0, "b": 1.0}, 3, {"a": "A", "b": "A"})
    assert sorted(map(len, bins)) == [0, 1, 2]


def test_server_groups_stay_together_unless_too_big():
    ids = [f"t{i}" for i in range(8)]
    est = dict.fromkeys(ids, 10.0)
    groups = {"t0": "A", "t1": "A", "t2": "A", "t3": "B", "t4": "B"}
    bins = shard.assign(ids, est, 2, groups)
    where = {t: i for i, b in enumerate(bins) for t in b}
    assert where["t0"] == where["t1"] == where["t2"] and where["t3"] == where["t4"]
    # A group larger than a fair share (total/n) is split: it alone would set the makespan.
    big = {t: "A" for t in ids}
    bins = shard.assign(ids, est, 2, big)
    assert [len(b) for b in bins] == [4, 4]


def test_estimates_and_groups_from_junit(tmp_path):
    est = shard.estimates_from_junit([FIXTURES / "params.xml", FIXTURES / "all_skipped.xml",
                                      tmp_path / "missing.xml"])
    assert est["tests/e2e/test_params.py::test_chat[two words]"] == 12.0
    assert est["tests/e2e/test_params.py::TestGroup::test_member[ok]"] == 4.0
    assert not any("test_tp" in t for t in est)  # skipped: no information
    # Two runs of the same test: the mean.
    other = tmp_path / "junit-2.xml"
    other.write_text('<testsuite><testcase classname="tests.e2e.test_params" name="test_chat[plain]" '
                     'time="3.0"/></testsuite>')
    est = shard.estimates_from_junit([FIXTURES / "params.xml", other])
    assert est["tests/e2e/test_params.py::test_chat[plain]"] == 2.0
    groups = shard.groups_from_junit([FIXTURES / "params.xml"])
    assert groups["tests/e2e/test_params.py::test_chat[plain]"] == "tiny-llama|tp=1|"
    assert "tests/e2e/test_params.py::TestGroup::test_member[ok]" not in groups


def test_groups_from_collect_keys_file(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([
        {"model": "m", "tp": 1, "args": [], "tests": ["a", "b"]},
        {"model": "m", "tp": 2, "args": [], "tests": ["c"]},
    ]))
    groups = shard.groups_from_keys(path)
    assert groups["a"] == groups["b"] != groups["c"]
    assert shard.groups_from_keys(tmp_path / "absent.json") == {}


def test_parse_collected_stops_at_the_summary():
    out = ("tests/e2e/test_api.py::test_chat[a b]\ntests/e2e/test_api.py::TestX::test_y\n\n"
           "3 tests collected in 0.1s\n  tests/x.py::noise in a warning\n")
    assert shard.parse_collected(out) == ["tests/e2e/test_api.py::test_chat[a b]",
                                          "tests/e2e/test_api.py::TestX::test_y"]


class FakeSession:
    """Records what a nox session was asked to do; answers collection like pytest -q."""

    def __init__(self, name: str, collected: list[str]):
        self.name = name
        self.collected = collected
        self.calls: list[tuple] = []
        self.logs: list[str] = []

    def run(self, *args, silent=False, external=False):
        self.calls.append(args)
        self.external = external
        keys = next(a.split("=", 1)[1] for a in args if a.startswith("--kiln-collect-keys="))
        Path(keys).write_text(json.dumps([{"model": "m", "tp": 1, "args": [], "tests": self.collected[:2]}]))
        return "\n".join(self.collected) + f"\n\n{len(self.collected)} tests collected\n"

    def log(self, message):
        self.logs.append(message)

    def error(self, message):
        raise RuntimeError(f"error: {message}")


def test_select_for_session_writes_an_argsfile(tmp_path):
    ids = [f"tests/e2e/t.py::test_{i}[x y]" for i in range(6)]
    session = FakeSession("e2e-h100-4", ids)
    args = shard.select_for_session(session, ["tests/e2e", "-x", "-k", "chat or models"], Shard(2, 3), tmp_path)
    # Paths would re-add every test; options (and their values) are kept.
    assert args == ["-x", "-k", "chat or models", f"@{tmp_path / 'shard-e2e-h100-4-2of3.txt'}"]
    chosen = (tmp_path / "shard-e2e-h100-4-2of3.txt").read_text().splitlines()
    assert chosen == shard.select(ids, {}, Shard(2, 3), {ids[0]: "k", ids[1]: "k"})
    assert "--kiln-profile=h100-4" in session.calls[0] and "tests/e2e" in session.calls[0]
    assert session.calls[0][-3:] == ("-x", "-k", "chat or models")
    assert "shard 2/3" in session.logs[0]
    with pytest.raises(RuntimeError, match=r"^error: shard 3/3 has no tests: 1 collected fill only 1 of 3 "
                                           r"shards \(tests sharing a server stay together\); use "
                                           r"--shard i/1 or fewer$"):
        shard.select_for_session(FakeSession("e2e-cpu", ids[:1]), ["tests/e2e"], Shard(3, 3), tmp_path)
    with pytest.raises(RuntimeError, match=r"^error: shard 1/2 has no tests: the selection collected none$"):
        shard.select_for_session(FakeSession("e2e-cpu", []), ["tests/e2e"], Shard(1, 2), tmp_path)


def test_gpu_sessions_collect_in_the_engine_interpreter_with_the_runs_model(tmp_path):
    session = FakeSession("e2e-h200-2", [f"tests/e2e/test_api.py::t{i}" for i in range(4)])
    shard.select_for_session(session, ["tests/e2e"], Shard(1, 2), tmp_path,
                             python="/opt/engine/bin/python3", pytest_args=["--kiln-model=tiny-llama"])
    (call,) = session.calls
    assert call[0] == "/opt/engine/bin/python3" and session.external is True
    assert "--kiln-model=tiny-llama" in call and "--kiln-profile=h200-2" in call
