"""Which GPUs this machine has, which of them a process may use, and how full they are.

Never initialises CUDA (no torch import): a forked pytest worker must still be
able to use its GPUs after the parent asked these questions. NVML (pynvml)
comes first, ``nvidia-smi`` second; on AMD the amdsmi module, then ``amd-smi``,
then ``rocm-smi``. A tool that exists but hangs or errors is an error
(GpuDiscoveryError), never "0 GPUs"; only a machine with no tool and no driver
has 0 GPUs, with source "none".

Indices here are always *physical*: NVML's index, which is PCI bus order. NVML
ignores CUDA_VISIBLE_DEVICES, so the logical -> physical mapping is kiln's job
(vLLM's harness indexed NVML by logical index and read the wrong GPU).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from ci.host.gpu_smi import (
    NVIDIA_SMI_QUERY, ROCM_SMI_QUERY, SMI_TIMEOUT_S, SmiError, SmiRow, parse_amd_smi,
    parse_nvidia_smi_gpus, parse_rocm_smi, run_tool,
)

log = logging.getLogger(__name__)

# Every variable that narrows what a GPU process sees; the pool drops inherited
# values of all of them before giving a server its own devices.
VISIBILITY_VARS = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")
# Sentinel: "import the real module" (tests pass a fake module or None instead).
IMPORT = object()
# NVML error codes that mean "no NVIDIA stack here", not "NVIDIA stack broken".
_NVML_ABSENT = ("NVML_ERROR_LIBRARY_NOT_FOUND", "NVML_ERROR_DRIVER_NOT_LOADED")
# strtol-like: CUDA reads the leading integer of an entry ("0x0" -> 0, "+0" -> 0).
_LEADING_INT = re.compile(r"\s*([+-]?\d+)")


class GpuDiscoveryError(RuntimeError):
    """A GPU tool exists but hung, failed or printed garbage, or the env is invalid."""


class TelemetryError(RuntimeError):
    """Memory or PID telemetry could not be read; callers must fail closed."""


@dataclass(frozen=True)
class Device:
    """One physical GPU. ``memory_total`` in bytes; ``index`` is NVML/PCI order."""

    index: int
    uuid: str
    name: str
    memory_total: int


@dataclass(frozen=True)
class Discovery:
    """What discovery found and how: ``visible`` lists physical indices in the
    order the runtime will number them after the *_VISIBLE_DEVICES variables."""

    vendor: str  # "nvidia" | "amd" | "none"
    source: str  # "nvml" | "nvidia-smi" | "amdsmi" | "amd-smi" | "rocm-smi" | "none"
    devices: tuple[Device, ...]
    visible: tuple[int, ...]
    env: Mapping[str, str] = field(default_factory=dict)  # the visibility variables that were set
    driver: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def uuids(self) -> list[str]:
        return [d.uuid for d in self.devices]


def visible_indices(spec: str | None, uuids: Sequence[str], *,
                    mig: Mapping[str, int] | None = None) -> list[int]:
    """Physical indices a CUDA process sees for CUDA_VISIBLE_DEVICES=``spec``, in its numbering order.

    ``uuids`` are the physical devices' UUIDs in index order (its length is the
    device count); ``mig`` optionally maps MIG instance UUIDs to their parent
    GPU's index. A device counts as visible only when torch counts it *and*
    CUDA can allocate on it (they differ on "GPU-" and on upper-case UUIDs;
    docs/gpu-verification.md has the H200 table). Rules:

    - unset -> all; empty -> none.
    - The first entry fixes the list's kind: ``GPU-``/``MIG-`` UUID prefixes
      when the value starts with one, else integers (strtol-like: "00", "+0",
      "0x0" read as 0; surrounding spaces tolerated).
    - The first entry that is invalid, negative, out of range, an ambiguous or
      empty UUID prefix, or of the other kind ends the list ("0,-1,1" -> [0]).
    - A device listed twice raises ValueError (CUDA then fails to start).

    The same rules serve HIP_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES.
    """
    if spec is None:
        return list(range(len(uuids)))
    kind = next((k for k in ("GPU-", "MIG-") if spec.startswith(k)), None)
    if kind == "GPU-":
        pool = {u: i for i, u in enumerate(uuids)}
    elif kind == "MIG-":
        pool = dict(mig or {})
    out: list[int] = []
    seen: dict[object, str] = {}
    for entry in spec.split(","):
        if kind is None:
            m = _LEADING_INT.match(entry)
            if not m or not 0 <= int(m.group(1)) < len(uuids):
                break
            key = index = int(m.group(1))
        else:
            # No stripping here: torch matches UUID entries verbatim, so " GPU-x" ends the list.
            hits = [u for u in pool if u.startswith(entry)] if entry.startswith(kind) and entry != kind else []
            if len(hits) != 1:
                break
            key, index = hits[0], pool[hits[0]]
        if key in seen:
            raise ValueError(f"visible-devices value {spec!r} names one device twice "
                             f"({seen[key]!r} and {entry!r}); CUDA refuses to start with it")
        seen[key] = entry
        if index not in out:  # two MIG instances of one GPU are one physical device
            out.append(index)
    return out


def visible_for(vendor: str, env: Mapping[str, str], uuids: Sequence[str]) -> list[int]:
    """Physical indices visible under ``env`` for ``vendor``'s runtime.

    NVIDIA reads CUDA_VISIBLE_DEVICES. ROCm applies ROCR_VISIBLE_DEVICES to
    the physical devices first, then HIP_VISIBLE_DEVICES (or, when unset,
    CUDA_VISIBLE_DEVICES) indexes into what ROCR left.
    """
    if vendor == "nvidia":
        return visible_indices(env.get("CUDA_VISIBLE_DEVICES"), uuids)
    if vendor != "amd":
        return []
    base = visible_indices(env.get("ROCR_VISIBLE_DEVICES"), uuids)
    hip = env.get("HIP_VISIBLE_DEVICES", env.get("CUDA_VISIBLE_DEVICES"))
    return [base[i] for i in visible_indices(hip, [uuids[b] for b in base])]


def child_env(env: Mapping[str, str], vendor: str, devices: Sequence[int]) -> dict[str, str]:
    """A copy of ``env`` in which a child sees exactly physical ``devices``, in order.

    Indices, not UUIDs, because engines (vLLM) parse CUDA_VISIBLE_DEVICES as
    ints; CUDA_DEVICE_ORDER=PCI_BUS_ID makes CUDA's numbering match NVML's
    (CUDA's default, fastest-first, differs on mixed-GPU hosts).
    """
    out = {k: v for k, v in env.items() if k not in VISIBILITY_VARS}
    spec = ",".join(str(d) for d in devices)
    if vendor == "nvidia":
        out.update(CUDA_VISIBLE_DEVICES=spec, CUDA_DEVICE_ORDER="PCI_BUS_ID")
    elif vendor == "amd":
        out["ROCR_VISIBLE_DEVICES"] = spec
    elif devices:
        raise ValueError(f"cannot give devices {list(devices)} on a machine with no GPU vendor")
    return out


# ---------------------------------------------------------------- discovery

class ToolAbsent(Exception):
    """The tool is not installed / no driver for it: try the next one."""


def optional_module(name: str):
    """Import ``name`` or raise ToolAbsent saying it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ToolAbsent(f"python module {name} not installed ({exc})") from None


@contextlib.contextmanager
def nvml_session(nvml: Any) -> Iterator[Any]:
    """``nvml`` between nvmlInit and nvmlShutdown: the one NVML session kiln opens.

    NVML's init is refcounted, so nested sessions are cheap. nvmlInit's error
    propagates (the caller says what it could not read); a failing shutdown
    is logged and never masks the block's own outcome.
    """
    nvml.nvmlInit()
    try:
        yield nvml
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception as err:  # noqa: BLE001  (any NVML error; the block's outcome wins)
            log.warning("nvmlShutdown failed: %s", err)


def _nvml_call(nvml, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` inside an NVML session."""
    with nvml_session(nvml):
        return fn()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _probe_nvml(ctx: dict) -> tuple[list[Device], str | None]:
    nvml = optional_module("pynvml") if ctx["nvml"] is IMPORT else ctx["nvml"]
    if nvml is None:
        raise ToolAbsent("pynvml not available")
    absent = {getattr(nvml, n, None) for n in _NVML_ABSENT} - {None}

    def query():
        devices = []
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            devices.append(Device(i, _text(nvml.nvmlDeviceGetUUID(h)), _text(nvml.nvmlDeviceGetName(h)),
                                  int(nvml.nvmlDeviceGetMemoryInfo(h).total)))
        return devices, _text(nvml.nvmlSystemGetDriverVersion())
    try:
        return _nvml_call(nvml, query)
    except Exception as exc:
        if getattr(exc, "value", None) in absent:
            raise ToolAbsent(f"NVML: {exc}") from None
        raise GpuDiscoveryError(f"NVML: {type(exc).__name__}: {exc}") from exc


def _rows_to_devices(rows: Iterable[SmiRow]) -> list[Device]:
    return [Device(r.index, r.uuid, r.name, r.memory_total) for r in rows]


def find_tool(tool: str, env: Mapping[str, str]) -> str:
    """The tool's path on ``env``'s PATH, or ToolAbsent."""
    path = shutil.which(tool, path=env.get("PATH", os.defpath))
    if path is None:
        raise ToolAbsent(f"{tool} not on PATH")
    return path


def _probe_nvidia_smi(ctx: dict) -> tuple[list[Device], str | None]:
    out = run_tool([find_tool("nvidia-smi", ctx["env"]), *NVIDIA_SMI_QUERY], ctx["timeout_s"], ctx["env"])
    return _rows_to_devices(parse_nvidia_smi_gpus(out)), None


def _probe_amdsmi(ctx: dict) -> tuple[list[Device], str | None]:
    amd = optional_module("amdsmi") if ctx["amdsmi"] is IMPORT else ctx["amdsmi"]
    if amd is None:
        raise ToolAbsent("amdsmi not available")
    if _driver(ctx["root"]) != "amd":
        raise ToolAbsent("amdsmi installed but no /dev/kfd (no ROCm driver)")
    try:
        amd.amdsmi_init()
        try:
            vram = amd.AmdSmiMemoryType.VRAM
            return [Device(i, _text(amd.amdsmi_get_gpu_device_uuid(h)),
                           str(amd.amdsmi_get_gpu_asic_info(h).get("market_name", "AMD GPU")),
                           int(amd.amdsmi_get_gpu_memory_total(h, vram)))
                    for i, h in enumerate(amd.amdsmi_get_processor_handles())], None
        finally:
            amd.amdsmi_shut_down()
    except Exception as exc:
        raise GpuDiscoveryError(f"amdsmi: {type(exc).__name__}: {exc}") from exc


def _probe_amd_smi(ctx: dict) -> tuple[list[Device], str | None]:
    tool = find_tool("amd-smi", ctx["env"])
    listed = run_tool([tool, "list", "--json"], ctx["timeout_s"], ctx["env"])
    static = run_tool([tool, "static", "--asic", "--vram", "--json"], ctx["timeout_s"], ctx["env"])
    return _rows_to_devices(parse_amd_smi(listed, static)), None


def _probe_rocm_smi(ctx: dict) -> tuple[list[Device], str | None]:
    out = run_tool([find_tool("rocm-smi", ctx["env"]), *ROCM_SMI_QUERY], ctx["timeout_s"], ctx["env"])
    return _rows_to_devices(parse_rocm_smi(out)), None


_PROBES = (("nvml", "nvidia", _probe_nvml), ("nvidia-smi", "nvidia", _probe_nvidia_smi),
           ("amdsmi", "amd", _probe_amdsmi), ("amd-smi", "amd", _probe_amd_smi),
           ("rocm-smi", "amd", _probe_rocm_smi))


def _driver(root: str | os.PathLike) -> str | None:
    """Which GPU kernel driver is loaded, judged from files only the driver creates."""
    if Path(root, "proc/driver/nvidia/version").exists():
        return "nvidia"
    if Path(root, "dev/kfd").exists():
        return "amd"
    return None


def discover(env: Mapping[str, str] | None = None, *, nvml: Any = IMPORT, amdsmi: Any = IMPORT,
             root: str | os.PathLike = "/", timeout_s: float = SMI_TIMEOUT_S) -> Discovery:
    """Find the GPUs; raise GpuDiscoveryError when a tool exists but fails.

    ``env`` is the full environment (PATH finds the tools; the *_VISIBLE_DEVICES
    variables pick the visible set); ``nvml``/``amdsmi`` inject a module object
    (None = not installed); ``root`` is where /proc and /dev are looked for.
    """
    env = dict(os.environ if env is None else env)
    ctx = {"env": env, "nvml": nvml, "amdsmi": amdsmi, "root": root, "timeout_s": timeout_s}
    notes: list[str] = []
    failures: list[str] = []
    for source, vendor, probe in _PROBES:
        try:
            devices, driver = probe(ctx)
        except ToolAbsent as exc:
            notes.append(f"{source}: {exc}")
            continue
        except (GpuDiscoveryError, SmiError) as exc:
            log.warning("GPU discovery via %s failed: %s", source, exc)
            failures.append(str(exc))
            notes.append(f"{source}: FAILED: {exc}")
            continue
        try:
            visible = visible_for(vendor, env, [d.uuid for d in devices])
        except ValueError as exc:
            raise GpuDiscoveryError(str(exc)) from None
        log.info("found %d %s GPU(s) via %s, %d visible", len(devices), vendor, source, len(visible))
        return Discovery(vendor, source, tuple(devices), tuple(visible),
                         {k: env[k] for k in VISIBILITY_VARS if k in env}, driver, tuple(notes))
    if failures:
        raise GpuDiscoveryError("GPU tools present but none answered: " + "; ".join(failures))
    driver = _driver(root)
    if driver:
        raise GpuDiscoveryError(f"{driver} GPU driver is loaded but no tool can list its GPUs: "
                                + "; ".join(notes))
    log.info("no GPU tools and no GPU driver: 0 GPUs (%s)", "; ".join(notes))
    return Discovery("none", "none", (), (), {k: env[k] for k in VISIBILITY_VARS if k in env},
                     None, tuple(notes))


def describe(d: Discovery) -> str:
    """A few human lines: what was found, how, and what is visible."""
    if d.source == "none":
        head = "0 GPUs: no GPU tool answered and no GPU driver is loaded"
    else:
        head = f"{len(d.devices)} {d.vendor} GPU(s) via {d.source}" + (f" (driver {d.driver})" if d.driver else "")
    lines = [head]
    for dev in d.devices:
        mark = f"visible as #{d.visible.index(dev.index)}" if dev.index in d.visible else "hidden"
        lines.append(f"  [{dev.index}] {dev.name}  {dev.uuid}  {dev.memory_total / 2**30:.1f} GiB  {mark}")
    env = ", ".join(f"{k}={v!r}" for k, v in d.env.items()) or "no *_VISIBLE_DEVICES set"
    lines.append(f"visible: {len(d.visible)} {list(d.visible)} ({env})")
    lines += [f"note: {n}" for n in d.notes]
    return "\n".join(lines)


def to_json(d: Discovery) -> str:
    """The discovery as a JSON document (for `invoke gpus --json`)."""
    data = asdict(d)
    data["env"] = dict(d.env)
    return json.dumps(data, indent=2, sort_keys=True)
