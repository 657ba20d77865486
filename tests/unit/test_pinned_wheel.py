"""Pinned wheels through real pip, from a local --find-links directory (no index)."""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from ci.install import pinned_wheel
from ci.install.pinned_wheel import PinnedWheel

LOCAL = ("--no-index", "--find-links")


def make_wheel(where: Path, payload: bytes = b"items") -> tuple[Path, str]:
    """A minimal valid wheel of kiln-fake-data 1.0 carrying ``payload``; (path, sha256)."""
    where.mkdir(parents=True, exist_ok=True)
    path = where / "kiln_fake_data-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("kiln_fake_data/data.txt", payload)
        zf.writestr("kiln_fake_data-1.0.dist-info/METADATA",
                    "Metadata-Version: 2.1\nName: kiln-fake-data\nVersion: 1.0\n")
        zf.writestr("kiln_fake_data-1.0.dist-info/WHEEL",
                    "Wheel-Version: 1.0\nGenerator: kiln\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("kiln_fake_data-1.0.dist-info/RECORD", "")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_downloads_once_then_reuses_the_verified_file(tmp_path):
    src, digest = make_wheel(tmp_path / "index")
    pin = PinnedWheel("kiln-fake-data", "1.0", digest)
    got = pinned_wheel.fetch(pin, tmp_path / "cache", pip_args=(*LOCAL, str(src.parent)))
    assert got == tmp_path / "cache" / "wheels" / src.name
    assert pinned_wheel.sha256_of(got) == digest
    src.unlink()  # a second fetch must not need the index at all
    assert pinned_wheel.fetch(pin, tmp_path / "cache", pip_args=(*LOCAL, str(src.parent))) == got
    assert not list((tmp_path / "cache" / "wheels").glob(".kiln_fake_data.tmp-*"))


def test_hash_mismatch_fails_naming_the_pin_and_pips_cause(tmp_path):
    src, _ = make_wheel(tmp_path / "index")
    pin = PinnedWheel("kiln-fake-data", "1.0", "0" * 64)
    with pytest.raises(RuntimeError, match=r"^pip download kiln-fake-data==1.0 failed \(exit \d+\):"
                                           r".*(HASH|hash)"):
        pinned_wheel.fetch(pin, tmp_path / "cache", pip_args=(*LOCAL, str(src.parent)))
    assert not list((tmp_path / "cache" / "wheels").glob("*.whl"))


def test_a_corrupted_cached_wheel_is_fetched_again(tmp_path):
    src, digest = make_wheel(tmp_path / "index")
    pin = PinnedWheel("kiln-fake-data", "1.0", digest)
    got = pinned_wheel.fetch(pin, tmp_path / "cache", pip_args=(*LOCAL, str(src.parent)))
    got.write_bytes(b"torn")
    again = pinned_wheel.fetch(pin, tmp_path / "cache", pip_args=(*LOCAL, str(src.parent)))
    assert pinned_wheel.sha256_of(again) == digest


def test_missing_version_fails_with_pips_reason(tmp_path):
    src, digest = make_wheel(tmp_path / "index")
    pin = PinnedWheel("kiln-fake-data", "2.0", digest)
    with pytest.raises(RuntimeError, match=r"^pip download kiln-fake-data==2.0 failed"):
        pinned_wheel.fetch(pin, tmp_path / "cache", pip_args=(*LOCAL, str(src.parent)))


def test_an_interpreter_without_pip_fails_naming_it_and_leaves_nothing(tmp_path, monkeypatch):
    # A venv uv built has no pip; the fetch says so instead of pip's "No module named pip".
    src, digest = make_wheel(tmp_path / "src")
    real_find_spec = pinned_wheel.importlib.util.find_spec
    monkeypatch.setattr(pinned_wheel.importlib.util, "find_spec",
                        lambda name, *a: None if name == "pip" else real_find_spec(name, *a))
    with pytest.raises(RuntimeError, match=r"pip is not installed in .*requirements/e2e-cpu.txt"):
        pinned_wheel.fetch(PinnedWheel("kiln-fake-data", "1.0", digest), tmp_path / "cache",
                           pip_args=(*LOCAL, str(src.parent)))
    assert [p.name for p in (tmp_path / "cache" / "wheels").iterdir()] == [".kiln_fake_data.lock"]


def test_cached_finds_only_a_file_that_matches_its_pin_and_changes_nothing(tmp_path):
    src, digest = make_wheel(tmp_path / "cache" / "wheels")
    assert pinned_wheel.cached(PinnedWheel("kiln-fake-data", "1.0", digest), tmp_path / "cache") == src
    wrong = PinnedWheel("kiln-fake-data", "1.0", "0" * 64)
    assert pinned_wheel.cached(wrong, tmp_path / "cache") is None
    assert src.is_file()  # a mismatch is fetch()'s to replace, not a read-only question's
    assert pinned_wheel.cached(PinnedWheel("kiln-fake-data", "1.0", digest), tmp_path / "empty") is None
