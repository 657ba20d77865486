"""Metrics-sanity kit against the fake engine, plus the shared parsing helpers."""
from __future__ import annotations

import math

import pytest

from ci.kits import metrics
from ci.kits.client import KitFailure
from tests.fakes.openai_engine import FAKE_GAUGES, fake_engine

# Requests last ~0.06 s each, so the peak sampler sees them running.
SLOW = {"token_delay_s": 0.002}
LOAD = {"requests": 4, "concurrency": 2, "max_tokens": 32}


def test_parse_samples_keys_by_sample_name_and_label_set():
    text = ('# TYPE vllm:generation_tokens counter\n'
            'vllm:generation_tokens_total{engine="0"} 12.0\n'
            'vllm:generation_tokens_created{engine="0"} 1.7e9\n'
            '# TYPE g gauge\ng{b="2",a="1"} NaN\n')
    samples = metrics.parse_samples(text)
    assert samples["vllm:generation_tokens_total"] == {(("engine", "0"),): 12.0}
    ((labels, value),) = samples["g"].items()
    assert labels == (("a", "1"), ("b", "2")) and math.isnan(value)


def test_parse_samples_rejects_garbage_with_a_one_line_cause():
    with pytest.raises(KitFailure, match="not valid Prometheus text"):
        metrics.parse_samples('m{a="1" 3\n')


@pytest.mark.parametrize("how, expected, decider", [
    ("min", 0.0, (("engine", "1"),)), ("max", 0.9, (("engine", "0"),)),
    ("sum", 0.9, None), ("mean", 0.45, None)])
def test_aggregate_drops_nan_and_names_the_deciding_label_set(how, expected, decider):
    values = {(("engine", "0"),): 0.9, (("engine", "1"),): 0.0, (("engine", "2"),): math.nan}
    value, key = metrics.aggregate(values, how)
    assert value == pytest.approx(expected) and key == decider


def test_aggregate_of_nan_only_is_nan_and_unknown_names_are_rejected():
    assert math.isnan(metrics.aggregate({(): math.nan}, "min")[0])
    with pytest.raises(ValueError, match="unknown aggregation 'median'"):
        metrics.aggregate({}, "median")


def test_metrics_checks_pass_against_a_well_behaved_engine(capsys):
    with fake_engine(**SLOW) as srv:
        metrics.check_metrics_exposed(srv)
        metrics.check_gauges_return_to_zero(srv, **LOAD)
        metrics.check_generation_counter(srv, **LOAD)
    out = capsys.readouterr().out
    assert "+128 == 128 completion tokens" in out and "peaked at" in out


def test_metrics_disabled_fails_naming_the_flag():
    with fake_engine(metrics_enabled=False) as srv:
        with pytest.raises(KitFailure, match=r"metrics disabled: /metrics -> HTTP 404; fake serves "
                                             r"them only with --enable-metrics, and the server was "
                                             r"launched without it"):
            metrics.check_metrics_exposed(srv)


def test_gauge_hidden_by_a_launch_flag_fails_naming_that_flag():
    with fake_engine(args=("--disable-log-stats",),
                     missing_metrics=frozenset({FAKE_GAUGES.running})) as srv:
        with pytest.raises(KitFailure, match=r"gauge missing: fake:num_requests_running not in "
                                             r"/metrics; .*launched with --disable-log-stats"):
            metrics.check_metrics_exposed(srv)


def test_nan_gauge_fails_instead_of_reading_as_busy():
    with fake_engine(nan_gauges=True) as srv:
        with pytest.raises(KitFailure, match=r'gauge fake:num_requests_running\{engine="0",.*\} reads NaN'):
            metrics.check_gauges_return_to_zero(srv, **LOAD)


def test_running_gauge_stuck_after_load_fails_at_the_deadline():
    with fake_engine(stuck_running=True) as srv:
        with pytest.raises(KitFailure, match="gauges not back to 0 0 s after load: "
                                             "fake:num_requests_running=1"):
            metrics.check_gauges_return_to_zero(srv, **LOAD, deadline_s=0.1)


def test_running_gauge_that_never_rises_fails():
    # ranks=1 with rank 0 bad: the running gauge always reads 0.
    with fake_engine(bad_rank=0, **SLOW) as srv:
        with pytest.raises(KitFailure, match="never rose above 0 .* does not track requests"):
            metrics.check_gauges_return_to_zero(srv, **LOAD)


def test_generation_counter_overshoot_fails():
    with fake_engine(counter_skew=1) as srv:
        with pytest.raises(KitFailure, match=r"fake:generation_tokens_total rose by 132 but 4 "
                                             r"requests returned 128 completion tokens"):
            metrics.check_generation_counter(srv, **LOAD)


def test_generation_counter_that_lags_forever_fails_at_the_deadline():
    with fake_engine(counter_skew=-1) as srv:
        with pytest.raises(KitFailure, match="rose by 124 but 4 requests returned 128"):
            metrics.check_generation_counter(srv, **LOAD, deadline_s=0.1)


def test_a_starved_sampler_is_reported_as_such_not_as_a_dead_gauge():
    # Load that ends within one scrape interval: the sampler sees it once per
    # round, too few times to call the gauge dead -- the kit says it could not tell.
    with fake_engine(bad_rank=0) as srv:
        with pytest.raises(KitFailure, match=r"only [1-4] scrapes while load ran \(3 rounds\): "
                                             r"the sampler was starved"):
            metrics.check_gauges_return_to_zero(srv, requests=1, concurrency=1, max_tokens=1)
