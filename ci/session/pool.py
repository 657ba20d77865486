"""A session-wide pool of servers keyed by (model, tp, launch args), and of topologies.

Launching an engine costs 40 s on CPU and minutes on GPU, so every test that
asks for the same key borrows the same server; each key launches once per
run. Tests borrow one at a time (serial e2e: pytest-parallel skipped
class teardown and leaked pool references, sglang #24222).

A topology (ci/engine/topology.py: N workers of one key, a gateway in front
or none) is one unit here too: one key, placed as a whole (workers x tp
GPUs), borrowed and reused as one. Its workers are engines like any other:
a live server of the same key, idle, is lent to it as a worker instead of
launching another engine (an engine launch is the cost that matters), and an
engine is stopped only when no live unit holds it any more.
"""
from __future__ import annotations

import json
import logging
import shlex
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, Union

from ci.engine.gateway import Gateway
from ci.engine.launch import ServerKey, start_watched
from ci.engine.server import Server, ServerError
from ci.engine.teardown import stop_in_order
from ci.engine.topology import (Topology, TopologyKey, data_parallel_size, gateway_label, gpus_per_server,
                                worker_label)
from ci.host import alloc

log = logging.getLogger(__name__)

Key = Union[ServerKey, TopologyKey]
Unit = Union[Server, Topology]


class PoolError(ServerError):
    """A borrow failed (an earlier launch of the key failed, or the server died)."""


@dataclass
class _Entry:
    unit: Unit
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)

    def engines(self) -> list[Server]:
        return self.unit.workers if isinstance(self.unit, Topology) else [self.unit]

    def gateways(self) -> list[Server]:
        return [self.unit.gateway] if isinstance(self.unit, Topology) and self.unit.gateway else []


# Builds (does not start) the server for a key on the given physical devices;
# ``label`` names a topology's worker in logs and records.
Factory = Callable[..., Server]
# Builds (does not start) a topology's gateway in front of its ready workers.
GatewayFactory = Callable[[TopologyKey, Sequence[Server]], Gateway]


def _try_start(server: Server) -> BaseException | None:
    """Start ``server`` under its crash watch; the exception instead of raising it (a thread's)."""
    try:
        start_watched(server)
    except BaseException as exc:  # noqa: BLE001  (handed back to the pool, which records it)
        return exc
    return None


class ServerPool:
    """Owns every server of a test session; ``close()`` stops them all with ``stop_many``.

    ``max_live`` bounds how many engines run at once (CPU runners have RAM for
    a few tiny engines, not one per key; a gateway is not an engine); when
    full, the least recently used idle unit is stopped first. With ``gpus``
    (physical indices visible to this run) each server gets a disjoint set of
    devices (tp x data-parallel ranks), placed by ci.host.alloc
    (NVLink/NUMA-aware); when short, idle units are evicted least recently
    used first.
    """

    def __init__(self, factory: Factory, *, max_live: int = 2, gpus: Sequence[int] = (),
                 topology: alloc.Topology | None = None, gateway_factory: GatewayFactory | None = None):
        if max_live < 1:
            raise ValueError(f"max_live must be >= 1, got {max_live}")
        self._factory = factory
        self._gateway_factory = gateway_factory
        self._max_live = max_live
        self._gpus = tuple(gpus)
        self._topology = topology
        self._live: dict[Key, _Entry] = {}
        self._failed: dict[Key, ServerError] = {}
        self._retired: list[Server] = []
        # Which ServerKey each engine serves: a topology adopts live engines of its key.
        self._serves: dict[int, ServerKey] = {}
        # Engines built since the last take_launches(): whoever waited for them books their launch.
        self._unbooked: list[Server] = []
        self._lock = threading.Lock()
        self.launches = 0

    def acquire(self, key: Key) -> Unit:
        """Borrow the server (or topology) for ``key``, launching it (once) when needed."""
        with self._lock:
            if key in self._failed:
                first = self._failed[key]
                # Chained, so whoever types the failure sees the first launch's own error.
                raise PoolError(f"launch of {key} already failed in this run: {first.cause}",
                                first.tail, first.log_path) from first
            self._drop_dead(key)
            entry = self._live.get(key)
            if entry is None:
                unit = self._build(key)
                try:
                    unit.start() if isinstance(unit, Topology) else start_watched(unit)
                except ServerError as exc:
                    self._failed[key] = exc
                    self._retired.extend(self._members(unit))
                    raise
                except BaseException:
                    self._retired.extend(self._members(unit))
                    raise
                entry = self._live[key] = _Entry(unit)
            if entry.busy:
                raise PoolError(f"{key} is already borrowed (e2e runs serially)")
            entry.busy = True
            return entry.unit

    def prelaunch(self, keys: Sequence[ServerKey]) -> list[ServerKey]:
        """Start the servers of ``keys`` together, before the tests that borrow them.

        Launches are mostly waiting (weights, compile, CUDA graphs): the cpu lane's
        two servers were ready together in 60.7 s where one after the other took
        118.5 s (bench/launch_overlap.py). Only keys that fit the pool's engine
        slots and GPUs at once are started; the rest launch on first borrow as
        before. A failed launch is kept, so the first test that needs the key
        fails with its cause, as a failed borrow would. Returns the keys started.
        """
        with self._lock:
            if self._live:
                return []  # only at the session's start: nothing to evict, nothing borrowed
            fresh = [k for k in dict.fromkeys(keys) if k not in self._failed]
            fresh = fresh[:self._max_live]
            if len(fresh) < 2:
                return []  # one launch gains nothing from starting early; it starts on borrow
            units: list[tuple[ServerKey, Server]] = []
            for key in fresh:
                if data_parallel_size(key.args) > 1:
                    continue  # several engine slots each: left to the borrow's eviction
                try:
                    devices = self._place(gpus_per_server(key), 1)[0]
                except PoolError as exc:
                    log.info("not prelaunching %s: %s", key, exc)
                    break
                units.append((key, self._new_engine(key, devices)))
            log.info("prelaunching %d servers together: %s", len(units), ", ".join(str(k) for k, _ in units))
            with ThreadPoolExecutor(max_workers=len(units), thread_name_prefix="kiln-prelaunch") as ex:
                outcomes = list(ex.map(lambda ks: _try_start(ks[1]), units))
            for (key, server), error in zip(units, outcomes):
                if error is None:
                    self._live[key] = _Entry(server)
                else:
                    self._retired.append(server)
                    if isinstance(error, ServerError):
                        self._failed[key] = error
            return [k for (k, _), e in zip(units, outcomes) if e is None]

    def take_launches(self) -> list[tuple[str, float]]:
        """(server key, seconds from launch to ready) of each engine that became ready since the last
        call, each once: the test that waited for them books them (ci/session/waits.py).

        Launches happen inside ``acquire``/``prelaunch``, which return only when
        they have ended, so between borrows none is half done; one that failed
        is dropped (it never served, and its test is not timed).
        """
        with self._lock:
            built, self._unbooked = self._unbooked, []
            return [(str(self._serves[id(s)]), s.record.ready - s.record.launched) for s in built
                    if s.record.launched is not None and s.record.ready is not None]

    def release(self, unit: Unit, nodeid: str | None = None) -> None:
        """Give a borrowed server or topology back; ``nodeid`` is recorded for the report."""
        with self._lock:
            for entry in self._live.values():
                if entry.unit is unit:
                    entry.busy = False
                    entry.last_used = time.monotonic()
                    if nodeid:
                        unit.note_test(nodeid)
                    return
        log.warning("release of a unit the pool does not hold: %s", getattr(unit, "key", unit))

    def forget(self, key: Key) -> None:
        """Make the next borrow of ``key`` launch afresh: stop an idle live unit, drop a
        failed launch. For a retry after an infra failure (ci/session/outcomes.py), which must not
        borrow the server -- or the launch error -- that failed."""
        with self._lock:
            self._failed.pop(key, None)
            entry = self._live.get(key)
            if entry is not None and not entry.busy:
                self._retire(key)

    # -- building ----------------------------------------------------------------------
    def _build(self, key: Key) -> Unit:
        if isinstance(key, ServerKey):
            self._make_room(data_parallel_size(key.args))
            return self._new_engine(key, self._place(gpus_per_server(key), 1)[0])
        if key.gateway is not None and self._gateway_factory is None:
            raise PoolError(f"topology {key}: this pool was made without a gateway factory")
        slots = key.workers * data_parallel_size(key.server.args)
        if slots > self._max_live:
            raise PoolError(f"topology {key} needs {slots} engines at once; this pool runs at most "
                            f"{self._max_live} (the profile's max_live_servers)")
        adopted = self._adoptable(key)
        protect = {id(s) for s in adopted}
        self._make_room((key.workers - len(adopted)) * data_parallel_size(key.server.args), protect)
        groups = self._place(gpus_per_server(key.server), key.workers - len(adopted), protect)
        workers: list[Server] = list(adopted)
        for devices in groups:
            workers.append(self._new_engine(key.server, devices, label=worker_label(key, len(workers))))
        for i, srv in enumerate(workers):
            if i < len(adopted):
                log.info("topology %s: worker %d is the live %s (no second launch)", key, i, srv.key)
            srv.record.roles.append(worker_label(key, i))
        gateway = self._gateway_factory(key, workers) if key.gateway is not None else None
        if gateway is not None:
            gateway.record.roles.append(gateway_label(key))
        return Topology(key, workers, gateway, adopted=range(len(adopted)))

    def _new_engine(self, key: ServerKey, devices: tuple[int, ...], **label: str) -> Server:
        server = self._factory(key, devices, **label)
        self._serves[id(server)] = key
        self._unbooked.append(server)
        self.launches += 1
        return server

    def _adoptable(self, key: TopologyKey) -> list[Server]:
        """Live idle engines of ``key.server`` (at most ``key.workers``), oldest first."""
        found: list[Server] = []
        for entry in self._live.values():
            if entry.busy:
                continue
            for srv in entry.engines():
                if self._serves.get(id(srv)) == key.server and srv.exit_code() is None \
                        and all(srv is not f for f in found):
                    found.append(srv)
        return found[:key.workers]

    @staticmethod
    def _members(unit: Unit) -> list[Server]:
        return unit.members() if isinstance(unit, Topology) else [unit]

    def _engines_held(self, exclude: Key | None = None) -> dict[int, Server]:
        return {id(s): s for k, e in self._live.items() if k != exclude for s in e.engines()}

    def _slots_held(self) -> int:
        # An engine running its own data parallelism is that many engine
        # processes (vLLM: one EngineCore per rank), so it takes that many slots.
        return sum(data_parallel_size(self._serves[i].args) if i in self._serves else 1
                   for i in self._engines_held())

    def _place(self, per_server: int, count: int, protect: set[int] = frozenset()) -> list[tuple[int, ...]]:
        """Devices for ``count`` new servers of ``per_server`` GPUs each; evicts idle units when short."""
        if not self._gpus or count == 0:
            return [()] * count
        taken = {d for e in self._live.values() for s in e.engines() for d in s.devices}
        idle = []
        for k, e in self._live.items():
            if e.busy or any(id(s) in protect for s in e.engines()):
                continue
            others = self._engines_held(exclude=k)
            freed = tuple(d for s in e.engines() if id(s) not in others for d in s.devices)
            idle.append(alloc.IdleServer(k, freed, e.last_used))
        try:
            plan = alloc.plan(set(self._gpus) - taken, per_server * count, idle=idle, topology=self._topology)
        except alloc.NoCapacity as exc:
            raise PoolError(f"cannot place {count} server(s) of {per_server} GPU(s): {exc}") from None
        for victim in plan.evict:
            log.info("evicting idle %s to free GPUs", victim)
            self._retire(victim)
        devs = plan.devices
        return [tuple(devs[i * per_server:(i + 1) * per_server]) for i in range(count)]

    def _make_room(self, engines: int, protect: set[int] = frozenset()) -> None:
        """Stop least recently used idle units until ``engines`` more fit under max_live."""
        while self._slots_held() + engines > self._max_live:
            idle = [(e.last_used, k) for k, e in self._live.items()
                    if not e.busy and not any(id(s) in protect for s in e.engines())]
            if not idle:
                raise PoolError(f"all {self._max_live} engine slots are busy; cannot launch another")
            _, key = min(idle, key=lambda t: t[0])
            log.info("pool full (%d engine slots held): stopping least recently used %s",
                     self._slots_held(), key)
            self._retire(key)

    def _drop_dead(self, asked: Key) -> None:
        """Retire every idle unit with a member that exited (before anything is placed)."""
        for key, entry in list(self._live.items()):
            dead = entry.unit.dead() if isinstance(entry.unit, Topology) else (
                None if (code := entry.unit.exit_code()) is None else f"exited with code {code}")
            if dead is None or entry.busy:
                continue
            (log.error if key == asked else log.warning)("%s died between tests (%s); %s", key, dead,
                                                        "relaunching" if key == asked else "retiring it")
            entry.unit.note_error(f"{dead} between tests")
            self._retire(key)

    def _retire(self, key: Key) -> None:
        entry = self._live.pop(key)
        others = self._engines_held()
        gateways, engines = entry.gateways(), [s for s in entry.engines() if id(s) not in others]
        self._retired.extend(gateways + engines)
        stop_in_order(gateways, engines)

    # -- end of session ----------------------------------------------------------------
    def servers(self) -> list[Server]:
        """Every server this pool ever launched (gateways too), live or retired, in launch order."""
        with self._lock:
            every = self._retired + [s for e in self._live.values() for s in e.gateways() + e.engines()]
        seen: set[int] = set()
        return [s for s in every if not (id(s) in seen or seen.add(id(s)))]

    def close(self) -> None:
        """Stop everything live: every gateway first, then every engine in one ``stop_many``."""
        with self._lock:
            entries = list(self._live.values())
            self._live.clear()
            gateways = [g for e in entries for g in e.gateways()]
            engines = [s for e in entries for s in e.engines()]
            self._retired.extend(gateways + engines)
        stop_in_order(gateways, engines)

    def write_records(self, path: Path) -> None:
        """Write every server's timeline to ``path`` (JSON), for the report."""
        path.parent.mkdir(parents=True, exist_ok=True)
        data = [s.record_dict() for s in self.servers()]
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)


def key_from_marker(args: Sequence, kwargs: dict, default_model: str) -> ServerKey:
    """``@pytest.mark.model(name, tp=1, args=[...])`` -> ServerKey, with a clear error on misuse."""
    if len(args) > 1:
        raise ValueError(f"model marker takes one positional argument (the name), got {args!r}")
    name = args[0] if args else kwargs.get("name", "default")
    unknown = set(kwargs) - {"name", "tp", "args"}
    if unknown:
        raise ValueError(f"model marker: unknown keyword(s) {sorted(unknown)}; use name, tp, args")
    tp = kwargs.get("tp", 1)
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"model marker: tp must be a positive int, got {tp!r}")
    extra = kwargs.get("args", ())
    if isinstance(extra, str):
        extra = shlex.split(extra)
    return ServerKey(default_model if name in (None, "default") else name, tp, tuple(str(a) for a in extra))


TOPOLOGY_KEYWORDS = ("workers", "gateway", "policy", "gateway_args", "model", "tp", "args")


def topology_from_marker(args: Sequence, kwargs: dict, default_model: str) -> TopologyKey:
    """``@pytest.mark.topology(workers=2, gateway="vllm-router", policy="round_robin", model=..., tp=...,
    args=[...], gateway_args=[...])`` -> TopologyKey; a bad marker is one line naming the cause."""
    if args:
        raise ValueError(f"topology marker takes keywords only ({', '.join(TOPOLOGY_KEYWORDS)}), got {args!r}")
    unknown = set(kwargs) - set(TOPOLOGY_KEYWORDS)
    if unknown:
        raise ValueError(f"topology marker: unknown keyword(s) {sorted(unknown)}; "
                         f"use {', '.join(TOPOLOGY_KEYWORDS)}")
    if "workers" not in kwargs:
        raise ValueError("topology marker: say how many workers (workers=N)")
    server = key_from_marker((kwargs.get("model", "default"),),
                             {k: kwargs[k] for k in ("tp", "args") if k in kwargs}, default_model)
    gw_args = kwargs.get("gateway_args", ())
    if isinstance(gw_args, str):
        gw_args = shlex.split(gw_args)
    return TopologyKey(server, kwargs["workers"], kwargs.get("gateway"), kwargs.get("policy"),
                       tuple(str(a) for a in gw_args))
