"""What reaches the CI job summary (``$GITHUB_STEP_SUMMARY``): the report, then the kits' sections.

Kits never write to ``$GITHUB_STEP_SUMMARY`` themselves: inside `invoke ci`'s
container that host file is not mounted. They write
``reports/kit-summary-<session>.md`` (ci/report/artefacts.py, a bind mount), and the
report step on the host -- the chain's, or `invoke report` -- appends the
report followed by that file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from ci.report import artefacts
from ci.text.summary import append_section

ENV = "GITHUB_STEP_SUMMARY"


def append(markdown: str, env: Mapping[str, str] | None = None) -> Path | None:
    """Append ``markdown`` to ``$GITHUB_STEP_SUMMARY`` when set; the path written, or None."""
    target = (os.environ if env is None else env).get(ENV)
    if not target:
        return None
    return append_section(target, markdown)


def with_kits(markdown: str, reports_dir: str | Path, session: str) -> str:
    """``markdown`` followed by what the kits of ``session`` wrote for the job summary, if any."""
    kits = artefacts.kit_summary(reports_dir, session)
    if not kits.is_file():
        return markdown
    return markdown.rstrip("\n") + "\n\n" + kits.read_text(encoding="utf-8")


def publish(report_md: str, reports_dir: str | Path, session: str,
            env: Mapping[str, str] | None = None) -> Path | None:
    """Append the report and the kits' sections of ``session`` to the job summary, when there is one."""
    return append(with_kits(report_md, reports_dir, session), env)
