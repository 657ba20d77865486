"""Adding an engine is adding a spec: a new BackendSpec, registered here, drives every kit and
kiln's cache setup against a fake engine with no other module edited (issue 15)."""
from __future__ import annotations

import pytest

from ci.engine import backends, caches
from ci.engine.backends.spec import COMMON_CACHES, BackendSpec, StepTimer
from ci.engine.backends.vllm import VLLM_STEP_TIMER
from ci.kits import accuracy, api, decode, metrics, occupancy, steps
from ci.kits.client import KitFailure
from tests.fakes.openai_engine import FAKE_BACKEND, fake_engine

TOY = BackendSpec(
    name="toy-engine",
    argv=lambda model, port, tp, args: ["toy-serve", model, str(port), *args],
    metrics_prefix=FAKE_BACKEND.metrics_prefix,
    gauges=FAKE_BACKEND.gauges,
    metrics_flag="--toy-metrics",
    process_names=("toy-serve", "toy::"),
    cache_vars=COMMON_CACHES + (("TOY_JIT_CACHE", "toy"),),
    accepts_ignore_eos=True,
    echo_scores_prompt=False,
    # The fake logs its steps in vLLM's format; a toy engine's own pattern here.
    step_timer=StepTimer(flag="--toy-step-log", pattern=VLLM_STEP_TIMER.pattern),
)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(backends, "BACKENDS", dict(backends.BACKENDS))
    return backends.register(TOY)


def test_the_spec_is_found_by_name_and_its_caches_are_set(toy, tmp_path):
    assert backends.get_backend("toy-engine") is toy
    env = caches.engine_cache_env("toy-engine", tmp_path)
    assert env["TOY_JIT_CACHE"] == str(tmp_path.absolute() / "jit" / "toy-engine" / "toy")
    assert set(env) == {var for var, _ in toy.cache_vars}
    with pytest.raises(ValueError, match="taken"):
        backends.register(toy)


def test_every_kit_runs_on_the_new_engine(toy, tmp_path):
    log = tmp_path / "toy.log"
    log.write_text("")
    with fake_engine(backend=toy, occupancy=0.99, token_delay_s=0.003, mc_skill=0.5,
                     step_log=log, step_s=0.004) as srv:
        api.check_api_contract(srv)
        decode.check_max_tokens(srv, cases=(7,))  # the exact-count path: the spec accepts ignore_eos
        metrics.check_metrics_exposed(srv)
        occupancy.check_occupancy(srv, threshold=0.9, min_samples=3, interval_s=0.01,
                                  long_max_tokens=60, target_samples=3)
        assert accuracy.check_accuracy_floor(srv, floor=0.4).acc_norm == pytest.approx(0.5)
        assert steps.check_step_occupancy(srv, threshold=0.7, long_max_tokens=60, min_steps=16).busy > 0.7


def test_the_new_engines_faults_still_fail(toy):
    with fake_engine(backend=toy, extra_tokens=-1) as srv:
        with pytest.raises(KitFailure, match="with ignore_eos gave 6 tokens"):
            decode.check_max_tokens(srv, cases=(7,))
    with fake_engine(backend=toy, metrics_enabled=False) as srv:
        with pytest.raises(KitFailure, match="--toy-metrics"):
            metrics.check_metrics_exposed(srv)
