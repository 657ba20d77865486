"""Warmup specs: the servers the e2e tests declare, read from the tests themselves.

sglang #24253 kept a FALLBACK_ARGS dict beside its tests, and the two drifted.
Here the only source is ``pytest --collect-only --kiln-collect-keys`` over
the e2e suites (ci.session.pytest_plugin writes each unique server key its collected
tests need); their launch args come from the one launch path the pool uses
(ci.engine.launch).
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ci.engine import launch

REPO = Path(__file__).resolve().parents[2]
# pytest --collect-only of the e2e suites only imports modules; two minutes
# means a hung import, not a slow one.
COLLECT_TIMEOUT_S = 120.0


class WarmupError(RuntimeError):
    """Bad input, or one spec's warmup failed; the message is one line."""


@dataclass(frozen=True)
class WarmupSpec:
    """One server the e2e tests need: the same (model, tp, args) the pool keys servers by."""

    model: str
    tp: int = 1
    args: tuple[str, ...] = ()
    backend: str = ""
    tests: tuple[str, ...] = field(default=(), compare=False)

    @property
    def key(self) -> launch.ServerKey:
        """The pool's key for this spec."""
        return launch.ServerKey(self.model, self.tp, tuple(self.args))

    @property
    def label(self) -> str:
        return str(self.key)


def load_specs(path: Path) -> list[WarmupSpec]:
    """Specs from a ``--kiln-collect-keys`` file ([{model, tp, args, tests}])."""
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise WarmupError(f"cannot read collected keys {path}: {exc}") from None
    specs = []
    for row in rows if isinstance(rows, list) else [None]:
        if not (isinstance(row, dict) and isinstance(row.get("model"), str) and isinstance(row.get("tp"), int)
                and isinstance(row.get("args", []), list)):
            raise WarmupError(f"collected keys {path}: not a list of {{model, tp, args}}: {row!r}"[:300])
        specs.append(WarmupSpec(row["model"], row["tp"], tuple(map(str, row.get("args", []))),
                                tests=tuple(row.get("tests", []))))
    return specs


def collect_specs(profile: str, tests: str | Path = "tests/e2e", *, python: str = sys.executable) -> list[WarmupSpec]:
    """Ask pytest which servers the e2e tests declare (the one source of warmup specs)."""
    with tempfile.TemporaryDirectory(prefix="kiln-collect-") as tmp:
        out = Path(tmp) / "keys.json"
        # The repo's config (it loads ci.session.pytest_plugin) applies wherever the tests live.
        argv = [python, "-m", "pytest", str(tests), "--collect-only", "-q", "-p", "no:cacheprovider",
                "-c", str(REPO / "pyproject.toml"), "--rootdir", str(REPO),
                "--kiln-profile", profile, "--kiln-collect-keys", str(out)]
        try:
            done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=COLLECT_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise WarmupError(f"collecting e2e specs took over {COLLECT_TIMEOUT_S:.0f} s: {shlex.join(argv)}") from None
        # Exit 5 is "no tests collected": an empty suite, not an error.
        if done.returncode not in (0, 5) or not out.exists():
            last = ((done.stdout + done.stderr).strip().splitlines() or ["no output"])[-1]
            raise WarmupError(f"collecting e2e specs failed (pytest exit {done.returncode}): {last}")
        return load_specs(out)


def select(specs: Sequence[WarmupSpec], models: Sequence[str]) -> list[WarmupSpec]:
    """Keep the specs of ``models`` (all when empty); a model no test declares is an error."""
    if not models:
        return list(specs)
    declared = sorted({s.model for s in specs})
    unknown = [m for m in models if m not in declared]
    if unknown:
        raise WarmupError(f"--model {', '.join(unknown)}: no e2e test declares it; declared: "
                          f"{', '.join(declared) or 'none'}")
    return [s for s in specs if s.model in models]

