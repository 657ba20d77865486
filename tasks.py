"""invoke tasks: the steps of a GPU runner's job, each runnable on its own.

    invoke gpus [--json]            what GPUs kiln sees and how
    invoke ib [--json]              active RDMA rails, native InfiniBand first

Each task is thin: it checks its prerequisite, calls a ci/ module and turns a
kiln error into one clear line (invoke.Exit), never a traceback.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from invoke import Exit, task

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                    datefmt="%H:%M:%S")


@task(help={"json": "print the discovery as JSON instead of text",
            "clear_held": "forget sticky GPU release failures whose memory is back",
            "force": "with --clear-held: forget them even if memory is still held"})
def gpus(c, json=False, clear_held=False, force=False):
    """Show the GPUs kiln sees, how it found them (NVML / nvidia-smi / AMD tools / none), which are visible."""
    from ci import gpu, gpumem
    from ci.gpu_telemetry import telemetry_for

    try:
        found = gpu.discover()
    except gpu.GpuDiscoveryError as exc:
        raise Exit(f"GPU discovery failed: {exc}")
    print(gpu.to_json(found) if json else gpu.describe(found))
    ledger = gpumem.ReleaseLedger(gpumem.ledger_dir())
    if clear_held:
        cleared = ledger.clear(telemetry=None if force else telemetry_for(found))
        print(f"cleared release failures on GPUs {cleared}", file=sys.stderr)
    for held in ledger.held().values():
        print(f"HELD {held.describe()}", file=sys.stderr)


@task(help={"json": "print the rails as JSON instead of text"})
def ib(c, json=False):
    """List ACTIVE RDMA ports (native InfiniBand before RoCE) and the devices engines should use."""
    from ci import ib as rdma

    rails = rdma.active_rails()
    print(rdma.to_json(rails) if json else rdma.describe(rails))
