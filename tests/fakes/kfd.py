"""A fake AMD host for ci.host.amdgpu: a KFD topology under a sysfs root, device nodes under a /dev root.

No AMD GPU is reachable from CI or from the device machine (H100/H200 only),
so this stands in for one. The properties files follow the kernel's format
(``kfd_topology.c``: one ``name value`` line each) with values of the kind an
8-GPU MI300X host shows: one CPU node per socket first, then one node per GPU,
whose render minors step by 8 (128, 136, 144, ...: each MI300X reserves eight
minors for its partitions), so a planner that guesses ``128 + index`` fails here.

``device_nodes=True`` makes real character devices (``os.mknod``, root only)
with /dev/null's numbers: docker accepts them as devices, and opening one
does nothing. Otherwise the nodes are empty files (existence and group are
all ci/images/container_devices.py reads).
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ci.host.amdgpu import KFD_NODES

# MI300X: 304 CUs x 4 SIMDs, gfx942, PCI vendor 0x1002 / device 0x74a1, 8 XCDs.
MI300X_SIMDS = 1216
MI300X_GFX = 90402
AMD_VENDOR_ID = 0x1002
MI300X_DEVICE_ID = 0x74A1
MI300X_XCC = 8
FIRST_RENDER_MINOR = 128
# Minors each MI300X reserves (one per possible CPX partition).
MI300X_RENDER_STEP = 8
# /dev/null's major and minor: a char device that exists everywhere and does nothing.
NULL_DEVICE = (1, 3)
# Two sockets: the usual dual-EPYC MI300X box.
CPU_NODES = 2


@dataclass(frozen=True)
class FakeAmdHost:
    """Where the fake host lives: pass ``sys_root``/``dev_root`` to ci.host.amdgpu and container_devices."""

    sys_root: Path
    dev_root: Path
    render_minors: tuple[int, ...]  # per GPU index

    def render_node(self, index: int) -> Path:
        """The fake render node of GPU ``index``."""
        return self.dev_root / "dri" / f"renderD{self.render_minors[index]}"


def cpu_properties(cores: int = 96) -> str:
    """A CPU node's properties: cores, no SIMDs, no render node."""
    return _lines(cpu_cores_count=cores, simd_count=0, mem_banks_count=1, caches_count=0, io_links_count=8,
                  max_waves_per_simd=0, gfx_target_version=0, vendor_id=0, device_id=0, location_id=0,
                  domain=0, drm_render_minor=0, unique_id=0, num_xcc=0)


def gpu_properties(render_minor: int, unique_id: int, location_id: int) -> str:
    """An MI300X node's properties (the keys kiln reads, among the others the kernel prints)."""
    return _lines(cpu_cores_count=0, simd_count=MI300X_SIMDS, mem_banks_count=1, caches_count=434,
                  io_links_count=1, p2p_links_count=7, max_waves_per_simd=8, lds_size_in_kb=64,
                  wave_front_size=64, array_count=32, simd_per_cu=4, gfx_target_version=MI300X_GFX,
                  vendor_id=AMD_VENDOR_ID, device_id=MI300X_DEVICE_ID, location_id=location_id, domain=0,
                  drm_render_minor=render_minor, num_sdma_engines=2, num_cp_queues=24,
                  local_mem_size=205822885888, unique_id=unique_id, num_xcc=MI300X_XCC)


def _lines(**values: int) -> str:
    return "".join(f"{k} {v}\n" for k, v in values.items())


def make_host(root: Path, gpus: int = 8, *, cpu_nodes: int = CPU_NODES, render_step: int = MI300X_RENDER_STEP,
              device_nodes: bool = False) -> FakeAmdHost:
    """A fake host with ``gpus`` MI300X GPUs under ``root`` (``root/sys``, ``root/dev``)."""
    sys_root, dev_root = root / "sys", root / "dev"
    nodes = sys_root / KFD_NODES
    minors = tuple(FIRST_RENDER_MINOR + render_step * i for i in range(gpus))
    for n in range(cpu_nodes):
        _node(nodes / str(n), cpu_properties(), gpu_id=0)
    for i, minor in enumerate(minors):
        # unique_id and the PCI location differ per GPU, as on a real host.
        _node(nodes / str(cpu_nodes + i), gpu_properties(minor, 0x5B0C4A1B00000000 + i, (0x0C + i * 0x20) << 8),
              gpu_id=41000 + i)
    (dev_root / "dri").mkdir(parents=True, exist_ok=True)
    for path in (dev_root / "kfd", *(dev_root / "dri" / f"renderD{m}" for m in minors)):
        make_device(path, real=device_nodes)
    return FakeAmdHost(sys_root, dev_root, minors)


def _node(path: Path, properties: str, gpu_id: int) -> None:
    path.mkdir(parents=True)
    (path / "properties").write_text(properties)
    (path / "gpu_id").write_text(f"{gpu_id}\n")


def make_device(path: Path, *, real: bool) -> None:
    """``path`` as a char device with /dev/null's numbers (``real``; needs root) or as an empty file."""
    if real:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(*NULL_DEVICE))
    else:
        path.touch()
