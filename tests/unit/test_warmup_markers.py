"""Warmup markers: atomic, locked writes; torn or foreign markers read as absent."""
from __future__ import annotations

import json
import logging
import multiprocessing
from pathlib import Path

import pytest

from ci.warmup import run as warmup
from ci.warmup.run import MARKER_FORMAT, WarmupSpec, marker_path, read_marker, write_marker

KEY = "a" * 64
PARTS = {"format": "1", "model": "tiny-llama", "dist:torch": "2.13.0+cpu"}
# Writers and rounds for the race: enough that unsynchronised writes would
# interleave on a 2-core runner, few enough to finish in about a second.
WRITERS = 6
ROUNDS = 40


def _record(key=KEY, writer=0, pad=0):
    return {"format": MARKER_FORMAT, "key": key, "components": PARTS, "writer": writer, "pad": "x" * pad}


def test_roundtrip(tmp_path):
    path = tmp_path / "m.json"
    write_marker(path, _record())
    assert read_marker(path, KEY)["writer"] == 0
    assert read_marker(tmp_path / "absent.json", KEY) is None


@pytest.mark.parametrize("text,reason", [
    ('{"format": 1, "key": "' + KEY + '", "compo', "torn"),
    ("", "torn"),
    ("[1, 2]", "not a kiln warmup marker"),
    ('{"format": 99, "key": "' + KEY + '", "components": {}}', "not a kiln warmup marker"),
    ('{"format": 1, "key": "' + KEY + '"}', "not a kiln warmup marker"),
])
def test_torn_or_malformed_marker_is_absent_and_logged(tmp_path, caplog, text, reason):
    path = tmp_path / "m.json"
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="ci.warmup.run"):
        assert read_marker(path, KEY) is None
    assert reason in caplog.text and str(path) in caplog.text


def test_foreign_marker_is_absent_and_says_what_changed(tmp_path, caplog):
    path = tmp_path / "m.json"
    write_marker(path, _record(key="b" * 64))
    now = dict(PARTS, **{"dist:torch": "2.14.0+cpu"})
    with caplog.at_level(logging.WARNING, logger="ci.warmup.run"):
        assert read_marker(path, KEY, now) is None
    assert "another version key" in caplog.text
    assert "dist:torch: 2.13.0+cpu -> 2.14.0+cpu" in caplog.text


def test_marker_path_is_per_spec_and_inside_the_engine_tree(tmp_path):
    a = WarmupSpec("tiny-llama", 1, ("--x",), backend="vllm-cpu")
    b = WarmupSpec("tiny-llama", 1, ("--y",), backend="vllm-cpu")
    c = WarmupSpec("tiny-llama", 1, ("--x",), backend="sglang")
    paths = {marker_path(tmp_path, s) for s in (a, b, c)}
    assert len(paths) == 3
    assert marker_path(tmp_path, a) == marker_path(tmp_path, WarmupSpec("tiny-llama", 1, ("--x",), "vllm-cpu"))
    assert marker_path(tmp_path, a).parent == tmp_path / "jit" / "vllm-cpu" / ".warmup"
    weird = WarmupSpec("org/../../model name", 2, (), backend="vllm")
    assert marker_path(tmp_path, weird).parent == tmp_path / "jit" / "vllm" / ".warmup"


def _writer(path: str, writer: int, start, rounds: int) -> None:
    start.wait()
    for _ in range(rounds):
        # Large records make a non-atomic write observable as torn JSON.
        write_marker(Path(path), _record(writer=writer, pad=64 * 1024))


def _reader(path: str, start, stop, torn) -> None:
    start.wait()
    while not stop.is_set():
        try:
            json.loads(Path(path).read_text())
        except FileNotFoundError:
            continue
        except ValueError:
            with torn.get_lock():
                torn.value += 1


def test_concurrent_writers_leave_exactly_one_valid_marker_and_no_temp_files(tmp_path):
    ctx = multiprocessing.get_context("spawn")  # no inherited locks or threads from pytest
    path = tmp_path / "jit" / "vllm-cpu" / ".warmup" / "tiny-llama-tp1-0123.json"
    start, stop, torn = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
    procs = [ctx.Process(target=_writer, args=(str(path), w, start, ROUNDS)) for w in range(WRITERS)]
    reader = ctx.Process(target=_reader, args=(str(path), start, stop, torn))
    for p in [*procs, reader]:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    stop.set()
    reader.join(10)
    assert reader.exitcode == 0
    assert torn.value == 0, "a reader saw a half-written marker"
    entries = sorted(p.name for p in path.parent.iterdir())
    assert entries == [".lock", path.name], entries  # no temp files left behind
    data = read_marker(path, KEY)
    assert data is not None and data["writer"] in range(WRITERS)


def test_leftover_temp_file_of_a_killed_writer_is_swept(tmp_path):
    path = tmp_path / "m.json"
    path.parent.mkdir(exist_ok=True)
    stale = tmp_path / f".{path.name}.abc123.tmp"
    stale.write_text('{"format": 1, "ke')  # what a SIGKILLed writer leaves
    write_marker(path, _record())
    assert not stale.exists()
    assert read_marker(path, KEY) is not None


def test_failed_write_leaves_old_marker_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    write_marker(path, _record(writer=1))

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(warmup.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_marker(path, _record(writer=2))
    assert read_marker(path, KEY)["writer"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
