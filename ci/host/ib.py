"""InfiniBand rails: which RDMA ports are up, native IB first.

sglang #24222: PD (prefill/decode) KV transfer picked ``mlx5_eth*`` (RoCE)
ports on a runner that also had native ``mlx5_ib*`` ports, and every decode
request failed with HTTP 500. So: enumerate /sys/class/infiniband/*/ports/*,
keep ACTIVE ports only, native InfiniBand link layer before Ethernet (RoCE),
and every rail in a stable natural order (mlx5_2 before mlx5_10).

Everything takes ``sysfs_root`` so tests build fake trees in a temp dir.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

NATIVE_IB = "InfiniBand"


@dataclass(frozen=True)
class IbPort:
    """One port of one RDMA device, as sysfs describes it."""

    device: str       # e.g. "mlx5_0"
    port: int         # 1-based, as in sysfs
    state: str        # "ACTIVE", "DOWN", "INIT", ... ("" when unreadable)
    link_layer: str   # "InfiniBand" or "Ethernet" (RoCE); "" when unreadable
    rate: str = ""    # e.g. "400 Gb/sec (4X NDR)"

    @property
    def native(self) -> bool:
        return self.link_layer == NATIVE_IB


def _natural(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
        return ""


def list_ports(sysfs_root: str | Path = "/sys") -> list[IbPort]:
    """Every port under <sysfs_root>/class/infiniband, in natural device/port order."""
    base = Path(sysfs_root, "class", "infiniband")
    if not base.is_dir():
        log.info("no %s: no RDMA devices", base)
        return []
    ports = []
    for dev in sorted(base.iterdir(), key=lambda p: _natural(p.name)):
        port_dir = dev / "ports"
        if not port_dir.is_dir():
            log.warning("%s has no ports/ directory; skipping it", dev)
            continue
        for p in sorted((x for x in port_dir.iterdir() if x.name.isdigit()), key=lambda x: int(x.name)):
            # state reads "4: ACTIVE"; the number is the IB spec's code, the word is what we need.
            state = _read(p / "state").partition(":")[2].strip() or _read(p / "state")
            ports.append(IbPort(dev.name, int(p.name), state, _read(p / "link_layer"), _read(p / "rate")))
    return ports


def active_rails(sysfs_root: str | Path = "/sys") -> list[IbPort]:
    """ACTIVE ports, native InfiniBand first, then Ethernet/RoCE, each in natural order."""
    active = [p for p in list_ports(sysfs_root) if p.state == "ACTIVE"]
    return sorted(active, key=lambda p: (not p.native, _natural(p.device), p.port))


def preferred_devices(rails: list[IbPort]) -> list[str]:
    """Device names for an engine's IB-device flag: native IB only when any is up, else RoCE.

    Mixing RoCE rails into a native-IB transfer is what broke PD in sglang #24222.
    """
    chosen = [r for r in rails if r.native] or list(rails)
    return list(dict.fromkeys(r.device for r in chosen))


def describe(rails: list[IbPort]) -> str:
    """Human lines for `invoke ib`."""
    if not rails:
        return "no ACTIVE RDMA ports"
    lines = [f"{r.device}:{r.port}  {r.link_layer or 'unknown'}  {r.state}  {r.rate}".rstrip() for r in rails]
    lines.append(f"preferred: {','.join(preferred_devices(rails))}")
    return "\n".join(lines)


def to_json(rails: list[IbPort]) -> str:
    """JSON for `invoke ib --json`: the rails and the preferred device list."""
    return json.dumps({"rails": [asdict(r) for r in rails], "preferred": preferred_devices(rails)},
                      indent=2)
