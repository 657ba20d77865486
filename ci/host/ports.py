"""Free TCP ports, reserved host-wide so two jobs on one runner never collide.

A port is reserved by holding an exclusive lock on ``<lock dir>/<port>.lock``
for as long as the server uses it. The lock is the kernel's (flock), so a job
that dies frees its ports automatically. Binding alone is not enough: between
"this port is free" and the engine's own bind, another job on the same host
may pick the same number (seen with random ports in TGI's fixtures).
"""
from __future__ import annotations

import logging
import os
import random
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import filelock
import psutil

log = logging.getLogger(__name__)

# Engines derive ports from the one they are given (sglang's gRPC side channel
# uses port + 10000), and a derived port must still fit in 16 bits
# (sglang #24222: get_open_port returned 60123 and port+10000 overflowed).
PORT_CAP = 55535
# Below this live well-known and registered service ports we must not squat.
PORT_FLOOR = 20000
# How many candidates to try before declaring the range exhausted.
MAX_ATTEMPTS = 500
# After a server stops, its port should be bindable again almost at once; the
# deadline covers engines that close their listener last.
FREE_DEADLINE_S = 10.0
POLL_INTERVAL_S = 0.05
LOCK_DIR_ENV = "KILN_PORT_LOCK_DIR"


class PortError(RuntimeError):
    """No port could be reserved, or a port is held by someone else."""


def lock_dir() -> Path:
    """Where reservations live: shared by every kiln job on this host."""
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "kiln-ports")


def _ephemeral_range() -> tuple[int, int]:
    # Ports the kernel hands out for outgoing connections; a server there can
    # lose its port to a client socket between reservation and bind.
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def candidates(cap: int = PORT_CAP) -> list[int]:
    """Ports worth trying under ``cap``, outside the kernel's ephemeral range when possible."""
    if not PORT_FLOOR < cap <= 65535:
        raise ValueError(f"port cap {cap} must be in ({PORT_FLOOR}, 65535]")
    lo, hi = _ephemeral_range()
    ports = [p for p in range(PORT_FLOOR, cap + 1) if not lo <= p <= hi]
    return ports or list(range(PORT_FLOOR, cap + 1))


def is_bindable(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port`` (and on the wildcard address)."""
    for addr in (host, "0.0.0.0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # SO_REUSEADDR lets us ignore our own closed sockets in TIME_WAIT,
            # exactly as the engine's own bind will.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((addr, port))
            except OSError:
                return False
    return True


def holders(port: int) -> list[psutil.Process]:
    """Processes listening on ``port`` (empty when unknown or none)."""
    found = []
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return found
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            try:
                found.append(psutil.Process(c.pid))
            except psutil.NoSuchProcess:
                pass
    return found


@dataclass
class Reservation:
    """A port held for one server; ``release()`` is idempotent."""

    port: int
    _lock: filelock.BaseFileLock | None

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def reserve(cap: int = PORT_CAP, *, derived_offsets: tuple[int, ...] = (),
            rng: random.Random | None = None) -> Reservation:
    """Reserve a free port ``<= cap`` host-wide; ``port + offset`` must be free too."""
    rng = rng or random.Random()
    pool = candidates(cap)
    directory = lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    for _ in range(MAX_ATTEMPTS):
        port = rng.choice(pool)
        wanted = [port] + [port + off for off in derived_offsets]
        if any(p > 65535 for p in wanted):
            continue
        lock = filelock.FileLock(str(directory / f"{port}.lock"))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            continue  # another job holds it
        if all(is_bindable(p) for p in wanted):
            log.debug("reserved port %d", port)
            return Reservation(port, lock)
        lock.release()
    raise PortError(f"no free port under {cap} after {MAX_ATTEMPTS} tries (lock dir {directory})")


def hold(port: int) -> Reservation:
    """Reserve a specific ``port``; a clear error names whoever holds it."""
    directory = lock_dir()
    directory.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(directory / f"{port}.lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise PortError(f"port {port} is reserved by another kiln job on this host") from None
    if not is_bindable(port):
        lock.release()
        who = ", ".join(f"pid {p.pid} ({' '.join(p.cmdline())[:80]})" for p in holders(port))
        raise PortError(f"port {port} is already in use by {who or 'an unknown process'}")
    return Reservation(port, lock)


def wait_free(port: int, deadline_s: float = FREE_DEADLINE_S) -> None:
    """Block until ``port`` is bindable again; PortError names the holder otherwise."""
    deadline = time.monotonic() + deadline_s
    while not is_bindable(port):
        if time.monotonic() >= deadline:
            who = ", ".join(f"pid {p.pid}" for p in holders(port)) or "unknown"
            raise PortError(f"port {port} still in use {deadline_s:.0f} s after stop (holder: {who})")
        time.sleep(POLL_INTERVAL_S)
