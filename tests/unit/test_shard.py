"""--shard i/n: argument handling, LPT packing, server groups, the durations store at the start of a shard."""
from __future__ import annotations

import json
import random
from datetime import datetime, timezone
from pathlib import Path

import pytest

from ci.report import durations
from ci.session import shard
from ci.session.shard import Shard, ShardError


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


def test_a_group_over_the_split_tolerance_splits_into_units_before_tests():
    # Family A: the server's own tests (S, 40 s) and a topology borrowing its idle server (T, 60 s).
    ids = ["s1", "s2", "t1", "t2", "x", "y"]
    est = {"s1": 20.0, "s2": 20.0, "t1": 30.0, "t2": 30.0, "x": 60.0, "y": 40.0}
    groups = shard.Groups(family=dict.fromkeys(["s1", "s2", "t1", "t2"], "A"),
                          unit={"s1": "A", "s2": "A", "t1": "topo A", "t2": "topo A"})
    # 2 shards: fair 100, the family (100) is within 40 % over it: it stays whole.
    bins = shard.assign(ids, est, 2, groups)
    assert ["s1", "s2", "t1", "t2"] in bins
    # 3 shards: fair 67; the family (100) is more than 40 % over it, so it splits -- into the server's
    # tests and the topology's, never test by test while a unit fits.
    bins = shard.assign(ids, est, 3, groups)
    where = {t: i for i, b in enumerate(bins) for t in b}
    assert where["s1"] == where["s2"] and where["t1"] == where["t2"] and where["s1"] != where["t1"]
    assert sorted(sum(est[t] for t in b) for b in bins) == [60.0, 60.0, 80.0]


def test_a_groups_launch_is_booked_on_the_group_and_moves_it_off_a_full_shard():
    # The real-model group (HellaSwag 70 s + another 30 s) launches its server in 60 s; three loose tests.
    est = {"r1": 70.0, "r2": 30.0, "x": 70.0, "y": 40.0, "z": 30.0}
    groups, launches = {"r1": "smol|tp=1|", "r2": "smol|tp=1|"}, {"smol|tp=1|": 60.0}
    # Blind to the launch, the group looks like 100 s and gets z beside it: really 190 s against 110 s.
    blind = shard.assign(list(est), est, 2, groups)
    assert blind == [["r1", "r2", "z"], ["x", "y"]]
    assert shard.shard_loads(blind, est, groups, launches) == [190.0, 110.0]
    # Charged its 60 s launch, the group's shard takes nothing else: 160 s against 140 s.
    booked = shard.assign(list(est), est, 2, groups, launches=launches)
    assert booked == [["r1", "r2"], ["x", "y", "z"]]
    assert shard.shard_loads(booked, est, groups, launches) == [160.0, 140.0]
    assert shard.launch_cost(groups, launches, list(est)) == 60.0  # once for the whole run


def test_each_piece_of_a_split_group_pays_its_launch():
    # Group A (3 x 40 s, a 60 s launch) is more than 40 % over a fair share of 3 shards, so it is split.
    groups, launches = {f"a{i}": "A" for i in range(3)}, {"A": 60.0}
    est = {"a0": 40.0, "a1": 40.0, "a2": 40.0, "b": 50.0, "c": 50.0, "d": 20.0}
    booked = shard.assign(list(est), est, 3, groups, launches=launches)
    # Every piece is a test that costs 100 s (its own 40 plus the launch its shard pays): one on each shard.
    assert [sorted(t for t in b if t.startswith("a")) for b in booked] == [["a0"], ["a1"], ["a2"]]
    loads = shard.shard_loads(booked, est, groups, launches)
    assert loads == [150.0, 150.0, 120.0] and sum(loads) == sum(est.values()) + 3 * 60.0
    # The same when the group is one unit (one server, no topology) split into its tests.
    assert shard.assign(list(est), est, 3, shard.Groups(groups, groups), launches=launches) == booked
    # A packer that thought the pieces cost 40 s each would leave a shard at ~half the others.
    blind = shard.shard_loads(shard.assign(list(est), est, 3, groups), est, groups, launches)
    assert max(blind) / min(blind) - 1 > shard.MAX_SPREAD >= max(loads) / min(loads) - 1


def test_groups_come_from_history_first_and_a_topology_joins_its_workers_key():
    topo = "vllm-router:round_robin x2 tiny-llama|tp=1|"
    known = durations.Estimates("cpu", {"a": 1.0, "t": 9.0}, {"a": "tiny-llama|tp=1|", "t": topo})
    groups = shard.groups_for(["a", "t", "new", "none"], known, {"t": "ignored", "new": "tiny-llama|tp=1|"})
    assert groups.unit == {"a": "tiny-llama|tp=1|", "t": topo, "new": "tiny-llama|tp=1|"}
    assert groups.family == {"a": "tiny-llama|tp=1|", "t": "tiny-llama|tp=1|", "new": "tiny-llama|tp=1|"}


def test_groups_from_collect_keys_file(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps([
        {"model": "m", "tp": 1, "args": [], "tests": ["a", "b"]},
        {"model": "m", "tp": 2, "args": ["--dtype", "float32"], "tests": ["c"]},
    ]))
    groups = shard.groups_from_keys(path)
    # Spelled as the JUnit's kiln_server property spells them, so history and collection agree.
    assert groups == {"a": "m|tp=1|", "b": "m|tp=1|", "c": "m|tp=2|--dtype float32"}
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
    store = tmp_path / "absent-durations.json"
    args = shard.select_for_session(session, ["tests/e2e", "-x", "-k", "chat or models"], Shard(2, 3), tmp_path,
                                    store_path=store)
    # Paths would re-add every test; options (and their values) are kept.
    assert args == ["-x", "-k", "chat or models", f"@{tmp_path / 'shard-e2e-h100-4-2of3.txt'}"]
    chosen = (tmp_path / "shard-e2e-h100-4-2of3.txt").read_text().splitlines()
    assert chosen == shard.select(ids, {}, Shard(2, 3), {ids[0]: "m|tp=1|", ids[1]: "m|tp=1|"})
    assert "--kiln-profile=h100-4" in session.calls[0] and "tests/e2e" in session.calls[0]
    assert session.calls[0][-3:] == ("-x", "-k", "chat or models")
    # The store's age and coverage come first: here there is none, and it says what that means.
    assert session.logs[0] == (f"durations store {store}: no history for profile h100-4: every test costs the "
                               f"60 s default, so the split is by count")
    assert session.logs[1] == "durations: history for 0 of 6 tests, 6 at the 60 s default"
    assert session.logs[2].startswith("shard 2/3: 2 of 6 tests, ~120s of ~360s")
    with pytest.raises(RuntimeError, match=r"^error: shard 3/3 has no tests: 1 collected fill only 1 of 3 "
                                           r"shards \(tests sharing a server stay together\); use "
                                           r"--shard i/1 or fewer$"):
        shard.select_for_session(FakeSession("e2e-cpu", ids[:1]), ["tests/e2e"], Shard(3, 3), tmp_path,
                                 store_path=store)
    with pytest.raises(RuntimeError, match=r"^error: shard 1/2 has no tests: the selection collected none$"):
        shard.select_for_session(FakeSession("e2e-cpu", []), ["tests/e2e"], Shard(1, 2), tmp_path,
                                 store_path=store)


def _write_store(path, profile, seconds: dict[str, float], server="m|tp=1|"):
    when = "2026-12-05T10:00:00+00:00"
    path.write_text(json.dumps({"kiln_durations": 1, "runs": ["r"], "profiles": {
        profile: {t: [[when, s, server if t.endswith("_0") or t.endswith("_1") else ""]] for t, s in seconds.items()}}}))
    return path


def test_a_shard_packs_by_the_store_and_records_what_it_was_given(tmp_path):
    ids = [f"tests/e2e/t.py::test_{i}" for i in range(6)]
    store = _write_store(tmp_path / "d.json", "cpu", {ids[0]: 100.0, ids[1]: 20.0, ids[2]: 50.0, ids[3]: 40.0,
                                                     ids[4]: 10.0})
    records = []
    for i in (1, 2):
        session = FakeSession("e2e-cpu", ids)
        shard.select_for_session(session, ["tests/e2e"], Shard(i, 2), tmp_path, store_path=store)
        records.append(json.loads((tmp_path / f"shard-e2e-cpu-{i}of2.json").read_text()))
    assert "durations: history for 5 of 6 tests, 1 at the file median (tests/e2e/t.py)" in session.logs[1]
    # test_0 and test_1 share a server (history): one shard holds both; test_5 costs the file median (40 s).
    one, two = (r["tests"] for r in records)
    assert ids[0] in one and ids[1] in one and sorted(one + two) == sorted(ids) and not set(one) & set(two)
    assert [r["estimates_s"] for r in records] == [[130.0, 130.0]] * 2
    assert records[0]["durations_sha256"] == records[1]["durations_sha256"] == durations.Store.load(store).digest()
    assert records[0]["collected"] == 6 and records[0]["collected_sha256"] == shard.collected_digest(ids)


def test_a_shards_loads_and_record_include_its_servers_launches(tmp_path):
    ids = [f"tests/e2e/t.py::test_{i}" for i in range(6)]
    when = datetime(2026, 12, 5, 10, 0, tzinfo=timezone.utc)
    seconds = {ids[0]: 100.0, ids[1]: 20.0, ids[2]: 50.0, ids[3]: 40.0, ids[4]: 10.0}
    store = durations.Store({"cpu": {t: [durations.Sample(when, s, "m|tp=1|" if t in ids[:2] else "")]
                                     for t, s in seconds.items()}}, ["r"],
                            launches={"cpu": {"m|tp=1|": [durations.Sample(when, 30.0)]}}).save(tmp_path / "d.json")
    session = FakeSession("e2e-cpu", ids)
    shard.select_for_session(session, ["tests/e2e"], Shard(1, 2), tmp_path, store_path=store)
    record = json.loads((tmp_path / "shard-e2e-cpu-1of2.json").read_text())
    # The group (120 s of tests + its 30 s launch) alone on one shard; the other four tests (140 s) on the other.
    assert record["tests"] == ids[:2] and record["estimates_s"] == [150.0, 140.0] and record["estimate_s"] == 150.0
    assert session.logs[0].endswith("launches of 1 server key")
    assert session.logs[2].startswith("shard 1/2: 2 of 6 tests, ~150s of ~290s")


def test_a_broken_store_fails_the_shard_in_one_line(tmp_path):
    bad = tmp_path / "d.json"
    bad.write_text("{")
    with pytest.raises(RuntimeError, match=r"^error: shard 1/2: .*d.json: not a readable durations store"):
        shard.select_for_session(FakeSession("e2e-cpu", ["t.py::a", "t.py::b"]), ["tests/e2e"], Shard(1, 2),
                                 tmp_path, store_path=bad)


def test_gpu_sessions_collect_in_the_engine_interpreter_with_the_runs_model(tmp_path):
    session = FakeSession("e2e-h200-2", [f"tests/e2e/test_api.py::t{i}" for i in range(4)])
    shard.select_for_session(session, ["tests/e2e"], Shard(1, 2), tmp_path,
                             python="/opt/engine/bin/python3", pytest_args=["--kiln-model=tiny-llama"],
                             store_path=tmp_path / "none.json")
    (call,) = session.calls
    assert call[0] == "/opt/engine/bin/python3" and session.external is True
    assert "--kiln-model=tiny-llama" in call and "--kiln-profile=h200-2" in call
