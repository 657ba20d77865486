"""Where a session's artefacts live under reports/: one name for each, used by every writer and reader.

The nox session writes the JUnit, the plugin the server records, the kits
their job-summary sections, the report step the Markdown report; the chain,
`invoke report`/`comment` and the shard planner read them back. A name built
in two places drifts; these are the only places they are built.
"""
from __future__ import annotations

from pathlib import Path


def junit(reports_dir: str | Path, session: str) -> Path:
    """JUnit XML of ``session`` (pytest's --junitxml)."""
    return Path(reports_dir) / f"junit-{session}.xml"


def servers(reports_dir: str | Path, session: str) -> Path:
    """Server records of ``session`` (launch, stop, containment, tests served)."""
    return Path(reports_dir) / f"servers-{session}.json"


def kit_summary(reports_dir: str | Path, session: str) -> Path:
    """The kits' job-summary sections of ``session`` (perf table, accuracy, reference, ...)."""
    return Path(reports_dir) / f"kit-summary-{session}.md"


def report(reports_dir: str | Path, session: str) -> Path:
    """The Markdown report of ``session``."""
    return Path(reports_dir) / f"report-{session}.md"
