"""ci.host.alloc: topology parsing, device choice for tp, LRU eviction plans."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from ci.host.alloc import IdleServer, NoCapacity, Plan, Topology, choose, parse_topo, plan

# `nvidia-smi topo -m` on an 8x H100 SXM box (NVSwitch: every pair NV18), two
# NUMA nodes, two NICs, written in the layout captured on the H200 below: the
# header underlined with ANSI escapes after its leading tab, and a double tab
# before "GPU NUMA ID".
TOPO_8X_NVSWITCH = (
    "\t\x1b[4mGPU0\tGPU1\tGPU2\tGPU3\tGPU4\tGPU5\tGPU6\tGPU7\tNIC0\tNIC1\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\n"
    "GPU0\t X \tNV18\tNV18\tNV18\tNV18\tNV18\tNV18\tNV18\tPXB\tSYS\t0-55,112-167\t0\t\tN/A\n"
    "GPU1\tNV18\t X \tNV18\tNV18\tNV18\tNV18\tNV18\tNV18\tPXB\tSYS\t0-55,112-167\t0\t\tN/A\n"
    "GPU2\tNV18\tNV18\t X \tNV18\tNV18\tNV18\tNV18\tNV18\tNODE\tSYS\t0-55,112-167\t0\t\tN/A\n"
    "GPU3\tNV18\tNV18\tNV18\t X \tNV18\tNV18\tNV18\tNV18\tNODE\tSYS\t0-55,112-167\t0\t\tN/A\n"
    "GPU4\tNV18\tNV18\tNV18\tNV18\t X \tNV18\tNV18\tNV18\tSYS\tPXB\t56-111,168-223\t1\t\tN/A\n"
    "GPU5\tNV18\tNV18\tNV18\tNV18\tNV18\t X \tNV18\tNV18\tSYS\tPXB\t56-111,168-223\t1\t\tN/A\n"
    "GPU6\tNV18\tNV18\tNV18\tNV18\tNV18\tNV18\t X \tNV18\tSYS\tNODE\t56-111,168-223\t1\t\tN/A\n"
    "GPU7\tNV18\tNV18\tNV18\tNV18\tNV18\tNV18\tNV18\t X \tSYS\tNODE\t56-111,168-223\t1\t\tN/A\n"
    "NIC0\tPXB\tPXB\tNODE\tNODE\tSYS\tSYS\tSYS\tSYS\t X \tSYS\n"
    "NIC1\tSYS\tSYS\tSYS\tSYS\tPXB\tPXB\tNODE\tNODE\tSYS\t X \n"
    "\n"
    "Legend:\n"
    "\n"
    "  X    = Self\n"
    "  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)\n"
    "  NODE = Connection traversing PCIe as well as the interconnect between PCIe Host Bridges within a NUMA node\n"
    "  PHB  = Connection traversing PCIe as well as a PCIe Host Bridge (typically the CPU)\n"
    "  PXB  = Connection traversing multiple PCIe bridges (without traversing the PCIe Host Bridge)\n"
    "  PIX  = Connection traversing at most a single PCIe bridge\n"
    "  NV#  = Connection traversing a bonded set of # NVLinks\n"
    "\n"
    "NIC Legend:\n"
    "\n"
    "  NIC0: mlx5_0\n"
    "  NIC1: mlx5_1\n"
)

# 4x PCIe cards with NVLink bridges on pairs (1,2) and (0,3), two NUMA nodes:
# the pairs are *not* consecutive, so "consecutive" alone would pick wrong.
TOPO_4X_BRIDGED = (
    "\tGPU0\tGPU1\tGPU2\tGPU3\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\n"
    "GPU0\t X \tPHB\tSYS\tNV4\t0-15\t0\t\tN/A\n"
    "GPU1\tPHB\t X \tNV4\tSYS\t0-15\t0\t\tN/A\n"
    "GPU2\tSYS\tNV4\t X \tPHB\t16-31\t1\t\tN/A\n"
    "GPU3\tNV4\tSYS\tPHB\t X \t16-31\t1\t\tN/A\n"
    "\n"
    "Legend:\n"
    "  NV#  = Connection traversing a bonded set of # NVLinks\n"
)

# 4x PCIe cards, no NVLink, NUMA 0,0,1,1.
TOPO_4X_PCIE = (
    "\tGPU0\tGPU1\tGPU2\tGPU3\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\n"
    "GPU0\t X \tNODE\tSYS\tSYS\t0-15\t0\t\tN/A\n"
    "GPU1\tNODE\t X \tSYS\tSYS\t0-15\t0\t\tN/A\n"
    "GPU2\tSYS\tSYS\t X \tNODE\t16-31\t1\t\tN/A\n"
    "GPU3\tSYS\tSYS\tNODE\t X \t16-31\t1\t\tN/A\n"
)

TOPO_1X = "\tGPU0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\nGPU0\t X \t0-15\t0\t\tN/A\n\nLegend:\n"
# Captured verbatim on the one-GPU H200 machine (bench/gpu_visible.py, driver 580.159.04):
# note the escape codes sit *after* the leading tab there.
TOPO_H200_CAPTURED = (
    "\t\x1b[4mGPU0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\nGPU0\t X \t0-15\t0\t\tN/A\n\nLegend:\n\n"
    "  X    = Self\n"
    "  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)\n"
    "  NODE = Connection traversing PCIe as well as the interconnect between PCIe Host Bridges within a NUMA node\n"
    "  PHB  = Connection traversing PCIe as well as a PCIe Host Bridge (typically the CPU)\n"
    "  PXB  = Connection traversing multiple PCIe bridges (without traversing the PCIe Host Bridge)\n"
    "  PIX  = Connection traversing at most a single PCIe bridge\n"
    "  NV#  = Connection traversing a bonded set of # NVLinks\n"
)


def test_parse_nvswitch_box():
    topo = parse_topo(TOPO_8X_NVSWITCH)
    assert topo.nvlinked(0, 7) and topo.nvlinked(3, 4)
    assert topo.links[frozenset((2, 5))] == "NV18"
    assert topo.numa == {0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1, 7: 1}
    assert len(topo.links) == 28  # GPU pairs only; NIC columns are not GPUs


def test_parse_bridged_pairs():
    topo = parse_topo(TOPO_4X_BRIDGED)
    assert topo.nvlinked(1, 2) and topo.nvlinked(0, 3)
    assert not topo.nvlinked(0, 1) and topo.links[frozenset((0, 1))] == "PHB"


def test_parse_captured_h200_output():
    assert parse_topo(TOPO_H200_CAPTURED) == Topology({}, {0: 0})


def test_parse_single_gpu_and_na_numa():
    assert parse_topo(TOPO_1X) == Topology({}, {0: 0})
    topo = parse_topo(TOPO_1X.replace("\t0\t\tN/A", "\tN/A\t\tN/A"))
    assert topo.numa == {0: None}


@pytest.mark.parametrize("text", ["", "NVIDIA-SMI has failed because it couldn't communicate with the driver\n",
                                  "GPU0\tGPU1\n"])
def test_parse_garbage_raises(text):
    with pytest.raises(ValueError, match="nvidia-smi topo -m"):
        parse_topo(text)


@pytest.mark.parametrize("free,tp,expected", [
    ([0, 1, 2, 3], 1, (0,)),
    ([0, 2, 3, 5], 2, (2, 3)),        # consecutive beats lowest
    ([0, 2, 4], 2, (0, 2)),           # no consecutive pair: lowest
    ([5, 1, 3, 2], 3, (1, 2, 3)),
    ([0, 1], 3, None),                # too few
    ([], 1, None),
    ([0, 1], 0, ()),                  # a CPU server needs no GPU
])
def test_choose_without_topology(free, tp, expected):
    assert choose(free, tp) == expected


def test_nvlink_pair_beats_consecutive():
    topo = parse_topo(TOPO_4X_BRIDGED)
    assert choose([0, 1, 2, 3], 2, topo) == (1, 2)  # both pairs cross NUMA; (1,2) is consecutive
    assert choose([0, 1, 3], 2, topo) == (0, 3)     # NVLink beats the consecutive PHB pair (0,1)
    assert choose([0, 2, 3], 2, topo) == (0, 3)     # ... and the consecutive same-NUMA pair (2,3)


def test_same_numa_beats_consecutive_across_nodes():
    topo = parse_topo(TOPO_8X_NVSWITCH)
    # All pairs are NVLinked; (4,5,6,7) stays on NUMA node 1, (2,3,4,5) would straddle.
    assert choose([2, 3, 4, 5, 6, 7], 4, topo) == (4, 5, 6, 7)
    assert choose([1, 3, 4, 5], 2, topo) == (4, 5)
    assert choose([1, 3, 4], 2, topo) == (1, 3)  # same node, not consecutive, beats crossing nodes


def test_pcie_only_prefers_numa_then_consecutive():
    topo = parse_topo(TOPO_4X_PCIE)
    assert choose([1, 2, 3], 2, topo) == (2, 3)
    assert choose([0, 1, 2, 3], 4, topo) == (0, 1, 2, 3)


def test_huge_pool_falls_back_to_windows_fast():
    start = time.monotonic()
    assert choose(range(40), 8) == tuple(range(8))
    assert time.monotonic() - start < 1.0


def test_negative_tp_rejected():
    with pytest.raises(ValueError, match="tp"):
        choose([0], -1)


IDLE = [IdleServer("new", (2, 3), last_used=300.0), IdleServer("old", (0,), last_used=100.0),
        IdleServer("mid", (1,), last_used=200.0)]


def test_plan_without_eviction_when_free_devices_fit():
    assert plan([4, 5], 2, idle=IDLE) == Plan((4, 5), ())


def test_plan_evicts_least_recently_used_first():
    assert plan([], 1, idle=IDLE) == Plan((0,), ("old",))
    assert plan([], 2, idle=IDLE) == Plan((0, 1), ("old", "mid"))
    assert plan([4], 2, idle=IDLE) == Plan((0, 4), ("old",))


def test_plan_evicts_until_topology_constraint_is_met_by_count():
    topo = parse_topo(TOPO_4X_BRIDGED)
    idle = [IdleServer("a", (0,), 1.0), IdleServer("b", (1,), 2.0)]
    assert plan([3], 2, idle=idle, topology=topo) == Plan((0, 3), ("a",))


def test_plan_raises_when_even_evicting_everything_is_short():
    with pytest.raises(NoCapacity, match=r"need 8 GPU\(s\): 1 free and 4 held by 3 idle server\(s\)"):
        plan([7], 8, idle=IDLE)


def test_plan_rejects_inconsistent_input():
    with pytest.raises(ValueError, match="holds devices reported free"):
        plan([0], 2, idle=IDLE)


def test_real_two_gpu_h200_capture_parses_as_nvlinked():
    # Captured with `nvidia-smi topo -m` on a 2 x H200 device machine (docs/gpu-verification.md).
    text = (Path(__file__).resolve().parents[1] / "fixtures" / "topo" / "h200x2.txt").read_text()
    topo = parse_topo(text)
    assert topo.nvlinked(0, 1)
    assert dict(topo.numa) == {0: 0, 1: 0}
    assert choose({0, 1}, 2, topo) == (0, 1)
