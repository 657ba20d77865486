"""Measured bounds: the table ``invoke calibrate --write`` rewrites and ci/kits/thresholds.py reads.

A data file rather than Python because a program rewrites it: loading rows,
replacing some and rendering them again is safe where editing Python
expressions is not, and the review diff shows one line per bound that
changed, with its whole basis on that line (runner, engine and version,
model, date, n, min/median/max, the rule that made the bound).

Each row sets one bound of one (profile, model) pair; ci/kits/thresholds.py lays it over
that pair's estimate. ``bound`` names it as calibrate does:
``perf.<PerfBudget field>``, ``accuracy`` (the model's floor) or
``occupancy.threshold`` / ``occupancy.step_busy_min`` (occupancy rows only for
the profile's default model: the occupancy tests run that one).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable

from ci.profiles.runners import PROFILES

# Beside thresholds.py: whoever reads a bound's reason finds the table by its name.
TABLE = Path(__file__).with_name("measured_bounds.json")
ABOUT = ("Measured bounds, one row per bound: written by `invoke calibrate --profile P --write` "
         "(ci/calibrate/), laid over the estimates by ci/kits/thresholds.py. Rerun calibrate "
         "rather than editing a row by hand: the basis must stay the run's.")


@dataclass(frozen=True)
class MeasuredRow:
    """One bound and the runs it came from; ``rule`` says how ``value`` was derived from them."""

    profile: str
    model: str
    bound: str
    value: float
    rule: str
    n: int
    min: float
    median: float
    max: float
    unit: str
    engine: str
    runner: str
    date: str

    @property
    def key(self) -> tuple[str, str, str]:
        """What a newer row of the same bound replaces: (profile, model, bound)."""
        return (self.profile, self.model, self.bound)

    def reason(self) -> str:
        """The Bound's reason: ``measured:`` and the basis, as a test prints it beside the figure."""
        unit = f" {self.unit}" if self.unit else ""
        return (f"measured: invoke calibrate on {self.runner}, {self.engine}, {self.model}, "
                f"{self.date}, n={self.n}: min {self.min:.4g} / median {self.median:.4g} / "
                f"max {self.max:.4g}{unit}; bound = {self.rule}")


# The bounds a row may set (fields of ci/kits/thresholds.py's PerfBudget and
# OccupancyThresholds; "accuracy" is the model's floor).
PERF_BOUNDS = ("min_output_tok_s", "max_ttft_p50_s", "max_ttft_p95_s", "max_latency_p50_s",
               "max_latency_p95_s")
OCCUPANCY_BOUNDS = ("threshold", "step_busy_min")
# The reference kit's logprob tolerance, by the dtype served (the real model's).
REFERENCE_BOUNDS = ("float32", "bfloat16")
BOUNDS = ("accuracy", *(f"perf.{b}" for b in PERF_BOUNDS), *(f"occupancy.{b}" for b in OCCUPANCY_BOUNDS),
          *(f"reference.{b}" for b in REFERENCE_BOUNDS))
_FIELDS = tuple(f.name for f in fields(MeasuredRow))
_NUMBERS = ("value", "min", "median", "max")


def _row(raw: object, where: str) -> MeasuredRow:
    """One validated row; a bad one fails in one line naming ``where`` and the cause."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: not an object")
    missing = [f for f in _FIELDS if f not in raw]
    extra = sorted(set(raw) - set(_FIELDS))
    if missing or extra:
        raise ValueError(f"{where}: " + "; ".join(
            p for p in (f"missing {', '.join(missing)}" if missing else "",
                        f"unknown {', '.join(extra)}" if extra else "") if p))
    for name in _NUMBERS:
        value = raw[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: {name} must be a finite number, got {value!r}")
    if isinstance(raw["n"], bool) or not isinstance(raw["n"], int) or raw["n"] < 1:
        raise ValueError(f"{where}: n must be a positive integer, got {raw['n']!r}")
    for name in set(_FIELDS) - set(_NUMBERS) - {"n", "unit"}:
        if not isinstance(raw[name], str) or not raw[name].strip():
            raise ValueError(f"{where}: {name} must be a non-empty string, got {raw[name]!r}")
    if raw["profile"] not in PROFILES:
        raise ValueError(f"{where}: unknown profile {raw['profile']!r}; known: {', '.join(PROFILES)}")
    if raw["bound"] not in BOUNDS:
        raise ValueError(f"{where}: unknown bound {raw['bound']!r}; known: {', '.join(BOUNDS)}")
    default = PROFILES[raw["profile"]].default_model
    if raw["bound"].startswith("occupancy.") and raw["model"] != default:
        # tests/e2e/test_occupancy.py checks occupancy on the profile's default model only.
        raise ValueError(f"{where}: occupancy bounds of {raw['profile']} are for its default model "
                         f"{default!r}, not {raw['model']!r}")
    if not raw["min"] <= raw["median"] <= raw["max"]:
        raise ValueError(f"{where}: min <= median <= max does not hold "
                         f"({raw['min']}, {raw['median']}, {raw['max']})")
    return MeasuredRow(**{**raw, **{k: float(raw[k]) for k in _NUMBERS}})


def parse(text: str, source: str = TABLE.name) -> tuple[MeasuredRow, ...]:
    """The rows of a table's text; a broken table fails in one line naming ``source``."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{source}: not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise ValueError(f"{source}: expected an object with a 'rows' list")
    rows = tuple(_row(raw, f"{source} row {i}") for i, raw in enumerate(doc["rows"], 1))
    seen: set[tuple[str, str, str]] = set()
    for row in rows:
        if row.key in seen:
            raise ValueError(f"{source}: two rows for {row.key}; one bound, one row")
        seen.add(row.key)
    return rows


def load(path: Path = TABLE) -> tuple[MeasuredRow, ...]:
    """The rows of the table at ``path``; none when it does not exist yet."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return ()
    return parse(text, Path(path).name)


def render(rows: Iterable[MeasuredRow]) -> str:
    """The table's text: sorted rows, one per line, so a diff shows one line per changed bound."""
    ordered = sorted(rows, key=lambda r: r.key)
    lines = [json.dumps(asdict(r), ensure_ascii=False) for r in ordered]
    body = "".join(f"  {line}{',' if i < len(lines) - 1 else ''}\n" for i, line in enumerate(lines))
    return (f'{{\n "about": {json.dumps(ABOUT)},\n "rows": [\n{body} ]\n}}\n' if lines
            else f'{{\n "about": {json.dumps(ABOUT)},\n "rows": []\n}}\n')


def merge(current: Iterable[MeasuredRow], proposed: Iterable[MeasuredRow]) -> tuple[MeasuredRow, ...]:
    """``current`` with each ``proposed`` row replacing the row of the same bound (or added)."""
    out = {r.key: r for r in current}
    out.update((r.key, r) for r in proposed)
    return tuple(sorted(out.values(), key=lambda r: r.key))
