"""Appending a Markdown section to a summary file (a session's kit summary, the job summary).

Kits, the e2e tests and the report all add sections to files that others append
to as well; each section ends with a blank line so the next one starts a new
Markdown block whoever writes it.
"""
from __future__ import annotations

from pathlib import Path


def append_section(path: str | Path, markdown: str) -> Path:
    """Append ``markdown`` to ``path`` (UTF-8), ending it with a blank line; returns the path."""
    text = markdown.rstrip("\n") + "\n\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)
    return Path(path)
