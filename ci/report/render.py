"""A red run explains itself: Markdown for the job summary and the PR comment.

From the run's JUnit XML, the session name, the runner profile and the pool's
per-server records (``reports/servers-<session>.json``, optional) it renders:
a one-line verdict; the failures grouped by whose fault they are (infra first,
collapsed, then engine, then test: ci/report/outcome.py), each with its node id,
its class and reason, what the retry policy did, a one-line cause, the command
that reproduces it as pasted into a shell, and the pytest output and server log
tail in ``<details>``; the tests that passed only after an infra retry; skipped
tests grouped by reason so lost coverage shows; a Mermaid timeline of every server. Everything from logs goes through
ci.text.redact (secrets, ANSI, binary, @mentions, HTML) and the whole report stays
under MAX_REPORT_CHARS however large the logs are.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ci.report import artefacts, outcome
from ci.report.junit import ERROR, FAILED, PASSED, SKIPPED, XFAILED, CaseResult, JUnitError, RunResult, read_junit
from ci.report.repro import WARMUP_HINT, repro_command
# The server records and their sections live in ci.report.servers; these names stay importable from here.
from ci.report.servers import (MAX_CAUSE_CHARS, ServerInfo, load_servers, stops_md,  # noqa: F401
                               timeline_md)
from ci.text.redact import (MAX_SECTION_LINES, Redactor, Tail, code_span, fence, html_text, read_log_tail,
                            sanitize, sanitize_lines)

log = logging.getLogger(__name__)

# GitHub rejects a comment over 65,536 characters; the rest is headroom for the
# sticky-comment markers and a caller's header.
MAX_REPORT_CHARS = 60_000
# When the report is too big, logs shrink step by step before any failure is
# dropped: the repro commands matter more than the log lines.
LOG_LINE_STEPS = (MAX_SECTION_LINES, 120, 40, 10, 0)
# Beyond these the lists stop being read; the counts still say how many.
MAX_SKIP_IDS = 20
MAX_SKIP_GROUPS = 30
MAX_RETRIED_PASSES = 30
SERVER_PROPERTY = "kiln_server"
ENGINE_PROPERTY = "kiln_engine_version"
UNCALIBRATED_PROPERTY = "kiln_uncalibrated"  # a pass whose estimate bounds were not enforced (ci/kits/enforce.py)
SHARD_PROPERTY = "kiln_shard"  # the shard (i/n) a case ran on, set by the merged report (ci/report/matrix.py)

_KNOWN_ISSUE = re.compile(r"known[ _-]?issue|non-?determinis|flaky", re.I)
_CAPACITY = re.compile(r"\bGPUs?\b|\bcapacity\b|\bavailable\b|\bdevices?\b", re.I)


def one_line_cause(case: CaseResult, redactor: Redactor) -> str:
    """Why ``case`` failed in one line: pytest's message, else its first ``E`` line."""
    first = next((ln.strip() for ln in case.message.splitlines() if ln.strip()), "")
    if not first:
        first = next((ln[1:].strip() for ln in case.details.splitlines()
                      if ln.startswith("E ") and ln[1:].strip()), "")
    first = " ".join(sanitize(first, redactor).split()) or f"{case.outcome} (pytest gave no message)"
    return first if len(first) <= MAX_CAUSE_CHARS else first[:MAX_CAUSE_CHARS - 1] + "…"


def server_for(case: CaseResult, servers: Sequence[ServerInfo]) -> ServerInfo | None:
    """The server record that served ``case`` (by node id, else by its kiln_server key)."""
    served = [s for s in servers if case.nodeid in s.tests]
    if served:
        return served[-1]
    key = case.prop(SERVER_PROPERTY)
    same = [s for s in servers if key is not None and s.key == key]
    failed = [s for s in same if s.launch_failed]
    return (failed or same or [None])[-1]


def skip_category(case: CaseResult) -> str:
    """capacity / known issue / expected failure / other: why coverage was lost."""
    if case.outcome == XFAILED:
        return "expected failure (xfail)"
    if _KNOWN_ISSUE.search(case.message):
        return "known issue"
    return "capacity" if _CAPACITY.search(case.message) else "other"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, sec = divmod(seconds, 60)
    return f"{minutes}m {sec:02d}s" if minutes < 60 else f"{minutes // 60}h {minutes % 60:02d}m"


def run_status(run: RunResult | None) -> str:
    """failed (a failure, an error or no results), empty (nothing ran) or passed."""
    if run is None or run.count(FAILED) or run.count(ERROR):
        return "failed"
    return "passed" if run.count(PASSED) else "empty"


def verdict(run: RunResult | None, session: str, profile: Any = None, incomplete: str = "") -> str:
    """The one-line verdict: counts, wall time, runner, engine version.

    ``incomplete`` (a merged matrix with a shard missing) is red whatever the
    counts say: the tests that shard held were never run.
    """
    status = run_status(run)
    icon = "❌" if incomplete else {"passed": "✅", "failed": "❌", "empty": "⚠️"}[status]
    word = {"passed": "passed", "failed": "failed", "empty": "tested nothing"}[status]
    word = f"incomplete ({incomplete})" if incomplete else word
    if run is None:
        counts, wall, engine = "no test results", "", "unknown"
    else:
        counts = _counts(run)
        wall, engine = f" in {_duration(run.duration)}", run.prop(ENGINE_PROPERTY) or "unknown"
    runner = getattr(profile, "runner_label", None) or "unknown"
    hardware = f" ({profile.gpus}× {profile.vendor})" if profile is not None and profile.gpus else ""
    return (f"### {icon} {code_span(session)} {word}: {counts}{wall} · runner {code_span(runner)}"
            f"{hardware} · engine {code_span(engine)}")


def _counts(run: RunResult) -> str:
    """``2 failed, 1 error (1 infra, 2 test), 5 passed (1 after infra retry)``: every outcome counted,
    the red ones by whose fault they are, passes that needed an infra retry never hidden among the rest."""
    labels = ((FAILED, "failed"), (ERROR, "error"), (PASSED, "passed"), (SKIPPED, "skipped"), (XFAILED, "xfailed"))
    notes = {
        ERROR: outcome.class_summary(run.cases),
        PASSED: ", ".join(n for n in (
            _plural(sum(outcome.passed_after_retry(c) for c in run.cases), "after infra retry"),
            _plural(sum(1 for c in run.cases if c.outcome == PASSED and c.prop(UNCALIBRATED_PROPERTY)),
                    "uncalibrated: estimates not enforced")) if n),
        XFAILED: _plural(sum(outcome.quarantined_fail(c) for c in run.cases), "quarantined: not failing the job"),
    }
    if not run.count(ERROR):  # the class breakdown goes after the last red count
        notes[FAILED], notes[ERROR] = notes[ERROR], ""
    parts = []
    for o, label in labels:
        n = run.count(o)
        if n:
            note = notes.get(o, "")
            parts.append(f"{n} {label}{'s' if o == ERROR and n > 1 else ''}" + (f" ({note})" if note else ""))
    return ", ".join(parts) or "0 tests"


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" if n else ""


def _pytest_output(case: CaseResult, redactor: Redactor, cap: int) -> Tail:
    lines = sanitize_lines(case.details, redactor, cap)
    return Tail(lines, f"last {len(lines)} lines")


def _details(summary: str, tail: Tail, cap: int) -> str:
    lines = tail.lines[-cap:] if cap > 0 else ()
    if not lines:
        return f"<sub>{html_text(summary)}: {html_text(tail.source)} (not shown: {'empty' if cap else 'size cap'})</sub>"
    shown = f"last {len(lines)} lines" if len(lines) < len(tail.lines) else tail.source
    return (f"<details><summary>{html_text(summary)} — {html_text(shown)}</summary>\n\n"
            f"{fence(chr(10).join(lines))}\n\n</details>")


@dataclass(frozen=True)
class _Failure:
    case: CaseResult
    cause: str
    server: ServerInfo | None
    repro: str
    server_state: str = ""
    kind: str = outcome.UNTYPED
    typed: str = ""  # the class line: reason, retry policy, earlier attempts


def _typed_line(case: CaseResult, redactor: Redactor) -> str:
    """``**infra**: reason · retry: ... · attempt 1: ...``, sanitised, or "" when kiln wrote nothing."""
    reason = outcome.failure_reason(case)
    if reason is None:
        return ""
    bits = [f"**{outcome.failure_class(case)}**: {code_span(_one_line(reason, redactor))}"]
    note = outcome.retry_note(case)
    if note:
        bits.append(f"retry: {code_span(_one_line(note, redactor))}")
    bits += [f"attempt {code_span(_one_line(a, redactor))}" for a in outcome.attempts(case)]
    return " · ".join(bits)


def _one_line(text: str, redactor: Redactor) -> str:
    flat = " ".join(sanitize(text, redactor).split())
    return flat if len(flat) <= MAX_CAUSE_CHARS else flat[:MAX_CAUSE_CHARS - 1] + "…"


def _failure_md(item: _Failure, cap: int, output: Tail, logs: Mapping[str, Tail], shown_logs: set[str]) -> str:
    parts = [f"#### {'❌' if item.case.outcome == FAILED else '💥'} {code_span(item.case.nodeid)}"]
    if item.case.prop(SHARD_PROPERTY):
        parts.append(f"**Shard** {code_span(item.case.prop(SHARD_PROPERTY) or '')}")
    if item.typed:
        parts.append(f"**Class** {item.typed}")
    parts.append(f"**Cause** ({item.case.outcome}): {code_span(item.cause)}")
    srv = item.server
    if srv is not None:
        where = f"on GPUs {','.join(map(str, srv.devices))}" if srv.devices else "without GPUs"
        parts.append(f"**Server** {code_span(srv.key)} {where}: {code_span(item.server_state)}")
    parts += ["Reproduce:", fence(item.repro, "sh")]
    if item.case.details.strip():
        parts.append(_details("pytest output", output, cap))
    if srv is not None and srv.log_path:
        if srv.log_path in shown_logs:
            parts.append(f"<sub>server log: shown above for {html_text(srv.key)}</sub>")
        else:
            shown_logs.add(srv.log_path)
            parts.append(_details(f"server log {srv.key}", logs[srv.log_path], cap))
    return "\n\n".join(parts)


def _group_heading(kind: str, n: int) -> str:
    return f"{outcome.ICON[kind]} {kind} ({n}): {outcome.MEANING[kind]}"


def retried_passes_md(cases: Iterable[CaseResult], redactor: Redactor) -> str:
    """Tests that passed only on an infra retry, each with why its first attempt failed."""
    found = [c for c in cases if outcome.passed_after_retry(c)]
    if not found:
        return ""
    lines = [f"### 🔁 {outcome.PASSED_AFTER_RETRY.capitalize()}: {len(found)} (not a plain pass: "
             f"the first attempt failed on the runner)"]
    for case in found[:MAX_RETRIED_PASSES]:
        earlier = "; ".join(_one_line(a, redactor) for a in outcome.attempts(case)) or "(no attempt recorded)"
        lines.append(f"- {code_span(case.nodeid)}: attempt {code_span(earlier)}")
    if len(found) > MAX_RETRIED_PASSES:
        lines.append(f"- … and {len(found) - MAX_RETRIED_PASSES} more")
    return "\n".join(lines)


def skipped_md(cases: Iterable[CaseResult], redactor: Redactor) -> str:
    """Skipped and xfailed tests grouped by category and reason, so lost coverage shows."""
    groups: dict[tuple[str, str], list[str]] = {}
    for case in cases:
        if case.outcome in (SKIPPED, XFAILED):
            reason = case.message.removeprefix("Skipped: ").strip() or "(no reason given)"
            groups.setdefault((skip_category(case), reason), []).append(case.nodeid)
    if not groups:
        return ""
    total = sum(len(v) for v in groups.values())
    order = ("capacity", "known issue", "other", "expected failure (xfail)")
    ranked = sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), -len(kv[1]), kv[0][1]))
    parts, category = [f"### ⏭️ Skipped: {total} tests not run here"], None
    for (cat, reason), ids in ranked[:MAX_SKIP_GROUPS]:
        if cat != category:
            category = cat
            count = sum(len(v) for (c, _), v in groups.items() if c == cat)
            parts.append(f"**{cat}** ({count})")
        listed = "\n".join(f"- {code_span(i)}" for i in ids[:MAX_SKIP_IDS])
        more = f"\n- … and {len(ids) - MAX_SKIP_IDS} more" if len(ids) > MAX_SKIP_IDS else ""
        reason_html = html_text(" ".join(sanitize(reason, redactor).split()))
        parts.append(f"<details><summary>{len(ids)} × {reason_html}</summary>\n\n{listed}{more}\n\n</details>")
    if len(ranked) > MAX_SKIP_GROUPS:
        parts.append(f"… and {len(ranked) - MAX_SKIP_GROUPS} more reasons")
    return "\n\n".join(parts)


def render_report(run: RunResult | None, session: str, *, profile: Any = None,
                  servers: Sequence[ServerInfo] = (), env: Mapping[str, str] | None = None,
                  redactor: Redactor | None = None, notes: Sequence[str] = (),
                  max_chars: int = MAX_REPORT_CHARS, incomplete: str = "") -> str:
    """The whole report as Markdown, never longer than ``max_chars``.

    ``run`` None means no JUnit results (the run died before pytest wrote them);
    ``incomplete`` says why the results are not the whole run (a missing shard).
    Logs shrink through LOG_LINE_STEPS first; then failures are listed fewer.
    """
    env = dict(os.environ) if env is None else env
    redactor = redactor or Redactor.from_env(env)
    cases = run.cases if run is not None else ()
    failures = []
    for case in cases:
        if case.outcome not in (FAILED, ERROR):
            continue
        srv = server_for(case, servers)
        repro = repro_command(session, case.nodeid, env, redactor)
        if srv is not None and srv.warm_dependent and srv.launch_failed:
            repro = f"{WARMUP_HINT}\n{repro}"
        state = "" if srv is None else (
            f"launch failed: {srv.error}" if srv.launch_failed else (srv.error or "ready"))
        failures.append(_Failure(case, one_line_cause(case, redactor), srv, repro, sanitize(state, redactor),
                                 outcome.failure_class(case), _typed_line(case, redactor)))
    # Whose fault first: infra (collapsed), engine, test (ci/report/outcome.py).
    failures.sort(key=lambda f: outcome.GROUPS.index(f.kind))
    logs = {s.log_path: read_log_tail(s.log_path, redactor) for s in servers if s.log_path}
    covered = {f.server.key for f in failures if f.server is not None}
    orphans = [s for s in servers if s.error and s.key not in covered]
    head = [verdict(run, session, profile, incomplete)] + [f"> {code_span(sanitize(n, redactor))}" for n in notes]
    tail = [p for p in (retried_passes_md(cases, redactor), skipped_md(cases, redactor),
                        stops_md(servers, redactor), timeline_md(servers, session)) if p]
    outputs: dict[tuple[int, int], Tail] = {}  # sanitised lazily: most never fit

    def output(index: int, cap: int) -> Tail:
        if (index, cap) not in outputs:
            outputs[index, cap] = _pytest_output(failures[index].case, redactor, cap)
        return outputs[index, cap]

    def compose(cap: int, shown: int) -> str | None:
        """The report with logs cut to ``cap`` lines and ``shown`` failures; None if too big."""
        shown_logs: set[str] = set()
        body = list(head)
        # Redaction only shortens text (REDACTED is no longer than any secret),
        # so measuring before it is safe, and stopping early saves the work.
        size = sum(len(p) + 2 for p in head + tail)
        by_class = outcome.class_summary(f.case for f in failures)
        parts = [f"### Failures ({len(failures)}{': ' + by_class if by_class else ''})"] if failures else []
        kind = None
        for index in range(shown):
            if size > max_chars:
                return None
            item = failures[index]
            if item.kind != kind:
                if kind == outcome.INFRA:
                    parts.append("</details>")
                kind = item.kind
                n = sum(1 for f in failures if f.kind == kind)
                parts.append(f"<details><summary>{html_text(_group_heading(kind, n))}</summary>"
                             if kind == outcome.INFRA else f"### {_group_heading(kind, n)}")
            parts.append(_failure_md(item, cap, output(index, cap), logs, shown_logs))
            size += len(parts[-1]) + 2
        if kind == outcome.INFRA:
            parts.append("</details>")
        if shown < len(failures):
            parts.append(f"… {len(failures) - shown} more failures not shown (report size cap); "
                         f"the JUnit file lists them all.")
        for srv in orphans:
            parts.append(f"#### 💥 server {code_span(srv.key)}: {code_span(sanitize(srv.error or '', redactor))}")
            if srv.log_path and srv.log_path not in shown_logs:
                shown_logs.add(srv.log_path)
                parts.append(_details(f"server log {srv.key}", logs[srv.log_path], cap))
        text = "\n\n".join(body + parts + tail) + "\n"
        return redactor.redact(text) if len(text) <= max_chars else None

    for cap in LOG_LINE_STEPS:
        text = compose(cap, len(failures))
        if text is not None:
            return text
    low, high = 0, len(failures)  # the most failures that still fit, logs omitted
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if compose(0, mid) is not None else (low, mid - 1)
    text = compose(0, low)
    if text is None:  # only reachable with a tiny max_chars: keep the verdict
        log.warning("report over %d chars even without logs; keeping the verdict only", max_chars)
        text = redactor.redact(head[0])[:max_chars]
    return text


def profile_for(session: str) -> Any:
    """The runner profile of an ``e2e-<profile>`` session, or None (e.g. ``tests``)."""
    if not session.startswith("e2e-"):
        return None
    try:
        from ci.profiles.runners import get_profile  # noqa: PLC0415  (the report renders without it)
        return get_profile(session.removeprefix("e2e-"))
    except (ImportError, LookupError, ValueError) as exc:
        log.warning("no runner profile for session %s: %s", session, exc)
        return None


def build_report(junit_path: str | Path, session: str, *, servers_path: str | Path | None = None,
                 env: Mapping[str, str] | None = None, extra_secrets: Iterable[str] = (),
                 root: Path | None = None, max_chars: int = MAX_REPORT_CHARS) -> str:
    """Read the JUnit file and server records of ``session`` and render the report.

    A missing or broken JUnit file still renders (a red verdict naming the
    cause), because that is exactly when someone needs to know why.
    """
    env = dict(os.environ) if env is None else env
    redactor = Redactor.from_env(env, extra_secrets)
    junit_path = Path(junit_path)
    # A shard's records sit beside its JUnit under the same stem (e2e-cpu-shard2of3).
    stem = artefacts.junit_stem(junit_path) or session
    servers, note = load_servers(servers_path or artefacts.servers(junit_path.parent, stem))
    notes = [note] if note else []
    try:
        run = read_junit(junit_path, root=root or Path.cwd())
    except JUnitError as exc:
        run = None
        notes.append(f"no test results: {exc}")
    return render_report(run, session, profile=profile_for(session), servers=servers, env=env,
                         redactor=redactor, notes=notes, max_chars=max_chars)
