"""Warmup figures: the warm path's cost, and what warm caches buy vLLM-CPU's engine init.

    python bench/warmup.py [--vllm-python .nox/e2e-cpu/bin/python] [--skip-vllm]

1. Warm path, 5 marked specs (goal <= 2 s): five specs declared by real
   ``@pytest.mark.model`` tests in a scratch e2e folder are warmed once
   (a small fake engine, so the markers are real), then the whole warm
   ``invoke warmup`` path runs in a fresh interpreter, as the task would:
   pytest collection of the specs, version key, marker checks. It must launch
   no engine; its wall and CPU time are printed.
2. vLLM-CPU engine init, cold vs warm, in one run (goal >= 1.8x): the tiny
   model's spec is warmed with ``cold=True`` (kiln's caches cleared), its
   marker is removed, and it is warmed again with the caches the first launch
   left; ``--rounds`` such pairs, alternating. "Engine init" is vLLM's own
   figure from its log: "init engine (profile, create kv cache, warmup model)
   took X s", which contains the torch.compile/Inductor compile ("Warming up
   model for the compilation..."). The CPU seconds the engine's processes
   burned are printed beside it.

Timings on a shared 2-core runner move with its load (other jobs' engines);
the load average is printed beside them.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ci.engine.backends import VLLM_CPU, generic  # noqa: E402
from ci.engine.server import Server  # noqa: E402
from ci.profiles import runners  # noqa: E402
from ci.warmup import run as warmup  # noqa: E402
from ci.warmup.run import WarmupSpec  # noqa: E402

FAKE = ROOT / "tests" / "fakes" / "crashy_engine.py"
WARM_GOAL_S = 2.0
INIT_RATIO_GOAL = 1.8
INIT_LINE = re.compile(r"init engine \(.*?\) took ([0-9.]+) s")
# Where vLLM says it put its compiled artefacts: must be inside kiln's tree.
AOT_LINE = re.compile(r"(?:saved AOT compiled function to|load failure from|load AOT compilation from path) (/[^\s,]+)")
# vllm-cpu 0.32.0 cannot reload its own AOT artefact on CPU ("'function' object
# has no attribute 'finalize_loading'") and recompiles, hitting Inductor's cache.
RELOAD_FAILED = re.compile(r"Compiling model again due to a load failure from \S+, reason: (.*)")
LOADED = re.compile(r"Directly load AOT compilation from path")
SPEC_TESTS = "\n".join(
    f"@pytest.mark.model('bench-model-{i}', args=['--max-num-seqs', '{i}'])\ndef test_{i}(server): pass\n"
    for i in range(1, 6))


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def warm_path(tmp: Path) -> bool:
    tests = tmp / "e2e"
    tests.mkdir()
    (tests / "test_bench_specs.py").write_text("import pytest\n\n" + SPEC_TESTS)
    template = f"{{python}} {shlex.quote(str(FAKE))} --port {{port}} --model {{model}}"
    root, logs = tmp / "cache", tmp / "logs"
    first = warmup.warmup("cpu", tests=tests, backend=generic(template), root=root, log_dir=logs)
    assert [r.state for r in first] == ["cold"] * 5, warmup.format_table(first)
    # The warm path exactly as `invoke warmup` runs it (python -m ci.warmup in
    # the session's venv), in a fresh interpreter: imports, pytest collection
    # of the specs, version key, marker checks.
    argv = [sys.executable, "-m", "ci.warmup", "--profile", "cpu", "--tests", str(tests),
            "--backend", f"generic:{template}", "--log-dir", str(logs)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "KILN_CACHE_DIR": str(root)})
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        sys.exit(f"warm path failed:\n{done.stderr[-2000:]}")
    states = ",".join(m.group(1) for m in re.finditer(r"  (warm|cold|FAILED)  ", done.stdout))
    launched = len(list(logs.glob("server-*.log"))) - 5
    ok = states == ",".join(["warm"] * 5) and launched == 0 and wall <= WARM_GOAL_S
    print(f"warm path, 5 marked specs: {wall:.2f} s wall (fresh interpreter: imports + pytest collection "
          f"+ keys + markers), {cpu:.2f} s CPU incl. the collection child; states {states}; "
          f"engines launched {launched}; goal <= {WARM_GOAL_S:.0f} s: {'met' if ok else 'NOT met'} "
          f"(load average {load()})")
    return ok


class MeasuredServer(Server):
    """A Server that records its tree's CPU seconds just before it is stopped.

    Wall-clock engine init moves with the runner's load (other jobs' engines
    share its 2 cores); the CPU the engine's own processes burned does much
    less, so it is printed beside vLLM's wall figure.
    """

    cpu_s: float | None = None

    def terminate(self) -> None:
        if self.cpu_s is None and self.tree is not None:
            total = 0.0
            for proc in self.tree.members():
                try:
                    t = proc.cpu_times()
                    total += t.user + t.system + t.children_user + t.children_system
                except psutil.Error:
                    pass
            self.cpu_s = total
        super().terminate()


def vllm_cpu(tmp: Path, python: str, rounds: int) -> bool:
    argv0 = VLLM_CPU.argv

    def argv(model, port, tp, args):
        return [python, *argv0(model, port, tp, args)[1:]]
    backend = dataclasses.replace(VLLM_CPU, argv=argv)
    root, logs = tmp / "vllm-cache", tmp / "vllm-logs"
    spec = [WarmupSpec("tiny-llama")]
    profile = runners.get_profile("cpu")
    figures: dict[str, list[tuple[float, float]]] = {"cold": [], "warm": []}
    servers: list[MeasuredServer] = []

    def factory(*a, **kw):
        servers.append(MeasuredServer(*a, **kw))
        return servers[-1]
    # Cold and warm alternate, so a load spike from other jobs hits both sides.
    for n in range(1, rounds + 1):
        for label, cold in (("cold", True), ("warm", False)):
            (result,) = warmup.run_warmup(spec, profile=profile, backend=backend, root=root, cold=cold,
                                          log_dir=logs, server_factory=factory)
            if result.state != "cold":  # "cold" = it launched (whatever the caches held)
                sys.exit(f"vLLM-CPU {label} launch: {result.state}: {result.error} (log: {result.log_path})")
            text = result.log_path.read_text(errors="replace")
            init = INIT_LINE.search(text)
            if not init:
                sys.exit(f"no 'init engine ... took' line in {result.log_path}")
            aot = AOT_LINE.search(text)
            inside = bool(aot and Path(aot.group(1)).resolve().is_relative_to(root.resolve()))
            if not inside:
                sys.exit(f"vLLM did not put its compiled artefacts in kiln's cache {root}: {result.log_path}")
            reload = RELOAD_FAILED.search(text)
            how = ("AOT artefact reloaded" if LOADED.search(text) else
                   f"AOT reload failed ({reload.group(1)[:60]}), Inductor cache only" if reload else "compiled")
            figures[label].append((float(init.group(1)), servers[-1].cpu_s or 0.0))
            print(f"round {n} vLLM-CPU {label}: engine init {figures[label][-1][0]:.2f} s wall; engine CPU "
                  f"{figures[label][-1][1]:.1f} s; launch+request+stop {result.seconds:.1f} s; {how}; "
                  f"load average {load()}")
            result.marker.unlink()  # the next pass launches again, on the caches this one left
    med = statistics.median
    cold_init, warm_init = med(f[0] for f in figures["cold"]), med(f[0] for f in figures["warm"])
    cold_cpu, warm_cpu = med(f[1] for f in figures["cold"]), med(f[1] for f in figures["warm"])
    ratio = cold_init / warm_init
    ok = ratio >= INIT_RATIO_GOAL
    print(f"vLLM-CPU engine init, medians of {rounds}: cold {cold_init:.2f} s / warm {warm_init:.2f} s = "
          f"{ratio:.2f}x (goal >= {INIT_RATIO_GOAL}x: {'met' if ok else 'NOT met'}); engine CPU seconds "
          f"cold {cold_cpu:.1f} / warm {warm_cpu:.1f} = {cold_cpu / max(warm_cpu, 1e-9):.2f}x")
    return ok


E2E_CPU_PYTHON = Path(__file__).resolve().parents[1] / ".nox" / "e2e-cpu" / "bin" / "python"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-python", default=str(E2E_CPU_PYTHON),
                    help="interpreter with vllm-cpu installed (default: the e2e-cpu session's venv, "
                         "made by `nox -s e2e-cpu`)")
    ap.add_argument("--skip-vllm", action="store_true", help="only the warm-path figure")
    ap.add_argument("--rounds", type=int, default=2, help="cold/warm vLLM-CPU launch pairs (default 2)")
    ap.add_argument("-v", "--verbose", action="store_true", help="show kiln's progress lines")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="kiln-bench-warmup-") as tmp:
        ok = warm_path(Path(tmp))
        if not args.skip_vllm:
            ok = vllm_cpu(Path(tmp), args.vllm_python, args.rounds) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
