"""kiln's sessions: one ``e2e-<profile>`` per runner kind, plus ``tests``.

    nox -s e2e-cpu                      # the main job on any machine
    nox -s e2e-h100-4 -- 'tests/e2e/test_api.py::test_chat'
    nox -s tests                        # kiln's own unit + integration tests

The e2e sessions are generated from the runner table (ci/runners.py): each is
a thin wrapper over ``_run_e2e``. Harness flags (``--shard i/n``) are taken out
of the posargs before pytest sees them; ``--kiln-warmup [--kiln-cold]`` runs the
JIT warmup in the session's venv instead of the tests (what `invoke warmup` calls).
"""
from __future__ import annotations

import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
sys.path.insert(0, str(ROOT))

from ci import runners  # noqa: E402  (needs the repo root on sys.path)

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True
nox.needs_version = ">=2024.3.2"

REPORTS = ROOT / "reports"
# The index's torchvision/torchaudio/torchcodec are built against CUDA torch and
# break `import transformers` (and so vLLM) next to the CPU torch (MISSION.md).
BROKEN_WITH_CPU_TORCH = ("torchvision", "torchaudio", "torchcodec")


def _print_environment(session: nox.Session, profile: runners.Profile) -> None:
    """What this run is on: the first thing anyone reading a red log needs."""
    session.run("python", "-m", "ci.envinfo", "--profile", profile.name)


def _install_e2e(session: nox.Session, profile: runners.Profile) -> None:
    if profile.vendor == "cpu":
        session.install("-r", "requirements/e2e-cpu.txt")
        session.run_install("python", "-m", "pip", "uninstall", "-y", "-q", *BROKEN_WITH_CPU_TORCH)
    else:
        session.install("-r", "requirements/e2e-gpu.txt")


# Harness flags for the warmup mode of an e2e session, with the ci.warmup
# option each one becomes; stripped before anything reaches pytest.
WARMUP_FLAGS = {"--kiln-warmup": None, "--kiln-cold": "--cold", "--kiln-strict": "--strict"}


def _split_warmup_flags(posargs: list[str]) -> tuple[list[str] | None, list[str]]:
    """(ci.warmup args, rest) when ``--kiln-warmup`` is present, else (None, posargs)."""
    if "--kiln-warmup" not in posargs:
        return None, list(posargs)
    flags = [WARMUP_FLAGS[a] for a in posargs if a in WARMUP_FLAGS and WARMUP_FLAGS[a]]
    rest = [a for a in posargs if a not in WARMUP_FLAGS]
    models = [f"--model={m}" for m in rest]  # what is left names models to warm
    return flags + models, []


def _names_tests(arg: str) -> bool:
    """True when a posarg selects tests (a path or node id), not an option or its value."""
    return not arg.startswith("-") and (ROOT / arg.split("::")[0]).exists()


def _run_e2e(session: nox.Session, profile: runners.Profile) -> None:
    from ci import shard as sharding  # noqa: PLC0415  (only e2e sessions shard)

    _install_e2e(session, profile)
    _print_environment(session, profile)
    session.run("python", "-m", "ci.envinfo", "--profile", profile.name, "--check-capacity")
    if profile.default_model == "tiny-llama":
        session.run("python", "-m", "ci.tinymodel")
    if profile.vendor == "cpu":
        # The real model (ci/realmodel.py): fetched and converted here, once per
        # cache, so a failed download names itself before any engine starts.
        session.run("python", "-m", "ci.realmodel")
    warm_flags, posargs = _split_warmup_flags(session.posargs)
    if warm_flags is not None:
        # `invoke warmup` / the chain's warmup step: same venv, so the same engine.
        session.run("python", "-m", "ci.warmup", "--profile", profile.name, *warm_flags,
                    env={"PYTHONUNBUFFERED": "1"})
        return
    shard_spec, posargs = sharding.split_shard_arg(posargs)
    junit = REPORTS / f"junit-{profile.session}.xml"
    # Options alone (`-- -x --kiln-backend ...`) still mean the e2e suites, not
    # pytest's testpaths (which would pull in kiln's own unit tests).
    targets = posargs if any(_names_tests(a) for a in posargs) else ["tests/e2e", *posargs]
    if shard_spec is not None:
        targets = sharding.select_for_session(session, targets, shard_spec, REPORTS)
    session.run(
        "python", "-m", "pytest", *targets,
        f"--kiln-profile={profile.name}", f"--junitxml={junit}",
        f"--timeout={int(profile.test_timeout_s)}", "-p", "no:cacheprovider",
        env={"KILN_SESSION": profile.session, "PYTHONUNBUFFERED": "1"},
    )


def _e2e_session(profile: runners.Profile):
    # System site-packages on GPU runners: the engine lives in the image's Python.
    venv_params = [] if profile.vendor == "cpu" else ["--system-site-packages"]

    @nox.session(name=profile.session, venv_params=venv_params, default=False)
    def e2e(session: nox.Session) -> None:
        _run_e2e(session, profile)

    e2e.__doc__ = (f"e2e suites on {profile.name}: {profile.gpus} {profile.vendor} GPU(s), "
                   f"{profile.backend} backend.")
    return e2e


for _profile in runners.PROFILES.values():
    globals()[f"e2e_{_profile.name.replace('-', '_')}"] = _e2e_session(_profile)


@nox.session
def tests(session: nox.Session) -> None:
    """kiln's own unit and integration tests (real processes, real Docker engine)."""
    session.install("-r", "requirements/tests.txt")
    # e2e needs an engine, tests/gpu real GPUs (bench/gpu_pool_check.py runs it there).
    args = session.posargs or ["tests", "--ignore=tests/e2e", "--ignore=tests/gpu"]
    session.run("python", "-m", "pytest", *args, f"--junitxml={REPORTS / 'junit-tests.xml'}",
                env={"PYTHONUNBUFFERED": "1"})
