"""ci.install.wheelhouse: the dependency walk, on wheels made here and served by a local find-links dir.

pip itself does every download (``--no-index --find-links``: nothing leaves the
machine); the wheels are real zip files with real METADATA.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from ci.install import wheelhouse
from ci.install.wheelhouse import Target, WheelhouseError

# Pure-Python wheels: their tags match any --platform the walk asks for.
TAG = "py3-none-any"


def make_wheel(where: Path, name: str, version: str, requires: list[str] = ()) -> Path:
    """A minimal valid wheel ``name-version`` whose METADATA lists ``requires``."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = where / f"{dist}-{TAG}.whl"
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
        name, version, "".join(f"Requires-Dist: {r}\n" for r in requires))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name.replace('-', '_')}/__init__.py", "")
        zf.writestr(f"{dist}.dist-info/METADATA", meta)
        zf.writestr(f"{dist}.dist-info/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {TAG}\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return path


@pytest.fixture
def index(tmp_path) -> Path:
    d = tmp_path / "index"
    d.mkdir()
    make_wheel(d, "engine", "1.0", ["dep-b>=1", "present-c", 'dep-d; extra == "fast"',
                                    'old-e; python_version < "3.0"', 'dep-f; sys_platform == "linux"'])
    make_wheel(d, "dep-b", "1.0")
    make_wheel(d, "dep-b", "2.0", ["dep-g==1.0"])
    make_wheel(d, "dep-d", "1.0")
    make_wheel(d, "dep-f", "1.0")
    make_wheel(d, "dep-g", "1.0")
    make_wheel(d, "dep-g", "2.0")
    make_wheel(d, "needs-new-g", "1.0", ["dep-g>=2"])
    return d


def offline(index: Path) -> Target:
    return Target(python="3.12", index_args=("--no-index", "--find-links", str(index)))


def test_walk_follows_markers_skips_present_names_and_writes_pins(index, tmp_path):
    dest = tmp_path / "wh"
    manifest = wheelhouse.build(["engine==1.0"], dest, offline(index), present={"present-c"})
    assert manifest["wheels"] == {
        "dep-b": {"version": "2.0", "file": f"dep_b-2.0-{TAG}.whl"},
        "dep-f": {"version": "1.0", "file": f"dep_f-1.0-{TAG}.whl"},
        "dep-g": {"version": "1.0", "file": f"dep_g-1.0-{TAG}.whl"},
        "engine": {"version": "1.0", "file": f"engine-1.0-{TAG}.whl"},
    }
    # The extra was not asked for, the python<3 marker is false, present-c is the image's.
    assert manifest["present_not_downloaded"] == ["present-c"]
    assert sorted(p.name for p in dest.glob("*.whl")) == sorted(w["file"] for w in manifest["wheels"].values())
    assert json.loads((dest / wheelhouse.MANIFEST).read_text()) == manifest
    pins = wheelhouse.read_requirements(dest / wheelhouse.PINS)
    assert pins == ["dep-b==2.0", "dep-f==1.0", "dep-g==1.0", "engine==1.0"]
    assert wheelhouse.load(dest)["roots"] == ["engine==1.0"]


def test_extras_asked_for_are_followed_and_excluded_names_are_not(index, tmp_path):
    manifest = wheelhouse.build(["engine[fast]==1.0"], tmp_path / "wh", offline(index),
                                present={"present-c"}, exclude={"dep-f"})
    assert "dep-d" in manifest["wheels"] and "dep-f" not in manifest["wheels"]
    assert manifest["excluded"] == ["dep-f"]


def test_a_rerun_into_the_same_folder_finds_the_wheels_already_there(index, tmp_path):
    # pip says "  File was already downloaded PATH" (indented) for a wheel the folder
    # holds; the first version of the walk matched only "Saved PATH" at a line's start
    # and failed "no wheel of engine==1.0" on every re-run.
    dest = tmp_path / "wh"
    first = wheelhouse.build(["engine==1.0"], dest, offline(index), present={"present-c"})
    stamps = {p.name: p.stat().st_mtime_ns for p in dest.glob("*.whl")}
    again = wheelhouse.build(["engine==1.0"], dest, offline(index), present={"present-c"})
    assert again["wheels"] == first["wheels"]
    assert {p.name: p.stat().st_mtime_ns for p in dest.glob("*.whl")} == stamps  # nothing fetched anew


def test_a_conflict_is_one_line_naming_both_sides_and_the_way_out(index, tmp_path):
    with pytest.raises(WheelhouseError) as err:
        wheelhouse.build(["engine==1.0", "needs-new-g"], tmp_path / "wh", offline(index),
                         present={"present-c"})
    msg = str(err.value)
    assert "\n" not in msg
    # Breadth-first: needs-new-g's dep-g 2.0 is chosen before dep-b 2.0 asks for 1.0.
    assert "dep-b 2.0 needs dep-g==1.0" in msg and "dep-g 2.0 was chosen for needs-new-g 1.0" in msg
    assert "--constraint" in msg


def test_a_constraint_settles_the_conflict(index, tmp_path):
    manifest = wheelhouse.build(["engine==1.0", "needs-new-g"], tmp_path / "wh", offline(index),
                                present={"present-c"}, constraints=["dep-b==1.0"])
    assert manifest["wheels"]["dep-b"]["version"] == "1.0"
    assert manifest["wheels"]["dep-g"]["version"] == "2.0"


def test_a_missing_wheel_names_the_requirement_and_the_target(index, tmp_path):
    with pytest.raises(WheelhouseError, match=r"^no wheel of nothing-here==9 for Python 3\.12 on "):
        wheelhouse.build(["nothing-here==9"], tmp_path / "wh", offline(index))


def test_load_refuses_a_folder_that_is_not_a_wheelhouse(tmp_path):
    with pytest.raises(WheelhouseError, match=r"is not a kiln wheelhouse .*invoke wheelhouse"):
        wheelhouse.load(tmp_path)


def test_present_lists_read_pip_freeze_list_and_plain_names(tmp_path):
    f = tmp_path / "present.txt"
    f.write_text("# comment\nPackage    Version\n---------- -------\ntorch 2.11.0\n"
                 "Foo_Bar==1.0\nnumpy>=1\nsetproctitle\n-e git+https://example/x\n")
    assert wheelhouse.read_names(f) == {"torch", "foo-bar", "numpy", "setproctitle"}


def test_requirement_files_follow_includes_and_drop_options(tmp_path):
    (tmp_path / "base.txt").write_text("a==1  # why\n")
    (tmp_path / "top.txt").write_text("-r base.txt\n--find-links x\nb>=2\n\n# c\n")
    assert wheelhouse.read_requirements(tmp_path / "top.txt") == ["a==1", "b>=2"]
