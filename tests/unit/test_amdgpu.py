"""ci.host.amdgpu against fake KFD topologies (tests/fakes/kfd.py): order, visibility, devices, errors."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ci.host import amdgpu
from ci.host.amdgpu import AmdGpuError
from ci.host.gpu import GpuDiscoveryError
from tests.fakes import kfd


@pytest.fixture
def host(tmp_path) -> kfd.FakeAmdHost:
    return kfd.make_host(tmp_path, gpus=8)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


def test_gpu_nodes_in_node_order_with_their_render_minors(host):
    gpus = amdgpu.kfd_gpus(host.sys_root)
    assert [g.index for g in gpus] == list(range(8))
    assert [g.node for g in gpus] == list(range(2, 10)), "the two CPU nodes are not GPUs"
    # MI300X minors step by 8: 128 + index would name GPU 1 by GPU 0's partition.
    assert [g.render_node for g in gpus] == [f"renderD{128 + 8 * i}" for i in range(8)]
    assert len({g.uuid for g in gpus}) == 8 and all(g.uuid.startswith("GPU-") for g in gpus)


def test_nodes_are_numbered_not_sorted_as_text(tmp_path):
    # 12 GPUs after 2 CPU nodes: nodes 2..13; "10" sorts before "2" as text.
    gpus = amdgpu.kfd_gpus(kfd.make_host(tmp_path, gpus=12).sys_root)
    assert [g.node for g in gpus] == list(range(2, 14))
    assert [g.render_minor for g in gpus] == sorted(g.render_minor for g in gpus)


def test_container_devices_are_kfd_then_the_allocated_render_nodes(host):
    got = amdgpu.container_devices([1, 3], sys_root=host.sys_root, dev_root=host.dev_root)
    assert got == (host.dev_root / "kfd", host.dev_root / "dri" / "renderD136", host.dev_root / "dri" / "renderD152")


@pytest.mark.parametrize("env, expected", [
    ({}, tuple(range(8))),
    ({"ROCR_VISIBLE_DEVICES": "4,5,6,7"}, (4, 5, 6, 7)),
    ({"HIP_VISIBLE_DEVICES": "2,0"}, (2, 0)),
    # HIP indexes what ROCR left: the second of 4..7 is physical 5.
    ({"ROCR_VISIBLE_DEVICES": "4,5,6,7", "HIP_VISIBLE_DEVICES": "1"}, (5,)),
    ({"CUDA_VISIBLE_DEVICES": "3"}, (3,)),  # HIP honours it when HIP_VISIBLE_DEVICES is unset
    ({"ROCR_VISIBLE_DEVICES": ""}, ()),
    ({"ROCR_VISIBLE_DEVICES": "1,9,2"}, (1,)),  # the list ends at the first GPU that is not there
])
def test_visible_follows_rocr_then_hip(host, env, expected):
    assert amdgpu.visible(amdgpu.kfd_gpus(host.sys_root), env) == expected


def test_visible_by_uuid(host):
    gpus = amdgpu.kfd_gpus(host.sys_root)
    assert amdgpu.visible(gpus, {"ROCR_VISIBLE_DEVICES": f"{gpus[6].uuid},{gpus[2].uuid}"}) == (6, 2)


def test_a_gpu_named_twice_is_an_error(host):
    with pytest.raises(AmdGpuError, match="names one device twice") as exc:
        amdgpu.visible(amdgpu.kfd_gpus(host.sys_root), {"ROCR_VISIBLE_DEVICES": "1,1"})
    _one_line(exc)


def test_no_topology_names_the_path_and_the_cause(tmp_path):
    with pytest.raises(AmdGpuError) as exc:
        amdgpu.kfd_gpus(tmp_path)
    assert _one_line(exc) == (f"no KFD topology at {tmp_path}/class/kfd/kfd/topology/nodes: "
                              "the amdgpu driver is not loaded on this host")
    assert isinstance(exc.value, GpuDiscoveryError)  # callers that handle discovery errors handle this one


def test_cpu_nodes_only_is_no_gpu(tmp_path):
    host = kfd.make_host(tmp_path, gpus=0)
    with pytest.raises(AmdGpuError, match=r"lists no GPU node \(2 CPU node\(s\) only\)") as exc:
        amdgpu.kfd_gpus(host.sys_root)
    _one_line(exc)


def test_more_gpus_than_the_topology_has(host):
    with pytest.raises(AmdGpuError) as exc:
        amdgpu.container_devices([6, 8, 9], sys_root=host.sys_root, dev_root=host.dev_root)
    assert _one_line(exc) == (f"asked for AMD GPU 8, 9 but the KFD topology at {host.sys_root}/class/kfd/kfd/"
                              "topology/nodes lists 8 GPU(s) (indices 0-7)")


def test_a_missing_render_node_is_named(host):
    host.render_node(2).unlink()
    with pytest.raises(AmdGpuError) as exc:
        amdgpu.container_devices([0, 2], sys_root=host.sys_root, dev_root=host.dev_root)
    assert _one_line(exc) == f"render node {host.render_node(2)} of AMD GPU 2 (KFD node 4) is missing"


def test_a_missing_kfd_device_is_named(host):
    (host.dev_root / "kfd").unlink()
    with pytest.raises(AmdGpuError, match=f"^{host.dev_root}/kfd is missing") as exc:
        amdgpu.container_devices([0], sys_root=host.sys_root, dev_root=host.dev_root)
    _one_line(exc)


@pytest.mark.parametrize("indices, needle", [([], "no AMD GPU indices given"), ([1, 1], "AMD GPU 1 given twice")])
def test_bad_index_lists(host, indices, needle):
    with pytest.raises(AmdGpuError, match=needle) as exc:
        amdgpu.container_devices(indices, sys_root=host.sys_root, dev_root=host.dev_root)
    _one_line(exc)


def test_a_gpu_without_render_minor_is_an_error(host):
    props = host.sys_root / amdgpu.KFD_NODES / "3" / "properties"
    props.write_text(props.read_text().replace("drm_render_minor 136\n", ""))
    with pytest.raises(AmdGpuError, match=r"KFD node 3 is a GPU \(simd_count 1216\) with no drm_render_minor") as exc:
        amdgpu.kfd_gpus(host.sys_root)
    _one_line(exc)


def test_a_malformed_line_names_file_and_line(host):
    props = host.sys_root / amdgpu.KFD_NODES / "2" / "properties"
    props.write_text("cpu_cores_count 0\nsimd_count lots\n")
    with pytest.raises(AmdGpuError) as exc:
        amdgpu.kfd_gpus(host.sys_root)
    assert _one_line(exc) == f"{props}:2: expected 'name integer', got 'simd_count lots'"


def test_an_unreadable_node_is_an_error_naming_it(host):
    node = host.sys_root / amdgpu.KFD_NODES / "5"
    shutil.rmtree(node)
    node.mkdir()  # a node directory without its properties file
    with pytest.raises(AmdGpuError, match=f"^cannot read {node}/properties: ") as exc:
        amdgpu.kfd_gpus(host.sys_root)
    _one_line(exc)


def test_a_node_hidden_by_the_device_cgroup_is_left_out_as_rocr_does(host, monkeypatch):
    # The kernel answers EPERM for a GPU outside the reader's device cgroup.
    # Root reads any file, so the refusal is simulated for node 3 only.
    hidden = host.sys_root / amdgpu.KFD_NODES / "3" / "properties"
    read = Path.read_text

    def read_text(self, *args, **kwargs):
        if self == hidden:
            raise PermissionError(1, "Operation not permitted")
        return read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    gpus = amdgpu.kfd_gpus(host.sys_root)
    assert [g.node for g in gpus] == [2, 4, 5, 6, 7, 8, 9]
    assert [g.index for g in gpus] == list(range(7)), "indices count the GPUs ROCr sees"
    assert gpus[1].render_node == "renderD144"
