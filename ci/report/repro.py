"""The shell command that reruns exactly one test, as printed in a report.

``nox -s e2e-h100-4 -- 'tests/e2e/test_api.py::test_chat[stream]'``: pasted into
a shell it selects that test and nothing else, whatever its parametrize id holds
(spaces, brackets, quotes, ``$``), because the node id is always single-quoted.
An environment prefix carries only device visibility and kiln's own knobs, and
never a value that is or contains a secret.
"""
from __future__ import annotations

import shlex
from typing import Mapping

from ci.text.redact import Redactor, is_secret_name

# Variables a pasted repro may carry: device visibility and kiln's own knobs.
ENV_ALLOWLIST = frozenset({"CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"})
ENV_KNOB_PREFIX = "KILN_"
# Set by the harness itself for each run, so a repro must not pin them.
ENV_NOT_REPRO = frozenset({"KILN_SESSION", "KILN_SECRET_VARS"})
# Put before the command when the test failed while launching a server that
# relies on warmed JIT caches: a stale or missing cache is the first suspect,
# and `--cold` rebuilds it. The trailing && lets both lines be pasted at once.
WARMUP_HINT = "invoke warmup --cold &&"


def shell_quote(arg: str) -> str:
    """Single-quote ``arg`` for POSIX shells (always, so every repro reads alike)."""
    return "'" + arg.replace("'", "'\"'\"'") + "'"


def env_prefix(env: Mapping[str, str], redactor: Redactor) -> str:
    """``NAME=value`` pairs a repro needs: allowlisted, not secret, values quoted."""
    pairs = []
    for name in sorted(env):
        value = env[name]
        wanted = name in ENV_ALLOWLIST or (name.startswith(ENV_KNOB_PREFIX) and name not in ENV_NOT_REPRO)
        if not wanted or is_secret_name(name) or redactor.redact(value) != value:
            continue
        pairs.append(f"{name}={shlex.quote(value)}")
    return " ".join(pairs)


def repro_command(session: str, nodeid: str, env: Mapping[str, str] | None = None,
                  redactor: Redactor | None = None) -> str:
    """The shell command that reruns exactly ``nodeid`` in nox session ``session``."""
    prefix = env_prefix(env or {}, redactor or Redactor())
    command = f"nox -s {shlex.quote(session)} -- {shell_quote(nodeid)}"
    return f"{prefix} {command}" if prefix else command
