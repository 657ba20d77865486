"""The version key of a warmed cache: everything that decides whether a compiled kernel still fits.

sglang #24253 keyed its warmup markers on python/triton/torch only, so a new
CUDA runtime, driver or DeepGEMM kept a "warm" marker over caches that no
longer matched. Here the key hashes every component that can invalidate a
JIT artefact, and the marker lists each one so a human can see why a run
went cold:

    spec:     backend and its command, model, tp, launch args, the launch env kiln sets
    software: engine version, python, torch, triton, JIT libraries
              (flashinfer, deep_gemm, sgl-kernel), CUDA/HIP runtime of torch
    hardware: GPU name + compute capability + driver, or CPU model + ISA flags

Versions are read with importlib.metadata and by reading torch/version.py as
text: never by importing torch (seconds, and it would initialise CUDA in the
harness). When the engine runs in another interpreter than kiln, the same
stdlib-only probe runs there as ``python -I ci/warmup/key.py --probe ...``,
which is why this module imports nothing from ci/ at the top.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)

# Bump when the set or the meaning of the components changes: every marker
# written under an older format then reads as foreign (cold), never as warm.
KEY_FORMAT = 1
# Distributions whose version changes compiled artefacts, besides the engine's
# own. Triton ships as "triton" upstream, "pytorch-triton*" from PyTorch's
# index; DeepGEMM and FlashInfer are the JIT caches sglang #24253 missed.
VERSIONED_DISTRIBUTIONS = (
    "torch", "triton", "pytorch-triton", "pytorch-triton-rocm", "triton-rocm",
    "flashinfer-python", "flashinfer-cubin", "deep-gemm", "deep_gemm", "sgl-kernel",
    "nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime", "nvidia-cuda-nvrtc-cu12",
)
# Interpreter start plus a metadata scan of a large venv: well under 5 s even
# on a loaded 2-core runner; past this the interpreter is broken, not slow.
PROBE_TIMEOUT_S = 30.0
_TORCH_BUILD = re.compile(r"^(cuda|hip)\s*(?::[^=]*)?=\s*['\"]?([^'\"\n]*)['\"]?\s*$", re.M)
_NVRM = re.compile(r"Kernel Module\s+(?:for\s+\S+\s+)?([0-9][0-9.]*)")


# ---------------------------------------------------------------- software

def probe_here(distributions: Sequence[str]) -> dict[str, Any]:
    """Versions as this interpreter sees them (stdlib only, nothing imported)."""
    dists = {}
    for name in distributions:
        try:
            dists[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    build = {}
    try:
        text = Path(str(importlib.metadata.distribution("torch").locate_file("torch/version.py"))).read_text()
        build = parse_torch_build(text)
    except (importlib.metadata.PackageNotFoundError, OSError):
        pass
    return {"python": f"{platform.python_implementation()} {platform.python_version()}",
            "dists": dists, "torch_build": build}


def parse_torch_build(version_py: str) -> dict[str, str]:
    """``{'cuda': '13.0'}`` / ``{'hip': '6.4...'}`` from torch/version.py's text (None values dropped)."""
    found = {}
    for what, value in _TORCH_BUILD.findall(version_py):
        if value and value != "None":
            found[what] = value
    return found


def engine_python(argv: Sequence[str]) -> str | None:
    """The interpreter an engine command runs in, or None when argv[0] is not a Python."""
    if not argv:
        return None
    return argv[0] if re.fullmatch(r"python[0-9.]*", os.path.basename(argv[0])) else None


def probe(python: str | None, distributions: Sequence[str]) -> dict[str, Any]:
    """Versions in the engine's interpreter: in-process when it is kiln's own, else one child.

    ``python=None`` (an engine that is not a Python command) yields the
    marker value "unknown" for every software component.
    """
    if python is None:
        return {"python": "unknown", "dists": {}, "torch_build": {}}
    # Compare paths, not inodes: a venv's bin/python is a symlink to the base
    # interpreter, yet it sees other site-packages.
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        return probe_here(distributions)
    argv = [python, "-I", str(Path(__file__).resolve()), "--probe", *distributions]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"version probe in {python} gave no answer in {PROBE_TIMEOUT_S:.0f} s") from None
    except OSError as exc:
        raise RuntimeError(f"cannot run the engine interpreter {python}: {exc.strerror or exc}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"version probe in {python} failed (exit {done.returncode}): {last}")
    return json.loads(done.stdout)


# ---------------------------------------------------------------- hardware

def parse_cpuinfo(text: str) -> dict[str, str]:
    """CPU model and ISA flags from /proc/cpuinfo (x86 ``model name``/``flags``, Arm ``Features``)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields.setdefault(name.strip().lower(), value.strip())
    model = fields.get("model name") or " ".join(
        f"{k}={fields[k]}" for k in ("cpu implementer", "cpu part", "cpu variant") if k in fields)
    flags = fields.get("flags") or fields.get("features") or ""
    return {"cpu_model": model or "unknown", "cpu_isa": " ".join(sorted(set(flags.split()))) or "unknown"}


def parse_nvidia_driver(text: str) -> str | None:
    """The driver version from /proc/driver/nvidia/version, or None."""
    m = _NVRM.search(text)
    return m.group(1) if m else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def nvidia_details(indices: Sequence[int], *, nvml: Any = None) -> tuple[list[str], str | None]:
    """Compute capability per physical index, and the driver version, from NVML in-process.

    ``nvml`` injects a module (tests); None imports pynvml. Raises RuntimeError
    when NVML cannot answer, so the caller can fall back to nvidia-smi.
    """
    if nvml is None:
        try:
            import pynvml as nvml  # noqa: PLC0415  (optional; nvidia-ml-py)
        except ImportError as exc:
            raise RuntimeError(f"pynvml not installed ({exc})") from None
    from ci.host import gpu  # noqa: PLC0415  (this module runs standalone as the probe: nothing from ci/ at the top)
    try:
        with gpu.nvml_session(nvml):
            caps = []
            for i in indices:
                major, minor = nvml.nvmlDeviceGetCudaComputeCapability(nvml.nvmlDeviceGetHandleByIndex(i))
                caps.append(f"{major}.{minor}")
            driver = nvml.nvmlSystemGetDriverVersion()
    except Exception as exc:  # noqa: BLE001  (any NVML error: the caller falls back to nvidia-smi)
        raise RuntimeError(f"NVML: {exc}") from None
    return caps, driver.decode() if isinstance(driver, bytes) else str(driver)


def _smi_details(indices: Sequence[int]) -> tuple[list[str], str | None]:
    from ci.host.gpu_smi import run_tool  # noqa: PLC0415  (kept out of the standalone probe)
    out = run_tool(["nvidia-smi", "--query-gpu=index,compute_cap,driver_version",
                    "--format=csv,noheader,nounits"])
    rows = {int(r[0]): (r[1].strip(), r[2].strip())
            for r in (line.split(",") for line in out.strip().splitlines()) if len(r) == 3}
    return [rows.get(i, ("unknown", ""))[0] for i in indices], next(iter(rows.values()), ("", None))[1]


def hardware_facts(vendor: str, *, discovery: Any = None, root: Path = Path("/"),
                   nvml: Any = None) -> dict[str, str]:
    """What the compiled kernels were built for on this machine.

    ``vendor`` is the runner profile's ("cpu", "nvidia", "amd"). GPU runners
    list the visible GPUs' names (from ci.host.gpu.discover, injectable), compute
    capabilities and driver; CPU runners the CPU model and ISA flags, which
    decide the vector code Inductor's C++ backend emits.
    """
    facts = {"machine": platform.machine()}
    if vendor == "cpu":
        facts.update(parse_cpuinfo(_read(root / "proc/cpuinfo") or ""))
        return facts
    if discovery is None:
        from ci.host import gpu  # noqa: PLC0415
        discovery = gpu.discover()
    by_index = {d.index: d for d in discovery.devices}
    visible = list(discovery.visible)
    facts["gpu_vendor"] = discovery.vendor
    facts["gpu_names"] = ", ".join(by_index[i].name for i in visible if i in by_index) or "none"
    if discovery.vendor == "nvidia" and visible:
        try:
            caps, driver = nvidia_details(visible, nvml=nvml)
        except RuntimeError as exc:
            log.info("compute capability via NVML unavailable (%s); asking nvidia-smi", exc)
            caps, driver = _smi_details(visible)
        facts["compute_capability"] = ", ".join(caps)
        facts["driver"] = driver or parse_nvidia_driver(_read(root / "proc/driver/nvidia/version") or "") \
            or "unknown"
    elif discovery.vendor == "amd":
        facts["driver"] = (_read(root / "sys/module/amdgpu/version") or "unknown").strip()
    return facts


# ---------------------------------------------------------------- the key

def components(*, backend: str, model: str, tp: int, args: Sequence[str], launch_env: Mapping[str, str],
               engine_distributions: Sequence[str], software: Mapping[str, Any],
               hardware: Mapping[str, str], command: Sequence[str] = ()) -> dict[str, str]:
    """Every key component as a flat, human-readable str -> str mapping (what the marker lists).

    ``command`` is the engine's launch command without the spec's args (port
    and model as placeholders): two ``generic:`` backends share a name but
    not an engine.
    """
    dists = dict(software.get("dists", {}))
    engine = next((f"{d} {dists[d]}" for d in engine_distributions if d in dists), "not installed")
    out = {
        "format": str(KEY_FORMAT),
        "backend": backend,
        "model": model,
        "tp": str(tp),
        "command": json.dumps(list(command)),
        "args": json.dumps(list(args)),
        "launch_env": json.dumps(dict(sorted(launch_env.items()))),
        "engine": engine,
        "python": str(software.get("python", "unknown")),
    }
    for name in VERSIONED_DISTRIBUTIONS:
        if name in dists:
            out[f"dist:{name}"] = dists[name]
    for what, value in sorted(dict(software.get("torch_build", {})).items()):
        out[f"torch_{what}_runtime"] = value
    out.update({f"hw:{k}": v for k, v in sorted(hardware.items())})
    return out


def key_of(parts: Mapping[str, str]) -> str:
    """sha256 over the canonical JSON of the components (order-independent)."""
    return hashlib.sha256(json.dumps(dict(parts), sort_keys=True).encode()).hexdigest()


def diff(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    """``name: old -> new`` for every component that differs (why a marker went stale)."""
    names = sorted(set(old) | set(new))
    return [f"{n}: {old.get(n, '<absent>')} -> {new.get(n, '<absent>')}"
            for n in names if old.get(n) != new.get(n)]


if __name__ == "__main__":  # the probe, run inside an engine's interpreter
    if len(sys.argv) < 2 or sys.argv[1] != "--probe":
        sys.exit("usage: python -I ci/warmup/key.py --probe DIST...")
    json.dump(probe_here(sys.argv[2:]), sys.stdout)
