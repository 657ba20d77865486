"""A gateway: a router process in front of several engine servers (issue 23, sglang #24222).

The gateway is launched like an engine -- under the supervisor, on a reserved
port, its log in a file, stopped by the same policy -- so containment,
harness death and the reaper cover it exactly as they cover engines. What
differs is readiness: a router's port opens before it would route anywhere,
so :class:`Gateway` is ready only when its *own worker list* reports every
worker it was given as healthy, and a worker that dies while it waits ends
the launch naming that worker and its log tail.

A :class:`GatewaySpec` is data, like an engine's BackendSpec: how to launch
it, where its worker list is and how to read it, and the names its process
shows (for the end-of-session leak scan). The one shipped is vllm-router, a
Rust binary inside a wheel on the package index.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import logging
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import requests

from ci.engine.backends.spec import python
from ci.engine.server import Server, ServerError, ServerExited
from ci.host import ports

log = logging.getLogger(__name__)

# vllm-router health-checks its workers every 60 s by default and marks one
# unhealthy after 3 failed checks: a SIGKILLed worker was still called healthy
# minutes later (MISSION.md, measured here). One check a second per worker is
# a GET /health on 127.0.0.1, nothing next to a decode step.
HEALTH_CHECK_INTERVAL_S = 1
# Two failed checks in a row take a worker out: one slow answer from a busy
# 2-core runner does not flap it, a dead one is out within ~2 intervals.
HEALTH_FAILURE_THRESHOLD = 2
# At start vllm-router waits for its workers, checking every 30 s by default;
# kiln starts it only after every worker answered its own health check, so a
# first check that misses must not cost 30 s.
WORKER_STARTUP_CHECK_INTERVAL_S = 1
# A router exits on SIGTERM at once (measured: graceful shutdown < 0.1 s); a
# longer grace only delays the SIGKILL of a wedged one.
GATEWAY_GRACE_S = 5.0
# How much of an unreadable worker-list answer goes into the progress line.
ANSWER_EXCERPT_CHARS = 120


class GatewayLaunch(NamedTuple):
    """What one gateway launch is given: its ports, its workers, its routing policy."""

    port: int
    metrics_port: int
    worker_urls: tuple[str, ...]
    policy: str
    args: tuple[str, ...]
    startup_timeout_s: float


@dataclasses.dataclass(frozen=True)
class GatewaySpec:
    """How to launch one kind of gateway and read its worker list."""

    name: str
    # Run as ``python -m <module>`` with kiln's interpreter, where its wheel is
    # installed (no PATH lookup: the session venv's bin is not always on PATH).
    module: str
    distributions: tuple[str, ...]
    policies: tuple[str, ...]
    default_policy: str
    # The gateway's own list of workers and their health.
    workers_path: str
    # Parses ``workers_path``'s JSON into {worker URL: healthy}.
    read_health: Callable[[Any], dict[str, bool]]
    argv: Callable[[GatewayLaunch], list[str]]
    # What its processes show in their name or command line (the leak scan).
    process_names: tuple[str, ...]

    def version(self) -> str | None:
        """The installed gateway version in this interpreter, or None."""
        for dist in self.distributions:
            try:
                return importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
        return None

    def installed(self) -> bool:
        """Whether ``python -m <module>`` can start here."""
        return importlib.util.find_spec(self.module.split(".")[0]) is not None


def _vllm_router_health(body: Any) -> dict[str, bool]:
    # GET /workers: {"workers": [{"url": ..., "is_healthy": bool, ...}], "total": N}
    return {str(w["url"]).rstrip("/"): bool(w["is_healthy"]) for w in body["workers"]}


def _vllm_router_argv(launch: GatewayLaunch) -> list[str]:
    return [python(), "-m", "vllm_router.launch_router",
            "--host", "127.0.0.1", "--port", str(launch.port),
            "--worker-urls", *launch.worker_urls, "--policy", launch.policy,
            # Its Prometheus listener defaults to port 29000 on every router:
            # two routers on one host (two jobs) would collide. A reserved one.
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(launch.metrics_port),
            "--health-check-interval-secs", str(HEALTH_CHECK_INTERVAL_S),
            "--health-failure-threshold", str(HEALTH_FAILURE_THRESHOLD),
            "--worker-startup-check-interval", str(WORKER_STARTUP_CHECK_INTERVAL_S),
            "--worker-startup-timeout-secs", str(max(1, int(launch.startup_timeout_s))),
            *launch.args]


VLLM_ROUTER = GatewaySpec(
    name="vllm-router",
    module="vllm_router.launch_router",
    distributions=("vllm-router",),
    policies=("round_robin", "random", "cache_aware", "power_of_two", "consistent_hash",
              "kv_aware", "sticky_least_loaded"),
    default_policy="round_robin",
    workers_path="/workers",
    read_health=_vllm_router_health,
    argv=_vllm_router_argv,
    # launch_router.py calls setproctitle("vllm::router"), erasing its command
    # line; before that the command line names the module.
    process_names=("vllm::router", "vllm_router"),
)

GATEWAYS: dict[str, GatewaySpec] = {g.name: g for g in (VLLM_ROUTER,)}
# Every gateway's process names, for the end-of-session leak scan.
PROCESS_NAMES: tuple[str, ...] = tuple(n for g in GATEWAYS.values() for n in g.process_names)


def get_gateway(name: str) -> GatewaySpec:
    """The gateway called ``name``; a clear error lists the known ones."""
    try:
        return GATEWAYS[name]
    except KeyError:
        raise ValueError(f"unknown gateway {name!r}; known: {', '.join(GATEWAYS)}") from None


def _not_an_engine(*_: object) -> list[str]:
    raise RuntimeError("a gateway's command comes from its GatewaySpec")


class Gateway(Server):
    """A gateway process in front of ``workers`` (started and ready servers).

    It answers the workers' API, so to a kit it is a server of the workers'
    engine (their backend's request facts, their served model); its launch,
    health path and process names are the gateway's.
    """

    def __init__(self, spec: GatewaySpec, workers: Sequence[Server], *, policy: str | None = None,
                 args: Sequence[str] = (), log_dir: Path, launch_timeout_s: float, key: str,
                 grace_s: float = GATEWAY_GRACE_S):
        if not workers:
            raise ValueError(f"gateway {spec.name}: no workers to route to")
        policy = policy or spec.default_policy
        if policy not in spec.policies:
            raise ValueError(f"gateway {spec.name}: unknown policy {policy!r}; "
                             f"known: {', '.join(spec.policies)}")
        engine = workers[0]
        backend = dataclasses.replace(
            engine.backend, name=spec.name, argv=_not_an_engine, health_path=spec.workers_path,
            env=(), distributions=spec.distributions, process_names=spec.process_names, metrics_flag=None)
        super().__init__(backend, engine.model, args=args, log_dir=log_dir, launch_timeout_s=launch_timeout_s,
                         key=key, grace_s=grace_s, served_name=engine.served_name)
        self.spec = spec
        self.policy = policy
        self.workers = tuple(workers)
        self._metrics_port: ports.Reservation | None = None

    @property
    def command(self) -> list[str]:
        metrics = self._metrics_port.port if self._metrics_port is not None else 0
        return self.spec.argv(GatewayLaunch(self.port, metrics, tuple(w.base_url for w in self.workers),
                                            self.policy, self.args, self.launch_timeout_s))

    def _launch(self) -> None:
        if not self.spec.installed():
            raise ServerError(f"gateway {self.spec.name} is not installed in {python()}: the session's "
                              f"requirements must carry {self.spec.distributions[0]} "
                              f"(requirements/e2e-cpu.txt pins it)")
        self._metrics_port = ports.reserve()
        super()._launch()

    def _judge_health(self, resp: requests.Response) -> tuple[bool, str]:
        """Ready when the gateway's own worker list calls every one of our workers healthy."""
        if resp.status_code != 200:
            return False, f"HTTP {resp.status_code}"
        try:
            health = self.spec.read_health(resp.json())
        except (ValueError, KeyError, TypeError, AttributeError):
            return False, f"unreadable worker list: {' '.join(resp.text.split())[:ANSWER_EXCERPT_CHARS]!r}"
        urls = [w.base_url for w in self.workers]
        waiting = [u for u in urls if not health.get(u)]
        if waiting:
            return False, f"{len(urls) - len(waiting)} of {len(urls)} workers healthy; not yet {', '.join(waiting)}"
        return True, f"all {len(urls)} workers healthy"

    def _check_peers(self) -> None:
        for i, worker in enumerate(self.workers):
            code = worker.exit_code()
            if code is not None:
                raise ServerExited(f"worker {i} ({worker.key}, {worker.base_url}) exited with code {code} "
                                   f"while {self.spec.name} waited for it", worker.log_tail(), worker.log_path)

    def terminate(self) -> None:
        try:
            super().terminate()
        finally:
            if self._metrics_port is not None:
                self._metrics_port.release()
