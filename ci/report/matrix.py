"""One report for a whole matrix: every shard's JUnit and server records, merged, for one summary and one comment.

The report job of a workflow downloads each shard job's artefact (any folder
layout: files are found by name, ci/report/artefacts.py) and renders:

- a table of every expected shard -- tests, outcome, wall time, the plan's
  estimate -- where a shard with no JUnit is **missing**, red, never green: its
  tests were not run, whatever the others say;
- per session, the union check from the shards' records: every shard split the
  same collected suite by the same durations store, no test ran twice, and
  together they hold exactly the collected tests, each with a result;
- per session, the usual report (ci/report/render.py) of the merged results:
  failures grouped by whose fault (infra / engine / test), each naming the
  shard it ran on and the command that re-runs exactly that test on that
  profile; skips; SIGKILLed stops; every shard's servers on one timeline.

Which shards to expect comes from ``invoke plan`` (``e2e-cpu:3 e2e-h100-4:2``):
the artefacts alone cannot say that a shard never uploaded one.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

from ci.report import artefacts, render
from ci.report.junit import ERROR, FAILED, PASSED, SKIPPED, XFAILED, JUnitError, RunResult, read_junit
from ci.report.servers import ServerInfo, load_servers
from ci.text.redact import Redactor, code_span

log = logging.getLogger(__name__)

# The merged report's name: its sticky comment's marker and its file under reports/.
MATRIX_SESSION = "e2e-matrix"
MISSING = "no JUnit: the job failed before pytest wrote it, was cancelled or never ran"
_EXPECTED_ITEM = re.compile(r"^(?P<session>[A-Za-z0-9_.-]+):(?P<count>[1-9][0-9]*)$")
# The table and the union lines are a few hundred characters a shard; the rest
# of GitHub's comment limit is shared by the sessions' own reports.
HEAD_RESERVE_CHARS = 8_000
_ICON = {"passed": "✅", "failed": "❌", "empty": "⚠️"}


class MatrixError(ValueError):
    """Bad input to the merge: an expected-shards list that does not parse, no such directory."""


def parse_expected(text: str) -> dict[str, int]:
    """``"e2e-cpu:3 e2e-h100-4:2"`` (spaces or commas) -> {"e2e-cpu": 3, "e2e-h100-4": 2}."""
    out: dict[str, int] = {}
    for item in re.split(r"[\s,]+", (text or "").strip()):
        if not item:
            continue
        m = _EXPECTED_ITEM.match(item)
        if not m:
            raise MatrixError(f"--expect wants SESSION:SHARDS items (e2e-cpu:3), got {item!r}")
        if m.group("session") in out:
            raise MatrixError(f"--expect names {m.group('session')} twice")
        out[m.group("session")] = int(m.group("count"))
    if not out:
        raise MatrixError("--expect is empty: name every session and its shard count (invoke plan's 'expected')")
    return out


@dataclass(frozen=True)
class ShardResult:
    """One expected shard: its results, or why there are none."""

    session: str
    index: int
    count: int
    junit: Path | None = None
    run: RunResult | None = None
    error: str = ""
    servers: tuple[ServerInfo, ...] = ()
    record: Mapping | None = None
    kit_summary: Path | None = None
    notes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"


def _junit_files(root: Path) -> dict[tuple[str, int, int], list[Path]]:
    found: dict[tuple[str, int, int], list[Path]] = {}
    for path in sorted(root.rglob("junit-*.xml")):
        stem = artefacts.junit_stem(path)
        session, shard = artefacts.parse_stem(stem or "")
        if shard is not None:
            found.setdefault((session, *shard), []).append(path)
    return found


def _load_record(path: Path) -> tuple[Mapping | None, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, ""
    except (OSError, ValueError) as exc:
        return None, f"shard record {path.name} unreadable: {exc}"
    return (data, "") if isinstance(data, dict) else (None, f"shard record {path.name} is not an object")


def _shard(session: str, index: int, count: int, paths: Sequence[Path], root: Path) -> ShardResult:
    if not paths:
        return ShardResult(session, index, count, error=MISSING)
    junit = paths[-1]
    notes = [f"{len(paths)} JUnit files for this shard; read {junit.relative_to(root)}"] if len(paths) > 1 else []
    stem = artefacts.junit_stem(junit) or session
    servers, note = load_servers(artefacts.servers(junit.parent, stem))
    record, rnote = _load_record(artefacts.shard_record(junit.parent, session, (index, count)))
    notes += [n for n in (note, rnote) if n]
    kits = artefacts.kit_summary(junit.parent, stem)
    try:
        run = read_junit(junit, root=Path.cwd())
    except JUnitError as exc:
        return ShardResult(session, index, count, junit, None, f"unreadable: {exc}", servers, record,
                           None, tuple(notes))
    tag = ((render.SHARD_PROPERTY, f"{index}/{count}"),)
    run = replace(run, cases=tuple(replace(c, properties=c.properties + tag) for c in run.cases))
    return ShardResult(session, index, count, junit, run, "", servers, record,
                       kits if kits.is_file() else None, tuple(notes))


def collect(root: str | Path, expected: Mapping[str, int]) -> tuple[list[ShardResult], list[str]]:
    """Every expected shard under ``root`` (found or missing), and notes on files that fit no expected shard."""
    root = Path(root)
    if not root.is_dir():
        raise MatrixError(f"{root}: no such directory of shard artefacts")
    found = _junit_files(root)
    shards = [_shard(s, i, n, found.get((s, i, n), []), root) for s, n in expected.items() for i in range(1, n + 1)]
    stray = sorted(f"{s} shard {i}/{n}" for (s, i, n) in found if expected.get(s) != n)
    notes = [f"ignored {', '.join(stray)}: not in the plan ({' '.join(f'{s}:{n}' for s, n in expected.items())})"
             ] if stray else []
    return shards, notes


def union_problems(shards: Sequence[ShardResult]) -> tuple[str, list[str]]:
    """(the union line, what is wrong with it) for one session's shards, from their records and results."""
    present = [s for s in shards if s.run is not None]
    records = [s.record for s in present if s.record]
    if len(records) < len(present) or not records:
        return "no shard records: the union was not checked", []
    problems = []
    collected = {r.get("collected_sha256") for r in records}
    stores = {r.get("durations_sha256") for r in records}
    if len(collected) > 1:
        problems.append("the shards collected different suites (collected_sha256 differs)")
    if len(stores) > 1:
        problems.append("the shards split by different durations stores: the split is not one partition")
    owner: dict[str, list[str]] = {}
    for s in present:
        for t in s.record.get("tests", ()):
            owner.setdefault(t, []).append(s.label)
    twice = sorted(t for t, where in owner.items() if len(where) > 1)
    if twice:
        problems.append(f"{len(twice)} tests on more than one shard, e.g. {twice[0]}")
    ran = {c.nodeid for s in present for c in s.run.cases}
    no_result = sorted(t for t in owner if t not in ran)
    if no_result:
        problems.append(f"{len(no_result)} assigned tests have no result, e.g. {no_result[0]}")
    total = max((int(r.get("collected", 0)) for r in records), default=0)
    missing = [s.label for s in shards if s.run is None]
    if not missing and len(owner) != total and not twice:
        problems.append(f"the shards hold {len(owner)} tests but {total} were collected")
    line = f"{len(present)} of {len(shards)} shards ran {len(owner)} of {total} collected tests"
    if not twice:
        line += ", none twice"
    if len(stores) == 1:
        line += f", one durations store (sha256 {str(next(iter(stores)))[:12]})"
    if not problems and not missing:
        line += ": exactly the suite"
    return line, problems


def merged_run(shards: Sequence[ShardResult]) -> RunResult | None:
    """One session's shards as one run: every case (tagged with its shard), the longest shard's wall time."""
    runs = [s.run for s in shards if s.run is not None]
    if not runs:
        return None
    started = min((r.started for r in runs if r.started), default=None)
    return RunResult(tuple(c for r in runs for c in r.cases), max(r.duration for r in runs), started,
                     tuple(dict.fromkeys(p for r in runs for p in r.properties)))


def _result_cell(s: ShardResult) -> str:
    if s.run is None:
        return f"⚠️ **missing**: {s.error}"
    counts = [(s.run.count(o), w) for o, w in ((FAILED, "failed"), (ERROR, "errors"), (PASSED, "passed"),
                                               (SKIPPED, "skipped"), (XFAILED, "xfailed"))]
    text = ", ".join(f"{n} {w}" for n, w in counts if n) or "0 tests"
    return f"{_ICON[render.run_status(s.run)]} {text}"


def _clock(seconds: float) -> str:
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes}m {sec:02d}s" if minutes else f"{sec}s"


@dataclass(frozen=True)
class MatrixReport:
    """The merged Markdown, whether the matrix is green, and the kits' sections for the job summary."""

    markdown: str
    green: bool
    kit_sections: tuple[str, ...] = field(default=())

    def job_summary(self) -> str:
        """The report followed by every shard's kit sections (perf tables, accuracy)."""
        return "\n\n".join([self.markdown.rstrip("\n"), *self.kit_sections]) + "\n"


def build(root: str | Path, expected: Mapping[str, int], *, env: Mapping[str, str] | None = None,
          max_chars: int = render.MAX_REPORT_CHARS) -> MatrixReport:
    """Merge every shard under ``root`` that ``expected`` names into one report."""
    env = dict(os.environ) if env is None else env
    redactor = Redactor.from_env(env)
    shards, notes = collect(root, expected)
    by_session: dict[str, list[ShardResult]] = {}
    for s in shards:
        by_session.setdefault(s.session, []).append(s)
    rows = ["| session | shard | tests | result | wall | estimate |", "|---|---|---|---|---|---|"]
    for s in shards:
        est = (s.record or {}).get("estimate_s")
        rows.append(f"| {code_span(s.session)} | {s.label} | {len(s.run.cases) if s.run else '—'} | "
                    f"{_result_cell(s)} | {_clock(s.run.duration) if s.run else '—'} | "
                    f"{'~' + _clock(float(est)) if isinstance(est, (int, float)) else '—'} |")
    missing = [s for s in shards if s.run is None]
    union_lines, sections, green = [], [], not missing
    budget = max(2_000, (max_chars - HEAD_RESERVE_CHARS) // max(1, len(by_session)))
    for session, group in by_session.items():
        line, problems = union_problems(group)
        union_lines.append(f"- **union** {code_span(session)}: {line}" + "".join(
            f"\n  - ❌ {p}" for p in problems))
        green = green and not problems
        run = merged_run(group)
        gone = [s.label for s in group if s.run is None]
        incomplete = f"shard{'s' * (len(gone) > 1)} {', '.join(gone)} missing" if gone else ""
        session_notes = [f"shard {s.label}: {n}" for s in group for n in s.notes]
        sections.append(render.render_report(
            run, session, profile=render.profile_for(session), servers=[v for s in group for v in s.servers],
            env=env, redactor=redactor, notes=session_notes, max_chars=budget, incomplete=incomplete))
        green = green and run is not None and render.run_status(run) == "passed"
    n_shards = len(shards)
    if missing:
        head = f"## ❌ kiln e2e matrix: {len(missing)} of {n_shards} shards missing — not green"
    elif green:
        head = f"## ✅ kiln e2e matrix: all {n_shards} shards reported, every test passed"
    else:
        head = f"## ❌ kiln e2e matrix: {n_shards} shards reported, not green"
    parts = [head, *[f"> {code_span(n)}" for n in notes], "\n".join(rows), "\n".join(union_lines), *sections]
    kits = tuple(f"#### kit sections: {s.session} shard {s.label}\n\n{s.kit_summary.read_text(encoding='utf-8')}"
                 for s in shards if s.kit_summary is not None)
    return MatrixReport(redactor.redact("\n\n".join(parts) + "\n"), green, kits)
