"""Flakes by data: runs, fails and fail rate per test and hardware profile, from a JUnit history.

The history is the JUnit files the workflows upload (``junit-<session>.xml``
in each run's artefact, downloaded as folders or the zip GitHub serves), or
any directory of them: every ``*.xml`` below it and every ``*.xml`` inside a
``*.zip`` below it is one run. A run's profile is its ``kiln_profile`` suite
property, else the known profile its ``junit-e2e-<profile>`` file name names; its time is
the suite's timestamp, else the file's mtime.

What counts (the rule ci/report/quarantine.py applies to these figures):
a run of a test is one case that passed or failed; a fail is a case that
failed or errored as ``test`` or ``engine``, or a quarantined test's expected
failure. Skips say nothing about the test; ``infra`` failures are the runner's
(they are retried, never quarantined) and are counted apart, not as runs.
"""
from __future__ import annotations

import logging
import os
import re
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, Iterator

from ci.profiles.runners import PROFILES
from ci.report import outcome
from ci.report.junit import ERROR, FAILED, PASSED, JUnitError, RunResult, parse_junit

log = logging.getLogger(__name__)

# A zip artefact is read member by member; a member bigger than this is not a
# JUnit file of ours (a 2,000-test run writes ~2 MB).
MAX_JUNIT_BYTES = 64 * 1024 * 1024
# A file named for its session: junit-e2e-<profile>.xml, perhaps with a suffix of the
# artefact's (junit-e2e-h100-4-123.xml); the profile is the longest known name it starts with.
_SESSION_FILE = re.compile(r"^junit-e2e-(?P<rest>.+)\.xml$")

PASS, FAIL, INFRA_FAIL = "pass", "fail", "infra"


class HistoryError(ValueError):
    """The history cannot be read: no such directory, or no JUnit file in it."""


@dataclass(frozen=True)
class Run:
    """One JUnit file of the history."""

    source: str
    profile: str
    when: datetime
    result: RunResult


@dataclass
class Series:
    """One test on one profile: its results oldest first, as (time, pass|fail|infra)."""

    nodeid: str
    profile: str
    results: list[tuple[datetime, str]] = field(default_factory=list)

    @property
    def runs(self) -> int:
        return sum(1 for _, r in self.results if r != INFRA_FAIL)

    @property
    def fails(self) -> int:
        return sum(1 for _, r in self.results if r == FAIL)

    @property
    def infra(self) -> int:
        return sum(1 for _, r in self.results if r == INFRA_FAIL)

    @property
    def fail_rate(self) -> float:
        return self.fails / self.runs if self.runs else 0.0

    def straight_passes(self) -> int:
        """Passes since the last fail (infra results neither break nor extend the streak)."""
        n = 0
        for _, r in reversed(self.results):
            if r == FAIL:
                break
            n += r == PASS
        return n


def _profile_of(name: str, result: RunResult) -> str:
    prop = result.prop(outcome.PROFILE_PROPERTY)
    if prop:
        return prop
    m = _SESSION_FILE.match(name)
    if m:
        rest = m.group("rest")
        known = [p for p in PROFILES if rest == p or (rest.startswith(p) and rest[len(p)] in "-_.")]
        if known:
            return max(known, key=len)
    return "unknown"


def _when(result: RunResult, fallback: float) -> datetime:
    if result.started:
        try:
            when = datetime.fromisoformat(result.started)
            return when if when.tzinfo else when.astimezone(timezone.utc)
        except ValueError:
            pass
    return datetime.fromtimestamp(fallback, timezone.utc)


def _sources(root: Path) -> Iterator[tuple[str, bytes, float]]:
    for path in sorted(root.rglob("*")):
        if path.suffix == ".xml" and path.is_file():
            yield str(path), path.read_bytes(), path.stat().st_mtime
        elif path.suffix == ".zip" and path.is_file():
            try:
                with zipfile.ZipFile(path) as zf:
                    for info in zf.infolist():
                        if info.filename.endswith(".xml") and info.file_size <= MAX_JUNIT_BYTES:
                            stamp = datetime(*info.date_time, tzinfo=timezone.utc).timestamp()
                            yield f"{path}:{info.filename}", zf.read(info), stamp
            except zipfile.BadZipFile as exc:
                log.warning("%s: not a zip artefact (%s); skipped", path, exc)


def read_history(root: str | os.PathLike) -> list[Run]:
    """Every JUnit run under ``root``, oldest first; a file that is not JUnit is skipped with a warning."""
    root = Path(root)
    if not root.is_dir():
        raise HistoryError(f"{root}: no such directory of JUnit files")
    runs = []
    for source, data, mtime in _sources(root):
        try:
            result = parse_junit(data, source=source)
        except JUnitError as exc:
            log.warning("%s; skipped", exc)
            continue
        runs.append(Run(source, _profile_of(Path(source.rpartition(":")[2] or source).name, result),
                        _when(result, mtime), result))
    if not runs:
        raise HistoryError(f"{root}: no JUnit XML files (*.xml, or *.xml inside *.zip artefacts) under it")
    return sorted(runs, key=lambda r: r.when)


def _result(case) -> str | None:
    if case.outcome == PASSED:
        return PASS
    if case.outcome in (FAILED, ERROR):
        return INFRA_FAIL if outcome.failure_class(case) == outcome.INFRA else FAIL
    if outcome.quarantined_fail(case):
        return FAIL
    return None  # skipped, or an xfail that is not a quarantine's


def series(runs: Iterable[Run], *, window: timedelta, now: datetime | None = None) -> list[Series]:
    """Per (test, profile): its results inside the window ending ``now``, sorted by fail rate, worst first."""
    now = now or datetime.now(timezone.utc)
    start = now - window
    found: dict[tuple[str, str], Series] = {}
    for run in runs:
        if not start <= run.when <= now:
            continue
        for case in run.result.cases:
            res = _result(case)
            if res is not None:
                found.setdefault((case.nodeid, run.profile), Series(case.nodeid, run.profile)).results.append(
                    (run.when, res))
    return sorted(found.values(), key=lambda s: (-s.fail_rate, -s.runs, s.profile, s.nodeid))


def table(rows: Iterable[Series], *, mark: dict[tuple[str, str], str] | None = None) -> str:
    """A fixed-width table: profile, runs, fails, rate, infra, straight passes, the decision, test."""
    mark = mark or {}
    lines = [f"{'profile':<12} {'runs':>5} {'fails':>5} {'rate':>6} {'infra':>5} {'streak':>6}  "
             f"{'decision':<11} test"]
    for s in rows:
        lines.append(f"{s.profile:<12} {s.runs:>5} {s.fails:>5} {s.fail_rate:>6.0%} {s.infra:>5} "
                     f"{s.straight_passes():>6}  {mark.get((s.nodeid, s.profile), ''):<11} {s.nodeid}")
    return "\n".join(lines)
