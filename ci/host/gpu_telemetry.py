"""Per-device memory used and PIDs, by *physical* index, from the discovery's source.

ci/host/gpumem.py polls these while waiting for a stopped server's memory to come
back, so a reading must be cheap (NVML: ~1 ms) and a failed reading must raise
TelemetryError, never return 0: a 0 would read as "released" and fail open.
Use a telemetry object as a context manager around a poll loop; it keeps the
library initialised for the loop instead of paying init on every poll.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterable, Mapping, Protocol

from ci.host.gpu import (IMPORT, Discovery, TelemetryError, ToolAbsent, find_tool, nvml_session,
                    optional_module)
from ci.host.gpu_smi import (
    NVIDIA_SMI_APPS_QUERY, NVIDIA_SMI_QUERY, ROCM_SMI_QUERY, SMI_TIMEOUT_S, SmiError,
    parse_amd_smi_memory, parse_nvidia_smi_apps, parse_nvidia_smi_gpus, parse_rocm_smi, run_tool,
)

log = logging.getLogger(__name__)


class Telemetry(Protocol):
    """What gpumem needs: bytes used and PIDs per physical device."""

    source: str

    def used_bytes(self, devices: Iterable[int]) -> dict[int, int]: ...

    def pids(self, devices: Iterable[int]) -> dict[int, tuple[int, ...]]: ...

    def __enter__(self) -> "Telemetry": ...

    def __exit__(self, *exc: object) -> None: ...


class _Base:
    source = "none"

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def _fail(self, what: str, exc: BaseException) -> TelemetryError:
        return TelemetryError(f"{self.source}: cannot read {what}: {type(exc).__name__}: {exc}")


class NvmlTelemetry(_Base):
    """NVML readings. nvmlInit/nvmlShutdown wrap every call; NVML's init is
    refcounted, so ``with telemetry:`` (one outer init) makes the inner ones cheap."""

    source = "nvml"

    def __init__(self, nvml: Any = IMPORT):
        try:
            self._nvml = optional_module("pynvml") if nvml is IMPORT else nvml
            self._sessions: list[contextlib.ExitStack] = []
        except ToolAbsent as exc:
            raise TelemetryError(f"nvml: {exc}") from None
        if self._nvml is None:
            raise TelemetryError("nvml: pynvml not available")

    def __enter__(self):
        session = contextlib.ExitStack()
        try:
            session.enter_context(nvml_session(self._nvml))
        except Exception as exc:
            raise self._fail("init", exc) from exc
        self._sessions.append(session)  # nested `with telemetry:` blocks each hold one
        return self

    def __exit__(self, *exc: object) -> None:
        self._sessions.pop().close()

    def _each(self, devices: Iterable[int], what: str, read) -> dict:
        with self:
            try:
                return {i: read(self._nvml.nvmlDeviceGetHandleByIndex(i)) for i in devices}
            except Exception as exc:
                raise self._fail(what, exc) from exc

    def used_bytes(self, devices: Iterable[int]) -> dict[int, int]:
        """Bytes in use on each physical device, as NVML's memory info reports."""
        return self._each(devices, "memory", lambda h: int(self._nvml.nvmlDeviceGetMemoryInfo(h).used))

    def pids(self, devices: Iterable[int]) -> dict[int, tuple[int, ...]]:
        """PIDs of compute processes on each physical device."""
        return self._each(devices, "processes", lambda h: tuple(sorted(
            int(p.pid) for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(h))))


class NvidiaSmiTelemetry(_Base):
    """nvidia-smi readings (memory in MiB granularity; ~50-100 ms a call)."""

    source = "nvidia-smi"

    def __init__(self, uuids: list[str], env: Mapping[str, str] | None = None,
                 timeout_s: float = SMI_TIMEOUT_S):
        self._uuids, self._env = uuids, dict(os.environ if env is None else env)
        self._timeout_s = timeout_s

    def _run(self, query: list[str], what: str) -> str:
        try:
            return run_tool([find_tool("nvidia-smi", self._env), *query], self._timeout_s, self._env)
        except (SmiError, ToolAbsent) as exc:
            raise self._fail(what, exc) from exc

    def used_bytes(self, devices: Iterable[int]) -> dict[int, int]:
        """Bytes in use on each physical device."""
        text = self._run(NVIDIA_SMI_QUERY, "memory")
        try:
            rows = {r.index: r.memory_used for r in parse_nvidia_smi_gpus(text)}
            return {i: rows[i] for i in devices}
        except (SmiError, KeyError) as exc:
            raise self._fail("memory", exc) from exc

    def pids(self, devices: Iterable[int]) -> dict[int, tuple[int, ...]]:
        """PIDs of compute processes on each physical device."""
        try:
            found = parse_nvidia_smi_apps(self._run(NVIDIA_SMI_APPS_QUERY, "processes"), self._uuids)
        except SmiError as exc:
            raise self._fail("processes", exc) from exc
        return {i: found.get(i, ()) for i in devices}


class AmdsmiTelemetry(_Base):
    """amdsmi (python) readings; amdsmi_init/shut_down around each call."""

    source = "amdsmi"

    def __init__(self, amdsmi: Any = IMPORT):
        try:
            self._amd = optional_module("amdsmi") if amdsmi is IMPORT else amdsmi
        except ToolAbsent as exc:
            raise TelemetryError(f"amdsmi: {exc}") from None

    def _each(self, devices: Iterable[int], what: str, read) -> dict:
        try:
            self._amd.amdsmi_init()
            try:
                handles = self._amd.amdsmi_get_processor_handles()
                return {i: read(handles[i]) for i in devices}
            finally:
                self._amd.amdsmi_shut_down()
        except Exception as exc:
            raise self._fail(what, exc) from exc

    def used_bytes(self, devices: Iterable[int]) -> dict[int, int]:
        """Bytes of VRAM in use on each physical device."""
        vram = self._amd.AmdSmiMemoryType.VRAM
        return self._each(devices, "memory", lambda h: int(self._amd.amdsmi_get_gpu_memory_usage(h, vram)))

    def pids(self, devices: Iterable[int]) -> dict[int, tuple[int, ...]]:
        """PIDs on each device (amdsmi returns dicts with "pid" in ROCm >= 6)."""
        def read(h):
            return tuple(sorted(int(p["pid"] if isinstance(p, dict) else p)
                                for p in self._amd.amdsmi_get_gpu_process_list(h)))
        return self._each(devices, "processes", read)


class AmdCliTelemetry(_Base):
    """``amd-smi`` / ``rocm-smi`` readings; neither lists PIDs reliably, so pids() raises."""

    def __init__(self, tool: str, env: Mapping[str, str] | None = None, timeout_s: float = SMI_TIMEOUT_S):
        self.source, self._env, self._timeout_s = tool, dict(os.environ if env is None else env), timeout_s

    def used_bytes(self, devices: Iterable[int]) -> dict[int, int]:
        """Bytes of VRAM in use on each physical device."""
        try:
            path = find_tool(self.source, self._env)
            if self.source == "amd-smi":
                used = parse_amd_smi_memory(run_tool([path, "metric", "--mem-usage", "--json"],
                                                     self._timeout_s, self._env))
            else:
                used = {r.index: r.memory_used
                        for r in parse_rocm_smi(run_tool([path, *ROCM_SMI_QUERY], self._timeout_s, self._env))}
            return {i: used[i] for i in devices}
        except (SmiError, ToolAbsent, KeyError) as exc:
            raise self._fail("memory", exc) from exc

    def pids(self, devices: Iterable[int]) -> dict[int, tuple[int, ...]]:
        """Not available from these tools; raises so messages say 'PIDs unknown'."""
        raise TelemetryError(f"{self.source}: PIDs per device are not available from this tool")


class NoTelemetry(_Base):
    """For machines with no GPU: any question about a device is an error."""

    def used_bytes(self, devices: Iterable[int]) -> dict[int, int]:
        """{} for no devices; TelemetryError for any device (there are none)."""
        devices = list(devices)
        if devices:
            raise TelemetryError(f"no GPU telemetry on this machine (asked about {devices})")
        return {}

    pids = used_bytes  # same contract: nothing to report, anything asked is an error


def telemetry_for(discovery: Discovery, *, env: Mapping[str, str] | None = None,
                  nvml: Any = IMPORT, amdsmi: Any = IMPORT) -> Telemetry:
    """The telemetry reader matching how ``discovery`` found the GPUs."""
    source = discovery.source
    if source == "nvml":
        return NvmlTelemetry(nvml)
    if source == "nvidia-smi":
        return NvidiaSmiTelemetry(discovery.uuids, env)
    if source == "amdsmi":
        return AmdsmiTelemetry(amdsmi)
    if source in ("amd-smi", "rocm-smi"):
        return AmdCliTelemetry(source, env)
    return NoTelemetry()
