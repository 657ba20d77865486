"""Scheduler-stress kit against the fake engine."""
from __future__ import annotations

import pytest

from ci.kits import stress
from ci.kits.client import KitFailure
from tests.fakes.openai_engine import fake_engine


def test_concurrent_and_streaming_load_pass(capsys):
    with fake_engine(token_delay_s=0.001) as srv:
        outcomes = stress.check_concurrent(srv, requests=12, concurrency=4)
        stress.check_streaming_under_load(srv, requests=12, concurrency=4)
        assert srv.state.requests == 24 and srv.wait_idle() == 0
    assert [o.completion_tokens for o in outcomes] == [stress.MAX_TOKENS] * 12
    assert "12/12 succeeded" in capsys.readouterr().out


def test_one_failing_request_in_many_fails_the_kit():
    with fake_engine(fail_every=5) as srv:
        with pytest.raises(KitFailure, match=r"12 concurrent completions: 2/12 requests failed; "
                                             r"first \(request \d+\): POST /v1/completions -> HTTP 500"):
            stress.check_concurrent(srv, requests=12, concurrency=4)


def test_streams_without_done_under_load_fail():
    with fake_engine(stream_done=False) as srv:
        with pytest.raises(KitFailure, match=r"12/12 requests failed; .*without \[DONE\]"):
            stress.check_streaming_under_load(srv, requests=12, concurrency=4)
