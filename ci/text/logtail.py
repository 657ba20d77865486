"""The last lines of a log file, read from its end: a huge engine log costs no more than a small one."""
from __future__ import annotations

import os
from collections import deque
from pathlib import Path

from ci.text import ansi

DEFAULT_LINES = 50
# Enough bytes for a few hundred long lines; reading the whole file would turn
# every tail of a chatty engine's log into a multi-second, multi-GB read.
MAX_BYTES = 256 * 1024


def read_end(path: str | Path, max_bytes: int = MAX_BYTES) -> tuple[bytes, int]:
    """(the last ``max_bytes`` of the file, its size); OSError when it cannot be read.

    The one place logs are read from their end: the server's and containers'
    tails below and the report's redacted sections (ci/text/redact.py).
    """
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - max_bytes))
        return f.read(max_bytes), size


def read_tail(path: str | Path, lines: int = DEFAULT_LINES, max_bytes: int = MAX_BYTES) -> str:
    """Last ``lines`` lines of a log file, terminal escapes stripped (engine logs hold colour
    codes and partial UTF-8 from progress bars); reads at most ``max_bytes`` from the end."""
    try:
        data, _ = read_end(path, max_bytes)
    except OSError as exc:
        return f"<log unavailable: {exc}>"
    text = ansi.strip(data.decode("utf-8", errors="replace"))
    return "\n".join(deque(text.splitlines(), maxlen=lines))
