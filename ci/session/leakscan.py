"""The session's "nothing left" scan: engine and gateway processes by name and command line.

It reads the process table alone, never kiln's records, so it holds even if
kiln's own bookkeeping were wrong (renamed processes included, zombies aside).
"""
from __future__ import annotations

import os

from ci.engine import gateway
from ci.engine.backends import BackendSpec
from ci.host import cgroups, procfs


def engine_processes(backend: BackendSpec) -> list[procfs.Stat]:
    """Live processes that look like ``backend``'s or a gateway's by name or command line (no tag,
    no registry): a topology's router must not outlive the session either."""
    return procfs.matching(backend.process_names + gateway.PROCESS_NAMES) if backend.process_names else []


def baseline(backend: BackendSpec) -> set:
    """The identities of the engine-looking processes already running (another job's, or older)."""
    return {st.identity for st in engine_processes(backend)}


def new_engine_processes(backend: BackendSpec, before: set) -> list[procfs.Stat]:
    """Engine-looking processes not in ``before`` that can be this run's.

    Another job on the same host may start an engine meanwhile: its processes
    hang below a live process of its own (its supervisor, its harness). Ours
    either still hang below this process, or -- had they escaped -- below
    nothing but engine processes up to init, where orphans go.
    """
    found = engine_processes(backend)
    engines = {st.pid for st in found}
    snap = procfs.table()
    me = os.getpid()
    leaked = []
    for st in found:
        if st.identity in before:
            continue
        chain = procfs.ancestors(st.pid, snap)
        if me in chain or all(pid in engines for pid in chain):
            leaked.append(st)
    return leaked


def verdict(backend: BackendSpec, leaked: list[procfs.Stat]) -> str:
    """The session's one line on what the scan found: a LEAK naming each process, or none left."""
    if leaked:
        return (f"LEAK: {len(leaked)} {backend.name} process(es) outlived the session: "
                + ", ".join(procfs.label(st.pid) for st in leaked))
    return f"containment: 0 {backend.name} processes left (scan by name and command line; {cgroups.probe()})"
