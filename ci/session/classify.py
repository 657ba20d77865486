"""Whose fault a failed test is -- ``infra``, ``engine`` or ``test`` -- decided from evidence, never names.

Evidence is what kiln already keeps: the exception chain (a pull's error
class, the launch watch's timeout with the log's progress, the GPU-memory
ledger's refusal, NVML, the port and device allocators, the kits' typed
engine faults), the engine's log written while the test ran, and whether the
engine exited under it. It is weighed in a fixed order, the first match wins:

1. ``infra``: the runner, the registry or the hardware -- an image pull, a
   launch timeout while the engine's log still advanced, leftover GPU memory
   at launch, a GPU fault (Xid, ECC, illegal memory access, NVML lost device),
   the runner out of disk or memory, a port or device unavailable.
2. ``engine``: the server exited or crashed (before ready, or under the test),
   a crash signature in its log, a 5xx, a broken protocol, a hang past the
   request timeout -- or a launch that timed out with a silent log.
3. ``test``: anything else -- an assertion or a kit's bound that failed
   against a healthy server.

Infra comes first because its evidence explains the rest: a GPU that fell off
the bus also makes the engine crash and the assertion fail. vllm #57372's root
causes (step timeout while progressing 31 %, GPU fault 24 %, pull 8 %, leftover
memory 2.5 %) are each one rule here. Pure: no pytest; the plugin collects the
evidence (ci/session/outcomes.py).
"""
from __future__ import annotations

import errno
import re
import sys
from dataclasses import dataclass
from typing import Iterator

import requests

from ci.engine.crashwatch import crash_signature
from ci.engine.server import ServerExited, ServerTimeout, StaleServer
from ci.host.alloc import NoCapacity
from ci.host.gpu import GpuDiscoveryError, TelemetryError
from ci.host.gpumem import DeviceHeld, ReleaseError
from ci.host.ports import PortError
from ci.kits.client import EngineFault, KitFailure
from ci.report.outcome import ENGINE, INFRA, TEST
from ci.text import ansi

# A launch whose log grew this recently before its deadline was still working
# (loading weights, compiling, capturing graphs: vLLM logs each stage, and on a
# loaded 2-core runner its quietest stretch measured ~25 s), so the timeout is
# the runner's: too slow, not hung. Silent for longer, the engine is stuck.
STILL_PROGRESSING_S = 60.0
# A reason is one line in a JUnit property and a report list.
MAX_REASON_CHARS = 240
# Exception chains are short; this bounds a pathological (self-referencing) one.
MAX_CHAIN = 32

# GPU hardware and driver faults, as the driver (Xid, NVRM), CUDA and NVML word
# them in an engine's log. Checked before the engine's crash signatures: such a
# crash is the machine's, and retrying on a fresh server is the remedy.
GPU_FAULTS = (
    ("Xid", re.compile(r"\bNVRM: Xid\b|\bXid \(PCI:|\bXid[: ]+\d+")),
    ("ECC error", re.compile(r"(?i)uncorrectable ECC|\bECC error|CUDA_ERROR_ECC_UNCORRECTABLE")),
    ("illegal memory access", re.compile(r"(?i)an illegal memory access was encountered|CUDA_ERROR_ILLEGAL_ADDRESS")),
    ("GPU lost", re.compile(r"NVML_ERROR_GPU_IS_LOST|(?i:GPU is lost|fallen off the bus)")),
)
# The runner, not the engine: a full disk, exhausted RAM, a taken port.
RUNNER_FAULTS = (
    ("out of disk", re.compile(r"No space left on device|Disk quota exceeded")),
    ("out of memory", re.compile(r"Cannot allocate memory|\[Errno 12\]")),
    ("port unavailable", re.compile(r"Address already in use|\[Errno 98\]")),
)
_RUNNER_ERRNOS = {
    errno.ENOSPC: "runner out of disk", errno.EDQUOT: "runner out of disk",
    errno.ENOMEM: "runner out of memory",
    errno.EADDRINUSE: "port unavailable", errno.EADDRNOTAVAIL: "port unavailable",
    errno.ENODEV: "device unavailable", errno.EBUSY: "device unavailable",
}
# Modules whose exceptions mean "the image pull or the Docker daemon failed".
# Looked up among the loaded modules, not imported: they need the docker SDK,
# which e2e environments lack, and an exception of theirs exists only in a
# process that loaded them.
_PULL_ERRORS = (("ci.images.pull", "PullError"), ("ci.images.docker_client", "DockerUnavailable"))


@dataclass(frozen=True)
class Verdict:
    """One failure's class and its one-line reason."""

    kind: str
    reason: str

    def line(self) -> str:
        """``infra: reason``."""
        return f"{self.kind}: {self.reason}"


@dataclass(frozen=True)
class Evidence:
    """What is known about one failure.

    ``exc``: what the test (or its setup) raised. ``log``: the engine's log
    written while the test ran (for a launch failure, the launch's log).
    ``server_exit``: the engine's exit code when it exited on its own under
    the test, None while it runs or when kiln stopped it. ``served``: the test
    had a server (so a plain failure was "against a healthy server").
    """

    exc: BaseException | None = None
    log: str = ""
    server_exit: int | None = None
    served: bool = False


def chain(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc``, its causes and contexts, and an exception group's members, each once."""
    todo, seen = [exc] if exc is not None else [], set()
    while todo and len(seen) < MAX_CHAIN:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [x for x in getattr(e, "exceptions", ()) if isinstance(x, BaseException)]
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]


def _short(text: object) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= MAX_REASON_CHARS else flat[:MAX_REASON_CHARS - 1] + "…"


def _first_line(exc: BaseException) -> str:
    text = getattr(exc, "cause", None) or str(exc)
    return _short(str(text).strip().splitlines()[0] if str(text).strip() else type(exc).__name__)


def _pull_error(exc: BaseException) -> bool:
    for module, name in _PULL_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


def _scan(log: str, signatures) -> tuple[str, str] | None:
    for line in ansi.strip(log).splitlines():
        for name, rx in signatures:
            if rx.search(line):
                return name, line.strip()
    return None


def _progressing(exc: BaseException, window_s: float) -> bool:
    return isinstance(exc, ServerTimeout) and exc.log_silent_s is not None and exc.log_silent_s < window_s


def _infra(exc: BaseException, window_s: float = STILL_PROGRESSING_S) -> str | None:
    """The infra reason ``exc`` (one link of the chain) proves, or None."""
    if _pull_error(exc):
        return f"image pull/registry: {_first_line(exc)}"
    if isinstance(exc, DeviceHeld):
        return f"leftover GPU memory at launch: {_first_line(exc)}"
    if isinstance(exc, ReleaseError):
        return f"GPU memory not released: {_first_line(exc)}"
    if _progressing(exc, window_s):
        # The cause already says when the log last grew (ci/engine/server.py).
        return f"launch timeout while the engine was still progressing: {_first_line(exc)}"
    if isinstance(exc, (TelemetryError, GpuDiscoveryError)):
        fault = _scan(str(exc), GPU_FAULTS)
        what = f"GPU fault ({fault[0]})" if fault else "GPU telemetry failed"
        return f"{what} (NVML/driver): {_first_line(exc)}"
    if isinstance(exc, (PortError, StaleServer)):
        return f"port unavailable: {_first_line(exc)}"
    if isinstance(exc, NoCapacity):
        return f"device unavailable: {_first_line(exc)}"
    if isinstance(exc, MemoryError):
        return "runner out of memory: MemoryError"
    if isinstance(exc, OSError) and exc.errno in _RUNNER_ERRNOS:
        return f"{_RUNNER_ERRNOS[exc.errno]}: {_first_line(exc)}"
    return None


def _engine(exc: BaseException) -> str | None:
    """The engine reason ``exc`` (one link of the chain) proves, or None."""
    if isinstance(exc, ServerExited):
        return f"server crashed or exited at launch: {_first_line(exc)}"
    if isinstance(exc, ServerTimeout):  # not progressing: _infra took the progressing ones
        silent = "never wrote a line" if exc.log_silent_s is None else f"silent for {exc.log_silent_s:.0f} s"
        return f"launch hung (its log {silent} at the deadline): {_first_line(exc)}"
    if isinstance(exc, EngineFault):
        what = {"5xx": "answered a server error", "hung": "hung past the request timeout",
                "connection": "dropped or refused the connection", "protocol": "broke the protocol"}
        return f"server {what.get(exc.kind, exc.kind)}: {_first_line(exc)}"
    if isinstance(exc, requests.HTTPError) and exc.response is not None and exc.response.status_code >= 500:
        return f"server answered a server error: {_first_line(exc)}"
    if isinstance(exc, requests.Timeout):
        return f"server hung past the request timeout: {_first_line(exc)}"
    if isinstance(exc, requests.RequestException):  # refused, reset, chunked body cut short
        return f"server dropped or broke the connection: {_first_line(exc)}"
    return None


def _exit_words(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exited with code {code}"


def classify(evidence: Evidence, *, still_progressing_s: float = STILL_PROGRESSING_S) -> Verdict:
    """The class and reason of one failure, from ``evidence``, in the order the module docstring gives.

    ``still_progressing_s``: how recently a timed-out launch's log must have
    grown for the engine to count as still working (STILL_PROGRESSING_S).
    """
    links = list(chain(evidence.exc))
    for exc in links:
        reason = _infra(exc, still_progressing_s)
        if reason:
            return Verdict(INFRA, reason)
    found = _scan(evidence.log, GPU_FAULTS)
    if found:
        return Verdict(INFRA, f"GPU fault ({found[0]}) in the server log: {_short(found[1])}")
    found = _scan(evidence.log, RUNNER_FAULTS)
    if found:
        return Verdict(INFRA, f"runner {found[0]} (server log): {_short(found[1])}")
    for exc in links:
        if isinstance(exc, (ServerExited, ServerTimeout)):
            return Verdict(ENGINE, _engine(exc))
    if evidence.server_exit is not None:
        return Verdict(ENGINE, f"server {_exit_words(evidence.server_exit)} during the test")
    for line in ansi.strip(evidence.log).splitlines():
        name = crash_signature(line)
        if name:
            return Verdict(ENGINE, f"crash signature ({name}) in the server log while it served: "
                                   f"{_short(line.strip())}")
    for exc in links:
        reason = _engine(exc)
        if reason:
            return Verdict(ENGINE, reason)
    exc = evidence.exc
    if exc is None:
        return Verdict(TEST, "failed without an exception (pytest.fail or a hook)")
    against = " against a healthy server" if evidence.served else ""
    if isinstance(exc, KitFailure):
        return Verdict(TEST, f"kit check failed{against}: {_first_line(exc)}")
    if isinstance(exc, AssertionError):
        return Verdict(TEST, f"assertion failed{against}: {_first_line(exc)}")
    return Verdict(TEST, f"{type(exc).__name__} in the test: {_first_line(exc)}")
