"""The last lines of a log file, read from its end: a huge engine log costs no more than a small one."""
from __future__ import annotations

import os
import re
from collections import deque
from pathlib import Path

DEFAULT_LINES = 50
# Enough bytes for a few hundred long lines; reading the whole file would turn
# every tail of a chatty engine's log into a multi-second, multi-GB read.
MAX_BYTES = 256 * 1024
# Engine logs can hold ANSI colour codes and partial UTF-8 from progress bars.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def read_tail(path: Path, lines: int = DEFAULT_LINES, max_bytes: int = MAX_BYTES) -> str:
    """Last ``lines`` lines of a log file, ANSI stripped; reads at most ``max_bytes`` from the end."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError as exc:
        return f"<log unavailable: {exc}>"
    text = _ANSI.sub("", data.decode("utf-8", errors="replace"))
    return "\n".join(deque(text.splitlines(), maxlen=lines))
