"""Choosing GPUs for a server: disjoint sets, topology-aware, LRU eviction when short.

Pure functions over plain data, so the pool's decisions are unit-testable
without GPUs: the pool passes the free *physical* devices, the tp it needs,
the topology (parsed from ``nvidia-smi topo -m``) and its idle servers; this
module answers which devices to use and which idle servers to evict first.

Preference for tp > 1, in order: every pair joined by NVLink; all devices on
one NUMA node; consecutive indices; lowest indices. Tensor-parallel all-reduce
over PCIe/SMP instead of NVLink is several times slower, which turns
throughput tests red for no fault of the engine.
"""
from __future__ import annotations

import itertools
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Mapping, Sequence
from ci.text import ansi

log = logging.getLogger(__name__)

# Exhaustive search over device subsets is instant for 8 GPUs (C(8,4) = 70)
# and fine for 16; past this many subsets (a 32-GPU box) we fall back to
# consecutive windows so a pool decision never costs seconds.
MAX_COMBINATIONS = 20_000
_GPU = re.compile(r"^GPU(\d+)$")


class NoCapacity(RuntimeError):
    """Not enough devices even after evicting every idle server."""


@dataclass(frozen=True)
class Topology:
    """GPU interconnect: link type per pair ("NV18", "SYS", "PIX", ...) and NUMA node per GPU."""

    links: Mapping[frozenset, str] = field(default_factory=dict)
    numa: Mapping[int, int | None] = field(default_factory=dict)

    def nvlinked(self, a: int, b: int) -> bool:
        """True when GPUs a and b talk over NVLink (directly or through NVSwitch)."""
        return self.links.get(frozenset((a, b)), "").startswith("NV")


def parse_topo(text: str) -> Topology:
    """Parse ``nvidia-smi topo -m`` output (tab-separated matrix; legend ignored).

    Raises ValueError when there is no GPU matrix in ``text``.
    """
    # nvidia-smi underlines the header row with escape sequences.
    lines = [ansi.strip(line).rstrip("\n") for line in text.splitlines()]
    # The header row starts with an empty cell: "\tGPU0\tGPU1\t...\tNUMA Affinity".
    header_at = next((i for i, line in enumerate(lines)
                      if line.startswith("\t") and "GPU0" in [c.strip() for c in line.split("\t")]), None)
    if header_at is None:
        raise ValueError("nvidia-smi topo -m: no GPU0 header column found")
    header = [c.strip() for c in lines[header_at].split("\t")]
    links: dict[frozenset, str] = {}
    numa: dict[int, int | None] = {}
    for line in lines[header_at + 1:]:
        cells = [c.strip() for c in line.split("\t")]
        m = _GPU.match(cells[0]) if cells else None
        if not m:
            if not line.strip() or line.lstrip().startswith("Legend"):
                break
            continue
        row = int(m.group(1))
        for name, value in zip(header[1:], cells[1:]):
            col = _GPU.match(name)
            if col and int(col.group(1)) != row:
                links[frozenset((row, int(col.group(1))))] = value
            elif name == "NUMA Affinity":
                numa[row] = int(value) if value.isdigit() else None
    if not numa and not links:
        raise ValueError("nvidia-smi topo -m: header found but no GPU rows")
    return Topology(links, numa)


def _score(devs: tuple[int, ...], topo: Topology | None) -> tuple:
    """Smaller is better; see the module docstring for the order."""
    pairs = list(itertools.combinations(devs, 2))
    all_nvlink = bool(topo) and all(topo.nvlinked(a, b) for a, b in pairs)
    numa_nodes = len({topo.numa.get(d) for d in devs}) if topo and topo.numa else 1
    consecutive = devs[-1] - devs[0] == len(devs) - 1
    return (not all_nvlink, numa_nodes, not consecutive, devs)


def choose(free: Iterable[int], tp: int, topology: Topology | None = None) -> tuple[int, ...] | None:
    """The best ``tp`` devices out of ``free`` (sorted ascending), or None if too few."""
    pool = sorted(set(free))
    if tp < 0:
        raise ValueError(f"tp must be >= 0, got {tp}")
    if tp == 0:
        return ()
    if tp > len(pool):
        return None
    if math.comb(len(pool), tp) > MAX_COMBINATIONS:
        candidates: Iterable[tuple[int, ...]] = (tuple(pool[i:i + tp]) for i in range(len(pool) - tp + 1))
    else:
        candidates = itertools.combinations(pool, tp)
    return min(candidates, key=lambda devs: _score(devs, topology))


@dataclass(frozen=True)
class IdleServer:
    """A running server no test is using right now; ``last_used`` is a monotonic time."""

    key: Hashable
    devices: tuple[int, ...]
    last_used: float


@dataclass(frozen=True)
class Plan:
    """Use ``devices``; first stop the idle servers in ``evict`` (oldest first)."""

    devices: tuple[int, ...]
    evict: tuple[Hashable, ...] = ()


def plan(free: Iterable[int], tp: int, *, idle: Sequence[IdleServer] = (),
         topology: Topology | None = None) -> Plan:
    """Devices for a new tp-way server, evicting least recently used idle servers when short.

    Evicts one idle server at a time, oldest first, until ``tp`` devices fit;
    raises NoCapacity (naming free, idle and needed counts) when even evicting
    every idle server is not enough - the rest are busy.
    """
    pool = set(free)
    evict: list[Hashable] = []
    for server in [None, *sorted(idle, key=lambda s: s.last_used)]:
        if server is not None:
            if pool & set(server.devices):
                raise ValueError(f"idle server {server.key!r} holds devices reported free: "
                                 f"{sorted(pool & set(server.devices))}")
            pool |= set(server.devices)
            evict.append(server.key)
        devices = choose(pool, tp, topology)
        if devices is not None:
            if evict:
                log.info("evicting idle %s to place a tp=%d server on GPUs %s", evict, tp, list(devices))
            return Plan(devices, tuple(evict))
    held = sum(len(s.devices) for s in idle)
    raise NoCapacity(f"need {tp} GPU(s): {len(set(free))} free and {held} held by "
                     f"{len(idle)} idle server(s); the rest are busy")
