"""On a machine with >= 2 NVIDIA GPUs: the pool, the plugin and the memory guard end to end.

    PYTHONUNBUFFERED=1 python3 bench/gpu_pool_check.py

Runs tests/gpu/test_gpu_pool.py in a child pytest under the h200-2/h100-2
profile with the GPU test server as the engine, then checks from NVML, not
from kiln: every device is back at its baseline, the records show disjoint
devices for servers alive together, and each server's memory-free time.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ci.host import gpu  # noqa: E402
from ci.host.gpu_telemetry import telemetry_for  # noqa: E402

HEADROOM = 256 * 2**20  # CUDA context leftovers of other processes, not ours
CHILD_TIMEOUT_S = 480


def main() -> int:
    found = gpu.discover()
    n = len(found.visible)
    if found.vendor != "nvidia" or n < 2:
        print(f"needs >= 2 NVIDIA GPUs; found {n} ({found.source})")
        return 2
    name = found.devices[0].name.lower()
    profile = ("h200-2" if "h200" in name else "h100-2")
    with telemetry_for(found) as tele:
        before = tele.used_bytes(found.visible)
    reports = Path(tempfile.mkdtemp(prefix="kiln-gpu-"))
    backend = f"generic:{{python}} {ROOT / 'tests/fakes/gpu_server.py'} --port {{port}}"
    argv = [sys.executable, "-m", "pytest", str(ROOT / "tests/gpu/test_gpu_pool.py"), "-v",
            f"--kiln-profile={profile}", f"--kiln-backend={backend}", f"--kiln-reports={reports}",
            "-p", "no:cacheprovider"]
    t0 = time.monotonic()
    child = subprocess.run(argv, cwd=ROOT, timeout=CHILD_TIMEOUT_S, env={**os.environ, "KILN_SESSION": "gpu"})
    took = time.monotonic() - t0
    with telemetry_for(found) as tele:
        after = tele.used_bytes(found.visible)
    records = json.loads((reports / "servers-gpu.json").read_text())
    ok = child.returncode == 0
    print(f"\nchild pytest exit {child.returncode} in {took:.1f} s on {n} x {found.devices[0].name}")
    for r in records:
        free = (r["memory_free"] - r["stopped"]) * 1000 if r["memory_free"] and r["stopped"] else None
        print(f"  {r['key']:<55} devices {r['devices']}  tests {len(r['tests'])}  "
              f"stop->memory-free {free:.1f} ms" if free is not None else f"  {r['key']} {r}")
    for d in found.visible:
        delta = after[d] - before[d]
        good = delta <= HEADROOM
        ok &= good
        print(f"  GPU {d}: before {before[d] / 2**20:.0f} MiB, after {after[d] / 2**20:.0f} MiB "
              f"({'back to baseline' if good else 'STILL HELD'})")
    alive = [r for r in records if r["stopped"] is None]
    ok &= not alive
    print("RESULT:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
