"""On a GPU machine: does kiln's visible-GPU count match CUDA's, value by value?

    PYTHONUNBUFFERED=1 python3 bench/gpu_visible.py [--json-out FILE]

For each CUDA_VISIBLE_DEVICES value it runs torch in a fresh subprocess
(device_count plus a first allocation) and compares with ci.host.gpu.discover()
through NVML and through nvidia-smi (NVML hidden). It also checks that both
sources list the same UUIDs as ``nvidia-smi -L``, and prints the raw
``nvidia-smi topo -m`` text so ci.host.alloc's parser can be checked against it.
Exit status 1 when any row disagrees.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ci.host import alloc, gpu  # noqa: E402

# A torch subprocess imports torch and initialises CUDA: ~3-10 s; 120 s means hung.
TORCH_TIMEOUT_S = 120.0
# torch.cuda.device_count() applies torch's own parse of CUDA_VISIBLE_DEVICES
# (through NVML); _cuda_getDeviceCount is the CUDA runtime's count. They differ.
PROBE = ("import json, torch\n"
         "n = torch.cuda.device_count()\n"
         "try:\n"
         "    rt = torch._C._cuda_getDeviceCount()\n"
         "except Exception as e:\n"
         "    rt = type(e).__name__\n"
         "try:\n"
         "    torch.zeros(1, device='cuda'); alloc = 'ok'\n"
         "except Exception as e:\n"
         "    alloc = type(e).__name__ + ': ' + str(e).splitlines()[0][:100]\n"
         "print(json.dumps({'count': n, 'runtime': rt, 'alloc': alloc}))\n")


def torch_view(value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if value is not None:
        env["CUDA_VISIBLE_DEVICES"] = value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         timeout=TORCH_TIMEOUT_S)
    if out.returncode != 0:
        return {"count": None, "runtime": None, "alloc": f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def kiln_view(value: str | None, nvml) -> str:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if value is not None:
        env["CUDA_VISIBLE_DEVICES"] = value
    try:
        return str(len(gpu.discover(env, nvml=nvml).visible))
    except gpu.GpuDiscoveryError as exc:
        return "error" if "twice" in str(exc) else f"discovery failed: {exc}"


def agrees(t: dict, k: str) -> bool:
    torch_usable = t["count"] if t["alloc"] == "ok" else 0
    if k == "error":  # kiln refuses duplicates; CUDA must not be usable either
        return t["alloc"] != "ok"
    return k == str(torch_usable)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json-out")
    args = p.parse_args()

    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    smi_uuids = re.findall(r"\(UUID: (GPU-[0-9a-f-]+)\)", listed)
    print(f"nvidia-smi -L: {len(smi_uuids)} GPU(s)\n{listed.strip()}")
    by_nvml, by_smi = gpu.discover(), gpu.discover(nvml=None)
    for d in (by_nvml, by_smi):
        print(f"-- {gpu.describe(d)}")
        assert d.uuids == smi_uuids, f"{d.source} UUIDs {d.uuids} != nvidia-smi -L {smi_uuids}"
    u = smi_uuids[0]
    values = [None, "", "-1", "0", "0,-1", "0,1", "1,0", "0,abc", "0,0", "0, 0", " 0", "0 ", "00", "+0",
              "0x0", "0x1", "-0", "0,00", u, u[:8], "GPU-", u.upper(), "gpu-" + u[4:], "MIG-", f"0,{u}",
              f"{u[:8]},0", f"{u[:8]},{u}", f"{u[:8]},{u[:8]}", f" {u[:8]}", f"{u[:8]} "]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        torch_rows = list(pool.map(torch_view, values))
    rows, bad = [], 0
    print(f"\n{'CUDA_VISIBLE_DEVICES':<48} {'torch':>5} {'rt':>5} {'alloc':<28} {'nvml':>6} {'smi':>6}  ok")
    for value, t in zip(values, torch_rows):
        k_nvml, k_smi = kiln_view(value, gpu.IMPORT), kiln_view(value, None)
        ok = agrees(t, k_nvml) and agrees(t, k_smi)
        bad += not ok
        rows.append({"value": value, "torch": t, "kiln_nvml": k_nvml, "kiln_smi": k_smi, "ok": ok})
        print(f"{'unset' if value is None else repr(value):<48} {str(t['count']):>5} {str(t['runtime'])[:5]:>5} "
              f"{t['alloc'][:28]:<28} "
              f"{k_nvml:>6} {k_smi:>6}  {'yes' if ok else 'NO'}")
    topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True)
    print(f"\nnvidia-smi topo -m (rc {topo.returncode}), repr:\n{topo.stdout!r}")
    try:
        print(f"parsed: {alloc.parse_topo(topo.stdout)}")
    except ValueError as exc:
        print(f"parse_topo failed: {exc}")
        bad += 1
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, "topo": topo.stdout,
                                                   "smi_L": listed}, indent=1))
    print(f"\n{len(rows)} values, {bad} disagreement(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
