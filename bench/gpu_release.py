"""On a GPU machine: how soon kiln notices freed GPU memory, and what a leaked grandchild does.

    PYTHONUNBUFFERED=1 python3 bench/gpu_release.py [--device 0] [--repeats 5] [--gib 20] [--json-out F]

Prints measured figures (no pass/fail thresholds except the ones the issue
names, reported as "goal"):

1. NVML read cost: mean time of one memory reading (the poll's own price),
   inside an open NVML session and paying its own nvmlInit/nvmlShutdown.
2. Release latency, plain subprocess: start tests/fakes/gpu_server.py holding
   --gib GiB on one GPU, SIGKILL its process group; a 0.5 ms watcher records
   when NVML first shows the memory back. Two waiters are timed against it:
   "concurrent" (wait_released already polling when the kill lands: pure
   polling lag) and "after reap" (Server's order: kill, reap, then wait).
   Goal: detection <= 100 ms after NVML shows the memory free.
3. The same through ci.host.procs.ProcessTree.stop() (SIGTERM, graceful exit).
4. A server that leaves a setsid grandchild holding memory: killed by its
   process group (plain subprocess) the grandchild survives, wait_released
   fails, the ReleaseLedger makes it sticky and the next launch (a real
   ci.engine.server.Server) is refused naming device, bytes and PIDs. Then the same
   server under ci.host.procs.ProcessTree, whose tag finds and kills the grandchild.
5. ci.engine.teardown.stop_many on two fake servers sharing this GPU (one-GPU machine).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ci.host import gpu  # noqa: E402
from ci.host.gpu_telemetry import NvmlTelemetry  # noqa: E402
from ci.host.gpumem import (  # noqa: E402
    GIB, HEADROOM_BYTES, DeviceHeld, DeviceMemoryGuard, ReleaseError, ReleaseLedger, take_baselines,
    wait_released,
)

SERVER = ROOT / "tests" / "fakes" / "gpu_server.py"
GOAL_DETECT_S = 0.100
# torch import + CUDA init + allocation: seconds; two minutes means broken.
HEALTH_TIMEOUT_S = 120.0
HEALTH_POLL_S = 0.05
# The watcher's resolution for "NVML shows it free" (the reference clock).
WATCH_POLL_S = 0.0005
# How long the leak case waits before declaring the memory held: short, the
# point is the sticky failure, not the wait.
LEAK_WAIT_S = 3.0
# The fake's own lifetime cap: a bug here cannot hold the GPU past the lease.
FAKE_LIFETIME_S = 300.0
NVML_COST_READS = 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(port: int, proc_alive) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if not proc_alive():
            raise SystemExit("gpu_server exited before it was healthy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        threading.Event().wait(HEALTH_POLL_S)
    raise SystemExit(f"gpu_server not healthy after {HEALTH_TIMEOUT_S}s")


def server_argv(port: int, gib: float, *extra: str) -> list[str]:
    return [sys.executable, str(SERVER), "--port", str(port), "--gib", str(gib),
            "--max-lifetime-s", str(FAKE_LIFETIME_S), *extra]


class Watcher(threading.Thread):
    """Records the first moment NVML shows ``device`` at or below ``limit``."""

    def __init__(self, device: int, limit: int):
        super().__init__(daemon=True)
        self.device, self.limit = device, limit
        self.t_free: float | None = None
        self.started_polling = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        with NvmlTelemetry() as tele:
            while not self.stop.is_set():
                used = tele.used_bytes([self.device])[self.device]
                self.started_polling.set()
                if used <= self.limit:
                    self.t_free = time.monotonic()
                    return
                self.stop.wait(WATCH_POLL_S)


def nvml_cost(device: int) -> tuple[float, float]:
    """(one reading inside an open session, one reading that pays nvmlInit/nvmlShutdown)."""
    tele = NvmlTelemetry()
    with tele:
        start = time.perf_counter()
        for _ in range(NVML_COST_READS):
            tele.used_bytes([device])
        inside = (time.perf_counter() - start) / NVML_COST_READS
    start = time.perf_counter()
    for _ in range(NVML_COST_READS // 10):
        tele.used_bytes([device])
    return inside, (time.perf_counter() - start) / (NVML_COST_READS // 10)


def release_round(device: int, gib: float, env: dict, workdir: Path) -> dict:
    tele = NvmlTelemetry()
    base = take_baselines(tele, [device])
    port = free_port()
    with open(workdir / "release.log", "ab") as out:
        proc = subprocess.Popen(server_argv(port, gib), env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_health(port, lambda: proc.poll() is None)
        held = tele.used_bytes([device])[device] - base[device]
        watcher = Watcher(device, base[device] + HEADROOM_BYTES)
        watcher.start()
        watcher.started_polling.wait(HEALTH_TIMEOUT_S)
        concurrent: dict = {}

        def concurrent_wait():
            concurrent["released"] = wait_released(NvmlTelemetry(), base)
            concurrent["t"] = time.monotonic()
        waiter = threading.Thread(target=concurrent_wait)
        waiter.start()
        t_kill = time.monotonic()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        t_reaped = time.monotonic()
        after = wait_released(tele, base)
        t_after = time.monotonic()
        waiter.join()
        watcher.join(HEALTH_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    free = watcher.t_free
    return {"held_gib": held / GIB, "kill_to_reaped_ms": (t_reaped - t_kill) * 1e3,
            "kill_to_nvml_free_ms": (free - t_kill) * 1e3,
            "concurrent_detect_after_free_ms": (concurrent["t"] - free) * 1e3,
            "after_reap_detect_after_free_ms": (t_after - free) * 1e3,
            "after_reap_polls": after.polls, "concurrent_polls": concurrent["released"].polls}


def procs_round(device: int, gib: float, env: dict, workdir: Path) -> dict:
    from ci.host import procs
    tele = NvmlTelemetry()
    base = take_baselines(tele, [device])
    port = free_port()
    tree = procs.ProcessTree.spawn(server_argv(port, gib), log_path=workdir / "procs.log", env=env)
    try:
        wait_health(port, lambda: tree.poll() is None)
        t0 = time.monotonic()
        report = tree.stop(grace_s=15)
        t_stopped = time.monotonic()
        released = wait_released(tele, base)
    finally:
        tree.stop()
    return {"stop_s": t_stopped - t0, "graceful": report.terminated_gracefully, "exit": report.exit_code,
            "wait_after_stop_ms": released.elapsed_s * 1e3, "polls": released.polls}


def grandchild_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def kill_our_grandchild(pid_file: Path) -> bool:
    """SIGKILL the fake's grandchild, only if its command line proves it is ours."""
    import psutil
    pid = grandchild_pid(pid_file)
    if pid is None:
        return False
    try:
        p = psutil.Process(pid)
        if str(pid_file) not in " ".join(p.cmdline()) or "--grandchild" not in p.cmdline():
            return False
        p.kill()
        p.wait(10)
        return True
    except psutil.NoSuchProcess:
        return False


def leak_round(device: int, env: dict, workdir: Path) -> dict:
    from ci.engine.backends import generic
    from ci.engine.server import Server
    from ci.host import procs
    result: dict = {}
    tele = NvmlTelemetry()
    ledger = ReleaseLedger(workdir / "state")
    pid_file = workdir / "leak.pid"
    base = take_baselines(tele, [device])
    port = free_port()
    with open(workdir / "leak.log", "ab") as out:
        proc = subprocess.Popen(server_argv(port, 4, "--leak-grandchild", "--grandchild-gib", "4",
                                            "--pid-file", str(pid_file)),
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_health(port, lambda: proc.poll() is None)
        result["grandchild_pid"] = grandchild_pid(pid_file)
        result["nvml_pids_running"] = list(tele.pids([device])[device])
        os.killpg(proc.pid, signal.SIGKILL)   # the server's group; the setsid grandchild is not in it
        proc.wait()
        try:
            ledger.wait_released(tele, base, timeout_s=LEAK_WAIT_S, owner="gpu_server --leak-grandchild")
            result["wait"] = "released (unexpected)"
        except ReleaseError as exc:
            result["wait"] = str(exc)
        # The next launch on this device, through a real Server, must refuse.
        backend = generic(f"{{python}} {SERVER} --port {{port}} --gib 1")
        guard = DeviceMemoryGuard(tele, ledger)
        try:
            Server(backend, "fake", devices=(device,), memory=guard, log_dir=workdir,
                   env={"CUDA_VISIBLE_DEVICES": str(device)}).start()
            result["next_launch"] = "launched (unexpected)"
        except DeviceHeld as exc:
            result["next_launch"] = str(exc)
    finally:
        result["grandchild_killed_by_bench"] = kill_our_grandchild(pid_file)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    released = wait_released(tele, base)
    result["after_cleanup_wait_ms"] = released.elapsed_s * 1e3
    result["cleared"] = ledger.clear(telemetry=tele)
    ledger.check_launchable([device])
    # Same leak under ci.host.procs: the grandchild carries the run tag and is stopped with the tree.
    pid_file2 = workdir / "leak2.pid"
    port = free_port()
    tree = procs.ProcessTree.spawn(server_argv(port, 4, "--leak-grandchild", "--grandchild-gib", "4",
                                               "--pid-file", str(pid_file2)),
                                   log_path=workdir / "leak2.log", env=env)
    try:
        wait_health(port, lambda: tree.poll() is None)
        gc = grandchild_pid(pid_file2)
        result["procs_members"] = sorted(p.pid for p in tree.members())
        report = tree.stop(grace_s=5)
        result["procs_stop"] = {"seconds": report.seconds, "killed": report.killed,
                                "grandchild_pid": gc, "grandchild_alive": _alive(gc)}
        result["procs_wait"] = str(ledger.wait_released(tele, base, timeout_s=10).elapsed_s)
    except ReleaseError as exc:
        result["procs_wait"] = f"FAILED: {exc}"
    finally:
        tree.stop()
        if kill_our_grandchild(pid_file2):
            result["procs_grandchild_left_for_bench"] = True
    return result


def _alive(pid: int | None) -> bool:
    import psutil
    if pid is None or not psutil.pid_exists(pid):
        return False
    return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def stop_many_round(device: int, workdir: Path) -> dict:
    from ci.engine.backends import generic
    from ci.engine.server import Server
    from ci.engine.teardown import stop_many
    tele = NvmlTelemetry()
    guard = DeviceMemoryGuard(tele, ReleaseLedger())
    backend = generic(f"{{python}} {SERVER} --port {{port}} --gib 8 --max-lifetime-s {FAKE_LIFETIME_S}")
    env = {"CUDA_VISIBLE_DEVICES": str(device), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    base = take_baselines(tele, [device])[device]
    servers = [Server(backend, "fake", devices=(device,), memory=guard, log_dir=workdir, env=env,
                      key=f"fake-{i}", grace_s=10) for i in range(2)]
    try:
        for s in servers:
            s.start()
        running = tele.used_bytes([device])[device]
        t0 = time.monotonic()
        stop_many(servers)
        elapsed = time.monotonic() - t0
    finally:
        for s in servers:
            s.terminate()
    after = tele.used_bytes([device])[device]
    return {"held_gib": (running - base) / GIB, "stop_many_s": elapsed,
            "after_minus_baseline_mib": (after - base) / 2**20}


def summarize(rounds: list[dict], key: str) -> str:
    values = [r[key] for r in rounds]
    return f"median {statistics.median(values):.1f}  max {max(values):.1f}  (n={len(values)})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", type=int, default=0, help="physical GPU index")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gib", type=float, default=20.0)
    p.add_argument("--json-out")
    args = p.parse_args()
    d = gpu.discover()
    print(gpu.describe(d))
    if args.device not in d.visible:
        raise SystemExit(f"GPU {args.device} is not visible here ({list(d.visible)})")
    env = gpu.child_env(os.environ, d.vendor, [args.device])
    out: dict = {"device": args.device, "discovery_source": d.source}
    with tempfile.TemporaryDirectory(prefix="kiln-gpu-release-") as tmp:
        workdir = Path(tmp)
        inside, fresh = nvml_cost(args.device)
        out["nvml_read_ms"], out["nvml_read_with_init_ms"] = inside * 1e3, fresh * 1e3
        print(f"\n1. one NVML memory reading: {out['nvml_read_ms']:.3f} ms in an open session, "
              f"{out['nvml_read_with_init_ms']:.2f} ms with its own nvmlInit/nvmlShutdown")
        rounds = [release_round(args.device, args.gib, env, workdir) for _ in range(args.repeats)]
        out["release_rounds"] = rounds
        print(f"\n2. SIGKILL of a server holding {rounds[0]['held_gib']:.1f} GiB, {args.repeats} rounds (ms):")
        for key in ("kill_to_reaped_ms", "kill_to_nvml_free_ms", "concurrent_detect_after_free_ms",
                    "after_reap_detect_after_free_ms"):
            print(f"   {key:<34} {summarize(rounds, key)}")
        worst = max(max(r["concurrent_detect_after_free_ms"], r["after_reap_detect_after_free_ms"])
                    for r in rounds)
        print(f"   goal: detection <= {GOAL_DETECT_S * 1e3:.0f} ms after NVML shows it free: "
              f"{'met' if worst <= GOAL_DETECT_S * 1e3 else 'NOT met'} (worst {worst:.1f} ms)")
        out["procs_round"] = procs_round(args.device, args.gib, env, workdir)
        print(f"\n3. ci.host.procs.ProcessTree.stop (SIGTERM) then wait_released: {out['procs_round']}")
        out["leak_round"] = leak_round(args.device, env, workdir)
        print("\n4. setsid grandchild:")
        for k, v in out["leak_round"].items():
            print(f"   {k}: {v}")
        out["stop_many_round"] = stop_many_round(args.device, workdir)
        print(f"\n5. ci.engine.teardown.stop_many, two servers on GPU {args.device}: {out['stop_many_round']}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
