"""ci/images/containers.py without an engine: device requests per vendor, mounts, labels, run tags."""
from __future__ import annotations

import os
from pathlib import Path

import docker.types
import pytest

from ci.images import container_devices, containers
from tests.fakes import kfd


@pytest.fixture
def dev(tmp_path) -> Path:
    """A fake /dev: regular files stand in for device nodes (only existence and gid are read)."""
    root = tmp_path / "dev"
    (root / "dri").mkdir(parents=True)
    for name in ("kfd", "dri/renderD128", "dri/renderD129", "dri/renderD130"):
        (root / name).touch()
    return root


def test_nvidia_gets_a_device_request_for_exactly_the_allocated_ids(dev):
    opts = container_devices.device_options("nvidia", ["2", "3"], dev_root=dev)
    (req,) = opts["device_requests"]
    assert isinstance(req, docker.types.DeviceRequest)
    assert req.device_ids == ["2", "3"] and req.capabilities == [["gpu"]]
    assert req.count in (None, 0)  # never "all GPUs" (-1)
    assert "devices" not in opts


def test_nvidia_uuids_pass_through(dev):
    uuid = "GPU-3d93a8b4-0000-1111-2222-333344445555"
    assert container_devices.device_options("nvidia", [uuid], dev_root=dev)["device_requests"][0].device_ids == [uuid]


def test_amd_gets_kfd_and_the_allocated_render_nodes(dev):
    opts = container_devices.device_options("amd", ["renderD129", "renderD130"], dev_root=dev)
    assert opts["devices"] == [
        f"{dev}/kfd:/dev/kfd:rwm",
        f"{dev}/dri/renderD129:/dev/dri/renderD129:rwm",
        f"{dev}/dri/renderD130:/dev/dri/renderD130:rwm",
    ]
    assert f"{dev}/dri/renderD128:/dev/dri/renderD128:rwm" not in opts["devices"]  # not allocated
    assert opts["group_add"] == [str(os.getgid())]
    assert "device_requests" not in opts


def test_amd_accepts_full_render_paths(dev):
    opts = container_devices.device_options("amd", ["/dev/dri/renderD128"], dev_root=dev)
    assert opts["devices"][1] == f"{dev}/dri/renderD128:/dev/dri/renderD128:rwm"


@pytest.mark.parametrize("ids, needle", [(["card1"], "expected a GPU index .* or a render node"),
                                         (["renderD140"], "missing"), (["renderD12"], "minor 128-255"),
                                         (["0", "renderD128"], "mix GPU indices and render nodes")])
def test_amd_bad_or_missing_nodes_are_clear_errors(dev, tmp_path, ids, needle):
    with pytest.raises(containers.ContainerError, match=needle):
        container_devices.device_options("amd", ids, dev_root=dev, sys_root=tmp_path / "sys")


def test_amd_gpu_indices_become_kfd_and_their_render_nodes(tmp_path):
    host = kfd.make_host(tmp_path, gpus=4)
    opts = container_devices.device_options("amd", ["1", "3"], dev_root=host.dev_root, sys_root=host.sys_root)
    # MI300X minors step by 8: GPU 1 is renderD136, not renderD129.
    assert opts["devices"] == [f"{host.dev_root}/kfd:/dev/kfd:rwm",
                               f"{host.dev_root}/dri/renderD136:/dev/dri/renderD136:rwm",
                               f"{host.dev_root}/dri/renderD152:/dev/dri/renderD152:rwm"]
    assert opts["group_add"] == [str(os.getgid())]


def test_amd_gpu_indices_on_a_host_without_kfd_name_the_cause(dev, tmp_path):
    with pytest.raises(containers.ContainerError) as exc:
        container_devices.device_options("amd", ["0"], dev_root=dev, sys_root=tmp_path / "sys")
    assert str(exc.value) == (f"no KFD topology at {tmp_path}/sys/class/kfd/kfd/topology/nodes: "
                              "the amdgpu driver is not loaded on this host")


def test_amd_gpu_index_past_the_topology(tmp_path):
    host = kfd.make_host(tmp_path, gpus=2)
    with pytest.raises(containers.ContainerError, match="asked for AMD GPU 2 but the KFD topology .* lists 2 GPU"):
        container_devices.device_options("amd", ["0", "2"], dev_root=host.dev_root, sys_root=host.sys_root)


def test_amd_without_kfd_is_an_error(dev):
    (dev / "kfd").unlink()
    with pytest.raises(containers.ContainerError, match="kfd"):
        container_devices.device_options("amd", ["renderD128"], dev_root=dev)


@pytest.mark.parametrize("vendor, ids, needle", [("nvidia", [], "no device ids"), ("amd", [], "no device ids"),
                                                 ("cpu", ["0"], "no GPUs"), ("intel", [], "unknown vendor")])
def test_vendor_and_ids_must_agree(dev, vendor, ids, needle):
    with pytest.raises(containers.ContainerError, match=needle):
        container_devices.device_options(vendor, ids, dev_root=dev)


def test_infiniband_is_added_whenever_present(dev):
    assert container_devices.device_options("cpu", [], dev_root=dev) == {}
    (dev / "infiniband").mkdir()
    for vendor, ids in (("cpu", []), ("nvidia", ["0"]), ("amd", ["renderD128"])):
        opts = container_devices.device_options(vendor, ids, dev_root=dev)
        assert f"{dev}/infiniband:/dev/infiniband:rwm" in opts["devices"]
        assert opts["cap_add"] == ["IPC_LOCK"]
        assert opts["ulimits"][0]["Name"] == "memlock" and opts["ulimits"][0]["Hard"] == -1


def test_mounts(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "ws").mkdir()
    opts = containers.mount_options({str(tmp_path / "hf"): "/root/.cache/huggingface:ro",
                                     str(tmp_path / "ws"): "/workspace"})
    assert opts["volumes"] == {str(tmp_path / "hf"): {"bind": "/root/.cache/huggingface", "mode": "ro"},
                               str(tmp_path / "ws"): {"bind": "/workspace", "mode": "rw"}}
    assert containers.mount_options({}) == {}
    with pytest.raises(containers.ContainerError, match="does not exist"):
        containers.mount_options({str(tmp_path / "typo"): "/x"})
    with pytest.raises(containers.ContainerError, match="bad mount target"):
        containers.mount_options({str(tmp_path / "hf"): "relative:ro"})
    with pytest.raises(containers.ContainerError, match="bad mount target"):
        containers.mount_options({str(tmp_path / "hf"): "/x:rx"})


def test_container_kwargs_labels_and_everything_else(dev, tmp_path):
    spec = containers.ContainerSpec(image="img:1", run_tag="gh-42-1", command=["serve", "--port", "3000"],
                                    vendor="nvidia", device_ids=["0"], shm_size="16g", env={"HF_HOME": "/hf"},
                                    runner="h100-a", name="kiln-engine-0")
    kw = containers.container_kwargs(spec, dev_root=dev)
    assert kw["labels"] == {containers.LABEL_MANAGED: "1", containers.LABEL_RUN_TAG: "gh-42-1",
                            containers.LABEL_RUNNER: "h100-a"}
    assert kw["command"] == ["serve", "--port", "3000"] and kw["shm_size"] == "16g"
    assert kw["environment"] == {"HF_HOME": "/hf"} and kw["name"] == "kiln-engine-0"
    assert kw["network_mode"] == "host" and kw["device_requests"][0].device_ids == ["0"]
    generated = containers.container_kwargs(containers.ContainerSpec(image="i", run_tag="t1"), dev_root=dev)
    assert generated["name"].startswith("kiln-t1-") and "shm_size" not in generated


@pytest.mark.parametrize("tag", ["", "-x", "a b", "x" * 129, "tag/with/slash"])
def test_bad_run_tags(tag):
    with pytest.raises(containers.ContainerError, match="bad run tag"):
        containers.check_run_tag(tag)


def test_run_tag_from_env():
    assert containers.run_tag_from_env({containers.RUN_TAG_ENV: "mine"}) == "mine"
    assert containers.run_tag_from_env({"GITHUB_RUN_ID": "99", "GITHUB_RUN_ATTEMPT": "2"}) == "gh-99-2"
    assert containers.run_tag_from_env({}) == "local"
    with pytest.raises(containers.ContainerError):
        containers.run_tag_from_env({containers.RUN_TAG_ENV: "bad tag"})


def test_parse_assignments():
    assert containers.parse_assignments(["A=1", "B=x=y", "C="], "--env") == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(containers.ContainerError, match="bad --mount 'nope': expected KEY=VALUE"):
        containers.parse_assignments(["nope"], "--mount")
    with pytest.raises(containers.ContainerError, match="bad --env"):
        containers.parse_assignments(["=v"], "--env")


def test_tail_reads_last_lines(tmp_path):
    path = tmp_path / "x.log"
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    assert containers.tail(path, 3) == "line 97\nline 98\nline 99"
    assert containers.tail(tmp_path / "absent.log") == ""
