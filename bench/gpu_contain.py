"""Harness SIGKILL under a real tp=2 engine: does anything outlive the run? (issues 11 and 12)

    python3 bench/gpu_contain.py [--profile h200-2] [--tp 2] [--model tiny-llama] [--after 5]

Runs pytest (the harness) on a one-test file that borrows a tp=N server and
then blocks; once the server is ready, SIGKILLs pytest -- what a CI cancel or
a job timeout does -- and then counts, every 0.1 s for ``--watch`` seconds, the
engine processes by name/command line (VLLM::EngineCore, VLLM::Worker*, the
API server; zombies excluded: no reliance on kiln's own bookkeeping) and the
GPUs' memory against the baseline read before the launch. The figures at
``--after`` seconds are the verdict. Anything still alive at the end is
stopped by this script, by the pids it recorded as the harness's descendants
before the kill (it started them), so the machine is left clean either way.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pynvml

ROOT = Path(__file__).resolve().parent.parent
# vLLM and SGLang, renamed processes included (setproctitle: VLLM::<role>, sglang::<role>).
ENGINE_MARKS = ("VLLM::", "vllm.entrypoints", "api_server", "sglang::", "sglang.launch_server")
POLL_S = 0.1
PROBE = '''
import threading
from pathlib import Path
import pytest

@pytest.mark.model("default", tp={tp})
def test_hold(server):
    Path({flag!r}).write_text(str(server.tree.pid))
    threading.Event().wait({hold})  # the harness is "mid-run" until it is killed
'''


def engine_procs() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["name", "cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            text = " ".join([p.info["name"] or "", *(p.info["cmdline"] or [])])
            if any(m in text for m in ENGINE_MARKS) and p.pid != os.getpid():
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def gpu_used_mib() -> list[int]:
    return [pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used // 2**20
            for i in range(pynvml.nvmlDeviceGetCount())]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="h200-2")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--after", type=float, default=5.0)
    ap.add_argument("--watch", type=float, default=30.0)
    ap.add_argument("--ready-timeout", type=float, default=420.0)
    a = ap.parse_args()
    pynvml.nvmlInit()
    base = gpu_used_mib()
    print(f"baseline GPU MiB {base}; engine processes before: {len(engine_procs())}")
    work = Path(tempfile.mkdtemp(prefix="kiln-contain-", dir=ROOT / ".kiln")) if (ROOT / ".kiln").is_dir() \
        else Path(tempfile.mkdtemp(prefix="kiln-contain-"))
    flag = work / "ready"
    test = work / "test_hold.py"
    test.write_text(PROBE.format(tp=a.tp, flag=str(flag), hold=a.ready_timeout + 600))
    harness = subprocess.Popen(
        [sys.executable, "-m", "pytest", str(test), f"--kiln-profile={a.profile}",
         f"--kiln-model={a.model}", "-p", "no:cacheprovider", "-q", "-s", f"--rootdir={ROOT}"],
        cwd=ROOT, stdout=(work / "harness.log").open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + a.ready_timeout
    while not flag.exists() and harness.poll() is None and time.monotonic() < deadline:
        time.sleep(POLL_S)  # polling a condition with a deadline
    if not flag.exists():
        print(f"server never became ready (harness exit {harness.poll()}); log tail:")
        print("\n".join((work / "harness.log").read_text().splitlines()[-30:]))
        harness.kill()
        harness.wait()
        return 1
    tree = [harness.pid] + [p.pid for p in psutil.Process(harness.pid).children(recursive=True)]
    live = engine_procs()
    print(f"ready; harness pid {harness.pid}, server root {flag.read_text()}; descendants {len(tree) - 1}; "
          f"engine processes {len(live)}: {sorted(p.name() for p in live)}; GPU MiB {gpu_used_mib()}")
    # What the engine's processes are really called (name as ps shows it, then the
    # command line): the names kiln's leak scan (BackendSpec.process_names) must match.
    for pid in tree[1:]:
        try:
            p = psutil.Process(pid)
            print(f"  descendant {pid}: name {p.name()!r} cmdline {' '.join(p.cmdline())[:120]!r}")
        except psutil.NoSuchProcess:
            continue
    killed_at = time.monotonic()
    os.kill(harness.pid, signal.SIGKILL)
    harness.wait()
    gone_at, verdict = None, None
    while time.monotonic() - killed_at < a.watch:
        t = time.monotonic() - killed_at
        n, used = len(engine_procs()), gpu_used_mib()
        if n == 0 and gone_at is None:
            gone_at = t
        if verdict is None and t >= a.after:
            verdict = (n, used)
            print(f"{a.after:.0f} s after SIGKILL: engine processes {n}, GPU MiB {used} "
                  f"(baseline {base}, above: {[u - b for u, b in zip(used, base)]})")
        if verdict is not None and n == 0 and all(u - b < 1024 for u, b in zip(used, base)):
            break
        time.sleep(POLL_S)
    print(f"engine processes gone {gone_at:.2f} s after SIGKILL" if gone_at is not None
          else f"engine processes still alive {a.watch:.0f} s after SIGKILL")
    survivors = [psutil.Process(p) for p in tree[1:] if psutil.pid_exists(p)]
    survivors = [p for p in survivors if p.status() != psutil.STATUS_ZOMBIE]
    if survivors:
        print(f"cleaning up {len(survivors)} survivors by recorded pid: "
              f"{sorted((p.pid, p.name()) for p in survivors)}")
        for p in survivors:
            p.kill()
        psutil.wait_procs(survivors, timeout=30)
    print(f"after cleanup: engine processes {len(engine_procs())}, GPU MiB {gpu_used_mib()}")
    print("harness log tail:\n" + "\n".join((work / "harness.log").read_text().splitlines()[-15:]))
    return 0 if verdict is not None and verdict[0] == 0 else 3


if __name__ == "__main__":
    sys.exit(main())
