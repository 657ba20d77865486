"""A stand-in for the pynvml module, passed to ci.host.gpu / ci.host.gpu_telemetry as ``nvml=``.

It keeps NVML's contract that matters to kiln: every query needs nvmlInit
first (init is refcounted), errors are NVMLError with a ``value`` code, and
indices are physical (CUDA_VISIBLE_DEVICES is ignored, as by the real NVML).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15  # the GPU fell off the bus (an Xid 79): every query fails
NVML_ERROR_UNKNOWN = 999
_TEXT = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """Mirrors pynvml.NVMLError: ``value`` is the NVML return code."""

    def __init__(self, value: int):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _TEXT.get(self.value, f"NVML error {self.value}")


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    total: int = 80 * 1024 ** 3
    used: int = 512 * 1024 ** 2
    pids: tuple[int, ...] = ()


@dataclass
class FakeNvml:
    """Module-like object. ``used_fn(index, poll)`` overrides memory readings per call."""

    gpus: list[FakeGpu] = field(default_factory=list)
    init_error: int | None = None
    query_error: int | None = None
    used_fn: Callable[[int, int], int] | None = None
    inits: int = 0
    depth: int = 0
    memory_reads: int = 0

    NVMLError = NVMLError
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_ERROR_DRIVER_NOT_LOADED = NVML_ERROR_DRIVER_NOT_LOADED

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.inits += 1
        self.depth += 1

    def nvmlShutdown(self) -> None:
        if self.depth <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        self.depth -= 1

    def _check(self) -> None:
        if self.depth <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        if self.query_error is not None:
            raise NVMLError(self.query_error)

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.gpus)

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check()
        return "580.159.04"

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._check()
        if not 0 <= index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        self._check()
        return self.gpus[handle].uuid

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        self._check()
        return self.gpus[handle].name.encode()  # older pynvml returned bytes

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        self._check()
        gpu = self.gpus[handle]
        used = self.used_fn(handle, self.memory_reads) if self.used_fn else gpu.used
        self.memory_reads += 1
        return SimpleNamespace(total=gpu.total, used=used, free=gpu.total - used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        self._check()
        return [SimpleNamespace(pid=p, usedGpuMemory=None) for p in self.gpus[handle].pids]


def two_gpus(**kwargs) -> FakeNvml:
    """A FakeNvml with two H100s whose UUIDs share no prefix beyond 'GPU-'."""
    return FakeNvml(gpus=[FakeGpu("GPU-3d93aaaa-0000-0000-0000-000000000000"),
                          FakeGpu("GPU-7c11bbbb-0000-0000-0000-000000000001")], **kwargs)
