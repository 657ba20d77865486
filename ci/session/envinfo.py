"""What a run is on, printed first in every e2e session; and the capacity gate.

``python -m ci.session.envinfo --profile h100-4 [--check-capacity]``. The capacity
check fails loudly when the machine has fewer visible GPUs than the profile
promises: a 4-GPU session on a 2-GPU runner would otherwise skip half its
tests and go green.
"""
from __future__ import annotations

import argparse
import logging
import platform
import sys

from ci.engine.backends import get_backend
from ci.host import cgroups, gpu
from ci.profiles import runners

log = logging.getLogger(__name__)


def summary(profile: runners.Profile, discovery: gpu.Discovery) -> str:
    """A few lines: profile, python, engine, GPUs and how they were found."""
    version = get_backend(profile.backend).version() or "not installed in this environment"
    return "\n".join([
        f"kiln profile {profile.name}: {profile.gpus} {profile.vendor} GPU(s), backend {profile.backend}",
        f"python {platform.python_version()} on {platform.machine()} ({platform.platform()})",
        f"engine {profile.backend}: {version}",
        gpu.describe(discovery),
        f"containment: {cgroups.probe()}",
    ])


def capacity_error(profile: runners.Profile, discovery: gpu.Discovery) -> str | None:
    """Why this machine cannot run ``profile``, or None when it can."""
    if profile.vendor == "cpu":
        return None
    found = len(discovery.visible)
    if discovery.vendor not in (profile.vendor, "none") or found < profile.gpus:
        return (f"profile {profile.name} needs {profile.gpus} {profile.vendor} GPU(s); this machine "
                f"has {found} visible {discovery.vendor} GPU(s) (via {discovery.source}). "
                f"Run the session that matches it (nox -l lists them).")
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ci.session.envinfo", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", required=True, choices=list(runners.PROFILES))
    ap.add_argument("--check-capacity", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    profile = runners.get_profile(a.profile)
    try:
        discovery = gpu.discover()
    except gpu.GpuDiscoveryError as exc:
        print(f"kiln: GPU discovery failed: {exc}", file=sys.stderr)
        return 2
    if a.check_capacity:
        problem = capacity_error(profile, discovery)
        if problem:
            print(f"kiln: {problem}", file=sys.stderr)
            return 3
        return 0
    print(summary(profile, discovery))
    return 0


if __name__ == "__main__":
    sys.exit(main())
