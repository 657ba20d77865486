"""Topologies: several servers of one key, with a gateway in front when asked, as one unit.

Two source PRs are about more than one server: sglang #24222 (a router in
front of several workers) and vllm #41166 (data-parallel groups). A
:class:`TopologyKey` says what a test needs -- N workers of one ServerKey,
and a gateway (``vllm-router``) with a routing policy, or none: then the N
servers are data-parallel replicas behind an external load balancer (the
test, or a kit, balances). A single server with the engine's own
``--data-parallel-size`` is a plain ServerKey; :func:`gpus_per_server` counts
its ranks.

Order (:meth:`Topology.start`): every worker launched in parallel, each ready
by its own health check; the first one to fail calls the others off and the
launch fails naming it, with its log tail; then the gateway, pointed at them,
ready only when its own worker list reports every one healthy
(ci/engine/gateway.py). Teardown: the gateway first, then every worker in one
``stop_many`` with one device-memory wait (ci/engine/teardown.py).
"""
from __future__ import annotations

import concurrent.futures
import logging
import shlex
import time
from dataclasses import dataclass
from typing import Sequence

from ci.engine.gateway import Gateway, get_gateway
from ci.engine.keys import workers_of_label  # noqa: F401  (re-exported: the label str(TopologyKey) spells)
from ci.engine.launch import start_watched
from ci.engine.server import Server, ServerError, ServerKey
from ci.engine.teardown import stop_in_order

log = logging.getLogger(__name__)

# How engines spell "data-parallel ranks in this one server": vLLM's
# --data-parallel-size / -dp, SGLang's --dp-size. Each rank holds tp GPUs.
DP_FLAGS = ("--data-parallel-size", "-dp", "--dp-size")


class TopologyError(ServerError):
    """A topology could not be launched; ``cause`` names the member that failed."""


def data_parallel_size(args: Sequence[str]) -> int:
    """Data-parallel ranks a launch asks one server for (1 when it does not say)."""
    size = 1
    words = list(args)
    for i, word in enumerate(words):
        flag, eq, value = word.partition("=")
        if flag not in DP_FLAGS:
            continue
        value = value if eq else (words[i + 1] if i + 1 < len(words) else "")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{flag} needs a positive integer, got {value!r}")
        size = int(value)
    return size


def gpus_per_server(key: ServerKey) -> int:
    """GPUs one server of ``key`` occupies: tp x its data-parallel ranks."""
    return key.tp * data_parallel_size(key.args)


@dataclass(frozen=True)
class TopologyKey:
    """What makes two topologies interchangeable: workers of one key, the gateway, its policy."""

    server: ServerKey
    workers: int
    gateway: str | None = None
    policy: str | None = None
    gateway_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 1:
            raise ValueError(f"topology: workers must be a positive int, got {self.workers!r}")
        if self.gateway is None and (self.policy or self.gateway_args):
            raise ValueError("topology: a policy or gateway_args needs a gateway (data-parallel "
                             "replicas without one are balanced by the test)")
        if self.gateway is not None:
            spec = get_gateway(self.gateway)
            if self.policy is not None and self.policy not in spec.policies:
                raise ValueError(f"topology: {self.gateway} has no policy {self.policy!r}; "
                                 f"known: {', '.join(spec.policies)}")

    @property
    def gpus(self) -> int:
        """GPUs the whole topology occupies: workers x tp (x data-parallel ranks)."""
        return self.workers * gpus_per_server(self.server)

    def __str__(self) -> str:
        front = self.gateway or "dp"
        if self.gateway:
            front += f":{self.policy or get_gateway(self.gateway).default_policy}"
        extra = f" [{shlex.join(self.gateway_args)}]" if self.gateway_args else ""
        return f"{front} x{self.workers}{extra} {self.server}"


def worker_label(key: TopologyKey, index: int) -> str:
    """The name worker ``index`` of ``key`` goes by in logs, records and the report's timeline."""
    return f"worker {index} of {key}"


def gateway_label(key: TopologyKey) -> str:
    """The name the gateway of ``key`` goes by."""
    return f"gateway of {key}"


class Topology:
    """The unit a test borrows: ``workers`` of one key and, when asked, the ``gateway`` in front.

    ``adopted`` are indices of workers that were already running when the
    topology was made (the pool lends a live server of the same key instead
    of launching another); :meth:`start` launches the rest and :meth:`stop`
    stops only what this topology launched.
    """

    def __init__(self, key: TopologyKey, workers: Sequence[Server], gateway: Gateway | None = None, *,
                 adopted: Sequence[int] = ()):
        if len(workers) != key.workers:
            raise ValueError(f"topology {key}: {len(workers)} workers given for {key.workers}")
        self.key = key
        self.workers = list(workers)
        self.gateway = gateway
        self.adopted = frozenset(adopted)
        self.ready_s: float | None = None

    # -- what a test and a kit see ----------------------------------------------------
    @property
    def base_url(self) -> str:
        """The gateway's URL: where requests for the topology go."""
        if self.gateway is None:
            raise TopologyError(f"topology {self.key} has no gateway; send to each of .workers")
        return self.gateway.base_url

    @property
    def served_model(self) -> str:
        return self.workers[0].served_model

    @property
    def backend(self):
        """The engine's facts, for kits that take the topology as a server."""
        return (self.gateway or self.workers[0]).backend

    @property
    def devices(self) -> tuple[int, ...]:
        return tuple(d for w in self.workers for d in w.devices)

    def members(self) -> list[Server]:
        """Every process tree of the topology: the gateway first, then the workers."""
        return ([self.gateway] if self.gateway is not None else []) + self.workers

    def own_workers(self) -> list[Server]:
        """The workers this topology launched (not adopted from elsewhere)."""
        return [w for i, w in enumerate(self.workers) if i not in self.adopted]

    def dead(self) -> str | None:
        """'<member> exited with code N' for the first member that has exited, else None."""
        for srv in self.members():
            code = srv.exit_code()
            if code is not None:
                return f"{srv.key} exited with code {code}"
        return None

    def note_test(self, nodeid: str) -> None:
        for srv in self.members():
            srv.note_test(nodeid)

    def note_error(self, text: str) -> None:
        for srv in self.members():
            srv.note_error(text)

    # -- life ---------------------------------------------------------------------------
    def start(self) -> "Topology":
        """Workers in parallel, then the gateway; on any failure stop what this start launched."""
        t0 = time.monotonic()
        try:
            self._start_workers()
            if self.gateway is not None:
                start_watched(self.gateway)
        except BaseException:
            try:
                self.stop()
            except Exception:  # the launch error is the one to report; the stops log their own
                log.exception("cleanup after the failed start of %s also failed", self.key)
            raise
        self.ready_s = time.monotonic() - t0
        where = f"gateway {self.gateway.base_url} in front of " if self.gateway else ""
        log.info("topology %s ready in %.1f s: %sworkers %s%s", self.key, self.ready_s, where,
                 ", ".join(w.base_url for w in self.workers),
                 f" ({len(self.adopted)} already running)" if self.adopted else "")
        return self

    def _start_workers(self) -> None:
        todo = {i: w for i, w in enumerate(self.workers) if i not in self.adopted}
        if not todo:
            return
        first: tuple[int, BaseException] | None = None
        with concurrent.futures.ThreadPoolExecutor(len(todo), thread_name_prefix="launch") as pool:
            futures = {pool.submit(start_watched, w): i for i, w in todo.items()}
            try:
                for fut in concurrent.futures.as_completed(futures):
                    exc = fut.exception()
                    if exc is not None and first is None:
                        first = (futures[fut], exc)
                        self._call_off(todo, f"worker {first[0]} failed to launch")
            except BaseException:  # interrupted (CI cancel): do not wait out the others' launches
                self._call_off(todo, "the launch was interrupted")
                raise
        if first is not None:
            index, exc = first
            worker = todo[index]
            cause = getattr(exc, "cause", None) or f"{type(exc).__name__}: {exc}"
            tail = getattr(exc, "tail", None) or worker.log_tail()
            raise TopologyError(f"{worker.key} failed to launch: {cause}", tail, worker.log_path) from exc

    @staticmethod
    def _call_off(todo: dict[int, Server], reason: str) -> None:
        for worker in todo.values():
            worker.abort_launch(reason)

    def stop(self) -> None:
        """The gateway first, then the workers this topology launched, with one memory wait."""
        stop_in_order([self.gateway] if self.gateway is not None else [], self.own_workers())
