"""Whose fault a failure is: each rule of ci/session/classify.py on evidence the real code produces.

Exceptions come from kiln's own code paths wherever they can run here (the
release ledger, the port reservations, the kits' client against a local HTTP
server, a write to /dev/full); log lines are the engines' and drivers' own
wording. The order matters as much as the rules: infra evidence beats an
engine crash it caused, and both beat the assertion that noticed.
"""
from __future__ import annotations

import errno
import json
import time
from http.server import BaseHTTPRequestHandler

import pytest
import requests

from ci.engine.server import ServerExited, ServerTimeout
from ci.host import gpumem, ports
from ci.host.gpu_telemetry import NvmlTelemetry
from ci.kits.client import EngineClient, EngineFault, KitFailure
from ci.report.outcome import ENGINE, INFRA, TEST
from ci.session.classify import Evidence, chain, classify
from ci.session.pool import PoolError
from tests.fakes.nvml import NVML_ERROR_GPU_IS_LOST, FakeGpu, FakeNvml
from tests.localhttp import closed_port, serving

# The wording of real faults, as their sources print them.
XID_LINE = "[12345.678] NVRM: Xid (PCI:0000:18:00): 79, pid=1234, GPU has fallen off the bus."
IAM_LINE = ("(EngineCore pid=77) ERROR RuntimeError: CUDA error: an illegal memory access was encountered\n"
            "CUDA kernel errors might be asynchronously reported at some other API call")
ECC_LINE = "torch.AcceleratorError: CUDA error: uncorrectable ECC error encountered"
TRACEBACK_LOG = ("(APIServer pid=9) ERROR [serving.py:500] Error in completion stream generator.\n"
                 "(APIServer pid=9) ERROR [serving.py:500] Traceback (most recent call last):\n"
                 "(APIServer pid=9) ERROR vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.")


def _raised(fn):
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 (the evidence is whatever it raised)
        return exc
    raise AssertionError("expected an exception")


def test_an_assertion_against_a_healthy_server_is_the_tests():
    v = classify(Evidence(_raised(lambda: _assert_equal(2, 3)), served=True))
    assert (v.kind, v.reason) == (TEST, "assertion failed against a healthy server: 2 != 3")
    assert classify(Evidence(_raised(lambda: _assert_equal(2, 3)))).reason == "assertion failed: 2 != 3"
    kit = classify(Evidence(KitFailure("throughput 41.0 tok/s < 900 (measured)\nmore lines"), served=True))
    assert kit.kind == TEST and kit.reason == (
        "kit check failed against a healthy server: throughput 41.0 tok/s < 900 (measured)")
    assert classify(Evidence(KeyError("choices"))).reason == "KeyError in the test: 'choices'"


def _assert_equal(a, b):
    assert a == b, f"{a} != {b}"


def test_a_full_disk_or_memory_is_the_runners():
    full = _raised(_write_to_a_full_device)  # Linux's /dev/full: every write is ENOSPC
    assert isinstance(full, OSError) and full.errno == errno.ENOSPC
    assert classify(Evidence(full)).kind == INFRA
    assert classify(Evidence(full)).reason.startswith("runner out of disk: ")
    assert classify(Evidence(MemoryError())).reason == "runner out of memory: MemoryError"
    assert classify(Evidence(None, log="OSError: [Errno 28] No space left on device")).kind == INFRA


def _write_to_a_full_device():
    with open("/dev/full", "w") as fh:
        fh.write("x")
        fh.flush()


def test_leftover_gpu_memory_at_launch_is_infra(tmp_path):
    ledger = gpumem.ReleaseLedger(tmp_path)
    ledger.record([gpumem.Held(0, 0, 3 * gpumem.GIB, (4242,), "still held after 60s", "m|tp=1|", time.time())])
    held = _raised(lambda: ledger.check_launchable([0]))
    v = classify(Evidence(held))
    assert v.kind == INFRA
    assert v.reason.startswith("leftover GPU memory at launch: refusing to launch: GPU 0 not released after "
                                  "stopping m|tp=1|: 3.00 GiB")


def test_a_lost_gpu_from_nvml_is_a_gpu_fault():
    lost = FakeNvml([FakeGpu("GPU-0")], query_error=NVML_ERROR_GPU_IS_LOST)
    err = _raised(lambda: _read(NvmlTelemetry(lost)))
    v = classify(Evidence(err))
    assert v.kind == INFRA and v.reason.startswith("GPU fault (GPU lost) (NVML/driver): nvml: cannot read")


def _read(telemetry):
    with telemetry:
        telemetry.used_bytes([0])


@pytest.mark.parametrize("line, fault", [(XID_LINE, "Xid"), (IAM_LINE, "illegal memory access"),
                                         (ECC_LINE, "ECC error")])
def test_gpu_faults_in_the_log_beat_the_crash_and_the_assertion_they_caused(line, fault):
    # The engine crashed (exit 1, a traceback) and the test's assertion failed:
    # both are consequences; the GPU fault is the cause.
    log = f"{TRACEBACK_LOG}\n{line}\n"
    v = classify(Evidence(AssertionError("no tokens"), log=log, server_exit=1))
    assert (v.kind, v.reason.split(":")[0]) == (INFRA, f"GPU fault ({fault}) in the server log")


def test_a_port_held_by_someone_else_is_infra(tmp_path, monkeypatch):
    monkeypatch.setenv(ports.LOCK_DIR_ENV, str(tmp_path))
    taken = ports.reserve()
    try:
        err = _raised(lambda: ports.hold(taken.port))
    finally:
        taken.release()
    assert isinstance(err, ports.PortError)
    assert classify(Evidence(err)).reason.startswith("port unavailable: ")
    assert classify(Evidence(None, log="OSError: [Errno 98] Address already in use")).kind == INFRA


def test_a_launch_timeout_is_infra_while_the_log_advanced_and_engine_when_it_was_silent():
    busy = ServerTimeout("vllm not ready after 240 s (960 health polls; last: HTTP 503; its log last grew 2.5 s "
                         "before)", log_silent_s=2.5)
    v = classify(Evidence(busy))
    assert v.kind == INFRA and v.reason == (
        "launch timeout while the engine was still progressing: vllm not ready after 240 s (960 health polls; "
        "last: HTTP 503; its log last grew 2.5 s before)")
    stuck = classify(Evidence(ServerTimeout("vllm not ready after 600 s", log_silent_s=300.0)))
    assert stuck.kind == ENGINE and stuck.reason.startswith("launch hung (its log silent for 300 s")
    mute = classify(Evidence(ServerTimeout("not ready", log_silent_s=None)))
    assert mute.kind == ENGINE and "never wrote a line" in mute.reason
    assert classify(Evidence(busy), still_progressing_s=1.0).kind == ENGINE


def test_a_pool_error_is_typed_by_the_first_launch_it_chains():
    first = ServerTimeout("vllm not ready after 240 s", log_silent_s=1.0)
    try:
        raise PoolError("launch of m|tp=1| already failed in this run") from first
    except PoolError as exc:
        later = exc
    assert list(chain(later)) == [later, first]
    assert classify(Evidence(later)).kind == INFRA


def test_an_engine_that_exited_or_crashed_is_the_engines():
    died = classify(Evidence(ServerExited("vllm exited with code 1 before it was ready")))
    assert died.kind == ENGINE and died.reason.startswith("server crashed or exited at launch: vllm exited")
    killed = classify(Evidence(AssertionError("stream ended"), server_exit=-9))
    assert (killed.kind, killed.reason) == (ENGINE, "server killed by signal 9 during the test")
    crashed = classify(Evidence(AssertionError("stream ended"), log=TRACEBACK_LOG))
    assert crashed.kind == ENGINE
    assert crashed.reason.startswith("crash signature (Traceback) in the server log while it served: ")
    # vLLM's benign words are no crash (ci/engine/crashwatch.py's BENIGN).
    assert classify(Evidence(AssertionError("x"), log="reducing max_m to avoid out of memory\n")).kind == TEST


class _Answer(BaseHTTPRequestHandler):
    status = 500
    body = b'{"error": "EngineCore encountered an issue"}'

    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


class _NotJson(_Answer):
    status = 200
    body = b"<html>proxy error</html>"


def test_5xx_a_broken_protocol_and_a_dropped_connection_are_the_engines():
    with serving(_Answer) as url:
        err = _raised(lambda: EngineClient(url, "m").completion("hi"))
    assert isinstance(err, EngineFault) and err.status == 500
    v = classify(Evidence(err))
    assert v.kind == ENGINE and v.reason.startswith("server answered a server error: POST /v1/completions -> HTTP 500")
    with serving(_NotJson) as url:
        v = classify(Evidence(_raised(lambda: EngineClient(url, "m").completion("hi"))))
    assert v.kind == ENGINE and v.reason.startswith("server broke the protocol: ")
    refused = _raised(lambda: EngineClient(f"http://127.0.0.1:{closed_port()}", "m").completion("hi"))
    assert classify(Evidence(refused)).reason.startswith("server dropped or refused the connection: ")
    raw = _raised(lambda: requests.get(f"http://127.0.0.1:{closed_port()}", timeout=2))
    assert classify(Evidence(raw)).kind == ENGINE


def test_a_4xx_is_the_kit_judging_the_request_not_the_engine_failing():
    class _BadRequest(_Answer):
        status = 400
        body = json.dumps({"error": "max_tokens must be positive"}).encode()
    with serving(_BadRequest) as url:
        err = _raised(lambda: EngineClient(url, "m").completion("hi"))
    assert type(err) is KitFailure and classify(Evidence(err)).kind == TEST


def test_infra_in_the_chain_beats_an_engine_error_that_wraps_it(tmp_path):
    ledger = gpumem.ReleaseLedger(tmp_path)
    ledger.record([gpumem.Held(1, 0, None, None, "telemetry failed", "", time.time())])
    try:
        try:
            ledger.check_launchable([1])
        except gpumem.DeviceHeld as held:
            raise ServerExited("launch failed") from held
    except ServerExited as exc:
        wrapped = exc
    assert classify(Evidence(wrapped)).kind == INFRA


def test_reasons_are_one_bounded_line():
    v = classify(Evidence(AssertionError("first line " + "x" * 1000 + "\nsecond line")))
    assert "\n" not in v.reason and len(v.reason) < 400 and v.reason.endswith("…")
