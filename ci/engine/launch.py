"""One launch path: how a server for a key is built and started, for the pool and for warmup alike.

pytest-free, so the warmup CLI and the chain use it without importing pytest.
A :class:`ServerKey` (model, tp, args) names what makes two servers
interchangeable. :func:`launch_args` resolves the model (a hub id, a
directory, or one of kiln's local models) and composes the args: the
profile's (its own for the key's model too), this machine's ``$KILN_SERVER_ARGS``, the tp>1 extras, then the
key's own, with flags the installed
engine lacks dropped or refused (ci.engine.compat); a local model is served
under the name the tests use (``Launch.served_name``).
:func:`build_server` adds the environment (kiln's cache directories, then the
profile's), the devices and the device-memory guard; :func:`start_watched`
starts it under a crash watch, so a crash signature in the log ends a launch
at once instead of at its timeout.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shlex
from pathlib import Path
from typing import Callable, Iterator, Mapping, NamedTuple

from ci.engine import caches, compat, models
from ci.engine.backends import BackendSpec
from ci.engine.crashwatch import CrashWatch
from ci.engine.server import Server, ServerError, ServerExited, ServerKey  # noqa: F401  (the pool's key)
from ci.host import cachedir
from ci.profiles import runners

log = logging.getLogger(__name__)


class Launch(NamedTuple):
    """What one launch runs: the engine's --model, its args, and the model id the API answers to."""

    model: str
    args: tuple[str, ...]
    served_name: str | None = None


def launch_args(profile: runners.Profile, key: ServerKey, backend: BackendSpec | None = None) -> Launch:
    """The :class:`Launch` for ``key`` on ``profile``: resolved model, full args, served name.

    With a ``backend`` whose version is known, flags the installed engine does
    not accept are dropped with a warning when the profile added them, and
    fail the launch (naming a version that has them) when the test asked for
    them (ci.engine.compat; the engine's --help is parsed once per version).
    """
    model, served_name = models.resolve(key.model)
    # tp>1 servers get the profile's multi-GPU args too (ci/profiles/runners.py says why).
    tp_args = profile.tp_args if key.tp > 1 else ()
    site_args = server_args_from_env()
    args = (*profile.server_args, *profile.model_args.get(key.model, ()), *site_args, *tp_args, *key.args)
    if backend is None or backend.version() is None:
        return Launch(model, args, served_name)  # a generic command: nothing to probe against
    probe = compat.FlagProbe.for_backend(backend, cache=compat.HelpCache())
    # $KILN_SERVER_ARGS is asked for as much as a test's own args: a flag the
    # engine lacks fails the launch instead of being dropped.
    requested = [a.split("=", 1)[0] for a in (*site_args, *key.args) if a.startswith("--")]
    try:
        return Launch(model, tuple(compat.filter_flags(probe, args, requested=requested)), served_name)
    except RuntimeError as exc:
        if isinstance(exc, compat.FeatureUnavailable):
            raise
        # No usable --help: launch as asked; the engine rejects what it lacks, loudly.
        log.warning("cannot probe %s flags (%s); launching with the args as given", backend.name, exc)
        return Launch(model, args, served_name)


# Launch args this machine's engine build needs on every launch, e.g. a staged
# SGLang without FA3: KILN_SERVER_ARGS="--attention-backend triton" (bench/gpu_stage.sh
# writes it). A KILN_ variable, so repro commands carry it (ci/report/repro.py).
SERVER_ARGS_ENV = "KILN_SERVER_ARGS"


def server_args_from_env(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """``$KILN_SERVER_ARGS`` split as a shell would; one clear error when it cannot be."""
    raw = (os.environ if environ is None else environ).get(SERVER_ARGS_ENV, "")
    try:
        return tuple(shlex.split(raw))
    except ValueError as exc:
        raise ValueError(f"${SERVER_ARGS_ENV} cannot be split into args ({exc}): {raw!r}") from None


def engine_env(backend: BackendSpec, profile: runners.Profile,
               cache_root: Path | None = None) -> dict[str, str]:
    """The environment every launch gets: kiln's cache directories, then the profile's own."""
    return {**caches.engine_cache_env(backend.name, cache_root or cachedir.default_root()),
            **dict(profile.env)}


def memory_guard(discovery: object) -> object:
    """The device-memory guard every GPU launch gets: per-device baselines before it, a
    release wait after its stop, sticky failures in the host-wide ledger (ci/host/gpumem.py)."""
    from ci.host import gpumem  # noqa: PLC0415  (GPU runners only)
    from ci.host.gpu_telemetry import telemetry_for  # noqa: PLC0415
    return gpumem.DeviceMemoryGuard(telemetry_for(discovery), gpumem.ReleaseLedger(gpumem.ledger_dir()))


def build_server(profile: runners.Profile, backend: BackendSpec, key: ServerKey, *,
                 log_dir: Path, devices: tuple[int, ...] = (), memory: object = None,
                 cache_root: Path | None = None, launch_timeout_s: float | None = None,
                 warm_dependent: bool = False, launched: Launch | None = None,
                 extra_env: Mapping[str, str] | None = None,
                 factory: Callable[..., Server] = Server, label: str | None = None) -> Server:
    """The (not yet started) server for ``key``: resolved model and args, env, devices, memory guard.

    ``launched`` is the :class:`Launch` already computed by :func:`launch_args`
    (warmup computes it once for its cache key).
    ``extra_env`` goes over the usual environment (a benchmark's fault shim).
    ``label`` names the server in logs and records instead of its key (a
    topology's "worker 1 of ...": two workers of one key must be told apart).
    """
    model, args, served_name = launched if launched is not None else launch_args(profile, key, backend)
    return factory(backend, model, tp=key.tp, args=tuple(args), served_name=served_name,
                   env={**engine_env(backend, profile, cache_root), **(extra_env or {})},
                   log_dir=log_dir,
                   launch_timeout_s=launch_timeout_s or profile.launch_timeout_s,
                   key=label or str(key), devices=devices, vendor=profile.vendor, memory=memory,
                   warm_dependent=warm_dependent)


@contextlib.contextmanager
def watched(server: Server, during: str, *, strict: bool = False) -> Iterator[None]:
    """Run the block (a start; warmup's start and request) under a crash watch on ``server``'s log.

    An engine whose worker died while the API process lingers would otherwise
    hold a launch for its whole timeout (240 s on CPU, 10 min on GPU) with the
    cause already in the log: the watch stops the server at the first crash
    signature, and the block's failure becomes a ServerExited naming that
    line. ``strict``: a signature fails the block even when the block itself
    succeeded (warmup must not mark a cache warm from a launch that logged a
    crash; a pool server that answered its health check is the tests' to judge).
    The watch stops when the block ends, before any later stop: shutdown
    tracebacks are not crashes.
    """
    watch = CrashWatch(server).start()
    try:
        yield
    except Exception as exc:
        watch.stop()
        if watch.fired:
            raise _crashed(server, watch.fired, during, exc) from exc
        raise
    finally:
        watch.stop()
    if strict and watch.fired:
        raise _crashed(server, watch.fired, during, None)


def _crashed(server: Server, fired: tuple[str, str], during: str, exc: Exception | None) -> ServerExited:
    name, line = fired
    # The engine may have exited on its own as the line was logged (the watch
    # and the exit race): then say its code too.
    code = server.exit_code()
    how = f"; it exited with code {code}" if code is not None and code > 0 else ""
    tail = exc.tail if isinstance(exc, ServerError) else ""
    return ServerExited(f"crash signature ({name}) in the log during {during}: {line}{how}", tail,
                        server.log_path)


def start_watched(server: Server) -> None:
    """Start ``server`` under a crash watch (:func:`watched`): a crash signature ends the launch at once."""
    with watched(server, "launch"):
        server.start()
