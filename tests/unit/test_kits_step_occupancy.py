"""Step occupancy kit: a scheduler that idles between decode steps fails; one that does not passes."""
from __future__ import annotations

import pytest

from ci.kits import step_occupancy
from ci.kits.client import KitFailure
from tests.fakes.openai_engine import FAKE_BACKEND, FAKE_VLLM_LIKE, fake_engine

FAST = dict(probes=3, gap_tokens=40)
# The fake streams its long request over ~0.8 s, so the probes land while it runs.
STREAMING = dict(backend=FAKE_VLLM_LIKE, stream_delay_s=0.02)


def test_engine_stepping_back_to_back_passes(capsys):
    with fake_engine(**STREAMING, step_s=0.004) as srv:
        result = step_occupancy.check_step_occupancy(srv, threshold=0.8, **FAST)
    assert result.ratio == pytest.approx(1.0) and result.gaps == 39
    assert "step occupancy 1.000" in capsys.readouterr().out


def test_engine_idling_between_steps_fails_though_its_running_gauge_reads_busy():
    # Idle as long as it computes: half of every decode iteration is wasted.
    with fake_engine(**STREAMING, step_s=0.004, idle_between_steps_s=0.004) as srv:
        with pytest.raises(KitFailure, match=r"^step occupancy 0\.500 < threshold 0.8: the engine "
                                             r"spends 8\.00 ms per token but a step takes 4\.00 ms"):
            step_occupancy.check_step_occupancy(srv, threshold=0.8, **FAST)


def test_missing_histogram_fails_naming_it():
    with fake_engine(**STREAMING,
                     missing_metrics=frozenset({"fake:inter_token_latency_seconds"})) as srv:
        with pytest.raises(KitFailure, match="fake:inter_token_latency_seconds_sum"):
            step_occupancy.check_step_occupancy(srv, threshold=0.8, **FAST)


def test_backend_without_the_histograms_fails_rather_than_skips():
    import dataclasses
    bare = dataclasses.replace(FAKE_BACKEND, gauges=dataclasses.replace(
        FAKE_BACKEND.gauges, step_time_hist=None, token_gap_hist=None))
    with fake_engine(backend=bare) as srv:
        with pytest.raises(KitFailure, match="names no step-time/token-gap histograms"):
            step_occupancy.check_step_occupancy(srv, threshold=0.8, **FAST)


def test_probes_after_the_long_request_ended_fail_rather_than_measure_an_idle_engine():
    with fake_engine(backend=FAKE_VLLM_LIKE) as srv:  # no delay: the stream ends at once
        with pytest.raises(KitFailure, match=r"the long request \(40 tokens\) ended before \d of "
                                             r"3 probes"):
            step_occupancy.check_step_occupancy(srv, threshold=0.8, **FAST)
