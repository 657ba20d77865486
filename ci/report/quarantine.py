"""The quarantine file: tests that fail too often to trust, per hardware profile, with the figures why.

vLLM's rule, as data: a test goes in on a profile when, over the window (7
days), it ran at least ``MIN_RUNS`` times and failed between ``LOW`` and
``HIGH`` of them -- below it fails rarely enough to read each failure, above it
is broken, not flaky, and a quarantine would hide that. It comes out after
``RESTORE_PASSES`` straight passes. A quarantined test still runs and reports
(a non-strict xfail, ci/session/known_issues.py): it just does not fail the
job, and its passes are what bring it back.

``propose`` turns the current file and the history's figures
(ci/report/flakes.py) into the next file; ``invoke flakes`` prints the
difference and writes it only with ``--write``, like ``invoke calibrate``: a
quarantine is a reviewable change, never a silent one.
"""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterable

from ci.report import flakes
from ci.report.flakes import Series

# vLLM's quarantine band (the issue quotes it): 10-90 % over 7 days, >= 5 runs,
# restored after 5 straight passes.
LOW, HIGH = 0.10, 0.90
MIN_RUNS = 5
RESTORE_PASSES = 5
WINDOW = timedelta(days=7)
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "tests" / "quarantine.json"
PATH_ENV = "KILN_QUARANTINE"
# Decisions, as the table shows them. "broken" fails above the band: quarantine
# would hide a real breakage, so it stays red until fixed.
ENTER, STAY, LEAVE, BROKEN = "quarantine", "stays", "restored", "broken"


class QuarantineError(ValueError):
    """The quarantine file is not what kiln writes; the message names the file and the problem."""


@dataclass(frozen=True)
class Entry:
    """One quarantined (test, profile) and why: the figures that put it there."""

    nodeid: str
    profile: str
    reason: str
    since: str = ""

    def key(self) -> tuple[str, str]:
        return self.nodeid, self.profile


def default_path(environ=None) -> Path:
    """``$KILN_QUARANTINE``, else tests/quarantine.json."""
    env = os.environ if environ is None else environ
    return Path(env[PATH_ENV]) if env.get(PATH_ENV) else DEFAULT_PATH


def load(path: str | os.PathLike) -> list[Entry]:
    """The entries of the file at ``path``; none when it does not exist; one clear error when broken."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise QuarantineError(f"{path}: unreadable quarantine file ({exc})") from None
    items = data.get("quarantined") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise QuarantineError(f"{path}: expected an object with a 'quarantined' list")
    entries = []
    for n, item in enumerate(items):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) and item.get(k)
                                                 for k in ("nodeid", "profile", "reason")):
            raise QuarantineError(f"{path}: entry {n} needs non-empty nodeid, profile and reason strings")
        entries.append(Entry(item["nodeid"], item["profile"], item["reason"], str(item.get("since", ""))))
    return entries


def dump(entries: Iterable[Entry]) -> str:
    """The file's text for ``entries`` (sorted, so a diff shows only what changed)."""
    rows = sorted(entries, key=lambda e: (e.profile, e.nodeid))
    return json.dumps({"rule": rule_text(), "quarantined": [asdict(e) for e in rows]}, indent=1) + "\n"


def rule_text() -> str:
    """The rule in one line, as the file and the CLI state it."""
    return (f"in: {LOW:.0%}-{HIGH:.0%} fail rate over {WINDOW.days} days with >= {MIN_RUNS} runs; "
            f"out: after {RESTORE_PASSES} straight passes")


def figures(s: Series, window: timedelta = WINDOW) -> str:
    """The reason an entry carries: the figures of its series."""
    first, last = s.results[0][0], s.results[-1][0]
    return (f"fail rate {s.fail_rate:.0%} ({s.fails} of {s.runs} runs, {first:%Y-%m-%d}..{last:%Y-%m-%d}, "
            f"{window.days}-day window); quarantined by invoke flakes")


def in_band(s: Series) -> bool:
    """The entry rule: enough runs, a fail rate inside the band."""
    return s.runs >= MIN_RUNS and LOW <= s.fail_rate <= HIGH


def propose(current: Iterable[Entry], rows: Iterable[Series], window: timedelta = WINDOW,
            ) -> tuple[list[Entry], dict[tuple[str, str], str]]:
    """The next quarantine and each series' decision (quarantine / stays / restored / broken / "").

    A quarantined test stays until its last RESTORE_PASSES results are passes,
    even when its rate left the band: the streak, not the average, says it is fixed.
    """
    held = {e.key(): e for e in current}
    decided: dict[tuple[str, str], str] = {}
    out: dict[tuple[str, str], Entry] = {}
    seen = set()
    for s in rows:
        key = (s.nodeid, s.profile)
        seen.add(key)
        if key in held:
            if s.straight_passes() >= RESTORE_PASSES:
                decided[key] = LEAVE
            else:
                decided[key] = STAY
                out[key] = held[key]
        elif in_band(s):
            decided[key] = ENTER
            out[key] = Entry(s.nodeid, s.profile, figures(s, window), f"{s.results[-1][0]:%Y-%m-%d}")
        elif s.runs >= MIN_RUNS and s.fail_rate > HIGH:
            decided[key] = BROKEN
    for key, entry in held.items():
        if key not in seen:  # no runs in the window: no evidence it is fixed
            out[key] = entry
    return list(out.values()), decided


@dataclass(frozen=True)
class Review:
    """What ``invoke flakes`` shows: the history's figures, each decision, the file before and after."""

    runs: int
    rows: list[Series]
    decided: dict[tuple[str, str], str]
    before: str
    after: str
    path: Path

    def changed(self) -> bool:
        return self.before != self.after

    def diff(self) -> str:
        """The proposed change to the quarantine file, as a unified diff ("" when none)."""
        return "".join(difflib.unified_diff(self.before.splitlines(keepends=True), self.after.splitlines(keepends=True),
                                            f"a/{self.path.name}", f"b/{self.path.name}"))

    def text(self, everything: bool = False) -> str:
        """The table (tests that failed or changed state; all with ``everything``) and a summary line."""
        shown = [s for s in self.rows if everything or s.fails or s.infra or self.decided.get((s.nodeid, s.profile))]
        clean = len(self.rows) - len(shown)
        lines = [f"{self.runs} JUnit runs; {len(self.rows)} (test, profile) series; rule: {rule_text()}",
                 flakes.table(shown, mark=self.decided)]
        if clean:
            lines.append(f"... and {clean} more that passed every run")
        return "\n".join(lines)


def review(history: str | os.PathLike, path: str | os.PathLike, *, window: timedelta = WINDOW,
           now: datetime | None = None) -> Review:
    """Read the history under ``history``, apply the rule to the quarantine at ``path``; writes nothing."""
    runs = flakes.read_history(history)
    rows = flakes.series(runs, window=window, now=now)
    path = Path(path)
    current = load(path)
    proposed, decided = propose(current, rows, window)
    before = dump(current) if path.exists() else ""
    after = dump(proposed) if proposed or path.exists() else ""  # no file and nothing to quarantine: none
    return Review(len(runs), rows, decided, before, after, path)
