"""A red run explains itself: Markdown for the job summary and the PR comment.

From the run's JUnit XML, the session name, the runner profile and the pool's
per-server records (``reports/servers-<session>.json``, optional) it renders:
a one-line verdict; for each failure its node id, a one-line cause, the command
that reproduces it as pasted into a shell, and the pytest output and server log
tail in ``<details>``; skipped tests grouped by reason so lost coverage shows;
a Mermaid timeline of every server. Everything from logs goes through
ci.text.redact (secrets, ANSI, binary, @mentions, HTML) and the whole report stays
under MAX_REPORT_CHARS however large the logs are.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ci.report import artefacts
from ci.report.junit import ERROR, FAILED, PASSED, SKIPPED, XFAILED, CaseResult, JUnitError, RunResult, read_junit
from ci.text.redact import (MAX_SECTION_LINES, Redactor, Tail, code_span, fence, html_text, read_log_tail,
                       sanitize, sanitize_lines)
from ci.report.repro import WARMUP_HINT, repro_command

log = logging.getLogger(__name__)

# GitHub rejects a comment over 65,536 characters; the rest is headroom for the
# sticky-comment markers and a caller's header.
MAX_REPORT_CHARS = 60_000
# When the report is too big, logs shrink step by step before any failure is
# dropped: the repro commands matter more than the log lines.
LOG_LINE_STEPS = (MAX_SECTION_LINES, 120, 40, 10, 0)
# A cause is one line in a list; longer than this it is a log excerpt, which has its own section.
MAX_CAUSE_CHARS = 300
# Beyond these the lists stop being read; the counts still say how many.
MAX_SKIP_IDS = 20
MAX_SKIP_GROUPS = 30
MAX_TIMELINE_SERVERS = 40
SERVER_PROPERTY = "kiln_server"
ENGINE_PROPERTY = "kiln_engine_version"
UNCALIBRATED_PROPERTY = "kiln_uncalibrated"  # a pass whose estimate bounds were not enforced (ci/kits/enforce.py)

_KNOWN_ISSUE = re.compile(r"known[ _-]?issue|non-?determinis|flaky", re.I)
_CAPACITY = re.compile(r"\bGPUs?\b|\bcapacity\b|\bavailable\b|\bdevices?\b", re.I)
_MERMAID_UNSAFE = re.compile(r"[^A-Za-z0-9 _.,=/+()-]+")


@dataclass(frozen=True)
class ServerInfo:
    """One record of ``servers-<session>.json`` as written by the pool."""

    key: str
    model: str = ""
    tp: int = 1
    devices: tuple[int, ...] = ()
    log_path: str = ""
    launched: float | None = None
    ready: float | None = None
    stopped: float | None = None
    memory_free: float | None = None
    tests: tuple[str, ...] = ()
    error: str | None = None
    warm_dependent: bool = False
    containment: str | None = None
    stop_killed: tuple[str, ...] = ()

    @property
    def launch_failed(self) -> bool:
        """Launched but never ready: the failure happened during the launch."""
        return self.launched is not None and self.ready is None


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def load_servers(path: str | Path) -> tuple[tuple[ServerInfo, ...], str | None]:
    """The server records at ``path`` and a note when they could not be read.

    The file is optional (no server launched, or the run died first), so a
    missing file is no records and no note; a broken one is a note, never a crash.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return (), None
    except (OSError, ValueError) as exc:
        return (), f"server records {path} unreadable: {exc}"
    if not isinstance(data, list):
        return (), f"server records {path}: expected a JSON list, got {type(data).__name__}"
    records = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("key"), str):
            continue
        records.append(ServerInfo(
            key=item["key"], model=str(item.get("model", "")), tp=int(_num(item.get("tp")) or 1),
            devices=tuple(d for d in item.get("devices") or () if isinstance(d, int)),
            log_path=str(item.get("log_path") or ""), launched=_num(item.get("launched")),
            ready=_num(item.get("ready")), stopped=_num(item.get("stopped")),
            memory_free=_num(item.get("memory_free")),
            tests=tuple(t for t in item.get("tests") or () if isinstance(t, str)),
            error=item.get("error") if isinstance(item.get("error"), str) else None,
            warm_dependent=bool(item.get("warm_dependent")),
            containment=item.get("containment") if isinstance(item.get("containment"), str) else None,
            stop_killed=tuple(k for k in item.get("stop_killed") or () if isinstance(k, str))))
    return tuple(records), None


def stops_md(servers: Sequence[ServerInfo], redactor: Redactor) -> str:
    """Servers whose tree had to be SIGKILLed at stop: a wedged or stopped engine, said out loud."""
    hard = [s for s in servers if s.stop_killed]
    if not hard:
        return ""
    lines = ["### Stops that needed SIGKILL"]
    for srv in hard:
        names = sanitize(", ".join(srv.stop_killed), redactor)
        lines.append(f"- {code_span(srv.key)} ({srv.containment or 'unknown containment'}): "
                     f"{len(srv.stop_killed)} process(es) ignored SIGTERM for the grace period: "
                     f"{code_span(names[:MAX_CAUSE_CHARS])}")
    return "\n".join(lines)


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


def verdict(run: RunResult | None, session: str, profile: Any = None) -> str:
    """The one-line verdict: counts, wall time, runner, engine version."""
    status = run_status(run)
    icon = {"passed": "✅", "failed": "❌", "empty": "⚠️"}[status]
    word = {"passed": "passed", "failed": "failed", "empty": "tested nothing"}[status]
    if run is None:
        counts, wall, engine = "no test results", "", "unknown"
    else:
        labels = ((FAILED, "failed"), (ERROR, "error"), (PASSED, "passed"),
                  (SKIPPED, "skipped"), (XFAILED, "xfailed"))
        counts = ", ".join(f"{run.count(o)} {label}{'s' if o == ERROR and run.count(o) > 1 else ''}"
                           for o, label in labels if run.count(o)) or "0 tests"
        loose = sum(1 for c in run.cases if c.outcome == PASSED and c.prop(UNCALIBRATED_PROPERTY))
        counts += f" ({loose} uncalibrated: estimates not enforced)" if loose else ""
        wall, engine = f" in {_duration(run.duration)}", run.prop(ENGINE_PROPERTY) or "unknown"
    runner = getattr(profile, "runner_label", None) or "unknown"
    hardware = f" ({profile.gpus}× {profile.vendor})" if profile is not None and profile.gpus else ""
    return (f"### {icon} {code_span(session)} {word}: {counts}{wall} · runner {code_span(runner)}"
            f"{hardware} · engine {code_span(engine)}")


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


def _failure_md(item: _Failure, cap: int, output: Tail, logs: Mapping[str, Tail], shown_logs: set[str]) -> str:
    parts = [f"#### {'❌' if item.case.outcome == FAILED else '💥'} {code_span(item.case.nodeid)}",
             f"**Cause** ({item.case.outcome}): {code_span(item.cause)}"]
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


def _mermaid_name(text: str) -> str:
    # Mermaid treats ':' '#' ';' '%' specially (task syntax, comments, directives).
    return " ".join(_MERMAID_UNSAFE.sub(" ", text).split())[:60] or "server"


def timeline_md(servers: Sequence[ServerInfo], session: str) -> str:
    """A Mermaid gantt: each server's launch → ready → tests → stop → memory free."""
    rows = sorted((s for s in servers if s.launched is not None), key=lambda s: s.launched)[:MAX_TIMELINE_SERVERS]
    if not rows:
        return ""
    lines = ["gantt", f"    title Servers of {_mermaid_name(session)}", "    dateFormat x",
             "    axisFormat %H:%M:%S"]

    def task(name: str, tags: str, start: float, end: float | None) -> None:
        seconds = max(1, round((end or start) - start))
        lines.append(f"    {name} :{tags}{int(start * 1000)}, {seconds}s")

    for s in rows:
        lines.append(f"    section {_mermaid_name(s.key)}")
        if s.launch_failed:
            task("launch failed", "crit, ", s.launched, s.stopped)
        else:
            task("launch", "done, ", s.launched, s.ready)
            task(f"tests ({len(s.tests)})", "", s.ready, s.stopped)
        if s.stopped is not None and s.memory_free is not None:
            task("stop to memory free", "", s.stopped, s.memory_free)
        elif s.stopped is not None:
            task("memory never seen free", "crit, ", s.stopped, None)
    more = f"\n\n<sub>{len(servers) - len(rows)} more servers not drawn</sub>" if len(servers) > len(rows) else ""
    return "### 🕒 Server timeline\n\n" + fence("\n".join(lines), "mermaid") + more


def render_report(run: RunResult | None, session: str, *, profile: Any = None,
                  servers: Sequence[ServerInfo] = (), env: Mapping[str, str] | None = None,
                  redactor: Redactor | None = None, notes: Sequence[str] = (),
                  max_chars: int = MAX_REPORT_CHARS) -> str:
    """The whole report as Markdown, never longer than ``max_chars``.

    ``run`` None means no JUnit results (the run died before pytest wrote them).
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
        failures.append(_Failure(case, one_line_cause(case, redactor), srv, repro, sanitize(state, redactor)))
    logs = {s.log_path: read_log_tail(s.log_path, redactor) for s in servers if s.log_path}
    covered = {f.server.key for f in failures if f.server is not None}
    orphans = [s for s in servers if s.error and s.key not in covered]
    head = [verdict(run, session, profile)] + [f"> {code_span(sanitize(n, redactor))}" for n in notes]
    tail = [p for p in (skipped_md(cases, redactor), stops_md(servers, redactor),
                        timeline_md(servers, session)) if p]
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
        parts = [f"### Failures ({len(failures)})"] if failures else []
        for index in range(shown):
            if size > max_chars:
                return None
            parts.append(_failure_md(failures[index], cap, output(index, cap), logs, shown_logs))
            size += len(parts[-1]) + 2
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
    servers, note = load_servers(servers_path or artefacts.servers(junit_path.parent, session))
    notes = [note] if note else []
    try:
        run = read_junit(junit_path, root=root or Path.cwd())
    except JUnitError as exc:
        run = None
        notes.append(f"no test results: {exc}")
    return render_report(run, session, profile=profile_for(session), servers=servers, env=env,
                         redactor=redactor, notes=notes, max_chars=max_chars)
