"""Step-occupancy kit (ci/kits/steps.py) against the fake engine's timed steps and vLLM's real log lines."""
from __future__ import annotations

import pytest

from ci.engine.backends import VLLM_CPU
from ci.kits import steps
from ci.kits.client import KitFailure
from tests.fakes.openai_engine import FAKE_BACKEND, FAKE_VLLM_LIKE, fake_engine

# Lines as vLLM-CPU 0.32.0 wrote them with --enable-logging-iteration-details
# (a server log of `nox -s e2e-cpu`), with the other lines a log holds.
REAL_LOG = """\
(APIServer pid=4242) INFO 12-01 04:21:07 [loggers.py:199] Engine 000: Iteration(7): 1 context requests, 15 context tokens, 0 generation requests, 0 generation tokens, iteration elapsed time: 21.37 ms, CPU KV cache usage: 0.2%
(APIServer pid=4242) INFO:     127.0.0.1:40112 - "POST /v1/completions HTTP/1.1" 200 OK
(APIServer pid=4242) INFO 12-01 04:21:07 [loggers.py:199] Engine 000: Iteration(8): 0 context requests, 0 context tokens, 1 generation requests, 1 generation tokens, iteration elapsed time: 4.02 ms, CPU KV cache usage: 0.2%
(APIServer pid=4242) INFO 12-01 04:21:07 [loggers.py:199] Engine 000: Iteration(9): 0 context requests, 0 context tokens, 1 generation requests, 1 generation tokens, iteration elapsed time: 3.98 ms, CPU KV cache usage: 0.2%
"""
TOKENS = 60
STEP_S = 0.004


def test_parses_vllms_own_iteration_lines():
    got = steps.parse_steps(REAL_LOG, VLLM_CPU.step_timer.pattern)
    assert [(s.index, s.gen_tokens) for s in got] == [(7, 0), (8, 1), (9, 1)]
    assert got[1].elapsed_s == pytest.approx(0.00402)


def test_a_trailing_line_of_the_previous_request_is_not_counted():
    got = steps.request_steps(steps.parse_steps(
        REAL_LOG.replace("Iteration(7): 1 context", "Iteration(6): 0 context requests, 0 context "
                         "tokens, 1 generation requests, 1 generation tokens, iteration elapsed "
                         "time: 9.00 ms, CPU KV cache usage: 0.2%\n(APIServer pid=4242) INFO "
                         "12-01 04:21:07 [loggers.py:199] Engine 000: Iteration(7): 1 context"),
        VLLM_CPU.step_timer.pattern))
    assert [s.index for s in got] == [8, 9]


def test_vllm_backends_turn_the_timer_on_with_the_cpu_profile():
    from ci.profiles import runners
    assert VLLM_CPU.step_timer.flag in runners.get_profile("cpu").server_args


def test_healthy_engine_passes_and_prints_its_figure(tmp_path, capsys):
    with fake_engine(backend=FAKE_VLLM_LIKE, step_log=tmp_path / "server.log", step_s=STEP_S) as srv:
        (tmp_path / "server.log").write_text("engine started\n")
        got = steps.check_step_occupancy(srv, threshold=0.7, long_max_tokens=TOKENS, min_steps=16)
    assert got.busy > 0.7 and len(got.steps) == TOKENS - 1
    assert "step occupancy" in capsys.readouterr().out


def test_engine_idling_between_steps_fails(tmp_path):
    # 4 ms steps with 8 ms idle after each: ~1/3 of the decode span in steps.
    with fake_engine(backend=FAKE_VLLM_LIKE, step_log=tmp_path / "server.log", step_s=STEP_S,
                     stream_delay_s=2 * STEP_S) as srv:
        (tmp_path / "server.log").write_text("")
        with pytest.raises(KitFailure, match=r"^step occupancy 0\.[0-5]\d* < threshold 0.7: the "
                                             r"engine idled between steps"):
            steps.check_step_occupancy(srv, threshold=0.7, long_max_tokens=TOKENS, min_steps=16)


def test_slow_steps_without_idling_pass(tmp_path):
    # Three times slower steps, no gap: slow is not idle (the gauge kit cannot tell them apart).
    with fake_engine(backend=FAKE_VLLM_LIKE, step_log=tmp_path / "server.log",
                     step_s=3 * STEP_S) as srv:
        (tmp_path / "server.log").write_text("")
        got = steps.check_step_occupancy(srv, threshold=0.7, long_max_tokens=TOKENS // 2,
                                         min_steps=16)
    assert got.busy > 0.7


def test_timer_off_fails_naming_the_flag(tmp_path):
    # A log with no step lines: the server was started without the flag.
    log = tmp_path / "server.log"
    log.write_text("INFO engine started\n")
    with fake_engine(backend=FAKE_VLLM_LIKE, token_delay_s=0.001) as srv:
        srv.knobs.step_log = None
        srv_log = type("WithLog", (), {"log_path": log, "backend": srv.backend,
                                       "base_url": srv.base_url, "served_model": srv.served_model})()
        with pytest.raises(KitFailure, match=r"--enable-logging-iteration-details"):
            steps.check_step_occupancy(srv_log, threshold=0.7, long_max_tokens=TOKENS,
                                       min_steps=16, log_deadline_s=0.3)


def test_engine_without_a_step_timer_fails_naming_it(tmp_path):
    with fake_engine(backend=FAKE_BACKEND) as srv:
        with pytest.raises(KitFailure, match=r"^fake reports no per-step timing"):
            steps.check_step_occupancy(srv, threshold=0.7)
