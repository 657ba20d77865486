"""invoke plan: shards from measured durations (ceil(sum p90 x 1.15 / target), floor 1, the pool's cap),
the profile x shard matrix, and why shards cannot be even when they cannot."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

from ci.profiles import routing
from ci.profiles.runners import PROFILES
from ci.report.durations import Sample, Store
from ci.session import plan, shard
from ci.session.plan import PlanError

ROOT = Path(__file__).resolve().parents[2]
WHEN = datetime(2026, 12, 5, 10, 0, tzinfo=timezone.utc)
INVOKE_TIMEOUT_S = 60  # importing tasks.py and reading a small store: ~1 s


def _store(profile: str, tests: dict[str, tuple[float, str]], launches: dict[str, float] | None = None) -> Store:
    """A store with one sample per test: node id -> (seconds, server key); one per launch: key -> seconds."""
    return Store({profile: {t: [Sample(WHEN, s, k)] for t, (s, k) in tests.items()}}, ["r"],
                 {profile: {k: [Sample(WHEN, s)] for k, s in (launches or {}).items()}})


@pytest.mark.parametrize("text,seconds", [("20m", 1200.0), ("1h30m", 5400.0), ("900s", 900.0), ("900", 900.0),
                                          ("2.5m", 150.0), (" 1h ", 3600.0)])
def test_parse_target(text, seconds):
    assert plan.parse_target(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "20 minutes", "-5m", "0", "0m", "m"])
def test_parse_target_rejects_bad_input_in_one_line(text):
    with pytest.raises(PlanError, match=r"^--target "):
        plan.parse_target(text)


@pytest.mark.parametrize("total,target,cap,expected", [
    (0.0, 1200.0, 8, (1, 1)),         # floor 1
    (1000.0, 1200.0, 8, (1, 1)),      # 1150 s fits one 20 min job
    (1100.0, 1200.0, 8, (2, 2)),      # 1265 s does not
    (4 * 3600.0, 1200.0, 8, (8, 14)),  # the pool's cap; `wanted` keeps what the rule asked for
    (549.0, 240.0, 8, (3, 3)),        # the cpu lane at a 4 min target: ceil(631 / 240)
])
def test_shard_count_is_sglangs_rule_with_a_floor_and_the_pools_cap(total, target, cap, expected):
    assert plan.shard_count(total, target, cap) == expected


def test_a_plan_packs_as_the_shards_will_and_reports_the_spread():
    tests = {f"tests/e2e/t.py::test_{i}": (float(s), "") for i, s in enumerate([170, 160, 120, 80, 10, 9, 2])}
    store = _store("cpu", tests)
    made = plan.plan_profile(PROFILES["cpu"], store.estimates("cpu"), 240.0)
    assert (made.shards, made.wanted, made.tests, made.total_s) == (3, 3, 7, 551.0)
    # The same packer, the same inputs: the shards' own split.
    known = store.estimates("cpu")
    ids = sorted(known.p90)
    bins = shard.assign(ids, known.seconds(ids), 3, shard.groups_for(ids, known, {}))
    assert list(made.loads) == [sum(known.p90[t] for t in b) for b in bins]
    assert made.spread <= plan.MAX_SPREAD and made.reasons == ()
    text = "\n".join(made.lines())
    assert "7 tests, sum of p90 9m 11s: ceil(551 s x 1.15 / 240 s) = 3 -> 3 shards" in text
    assert "within the 40% the shards should keep" in text
    entries = made.entries()
    assert [e["shard"] for e in entries] == ["1/3", "2/3", "3/3"] and entries[0]["shard_name"] == "1of3"
    assert {"profile", "session", "runner", "gpus", "vendor"} <= set(entries[0])


def test_a_group_far_over_a_fair_share_is_split_to_even_the_shards():
    tiny = "tiny-llama|tp=1|"
    tests = {f"tests/e2e/t.py::test_{i}": (50.0, tiny) for i in range(8)}   # one group of 400 s
    tests.update({f"tests/e2e/u.py::test_{i}": (20.0, "") for i in range(6)})  # 120 s of loose tests
    made = plan.plan_profile(PROFILES["cpu"], _store("cpu", tests).estimates("cpu"), 300.0)
    # 520 s into 2: fair 260; the group is more than 40 % over it, so it is split and the shards even out.
    assert made.shards == 2 and made.loads == (260.0, 260.0) and made.reasons == ()


def test_a_group_within_the_split_tolerance_stays_whole_and_is_named_as_why_the_shards_are_uneven():
    tiny = "tiny-llama|tp=1|"
    tests = {f"tests/e2e/t.py::test_{i}": (30.0, tiny) for i in range(10)}   # one group of 300 s
    tests.update({f"tests/e2e/u.py::test_{i}": (50.0, "") for i in range(3)})
    made = plan.plan_profile(PROFILES["cpu"], _store("cpu", tests).estimates("cpu"), 300.0)
    # 450 s into 2: fair 225, the group (300) within 40 % over it stays whole -- and so sets the pace.
    assert made.shards == 2 and made.loads == (300.0, 150.0) and made.spread == 1.0
    (why,) = made.reasons
    assert why.startswith(f"server group {tiny} (10 tests) takes ~5m 00s, longer than a fair share (~3m 45s)")
    assert "spread 100% (longest / shortest - 1), over the 40%" in "\n".join(made.lines())


def test_a_plan_counts_each_servers_launch_once_in_the_total_and_on_the_shard_that_launches_it():
    smol = "SmolLM2-135M-Instruct|tp=1|"
    tests = {"tests/e2e/test_accuracy.py::test_hellaswag": (70.0, smol), "tests/e2e/test_accuracy.py::test_mmlu":
             (30.0, smol), "tests/e2e/t.py::x": (70.0, ""), "tests/e2e/t.py::y": (40.0, ""), "tests/e2e/t.py::z": (30.0, "")}
    made = plan.plan_profile(PROFILES["cpu"], _store("cpu", tests, {smol: 60.0}).estimates("cpu"), 150.0)
    # 240 s of tests and a 60 s launch: ceil(300 x 1.15 / 150) = 3 shards where the tests alone asked for 2.
    assert (made.total_s, made.launch_s, made.shards) == (300.0, 60.0, 3)
    assert "sum of p90 5m 00s (1m 00s of it server launches): ceil(300 s x 1.15 / 150 s) = 3" in "\n".join(made.lines())
    assert plan.plan_profile(PROFILES["cpu"], _store("cpu", tests).estimates("cpu"), 150.0).shards == 2
    # Two shards: the real-model group carries its launch (160 s), so the loose tests go beside each other.
    two = plan.plan_profile(PROFILES["cpu"], _store("cpu", tests, {smol: 60.0}).estimates("cpu"), 200.0)
    assert two.shards == 2 and two.loads == (160.0, 140.0) and two.reasons == ()


def test_the_group_named_as_why_the_shards_are_uneven_carries_its_launch():
    tiny = "tiny-llama|tp=1|"
    tests = {f"tests/e2e/t.py::test_{i}": (30.0, tiny) for i in range(10)}   # 300 s of tests
    tests.update({f"tests/e2e/u.py::test_{i}": (50.0, "") for i in range(3)})
    made = plan.plan_profile(PROFILES["cpu"], _store("cpu", tests, {tiny: 40.0}).estimates("cpu"), 360.0)
    # 490 s into 2: fair 245; the group with its launch (340 s) is within 40 % over it, so it stays whole.
    assert made.shards == 2 and made.loads == (340.0, 150.0)
    (why,) = made.reasons
    assert why.startswith(f"server group {tiny} (10 tests) takes ~5m 40s, longer than a fair share (~4m 05s)")


def test_the_cap_and_no_history_are_said_not_hidden():
    tests = {f"tests/e2e/t.py::test_{i}": (600.0, "") for i in range(20)}   # 200 min of tests
    gpu = replace(PROFILES["h100-1"], max_shards=4)
    made = plan.plan_profile(gpu, _store("h100-1", tests).estimates("h100-1"), 1200.0)
    assert (made.shards, made.wanted) == (4, 12)
    assert made.reasons[0].startswith("h100-1's pool gives a run at most 4 shards")
    empty = plan.plan_profile(PROFILES["cpu"], Store().estimates("cpu"), 1200.0)
    assert empty.shards == 1 and "no durations history for cpu: one shard" in empty.reasons[0]


def test_workflow_outputs_plan_the_cpu_lane_and_the_routed_gpu_profiles():
    store = _store("cpu", {f"tests/e2e/t.py::test_{i}": (300.0, "") for i in range(10)})
    values, plans = plan.workflow_outputs("pull_request", None, store, 1200.0)
    assert set(values) == {"pool", "matrix", "count", "cpu_matrix", "cpu_count", "expected"}
    cpu = json.loads(values["cpu_matrix"])["include"]
    assert [e["shard"] for e in cpu] == ["1/3", "2/3", "3/3"] and values["cpu_count"] == "3"
    gpu = json.loads(values["matrix"])["include"]
    routed = json.loads(routing.outputs("pull_request")["matrix"])["include"]
    # No GPU history: one shard each, every routed profile there, each entry the routing entry plus its shard.
    assert [{k: v for k, v in e.items() if k not in ("shard", "shard_name")} for e in gpu] == routed
    assert values["count"] == str(len(routed)) and all(e["shard"] == "1/1" for e in gpu)
    assert values["expected"].split()[0] == "e2e-cpu:3" and len(values["expected"].split()) == 1 + len(routed)
    forks, _ = plan.workflow_outputs("pull_request", None, store, 1200.0, gpu=False)
    assert json.loads(forks["matrix"]) == {"include": []} and forks["count"] == "0"
    assert forks["expected"] == "e2e-cpu:3"
    assert routing.format_outputs(values).count("\n") == len(values)


def _invoke(*args, store: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", "plan", *args, "--durations", str(store)], cwd=ROOT,
                          capture_output=True, text=True, timeout=INVOKE_TIMEOUT_S, stdin=subprocess.DEVNULL)


def test_invoke_plan_prints_the_plan_and_the_matrix_and_bad_input_is_one_line(tmp_path):
    store = _store("cpu", {f"tests/e2e/t.py::test_{i}": (100.0, "") for i in range(6)}).save(tmp_path / "d.json")
    done = _invoke("--profile", "cpu", "--target", "4m", store=store)
    assert done.returncode == 0, done.stderr
    assert "ceil(600 s x 1.15 / 240 s) = 3 -> 3 shards" in done.stdout
    assert '{"profile": "cpu", "session": "e2e-cpu", "runner": "ubuntu-latest", "gpus": 0, "vendor": "cpu", ' \
           '"shard": "2/3", "shard_name": "2of3"}' in done.stdout
    assert "expected: e2e-cpu:3" in done.stdout
    out = _invoke("--event", "schedule", "--github-output", store=store)
    assert out.returncode == 0 and out.stdout.startswith("pool=mi325\nmatrix={")
    assert "plan for e2e-cpu" in out.stderr and "plan for" not in out.stdout
    bad = _invoke("--profile", "cpu", "--target", "soon", store=store)
    assert bad.returncode == 2 and bad.stderr.strip() == ("plan: --target expects a duration like 20m, 1h30m or "
                                                          "900s, got 'soon'")
    broken = tmp_path / "broken.json"
    broken.write_text("[]")
    bad = _invoke("--profile", "cpu", store=broken)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("plan: ") and len(bad.stderr.strip().splitlines()) == 1
    bad = _invoke("--profile", "nope", store=store)
    assert bad.returncode == 2 and "unknown runner profile 'nope'" in bad.stderr
