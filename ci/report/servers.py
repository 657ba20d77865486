"""The pool's server records read back (``reports/servers-<session>.json``), and their report sections.

One record per server a session launched: its key, devices, log, the times of
launch, ready, stop and memory free, the tests it served and their typed
failures, how its tree was contained and what its stop had to SIGKILL. The
report pairs failures with these records, draws the timeline and lists the
stops that needed SIGKILL.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ci.text.redact import Redactor, code_span, fence, sanitize

# A cause is one line in a list; longer than this it is a log excerpt, which has its own section.
MAX_CAUSE_CHARS = 300
# Beyond this the timeline stops being read; the count still says how many.
MAX_TIMELINE_SERVERS = 40
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
    # Typed failures of the tests it served: (nodeid, class, reason), ci/report/outcome.py.
    failures: tuple[tuple[str, str, str], ...] = ()

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
            stop_killed=tuple(k for k in item.get("stop_killed") or () if isinstance(k, str)),
            failures=tuple((str(f.get("test", "")), str(f.get("class", "")), str(f.get("reason", "")))
                           for f in item.get("failures") or () if isinstance(f, dict))))
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
