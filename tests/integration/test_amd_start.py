"""The AMD start on the real Docker engine: `invoke start`'s code path hands in exactly the planned devices.

No AMD GPU is reachable from CI (nor from the device machine, H100/H200
only), so the host is a fake one (tests/fakes/kfd.py): the KFD topology of an
8-GPU MI300X box under a temp sysfs root, and real character devices (made
with mknod, /dev/null's numbers) under a temp /dev root. The rest is real:
the plan (ci.images.device_plan), the container spec the chain builds, the
start `invoke start` runs (containers.cleanup_stale + containers.start),
dockerd, and the device nodes it creates inside the container.
"""
from __future__ import annotations

import secrets
import tempfile
from pathlib import Path

import pytest

from ci import chain
from ci.images import containers
from ci.images import device_plan
from ci.profiles import runners
from tests.fakes import kfd

pytestmark = [pytest.mark.docker, pytest.mark.timeout(120)]

# Short: the keep-alive ends at once on SIGTERM; past this docker kills it.
STOP_S = 5.0
# The container lists every character device it got under /dev/kfd and /dev/dri with
# shell builtins only (the test image holds sh, sleep and cat, no ls).
LIST_DEVICES = 'for f in /dev/kfd /dev/dri/*; do [ -c "$f" ] && echo "$f"; done; true'


@pytest.fixture
def scratch():
    """A temp dir for the test's fake host, workspace and logs, removed after it (device nodes too)."""
    with tempfile.TemporaryDirectory(prefix="kiln-amd-") as root:
        yield Path(root)


@pytest.fixture
def amd_host(scratch):
    """A fake 8-GPU MI300X host with real device nodes."""
    return kfd.make_host(scratch / "host", gpus=8, device_nodes=True)


@pytest.fixture
def started():
    """Stops (and so removes) every container the test started, whatever the test did."""
    handles: list[containers.Container] = []
    yield handles
    for handle in handles:
        handle.stop(STOP_S)


def _spec(opts: chain.Options) -> containers.ContainerSpec:
    args = chain.container_spec_args(opts, {})
    # The chain's keep-alive (`sh -c 'trap ...; sleep infinity & wait'`) runs as is; only the engine
    # image's entrypoint override goes, since the test image has no /usr/bin/env.
    return containers.ContainerSpec(**{**args, "entrypoint": None})


def test_amd_start_hands_in_kfd_and_the_render_nodes_of_the_planned_gpus(docker_env, docker_client, amd_host,
                                                                         scratch, started):
    profile = runners.get_profile("mi300-2")
    # A job on a shared host, given the upper GPUs: the plan must stay inside them.
    devices = device_plan.plan_devices(profile, dry_run=False, env={"ROCR_VISIBLE_DEVICES": "5,6,7"},
                                       sys_root=amd_host.sys_root)
    assert devices == ("5", "6")
    tag = f"amd-{secrets.token_hex(3)}"
    opts = chain.Options(profile=profile, image=docker_env.run_image, devices=devices, workspace=scratch,
                         run_tag=tag, sys_root=amd_host.sys_root, dev_root=amd_host.dev_root)
    spec = _spec(opts)

    # What `invoke start IMAGE --vendor amd --device 5 --device 6` runs, with the fake host's roots.
    containers.cleanup_stale(docker_client, tag)
    handle = containers.start(docker_client, spec, log_dir=scratch / "logs",
                              dev_root=amd_host.dev_root, sys_root=amd_host.sys_root)
    started.append(handle)

    host_config = docker_client.api.inspect_container(handle.id)["HostConfig"]
    print("docker inspect HostConfig.Devices:", host_config["Devices"])
    gpu5, gpu6 = amd_host.render_node(5), amd_host.render_node(6)
    assert (gpu5.name, gpu6.name) == ("renderD168", "renderD176")  # MI300X minors: 128 + 8 * index
    assert host_config["Devices"] == [
        {"PathOnHost": str(amd_host.dev_root / "kfd"), "PathInContainer": "/dev/kfd", "CgroupPermissions": "rwm"},
        {"PathOnHost": str(gpu5), "PathInContainer": "/dev/dri/renderD168", "CgroupPermissions": "rwm"},
        {"PathOnHost": str(gpu6), "PathInContainer": "/dev/dri/renderD176", "CgroupPermissions": "rwm"},
    ]
    assert host_config["GroupAdd"] == [str((amd_host.dev_root / "kfd").stat().st_gid)]
    assert not host_config.get("DeviceRequests"), "an AMD container gets no NVIDIA device request"

    # Inside, exactly those nodes exist, as character devices: no other GPU of the host.
    code, output = handle.container.exec_run(["/bin/sh", "-c", LIST_DEVICES])
    assert code == 0, output
    assert output.decode().split() == ["/dev/kfd", "/dev/dri/renderD168", "/dev/dri/renderD176"]

    assert handle.stop(STOP_S) == 0, "the keep-alive ends on SIGTERM"
    assert not docker_client.containers.list(all=True, filters={"label": f"{containers.LABEL_RUN_TAG}={tag}"})


def test_amd_start_on_a_host_without_kfd_fails_in_one_line_and_creates_nothing(docker_env, docker_client,
                                                                               scratch, started):
    profile = runners.get_profile("mi300-2")
    tag = f"amd-{secrets.token_hex(3)}"
    no_sys, dev = scratch / "sys", scratch / "dev"
    dev.mkdir()
    # The indices a dry run planned elsewhere, pasted on a host with no amdgpu driver.
    opts = chain.Options(profile=profile, image=docker_env.run_image, devices=("0", "1"), workspace=scratch,
                         run_tag=tag, sys_root=no_sys, dev_root=dev)

    with pytest.raises(containers.ContainerError) as exc:
        started.append(containers.start(docker_client, _spec(opts), log_dir=scratch / "logs",
                                        dev_root=dev, sys_root=no_sys))
    assert str(exc.value) == (f"no KFD topology at {no_sys}/class/kfd/kfd/topology/nodes: "
                              "the amdgpu driver is not loaded on this host")
    assert not docker_client.containers.list(all=True, filters={"label": f"{containers.LABEL_RUN_TAG}={tag}"})
