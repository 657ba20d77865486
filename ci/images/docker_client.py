"""A Docker SDK client with deadlines, and one clear line when there is no daemon.

Every other docker-facing module (ci/images/pull.py, ci/images/containers.py) gets its
client here so that two things hold everywhere:

* every API call has a deadline (the SDK's default is 60 s, and some calls,
  e.g. ``pull``, pass ``timeout=None`` and would wait forever);
* "the daemon is not there" reaches the user as one line naming the socket and
  the cause, not a 40-line traceback from urllib3.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
from typing import Iterator, Mapping

import docker
import docker.errors
import requests

log = logging.getLogger(__name__)

# Default deadline for one Docker API call. Local calls answer in milliseconds;
# 60 s covers a daemon busy extracting a 20 GB layer without letting a wedged
# daemon hold the CI job until its global timeout.
API_TIMEOUT_S = 60.0
# Where the SDK looks when neither an argument nor DOCKER_HOST names a daemon.
DEFAULT_SOCKET = "unix:///var/run/docker.sock"


class DockerError(RuntimeError):
    """A docker-side failure kiln can explain in one line (tasks turn it into ``invoke.Exit``)."""


class ContainerError(DockerError):
    """A container could not be created, started or stopped as asked."""


class DockerUnavailable(DockerError):
    """No Docker daemon answers at the configured address."""


def describe_cause(exc: BaseException) -> str:
    """Shortest honest description of why a connection failed.

    Walks the exception chain (requests -> urllib3 -> OSError) to the OS error,
    which is the part a person can act on ("no such file", "refused").
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno is not None:
            hint = {
                errno.ENOENT: "socket does not exist (is dockerd running?)",
                errno.ECONNREFUSED: "connection refused (is dockerd running?)",
                errno.EACCES: "permission denied (root or the docker group needed)",
            }.get(cur.errno)
            return hint or (cur.strerror or str(cur))
        if isinstance(cur, (requests.Timeout, TimeoutError)):
            return "no answer before the deadline"
        nxt = cur.__cause__ or cur.__context__
        if nxt is None and cur.args and isinstance(cur.args[0], BaseException):
            nxt = cur.args[0]
        # urllib3 keeps the OS error in .reason, not in the chain.
        reason = getattr(cur, "reason", None)
        if nxt is None and isinstance(reason, BaseException):
            nxt = reason
        cur = nxt
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def daemon_address(base_url: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """The daemon address kiln will use: argument, else DOCKER_HOST, else the default socket."""
    env = os.environ if env is None else env
    return base_url or env.get("DOCKER_HOST") or DEFAULT_SOCKET


def connect(base_url: str | None = None, *, timeout: float = API_TIMEOUT_S,
            env: Mapping[str, str] | None = None) -> docker.DockerClient:
    """A client talking to a live daemon, or :class:`DockerUnavailable` with the cause.

    ``base_url`` wins over ``DOCKER_HOST``; TLS settings come from the
    environment as the docker CLI reads them. The daemon is pinged before the
    client is returned so that later calls fail for their own reasons only.
    """
    env = os.environ if env is None else env
    address = daemon_address(base_url, env)
    try:
        if base_url:
            client = docker.DockerClient(base_url=base_url, timeout=timeout)
        else:
            client = docker.DockerClient.from_env(timeout=timeout, environment=dict(env))
    except docker.errors.DockerException as exc:
        # Raised by the version probe inside the constructor.
        raise DockerUnavailable(f"Docker daemon not reachable at {address}: {describe_cause(exc)}") from None
    try:
        client.ping()
    except (requests.RequestException, docker.errors.APIError) as exc:
        client.close()
        raise DockerUnavailable(f"Docker daemon not reachable at {address}: {describe_cause(exc)}") from None
    log.debug("connected to Docker daemon at %s (API %s)", address, client.api.api_version)
    return client


@contextlib.contextmanager
def session(base_url: str | None = None, *, timeout: float = API_TIMEOUT_S,
            env: Mapping[str, str] | None = None) -> Iterator[docker.DockerClient]:
    """``connect`` as a context manager that always closes the client's connections."""
    client = connect(base_url, timeout=timeout, env=env)
    try:
        yield client
    finally:
        client.close()


def unavailable_from(exc: BaseException) -> DockerUnavailable:
    """Turn a transport error from an API call into the one-line daemon error."""
    return DockerUnavailable(f"Docker daemon stopped answering: {describe_cause(exc)}")
