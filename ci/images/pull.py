"""Image pulls: LAN mirrors first, then the image's own registry with backoff.

From sglang #23156 (AMD runner pool): pull from a registry mirror on the LAN
first, fall back to the public registry with exponential-backoff retries,
prefix mirror errors so they stand out, log in when credentials are in the
environment, and take the mirror address from configuration, never from code.

What kiln adds: every step has a deadline. dockerd itself waits ~25 s on a
registry that accepts TCP and never answers (measured: https try, then a 15 s
header timeout), and the SDK's ``pull`` passes ``timeout=None``. So a mirror is
first probed over plain HTTP with short timeouts, and the pull is streamed with
a read timeout (no progress message for N s = stalled) and an overall deadline;
closing the stream makes dockerd cancel the pull.
"""
from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import docker
import docker.auth
import docker.errors
import requests
import urllib3.exceptions

from ci.images.docker_client import DockerError, unavailable_from
from ci.images.pullprogress import PullProgress, reporting
# BadReference, ImageRef and parse_ref are part of this module's API too: callers need only ci.images.pull.
from ci.images.imageref import BadReference, ImageRef, is_address, parse_ref  # noqa: F401

log = logging.getLogger(__name__)

MIRRORS_ENV = "KILN_REGISTRY_MIRRORS"  # comma-separated HOST:PORT list
USER_ENV = "KILN_REGISTRY_USER"
PASSWORD_ENV = "KILN_REGISTRY_PASSWORD"
MIRROR_PREFIX = "[mirror-pull]"  # grep-able tag on every mirror failure line

# Upstream retries (sglang #23156): public registries rate-limit and blip for
# minutes; 6 attempts doubling from 30 s up to 300 s ride out ~10 min of trouble.
UPSTREAM_ATTEMPTS = 6
UPSTREAM_BASE_S = 30.0
UPSTREAM_CAP_S = 300.0
# A LAN mirror answering 5xx is usually restarting: a few quick retries are far
# cheaper than a multi-GB pull over the WAN.
MIRROR_ATTEMPTS = 3
MIRROR_BASE_S = 1.0
MIRROR_CAP_S = 4.0
# Mirror liveness probe. A LAN registry answers /v2/ in milliseconds; these
# bound the time lost to a dead mirror (goal: refused <= 1 s, black hole <= 3 s).
PROBE_CONNECT_TIMEOUT_S = 0.5
PROBE_READ_TIMEOUT_S = 1.0
# Longest silence from dockerd during a pull (it reports progress continuously
# while downloading/extracting); longer means a stalled registry connection.
MIRROR_STALL_S = 30.0
UPSTREAM_STALL_S = 120.0
# Overall cap for one pull attempt: a 30 GB ROCm image over a slow WAN link.
ATTEMPT_DEADLINE_S = 3600.0
# Connecting to the local daemon socket is instant; longer means no daemon.
DAEMON_CONNECT_TIMEOUT_S = 10.0

_NOT_FOUND = ("manifest unknown", "not found", "does not exist", "name unknown")
_AUTH = ("unauthorized", "authentication required", "no basic auth credentials",
         "401 unauthorized", "access to the resource is denied", "incorrect username or password")


class PullError(DockerError):
    """The image could not be pulled from any source."""


class ImageNotFound(PullError):
    """The image's own registry says the tag/digest does not exist (404): retrying cannot help."""


class AuthFailed(PullError):
    """The registry refused the credentials (401): retrying cannot help."""


class DigestMismatch(PullError):
    """The pulled image does not carry the digest the reference pinned."""


def mirrors_from_env(extra: Sequence[str] = (), env: Mapping[str, str] | None = None,
                     var: str = MIRRORS_ENV) -> list[str]:
    """Mirror addresses: explicit ones first, then ``$KILN_REGISTRY_MIRRORS`` (comma list); deduplicated."""
    env = os.environ if env is None else env
    found: list[str] = []
    for item in [*extra, *env.get(var, "").split(",")]:
        item = item.strip()
        if not item:
            continue
        if not is_address(item, port_required=True):
            raise BadReference(f"bad mirror {item!r}: expected HOST:PORT")
        if item not in found:
            found.append(item)
    return found


@dataclass(frozen=True)
class Credentials:
    """Registry credentials; the password never appears in repr, logs or argv."""

    username: str
    password: str = field(repr=False)

    def auth_config(self, registry: str) -> dict:
        """The SDK's ``auth_config`` (sent to dockerd in a header, never on a command line)."""
        return {"username": self.username, "password": self.password, "serveraddress": registry}


def credentials_from_env(env: Mapping[str, str] | None = None, user_var: str = USER_ENV,
                         password_var: str = PASSWORD_ENV) -> Credentials | None:
    """Credentials when both variables are set; None when neither; an error when only one is."""
    env = os.environ if env is None else env
    user, password = env.get(user_var, ""), env.get(password_var, "")
    if bool(user) != bool(password):
        missing = password_var if user else user_var
        raise BadReference(f"{missing} is not set but {user_var if user else password_var} is: set both or neither")
    return Credentials(user, password) if user else None


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: retry k waits uniform(0, min(cap, base * 2**k))."""

    attempts: int = UPSTREAM_ATTEMPTS
    base_s: float = UPSTREAM_BASE_S
    cap_s: float = UPSTREAM_CAP_S

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_s < 0 or self.cap_s < self.base_s:
            raise BadReference(f"bad backoff {self}: need attempts >= 1 and 0 <= base <= cap")

    def ceiling(self, retry: int) -> float:
        """Upper bound of the wait before retry number ``retry`` (0-based)."""
        return min(self.cap_s, self.base_s * 2.0 ** retry)

    def delay(self, retry: int, rng: Callable[[float, float], float] = random.uniform) -> float:
        """The jittered wait before retry number ``retry``."""
        return rng(0.0, self.ceiling(retry))


@dataclass(frozen=True)
class PullPolicy:
    """Every knob of :func:`pull`; the defaults are the named constants above."""

    upstream: Backoff = Backoff()
    mirror: Backoff = Backoff(MIRROR_ATTEMPTS, MIRROR_BASE_S, MIRROR_CAP_S)
    probe_connect_s: float = PROBE_CONNECT_TIMEOUT_S
    probe_read_s: float = PROBE_READ_TIMEOUT_S
    mirror_stall_s: float = MIRROR_STALL_S
    upstream_stall_s: float = UPSTREAM_STALL_S
    attempt_deadline_s: float = ATTEMPT_DEADLINE_S


@dataclass(frozen=True)
class PullResult:
    """What :func:`pull` got, and from where."""

    image: str
    image_id: str
    source: str  # "mirror" | "upstream"
    registry: str
    digest: str | None
    attempts: int
    seconds: float

    def summary(self) -> str:
        """One line for the CLI."""
        return (f"pulled {self.image} from {self.source} {self.registry} in {self.seconds:.1f} s "
                f"({self.attempts} attempt{'s' * (self.attempts != 1)}), id {self.image_id[:19]}")


class _AttemptFailed(Exception):
    """One attempt failed; ``kind`` is 'not_found', 'auth' or 'transient'."""

    def __init__(self, kind: str, cause: str):
        super().__init__(cause)
        self.kind = kind


def classify(message: str, status: int | None = None) -> str:
    """'not_found', 'auth' or 'transient' for a daemon/registry error message (dockerd maps most to 500)."""
    text = message.lower()
    if any(s in text for s in _AUTH):
        return "auth"
    if status == 404 or any(s in text for s in _NOT_FOUND):
        return "not_found"
    return "transient"


def check_digest(repo_digests: Sequence[str], expected: str) -> None:
    """Raise :class:`DigestMismatch` unless one of the image's RepoDigests is ``expected``."""
    if not any(d.rpartition("@")[2] == expected for d in repo_digests):
        got = ", ".join(d.rpartition("@")[2] for d in repo_digests) or "none"
        raise DigestMismatch(f"pulled image digest {got} does not match pinned {expected}")


def probe(address: str, policy: PullPolicy) -> _AttemptFailed | None:
    """None when a registry answers ``GET /v2/`` in time; otherwise why not.

    Any HTTP answer but 5xx counts as alive (401 = auth needed, 400 = it speaks
    https). Refused or silent hosts are 'unreachable': not worth a retry.
    """
    try:
        with requests.Session() as http:
            # Probe the mirror itself: through an HTTP_PROXY from the environment
            # a dead mirror would look alive (the proxy answers for it).
            http.trust_env = False
            resp = http.get(f"http://{address}/v2/", timeout=(policy.probe_connect_s, policy.probe_read_s),
                            allow_redirects=False)
    except requests.ConnectionError as exc:
        if isinstance(exc, requests.ConnectTimeout):
            return _AttemptFailed("unreachable", f"no TCP connect within {policy.probe_connect_s} s")
        return _AttemptFailed("unreachable", "connection refused" if "refused" in str(exc).lower() else str(exc))
    except requests.Timeout:
        return _AttemptFailed("unreachable", f"accepted TCP but no answer within {policy.probe_read_s} s")
    except requests.RequestException as exc:
        return _AttemptFailed("unreachable", str(exc))
    resp.close()
    if resp.status_code >= 500:
        return _AttemptFailed("transient", f"/v2/ answered HTTP {resp.status_code}")
    return None


def _daemon_pull(client: docker.DockerClient, ref: ImageRef, auth: dict | None,
                 stall_s: float, deadline_s: float) -> None:
    """Ask dockerd to pull ``ref``, streaming its progress under a stall timeout and a deadline."""
    api = client.api
    headers = {"X-Registry-Auth": docker.auth.encode_header(auth)} if auth else {}
    url = f"{api.base_url}/v{api.api_version}/images/create"
    params = {"fromImage": ref.repository, "tag": ref.reference}
    deadline = time.monotonic() + deadline_s
    try:
        resp = api.post(url, params=params, headers=headers, stream=True,
                        timeout=(DAEMON_CONNECT_TIMEOUT_S, stall_s))
    except requests.Timeout:
        raise _AttemptFailed("transient", f"no progress from dockerd for {stall_s:.0f} s (registry stalled)") from None
    except requests.ConnectionError as exc:
        raise unavailable_from(exc) from None
    with resp:  # leaving this block closes the stream, which cancels the pull in dockerd
        if resp.status_code >= 400:
            try:
                message = resp.json().get("message", resp.text)
            except ValueError:
                message = resp.text
            raise _AttemptFailed(classify(message, resp.status_code), message.strip())
        try:
            with reporting(PullProgress(str(ref)), log.info) as progress:
                for line in resp.iter_lines():
                    if not line:
                        continue
                    msg = json.loads(line)
                    if "error" in msg:
                        raise _AttemptFailed(classify(msg["error"]), msg["error"].strip())
                    log.debug("pull %s: %s %s", ref, msg.get("id", ""), msg.get("status", ""))
                    progress.update(msg)
                    if time.monotonic() > deadline:
                        raise _AttemptFailed("transient", f"pull exceeded its {deadline_s:.0f} s deadline")
        except requests.ConnectionError as exc:
            # requests reports a read timeout inside a stream as ConnectionError.
            if isinstance(exc.args[0] if exc.args else None, urllib3.exceptions.ReadTimeoutError):
                raise _AttemptFailed("transient", f"no progress from dockerd for {stall_s:.0f} s (registry stalled)") from None
            raise unavailable_from(exc) from None


def _finish(client: docker.DockerClient, ref: ImageRef, got: ImageRef) -> tuple[str, str | None]:
    """Check the digest, give the image its canonical name; returns (image id, digest)."""
    pulled = str(got) if not got.digest else f"{got.repository}@{got.digest}"
    try:
        image = client.images.get(pulled)
        repo_digests = image.attrs.get("RepoDigests") or []
        if ref.digest:
            try:
                check_digest(repo_digests, ref.digest)
            except DigestMismatch:
                client.images.remove(image.id, force=True)  # never leave a wrong image behind
                raise
        if ref.tag and (got.registry != ref.registry or ref.digest):
            image.tag(ref.repository, tag=ref.tag)
        if got.registry != ref.registry and ref.tag and not ref.digest:
            # Drop the mirror's name: the canonical tag keeps the image alive.
            client.images.remove(pulled, noprune=True)
    except docker.errors.ImageNotFound:
        raise _AttemptFailed("transient", f"dockerd ended the pull without {pulled}") from None
    except docker.errors.APIError as exc:
        raise PullError(f"pulled {pulled} but could not name it {ref}: {exc.explanation or exc}") from None
    except requests.ConnectionError as exc:
        raise unavailable_from(exc) from None
    digest = ref.digest or next((d.rpartition("@")[2] for d in repo_digests), None)
    return image.id, digest


def _login(client: docker.DockerClient, ref: ImageRef, creds: Credentials) -> None:
    """Log in through the SDK (credentials travel in the API body, never in argv)."""
    registry = None if ref.registry == "docker.io" else ref.registry
    try:
        client.login(creds.username, creds.password, registry=registry, reauth=True)
    except docker.errors.APIError as exc:
        message = str(exc.explanation or exc)
        raise _AttemptFailed(classify(message), f"login to {ref.registry} failed: {message}") from None
    except requests.Timeout:
        raise _AttemptFailed("transient", f"login to {ref.registry}: no answer") from None
    except requests.ConnectionError as exc:
        raise unavailable_from(exc) from None


def _try_mirror(client: docker.DockerClient, ref: ImageRef, mirror: str, policy: PullPolicy,
                wait: Callable[[float], object], rng: Callable[[float, float], float]):
    """Pull ``ref`` through one mirror: ((image id, digest) or None, attempts made).

    None (after logging why with the mirror prefix) when the mirror cannot serve it.
    """
    got = ref.on(mirror)
    attempt = 0
    for attempt in range(1, policy.mirror.attempts + 1):
        if attempt > 1:
            wait(policy.mirror.delay(attempt - 2, rng))
        failure = probe(mirror, policy)
        if failure is None:
            try:
                _daemon_pull(client, got, None, policy.mirror_stall_s, policy.attempt_deadline_s)
                return _finish(client, ref, got), attempt
            except _AttemptFailed as exc:
                failure = exc
        log.warning("%s %s (attempt %d/%d): %s", MIRROR_PREFIX, mirror, attempt,
                    policy.mirror.attempts, failure)
        if failure.kind != "transient":
            # Unreachable: a dead host does not come back in seconds. Missing
            # tag / auth: the mirror will not have it on the next try either.
            break
    log.warning("%s giving up on %s for %s", MIRROR_PREFIX, mirror, ref)
    return None, attempt


def pull(image: str, *, client: docker.DockerClient, mirrors: Sequence[str] = (),
         credentials: Credentials | None = None, policy: PullPolicy = PullPolicy(),
         wait: Callable[[float], object] | None = None,
         rng: Callable[[float, float], float] = random.uniform) -> PullResult:
    """Pull ``image``: each mirror first, then its own registry with backoff.

    Mirror images are retagged to the canonical name. Credentials (see
    :func:`credentials_from_env`) are used only for the image's own registry,
    never sent to a mirror. 404 and 401 from the own registry stop at once
    (:class:`ImageNotFound`, :class:`AuthFailed`); a pinned digest is checked
    (:class:`DigestMismatch`). ``wait`` and ``rng`` exist for tests.
    """
    ref = parse_ref(image)
    wait = threading.Event().wait if wait is None else wait
    start = time.monotonic()
    tries = 0
    for mirror in mirrors:
        if mirror == ref.registry:
            continue  # the image's own registry is tried below, with credentials and backoff
        got, used = _try_mirror(client, ref, mirror, policy, wait, rng)
        tries += used
        if got:
            return PullResult(str(ref), got[0], "mirror", mirror, got[1], tries, time.monotonic() - start)
    logged_in = False
    last = ""
    for attempt in range(policy.upstream.attempts):
        if attempt:
            delay = policy.upstream.delay(attempt - 1, rng)
            log.warning("pull %s: attempt %d/%d failed (%s); retrying in %.1f s", ref, attempt,
                        policy.upstream.attempts, last, delay)
            wait(delay)
        tries += 1
        try:
            if credentials and not logged_in:
                _login(client, ref, credentials)
                logged_in = True
            auth = credentials.auth_config(ref.registry) if credentials else None
            _daemon_pull(client, ref, auth, policy.upstream_stall_s, policy.attempt_deadline_s)
            image_id, digest = _finish(client, ref, ref)
            return PullResult(str(ref), image_id, "upstream", ref.registry, digest, tries,
                              time.monotonic() - start)
        except _AttemptFailed as exc:
            if exc.kind == "not_found":
                raise ImageNotFound(f"{ref} not found on {ref.registry}: {exc}") from None
            if exc.kind == "auth":
                hint = "wrong credentials" if credentials else f"credentials needed: set {USER_ENV}/{PASSWORD_ENV}"
                raise AuthFailed(f"{ref}: {ref.registry} refused access ({hint}): {exc}") from None
            last = str(exc)
    raise PullError(f"could not pull {ref} after {policy.upstream.attempts} attempts; last error: {last}")
