"""AMD GPUs from the kernel's KFD topology: which render node each GPU index is, with no ROCm tool.

A ROCm container needs ``/dev/kfd`` plus the DRM render node of every GPU it
may use, and nothing maps "GPU 3" to its render node except the KFD topology
(amdsmi/rocm-smi read it too, but an AMD runner host need not have them: the
ROCm userspace lives in the image). Every AMD job died at the container start
while the chain handed in no device at all.

The topology is ``<sys>/class/kfd/kfd/topology/nodes/<N>/properties``: one
``name value`` pair a line, integers (kernel ``kfd_topology.c``; ROCm's
sysfs-class-kfd-topology docs). A node with ``simd_count 0`` is a CPU (one per
socket); a node with SIMDs is a GPU -- or, on an MI300 in CPX mode, one
partition, which ROCm counts as a GPU too. ROCr numbers GPUs in node-number
order (2 before 10), and so does kiln: that order is what HIP_VISIBLE_DEVICES
and ROCR_VISIBLE_DEVICES index. Render minors are not 128 + index: MI300X
hosts number them 128, 136, 144, ... (each GPU reserves eight minors for its
partitions), so guessing from the index hands in the wrong GPUs.

Indices here are physical (all GPU nodes), like ``ci.host.gpu``'s NVML index;
the visibility variables pick among them (``visible``). Both roots are
parameters so tests build a fake host in a temp dir.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ci.host.gpu import GpuDiscoveryError, visible_for

log = logging.getLogger(__name__)

SYS_ROOT = Path("/sys")
DEV_ROOT = Path("/dev")
# Relative to the sysfs root; /sys/class/kfd/kfd links to /sys/devices/virtual/kfd/kfd.
KFD_NODES = Path("class/kfd/kfd/topology/nodes")
# The device every ROCm process opens first, whatever GPUs it uses.
KFD_DEVICE = "kfd"


class AmdGpuError(GpuDiscoveryError):
    """The KFD topology is missing or malformed, or an asked-for GPU or its node is not there."""


@dataclass(frozen=True)
class KfdGpu:
    """One GPU (or GPU partition) of the KFD topology; ``index`` counts GPU nodes only, from 0."""

    index: int
    node: int  # the topology node number (CPU nodes come first)
    render_minor: int
    unique_id: int = 0  # 0 when the kernel does not report one

    @property
    def render_node(self) -> str:
        """The render node's name under /dev/dri (``renderD136``)."""
        return f"renderD{self.render_minor}"

    @property
    def uuid(self) -> str:
        """The ``GPU-`` UUID a visibility variable may name this GPU by ("" without a unique_id).

        ROCr prints the topology's unique_id as 16 hex digits after ``GPU-``;
        a GPU without one can only be named by index.
        """
        return f"GPU-{self.unique_id:016x}" if self.unique_id else ""


def nodes_dir(sys_root: Path = SYS_ROOT) -> Path:
    """Where the KFD topology's nodes are under ``sys_root``."""
    return Path(sys_root) / KFD_NODES


def _properties(path: Path) -> dict[str, int]:
    values: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, _, value = line.strip().partition(" ")
        try:
            values[name] = int(value.strip())
        except ValueError:
            raise AmdGpuError(f"{path}:{number}: expected 'name integer', got {line.strip()!r}") from None
    return values


def kfd_gpus(sys_root: Path = SYS_ROOT) -> tuple[KfdGpu, ...]:
    """Every GPU node of the KFD topology under ``sys_root``, in ROCr's order.

    A GPU node whose properties this process may not read (EPERM: a device
    cgroup that hides it) is left out, as ROCr leaves it out; a host with no
    topology, or one whose topology lists no GPU, is an AmdGpuError.
    """
    base = nodes_dir(sys_root)
    if not base.is_dir():
        raise AmdGpuError(f"no KFD topology at {base}: the amdgpu driver is not loaded on this host")
    numbers = sorted(int(p.name) for p in base.iterdir() if p.name.isdigit())
    gpus: list[KfdGpu] = []
    for node in numbers:
        path = base / str(node) / "properties"
        try:
            props = _properties(path)
        except PermissionError:
            log.info("KFD node %d: %s not readable here; left out, as ROCr does", node, path)
            continue
        except OSError as exc:
            raise AmdGpuError(f"cannot read {path}: {exc.strerror or exc}") from None
        if props.get("simd_count", 0) <= 0:
            continue  # a CPU node
        minor = props.get("drm_render_minor", 0)
        if minor <= 0:
            raise AmdGpuError(f"KFD node {node} is a GPU (simd_count {props['simd_count']}) "
                              f"with no drm_render_minor in {path}")
        gpus.append(KfdGpu(len(gpus), node, minor, props.get("unique_id", 0)))
    if not gpus:
        raise AmdGpuError(f"the KFD topology at {base} lists no GPU node ({len(numbers)} CPU node(s) only)")
    log.info("KFD topology: %d GPU(s), render nodes %s", len(gpus), " ".join(g.render_node for g in gpus))
    return tuple(gpus)


def visible(gpus: Sequence[KfdGpu], env: Mapping[str, str]) -> tuple[int, ...]:
    """The physical indices a ROCm process started with ``env`` sees, in its numbering order.

    ROCR_VISIBLE_DEVICES narrows the topology's GPUs first; HIP_VISIBLE_DEVICES
    (or CUDA_VISIBLE_DEVICES) then indexes what is left -- the same rules as
    CUDA_VISIBLE_DEVICES (``ci.host.gpu.visible_indices``). A device named twice
    is an AmdGpuError, as ROCm refuses to start with it.
    """
    try:
        return tuple(visible_for("amd", env, [g.uuid for g in gpus]))
    except ValueError as exc:
        raise AmdGpuError(str(exc)) from None


def container_devices(indices: Sequence[int], *, sys_root: Path = SYS_ROOT,
                      dev_root: Path = DEV_ROOT) -> tuple[Path, ...]:
    """``<dev>/kfd`` and the render node of each physical GPU index in ``indices``, in that order.

    Each path is checked to exist under ``dev_root``: a topology that names a
    render node /dev lacks is a broken host, and docker would fail on it with
    a less direct message.
    """
    if not indices:
        raise AmdGpuError("no AMD GPU indices given: allocate GPUs first (kiln never hands in all)")
    twice = sorted({i for i in indices if list(indices).count(i) > 1})
    if twice:
        raise AmdGpuError(f"AMD GPU {', '.join(map(str, twice))} given twice: each GPU goes in once")
    gpus = kfd_gpus(sys_root)
    wrong = [i for i in indices if not 0 <= i < len(gpus)]
    if wrong:
        raise AmdGpuError(f"asked for AMD GPU {', '.join(map(str, wrong))} but the KFD topology at "
                          f"{nodes_dir(sys_root)} lists {len(gpus)} GPU(s) (indices 0-{len(gpus) - 1})")
    kfd = Path(dev_root) / KFD_DEVICE
    if not kfd.exists():
        raise AmdGpuError(f"{kfd} is missing although the KFD topology exists: is the ROCm device node hidden?")
    nodes = [Path(dev_root) / "dri" / gpus[i].render_node for i in indices]
    for i, node in zip(indices, nodes):
        if not node.exists():
            raise AmdGpuError(f"render node {node} of AMD GPU {i} (KFD node {gpus[i].node}) is missing")
    return (kfd, *nodes)
