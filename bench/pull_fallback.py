"""How long does a pull take to get past a dead registry mirror? (issue #4 goals: refused <= 1 s, black hole <= 3 s)

    python3 bench/pull_fallback.py [--runs 5] [--baseline]

Starts its own dockerd and docker-registry instances (tests/integration/docker_env.py;
root and Debian's docker.io + docker-registry needed), then times
``ci.images.pull.pull`` from call to image-on-disk with one mirror that

* refuses connections (a bound, non-listening port), and
* black-holes them (accepts TCP, never answers),

removing the image between runs so every run really pulls from the upstream
registry. ``--baseline`` also times dockerd pulling straight from the black
hole with no kiln probe in front, to show what the probe saves.
Exit status 1 when a median misses its goal.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ci.images import pull as images  # noqa: E402
from tests.integration.docker_env import BlackHole, RefusedPort, docker_env, engine_unavailable_reason  # noqa: E402

GOALS_S = {"refused": 1.0, "black-holed": 3.0}
# Backoff never runs here (the upstream is healthy); the mirror gets one try
# per run because a dead host is never retried anyway.
POLICY = images.PullPolicy()


def _drop(client, ref: str) -> None:
    with contextlib.suppress(Exception):
        client.images.remove(ref, force=True)


def _time_pull(client, env, mirror: str, source: str = "upstream") -> float:
    _drop(client, env.canonical)
    t0 = time.monotonic()
    result = images.pull(env.canonical, client=client, mirrors=[mirror], policy=POLICY)
    elapsed = time.monotonic() - t0
    if result.source != source:
        raise SystemExit(f"expected a pull from {source}, got {result.summary()}")
    return elapsed


def _baseline(client, env, hole: BlackHole) -> str:
    """dockerd asked directly to pull from the black hole: how long until it gives up."""
    t0 = time.monotonic()
    try:
        client.api.pull(f"{hole.address}/{env.repo}", tag=env.tag)
        outcome = "pulled?!"
    except Exception as exc:  # the daemon's own error is the point here
        outcome = str(getattr(exc, "explanation", None) or exc).splitlines()[0][:120]
    return f"{time.monotonic() - t0:.1f} s ({outcome})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="pulls per case (default 5)")
    parser.add_argument("--baseline", action="store_true", help="also time dockerd alone vs the black hole (~25 s)")
    args = parser.parse_args()
    reason = engine_unavailable_reason()
    if reason:
        print(f"cannot run: {reason}")
        return 2
    logging.basicConfig(level=logging.ERROR)  # the [mirror-pull] warnings are expected here
    failed = False
    with docker_env() as env, contextlib.closing(env.daemon.client()) as client:
        refused, hole = RefusedPort(), BlackHole()
        try:
            print(f"dockerd {client.version()['Version']}, upstream {env.upstream.address}, "
                  f"probe timeouts connect {POLICY.probe_connect_s} s / read {POLICY.probe_read_s} s, "
                  f"{args.runs} runs per case")
            healthy = [_time_pull(client, env, env.mirror.address, "mirror") for _ in range(args.runs)]
            print(f"{'healthy mirror (reference)':32s} median {statistics.median(healthy):6.3f} s  "
                  f"max {max(healthy):6.3f} s  (source: mirror)")
            for name, front in (("refused", refused), ("black-holed", hole)):
                times = [_time_pull(client, env, front.address) for _ in range(args.runs)]
                median, goal = statistics.median(times), GOALS_S[name]
                verdict = "ok" if median <= goal else "MISSED"
                failed |= median > goal
                print(f"{name + ' mirror -> upstream':32s} median {median:6.3f} s  max {max(times):6.3f} s  "
                      f"goal <= {goal:.0f} s: {verdict}")
            if args.baseline:
                print(f"{'dockerd alone vs black hole':32s} {_baseline(client, env, hole)}")
        finally:
            refused.close()
            hole.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
