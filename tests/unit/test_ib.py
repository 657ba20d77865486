"""ci.host.ib on fake sysfs trees built under tmp_path (no monkeypatching)."""
from __future__ import annotations

import json
from pathlib import Path

from ci.host import ib

STATES = {"ACTIVE": "4: ACTIVE", "DOWN": "1: DOWN", "INIT": "2: INIT"}


def add_port(root: Path, device: str, port: int, state: str, link_layer: str | None,
             rate: str = "400 Gb/sec (4X NDR)") -> None:
    d = root / "class/infiniband" / device / "ports" / str(port)
    d.mkdir(parents=True)
    (d / "state").write_text(STATES[state] + "\n")
    if link_layer is not None:
        (d / "link_layer").write_text(link_layer + "\n")
    (d / "rate").write_text(rate + "\n")


def names(rails):
    return [f"{r.device}:{r.port}" for r in rails]


def test_ib_before_roce_all_rails_in_natural_order(tmp_path):
    # sglang #24222's runner: native IB rails mixed with RoCE ones.
    add_port(tmp_path, "mlx5_eth0", 1, "ACTIVE", "Ethernet", "200 Gb/sec (4X HDR)")
    add_port(tmp_path, "mlx5_ib10", 1, "ACTIVE", "InfiniBand")
    add_port(tmp_path, "mlx5_ib2", 1, "ACTIVE", "InfiniBand")
    add_port(tmp_path, "mlx5_eth1", 1, "ACTIVE", "Ethernet")
    add_port(tmp_path, "mlx5_ib0", 1, "ACTIVE", "InfiniBand")
    rails = ib.active_rails(tmp_path)
    assert names(rails) == ["mlx5_ib0:1", "mlx5_ib2:1", "mlx5_ib10:1", "mlx5_eth0:1", "mlx5_eth1:1"]
    assert ib.preferred_devices(rails) == ["mlx5_ib0", "mlx5_ib2", "mlx5_ib10"]


def test_down_and_init_ports_are_dropped(tmp_path):
    add_port(tmp_path, "mlx5_0", 1, "DOWN", "InfiniBand")
    add_port(tmp_path, "mlx5_1", 1, "INIT", "InfiniBand")
    add_port(tmp_path, "mlx5_2", 1, "ACTIVE", "Ethernet")
    assert [p.state for p in ib.list_ports(tmp_path)] == ["DOWN", "INIT", "ACTIVE"]
    rails = ib.active_rails(tmp_path)
    assert names(rails) == ["mlx5_2:1"]
    assert ib.preferred_devices(rails) == ["mlx5_2"]  # RoCE only when no native IB is up


def test_multi_port_device_and_port_order(tmp_path):
    add_port(tmp_path, "mlx5_0", 2, "ACTIVE", "InfiniBand")
    add_port(tmp_path, "mlx5_0", 1, "ACTIVE", "InfiniBand")
    add_port(tmp_path, "mlx5_0", 10, "DOWN", "InfiniBand")
    rails = ib.active_rails(tmp_path)
    assert names(rails) == ["mlx5_0:1", "mlx5_0:2"]
    assert ib.preferred_devices(rails) == ["mlx5_0"]


def test_no_devices(tmp_path):
    assert ib.active_rails(tmp_path) == []
    (tmp_path / "class/infiniband").mkdir(parents=True)
    assert ib.active_rails(tmp_path) == []
    assert ib.preferred_devices([]) == []
    assert ib.describe([]) == "no ACTIVE RDMA ports"


def test_unreadable_link_layer_sorts_after_native_ib(tmp_path, caplog):
    add_port(tmp_path, "mlx5_0", 1, "ACTIVE", None)
    add_port(tmp_path, "mlx5_1", 1, "ACTIVE", "InfiniBand")
    rails = ib.active_rails(tmp_path)
    assert names(rails) == ["mlx5_1:1", "mlx5_0:1"] and rails[1].link_layer == ""
    assert "link_layer" in caplog.text


def test_device_without_ports_dir_is_skipped(tmp_path):
    (tmp_path / "class/infiniband/mlx5_bad").mkdir(parents=True)
    add_port(tmp_path, "mlx5_0", 1, "ACTIVE", "InfiniBand")
    assert names(ib.active_rails(tmp_path)) == ["mlx5_0:1"]


def test_describe_and_json(tmp_path):
    add_port(tmp_path, "mlx5_eth0", 1, "ACTIVE", "Ethernet", "100 Gb/sec (4X EDR)")
    add_port(tmp_path, "mlx5_ib0", 1, "ACTIVE", "InfiniBand")
    rails = ib.active_rails(tmp_path)
    text = ib.describe(rails)
    assert text.splitlines()[0] == "mlx5_ib0:1  InfiniBand  ACTIVE  400 Gb/sec (4X NDR)"
    assert text.splitlines()[-1] == "preferred: mlx5_ib0"
    data = json.loads(ib.to_json(rails))
    assert data["preferred"] == ["mlx5_ib0"]
    assert [r["link_layer"] for r in data["rails"]] == ["InfiniBand", "Ethernet"]
