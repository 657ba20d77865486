"""Engine containers for a runner profile: devices, mounts, labels, logs, and a stop that always ends.

* Devices: the allocated GPUs and RDMA, never "all" (ci/images/container_devices.py).
* Every container carries ``kiln.managed=1`` and ``kiln.run-tag=<tag>``; stale-container
  cleanup matches on those labels only: sglang #24253 showed what ``pkill -f`` by name
  does to a neighbour's job, and the same holds for ``docker rm`` by image or name.
* Logs stream to a file from a thread; the tail is logged whichever way the
  container ends. Stop is SIGTERM, then SIGKILL after a timeout, then remove.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

import docker
import docker.errors
import requests
import urllib3.exceptions

from ci.host import procfs
from ci.images.container_devices import DEV_ROOT, SYS_ROOT, device_options
from ci.images.docker_client import ContainerError, unavailable_from
from ci.text import logtail

log = logging.getLogger(__name__)

LABEL_MANAGED = "kiln.managed"
LABEL_RUN_TAG = "kiln.run-tag"
LABEL_RUNNER = "kiln.runner"
# "<boot id>/<pid>/<start ticks>" of the process that started the container
# (the chain on the host): a container whose owner is gone -- a chain killed
# with SIGKILL never reaches its `finally` -- is stale; one whose owner runs
# belongs to another job on this host and is never touched.
LABEL_OWNER = "kiln.owner"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
RUN_TAG_ENV = "KILN_RUN_TAG"
# Container logs land here unless the caller names a file (.kiln/ is gitignored).
DEFAULT_LOG_DIR = Path(".kiln/logs")
# Engines release GPU memory and flush logs on SIGTERM; vLLM/sglang need up to
# ~20 s with many workers. After this docker sends SIGKILL.
STOP_TIMEOUT_S = 30.0
# After SIGKILL only reaping is left; a container still up then is a daemon bug.
KILL_WAIT_S = 15.0
# Same tail length sglang #24253 prints: enough for a Python traceback.
LOG_TAIL_LINES = 30
# Bounded wait for the log thread to drain after the container exited.
LOG_JOIN_S = 10.0
_RUN_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def _frozen(mapping: Mapping[str, str] | None = None) -> Mapping[str, str]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class ContainerSpec:
    """What to run; the runner profile (ci/profiles/runners.py) and the allocator fill it in.

    ``mounts`` maps host path -> container path, with an optional ``:ro``
    suffix on the container path (HF cache, workspace). ``device_ids`` are
    NVIDIA indices/UUIDs; AMD GPU indices (KFD order) or render nodes (``renderD128`` or a path).
    """

    image: str
    run_tag: str
    command: Sequence[str] | None = None
    # Engine images (vllm/vllm-openai) set ENTRYPOINT to the server; the chain
    # overrides it to keep a shell-less container alive for `docker exec`.
    entrypoint: Sequence[str] | None = None
    vendor: str = "cpu"
    device_ids: Sequence[str] = ()
    shm_size: str | None = None
    mounts: Mapping[str, str] = field(default_factory=_frozen)
    env: Mapping[str, str] = field(default_factory=_frozen)
    name: str | None = None
    runner: str | None = None
    owner: str | None = None  # LABEL_OWNER's value; owner_label() for this process
    # Engines serve on host ports allocated by ci/host/ports.py; host networking keeps
    # those numbers valid inside and out.
    network_mode: str = "host"


def owner_label(pid: int | None = None) -> str:
    """LABEL_OWNER's value naming process ``pid`` (default: this one) on this boot of this host."""
    ident = procfs.identity(pid or os.getpid())
    if ident is None:
        raise ContainerError(f"no process {pid} to own a container")
    return f"{_boot_id()}/{ident.pid}/{ident.start}"


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return "unknown-boot"


def owner_gone(label: str | None) -> bool | None:
    """True when the owner named by ``label`` no longer runs; None when there is no (valid) label."""
    parts = (label or "").split("/")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    if parts[0] != _boot_id():
        return True  # the host rebooted since: that owner is gone for sure
    return not procfs.is_alive((int(parts[1]), int(parts[2])))


def check_run_tag(tag: str) -> str:
    """``tag`` if usable as a label value and name part, else a one-line error."""
    if not _RUN_TAG_RE.match(tag or ""):
        raise ContainerError(f"bad run tag {tag!r}: use 1-128 of A-Z a-z 0-9 _ . - (starting alphanumeric)")
    return tag


def run_tag_from_env(env: Mapping[str, str] | None = None) -> str:
    """The run tag for `invoke start/stop`: ``$KILN_RUN_TAG``, else the GitHub run, else 'local'."""
    env = os.environ if env is None else env
    if env.get(RUN_TAG_ENV):
        return check_run_tag(env[RUN_TAG_ENV])
    if env.get("GITHUB_RUN_ID"):
        return check_run_tag(f"gh-{env['GITHUB_RUN_ID']}-{env.get('GITHUB_RUN_ATTEMPT', '1')}")
    return "local"


def parse_assignments(items: Sequence[str], what: str) -> dict[str, str]:
    """``["A=B", ...]`` from the command line as a dict; a malformed item is a one-line error."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ContainerError(f"bad {what} {item!r}: expected KEY=VALUE")
        pairs[key] = value
    return pairs


def parse_env(items: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    """``--env`` items: ``KEY=VALUE``, or a bare ``KEY`` whose value comes from ``environ``.

    The bare form (docker's ``-e NAME``) keeps a credential off the command
    line: a rerun command names the variable, the shell that pastes it
    supplies the value. A bare name that is not set is left out.
    """
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ContainerError(f"bad --env {item!r}: expected KEY=VALUE or a variable name")
        if sep:
            pairs[key] = value
        elif key in environ:
            pairs[key] = environ[key]
    return pairs


def mount_options(mounts: Mapping[str, str]) -> dict:
    """``volumes`` for bind mounts; a missing host path is an error, not a silent empty dir."""
    volumes = {}
    for host, inside in mounts.items():
        path, _, mode = inside.partition(":")
        if mode not in ("", "ro", "rw") or not path.startswith("/"):
            raise ContainerError(f"bad mount target {inside!r} for {host}: expected /path or /path:ro")
        if not Path(host).exists():
            # dockerd would create it as an empty root-owned dir, hiding the typo.
            raise ContainerError(f"mount source {host} does not exist")
        volumes[str(Path(host).resolve())] = {"bind": path, "mode": mode or "rw"}
    return {"volumes": volumes} if volumes else {}


def container_kwargs(spec: ContainerSpec, dev_root: Path = DEV_ROOT, sys_root: Path = SYS_ROOT) -> dict:
    """Everything ``client.containers.create`` gets for ``spec`` (pure: unit-testable)."""
    check_run_tag(spec.run_tag)
    labels = {LABEL_MANAGED: "1", LABEL_RUN_TAG: spec.run_tag}
    if spec.runner:
        labels[LABEL_RUNNER] = spec.runner
    if spec.owner:
        labels[LABEL_OWNER] = spec.owner
    kwargs = {
        "image": spec.image,
        "command": list(spec.command) if spec.command else None,
        "entrypoint": list(spec.entrypoint) if spec.entrypoint else None,
        "name": spec.name or f"kiln-{spec.run_tag}-{secrets.token_hex(3)}",
        "labels": labels,
        "environment": dict(spec.env),
        "network_mode": spec.network_mode,
        "detach": True,
        **device_options(spec.vendor, spec.device_ids, dev_root, sys_root),
        **mount_options(spec.mounts),
    }
    if spec.shm_size:
        kwargs["shm_size"] = spec.shm_size
    return kwargs


class _LogPump(threading.Thread):
    """Copies a container's stdout/stderr to a file until the container ends.

    The SDK turns the socket timeout off for log streams, so this read has no
    deadline of its own: it ends when the container does, and every container
    kiln starts ends through :meth:`Container.stop` (SIGKILL after a timeout).
    A wedged daemon could still hold it; stop() joins it with a deadline and
    says so rather than hang.
    """

    def __init__(self, container, path: Path):
        super().__init__(name=f"logs-{container.name}", daemon=True)
        self._container = container
        self._path = path

    def run(self) -> None:
        with open(self._path, "ab") as out:
            try:
                for chunk in self._container.logs(stream=True, follow=True):
                    out.write(chunk)
                    out.flush()
            except (docker.errors.APIError, requests.RequestException) as exc:
                log.warning("log stream of container %s ended early: %s", self._container.name, exc)


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ('' when there is none)."""
    return logtail.read_tail(path, lines) if path.exists() else ""


class Container:
    """A started container: its logs go to ``log_path``; ``stop()`` is idempotent."""

    def __init__(self, container, log_path: Path):
        self.container = container
        self.name = container.name
        self.id = container.id
        self.log_path = log_path
        self.exit_code: int | None = None
        self._pump: _LogPump | None = None
        self._stopped = False

    def _start_logs(self) -> None:
        self._pump = _LogPump(self.container, self.log_path)
        self._pump.start()

    def wait(self, timeout: float) -> int | None:
        """Exit code once the container has exited within ``timeout`` s, else None."""
        try:
            return self.container.wait(timeout=timeout).get("StatusCode")
        except requests.ConnectionError as exc:
            if isinstance(exc.args[0] if exc.args else None, urllib3.exceptions.ReadTimeoutError):
                return None
            raise unavailable_from(exc) from None
        except requests.Timeout:
            return None

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines the container wrote."""
        return tail(self.log_path, lines)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, SIGKILL after ``timeout`` s, remove; logs the tail whatever happens. Returns the exit code."""
        if self._stopped:
            return self.exit_code
        self._stopped = True
        try:
            try:
                self.container.stop(timeout=math.ceil(timeout))
            except docker.errors.NotFound:
                return None
            except (docker.errors.APIError, requests.RequestException) as exc:
                log.warning("stop of container %s failed (%s); killing it", self.name, exc)
                with contextlib.suppress(docker.errors.APIError):
                    self.container.kill()
            self.exit_code = self.wait(KILL_WAIT_S)
            if self.exit_code is None:
                raise ContainerError(f"container {self.name} still running {KILL_WAIT_S:.0f} s after SIGKILL")
            return self.exit_code
        except requests.ConnectionError as exc:
            raise unavailable_from(exc) from None
        finally:
            if self._pump is None:
                # Attached from another process (`invoke stop`): the daemon kept the logs.
                with contextlib.suppress(docker.errors.APIError, requests.RequestException, OSError):
                    self.log_path.parent.mkdir(parents=True, exist_ok=True)
                    self.log_path.write_bytes(self.container.logs())
            else:
                self._pump.join(LOG_JOIN_S)
                if self._pump.is_alive():
                    log.warning("log stream of %s still open %.0f s after exit; leaving it", self.name, LOG_JOIN_S)
            log.info("container %s exited with %s; last %d log lines (%s):\n%s", self.name, self.exit_code,
                     LOG_TAIL_LINES, self.log_path, self.tail() or "(no output)")
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError, requests.RequestException):
                self.container.remove(force=True)

    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(client: docker.DockerClient, spec: ContainerSpec, log_path: Path | None = None,
          dev_root: Path = DEV_ROOT, log_dir: Path = DEFAULT_LOG_DIR, sys_root: Path = SYS_ROOT) -> Container:
    """Create and start a container for ``spec``; its logs stream to ``log_path``
    (default ``<log_dir>/<container name>.log``).

    Never pulls: an image that is not local is a one-line error pointing at
    ``invoke pull``, so every pull goes through the mirror/backoff path.
    """
    kwargs = container_kwargs(spec, dev_root, sys_root)
    log_path = log_path or log_dir / f"{kwargs['name']}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        created = client.containers.create(**kwargs)
    except docker.errors.ImageNotFound:
        raise ContainerError(f"image {spec.image} is not present locally: run `invoke pull {spec.image}` first") from None
    except docker.errors.APIError as exc:
        raise ContainerError(f"cannot create a container from {spec.image}: {exc.explanation or exc}") from None
    except requests.ConnectionError as exc:
        raise unavailable_from(exc) from None
    handle = Container(created, log_path)
    log.info("starting container %s (%s, %s devices %s, run tag %s, env keys %s)", handle.name, spec.image,
             spec.vendor, list(spec.device_ids), spec.run_tag, sorted(spec.env))
    try:
        created.start()
    except (docker.errors.APIError, requests.RequestException) as exc:
        handle.stop()
        explanation = getattr(exc, "explanation", None) or exc
        raise ContainerError(f"container {handle.name} did not start: {explanation}") from None
    handle._start_logs()
    return handle


def _kiln_containers(client: docker.DockerClient, runner: str | None = None) -> list:
    filters = {"label": [f"{LABEL_MANAGED}=1"] + ([f"{LABEL_RUNNER}={runner}"] if runner else [])}
    try:
        found = client.containers.list(all=True, filters=filters)
    except requests.ConnectionError as exc:
        raise unavailable_from(exc) from None
    # Re-check client-side: a container without kiln's label is never touched.
    return [c for c in found if c.labels.get(LABEL_MANAGED) == "1"
            and (runner is None or c.labels.get(LABEL_RUNNER) == runner)]


def cleanup_stale(client: docker.DockerClient, current_run_tag: str, runner: str | None = None) -> list[str]:
    """Remove kiln containers of other runs (a crashed job's engine still holding GPUs); returns names.

    Only containers labelled ``kiln.managed=1`` (and, given ``runner``, that
    runner) whose run tag differs from ``current_run_tag`` are removed -- and
    of those that name an owner (LABEL_OWNER), only the ones whose owner is gone.
    """
    check_run_tag(current_run_tag)
    removed = []
    for c in _kiln_containers(client, runner):
        tag = c.labels.get(LABEL_RUN_TAG)
        if tag == current_run_tag or owner_gone(c.labels.get(LABEL_OWNER)) is False:
            continue
        log.warning("removing stale kiln container %s (run tag %s, %s)", c.name, tag, c.status)
        with contextlib.suppress(docker.errors.NotFound):  # a concurrent cleanup got there first
            c.remove(force=True)
        removed.append(c.name)
    return removed


def stop_run(client: docker.DockerClient, run_tag: str, timeout: float = STOP_TIMEOUT_S,
             log_dir: Path = DEFAULT_LOG_DIR) -> list[str]:
    """Stop and remove every kiln container of ``run_tag`` (``invoke stop``); returns names.

    Each container's full log is saved to ``<log_dir>/<name>.log`` and its tail logged.
    """
    check_run_tag(run_tag)
    stopped = []
    for c in _kiln_containers(client):
        if c.labels.get(LABEL_RUN_TAG) != run_tag:
            continue
        Container(c, log_dir / f"{c.name}.log").stop(timeout)
        stopped.append(c.name)
    return stopped


def reap_orphaned(client: docker.DockerClient, *, dry_run: bool = False) -> list[str]:
    """Remove kiln containers whose owner process is gone (``invoke reap``); one line each.

    Containers without an owner label are left to ``cleanup_stale``'s run-tag rule.
    """
    lines = []
    for c in _kiln_containers(client):
        label = c.labels.get(LABEL_OWNER)
        if not owner_gone(label):
            continue
        lines.append(f"{'would remove' if dry_run else 'removed'} container {c.name} "
                     f"({c.status}, run tag {c.labels.get(LABEL_RUN_TAG)}): owner {label} is gone")
        if not dry_run:
            with contextlib.suppress(docker.errors.NotFound):
                c.remove(force=True)
    return lines
