"""A bound is enforced only when measured: an estimate never fails a run.

Every bound in ci/kits/thresholds.py says where its value came from: its
reason starts with ``measured:`` (a cited run on that runner kind, or a row
``invoke calibrate`` wrote) or ``estimate:`` (a guess, another table's ratio,
another machine's figure). A test checks every bound and reports every figure;
:func:`judge` then splits the checks:

- a broken **measured** bound fails the test (``Judgement.failure``);
- an **estimate** is not enforced, broken or not: the test passes and says
  ``uncalibrated: run `invoke calibrate --profile P` `` in its output (a logged
  warning: e2e sessions show logs live, prints of a passing test are hidden), in its
  job-summary section and in the JUnit property ``kiln_uncalibrated``
  (ci/report/render.py counts it beside the verdict: "3 passed (1 uncalibrated...)").

Why pass rather than skip or xfail: the kit *did* run and its figures are real
(they are what calibrate would use); a skip would claim nothing ran, and would
trip the "every test skipped" rule on a lane where all bounds are estimates;
an xfail claims a known failure. A pass whose verdict line and summary say
"uncalibrated" states exactly what happened: measured, not judged.

A bound with neither label is treated as an estimate: what nobody measured is
never enforced (tests/unit/test_thresholds.py keeps every row labelled).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from ci.kits.thresholds import MEASURED, Bound


def is_measured(bound: Bound) -> bool:
    """True when ``bound``'s value came from a measurement (its reason says ``measured:``)."""
    return bound.reason.startswith(MEASURED)


def calibrate_command(profile: str, model: str | None = None) -> str:
    """The command that measures honest bounds for ``profile`` (and ``model``, when not its default)."""
    return f"invoke calibrate --profile {profile}" + (f" --model {model}" if model else "")


@dataclass(frozen=True)
class Check:
    """One bound checked against one figure: ``detail`` says how it broke (empty when ``ok``)."""

    name: str  # the bound, e.g. "perf.min_output_tok_s"
    bound: Bound
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class Judgement:
    """The checks of one test, split into what fails it and what was not enforced."""

    checks: tuple[Check, ...]
    profile: str
    model: str | None = None  # named in the calibrate command when not the profile's default

    @property
    def failures(self) -> list[Check]:
        """Broken measured bounds: these fail the test."""
        return [c for c in self.checks if not c.ok and is_measured(c.bound)]

    @property
    def uncalibrated(self) -> list[Check]:
        """Checks against estimates: reported, never enforced."""
        return [c for c in self.checks if not is_measured(c.bound)]

    def failure(self) -> str | None:
        """One line naming every broken measured bound, or None when nothing measured broke."""
        broken = self.failures
        if not broken:
            return None
        return "measured bound broken: " + "; ".join(c.detail for c in broken)

    def uncalibrated_line(self) -> str | None:
        """``uncalibrated: run `invoke calibrate --profile P` (...)``, or None when every bound was measured."""
        loose = self.uncalibrated
        if not loose:
            return None
        names = ", ".join(f"{c.name} {c.bound.value:g}" for c in loose)
        broken = [c.detail for c in loose if not c.ok]
        would = f"; would break: {'; '.join(broken)}" if broken else ""
        return (f"uncalibrated: run `{calibrate_command(self.profile, self.model)}` "
                f"(estimates, not enforced: {names}{would})")

    def markdown(self) -> str:
        """The job-summary line for what was not enforced ("" when everything was measured)."""
        line = self.uncalibrated_line()
        return f"**{line.split(':', 1)[0]}**:{line.split(':', 1)[1]}\n\n" if line else ""


def judge(checks: Iterable[Check], profile: str, model: str | None = None) -> Judgement:
    """Split ``checks`` by the rule: a broken measured bound fails; an estimate is reported only."""
    return Judgement(tuple(checks), profile, model)
