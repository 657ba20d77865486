"""Stopping many servers at once: every tree in parallel, then one device-memory wait.

vllm #41166: DP test groups stopped one server at a time and waited on GPU
memory after each, ~10 minutes lost per group; its ``shutdown_many``
terminates all in parallel, then waits once. :func:`stop_many` is that;
:func:`stop_in_order` adds what a topology needs: its gateway goes first, so
no request is routed to a worker that is already going away, then every
worker through one ``stop_many``.
"""
from __future__ import annotations

import concurrent.futures
import logging
from typing import Iterable

from ci.engine.server import Server, wait_memory_together

log = logging.getLogger(__name__)


def _raise_all(errors: list[BaseException], what: str, total: int) -> None:
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ExceptionGroup(f"{what}: {len(errors)} of {total} stops failed", errors)


def _distinct(servers: Iterable[Server]) -> list[Server]:
    """``servers`` without repeats, in order (a worker shared by two topologies is stopped once)."""
    seen: set[int] = set()
    return [s for s in servers if not (id(s) in seen or seen.add(id(s)))]


def _terminate_all(servers: list[Server]) -> list[BaseException]:
    errors: list[BaseException] = []
    if not servers:
        return errors
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="stop") as pool:
        futures = {pool.submit(s.terminate): s for s in servers}
        for fut in concurrent.futures.as_completed(futures):
            if fut.exception() is not None:
                errors.append(fut.exception())
    return errors


def _wait_memory(servers: list[Server]) -> list[BaseException]:
    # One wait per memory guard (the pool shares one) over all its devices at
    # once; a server with no device has nothing to wait for (its own call
    # just stamps its record).
    guards: dict[int, list[Server]] = {}
    errors: list[BaseException] = []
    for s in servers:
        memory = getattr(s, "memory", None)
        if memory is not None and getattr(s, "devices", ()):
            guards.setdefault(id(memory), []).append(s)
            continue
        try:
            s.wait_memory()
        except Exception as exc:
            errors.append(exc)
    for group in guards.values():
        try:
            wait_memory_together(group)
        except Exception as exc:
            errors.append(exc)
    return errors


def stop_many(servers: Iterable[Server]) -> None:
    """Terminate every server in parallel, then wait for device memory once.

    One by one, each stop pays its own grace and memory wait (vllm #41166:
    ~10 min lost per DP test group). Every failure is collected; none is lost:
    more than one is raised together as an ExceptionGroup.
    """
    servers = _distinct(servers)
    errors = _terminate_all(servers)
    errors += _wait_memory(servers)
    _raise_all(errors, "stop_many", len(servers))


def stop_in_order(first: Iterable[Server], then: Iterable[Server]) -> None:
    """Stop ``first`` (gateways) in parallel, then ``then`` (their workers) with one :func:`stop_many`.

    The second group is stopped even when the first failed: a gateway that
    would not die must not leave its workers running. Failures of both are
    raised together.
    """
    first, then = _distinct(first), _distinct(then)
    errors = _terminate_all(first)
    then = [s for s in then if all(s is not f for f in first)]
    errors += _terminate_all(then)
    errors += _wait_memory(first + then)
    _raise_all(errors, "stop", len(first) + len(then))
