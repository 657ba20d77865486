"""Where a session's artefacts live under reports/: one name for each, used by every writer and reader.

The nox session writes the JUnit, the plugin the server records, the kits
their job-summary sections, the report step the Markdown report; the chain,
`invoke report`/`comment` and the shard planner read them back. A name built
in two places drifts; these are the only places they are built.

A shard of a session (``--shard 2/3``) leaves its files under the stem
``<session>-shard2of3`` (``junit-e2e-cpu-shard2of3.xml``): each shard of a
matrix is its own job, but run one after another on one machine they must not
overwrite each other, and a file must say which shard it is after the
artefact download has put it in a folder of any name (ci/report/matrix.py).
"""
from __future__ import annotations

import re
from pathlib import Path

# <stem> of a shard's files: <session>-shard<i>of<n>.
_SHARD_STEM = re.compile(r"^(?P<session>.+)-shard(?P<index>[1-9][0-9]*)of(?P<count>[1-9][0-9]*)$")
_JUNIT_NAME = re.compile(r"^junit-(?P<stem>.+)\.xml$")


def stem(session: str, shard: tuple[int, int] | None = None) -> str:
    """The name a session's files carry: ``e2e-cpu``, or ``e2e-cpu-shard2of3`` for shard (2, 3)."""
    return session if shard is None else f"{session}-shard{shard[0]}of{shard[1]}"


def parse_stem(text: str) -> tuple[str, tuple[int, int] | None]:
    """``e2e-cpu-shard2of3`` -> ("e2e-cpu", (2, 3)); a stem without a shard -> (stem, None)."""
    m = _SHARD_STEM.match(text)
    if m and int(m.group("index")) <= int(m.group("count")):
        return m.group("session"), (int(m.group("index")), int(m.group("count")))
    return text, None


def junit_stem(path: str | Path) -> str | None:
    """The stem of a ``junit-<stem>.xml`` file name, or None for any other name."""
    m = _JUNIT_NAME.match(Path(path).name)
    return m.group("stem") if m else None


def junit(reports_dir: str | Path, session: str) -> Path:
    """JUnit XML of ``session`` (pytest's --junitxml); a shard's: ``session`` = ``stem(session, shard)``."""
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


def shard_listing(reports_dir: str | Path, session: str, shard: tuple[int, int]) -> Path:
    """The node ids shard ``shard`` of ``session`` runs, one a line (pytest reads it as ``@file``)."""
    return Path(reports_dir) / f"shard-{session}-{shard[0]}of{shard[1]}.txt"


def shard_record(reports_dir: str | Path, session: str, shard: tuple[int, int]) -> Path:
    """What shard ``shard`` of ``session`` was given and why (JSON): the merged report checks the union."""
    return Path(reports_dir) / f"shard-{session}-{shard[0]}of{shard[1]}.json"


def shard_keys(reports_dir: str | Path, session: str) -> Path:
    """The server keys ``pytest --kiln-collect-keys`` wrote for a shard's collection."""
    return Path(reports_dir) / f"shard-keys-{session}.json"
