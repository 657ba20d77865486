"""Which host devices an engine container gets: the allocated GPUs and RDMA, never "all".

NVIDIA GPUs go in as a device request naming the allocated ids (two jobs on
one 8-GPU host must not see each other's GPUs); AMD GPUs as ``/dev/kfd`` plus
the allocated ``/dev/dri/renderD*`` nodes -- given as GPU indices, resolved
through the host's KFD topology (ci/host/amdgpu.py), or as render nodes by
name; ``/dev/infiniband`` whenever the host has it (PD KV transfer needs
RDMA). The result is the device part of docker's ``containers.create``
arguments (ci/images/containers.py); it reads only the two roots it is given.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import docker.types

from ci.host import amdgpu
from ci.images.docker_client import ContainerError

VENDORS = ("nvidia", "amd", "cpu")
DEV_ROOT = amdgpu.DEV_ROOT
SYS_ROOT = amdgpu.SYS_ROOT
# AMD render nodes are minors 128..255 (DRM render node range).
RENDER_MINOR_MIN, RENDER_MINOR_MAX = 128, 255
# A render node by name; a bare number is a GPU index (the chain plans those,
# as for NVIDIA), so "128" is GPU 128, never renderD128.
_RENDER_RE = re.compile(r"^(?:/dev/dri/)?renderD(\d+)$")


def _render_node(device_id: str, dev_root: Path) -> Path:
    match = _RENDER_RE.match(device_id)
    minor = int(match.group(1)) if match else -1
    if not RENDER_MINOR_MIN <= minor <= RENDER_MINOR_MAX:
        raise ContainerError(f"bad AMD device id {device_id!r}: expected a GPU index (0, 1, ...) or a render "
                             f"node such as renderD128 (minor {RENDER_MINOR_MIN}-{RENDER_MINOR_MAX})")
    return dev_root / "dri" / f"renderD{minor}"


def amd_nodes(device_ids: Sequence[str], dev_root: Path = DEV_ROOT, sys_root: Path = SYS_ROOT) -> list[Path]:
    """``<dev>/kfd`` and the render nodes of ``device_ids``: all GPU indices or all render node names.

    Indices are physical KFD indices (ci/host/amdgpu.py); a mix of both forms
    is refused, since one list would then count GPUs two ways.
    """
    ids = [str(d).strip() for d in device_ids]
    indices = [d for d in ids if d.isdigit()]
    if indices and len(indices) != len(ids):
        raise ContainerError(f"AMD device ids {ids} mix GPU indices and render nodes: use one form")
    if indices:
        try:
            return list(amdgpu.container_devices([int(d) for d in indices], sys_root=sys_root, dev_root=dev_root))
        except amdgpu.AmdGpuError as exc:
            raise ContainerError(str(exc)) from None
    nodes = [dev_root / amdgpu.KFD_DEVICE, *(_render_node(d, dev_root) for d in ids)]
    missing = [str(n) for n in nodes if not n.exists()]
    if missing:
        raise ContainerError(f"AMD devices missing on this host: {', '.join(missing)}")
    return nodes


def _device_entry(path: Path, dev_root: Path) -> str:
    # Inside the container the node sits where it does on a real host.
    inside = Path("/dev") / path.relative_to(dev_root)
    return f"{path}:{inside}:rwm"


def device_options(vendor: str, device_ids: Sequence[str], dev_root: Path = DEV_ROOT,
                   sys_root: Path = SYS_ROOT) -> dict:
    """The ``containers.create`` keyword arguments that hand the allocated devices in.

    ``dev_root`` is where the device nodes are; ``sys_root`` is where the KFD
    topology that resolves AMD GPU indices is.
    """
    if vendor not in VENDORS:
        raise ContainerError(f"unknown vendor {vendor!r}; expected one of {', '.join(VENDORS)}")
    ids = [str(d).strip() for d in device_ids]
    opts: dict = {}
    if vendor == "cpu":
        if ids:
            raise ContainerError(f"cpu profile got device ids {ids}: a CPU runner has no GPUs to hand in")
    elif not ids:
        raise ContainerError(f"{vendor} profile got no device ids: allocate GPUs first (kiln never hands in all)")
    elif vendor == "nvidia":
        opts["device_requests"] = [docker.types.DeviceRequest(device_ids=ids, capabilities=[["gpu"]])]
    else:
        nodes = amd_nodes(ids, dev_root, sys_root)
        opts["devices"] = [_device_entry(n, dev_root) for n in nodes]
        # ROCm opens these nodes as the group that owns them on the host (video,
        # render); numeric gids work whatever the image's /etc/group says.
        opts["group_add"] = sorted({str(n.stat().st_gid) for n in nodes})
    ib = dev_root / "infiniband"
    if ib.is_dir():
        opts.setdefault("devices", []).append(_device_entry(ib, dev_root))
        # RDMA pins memory: the default 64 KiB memlock makes ibv_reg_mr fail.
        opts["cap_add"] = ["IPC_LOCK"]
        opts["ulimits"] = [docker.types.Ulimit(name="memlock", soft=-1, hard=-1)]
    return opts
