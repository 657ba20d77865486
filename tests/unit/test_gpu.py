"""ci.host.gpu: CUDA_VISIBLE_DEVICES rules, discovery sources and their failures, telemetry."""
from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from ci.host import gpu
from ci.host.gpu import GpuDiscoveryError, TelemetryError, child_env, discover, visible_for, visible_indices
from ci.host.gpu_telemetry import AmdCliTelemetry, NoTelemetry, NvidiaSmiTelemetry, NvmlTelemetry, telemetry_for
from tests.fakes.nvml import NVML_ERROR_LIBRARY_NOT_FOUND, NVML_ERROR_UNKNOWN, FakeGpu, FakeNvml, two_gpus

U0 = "GPU-3d93aaaa-0000-0000-0000-000000000000"
U1 = "GPU-7c11bbbb-0000-0000-0000-000000000001"
ONE = [U0]
TWO = [U0, U1]
# Two GPUs whose UUIDs share the prefix GPU-3d9: "GPU-3d9" is ambiguous.
TWINS = [U0, "GPU-3d9fcccc-0000-0000-0000-000000000002"]
MIG = {"MIG-5a5a0000-1111-2222-3333-444444444444": 1}

# (value, uuids, expected physical indices). Rows marked H200 are MISSION.md's
# ground-truth table (one physical GPU, driver 580, torch 2.11).
CASES = [
    (None, ONE, [0]),                 # H200: unset -> all
    ("", ONE, []),                    # H200: empty -> none
    ("-1", ONE, []),                  # H200
    ("0,-1", ONE, [0]),               # H200: list ends at the first invalid entry
    ("0,1", ONE, [0]),                # H200: 1 is out of range
    ("0,abc", ONE, [0]),              # H200
    ("1,0", ONE, []),                 # H200: first entry invalid -> nothing
    (" 0", ONE, [0]),                 # H200: surrounding spaces tolerated
    ("0 ", ONE, [0]),                 # H200
    ("00", ONE, [0]),                 # H200: strtol-like leading integer
    ("+0", ONE, [0]),                 # H200
    ("0x0", ONE, [0]),                # H200: reads the leading "0"
    (U0, ONE, [0]),                   # H200: full UUID
    ("GPU-3d93", ONE, [0]),           # H200: unique prefix
    ("GPU-", ONE, []),                # H200: empty UUID prefix is invalid
    ("0,-1,1", TWO, [0]),             # -1 ends the list; the 1 after it is ignored
    ("1,0", TWO, [1, 0]),             # CUDA numbering follows the list's order
    ("1", TWO, [1]),
    (f"{U1},1", TWO, [1]),            # an entry of the other kind ends a UUID list ...
    (f"0,{U1}", TWO, [0]),            # ... and an index list
    (f"0,{U0}", ONE, [0]),            # H200: 1 device (not a duplicate error)
    (U0.upper(), ONE, []),            # H200: torch counts 0 (CUDA itself would allocate)
    ("gpu-" + U0[4:], ONE, []),       # H200
    (" GPU-3d93", ONE, []),           # UUID entries are matched verbatim
    ("0x1", ONE, [0]),                # H200: strtol reads "0"
    ("-0", ONE, [0]),                 # H200
    ("GPU-3d9", TWINS, []),           # ambiguous prefix is invalid
    ("1,GPU-3d9", TWINS, [1]),        # ... and ends the list where it stands
    ("GPU-3d9f", TWINS, [1]),         # a longer prefix disambiguates
    ("0,,1", TWO, [0]),               # an empty entry is invalid
    ("abc", TWO, []),
    ("2", TWO, []),                   # out of range
    ("MIG-5a5a", TWO, [1]),           # MIG instance -> its parent's physical index
    ("MIG-", TWO, []),
]


@pytest.mark.parametrize("spec,uuids,expected", CASES, ids=[repr(c[0]) for c in CASES])
def test_visible_indices_table(spec, uuids, expected):
    assert visible_indices(spec, uuids, mig=MIG) == expected


@pytest.mark.parametrize("spec", ["0,0", "0, 0", "0,00", f"GPU-3d93,{U0}", "1,0,1", f"{U1},{U1}"])
def test_duplicate_device_raises(spec):
    with pytest.raises(ValueError, match="twice"):
        visible_indices(spec, TWO)


def test_duplicate_after_the_end_of_the_list_is_not_seen():
    # CUDA stops reading at -1, so the second 0 is never parsed.
    assert visible_indices("0,-1,0", TWO) == [0]


@pytest.mark.parametrize("env,expected", [
    ({}, [0, 1, 2, 3]),
    ({"HIP_VISIBLE_DEVICES": "2,0"}, [2, 0]),
    ({"CUDA_VISIBLE_DEVICES": "3"}, [3]),                                  # HIP honours CUDA_* when HIP_* unset
    ({"HIP_VISIBLE_DEVICES": "1", "CUDA_VISIBLE_DEVICES": "3"}, [1]),       # HIP_* wins
    ({"ROCR_VISIBLE_DEVICES": "1,2,3", "HIP_VISIBLE_DEVICES": "1"}, [2]),   # HIP indexes into ROCR's list
    ({"ROCR_VISIBLE_DEVICES": "-1"}, []),
    ({"ROCR_VISIBLE_DEVICES": "GPU-cc", "HIP_VISIBLE_DEVICES": "0"}, [2]),
    ({"ROCR_VISIBLE_DEVICES": "2,3", "HIP_VISIBLE_DEVICES": "2"}, []),      # out of range of ROCR's list
])
def test_amd_visibility(env, expected):
    uuids = ["GPU-aa", "GPU-bb", "GPU-cc", "GPU-dd"]
    assert visible_for("amd", env, uuids) == expected


def test_nvidia_ignores_hip_variables():
    assert visible_for("nvidia", {"HIP_VISIBLE_DEVICES": "1", "ROCR_VISIBLE_DEVICES": "1"}, TWO) == [0, 1]


def test_child_env_replaces_inherited_visibility():
    env = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0", "HIP_VISIBLE_DEVICES": "3"}
    out = child_env(env, "nvidia", [2, 3])
    assert out == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "2,3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert child_env(env, "amd", [1]) == {"PATH": "/bin", "ROCR_VISIBLE_DEVICES": "1"}
    assert child_env(env, "nvidia", [])["CUDA_VISIBLE_DEVICES"] == ""  # a CPU-only child sees no GPU
    with pytest.raises(ValueError, match="no GPU vendor"):
        child_env(env, "none", [0])


# ------------------------------------------------------------ discovery sources

def make_tool(bindir: Path, name: str, body: str) -> Path:
    """A fake vendor CLI: a python script on a private PATH."""
    bindir.mkdir(exist_ok=True)
    path = bindir / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


SMI_OK = f"""
import sys
if "--query-compute-apps=gpu_uuid,pid,used_memory" in sys.argv:
    print("{U1}, 4242, 20480")
else:
    print("0, {U0}, NVIDIA H100 80GB HBM3, 81559, 1024")
    print("1, {U1}, NVIDIA H100 80GB HBM3, 81559, 20480")
"""


@pytest.fixture
def bindir(tmp_path):
    return tmp_path / "bin"


def env_with(bindir: Path, **extra: str) -> dict:
    bindir.mkdir(exist_ok=True)
    return {"PATH": str(bindir), **extra}


def test_nvml_first(bindir, tmp_path):
    nvml = two_gpus()
    d = discover(env_with(bindir, CUDA_VISIBLE_DEVICES="1"), nvml=nvml, amdsmi=None, root=tmp_path)
    assert (d.vendor, d.source, d.driver) == ("nvidia", "nvml", "580.159.04")
    assert [x.uuid for x in d.devices] == [U0, U1]
    assert d.devices[0].name == "NVIDIA H100 80GB HBM3"  # bytes from old pynvml decoded
    assert d.visible == (1,) and d.env == {"CUDA_VISIBLE_DEVICES": "1"}
    assert nvml.depth == 0  # every nvmlInit was matched by nvmlShutdown


def test_nvml_erroring_without_smi_is_an_error_not_zero_gpus(bindir, tmp_path):
    with pytest.raises(GpuDiscoveryError, match="NVML.*Unknown Error"):
        discover(env_with(bindir), nvml=two_gpus(query_error=NVML_ERROR_UNKNOWN), amdsmi=None, root=tmp_path)


def test_nvml_init_erroring_falls_back_to_nvidia_smi(bindir, tmp_path):
    make_tool(bindir, "nvidia-smi", SMI_OK)
    d = discover(env_with(bindir, CUDA_VISIBLE_DEVICES="0,-1"),
                 nvml=FakeNvml(init_error=NVML_ERROR_UNKNOWN), amdsmi=None, root=tmp_path)
    assert d.source == "nvidia-smi" and d.visible == (0,)
    assert [x.memory_total for x in d.devices] == [81559 * 2**20] * 2
    assert any("nvml: FAILED" in n and "Unknown Error" in n for n in d.notes)


def test_no_tools_no_driver_is_zero_gpus(bindir, tmp_path):
    d = discover(env_with(bindir), nvml=FakeNvml(init_error=NVML_ERROR_LIBRARY_NOT_FOUND),
                 amdsmi=None, root=tmp_path)
    assert (d.vendor, d.source, d.devices, d.visible) == ("none", "none", (), ())
    assert gpu.describe(d).startswith("0 GPUs: no GPU tool answered and no GPU driver is loaded\n")
    assert any("Library Not Found" in n for n in d.notes)
    assert any("nvidia-smi not on PATH" in n for n in d.notes)


def test_driver_without_tools_is_an_error(bindir, tmp_path):
    (tmp_path / "proc/driver/nvidia").mkdir(parents=True)
    (tmp_path / "proc/driver/nvidia/version").write_text("NVRM version: 580.159.04\n")
    with pytest.raises(GpuDiscoveryError, match="nvidia GPU driver is loaded"):
        discover(env_with(bindir), nvml=None, amdsmi=None, root=tmp_path)


def test_nvidia_smi_missing_with_pynvml_missing(bindir, tmp_path):
    d = discover(env_with(bindir), nvml=None, amdsmi=None, root=tmp_path)
    assert d.source == "none" and any("pynvml not available" in n for n in d.notes)


def test_nvidia_smi_hanging_honours_timeout_and_leaks_nothing(bindir, tmp_path):
    pidfile = tmp_path / "smi.pid"
    # Blocks in a read on a pipe it holds both ends of: never returns on its own.
    make_tool(bindir, "nvidia-smi", f"""
        import os
        open({str(pidfile)!r}, "w").write(str(os.getpid()))
        r, w = os.pipe()
        os.read(r, 1)
    """)
    start = time.monotonic()
    with pytest.raises(GpuDiscoveryError, match=r"nvidia-smi: no answer within 1s"):
        discover(env_with(bindir), nvml=None, amdsmi=None, root=tmp_path, timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert 1.0 <= elapsed < 1.0 + 2.5, elapsed
    pid = int(pidfile.read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("body,match", [
    ("print('NVIDIA-SMI has failed because it could not communicate with the driver')", "5 CSV fields"),
    ("print('0, GPU-x, H100, lots, 1')", "memory.total 'lots' is not an integer"),
    ("print('0, not-a-uuid, H100, 1, 1')", "not a GPU UUID"),
    ("pass", "printed no GPU rows"),
    ("import sys; print('Failed to initialize NVML: Driver/library version mismatch', file=sys.stderr); sys.exit(18)",
     "exit status 18: Failed to initialize NVML"),
])
def test_nvidia_smi_garbage_is_an_error(bindir, tmp_path, body, match):
    make_tool(bindir, "nvidia-smi", body)
    with pytest.raises(GpuDiscoveryError, match=match):
        discover(env_with(bindir), nvml=None, amdsmi=None, root=tmp_path)


def test_duplicate_visible_devices_is_a_discovery_error(bindir, tmp_path):
    with pytest.raises(GpuDiscoveryError, match="twice"):
        discover(env_with(bindir, CUDA_VISIBLE_DEVICES="1,1"), nvml=two_gpus(), amdsmi=None, root=tmp_path)


ROCM_JSON = json.dumps({
    "card0": {"Unique ID": "0x18f68e602b8a790f", "Card Series": "AMD Instinct MI300X",
              "VRAM Total Memory (B)": "206141652992", "VRAM Total Used Memory (B)": "295034880"},
    "card1": {"Unique ID": "0x2a0a5e13f3b96d43", "Card Series": "AMD Instinct MI300X",
              "VRAM Total Memory (B)": "206141652992", "VRAM Total Used Memory (B)": "9000000000"},
})


def test_rocm_smi_when_no_nvidia(bindir, tmp_path):
    make_tool(bindir, "rocm-smi", f"print({ROCM_JSON!r})")
    d = discover(env_with(bindir, ROCR_VISIBLE_DEVICES="GPU-2a0a"),
                 nvml=FakeNvml(init_error=NVML_ERROR_LIBRARY_NOT_FOUND), amdsmi=None, root=tmp_path)
    assert (d.vendor, d.source, d.visible) == ("amd", "rocm-smi", (1,))
    assert d.devices[0].uuid == "GPU-18f68e602b8a790f" and d.devices[1].memory_total == 206141652992
    tele = telemetry_for(d, env=env_with(bindir))
    assert tele.used_bytes([1]) == {1: 9000000000}
    with pytest.raises(TelemetryError, match="PIDs"):
        tele.pids([1])


def test_amd_smi_cli(bindir, tmp_path):
    make_tool(bindir, "amd-smi", """
        import json, sys
        if sys.argv[1] == "list":
            print(json.dumps([{"gpu": 0, "bdf": "0000:05:00.0", "uuid": "aa-bb"}]))
        elif sys.argv[1] == "static":
            print(json.dumps({"gpu_data": [{"gpu": 0, "asic": {"market_name": "MI325X"},
                                            "vram": {"size": {"value": 262144, "unit": "MB"}}}]}))
        else:
            print(json.dumps([{"gpu": 0, "mem_usage": {"used_vram": {"value": 300, "unit": "MB"}}}]))
    """)
    d = discover(env_with(bindir), nvml=None, amdsmi=None, root=tmp_path)
    assert (d.source, d.devices[0].name, d.devices[0].memory_total) == ("amd-smi", "MI325X", 262144 * 2**20)
    assert AmdCliTelemetry("amd-smi", env_with(bindir)).used_bytes([0]) == {0: 300 * 2**20}


def test_describe_and_json(bindir, tmp_path):
    d = discover(env_with(bindir, CUDA_VISIBLE_DEVICES="1"), nvml=two_gpus(), amdsmi=None, root=tmp_path)
    text = gpu.describe(d)
    assert "2 nvidia GPU(s) via nvml (driver 580.159.04)" in text
    assert "[0] NVIDIA H100 80GB HBM3" in text and "hidden" in text and "visible as #0" in text
    assert "CUDA_VISIBLE_DEVICES='1'" in text
    data = json.loads(gpu.to_json(d))
    assert data["source"] == "nvml" and data["visible"] == [1] and data["devices"][1]["uuid"] == U1


# ---------------------------------------------------------------- telemetry

def test_nvml_telemetry_reads_physical_indices():
    nvml = FakeNvml(gpus=[FakeGpu(U0, used=1), FakeGpu(U1, used=22, pids=(7, 3))])
    tele = NvmlTelemetry(nvml)
    # The device CUDA calls cuda:0 under CUDA_VISIBLE_DEVICES=1 is physical 1: kiln asks for 1.
    assert tele.used_bytes([1]) == {1: 22}
    assert tele.pids([0, 1]) == {0: (), 1: (3, 7)}
    with tele:
        tele.used_bytes([0])
        assert nvml.depth == 1
    assert nvml.depth == 0


def test_nvml_telemetry_errors_raise():
    tele = NvmlTelemetry(two_gpus(query_error=NVML_ERROR_UNKNOWN))
    with pytest.raises(TelemetryError, match="nvml: cannot read memory: NVMLError: Unknown Error"):
        tele.used_bytes([0])
    with pytest.raises(TelemetryError, match="Invalid Argument"):
        NvmlTelemetry(two_gpus()).used_bytes([5])


def test_nvidia_smi_telemetry(bindir):
    make_tool(bindir, "nvidia-smi", SMI_OK)
    tele = NvidiaSmiTelemetry(TWO, env_with(bindir))
    assert tele.used_bytes([1, 0]) == {1: 20480 * 2**20, 0: 1024 * 2**20}
    assert tele.pids([0, 1]) == {0: (), 1: (4242,)}
    with pytest.raises(TelemetryError, match="memory"):
        tele.used_bytes([2])


def test_no_telemetry_refuses_any_device():
    assert NoTelemetry().used_bytes([]) == {}
    with pytest.raises(TelemetryError, match="no GPU telemetry"):
        NoTelemetry().used_bytes([0])


def test_gpu_module_does_not_import_torch():
    # A forked worker must still be able to initialise CUDA: kiln never does it first.
    import subprocess
    code = "import sys, ci.host.gpu, ci.host.gpu_telemetry, ci.host.gpumem, ci.host.alloc; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2], env={**os.environ, "PYTHONPATH": "."})
    assert out.stdout.strip() == "False"
