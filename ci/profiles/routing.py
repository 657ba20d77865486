"""Which runners a workflow run uses, decided once for every workflow: ``invoke route``.

AMD jobs go to one of two pools (sglang #23156): pull requests to the MI300
pool, which has the capacity for quick PR feedback; the nightly schedule to the
MI325 pool for full coverage on the newer hardware; a manual dispatch to the
pool its input names. NVIDIA jobs are not pooled. The job matrix is generated
from the runner table (ci/profiles/runners.py), so a new runner row needs no workflow edit.

The outputs are ``key=value`` lines made to be appended to ``$GITHUB_OUTPUT``.
"""
from __future__ import annotations

import json
import logging
from types import MappingProxyType
from typing import Any, Iterable, Mapping

log = logging.getLogger(__name__)

ROUTES: Mapping[str, str] = MappingProxyType({
    # PRs want fast feedback: the larger MI300 pool keeps their queue short.
    "pull_request": "mi300",
    # The nightly run covers the newer MI325 hardware the PR jobs no longer use.
    "schedule": "mi325",
})
DISPATCH_EVENT = "workflow_dispatch"
POOLED_VENDOR = "amd"
# Profiles that are not GPU jobs: e2e-cpu has its own job on a GitHub-hosted runner
# (e2e-cpu in pr.yml and nightly.yml), open to forks, and runs in .ci/run.
MATRIX_SKIP_VENDORS = frozenset({"cpu"})


class RoutingError(ValueError):
    """No pool for this event/input."""


def _profiles(profiles: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if profiles is not None:
        return profiles
    from ci.profiles.runners import PROFILES  # noqa: PLC0415  (tests pass their own tables)
    return PROFILES


def known_pools(profiles: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The AMD pools the runner table has, sorted."""
    return tuple(sorted({p.pool for p in _profiles(profiles).values()
                         if p.vendor == POOLED_VENDOR and p.pool}))


def route(event: str, pool_input: str | None = None, profiles: Mapping[str, Any] | None = None) -> str:
    """The AMD pool for a run triggered by ``event`` (``pool_input`` for a manual dispatch)."""
    pools = known_pools(profiles)
    if event == DISPATCH_EVENT:
        chosen = (pool_input or "").strip()
        if not chosen:
            raise RoutingError(f"{DISPATCH_EVENT} needs an input pool, one of: {', '.join(pools)}")
    elif event in ROUTES:
        chosen = ROUTES[event]
    else:
        raise RoutingError(f"no runner routing for event {event!r}; known: "
                           f"{', '.join([*ROUTES, DISPATCH_EVENT])}")
    if chosen not in pools:
        raise RoutingError(f"unknown runner pool {chosen!r} for {event}; known: {', '.join(pools)}")
    return chosen


def matrix(pool: str, profiles: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One matrix entry per GPU profile: every non-AMD one, and the AMD ones of ``pool``."""
    entries = []
    for p in _profiles(profiles).values():
        if p.vendor in MATRIX_SKIP_VENDORS or (p.vendor == POOLED_VENDOR and p.pool != pool):
            continue
        entries.append({"profile": p.name, "session": f"e2e-{p.name}", "runner": p.runner_label,
                        "gpus": p.gpus, "vendor": p.vendor})
    return entries


def outputs(event: str, pool_input: str | None = None,
            profiles: Mapping[str, Any] | None = None) -> dict[str, str]:
    """``pool``, ``matrix`` (JSON for ``fromJSON``) and ``count`` for a workflow run."""
    pool = route(event, pool_input, profiles)
    entries = matrix(pool, profiles)
    log.info("event %s -> pool %s, %d GPU jobs", event, pool, len(entries))
    return {"pool": pool, "matrix": json.dumps({"include": entries}, separators=(",", ":")),
            "count": str(len(entries))}


def format_outputs(values: Mapping[str, str]) -> str:
    """``key=value`` lines for ``$GITHUB_OUTPUT`` (single-line values only)."""
    lines: Iterable[str] = (f"{k}={v}" for k, v in values.items())
    text = "\n".join(lines)
    if any("\n" in v or "\r" in v for v in values.values()):
        raise RoutingError("output values must be single lines for $GITHUB_OUTPUT")
    return text + "\n"
