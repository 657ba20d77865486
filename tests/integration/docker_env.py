"""A real Docker engine and real registries on 127.0.0.1, for integration tests and benches.

Starts a private ``dockerd`` (Debian docker.io: vfs storage, no iptables, no
bridge, its own socket/data/exec dirs and an empty daemon.json, so it neither
needs nor disturbs a system daemon), Debian ``docker-registry`` instances each
with its own config, and fault-injecting fronts written here (refused port,
black hole, 500-then-forward proxy). Everything started here is stopped here:
SIGTERM to the pid we started, SIGKILL after a deadline, temp dirs removed.
"""
from __future__ import annotations

import contextlib
import http.client
import http.server
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import docker
import psutil
import requests

log = logging.getLogger(__name__)

DOCKERD = "dockerd"
REGISTRY = "docker-registry"
# dockerd + its managed containerd answer in ~0.3 s on the 2-core CI box;
# 30 s absorbs a loaded machine without hanging the session on a broken install.
DOCKERD_READY_TIMEOUT_S = 30.0
# docker-registry answers /v2/ in ~0.1 s; same reasoning as above.
REGISTRY_READY_TIMEOUT_S = 15.0
# dockerd stops its containers and containerd on SIGTERM in < 1 s when idle;
# past this it is wedged and gets SIGKILL so the session cannot hang at exit.
STOP_GRACE_S = 15.0
# After SIGKILL only reaping is left; longer means something is badly wrong.
KILL_DEADLINE_S = 5.0
# Bounded poll interval for readiness/exit checks: fast start-up, no busy spin.
POLL_INTERVAL_S = 0.05
# Deadline for each Docker API call made by the fixtures (push, import, remove).
CLIENT_TIMEOUT_S = 60.0
# A registry start can lose the free port we picked to another process between
# our probe and its bind; a couple of fresh ports make that race irrelevant.
REGISTRY_START_TRIES = 3
# bcrypt cost for test htpasswd files: the registry checks the hash on every
# request, and cost 4 (the minimum) keeps that microseconds; never use in prod.
TEST_BCRYPT_ROUNDS = 4
# Host binaries copied (with their shared libraries) into the runnable image.
RUNNABLE_BINARIES = ("/bin/sh", "/bin/sleep", "/bin/cat")
# Bounded wait for a fake server's accept loop to notice close().
SERVER_JOIN_S = 5.0


def engine_unavailable_reason() -> str | None:
    """Why the real engine cannot be started here, or None when it can."""
    if os.geteuid() != 0:
        return "dockerd needs root: run the tests as root (.ci/as-root nox -s tests, as the workflows do)"
    missing = [b for b in (DOCKERD, REGISTRY, "containerd", "runc") if shutil.which(b) is None]
    if missing:
        return f"missing {', '.join(missing)}: apt-get install -y docker.io docker-registry"
    return None


def free_port() -> int:
    """A currently free 127.0.0.1 port (test-only; the caller handles the bind race)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _terminate(proc: subprocess.Popen, name: str) -> None:
    """SIGTERM our child, SIGKILL after STOP_GRACE_S; then any descendant it left behind."""
    if proc.poll() is not None:
        return
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        kids = []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing", name, proc.pid, STOP_GRACE_S)
        proc.kill()
        proc.wait(timeout=KILL_DEADLINE_S)
    # Descendants we saw (containerd under dockerd) must not outlive it. psutil
    # checks create-time, so a recycled pid is never signalled.
    for kid in kids:
        with contextlib.suppress(psutil.Error):
            if kid.is_running() and kid.status() != psutil.STATUS_ZOMBIE:
                log.warning("%s left %s (pid %d) running; killing it", name, kid.name(), kid.pid)
                kid.kill()
                kid.wait(timeout=KILL_DEADLINE_S)


def _wait_until(check, deadline_s: float, what: str, proc: subprocess.Popen, log_path: Path) -> None:
    """Poll ``check()`` until true; fail fast if ``proc`` died, with its log tail."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {tail(log_path)}")
        if check():
            return
        time.sleep(POLL_INTERVAL_S)
    raise RuntimeError(f"{what} not ready after {deadline_s:.0f} s: {tail(log_path)}")


def tail(path: Path, lines: int = 15) -> str:
    """Last ``lines`` lines of a log file (empty when there is none)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class DockerDaemon:
    """A private dockerd under ``root``; ``base_url`` is its unix socket."""

    def __init__(self, root: Path):
        self.root = root
        self.sock = root / "docker.sock"
        self.base_url = f"unix://{self.sock}"
        self.log_path = root / "dockerd.log"
        self._proc: subprocess.Popen | None = None

    def start(self) -> "DockerDaemon":
        """Start dockerd and wait until its API answers."""
        (self.root / "daemon.json").write_text("{}\n")
        argv = [
            DOCKERD,
            # vfs works on any filesystem (overlay-on-overlay fails in CI sandboxes).
            "--storage-driver=vfs",
            # No iptables/bridge: the test needs no container networking and
            # must not touch the host's firewall or interfaces.
            "--iptables=false", "--ip6tables=false", "--bridge=none",
            # Own config, socket, data, exec and pid: independent of any system dockerd.
            f"--config-file={self.root / 'daemon.json'}",
            f"--host={self.base_url}",
            f"--data-root={self.root / 'data'}",
            f"--exec-root={self.root / 'exec'}",
            f"--pidfile={self.root / 'docker.pid'}",
        ]
        with open(self.log_path, "wb") as out:
            self._proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        _wait_until(self._answers, DOCKERD_READY_TIMEOUT_S, "dockerd", self._proc, self.log_path)
        return self

    def _answers(self) -> bool:
        if not self.sock.exists():
            return False
        try:
            client = docker.DockerClient(base_url=self.base_url, timeout=2)
        except docker.errors.DockerException:
            return False
        with contextlib.closing(client):
            try:
                return client.ping()
            except Exception:
                return False

    def client(self, timeout: float = CLIENT_TIMEOUT_S) -> docker.DockerClient:
        """A new SDK client for this daemon (caller closes it)."""
        return docker.DockerClient(base_url=self.base_url, timeout=timeout)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stop(self) -> None:
        """Remove every container, then stop dockerd (and containerd with it)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            with contextlib.suppress(Exception), contextlib.closing(self.client()) as client:
                for c in client.containers.list(all=True):
                    c.remove(force=True)
        _terminate(self._proc, "dockerd")
        self._proc = None
        _unmount_under(self.root)


def _unmount_under(root: Path) -> None:
    """Lazily unmount anything dockerd left mounted under ``root`` so rmtree can work."""
    prefix = str(root)
    try:
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    except OSError:
        return
    for target in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
        log.warning("dockerd left %s mounted; unmounting", target)
        subprocess.run(["umount", "-l", target], check=False, timeout=KILL_DEADLINE_S)


class Registry:
    """A Debian docker-registry on 127.0.0.1 with its own config and storage.

    With ``credentials`` it requires htpasswd (bcrypt) basic auth.
    """

    def __init__(self, root: Path, name: str, credentials: tuple[str, str] | None = None):
        self.root = root / name
        self.name = name
        self.credentials = credentials
        self.log_path = self.root / "registry.log"
        self.port = 0
        self._proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _config(self) -> Path:
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.root / 'storage'}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: {self.address}",
        ]
        if self.credentials:
            import bcrypt  # only the auth registry needs it (requirements: bcrypt)

            user, password = self.credentials
            hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=TEST_BCRYPT_ROUNDS))
            htpasswd = self.root / "htpasswd"
            htpasswd.write_text(f"{user}:{hashed.decode()}\n")
            htpasswd.chmod(0o600)
            lines += ["auth:", "  htpasswd:", "    realm: kiln-test", f"    path: {htpasswd}"]
        path = self.root / "config.yml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self) -> "Registry":
        """Start the registry on a free port and wait until /v2/ answers."""
        self.root.mkdir(parents=True, exist_ok=True)
        last: Exception | None = None
        for _ in range(REGISTRY_START_TRIES):
            self.port = free_port()
            config = self._config()
            with open(self.log_path, "wb") as out:
                self._proc = subprocess.Popen([REGISTRY, "serve", str(config)], stdout=out,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              start_new_session=True)
            try:
                _wait_until(self._answers, REGISTRY_READY_TIMEOUT_S, f"registry {self.name}",
                            self._proc, self.log_path)
                return self
            except RuntimeError as exc:
                last = exc
                _terminate(self._proc, f"registry {self.name}")
        raise RuntimeError(f"registry {self.name} did not start: {last}")

    def _answers(self) -> bool:
        try:
            r = requests.get(f"http://{self.address}/v2/", timeout=1)
        except requests.RequestException:
            return False
        return r.status_code in (200, 401)

    def stop(self) -> None:
        """Stop the registry process we started."""
        if self._proc is not None:
            _terminate(self._proc, f"registry {self.name}")
            self._proc = None


class RefusedPort:
    """A 127.0.0.1 port that refuses connections: bound (so nobody else takes it), never listening."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"

    def close(self) -> None:
        self._sock.close()


class BlackHole:
    """Accepts TCP connections and never answers (a hung registry host)."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._held: list[socket.socket] = []
        self._closed = threading.Event()
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, name="blackhole", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.accepted += 1
            self._held.append(conn)

    def close(self) -> None:
        self._closed.set()
        # shutdown wakes the blocked accept(); close alone does not on Linux.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(SERVER_JOIN_S)
        for conn in self._held:
            conn.close()


class FlakyProxy:
    """An HTTP front that answers 500 to its first ``failures`` requests, then forwards.

    Forwards to ``upstream`` (host:port of a real registry), so after the
    failures a docker pull through it is a real registry pull. ``delay_s``
    slows every answer (to keep a login/pull in flight while a test watches).
    ``stall_after_v2`` answers ``/v2/`` and then never answers anything else
    (a mirror that passes a liveness probe but hangs on manifests).
    """

    def __init__(self, upstream: str, failures: int = 2, delay_s: float = 0.0, stall_after_v2: bool = False):
        self.upstream = upstream
        self.failures = failures
        self.delay_s = delay_s
        self.stall_after_v2 = stall_after_v2
        self._closed = threading.Event()
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.auth_headers: list[str] = []  # paths of requests that carried credentials
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # keep pytest output clean
                log.debug("flaky proxy: " + fmt, *args)

            def _handle(self):
                with proxy._lock:
                    fail = len(proxy.requests) < proxy.failures
                    proxy.requests.append((self.command, self.path, 500 if fail else 0))
                    if self.headers.get("Authorization"):
                        proxy.auth_headers.append(self.path)
                if proxy.delay_s:
                    proxy._closed.wait(proxy.delay_s)
                if proxy.stall_after_v2 and self.path != "/v2/":
                    proxy._closed.wait()  # hang until the test closes the front
                    return
                if fail:
                    body = b'{"errors":[{"code":"UNAVAILABLE","message":"injected 500"}]}'
                    self.send_response(500)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(proxy.upstream, timeout=CLIENT_TIMEOUT_S)
                try:
                    # Headers are forwarded one by one: docker sends several Accept
                    # headers, and keeping only one changes the manifest served.
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in self.headers.items():
                        if k.lower() not in ("connection", "keep-alive", "transfer-encoding"):
                            conn.putheader(k, v)
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.address = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": POLL_INTERVAL_S},
                                        name="flaky-proxy", daemon=True)
        self._thread.start()

    @property
    def failed(self) -> int:
        return sum(1 for r in self.requests if r[2] == 500)

    def close(self) -> None:
        self._closed.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(SERVER_JOIN_S)


def build_rootfs_tar(dest: Path, binaries: tuple[str, ...] = RUNNABLE_BINARIES) -> Path:
    """A rootfs tar holding host ``binaries`` and the shared libraries ``ldd`` lists.

    Avoids needing busybox or an image from the internet: the host's own
    dynamically linked /bin/sh, /bin/sleep run inside the container.
    """
    import tarfile

    files: set[str] = set()
    for binary in binaries:
        files.add(binary)
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True,
                             timeout=CLIENT_TIMEOUT_S).stdout
        for word in out.split():
            if word.startswith("/"):
                files.add(word)
    with tarfile.open(dest, "w") as tar:
        for f in sorted(files):
            tar.add(os.path.realpath(f), arcname=f.lstrip("/"))
    return dest


def build_marker_tar(dest: Path, text: str) -> Path:
    """A one-file rootfs tar: a tiny, distinct image for pull tests."""
    import io
    import tarfile

    data = text.encode()
    with tarfile.open(dest, "w") as tar:
        info = tarfile.TarInfo("kiln-marker")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return dest


def import_image(client: docker.DockerClient, tar_path: Path, repository: str, tag: str) -> str:
    """``docker import`` a rootfs tar as repository:tag; returns the image id."""
    client.api.import_image_from_file(str(tar_path), repository=repository, tag=tag)
    return client.images.get(f"{repository}:{tag}").id


def push(client: docker.DockerClient, repository: str, tag: str, auth: dict | None = None) -> str:
    """Push repository:tag; returns the manifest digest the registry reported."""
    digest = None
    for msg in client.api.push(repository, tag=tag, stream=True, decode=True, auth_config=auth):
        if "error" in msg:
            raise RuntimeError(f"push {repository}:{tag} failed: {msg['error']}")
        digest = (msg.get("aux") or {}).get("Digest") or digest
    if not digest:
        raise RuntimeError(f"push {repository}:{tag} reported no digest")
    return digest


@dataclass
class DockerEnv:
    """The running engine, registries and the refs of the images pushed to them."""

    root: Path
    daemon: DockerDaemon
    upstream: Registry
    mirror: Registry
    empty_mirror: Registry
    auth_upstream: Registry
    user: str
    password: str
    repo: str = "kiln/test"
    tag: str = "1"
    digest: str = ""
    run_image: str = ""

    def ref(self, registry: Registry, tag: str | None = None) -> str:
        """The test image's reference on ``registry``."""
        return f"{registry.address}/{self.repo}:{tag or self.tag}"

    @property
    def canonical(self) -> str:
        return self.ref(self.upstream)


@contextlib.contextmanager
def docker_env(base: str | None = None) -> Iterator[DockerEnv]:
    """Start dockerd + four registries, push the test images, and tear it all down.

    Registries: ``upstream`` (the image's home), ``mirror`` (holds the same
    image), ``empty_mirror`` (lacks the tag), ``auth_upstream`` (htpasswd).
    The pushed images are removed from the daemon so every test really pulls.
    """
    reason = engine_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    # Short base path: unix socket paths are limited to 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="kiln-dk-", dir=base or "/tmp"))
    user, password = "kiln", "pw-" + secrets.token_hex(12)
    daemon = DockerDaemon(root)
    regs = [Registry(root, n, (user, password) if n == "auth" else None)
            for n in ("upstream", "mirror", "empty", "auth")]
    try:
        daemon.start()
        for r in regs:
            r.start()
        env = DockerEnv(root, daemon, *regs, user=user, password=password)
        with contextlib.closing(daemon.client()) as client:
            tar = build_marker_tar(root / "marker.tar", f"kiln test image {secrets.token_hex(4)}\n")
            import_image(client, tar, f"{env.upstream.address}/{env.repo}", env.tag)
            env.digest = push(client, f"{env.upstream.address}/{env.repo}", env.tag)
            for reg, auth in ((env.mirror, None), (env.auth_upstream, {"username": user, "password": password})):
                client.images.get(env.canonical).tag(f"{reg.address}/{env.repo}", env.tag)
                push(client, f"{reg.address}/{env.repo}", env.tag, auth)
            for reg in (env.upstream, env.mirror, env.auth_upstream):
                client.images.remove(env.ref(reg), force=True)
            run_tar = build_rootfs_tar(root / "run.tar")
            env.run_image = import_image(client, run_tar, "kiln/run", "1")
        yield env
    finally:
        daemon.stop()
        for r in regs:
            r.stop()
        shutil.rmtree(root, ignore_errors=True)
        if root.exists():
            log.warning("could not remove %s", root)
