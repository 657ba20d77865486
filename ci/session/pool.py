"""A session-wide pool of servers keyed by (model, tp, launch args).

Launching an engine costs 40 s on CPU and minutes on GPU, so every test that
asks for the same key borrows the same server; each key launches once per
run. Tests borrow one at a time (serial e2e: pytest-parallel skipped
class teardown and leaked pool references, sglang #24222).
"""
from __future__ import annotations

import json
import logging
import shlex
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ci.engine.launch import ServerKey, start_watched
from ci.engine.server import Server, ServerError, stop_many
from ci.host import alloc

log = logging.getLogger(__name__)


class PoolError(ServerError):
    """A borrow failed (an earlier launch of the key failed, or the server died)."""


@dataclass
class _Entry:
    server: Server
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)


# Builds (does not start) the server for a key on the given physical devices.
Factory = Callable[[ServerKey, tuple[int, ...]], Server]


class ServerPool:
    """Owns every server of a test session; ``close()`` stops them all with ``stop_many``.

    ``max_live`` bounds how many servers run at once (CPU runners have RAM for
    a few tiny engines, not one per key); when full, the least recently used
    idle server is stopped first. With ``gpus`` (physical indices visible to
    this run) each server gets a disjoint set of ``key.tp`` devices, placed
    by ci.host.alloc (NVLink/NUMA-aware); when short, idle servers are evicted
    least recently used first.
    """

    def __init__(self, factory: Factory, *, max_live: int = 2, gpus: Sequence[int] = (),
                 topology: alloc.Topology | None = None):
        if max_live < 1:
            raise ValueError(f"max_live must be >= 1, got {max_live}")
        self._factory = factory
        self._max_live = max_live
        self._gpus = tuple(gpus)
        self._topology = topology
        self._live: dict[ServerKey, _Entry] = {}
        self._failed: dict[ServerKey, ServerError] = {}
        self._retired: list[Server] = []
        self._lock = threading.Lock()
        self.launches = 0

    def acquire(self, key: ServerKey) -> Server:
        """Borrow the server for ``key``, launching it (once) when needed."""
        with self._lock:
            if key in self._failed:
                first = self._failed[key]
                # Chained, so whoever types the failure sees the first launch's own error.
                raise PoolError(f"launch of {key} already failed in this run: {first.cause}",
                                first.tail, first.log_path) from first
            entry = self._live.get(key)
            if entry is not None and entry.server.exit_code() is not None:
                code = entry.server.exit_code()
                log.error("server %s died between tests (exit %s); relaunching", key, code)
                entry.server.note_error(f"exited with code {code} between tests")
                self._retire(key)
                entry = None
            if entry is None:
                self._make_room()
                server = self._factory(key, self._place(key))
                self.launches += 1
                try:
                    start_watched(server)
                except ServerError as exc:
                    self._failed[key] = exc
                    self._retired.append(server)
                    raise
                except BaseException:
                    self._retired.append(server)
                    raise
                entry = self._live[key] = _Entry(server)
            if entry.busy:
                raise PoolError(f"server {key} is already borrowed (e2e runs serially)")
            entry.busy = True
            return entry.server

    def release(self, server: Server, nodeid: str | None = None) -> None:
        """Give a borrowed server back; ``nodeid`` is recorded for the report."""
        with self._lock:
            for entry in self._live.values():
                if entry.server is server:
                    entry.busy = False
                    entry.last_used = time.monotonic()
                    if nodeid:
                        server.note_test(nodeid)
                    return
        log.warning("release of a server the pool does not hold: %s", server.key)

    def forget(self, key: ServerKey) -> None:
        """Make the next borrow of ``key`` launch a fresh server: stop an idle live one, drop a
        failed launch. For a retry after an infra failure (ci/session/outcomes.py), which must not
        borrow the server -- or the launch error -- that failed."""
        with self._lock:
            self._failed.pop(key, None)
            entry = self._live.get(key)
            if entry is not None and not entry.busy:
                self._retire(key)

    def _place(self, key: ServerKey) -> tuple[int, ...]:
        """Devices for a new server of ``key``; evicts idle servers when short."""
        if not self._gpus:
            return ()
        taken = {d for e in self._live.values() for d in e.server.devices}
        idle = [alloc.IdleServer(k, e.server.devices, e.last_used)
                for k, e in self._live.items() if not e.busy]
        try:
            plan = alloc.plan(set(self._gpus) - taken, key.tp, idle=idle, topology=self._topology)
        except alloc.NoCapacity as exc:
            raise PoolError(f"cannot place {key}: {exc}") from None
        for victim in plan.evict:
            log.info("evicting idle %s to free GPUs for %s", victim, key)
            self._retire(victim)
        return plan.devices

    def _make_room(self) -> None:
        while len(self._live) >= self._max_live:
            idle = [(e.last_used, k) for k, e in self._live.items() if not e.busy]
            if not idle:
                raise PoolError(f"all {self._max_live} servers are busy; cannot launch another")
            _, key = min(idle, key=lambda t: t[0])
            log.info("pool full (%d live): stopping least recently used %s", len(self._live), key)
            self._retire(key)

    def _retire(self, key: ServerKey) -> None:
        entry = self._live.pop(key)
        entry.server.stop()
        self._retired.append(entry.server)

    def servers(self) -> list[Server]:
        """Every server this pool ever launched, live or retired, in launch order."""
        with self._lock:
            return self._retired + [e.server for e in self._live.values()]

    def close(self) -> None:
        """Stop every live server in parallel; failures of the stops are raised together."""
        with self._lock:
            live = [e.server for e in self._live.values()]
            self._retired.extend(live)
            self._live.clear()
        stop_many(live)

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
