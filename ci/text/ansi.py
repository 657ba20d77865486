"""Terminal escape sequences out of text: engine logs, nvidia-smi output, JUnit bodies.

One pattern for every reader (log tails, the crash watch, topology parsing,
redaction), so a sequence one of them misses cannot hide a crash signature or
a secret from another.
"""
from __future__ import annotations

import re

_ANSI = re.compile(
    r"""
      \x1b\][^\x07\x1b\n]*(?:\x07|\x1b\\)?   # OSC: titles, hyperlinks (never across lines)
    | \x1b\[[0-?]*[ -/]*[@-~]                # CSI: colours, cursor moves
    | \x1b[PX^_][^\x1b\n]*(?:\x1b\\)?        # DCS / SOS / PM / APC strings
    | \x1b[ -/]*[0-~]                        # two-byte and charset escapes
    | \x9b[0-?]*[ -/]*[@-~]                  # 8-bit CSI
    | \#x1B\[[0-?]*[ -/]*[@-~]             # CSI as pytest's JUnit writer escapes it
    """,
    re.VERBOSE,
)


def strip(text: str) -> str:
    """``text`` without terminal escape sequences."""
    return _ANSI.sub("", text)
