"""Waiting for a stopped server's GPU memory to come back, and refusing to reuse a GPU that did not.

The flow the pool follows: ``take_baselines`` before launch (per *physical*
device), stop the process tree, then ``ReleaseLedger.wait_released`` until every
device is back at or below its baseline + HEADROOM_BYTES. A failure - memory
still held at the deadline, or telemetry that cannot be read - is recorded in
the ledger and is sticky: ``check_launchable`` refuses the next launch on that
device, naming it, the bytes still held and the PIDs holding them.

What this fixes from the anchors: vLLM's harness summed every GPU on the host
and treated a 0.0/None baseline as "no baseline" (wrong waiter); sglang slept
2 s and hoped. Here a baseline is an int per device (0 is a real value),
``lowest`` merges baselines of servers stopped together per device, telemetry
errors fail closed, and the poll interval is POLL_INTERVAL_S.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import filelock

from ci.host.gpu import TelemetryError
from ci.host.gpu_telemetry import Telemetry

log = logging.getLogger(__name__)

GIB = 1024 ** 3
# NVML reports freed memory the moment the process is reaped (< 5 ms on the
# H200, MISSION.md); 20 ms polls keep detection well inside the 100 ms goal
# while costing ~1 ms of NVML time each. The issue caps it at 50 ms.
POLL_INTERVAL_S = 0.02
# Once the process tree is dead, memory comes back in milliseconds; still,
# unmapping ~140 GiB of a big model takes the driver a few seconds. A minute
# separates "slow teardown" from "something else holds it" without the
# 2-minute waits per test group that vLLM #41166 removed.
RELEASE_TIMEOUT_S = 60.0
# Slack over the pre-launch baseline: driver bookkeeping on a device moves by
# a few MiB when other contexts come and go. It is well below one CUDA context
# (~600 MiB measured on an H200, docs/gpu-verification.md), so even a leaked
# process that holds nothing but a context still fails the check.
HEADROOM_BYTES = 256 * 1024 ** 2
# Another kiln process on the runner holds the ledger lock only for a
# read-modify-write of a small JSON file; 10 s means that process is stuck.
LEDGER_LOCK_TIMEOUT_S = 10.0
LEDGER_FILE = "gpu-release-ledger.json"
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"
# The ledger is per runner, not per checkout: two jobs in two workspaces share
# the GPUs, so the default lives in the system temp dir (like ci.host.ports' locks).
STATE_DIR_ENV = "KILN_STATE_DIR"


def ledger_dir() -> Path:
    """Where the runner-wide ReleaseLedger lives: $KILN_STATE_DIR or <tmp>/kiln-state."""
    return Path(os.environ.get(STATE_DIR_ENV) or Path(tempfile.gettempdir()) / "kiln-state")


@dataclass(frozen=True)
class Held:
    """A device whose memory did not come back. ``used``/``pids`` are None when unknown."""

    device: int
    baseline: int
    used: int | None
    pids: tuple[int, ...] | None
    cause: str
    owner: str = ""
    at: float = 0.0  # wall-clock time of the failure

    @property
    def held_bytes(self) -> int | None:
        return None if self.used is None else max(0, self.used - self.baseline)

    def describe(self) -> str:
        """One line naming the device, the bytes still held and the PIDs holding them."""
        held = ("an unknown amount of memory" if self.held_bytes is None else
                f"{self.held_bytes / GIB:.2f} GiB ({self.held_bytes} bytes) above its "
                f"{self.baseline / GIB:.2f} GiB baseline")
        pids = ("PIDs unknown" if self.pids is None else
                f"held by PIDs {', '.join(map(str, self.pids))}" if self.pids else "no PIDs listed")
        who = f" after stopping {self.owner}" if self.owner else ""
        return f"GPU {self.device} not released{who}: {held}, {pids} ({self.cause})"


class ReleaseError(RuntimeError):
    """wait_released gave up; ``held`` says which devices and why."""

    def __init__(self, held: Iterable[Held]):
        self.held = tuple(held)
        super().__init__("; ".join(h.describe() for h in self.held))


class DeviceHeld(RuntimeError):
    """check_launchable refused: a device has a sticky release failure."""

    def __init__(self, held: Iterable[Held]):
        self.held = tuple(held)
        super().__init__("refusing to launch: " + "; ".join(h.describe() for h in self.held)
                         + "; once the holders are gone, clear it with `invoke gpus --clear-held`")


@dataclass(frozen=True)
class Released:
    """A successful wait: how long it took, how many polls, last reading per device."""

    elapsed_s: float
    polls: int
    used: Mapping[int, int]


def take_baselines(telemetry: Telemetry, devices: Iterable[int]) -> dict[int, int]:
    """Bytes in use on each physical device now, before a launch. Raises TelemetryError."""
    devices = sorted(set(devices))
    return dict(telemetry.used_bytes(devices)) if devices else {}


def lowest(*baselines: Mapping[int, int]) -> dict[int, int]:
    """Per device, the lowest of several servers' baselines (for stop_many's single wait)."""
    out: dict[int, int] = {}
    for b in baselines:
        for device, value in b.items():
            out[device] = min(value, out.get(device, value))
    return out


def _pids_or_none(telemetry: Telemetry, devices: list[int]) -> dict[int, tuple[int, ...]] | None:
    try:
        return telemetry.pids(devices)
    except TelemetryError as exc:
        log.warning("cannot list PIDs on GPUs %s: %s", devices, exc)
        return None


def wait_released(telemetry: Telemetry, baselines: Mapping[int, int], *,
                  timeout_s: float = RELEASE_TIMEOUT_S, headroom: int = HEADROOM_BYTES,
                  poll_s: float = POLL_INTERVAL_S, owner: str = "",
                  cancel: threading.Event | None = None,
                  clock: Callable[[], float] = time.monotonic) -> Released:
    """Poll until every device is at or below baseline + headroom; raise ReleaseError otherwise.

    Fails closed: a telemetry error ends the wait at once as a failure (a
    reading we could not take is not a release). ``cancel`` cuts the wait short
    (also a failure). Polls every ``poll_s`` (<= 50 ms by house rule).
    """
    for device, base in baselines.items():
        if not isinstance(base, int) or isinstance(base, bool) or base < 0:
            raise ValueError(f"baseline for GPU {device} must be a byte count >= 0, got {base!r}")
    if poll_s > 0.05:
        raise ValueError(f"poll interval {poll_s}s exceeds 50 ms; release detection would lag")
    devices = sorted(baselines)
    start = clock()
    if not devices:
        return Released(0.0, 0, {})
    waiter = cancel or threading.Event()
    deadline, polls = start + timeout_s, 0
    try:
        with telemetry:
            while True:
                used = telemetry.used_bytes(devices)
                missing = set(devices) - set(used)
                if missing:
                    raise TelemetryError(f"no reading for GPUs {sorted(missing)}")
                polls += 1
                pending = [d for d in devices if used[d] > baselines[d] + headroom]
                if not pending:
                    elapsed = clock() - start
                    log.debug("GPUs %s released after %.3fs (%d polls)", devices, elapsed, polls)
                    return Released(elapsed, polls, dict(used))
                remaining = deadline - clock()
                if remaining <= 0 or waiter.wait(min(poll_s, remaining)):
                    break
            pids = _pids_or_none(telemetry, pending)
    except TelemetryError as exc:
        raise ReleaseError(Held(d, baselines[d], None, None, f"telemetry failed: {exc}", owner, time.time())
                           for d in devices) from exc
    cause = "cancelled" if waiter.is_set() else f"still held after {timeout_s:g}s"
    raise ReleaseError(Held(d, baselines[d], used[d], None if pids is None else pids.get(d, ()),
                            cause, owner, time.time()) for d in pending)


def _boot_id() -> str:
    try:
        return Path(BOOT_ID_FILE).read_text().strip()
    except OSError:
        return ""


class ReleaseLedger:
    """Sticky release failures, per physical device; the pool owns one.

    With ``state_dir`` the ledger also lives in a JSON file there, under a file
    lock, so a later kiln process on the same runner refuses the device too.
    Entries recorded under another boot are dropped on load: a reboot frees all
    GPU memory.
    """

    def __init__(self, state_dir: str | os.PathLike | None = None, *, boot_id: str | None = None):
        self._path = Path(state_dir, LEDGER_FILE) if state_dir is not None else None
        self._boot_id = _boot_id() if boot_id is None else boot_id
        self._lock = threading.Lock()
        self._held: dict[int, Held] = {}
        if self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)

    def _update(self, change: Callable[[dict[int, Held]], None] | None = None) -> dict[int, Held]:
        """Read the file (if any), apply ``change``, write back; returns a copy."""
        with self._lock:
            if self._path is None:
                if change:
                    change(self._held)
                return dict(self._held)
            with filelock.FileLock(str(self._path) + ".lock", timeout=LEDGER_LOCK_TIMEOUT_S):
                self._held = self._load()
                if change:
                    change(self._held)
                    tmp = self._path.with_suffix(".tmp")
                    tmp.write_text(json.dumps({"boot_id": self._boot_id,
                                               "held": [asdict(h) for h in self._held.values()]}, indent=1))
                    os.replace(tmp, self._path)
                return dict(self._held)

    def _load(self) -> dict[int, Held]:
        try:
            data = json.loads(self._path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            # Fail closed would block every GPU forever on a corrupt file; the
            # file is ours, so say so loudly and start clean.
            log.error("GPU release ledger %s unreadable (%s); ignoring it", self._path, exc)
            return {}
        if data.get("boot_id") != self._boot_id:
            log.info("GPU release ledger %s is from another boot; dropping it", self._path)
            return {}
        return {h["device"]: Held(**{**h, "pids": None if h["pids"] is None else tuple(h["pids"])})
                for h in data.get("held", [])}

    def record(self, held: Iterable[Held]) -> None:
        """Mark devices as not released (sticky until ``clear``)."""
        held = list(held)
        for h in held:
            log.error("%s", h.describe())
        self._update(lambda d: d.update({h.device: h for h in held}))

    def held(self) -> dict[int, Held]:
        """Current sticky failures, by physical device."""
        return self._update()

    def wait_released(self, telemetry: Telemetry, baselines: Mapping[int, int], **kwargs) -> Released:
        """``wait_released`` that records a failure here before re-raising it."""
        try:
            return wait_released(telemetry, baselines, **kwargs)
        except ReleaseError as exc:
            self.record(exc.held)
            raise

    def check_launchable(self, devices: Iterable[int], telemetry: Telemetry | None = None) -> None:
        """Raise DeviceHeld if any of ``devices`` has a sticky release failure.

        With ``telemetry`` the message carries a fresh reading of the bytes and
        PIDs still there (the recorded ones if that reading fails).
        """
        bad = [h for d, h in sorted(self.held().items()) if d in set(devices)]
        if not bad:
            return
        if telemetry is not None:
            bad = [self._refresh(h, telemetry) for h in bad]
        raise DeviceHeld(bad)

    @staticmethod
    def _refresh(h: Held, telemetry: Telemetry) -> Held:
        try:
            with telemetry:
                used = telemetry.used_bytes([h.device])[h.device]
                pids = _pids_or_none(telemetry, [h.device])
        except (TelemetryError, KeyError):
            return h
        return Held(h.device, h.baseline, used, h.pids if pids is None else pids.get(h.device, ()),
                    h.cause, h.owner, h.at)

    def clear(self, devices: Iterable[int] | None = None, *, telemetry: Telemetry | None = None,
              headroom: int = HEADROOM_BYTES) -> list[int]:
        """Forget failures on ``devices`` (all if None); returns the devices cleared.

        With ``telemetry``, only devices now back at or below baseline + headroom
        are cleared, so an operator can clear "whatever has recovered" safely.
        """
        held = self.held()
        wanted = sorted(held if devices is None else set(devices) & set(held))
        if telemetry is not None and wanted:
            with telemetry:
                used = telemetry.used_bytes(wanted)
            wanted = [d for d in wanted if used[d] <= held[d].baseline + headroom]

        def drop(d: dict[int, Held]) -> None:
            for device in wanted:
                d.pop(device, None)
        self._update(drop)
        return wanted


class DeviceMemoryGuard:
    """ci.engine.server's MemoryGuard: refuse held devices, baseline before launch, wait after stop.

    One guard serves every server of a pool. Baselines are kept per physical
    device with a count of launches not yet waited for; when two launches share
    a device (stop_many on a one-GPU machine) the lowest baseline is kept, and
    every wait on that device is judged against it until the last one is done.
    The pool gives concurrent servers disjoint devices, so normally the count
    is one.
    """

    def __init__(self, telemetry: Telemetry, ledger: ReleaseLedger, *,
                 timeout_s: float = RELEASE_TIMEOUT_S, headroom: int = HEADROOM_BYTES,
                 poll_s: float = POLL_INTERVAL_S):
        self.telemetry, self.ledger = telemetry, ledger
        self._wait_args = {"timeout_s": timeout_s, "headroom": headroom, "poll_s": poll_s}
        self._lock = threading.Lock()
        self._baselines: dict[int, int] = {}
        self._launches: dict[int, int] = {}

    def before_launch(self, devices: Iterable[int]) -> None:
        """Raise DeviceHeld for a sticky failure; record baselines (TelemetryError stops the launch)."""
        devices = sorted(set(devices))
        self.ledger.check_launchable(devices, self.telemetry)
        base = take_baselines(self.telemetry, devices)
        with self._lock:
            self._baselines = lowest(self._baselines, base)
            for d in devices:
                self._launches[d] = self._launches.get(d, 0) + 1

    def wait_released(self, devices: Iterable[int], owner: str = "") -> Released:
        """Wait for ``devices`` to return to their baselines; a failure becomes sticky."""
        devices = sorted(set(devices))
        with self._lock:
            missing = [d for d in devices if d not in self._baselines]
            base = {d: self._baselines[d] for d in devices if d in self._baselines}
            for d in base:
                self._launches[d] -= 1
                if self._launches[d] == 0:
                    del self._launches[d], self._baselines[d]
        if missing:
            # No baseline means no honest way to judge the release: fail closed.
            held = [Held(d, 0, None, None, "no baseline was taken before launch", owner, time.time())
                    for d in missing]
            self.ledger.record(held)
            raise ReleaseError(held)
        return self.ledger.wait_released(self.telemetry, base, owner=owner, **self._wait_args)
