"""ci.images.device_plan: which GPU ids `invoke ci` plans for a profile, on a full AMD runner (a fake
KFD host, tests/fakes/kfd.py) and on a planning machine without one."""
from __future__ import annotations

import pytest

from ci.host.amdgpu import AmdGpuError
from ci.host.gpu import GpuDiscoveryError
from ci.images import device_plan
from ci.profiles import runners
from tests.fakes import kfd

MI300_2 = runners.get_profile("mi300-2")
MI300_4 = runners.get_profile("mi300-4")
MI325_8 = runners.get_profile("mi325-8")


@pytest.fixture
def host(tmp_path) -> kfd.FakeAmdHost:
    return kfd.make_host(tmp_path, gpus=8)


@pytest.mark.parametrize("dry_run", [True, False])
def test_amd_plans_the_first_visible_gpus_of_the_kfd_topology(host, dry_run):
    assert device_plan.plan_devices(MI300_2, dry_run=dry_run, env={}, sys_root=host.sys_root) == ("0", "1")
    assert device_plan.plan_devices(MI325_8, dry_run=dry_run, env={}, sys_root=host.sys_root) == tuple(
        str(i) for i in range(8))


def test_amd_plan_honours_the_visibility_variables(host):
    # Two 4-GPU jobs on one 8-GPU host: this one was given the upper half.
    env = {"ROCR_VISIBLE_DEVICES": "4,5,6,7"}
    assert device_plan.plan_devices(MI300_4, dry_run=False, env=env, sys_root=host.sys_root) == ("4", "5", "6", "7")
    env = {"HIP_VISIBLE_DEVICES": "6,7"}
    assert device_plan.plan_devices(MI300_2, dry_run=False, env=env, sys_root=host.sys_root) == ("6", "7")


def test_a_real_run_with_too_few_visible_gpus_fails_instead_of_taking_another_jobs(host):
    with pytest.raises(GpuDiscoveryError) as exc:
        device_plan.plan_devices(MI300_4, dry_run=False, env={"ROCR_VISIBLE_DEVICES": "6,7"}, sys_root=host.sys_root)
    assert str(exc.value) == "profile mi300-4 needs 4 amd GPU(s); 2 visible here [6, 7]"


def test_dry_run_without_kfd_plans_what_a_full_runner_gets(tmp_path):
    # The planning machine (this one, a laptop, CI) has no AMD GPU: say what a runner gets.
    assert device_plan.plan_devices(MI300_2, dry_run=True, env={}, sys_root=tmp_path) == ("0", "1")


def test_real_run_without_kfd_fails_naming_the_cause(tmp_path):
    with pytest.raises(AmdGpuError) as exc:
        device_plan.plan_devices(MI300_2, dry_run=False, env={}, sys_root=tmp_path)
    assert str(exc.value) == (f"no KFD topology at {tmp_path}/class/kfd/kfd/topology/nodes: "
                              "the amdgpu driver is not loaded on this host")


def test_cpu_gets_no_devices(tmp_path):
    assert device_plan.plan_devices(runners.get_profile("cpu"), dry_run=False, env={}, sys_root=tmp_path) == ()


def test_default_devices_takes_the_first_visible_or_a_full_runners():
    assert device_plan.default_devices(MI300_2, (5, 3, 1)) == ("5", "3")
    assert device_plan.default_devices(MI300_4, (5,)) == ("0", "1", "2", "3")
    assert device_plan.default_devices(runners.get_profile("h100-2"), (7, 6)) == ("7", "6")


def test_describe_says_which_nodes_the_indices_become(host):
    line = device_plan.describe("amd", ["4", "5"], sys_root=host.sys_root, dev_root=host.dev_root)
    assert line == (f"AMD GPUs 4 5 -> {host.dev_root}/kfd {host.dev_root}/dri/renderD160 "
                    f"{host.dev_root}/dri/renderD168 (KFD topology)")


def test_describe_on_a_planning_machine_says_why_not_yet(tmp_path):
    line = device_plan.describe("amd", ["0", "1"], sys_root=tmp_path, dev_root=tmp_path / "dev")
    assert line.startswith("AMD GPUs 0 1 get /dev/kfd and their render nodes at the start; "
                           "not resolvable here: no KFD topology at ")
    assert device_plan.describe("nvidia", ["0"]) is None
    assert device_plan.describe("amd", ["renderD128"]) is None  # named nodes need no resolving
