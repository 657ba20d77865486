"""``Server``: the life of one real inference server, from launch to nothing left.

Launch under a supervisor (ci/host/procs.py) -> log to a file -> poll health
(per-request timeout, overall deadline, early exit detection) -> serve -> stop
the supervised tree -> port free ->
device memory back. The log tail is logged on every exit path, success
included, so a red job always carries the engine's last words.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import requests

from ci.engine.backends import BackendSpec
from ci.engine.keys import ServerKey  # noqa: F401  (re-exported: the launch path's key)
from ci.host import gpu, ports, procs
from ci.text import logtail

log = logging.getLogger(__name__)

# One health request may take this long. Short, because a listener that
# accepts and never answers must not stall crash detection or the deadline.
HEALTH_REQUEST_TIMEOUT_S = 1.0
# Between health polls: bounds the poll count (503-forever servers get
# deadline / interval requests, not a busy spin).
HEALTH_POLL_INTERVAL_S = 0.25
# How often the launcher looks at the process while waiting: an engine that
# exits before ready is reported well within the promised 1 s.
EXIT_CHECK_INTERVAL_S = 0.05
DEFAULT_LAUNCH_TIMEOUT_S = 240.0
# A launch may wait up to 600 s; a silent CI log that long looks hung. Issue 14:
# a line at least every 15 s; 10 s keeps that promise on a loaded runner.
PROGRESS_INTERVAL_S = 10.0
DEFAULT_TAIL_LINES = logtail.DEFAULT_LINES


class ServerError(RuntimeError):
    """A launch or stop failed. ``cause`` is one line; ``tail`` the engine's last log lines."""

    def __init__(self, cause: str, tail: str = "", log_path: Path | None = None):
        self.cause = cause
        self.tail = tail
        self.log_path = log_path
        where = f" (log: {log_path})" if log_path else ""
        super().__init__(f"{cause}{where}\n--- last log lines ---\n{tail}" if tail else cause + where)


class ServerExited(ServerError):
    """The engine exited before it was ready (any exit code, 0 included)."""


class ServerTimeout(ServerError):
    """The engine was not ready by the launch deadline.

    ``log_silent_s`` is how long its log had been silent at the deadline (None:
    it never wrote a line): an engine whose log still advanced was working --
    a cold compile, a slow disk -- not hung, and that decides whose fault the
    timeout is (ci/session/classify.py; vllm #57372 counts it as the largest
    share of red jobs that pass on retry).
    """

    def __init__(self, cause: str, tail: str = "", log_path: Path | None = None, *,
                 log_silent_s: float | None = None):
        super().__init__(cause, tail, log_path)
        self.log_silent_s = log_silent_s


class StaleServer(ServerError):
    """The port answered, but the listener is not a process of ours."""


class LaunchAborted(ServerError):
    """The launch was called off from outside (a sibling of a topology failed first)."""


class MemoryGuard(Protocol):
    """Device-memory bookkeeping a Server delegates to (ci.host.gpumem on GPU runners)."""

    def before_launch(self, devices: Sequence[int]) -> None: ...

    def wait_released(self, devices: Sequence[int], owner: str = "") -> object: ...


@dataclass
class ServerRecord:
    """Timeline and facts of one server, for the report (reports/servers-<session>.json)."""

    key: str
    model: str
    tp: int
    devices: list[int]
    log_path: str
    port: int | None = None
    launched: float | None = None
    ready: float | None = None
    stopped: float | None = None
    memory_free: float | None = None
    tests: list[str] = field(default_factory=list)
    error: str | None = None
    warm_dependent: bool = False
    # How the tree was contained and what its stop took: the report says when
    # an engine needed SIGKILL (a wedged or stopped engine), naming what was hit.
    containment: str | None = None
    stop_seconds: float | None = None
    stop_killed: list[str] = field(default_factory=list)
    # Parts it played in topologies ("worker 0 of vllm-router:round_robin x2 ..."):
    # an engine lent to a topology keeps its own key.
    roles: list[str] = field(default_factory=list)
    # Typed failures of the tests this server served (ci/session/classify.py):
    # {"test": nodeid, "class": test|engine|infra, "reason": one line}.
    failures: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class Server:
    """One engine process tree on one reserved port.

    ``Server(backend, model, ...).start()`` returns when ``health`` answers
    200 from a listener of ours, or raises a ServerError carrying the cause
    and the log tail. ``stop()`` is idempotent and safe after a failed start.
    """

    def __init__(
        self,
        backend: BackendSpec,
        model: str,
        *,
        tp: int = 1,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        log_dir: Path,
        launch_timeout_s: float = DEFAULT_LAUNCH_TIMEOUT_S,
        devices: Sequence[int] = (),
        vendor: str | None = None,
        memory: MemoryGuard | None = None,
        key: str | None = None,
        tail_lines: int = DEFAULT_TAIL_LINES,
        grace_s: float = procs.DEFAULT_GRACE_S,
        warm_dependent: bool = False,
        served_name: str | None = None,
    ):
        if launch_timeout_s <= 0:
            raise ValueError(f"launch_timeout_s must be > 0, got {launch_timeout_s}")
        self.backend = backend
        self.model = model
        self.tp = tp
        self.args = tuple(args)
        self.served_name = served_name
        self.extra_env = dict(env or {})
        self.requested_port = port
        self.launch_timeout_s = launch_timeout_s
        self.devices = tuple(devices)
        self.vendor = vendor
        self.memory = memory
        self.key = key or str(ServerKey(model, tp, self.args))
        self.tail_lines = tail_lines
        self.grace_s = grace_s
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.key)[:80]
        self.log_path = Path(log_dir) / f"server-{safe}-{procs.new_tag('')[1:9]}.log"
        self.record = ServerRecord(key=self.key, model=model, tp=tp, devices=list(self.devices),
                                   log_path=str(self.log_path), warm_dependent=warm_dependent)
        self.tree: procs.ProcessTree | None = None
        self._reservation: ports.Reservation | None = None
        self._stop_lock = threading.Lock()
        self._terminated = False
        self._finished = False
        self._abort: str | None = None
        self.health_polls = 0

    # -- facts -----------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._reservation is None:
            raise RuntimeError("server has no port: start() it first")
        return self._reservation.port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def served_model(self) -> str:
        """The model id API requests must name: the served name, else --model's (vLLM and SGLang
        serve the path by default)."""
        return self.served_name or self.model

    @property
    def command(self) -> list[str]:
        return self.backend.command(self.model, self.port, self.tp, self.args, served_name=self.served_name)

    def launched(self) -> bool:
        """True once the engine's process tree exists (a crash watch may then stop it)."""
        return self.tree is not None

    def exit_code(self) -> int | None:
        """The engine's exit code once its root has exited; None while it runs or before launch."""
        return self.tree.poll() if self.tree is not None else None

    def note_error(self, text: str) -> None:
        """Record why this server went wrong (the report shows it beside the server)."""
        self.record.error = text

    def note_failure(self, nodeid: str, failure_class: str, reason: str) -> None:
        """Record a typed failure of a test this server served (the report's server record)."""
        self.record.failures.append({"test": nodeid, "class": failure_class, "reason": reason})

    @property
    def stopped_by_harness(self) -> bool:
        """True once kiln began stopping this server: its exit then is no crash."""
        return self._terminated

    def note_test(self, nodeid: str) -> None:
        """Record a test this server served (for the report)."""
        self.record.tests.append(nodeid)

    def record_dict(self) -> dict:
        """This server's record, as the report reads it from servers-<session>.json."""
        return self.record.to_dict()

    def log_tail(self, n: int | None = None) -> str:
        return logtail.read_tail(self.log_path, n or self.tail_lines)

    def _show_tail(self, event: str) -> None:
        log.info("server %s %s; last %d log lines of %s:\n%s", self.key, event, self.tail_lines,
                 self.log_path, self.log_tail())

    # -- launch ----------------------------------------------------------------
    def start(self) -> "Server":
        """Launch and wait until ready; on any failure stop what was started, then raise."""
        try:
            self._launch()
            self._wait_ready()
        except BaseException as exc:
            self.record.error = getattr(exc, "cause", None) or f"{type(exc).__name__}: {exc}"
            self._show_tail("failed to start")
            try:
                self.stop()
            except Exception:  # the launch error is the one to report; stop logs its own
                log.exception("cleanup after failed start of %s also failed", self.key)
            raise
        self._show_tail("is ready")
        return self

    def _launch(self) -> None:
        if self.memory is not None and self.devices:
            self.memory.before_launch(self.devices)
        self._reservation = (ports.hold(self.requested_port) if self.requested_port
                             else ports.reserve())
        self.record.port = self._reservation.port
        env = dict(os.environ)
        env.update(dict(self.backend.env))
        env.update(self.extra_env)
        if self.vendor in ("nvidia", "amd"):
            # Applied last, to the merged env: an inherited HIP/ROCR/CUDA
            # variable must not widen the set the pool allocated.
            env = gpu.child_env(env, self.vendor, self.devices)
        self.record.launched = time.time()
        self.tree = procs.ProcessTree.spawn(self.command, log_path=self.log_path, env=env)
        self.record.containment = self.tree.mechanism
        log.info("launched %s (pid %d, port %d, %s): %s", self.key, self.tree.pid, self.port,
                 self.tree.mechanism, shlex.join(self.command))

    def abort_launch(self, reason: str) -> None:
        """Call off a launch in progress from another thread: ``start()`` stops the tree and raises
        LaunchAborted within EXIT_CHECK_INTERVAL_S. Stopping it from here instead would race the
        spawn (a tree spawned after the stop would be nobody's)."""
        self._abort = reason

    def _judge_health(self, resp: requests.Response) -> tuple[bool, str]:
        """(ready, what to log) for one health answer; an engine is ready on HTTP 200."""
        return resp.status_code == 200, f"HTTP {resp.status_code}"

    def _check_peers(self) -> None:
        """Raise a ServerError when something this server depends on has died (a gateway's workers)."""

    def _wait_ready(self) -> None:
        assert self.tree is not None
        changed = threading.Event()
        quit_probe = threading.Event()
        state: dict = {"ready": False, "last": "no answer yet"}
        url = self.base_url + self.backend.health_path

        def probe() -> None:
            # Runs in a thread so a request that hangs for its whole timeout
            # never delays noticing that the process died.
            with requests.Session() as http:
                while not quit_probe.is_set():
                    self.health_polls += 1
                    try:
                        resp = http.get(url, timeout=HEALTH_REQUEST_TIMEOUT_S)
                        ready, state["last"] = self._judge_health(resp)
                        if ready:
                            state["ready"] = True
                            changed.set()
                            return
                    except requests.RequestException as exc:
                        state["last"] = type(exc).__name__
                    quit_probe.wait(HEALTH_POLL_INTERVAL_S)

        prober = threading.Thread(target=probe, name=f"health-{self.port}", daemon=True)
        prober.start()
        started = time.monotonic()
        deadline = started + self.launch_timeout_s
        next_note = started + PROGRESS_INTERVAL_S
        log_size, log_grew = 0, None  # when the log last grew: evidence of progress at a timeout
        try:
            while True:
                size = self.log_size()
                if size > log_size:
                    log_size, log_grew = size, time.monotonic()
                if time.monotonic() >= next_note:
                    next_note += PROGRESS_INTERVAL_S
                    last_line = (logtail.read_tail(self.log_path, 1) or "(empty)").strip()
                    log.info("waiting for %s: %.0f s of %.0f s; health: %s; last log line: %s", self.key,
                             time.monotonic() - started, self.launch_timeout_s, state["last"], last_line)
                code = self.tree.poll()
                if code is not None:
                    raise ServerExited(f"{self.backend.name} exited with code {code} before it was "
                                       f"ready ({time.time() - self.record.launched:.1f} s after launch)",
                                       self.log_tail(), self.log_path)
                if self._abort is not None:
                    raise LaunchAborted(f"launch of {self.key} called off: {self._abort}",
                                        self.log_tail(), self.log_path)
                self._check_peers()
                if state["ready"]:
                    self._check_listener_is_ours()
                    self.record.ready = time.time()
                    return
                now = time.monotonic()
                if now >= deadline:
                    silent = None if log_grew is None else now - log_grew
                    raise ServerTimeout(
                        f"{self.backend.name} not ready after {self.launch_timeout_s:.0f} s "
                        f"({self.health_polls} health polls; last: {state['last']}; its log "
                        + ("never got a line)" if silent is None else f"last grew {silent:.1f} s before)"),
                        self.log_tail(), self.log_path, log_silent_s=silent)
                changed.wait(EXIT_CHECK_INTERVAL_S)
        finally:
            quit_probe.set()
            prober.join(HEALTH_REQUEST_TIMEOUT_S + 1)

    def log_size(self) -> int:
        """Bytes in the server's log now (0 before it exists): where a test's window of it starts."""
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _check_listener_is_ours(self) -> None:
        assert self.tree is not None
        listeners = ports.holders(self.port)
        if not listeners:
            return  # no socket table visible (not root): health 200 is all we can know
        ours = {p.pid for p in self.tree.members()}
        if not any(p.pid in ours for p in listeners):
            raise StaleServer(
                f"port {self.port} answered health, but its listener is not ours: "
                f"{procs.describe(listeners)} (a stale server from an earlier run?)",
                self.log_tail(), self.log_path)

    # -- stop ------------------------------------------------------------------
    def terminate(self) -> None:
        """Stop the process tree and free the port (no device-memory wait). Idempotent."""
        with self._stop_lock:
            if self._terminated:
                return
            self._terminated = True
            try:
                if self.tree is not None:
                    report = self.tree.stop(self.grace_s)
                    self.record.stop_seconds = round(report.seconds, 3)
                    self.record.stop_killed = list(report.killed_names)
                    log.info("stopped %s in %.2f s (exit %s%s)", self.key, report.seconds,
                             report.exit_code,
                             f", needed SIGKILL: {', '.join(report.killed_names)}"
                             if report.killed_names else "")
                if self._reservation is not None and self.tree is not None:
                    ports.wait_free(self._reservation.port)
            finally:
                self.record.stopped = time.time()
                if self._reservation is not None:
                    self._reservation.release()
                if self.tree is not None:
                    self._show_tail("stopped")

    def wait_memory(self) -> None:
        """Wait until the devices this server used are back to their baseline."""
        wait_memory_together([self])

    def stop(self) -> None:
        """Terminate, then wait for device memory. Safe to call any number of times."""
        self.terminate()
        self.wait_memory()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_memory_together(servers: Sequence[Server]) -> None:
    """One device-memory wait for every device of ``servers`` (all stopped, one memory guard).

    vllm #41166 waited per server and lost minutes per data-parallel group;
    the trees are already dead here, so one poll loop over the union of
    their devices judges them all. Each server is waited for once, whatever
    calls this; ``memory_free`` is stamped only when the wait succeeded.
    """
    pending = [s for s in servers if not s._finished]
    for s in pending:
        s._finished = True
    held = [s for s in pending if s.memory is not None and s.devices and s.tree is not None]
    if held:
        guard = held[0].memory
        if any(s.memory is not guard for s in held):
            raise ValueError("wait_memory_together: servers with different memory guards")
        devices = sorted({d for s in held for d in s.devices})
        guard.wait_released(devices, owner=", ".join(s.key for s in held))
    now = time.time()
    for s in pending:
        s.record.memory_free = now
