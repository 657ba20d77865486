"""The durations store: how long each e2e test takes, per runner profile, from the JUnit of earlier runs.

``--shard i/n`` packs tests by these figures and ``invoke plan`` sizes the
matrix from them, so they must stay true: SGLang's hand-written estimates were
~1.5x off and made 52-68 min partitions next to 17 min ones (sglang #25193),
and a configuration with no history timed out one PyTorch shard after 5 hours.
So the figures are never written by hand: the store is the JUnit files
themselves, compacted -- per profile and test, the durations of its recent
runs, each with the server key it ran against -- and every run's JUnit is fed
back in (``invoke durations --junit DIR``; the workflows' report job does it).

Reading it:

- a test's estimate is the p90 of its samples (SGLang's rule: a shard sized by
  the mean overruns half the time), over the samples taken with the server key
  of its newest one: a test whose server changed (other launch args, another
  model) has its old timings dropped rather than mixed in;
- the window is bounded (WINDOW_DAYS, MAX_SAMPLES per test): an old timing
  describes a suite and an engine that have moved on;
- a test with no history costs the median of its file's tests, then of the
  suite's, then DEFAULT_ESTIMATE_S when the profile has no history at all;
- a test's time is its own: what it waited for servers (WAIT_PROPERTY: the
  session's prelaunch for the first test, its own borrow otherwise) is taken
  out, and each launch that completed in that wait (LAUNCH_PROPERTY) is a
  sample of its server key's launch. The packer charges a key's launch p90
  once to every shard that launches it: booked on whichever test waited, the
  cpu lane's first tiny-model test carried both servers' prelaunch (~56 s) and
  the real-model tests none, so the shard holding them ran ~40-60 s over its
  estimate. JUnit without these properties reads as no wait and no launches.

Reading never drops a sample by today's date: the shards of one matrix start
minutes apart and must all see the same figures, so the window is applied when
the store is built (``invoke durations``), and a shard trusts what it was handed.

A case counts when it passed, or failed against a healthy server (class
``test``, or untyped): a skip or xfail took no time, and an infra or engine
failure ended early or hung, neither of which is how long the test takes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ci.report import outcome
from ci.report.flakes import Run
from ci.report.junit import FAILED, PASSED, CaseResult

log = logging.getLogger(__name__)

# Format 2 added the launches; a format-1 store still loads (it has none).
STORE_FORMAT = 2
READABLE_FORMATS = (1, STORE_FORMAT)
# Where the store lives unless told (gitignored, beside kiln's cache root): the
# workflows restore it there from the cache of the last green run on the default branch.
STORE_ENV = "KILN_DURATIONS"
_REPO = Path(__file__).resolve().parents[2]
# Two weeks: ~14 nightly runs plus the PRs, enough for a p90; older timings are
# of an engine and a suite that have since changed.
WINDOW_DAYS = 14
# Per test: a p90 over 20 samples puts 2 above it; the file stays small (a
# 2,000-test suite is ~1 MB) however long the history.
MAX_SAMPLES = 20
P90 = 0.9
# With no history at all a test is assumed to take a minute: a small e2e test
# plus its share of a server launch. Any real history replaces this.
DEFAULT_ESTIMATE_S = 60.0
# Run ids remembered so feeding the same JUnit twice adds nothing; older ones
# have left the window anyway.
MAX_RUN_IDS = 2000
# The JUnit properties the pytest plugin writes and the store reads (ci/session/waits.py).
SERVER_PROPERTY = "kiln_server"
WAIT_PROPERTY = "kiln_server_wait_s"  # seconds the test waited for servers, launches included
LAUNCH_PROPERTY = "kiln_launch"       # "<server key>=<seconds launch to ready>", one per launch
# Where an estimate came from, best first.
HISTORY, FILE_MEDIAN, SUITE_MEDIAN, DEFAULT = "history", "file median", "suite median", "default"
SOURCES = (HISTORY, FILE_MEDIAN, SUITE_MEDIAN, DEFAULT)


class DurationsError(ValueError):
    """The store file cannot be read or is not a kiln durations store."""


def default_path() -> Path:
    """``$KILN_DURATIONS``, else ``<repo>/.kiln/durations.json``."""
    env = os.environ.get(STORE_ENV)
    return Path(env) if env else _REPO / ".kiln" / "durations.json"


@dataclass(frozen=True)
class Sample:
    """One timed run of one test: when, how long, against which server key ('' for none)."""

    when: datetime
    seconds: float
    server: str = ""


def _counts(case: CaseResult) -> bool:
    if case.outcome == PASSED:
        return True
    return case.outcome == FAILED and outcome.failure_class(case) not in (outcome.INFRA, outcome.ENGINE)


def _seconds(text: str | None) -> float:
    """A property's seconds; absent or unreadable is 0 (old JUnit, a hand-edited file)."""
    try:
        return max(0.0, float(text or 0))
    except ValueError:
        return 0.0


def _launches(case: CaseResult) -> list[tuple[str, float]]:
    """(server key, seconds) of every launch recorded on ``case``."""
    # rpartition: the key itself has '=' in it (tiny-llama|tp=1|).
    found = [value.rpartition("=") for name, value in case.properties if name == LAUNCH_PROPERTY]
    return [(key, _seconds(seconds)) for key, sep, seconds in found if sep and key]


def _prune(per_key: dict[str, list[Sample]], start: datetime, keep: int) -> None:
    """In place: each key's samples since ``start``, the newest ``keep``; keys left with none go."""
    for name in list(per_key):
        kept = sorted((s for s in per_key[name] if s.when >= start), key=lambda s: s.when)[-keep:]
        if kept:
            per_key[name] = kept
        else:
            del per_key[name]


def p90(values: Sequence[float]) -> float:
    """The 90th percentile (inclusive method: never beyond the largest sample)."""
    if not values:
        raise ValueError("p90 of no values")
    if len(values) == 1:
        return float(values[0])
    return statistics.quantiles(values, n=10, method="inclusive")[int(P90 * 10) - 1]


def _iso(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat(timespec="seconds")


def _parse_when(text: str, where: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        raise DurationsError(f"{where}: bad timestamp {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def run_id(run: Run) -> str:
    """What identifies one JUnit run across artefact downloads: its profile, file name and start time."""
    return f"{run.profile}|{Path(run.source.rpartition(':')[2] or run.source).name}|{run.when.isoformat()}"


@dataclass
class Store:
    """Per profile, per test node id: its samples, oldest first; and per profile, per server key:
    its launches (seconds from launch to ready), oldest first."""

    tests: dict[str, dict[str, list[Sample]]] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)
    launches: dict[str, dict[str, list[Sample]]] = field(default_factory=dict)

    # -- building -----------------------------------------------------------
    def ingest(self, runs: Iterable[Run]) -> int:
        """Add every run not seen before; returns how many were new. Runs of an unknown profile are skipped."""
        seen, added = set(self.runs), 0
        for run in runs:
            rid = run_id(run)
            if run.profile == "unknown":
                log.info("durations: %s names no runner profile (kiln_profile); not added", run.source)
                continue
            if rid in seen:
                continue
            seen.add(rid)
            self.runs.append(rid)
            added += 1
            per_test = self.tests.setdefault(run.profile, {})
            per_key = self.launches.setdefault(run.profile, {})
            for case in run.result.cases:
                # A launch that reached ready took its time whatever the test did after it.
                for key, seconds in _launches(case):
                    per_key.setdefault(key, []).append(Sample(run.when, seconds))
                if _counts(case):
                    seconds = max(0.0, case.duration - _seconds(case.prop(WAIT_PROPERTY)))
                    per_test.setdefault(case.nodeid, []).append(
                        Sample(run.when, seconds, case.prop(SERVER_PROPERTY) or ""))
            if not per_key:
                del self.launches[run.profile]
        return added

    def prune(self, now: datetime | None = None, *, days: int = WINDOW_DAYS, keep: int = MAX_SAMPLES) -> None:
        """Drop samples older than ``days`` and all but the newest ``keep`` of each test and server key."""
        start = (now or datetime.now(timezone.utc)) - timedelta(days=days)
        for section in (self.tests, self.launches):
            for profile in list(section):
                _prune(section[profile], start, keep)
                if not section[profile]:
                    del section[profile]
        self.runs = self.runs[-MAX_RUN_IDS:]

    # -- files --------------------------------------------------------------
    def to_json(self) -> dict:
        return {"kiln_durations": STORE_FORMAT, "window_days": WINDOW_DAYS, "max_samples": MAX_SAMPLES,
                "runs": self.runs,
                "profiles": {p: {t: [[_iso(s.when), round(s.seconds, 3), s.server] for s in samples]
                                 for t, samples in sorted(tests.items())}
                             for p, tests in sorted(self.tests.items())},
                "launches": {p: {k: [[_iso(s.when), round(s.seconds, 3)] for s in samples]
                                 for k, samples in sorted(keys.items())}
                             for p, keys in sorted(self.launches.items())}}

    def digest(self) -> str:
        """sha256 of the canonical JSON: shards of one matrix prove they split by the same store."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write atomically (a cancelled job never leaves half a store for the next run to trip on)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".durations-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(self.to_json(), fh, indent=1, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Store:
        """The store at ``path``; an absent file is an empty store, a broken one a DurationsError."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise DurationsError(f"{path}: not a readable durations store ({exc})") from None
        if not isinstance(data, dict) or data.get("kiln_durations") not in READABLE_FORMATS:
            raise DurationsError(f"{path}: not a kiln durations store (format "
                                 f"{' or '.join(map(str, READABLE_FORMATS))}); "
                                 f"rebuild it: invoke durations --junit DIR --store {path}")
        store = cls(runs=[str(r) for r in data.get("runs") or ()])
        for profile, tests in (data.get("profiles") or {}).items():
            for nodeid, rows in (tests or {}).items():
                try:
                    store.tests.setdefault(profile, {})[nodeid] = [
                        Sample(_parse_when(w, f"{path}: {nodeid}"), float(s), str(k)) for w, s, k in rows]
                except (TypeError, ValueError) as exc:
                    raise DurationsError(f"{path}: {nodeid}: bad sample ({exc})") from None
        for profile, keys in (data.get("launches") or {}).items():  # format 1 has none
            for key, rows in (keys or {}).items():
                try:
                    store.launches.setdefault(profile, {})[key] = [
                        Sample(_parse_when(w, f"{path}: launch of {key}"), float(s)) for w, s in rows]
                except (TypeError, ValueError) as exc:
                    raise DurationsError(f"{path}: launch of {key}: bad sample ({exc})") from None
        return store

    # -- reading ------------------------------------------------------------
    def estimates(self, profile: str) -> Estimates:
        """What the store knows about ``profile``'s tests, ready for the packer."""
        per_test = self.tests.get(profile, {})
        figures, servers, whens = {}, {}, set()
        for nodeid, samples in per_test.items():
            if not samples:
                continue
            key = samples[-1].server
            current = [s.seconds for s in samples if s.server == key]
            figures[nodeid], servers[nodeid] = p90(current), key
            whens.update(s.when for s in samples)
        launches = {k: p90([s.seconds for s in samples])
                    for k, samples in self.launches.get(profile, {}).items() if samples}
        return Estimates(profile, figures, {t: k for t, k in servers.items() if k},
                         runs=len(whens), newest=max(whens, default=None), digest=self.digest(),
                         launches=launches)


@dataclass(frozen=True)
class Coverage:
    """How many of a selection's tests got their estimate from where."""

    counts: Mapping[str, int]
    fallback_files: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def line(self) -> str:
        parts = [f"history for {self.counts.get(HISTORY, 0)} of {self.total} tests"]
        parts += [f"{self.counts[s]} at the {s}" + (f" ({', '.join(self.fallback_files)})" if s == FILE_MEDIAN else "")
                  for s in (FILE_MEDIAN, SUITE_MEDIAN) if self.counts.get(s)]
        if self.counts.get(DEFAULT):
            parts.append(f"{self.counts[DEFAULT]} at the {DEFAULT_ESTIMATE_S:.0f} s default")
        return ", ".join(parts)


@dataclass(frozen=True)
class Estimates:
    """One profile's p90 per test and its server key, the p90 launch of each server key, and the
    fallbacks for tests it has not seen (a key with no launch history costs no launch)."""

    profile: str
    p90: Mapping[str, float]
    servers: Mapping[str, str] = field(default_factory=dict)
    runs: int = 0
    newest: datetime | None = None
    digest: str = ""
    launches: Mapping[str, float] = field(default_factory=dict)

    def _file_medians(self) -> dict[str, float]:
        by_file: dict[str, list[float]] = defaultdict(list)
        for nodeid, seconds in self.p90.items():
            by_file[nodeid.split("::", 1)[0]].append(seconds)
        return {f: statistics.median(v) for f, v in by_file.items()}

    def lookup(self, nodeids: Iterable[str]) -> dict[str, tuple[float, str]]:
        """Node id -> (seconds, where the figure came from: one of SOURCES)."""
        files = self._file_medians()
        suite = statistics.median(self.p90.values()) if self.p90 else None
        out = {}
        for nodeid in nodeids:
            if nodeid in self.p90:
                out[nodeid] = (self.p90[nodeid], HISTORY)
            elif nodeid.split("::", 1)[0] in files:
                out[nodeid] = (files[nodeid.split("::", 1)[0]], FILE_MEDIAN)
            elif suite is not None:
                out[nodeid] = (suite, SUITE_MEDIAN)
            else:
                out[nodeid] = (DEFAULT_ESTIMATE_S, DEFAULT)
        return out

    def seconds(self, nodeids: Iterable[str]) -> dict[str, float]:
        """Node id -> estimated seconds (history, else the fallbacks)."""
        return {t: s for t, (s, _) in self.lookup(nodeids).items()}

    def coverage(self, nodeids: Iterable[str]) -> Coverage:
        """Where the estimates of ``nodeids`` come from, counted."""
        found = self.lookup(nodeids)
        counts = {s: sum(1 for _, src in found.values() if src == s) for s in SOURCES}
        files = sorted({t.split("::", 1)[0] for t, (_, src) in found.items() if src == FILE_MEDIAN})
        return Coverage(counts, tuple(files))

    def age_line(self, now: datetime | None = None) -> str:
        """``4 runs, newest 2026-12-05 12:40 UTC (35 min old), ...; launches of 2 server keys``, or that
        there is no history."""
        if self.newest is None:
            return (f"no history for profile {self.profile}: every test costs the "
                    f"{DEFAULT_ESTIMATE_S:.0f} s default, so the split is by count")
        age = (now or datetime.now(timezone.utc)) - self.newest
        return (f"{self.runs} run{'s' * (self.runs != 1)} of profile {self.profile}, newest "
                f"{self.newest.astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC ({_age(age)} old), "
                f"window {WINDOW_DAYS} days / {MAX_SAMPLES} samples a test; "
                + (f"launches of {len(self.launches)} server key{'s' * (len(self.launches) != 1)}"
                   if self.launches else "no server launches yet (each costs 0 s)"))


def _age(delta: timedelta) -> str:
    minutes = max(0, math.floor(delta.total_seconds() / 60))
    if minutes < 60:
        return f"{minutes} min"
    hours = minutes // 60
    return f"{hours} h" if hours < 48 else f"{hours // 24} days"
