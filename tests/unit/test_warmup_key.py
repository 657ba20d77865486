"""The warmup version key: any component that can invalidate a compiled artefact changes it."""
from __future__ import annotations

import copy
import sys
from types import SimpleNamespace

import pytest

from ci.warmup import key as wk

BASE = dict(
    backend="sglang",
    model="Qwen/Qwen2.5-0.5B-Instruct",
    tp=2,
    args=("--enable-metrics", "--mem-fraction-static", "0.8"),
    launch_env={"SGLANG_SET_CPU_AFFINITY": "1"},
    engine_distributions=("sglang",),
    software={
        "python": "CPython 3.11.7",
        "dists": {"sglang": "0.5.5", "torch": "2.9.0", "triton": "3.5.0", "flashinfer-python": "0.4.1",
                  "deep-gemm": "2.1.0", "sgl-kernel": "0.3.16", "nvidia-cuda-runtime-cu12": "12.8.90"},
        "torch_build": {"cuda": "12.8"},
    },
    command=("/venv/bin/python", "-m", "sglang.launch_server", "--model-path", "{model}", "--port", "{port}"),
    hardware={"machine": "x86_64", "gpu_vendor": "nvidia", "gpu_names": "NVIDIA H100 80GB HBM3, NVIDIA H100 80GB HBM3",
              "compute_capability": "9.0, 9.0", "driver": "580.159.04"},
)


def _key(inputs: dict) -> str:
    return wk.key_of(wk.components(**inputs))


def _set(path: str, value):
    def mutate(inputs):
        target = inputs
        *parents, last = path.split(".")
        for p in parents:
            target = target[p]
        target[last] = value
    return mutate


# (what changed, how) — one row per component named in issue 5, plus the
# sglang #24253 blind spots (CUDA, driver, DeepGEMM).
CHANGES = [
    ("model", _set("model", "Qwen/Qwen2.5-1.5B-Instruct")),
    ("tp", _set("tp", 4)),
    ("launch args", _set("args", ("--enable-metrics", "--mem-fraction-static", "0.7"))),
    ("launch arg order", _set("args", ("--mem-fraction-static", "0.8", "--enable-metrics"))),
    ("launch env", _set("launch_env", {"SGLANG_SET_CPU_AFFINITY": "0"})),
    ("backend", _set("backend", "vllm")),
    ("engine command", _set("command", ("/other-venv/bin/python", "-m", "sglang.launch_server", "--model-path",
                                        "{model}", "--port", "{port}"))),
    ("engine version", _set("software.dists.sglang", "0.5.6")),
    ("python", _set("software.python", "CPython 3.12.3")),
    ("torch", _set("software.dists.torch", "2.9.1")),
    ("triton", _set("software.dists.triton", "3.5.1")),
    ("flashinfer", _set("software.dists.flashinfer-python", "0.4.2")),
    ("deep_gemm", _set("software.dists.deep-gemm", "2.1.1")),
    ("sgl-kernel", _set("software.dists.sgl-kernel", "0.3.17")),
    ("CUDA runtime (torch build)", _set("software.torch_build", {"cuda": "13.0"})),
    ("CUDA runtime (wheel)", _set("software.dists.nvidia-cuda-runtime-cu12", "12.9.37")),
    ("driver", _set("hardware.driver", "580.160.01")),
    ("GPU name", _set("hardware.gpu_names", "NVIDIA H200, NVIDIA H200")),
    ("compute capability", _set("hardware.compute_capability", "10.0, 10.0")),
    ("CPU model", _set("hardware.cpu_model", "AMD EPYC 9654")),
    ("CPU ISA", _set("hardware.cpu_isa", "avx2 avx512f")),
    ("machine", _set("hardware.machine", "aarch64")),
]


@pytest.mark.parametrize("what,mutate", CHANGES, ids=[c[0] for c in CHANGES])
def test_key_changes_when_any_component_changes(what, mutate):
    changed = copy.deepcopy(BASE)
    mutate(changed)
    assert _key(changed) != _key(BASE), f"{what} did not change the key"
    # ...and the marker can say what changed.
    assert wk.diff(wk.components(**BASE), wk.components(**changed)), what


def test_key_is_stable_and_order_independent():
    reordered = copy.deepcopy(BASE)
    reordered["launch_env"] = dict(reversed(list({"A": "1", "B": "2"}.items())))
    plain = copy.deepcopy(BASE)
    plain["launch_env"] = {"A": "1", "B": "2"}
    assert _key(reordered) == _key(plain)
    assert _key(copy.deepcopy(BASE)) == _key(BASE)
    assert len(_key(BASE)) == 64


def test_unrelated_distribution_does_not_change_the_key():
    other = copy.deepcopy(BASE)
    other["software"]["dists"]["requests"] = "2.32.0"
    assert _key(other) == _key(BASE)


def test_components_name_everything_for_humans():
    parts = wk.components(**BASE)
    assert parts["engine"] == "sglang 0.5.5"
    assert parts["dist:deep-gemm"] == "2.1.0"
    assert parts["torch_cuda_runtime"] == "12.8"
    assert parts["hw:driver"] == "580.159.04"
    assert parts["hw:compute_capability"] == "9.0, 9.0"
    assert all(isinstance(v, str) for v in parts.values())
    missing = copy.deepcopy(BASE)
    del missing["software"]["dists"]["sglang"]
    assert wk.components(**missing)["engine"] == "not installed"


X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16
processor\t: 1
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 2000.00
Features\t: fp asimd sve bf16 i8mm
CPU implementer\t: 0x41
CPU part\t: 0xd4f
"""


def test_parse_cpuinfo_x86_and_arm():
    x86 = wk.parse_cpuinfo(X86_CPUINFO)
    assert x86 == {"cpu_model": "AMD EPYC 9654 96-Core Processor", "cpu_isa": "avx2 avx512_bf16 avx512f fpu sse2"}
    arm = wk.parse_cpuinfo(ARM_CPUINFO)
    assert arm["cpu_model"] == "cpu implementer=0x41 cpu part=0xd4f"
    assert arm["cpu_isa"] == "asimd bf16 fp i8mm sve"
    assert wk.parse_cpuinfo("") == {"cpu_model": "unknown", "cpu_isa": "unknown"}


def test_cpu_isa_flag_from_cpuinfo_changes_key(tmp_path):
    def facts(text):
        (tmp_path / "proc").mkdir(exist_ok=True)
        (tmp_path / "proc" / "cpuinfo").write_text(text)
        return wk.hardware_facts("cpu", root=tmp_path)
    base = copy.deepcopy(BASE) | {"hardware": facts(X86_CPUINFO)}
    amx = copy.deepcopy(BASE) | {"hardware": facts(X86_CPUINFO.replace("avx512_bf16", "avx512_bf16 amx_tile"))}
    assert base["hardware"]["cpu_model"].startswith("AMD EPYC 9654")
    assert _key(base) != _key(amx)


def test_parse_torch_build():
    cuda = "__version__ = '2.9.0+cu128'\ncuda: Optional[str] = '12.8'\nhip: Optional[str] = None\n"
    assert wk.parse_torch_build(cuda) == {"cuda": "12.8"}
    rocm = "cuda: Optional[str] = None\nhip: Optional[str] = '6.4.43484-123'\n"
    assert wk.parse_torch_build(rocm) == {"hip": "6.4.43484-123"}
    assert wk.parse_torch_build("cuda = None\nhip = None\n") == {}


def test_parse_nvidia_driver():
    text = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  "
            "(dvs-builder@U22)  Thu Oct  9 2025\nGCC version:  gcc version 12.3.0\n")
    assert wk.parse_nvidia_driver(text) == "580.159.04"
    legacy = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
    assert wk.parse_nvidia_driver(legacy) == "535.104.05"
    assert wk.parse_nvidia_driver("garbage") is None


class FakeNvml:
    """Just the NVML calls hardware_facts makes; physical index -> (major, minor)."""

    def __init__(self, caps, driver=b"580.159.04"):
        self.caps, self.driver, self.inits = caps, driver, 0

    def nvmlInit(self):  # noqa: N802 (NVML's naming)
        self.inits += 1

    def nvmlShutdown(self):  # noqa: N802
        self.inits -= 1

    def nvmlDeviceGetHandleByIndex(self, i):  # noqa: N802
        return i

    def nvmlDeviceGetCudaComputeCapability(self, h):  # noqa: N802
        return self.caps[h]

    def nvmlSystemGetDriverVersion(self):  # noqa: N802
        return self.driver


def _discovery(names, visible):
    devs = tuple(SimpleNamespace(index=i, uuid=f"GPU-{i}", name=n, memory_total=1) for i, n in enumerate(names))
    return SimpleNamespace(vendor="nvidia", devices=devs, visible=tuple(visible))


def test_gpu_facts_cover_visible_devices_only():
    nvml = FakeNvml({0: (9, 0), 1: (9, 0), 2: (8, 0)})
    d = _discovery(["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"], visible=[2, 0])
    facts = wk.hardware_facts("nvidia", discovery=d, nvml=nvml)
    assert facts["gpu_names"] == "NVIDIA A100-SXM4-80GB, NVIDIA H100 80GB HBM3"
    assert facts["compute_capability"] == "8.0, 9.0"
    assert facts["driver"] == "580.159.04"
    assert nvml.inits == 0, "NVML left initialised"


def test_engine_python():
    assert wk.engine_python(["/venv/bin/python", "-m", "vllm"]) == "/venv/bin/python"
    assert wk.engine_python(["/usr/bin/python3.11", "-m", "sglang.launch_server"]) == "/usr/bin/python3.11"
    assert wk.engine_python(["docker", "run"]) is None
    assert wk.engine_python([]) is None
    assert wk.probe(None, ["torch"]) == {"python": "unknown", "dists": {}, "torch_build": {}}


def test_probe_in_another_interpreter_runs_the_stdlib_probe(tmp_path):
    # Another path to this interpreter: the probe runs as a
    # child (python -I ci/warmup/key.py --probe), exactly as for a foreign venv,
    # and must agree with the in-process answer.
    # A wrapper script, not a symlink: a symlink outside the venv's bin/ loses
    # the venv (pyvenv.cfg is looked up beside the link) and sees other packages.
    alias = tmp_path / "python3"
    alias.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    alias.chmod(0o755)
    dists = ("pytest", "psutil", "no-such-distribution")
    child = wk.probe(str(alias), dists)
    assert child == wk.probe(sys.executable, dists)
    assert set(child["dists"]) == {"pytest", "psutil"}


def test_probe_of_a_missing_interpreter_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="cannot run the engine interpreter"):
        wk.probe(str(tmp_path / "python3"), ["torch"])
