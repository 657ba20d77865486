"""The per-profile threshold table: complete, and every loosened bound says why."""
from __future__ import annotations

import dataclasses
from types import MappingProxyType

import pytest

from ci.kits import thresholds
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


@pytest.mark.parametrize("name", sorted(n for n, p in PROFILES.items() if p.vendor == "nvidia"))
def test_every_gpu_bound_is_measured_or_marked_an_estimate(name):
    for path, bound in thresholds.bounds(thresholds.for_profile(name)):
        assert bound.reason.startswith(("measured:", "estimate:")), (name, path, bound.reason)
