"""JIT warmup: launch every server the e2e tests declare once, so the suite's first launches are warm.

CUDA graphs die with their process; compile caches on disk (Triton, Inductor,
vLLM's AOT artefacts, DeepGEMM, FlashInfer) survive it. sglang #24253 went from
45 min cold to under 5 min warm this way. What kiln does differently:

- Specs come from the e2e tests' own ``@pytest.mark.model`` declarations
  (``pytest --collect-only --kiln-collect-keys``), and launch args are built
  the way the pytest plugin builds them, so warmup args cannot drift from test
  args (sglang kept a separate FALLBACK_ARGS dict).
- One marker per spec, keyed by ci.warmup.key (CUDA, driver and DeepGEMM
  included). Written atomically under a lock; a torn or foreign marker reads as
  absent. A warm spec launches no process at all.
- Each cold spec runs the real server (ci.engine.server.Server) with the cache env
  from ci.engine.caches, sends one short completion, and stops. Its own tagged tree;
  a timeout ends in SIGTERM then SIGKILL of every tagged process (never
  ``pkill``); a watchdog ends it early on a crash signature in the log.
- Independent specs run at once on disjoint GPUs (one at a time on CPU).
  Failures are reported, non-fatal unless ``strict``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import logging
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import requests

from ci.engine import caches, launch
from ci.engine.backends import BackendSpec, get_backend
from ci.engine.server import Server
from ci.host import alloc
from ci.profiles import runners
from ci.warmup import key as warmup_key
from ci.warmup.markers import MARKER_FORMAT, marker_path, read_marker, write_marker  # noqa: F401
from ci.warmup.specs import (  # noqa: F401  (re-exported: the warmup API in one import)
    REPO, WarmupError, WarmupSpec, collect_specs, load_specs, select,
)

log = logging.getLogger(__name__)

# Stands for "the port" in the engine command recorded in a marker (ports
# change every launch; a real port never is this one in a key).
_PORT_TOKEN = 65535
_AUTO = object()  # "build the default" for injectable arguments

# The one request each warmup sends: short, so warmup compiles the serving
# path (prefill + a few decode steps) without turning into a benchmark.
WARMUP_PROMPT = "Hello, warmup."
WARMUP_MAX_TOKENS = 4
# The first request can trigger lazy JIT the launch did not (sglang's DeepGEMM
# without precompile: "typically 10-20 mins"); 20 min covers that without
# letting a wedged server eat the whole job.
REQUEST_TIMEOUT_S = 1200.0
REQUEST_CONNECT_TIMEOUT_S = 5.0
# Progress line cadence: often enough that a 40-minute cold compile visibly
# lives in CI logs, rarely enough not to bury the engine's own lines.
PROGRESS_INTERVAL_S = 15.0


class WarmupFailed(WarmupError):
    """``strict`` and at least one spec failed; ``results`` holds every spec's outcome."""

    def __init__(self, cause: str, results: Sequence["WarmupResult"]):
        super().__init__(cause)
        self.results = list(results)


@dataclass
class WarmupResult:
    """What happened to one spec: ``state`` is "warm" (marker matched), "cold" (ran) or "failed"."""

    spec: WarmupSpec
    state: str
    seconds: float
    marker: Path
    error: str | None = None
    log_path: Path | None = None
    devices: tuple[int, ...] = ()


# ---------------------------------------------------------------- running

@dataclass
class _Job:
    spec: WarmupSpec
    launched: launch.Launch
    components: dict[str, str]
    key: str
    marker: Path
    number: str = ""
    phase: str = "queued"
    started: float = 0.0

    def enter(self, phase: str, detail: str = "") -> None:
        self.phase = phase
        elapsed = time.monotonic() - self.started if self.started else 0.0
        log.info("warmup %s %s: %s%s (%.0f s)", self.number, self.spec.label, phase, detail, elapsed)


@dataclass
class _Run:
    backend: BackendSpec
    profile: runners.Profile
    root: Path | None
    log_dir: Path
    launch_timeout_s: float
    request_timeout_s: float
    server_factory: Callable[..., Server]
    vendor: str
    memory: object = None  # ci.host.gpumem.DeviceMemoryGuard on GPU runners
    live: dict = field(default_factory=dict)  # id(job) -> Server, for cancellation
    lock: threading.Lock = field(default_factory=threading.Lock)


def _request(server: Server, timeout_s: float) -> None:
    body = {"model": server.served_model, "prompt": WARMUP_PROMPT, "max_tokens": WARMUP_MAX_TOKENS,
            "temperature": 0}
    try:
        resp = requests.post(server.base_url + "/v1/completions", json=body,
                             timeout=(REQUEST_CONNECT_TIMEOUT_S, timeout_s))
    except requests.Timeout as exc:
        raise WarmupError(f"warmup request: no answer within {timeout_s:g} s ({type(exc).__name__})") from exc
    except requests.RequestException as exc:
        raise WarmupError(f"warmup request failed: {type(exc).__name__}: {exc}"[:300]) from exc
    if resp.status_code != 200:
        raise WarmupError(f"warmup request: HTTP {resp.status_code}: {resp.text[:200]!r}")
    try:
        ok = bool(resp.json()["choices"])
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise WarmupError(f"warmup request: answer without choices: {resp.text[:200]!r}")


def _warm_one(job: _Job, devices: tuple[int, ...], run: _Run) -> WarmupResult:
    """Launch, request, stop; never raises (a failure is a result)."""
    job.started = time.monotonic()
    server = None
    try:
        # Built as the e2e pool builds its servers (ci/engine/launch.py): the same
        # env, devices and memory guard, from the args computed for the marker.
        server = launch.build_server(run.profile, run.backend, job.spec.key, log_dir=run.log_dir,
                                     devices=devices, memory=run.memory, cache_root=run.root,
                                     launch_timeout_s=run.launch_timeout_s,
                                     launched=job.launched, factory=run.server_factory)
        with run.lock:
            run.live[id(job)] = server
        job.enter("launching", f" on GPUs {list(devices)}" if devices else "")
        try:
            # The same watched start as the pool's, kept over the request (a
            # warmup request is where lazy kernels compile) and strict: a cache
            # is not marked warm from a launch that logged a crash.
            with launch.watched(server, "warmup", strict=True):
                server.start()
                job.enter("requesting")
                _request(server, run.request_timeout_s)
        finally:
            job.enter("stopping")
            server.stop()
        seconds = time.monotonic() - job.started
        write_marker(job.marker, {
            "format": MARKER_FORMAT, "key": job.key, "components": job.components,
            "spec": {"backend": job.spec.backend, "model": job.spec.model, "tp": job.spec.tp,
                     "args": list(job.spec.args), "tests": list(job.spec.tests)},
            "seconds": round(seconds, 2), "host": platform.node(), "log": str(server.log_path),
            "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
        job.enter("done", f", marker {job.marker}")
        return WarmupResult(job.spec, "cold", seconds, job.marker, None, server.log_path, devices)
    except Exception as exc:
        # ServerError carries a one-line cause (its str() appends the tail,
        # which Server has already logged on every path).
        cause = getattr(exc, "cause", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        log.error("warmup %s %s FAILED: %s", job.number, job.spec.label, cause)
        return WarmupResult(job.spec, "failed", time.monotonic() - job.started, job.marker, cause,
                            server.log_path if server is not None else None, devices)
    finally:
        with run.lock:
            run.live.pop(id(job), None)


def _report_progress(jobs: Sequence[_Job], done: threading.Event) -> None:
    while not done.wait(PROGRESS_INTERVAL_S):
        for job in jobs:
            if job.phase not in ("queued", "done") and job.started:
                log.info("warmup %s %s: still %s, %.0f s elapsed", job.number, job.spec.label, job.phase,
                         time.monotonic() - job.started)


def _execute(jobs: list[_Job], run: _Run, visible: Sequence[int]) -> list[WarmupResult]:
    """Run cold jobs: disjoint GPU sets at once on GPU runners, one at a time on CPU."""
    results: dict[int, WarmupResult] = {}
    done = threading.Event()
    reporter = threading.Thread(target=_report_progress, args=(jobs, done), name="warmup-progress", daemon=True)
    reporter.start()
    try:
        if run.vendor == "cpu":
            for job in jobs:
                results[id(job)] = _warm_one(job, (), run)
        else:
            _schedule(jobs, run, visible, results)
    except BaseException:
        # Cancelled (Ctrl-C, CI's SIGTERM turned KeyboardInterrupt): end every
        # live tree now so worker threads fail fast and nothing is left behind.
        with run.lock:
            live = list(run.live.values())
        for server in live:
            with contextlib.suppress(Exception):
                server.terminate()
        raise
    finally:
        done.set()
        reporter.join()
    return [results[id(j)] for j in jobs]


def _schedule(jobs: list[_Job], run: _Run, visible: Sequence[int], results: dict) -> None:
    free = set(visible)
    pending = list(jobs)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(visible)),
                                               thread_name_prefix="warmup") as pool:
        running: dict[concurrent.futures.Future, tuple[_Job, tuple[int, ...]]] = {}
        while pending or running:
            for job in list(pending):
                if job.spec.tp > len(visible):
                    pending.remove(job)
                    cause = f"needs {job.spec.tp} GPU(s); {len(visible)} visible"
                    log.error("warmup %s %s FAILED: %s", job.number, job.spec.label, cause)
                    results[id(job)] = WarmupResult(job.spec, "failed", 0.0, job.marker, cause)
                    continue
                devices = alloc.choose(free, job.spec.tp)
                if devices is not None:
                    pending.remove(job)
                    free -= set(devices)
                    running[pool.submit(_warm_one, job, devices, run)] = (job, devices)
            if not running:
                if pending:  # cannot happen: with nothing running every visible GPU is free
                    raise RuntimeError(f"warmup scheduler stuck with {len(pending)} spec(s) pending")
                break
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in finished:
                job, devices = running.pop(fut)
                free |= set(devices)
                results[id(job)] = fut.result()


def run_warmup(specs: Iterable[WarmupSpec], *, profile: runners.Profile, backend: BackendSpec | str | None = None,
               root: Path | None = None, cold: bool = False, strict: bool = False, log_dir: Path | None = None,
               launch_timeout_s: float | None = None, request_timeout_s: float = REQUEST_TIMEOUT_S,
               server_factory: Callable[..., Server] = Server, discovery=None,
               hardware: dict[str, str] | None = None, memory: object = _AUTO) -> list[WarmupResult]:
    """Warm every spec whose marker is missing or stale; return one result per spec, in order.

    ``cold`` clears kiln's caches (and so the markers) of the specs' engine
    first. ``strict`` raises WarmupFailed after all specs ran if any failed.
    ``server_factory``, ``discovery``, ``hardware`` and ``memory`` (the
    device-memory guard; by default the one the e2e pool uses, on GPU
    runners) are injection points.
    """
    backend = get_backend(backend or profile.backend) if not isinstance(backend, BackendSpec) else backend
    specs = [dataclasses.replace(s, backend=backend.name) for s in specs]
    if not specs:
        log.warning("warmup: the e2e tests declare no server; nothing to warm")
        if strict:
            raise WarmupFailed("nothing to warm: no e2e test declares a server", [])
        return []
    if cold:
        removed = caches.clear(root, specs)
        log.info("warmup --cold: cleared %s", ", ".join(map(str, removed)) or "nothing (caches were empty)")
    vendor = profile.vendor
    visible: Sequence[int] = ()
    if vendor != "cpu":
        if discovery is None:
            from ci.host import gpu  # noqa: PLC0415
            discovery = gpu.discover()
        visible = discovery.visible
    if memory is _AUTO:
        memory = launch.memory_guard(discovery) if vendor != "cpu" else None
    if hardware is None:
        hardware = warmup_key.hardware_facts(vendor, discovery=discovery)
    distributions = tuple(dict.fromkeys((*backend.distributions, *warmup_key.VERSIONED_DISTRIBUTIONS)))
    software = warmup_key.probe(warmup_key.engine_python(backend.command("probe", 1)), distributions)
    launch_env = {**dict(backend.env), **dict(profile.env)}
    command = [w.replace(str(_PORT_TOKEN), "{port}") for w in backend.command("{model}", _PORT_TOKEN)]
    results: dict[int, WarmupResult] = {}
    jobs: list[_Job] = []
    for n, spec in enumerate(specs, 1):
        t0 = time.monotonic()
        try:
            # exactly as the e2e pool builds them (ci/engine/launch.py)
            launched = launch.launch_args(profile, spec.key, backend)
        except (RuntimeError, ValueError, OSError) as exc:
            # A model that cannot be prepared here (a local model whose source
            # package the host cannot fetch, a missing directory) fails its own
            # spec, like a failed launch; the other specs still warm.
            log.warning("warmup [%d/%d] %s: model not prepared: %s", n, len(specs), spec.label, exc)
            results[n] = WarmupResult(spec, "failed", time.monotonic() - t0, marker_path(root, spec),
                                      f"model not prepared: {exc}")
            continue
        parts = warmup_key.components(backend=backend.name, model=spec.model, tp=spec.tp, args=launched.args,
                                      launch_env=launch_env, engine_distributions=backend.distributions,
                                      software=software, hardware=hardware, command=command)
        job = _Job(spec, launched, parts, warmup_key.key_of(parts), marker_path(root, spec),
                   number=f"[{n}/{len(specs)}]")
        if read_marker(job.marker, job.key, parts) is not None:
            log.info("warmup %s %s: warm (marker %s)", job.number, spec.label, job.marker)
            results[n] = WarmupResult(spec, "warm", time.monotonic() - t0, job.marker)
        else:
            jobs.append(job)
            results[n] = None  # filled below
    run = _Run(backend, profile, root, log_dir or REPO / "reports" / "logs" / "warmup",
               launch_timeout_s or profile.launch_timeout_s, request_timeout_s, server_factory, vendor, memory)
    ran = iter(_execute(jobs, run, visible)) if jobs else iter(())
    ordered = [results[n] or next(ran) for n in range(1, len(specs) + 1)]
    failed = [r for r in ordered if r.state == "failed"]
    if failed and strict:
        raise WarmupFailed(f"{len(failed)} of {len(ordered)} warmup(s) failed; first: "
                           f"{failed[0].spec.label}: {failed[0].error}", ordered)
    return ordered


def warmup(profile: str | runners.Profile, *, models: Sequence[str] = (), tests: str | Path = "tests/e2e",
           **kwargs) -> list[WarmupResult]:
    """Collect the specs the e2e tests declare for ``profile``, keep ``models``, and warm them."""
    prof = runners.get_profile(profile) if isinstance(profile, str) else profile
    specs = select(collect_specs(prof.name, tests), models)
    return run_warmup(specs, profile=prof, **kwargs)


def format_table(results: Sequence[WarmupResult]) -> str:
    """The table ``invoke warmup`` prints: spec, cold/warm, seconds, marker; then each failure's cause."""
    rows = [("spec", "state", "seconds", "marker")]
    rows += [(r.spec.label, r.state.upper() if r.state == "failed" else r.state, f"{r.seconds:.1f}", str(r.marker))
             for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    lines += [f"FAILED {r.spec.label}: {r.error}" + (f" (log: {r.log_path})" if r.log_path else "")
              for r in results if r.state == "failed"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI (what `invoke warmup` runs inside the e2e session's venv): warm, then print the table.

    Exit 0 when done (failures reported, non-fatal), 1 when ``--strict`` and a
    warmup failed, 2 on bad input.
    """
    parser = argparse.ArgumentParser(prog="python -m ci.warmup", description=main.__doc__.splitlines()[0])
    parser.add_argument("--profile", default=os.environ.get("KILN_PROFILE", "cpu"),
                        help="runner profile whose e2e declarations say what to warm (default: $KILN_PROFILE or cpu)")
    parser.add_argument("--cold", action="store_true", help="clear kiln's caches of the selected specs first")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any warmup fails")
    parser.add_argument("--model", action="append", default=[], help="warm only this model (repeatable)")
    parser.add_argument("--backend", default=None, help="override the profile's backend (e.g. generic:<template>)")
    parser.add_argument("--tests", default="tests/e2e", help="where the e2e tests live (default tests/e2e)")
    parser.add_argument("--log-dir", type=Path, default=None, help="server logs (default reports/logs/warmup)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from ci.host import reaper  # trees a killed run left on this host hold memory the warmup needs
    reaper.reap()  # logs one line per tree it stops
    try:
        results = warmup(args.profile, models=args.model, tests=args.tests, cold=args.cold,
                         strict=args.strict, backend=args.backend, log_dir=args.log_dir)
    except WarmupFailed as exc:
        if exc.results:
            sys.stdout.write(format_table(exc.results) + "\n")
        log.error("warmup: %s", exc)
        return 1
    except (WarmupError, ValueError) as exc:
        log.error("warmup: %s", exc)
        return 2
    # Deliberate CLI output: the table on stdout, progress lines on stderr.
    sys.stdout.write(format_table(results) + "\n")
    return 0
