"""An e2e session in which every test was skipped tested nothing: it fails, counting the reasons.

sglang #24222: a 0-GPU runner skipped every test for capacity and went green.
Capacity is one reason among several -- a model off its lane, a known issue on
this profile, a bound not measured here, a prerequisite missing at run time --
and whichever it is, a green job that ran no e2e test says the engine works
when nothing was checked. The plugin (ci/session/pytest_plugin.py) asks
:func:`tested_nothing_line` at collection (skip markers) and again at the end
of the run (skips raised inside tests and fixtures), and fails the session
with the line it returns.

Only e2e tests count (those that ask for a ``server`` or mark ``gpus``):
kiln's own unit-test session has none and is left alone.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

# A reason is counted under its label: the words before its first ": "
# ("capacity", "known issue on h100-1"), cut to this many characters so one
# line still holds a handful of labels.
LABEL_MAX_CHARS = 60
# What pytest puts before a skip's reason in a report's longrepr.
SKIPPED_PREFIX = "Skipped: "


def label(reason: str) -> str:
    """The kind of skip ``reason`` names, for counting (its text before the first ": ")."""
    head = reason.split(": ", 1)[0].strip() or "no reason given"
    return head if len(head) <= LABEL_MAX_CHARS else head[:LABEL_MAX_CHARS - 1] + "…"


def count_reasons(reasons: Iterable[str]) -> str:
    """``"3 capacity, 1 known issue on cpu"``: labels by count, most first, then by name."""
    counts = Counter(label(r) for r in reasons)
    return ", ".join(f"{n} {name}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def tested_nothing_line(total: int, reasons: list[str], profile: str, *, ran: int = 0,
                        context: str = "") -> str | None:
    """The failure line when all ``total`` e2e tests were skipped (``reasons``: one per test), else None.

    ``ran``: e2e tests that ran (passed, failed, xfailed); ``context`` goes in
    brackets after the profile (e.g. the GPUs available).
    """
    if total == 0 or ran or len(reasons) < total:
        return None
    where = f"profile {profile}" + (f" ({context})" if context else "")
    return (f"all {total} e2e tests were skipped on {where}, so this run tested nothing: "
            f"{count_reasons(reasons)}. First reason: {reasons[0]}")


def skip_reason(report: Any) -> str:
    """The reason of a skipped pytest report (``longrepr`` is (path, line, "Skipped: why"))."""
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr or "")
    return text.removeprefix(SKIPPED_PREFIX)


class Tally:
    """Per e2e node id: did it run, or why was it skipped. One per session (config.stash)."""

    def __init__(self, nodeids: Iterable[str]):
        self.e2e = set(nodeids)
        self.ran: set[str] = set()
        self.skipped: dict[str, str] = {}

    def record(self, report: Any) -> None:
        """Take one pytest report (setup, call or teardown) into account."""
        if report.nodeid not in self.e2e:
            return
        if report.skipped and not hasattr(report, "wasxfail"):
            self.skipped.setdefault(report.nodeid, skip_reason(report))
        elif report.failed or report.when == "call":
            self.ran.add(report.nodeid)  # passed, failed, xfailed or xpassed: it was exercised

    def line(self, profile: str) -> str | None:
        """The failure line when every collected e2e test was skipped, else None."""
        reasons = [why for nodeid, why in self.skipped.items() if nodeid not in self.ran]
        return tested_nothing_line(len(self.e2e), reasons, profile, ran=len(self.ran))
