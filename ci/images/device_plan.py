"""Which GPUs a profile's container gets on this host, decided before the start (``invoke ci``).

Both vendors plan physical GPU indices: NVIDIA's go to docker as they are,
AMD's become ``/dev/kfd`` plus their render nodes at the start
(ci/images/container_devices.py, through the KFD topology). Until AMD had
this, the chain planned no device for an AMD profile and every MI300/MI325
job died at its start step ("amd profile got no device ids").

Imports no docker: a dry run plans on a machine with no Docker engine.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

from ci.host import amdgpu, gpu
from ci.profiles import runners

log = logging.getLogger(__name__)

# Vendors whose containers get GPUs (a cpu profile gets none).
GPU_VENDORS = ("nvidia", "amd")


def visible_gpus(profile: runners.Profile, env: Mapping[str, str] | None = None, *,
                 sys_root: Path = amdgpu.SYS_ROOT) -> tuple[int, ...]:
    """Physical indices of the ``profile``'s vendor's GPUs this process may use, in visible order.

    NVIDIA through NVML or nvidia-smi (ci/host/gpu.py) and CUDA_VISIBLE_DEVICES;
    AMD through the KFD topology under ``sys_root`` (ci/host/amdgpu.py, no ROCm
    tool needed on the host: the image has ROCm, the runner host may not) and
    ROCR_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES. Raises GpuDiscoveryError.
    """
    env = dict(os.environ if env is None else env)
    if profile.vendor == "amd":
        return amdgpu.visible(amdgpu.kfd_gpus(sys_root), env)
    if profile.vendor == "nvidia":
        return gpu.discover(env).visible
    return ()


def default_devices(profile: runners.Profile, visible: Sequence[int]) -> tuple[str, ...]:
    """The first ``profile.gpus`` of ``visible``; on a smaller machine, what a full runner gets (0..n-1)."""
    if profile.vendor not in GPU_VENDORS:
        return ()
    picked = list(visible)[: profile.gpus]
    if len(picked) < profile.gpus:
        # Dry runs and planning on a smaller machine: say what a full runner gets.
        picked = list(range(profile.gpus))
    return tuple(str(i) for i in picked)


def plan_devices(profile: runners.Profile, *, dry_run: bool, env: Mapping[str, str] | None = None,
                 sys_root: Path = amdgpu.SYS_ROOT) -> tuple[str, ...]:
    """The GPU ids `invoke ci` hands the container when it is given no ``--device``.

    A dry run on a planning machine without the profile's GPUs says what a
    full runner gets. A real run uses visible GPUs only: when it finds fewer
    than the profile needs it fails in one line naming the cause, rather than
    hand in GPUs a visibility variable left to another job on the host.
    """
    if profile.vendor not in GPU_VENDORS:
        return ()
    try:
        visible = visible_gpus(profile, env, sys_root=sys_root)
    except gpu.GpuDiscoveryError as exc:
        if not dry_run:
            raise
        log.debug("dry run: no %s GPUs found here (%s); planning a full runner's", profile.vendor, exc)
        visible = ()
    if not dry_run and len(visible) < profile.gpus:
        raise gpu.GpuDiscoveryError(f"profile {profile.name} needs {profile.gpus} {profile.vendor} GPU(s); "
                                    f"{len(visible)} visible here {list(visible)}")
    return default_devices(profile, visible)


def describe(vendor: str, device_ids: Sequence[str], *, sys_root: Path = amdgpu.SYS_ROOT,
             dev_root: Path = amdgpu.DEV_ROOT) -> str | None:
    """One line saying which device nodes AMD GPU indices become on this host; None for anything else.

    The start command names indices; this line shows what they resolve to
    here or, on a planning machine without KFD, why they cannot be yet.
    """
    if vendor != "amd" or not device_ids or not all(str(d).isdigit() for d in device_ids):
        return None
    shown = " ".join(map(str, device_ids))
    try:
        nodes = amdgpu.container_devices([int(d) for d in device_ids], sys_root=sys_root, dev_root=dev_root)
    except amdgpu.AmdGpuError as exc:
        return f"AMD GPUs {shown} get /dev/kfd and their render nodes at the start; not resolvable here: {exc}"
    return f"AMD GPUs {shown} -> {' '.join(map(str, nodes))} (KFD topology)"
