"""Running the vendor command-line tools and parsing what they print.

ci/host/gpu.py asks NVML (or amdsmi) first; these are the second line: the
``nvidia-smi``, ``amd-smi`` and ``rocm-smi`` binaries. Every parser here is a
pure function of the tool's text, so tests feed it captured samples, and every
parse failure raises ``SmiError`` naming the tool and what was wrong. A tool
that prints garbage must never read as "0 GPUs".
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)

# nvidia-smi answers in well under a second on a healthy host; when the driver
# is wedged (Xid errors, a GPU fallen off the bus) it blocks for minutes. Ten
# seconds turns that hang into a loud discovery error instead of a stuck job.
SMI_TIMEOUT_S = 10.0
# After the timeout the tool's process group is killed; this bounds the wait
# for it to be reaped so a process in uninterruptible sleep cannot hang us too.
SMI_REAP_TIMEOUT_S = 2.0
MIB = 1024 * 1024

NVIDIA_SMI_QUERY = [
    "--query-gpu=index,uuid,name,memory.total,memory.used",
    "--format=csv,noheader,nounits",
]
NVIDIA_SMI_APPS_QUERY = [
    "--query-compute-apps=gpu_uuid,pid,used_memory",
    "--format=csv,noheader,nounits",
]
ROCM_SMI_QUERY = ["--showuniqueid", "--showproductname", "--showmeminfo", "vram", "--json"]


class SmiError(RuntimeError):
    """A vendor tool hung, failed or printed something we cannot parse."""


@dataclass(frozen=True)
class SmiRow:
    """One GPU as a command-line tool reports it (bytes, physical index)."""

    index: int
    uuid: str
    name: str
    memory_total: int
    memory_used: int


def run_tool(argv: Sequence[str], timeout_s: float = SMI_TIMEOUT_S,
             env: Mapping[str, str] | None = None) -> str:
    """Run a vendor tool and return its stdout; raise SmiError on any failure.

    The tool runs in its own session so that on timeout its whole process
    group (which kiln started) is killed, not just the first process.
    """
    name = os.path.basename(argv[0])
    try:
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    except OSError as exc:
        raise SmiError(f"{name}: cannot run: {exc}") from exc
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.communicate(timeout=SMI_REAP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) not reaped %.1fs after SIGKILL", name, proc.pid,
                        SMI_REAP_TIMEOUT_S)
        raise SmiError(f"{name}: no answer within {timeout_s:g}s (hung driver?)") from None
    if proc.returncode != 0:
        tail = (err or out or "").strip().splitlines()[-1:] or ["no output"]
        raise SmiError(f"{name}: exit status {proc.returncode}: {tail[0]}")
    return out


def _int(value: str, what: str, tool: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise SmiError(f"{tool}: {what} {value.strip()!r} is not an integer") from None


def parse_nvidia_smi_gpus(text: str) -> list[SmiRow]:
    """Parse ``nvidia-smi`` output for NVIDIA_SMI_QUERY (memory in MiB)."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 5:
            raise SmiError(f"nvidia-smi: expected 5 CSV fields, got {len(cells)}: {line.strip()[:80]!r}")
        index, uuid, name, total, used = cells
        if not uuid.startswith(("GPU-", "MIG-")):
            raise SmiError(f"nvidia-smi: {uuid[:40]!r} is not a GPU UUID")
        rows.append(SmiRow(
            index=_int(index, "index", "nvidia-smi"), uuid=uuid, name=name,
            memory_total=_int(total, "memory.total", "nvidia-smi") * MIB,
            memory_used=_int(used, "memory.used", "nvidia-smi") * MIB,
        ))
    if not rows:
        raise SmiError("nvidia-smi: printed no GPU rows")
    if [r.index for r in rows] != list(range(len(rows))):
        raise SmiError(f"nvidia-smi: indices {[r.index for r in rows]} are not 0..{len(rows) - 1}")
    return rows


def parse_nvidia_smi_apps(text: str, uuids: Sequence[str]) -> dict[int, tuple[int, ...]]:
    """PIDs per physical index from NVIDIA_SMI_APPS_QUERY output."""
    index_of = {u: i for i, u in enumerate(uuids)}
    pids: dict[int, list[int]] = {}
    for line in text.splitlines():
        if not line.strip() or "No running" in line:
            continue
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 3 or cells[0] not in index_of:
            raise SmiError(f"nvidia-smi: unexpected compute-apps row {line.strip()[:80]!r}")
        pids.setdefault(index_of[cells[0]], []).append(_int(cells[1], "pid", "nvidia-smi"))
    return {i: tuple(sorted(p)) for i, p in pids.items()}


def _load_json(text: str, tool: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise SmiError(f"{tool}: output is not JSON ({exc.msg} at char {exc.pos})") from None


def _find(d: Mapping[str, Any], *needles: str) -> Any:
    """The value of the first key containing every needle, case-insensitively.

    rocm-smi renamed its keys between ROCm releases ("Card series" vs "Card
    Series", "VRAM Total Used Memory (B)"); matching on words survives that.
    """
    for key, value in d.items():
        if all(n in key.lower() for n in needles):
            return value
    return None


def parse_rocm_smi(text: str) -> list[SmiRow]:
    """Parse ``rocm-smi`` ROCM_SMI_QUERY JSON: {"card0": {...}, ...}."""
    data = _load_json(text, "rocm-smi")
    if not isinstance(data, dict):
        raise SmiError("rocm-smi: JSON is not an object")
    cards = sorted((k for k in data if k.startswith("card")), key=lambda k: _int(k[4:], "card", "rocm-smi"))
    rows = []
    for pos, key in enumerate(cards):
        info = data[key]
        total = _find(info, "vram", "total", "memory") if isinstance(info, dict) else None
        used = _find(info, "vram", "used") if isinstance(info, dict) else None
        if total is None or used is None:
            raise SmiError(f"rocm-smi: {key} has no VRAM total/used fields")
        uid = str(_find(info, "unique id") or "")
        rows.append(SmiRow(
            index=pos, uuid=_rocr_uuid(uid), name=str(_find(info, "card series") or "AMD GPU"),
            memory_total=_int(str(total), "VRAM total", "rocm-smi"),
            memory_used=_int(str(used), "VRAM used", "rocm-smi"),
        ))
    if not rows:
        raise SmiError("rocm-smi: no cards in output")
    return rows


def _rocr_uuid(unique_id: str) -> str:
    """ROCR_VISIBLE_DEVICES spells a GPU's UUID as GPU-<unique id in hex>."""
    uid = unique_id.strip().lower()
    uid = uid[2:] if uid.startswith("0x") else uid
    return f"GPU-{uid}" if uid and uid != "n/a" else ""


def _amd_list(data: Any, tool: str) -> list[dict]:
    # Newer amd-smi releases wrap the per-GPU list as {"gpu_data": [...]}.
    if isinstance(data, dict) and isinstance(data.get("gpu_data"), list):
        data = data["gpu_data"]
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise SmiError(f"{tool}: expected a JSON list of GPUs")
    return data


def _amd_bytes(value: Any, what: str) -> int:
    """amd-smi prints sizes as {"value": N, "unit": "MB"} or "N MB"."""
    if isinstance(value, dict):
        number, unit = value.get("value"), str(value.get("unit", "MB"))
    elif isinstance(value, str) and value.split():
        number, unit = value.split()[0], (value.split()[1:] or ["MB"])[0]
    else:
        raise SmiError(f"amd-smi: no {what} value")
    scale = {"B": 1, "KB": 1024, "MB": MIB, "GB": 1024 * MIB}.get(unit.upper())
    if scale is None:
        raise SmiError(f"amd-smi: unknown unit {unit!r} for {what}")
    return _int(str(number), what, "amd-smi") * scale


def parse_amd_smi(list_text: str, static_text: str) -> list[SmiRow]:
    """Parse ``amd-smi list --json`` plus ``amd-smi static --asic --vram --json``."""
    uuids = {int(g["gpu"]): str(g.get("uuid", "")) for g in _amd_list(_load_json(list_text, "amd-smi"), "amd-smi")}
    rows = []
    for g in _amd_list(_load_json(static_text, "amd-smi"), "amd-smi"):
        idx = _int(str(g.get("gpu")), "gpu", "amd-smi")
        vram = g.get("vram") or {}
        rows.append(SmiRow(
            index=idx, uuid=uuids.get(idx, ""), name=str((g.get("asic") or {}).get("market_name", "AMD GPU")),
            memory_total=_amd_bytes(vram.get("size"), "vram size"), memory_used=0,
        ))
    if not rows:
        raise SmiError("amd-smi: no GPUs in output")
    return sorted(rows, key=lambda r: r.index)


def parse_amd_smi_memory(text: str) -> dict[int, int]:
    """Used VRAM bytes per GPU from ``amd-smi metric --mem-usage --json``."""
    used = {}
    for g in _amd_list(_load_json(text, "amd-smi"), "amd-smi"):
        usage = g.get("mem_usage") or {}
        used[_int(str(g.get("gpu")), "gpu", "amd-smi")] = _amd_bytes(usage.get("used_vram"), "used_vram")
    return used
