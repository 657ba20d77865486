"""``python -m ci.calibrate``: measure a runner kind N times and propose its bounds as a reviewable diff.

What `invoke calibrate --profile P` runs inside the profile's e2e session (ci/calibrate/command.py).
Each run launches a fresh server through the one launch path
(ci/engine/launch.py: the pool's args, environment, devices and crash
watch), runs the lane's kits against it (ci/calibrate/measure.py) and stops
it: a fresh launch per run, as every CI job gets, so launch-to-launch
variation is in the spread. Then every figure's min/median/max is printed
with the bound it proposes (ci/calibrate/derive.py says how and why), and
the measured table's diff is printed and saved to
``reports/calibrate-<profile>.patch``; ``--write`` applies it.

Exit 0 when every figure was proposed, 1 when a launch failed or a kit
failed in some run (the others are still proposed), 2 on bad input.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Sequence

from ci.calibrate import propose
from ci.calibrate.measure import RunFigures, measure_once, server_key
from ci.engine import launch, models
from ci.engine.backends import BackendSpec, get_backend
from ci.engine.server import Server, ServerError
from ci.kits import measured, thresholds
from ci.kits.client import ServerLike
from ci.profiles import runners

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RUNS = 3
# A median and a spread need three runs; with two, "the spread" is one difference.
MIN_RUNS = 3

StartServer = Callable[[], ContextManager[ServerLike]]


class CalibrateError(RuntimeError):
    """Calibration could not run (a launch failed, no GPU); one line, the cause."""


class UsageError(CalibrateError):
    """Bad input: an unknown profile or model, too few runs."""


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else the machine type."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    return platform.machine() or "unknown CPU"


def runner_description(profile: runners.Profile, discovery=None) -> str:
    """What the runs ran on, for the basis: the profile and its hardware (never a host name)."""
    if profile.vendor == "cpu" or discovery is None:
        return f"{profile.name} ({os.cpu_count()} CPUs, {cpu_model()})"
    used = [d.name for d in discovery.devices if d.index == discovery.visible[0]]  # launcher's GPU
    return f"{profile.name} ({used[0] if used else 'GPU'})"


def engine_description(backend: BackendSpec) -> str:
    """``<engine> <version>`` as installed in this interpreter."""
    return f"{backend.name} {backend.version() or '(version unknown)'}"


def launcher(profile: runners.Profile, backend: BackendSpec, model: str, log_dir: Path,
             discovery=None) -> StartServer:
    """A fresh server per call, built and started as the e2e pool starts its servers."""
    devices: tuple[int, ...] = ()
    memory = None
    if profile.vendor != "cpu":
        if discovery is None or len(discovery.visible) < 1:
            raise CalibrateError(f"profile {profile.name} needs a GPU; none visible")
        devices, memory = tuple(discovery.visible[:1]), launch.memory_guard(discovery)

    @contextlib.contextmanager
    def start() -> Iterator[ServerLike]:
        server: Server = launch.build_server(profile, backend, server_key(model), log_dir=log_dir,
                                             devices=devices, memory=memory)
        try:
            launch.start_watched(server)
            yield server
        except ServerError as exc:
            raise CalibrateError(f"launch failed: {exc.cause} (log: {server.log_path})") from None
        finally:
            server.stop()

    return start


def calibrate(profile: runners.Profile, model: str, runs: int, start: StartServer, *,
              basis: propose.Basis, kit_log_dir: Path | None = None,
              shape: thresholds.Thresholds | None = None) -> list[propose.Line]:
    """Launch ``runs`` servers one after another, measure each, and derive the proposals.

    The load (perf shape, occupancy settings) is the pair's row, else the
    profile's; ``shape`` replaces it (tests use a shorter one).
    """
    if runs < MIN_RUNS:
        raise UsageError(f"--runs must be >= {MIN_RUNS} (min/median/max of at least {MIN_RUNS} runs "
                         f"make a spread); got {runs}")
    try:
        current = thresholds.for_profile(profile.name, model)
    except thresholds.MissingThreshold:
        current = None  # a new pair: the profile's load shape, every bound proposed fresh
    shape = shape or current or thresholds.for_profile(profile.name)
    # The occupancy tests run the profile's default model only (ci/kits/measured.py).
    occupancy_too = model == profile.default_model
    results: list[RunFigures] = []
    for i in range(1, runs + 1):
        log.info("calibrate %s: run %d/%d, launching %s", profile.name, i, runs, model)
        kit_log = kit_log_dir / f"run-{i}.txt" if kit_log_dir else None
        with start() as server:
            results.append(measure_once(server, shape, model=model, occupancy_too=occupancy_too,
                                        kit_log=kit_log))
        log.info("calibrate %s: run %d/%d: %s", profile.name, i, runs,
                 ", ".join(f"{k} {v:.4g}" for k, v in results[-1].values.items()))
    return propose.lines(results, basis, current, results[0].kits)


def proposal(found: Sequence[propose.Line], table: Path = measured.TABLE) -> tuple[str, str]:
    """(the table's text today, its text with the proposed rows)."""
    old = table.read_text(encoding="utf-8") if table.is_file() else measured.render(())
    rows = [ln.row for ln in found if ln.row is not None]
    return old, measured.render(measured.merge(measured.load(table), rows))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: calibrate, print the figures and the diff, save the patch, write the table with --write."""
    parser = argparse.ArgumentParser(prog="python -m ci.calibrate", description=main.__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True, help="runner profile (ci/profiles/runners.py)")
    parser.add_argument("--model", default=None, help="model to calibrate (default: the profile's)")
    parser.add_argument("--runs", default=str(DEFAULT_RUNS), help=f"runs, >= {MIN_RUNS} (default {DEFAULT_RUNS})")
    parser.add_argument("--write", action="store_true", help=f"write {propose.TABLE_IN_REPO} (default: diff only)")
    parser.add_argument("--reports", type=Path, default=REPO / "reports", help="patch and logs go here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        if not args.runs.strip().isdigit():
            raise UsageError(f"--runs must be a whole number, got {args.runs!r}")
        runs = int(args.runs)
        try:
            profile = runners.get_profile(args.profile)
            model = models.check(args.model or profile.default_model)
            backend = get_backend(profile.backend)
        except ValueError as exc:  # an unknown profile or backend, a model that cannot be served
            raise UsageError(str(exc)) from None
        discovery = None
        if profile.vendor != "cpu":
            from ci.host import gpu  # noqa: PLC0415  (GPU runners only)
            discovery = gpu.discover()
        from ci.host import reaper  # trees a killed run left hold the memory and cores the runs need
        reaper.reap()
        logs = args.reports / "logs" / "calibrate"
        logs.mkdir(parents=True, exist_ok=True)
        basis = propose.Basis(profile.name, model, engine_description(backend),
                              runner_description(profile, discovery),
                              datetime.datetime.now(datetime.timezone.utc).date().isoformat())
        found = calibrate(profile, model, runs, launcher(profile, backend, model, logs, discovery),
                          basis=basis, kit_log_dir=logs)
    except (CalibrateError, ValueError, RuntimeError, OSError) as exc:
        log.error("calibrate: %s", exc)
        return 2 if isinstance(exc, UsageError) else 1
    return show(found, basis, runs, write=args.write, reports=args.reports)


def show(found: Sequence[propose.Line], basis: propose.Basis, runs: int, *, write: bool,
         reports: Path, table: Path = measured.TABLE) -> int:
    """Deliberate CLI output on stdout: the header, the table, the diff and what happened to it.

    Returns the exit status: 1 when a figure got no bound (its cause is logged), else 0.
    """
    old, new = proposal(found, table)
    patch = propose.diff(old, new)
    out = [f"calibrate {basis.profile}: {basis.model} on {basis.engine}, {basis.runner}, "
           f"{runs} runs, {basis.date}", propose.table(found), ""]
    if not patch:
        out.append("no change to the measured bounds")
    else:
        target = reports / f"calibrate-{basis.profile}.patch"
        target.write_text(patch, encoding="utf-8")
        out.append(patch.rstrip("\n"))
        if write:
            propose.write_atomically(table, new)
            out.append(f"written: {propose.TABLE_IN_REPO} (review it with `git diff`, commit it with its run)")
        else:
            out.append(f"not written: saved as {target}; apply it with `git apply {target}` "
                       f"or rerun with --write")
    sys.stdout.write("\n".join(out) + "\n")
    missing = [ln for ln in found if ln.row is None]
    for ln in missing:
        log.error("calibrate: no bound for %s: %s", ln.figure.name, ln.why_not)
    return 1 if missing else 0
