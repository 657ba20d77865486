"""The machine's pip configuration carried over to uv, and package sources that answer.

pip reads its config files and ``PIP_*`` variables itself; uv reads neither. A
machine that serves wheels from a local directory (``find-links``) or a mirror
(``extra-index-url``) must give uv the same sources, or the two nox backends
resolve differently: this CI machine's ``torch==2.13.0+cpu`` exists only in its
local wheel directory.

``answers`` probes a package source once, in seconds, so a caller can fall
back to the machine's own wheel directory instead of letting pip retry an
unreachable index for every project (ci/install/locks.py).
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping

log = logging.getLogger(__name__)

# pip option -> the uv environment variable with the same meaning. pip lists
# are whitespace-separated; uv reads UV_FIND_LINKS comma-separated and the
# other lists whitespace-separated (checked with uv 0.13).
PIP_TO_UV = {
    "index-url": "UV_INDEX_URL",
    "extra-index-url": "UV_EXTRA_INDEX_URL",
    "find-links": "UV_FIND_LINKS",
    "constraint": "UV_CONSTRAINT",
    "cert": "SSL_CERT_FILE",
    "timeout": "UV_HTTP_TIMEOUT",
    "default-timeout": "UV_HTTP_TIMEOUT",
}
# What a lock install takes from pip's settings: sources and limits, not
# constraints. A lock is exact pins already, and uv refuses a constraint like
# this machine's `torch<=2.14.1` in --require-hashes mode.
LOCK_INSTALL_KEYS = frozenset(PIP_TO_UV) - {"constraint"}
# pip merges every index and takes the best version across them; uv's default
# takes the first index that knows a name. With more than one index configured
# only pip's rule keeps both backends resolving to the same versions.
PIP_INDEX_STRATEGY = "unsafe-best-match"
# `pip config list` answers in ~0.3 s; a hung pip must not hold a session.
PIP_CONFIG_TIMEOUT_S = 30.0
# A reachable package page answers in well under a second; an unreachable host
# fails DNS at once here. 5 s bounds a black-holed route without slowing a cold run.
PROBE_TIMEOUT_S = 5.0
_LINE = re.compile(r"^(?P<section>[^.\s]*)\.(?P<key>[\w-]+)='(?P<value>.*)'$")


def read_pip_config(python: str = sys.executable, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """pip's effective settings (``key -> value``) as ``pip config list`` reports them.

    Precedence follows pip: ``PIP_*`` variables (``:env:``) over the ``install``
    section over ``global``. An interpreter without pip yields ``{}``.
    """
    try:
        out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             env=dict(os.environ if env is None else env), timeout=PIP_CONFIG_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("pip config list failed (%s); uv gets no pip settings", exc)
        return {}
    rank = {"global": 0, "install": 1, ":env:": 2}
    best: dict[str, tuple[int, str]] = {}
    for line in out.stdout.splitlines():
        m = _LINE.match(line.strip())
        if not m or m["section"] not in rank:
            continue
        r = rank[m["section"]]
        if m["key"] not in best or best[m["key"]][0] <= r:
            best[m["key"]] = (r, m["value"])
    return {k: v for k, (_, v) in best.items()}


def uv_env(pip_config: Mapping[str, str], keys: frozenset[str] = frozenset(PIP_TO_UV)) -> dict[str, str]:
    """The ``UV_*`` variables that give uv the pip settings named in ``keys``."""
    env: dict[str, str] = {}
    for key, value in pip_config.items():
        var = PIP_TO_UV.get(key) if key in keys else None
        if var and value.strip():
            sep = "," if var == "UV_FIND_LINKS" else " "
            env[var] = sep.join(value.split())
    if "UV_INDEX_URL" in env or "UV_EXTRA_INDEX_URL" in env:
        env["UV_INDEX_STRATEGY"] = PIP_INDEX_STRATEGY
    return env


def answers(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when ``url`` answers (any HTTP status below 500), else why not, in a few words."""
    if not url.startswith(("http://", "https://")):
        return None if Path(url.removeprefix("file://")).exists() else "no such path"
    req = urllib.request.Request(url, method="HEAD")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s):  # URLs come from our requirement files
            return None
    except urllib.error.HTTPError as exc:
        return None if exc.code < 500 else f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"unreachable ({reason})"
