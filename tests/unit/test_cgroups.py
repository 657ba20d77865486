"""Containment mode from the host's cgroup layout (ci/host/cgroups.py), on fake cgroup roots.

The integration tests (tests/integration/test_containment.py) run the layout
the host has with the real kernel; these show kiln every other layout --
v2-only, v1-only, hybrid, none -- through tests/fakes/cgroupfs.py, so the v1
freezer path is exercised on a v2-only runner and the v2 path on a v1-only host.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ci.host import cgroups
from tests.fakes.cgroupfs import LAYOUTS, FakeCgroupFs, LayoutError, trim_mountinfo

# A child that only waits to be killed; bounded so a failed test cannot leave it forever.
SLEEPER = [sys.executable, "-c", "import time; time.sleep(300)"]
CHILD_EXIT_S = 10.0


@pytest.fixture
def fake(tmp_path, monkeypatch, request):
    """A FakeCgroupFs of the layout named by the test's parameter, installed in ci.host.cgroups."""
    name, has_kill_file = request.param if isinstance(request.param, tuple) else (request.param, True)
    fs = FakeCgroupFs(tmp_path / "root", name, has_kill_file=has_kill_file)
    fs.install(monkeypatch, cgroups)
    return fs


def _layout(fs: FakeCgroupFs) -> cgroups.Layout:
    return cgroups.Layout.read(mountinfo=str(fs.mountinfo), cgroup=str(fs.proc_cgroup))


# (layout, hierarchies mounted, v2 base, v1 freezer base) -- bases under the fake root.
DETECTED = [
    ("v2-only", [cgroups.V2], "/sys/fs/cgroup/system.slice/runner.service", None),
    ("v1-only", [cgroups.V1], None, "/sys/fs/cgroup/freezer"),
    ("hybrid", [cgroups.V2, cgroups.V1], "/sys/fs/cgroup/unified/user.slice/session-1.scope",
     "/sys/fs/cgroup/freezer"),
    ("none", [], None, None),
    ("v2-outside-namespace", [], None, None),
]


@pytest.mark.parametrize(("fake", "kinds", "v2", "v1"), DETECTED, indirect=["fake"],
                         ids=[d[0] for d in DETECTED])
def test_each_layout_is_read_from_its_mount_table(fake, kinds, v2, v1):
    layout = _layout(fake)
    root = str(fake.root)
    assert layout.hierarchies() == kinds
    assert layout.v2_base() == (root + v2 if v2 else None)
    assert layout.v1_base() == (root + v1 if v1 else None)


# (layout, the mode "auto" gives, what is said about the ones it could not have)
AUTO = [
    ("v2-only", cgroups.V2, None),
    ("v1-only", cgroups.V1, None),
    ("hybrid", cgroups.V2, None),
    ("none", cgroups.NONE, "cgroup-v2: no cgroup-v2 hierarchy mounted for this process; "
                           "cgroup-v1: no cgroup-v1 hierarchy mounted for this process"),
    (("v2-only", False), cgroups.NONE, "cgroup-v2: this kernel has no cgroup.kill (Linux < 5.14); "
                                       "cgroup-v1: no cgroup-v1 hierarchy mounted for this process"),
    # A hybrid kernel older than 5.14: the freezer is the best it has.
    (("hybrid", False), cgroups.V1, None),
]


@pytest.mark.parametrize(("fake", "mode", "why"), AUTO, indirect=["fake"],
                         ids=["v2-only", "v1-only", "hybrid", "none", "v2-no-kill-file", "hybrid-no-kill-file"])
def test_auto_takes_the_best_mechanism_the_layout_has(fake, mode, why):
    mechanism, detail = cgroups.detect("auto", _layout(fake))
    assert mechanism == mode
    if why is not None:
        assert detail == why
    else:
        base = _layout(fake).v2_base() if mode == cgroups.V2 else _layout(fake).v1_base()
        assert detail == base
        assert not [n for n in os.listdir(base) if n.startswith(cgroups.PREFIX)], "the probe group stays"


@pytest.mark.parametrize(("fake", "asked", "missing"), [
    ("v2-only", cgroups.V1, "no cgroup-v1 hierarchy mounted for this process"),
    ("v1-only", cgroups.V2, "no cgroup-v2 hierarchy mounted for this process"),
    (("v2-only", False), cgroups.V2, "this kernel has no cgroup.kill (Linux < 5.14)"),
], indirect=["fake"], ids=["v1-on-v2-only", "v2-on-v1-only", "v2-without-kill-file"])
def test_a_mode_the_layout_lacks_is_one_line_never_a_weaker_one(fake, asked, missing):
    with pytest.raises(cgroups.CgroupError) as exc:
        cgroups.create("t1", asked, _layout(fake))
    assert str(exc.value) == f"KILN_CONTAINMENT={asked} asked for, but: {missing}"


@pytest.mark.parametrize("fake", ["v2-only"], indirect=True)
def test_v2_tree_group_is_created_joined_killed_and_removed(fake):
    group, why = cgroups.create("t1", "auto", _layout(fake))
    assert (group.version, why) == (cgroups.V2, "")
    assert group.path == f"{fake.root}/sys/fs/cgroup/system.slice/runner.service/kiln-t1"
    child = subprocess.Popen(SLEEPER)
    try:
        group.add(child.pid)
        assert group.pids() == [child.pid]
        assert not group.remove(), "a group with a live member is busy"
        assert group.kill() == [child.pid]
        # One write kills the whole group on v2 (the fake kernel only records it).
        assert Path(group.path, "cgroup.kill").read_text() == "1\n"
    finally:
        child.kill()
        child.wait(CHILD_EXIT_S)
    assert group.remove() and not group.exists()


@pytest.mark.parametrize("fake", ["v1-only", "hybrid"], indirect=True)
def test_v1_freezer_kill_freezes_kills_every_member_and_thaws(fake):
    group, _ = cgroups.create("t1", cgroups.V1, _layout(fake))
    assert group.version == cgroups.V1 and group.path == f"{fake.root}/sys/fs/cgroup/freezer/kiln-t1"
    children = [subprocess.Popen(SLEEPER) for _ in range(2)]
    try:
        # What the kernel lists once both have joined (the fake keeps one pid per write).
        Path(group.path, "cgroup.procs").write_text("".join(f"{c.pid}\n" for c in children))
        killed = group.kill()
        assert sorted(killed) == sorted(c.pid for c in children)
        assert [c.wait(CHILD_EXIT_S) for c in children] == [-9, -9]  # SIGKILLed by kiln itself
        assert Path(group.path, "freezer.state").read_text() == "THAWED\n"
    finally:
        for c in children:
            c.kill()
            c.wait(CHILD_EXIT_S)
    assert group.remove() and not group.exists()


@pytest.mark.parametrize("fake", ["v2-only"], indirect=True)
def test_the_mount_table_comes_from_the_environment_when_it_names_one(fake, monkeypatch):
    monkeypatch.setenv(cgroups.MOUNTINFO_ENV, str(fake.mountinfo))
    layout = cgroups.Layout.read(cgroup=str(fake.proc_cgroup))
    assert layout.v2_base() == f"{fake.root}/sys/fs/cgroup/system.slice/runner.service"
    monkeypatch.delenv(cgroups.MOUNTINFO_ENV)
    assert cgroups.Layout.read(cgroup=str(fake.proc_cgroup)).v2_base() != layout.v2_base()


HYBRID_TABLE = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 23 0:39 / /proc rw - proc proc rw
"""


@pytest.mark.parametrize(("keep", "types"), [("v2-only", ["tmpfs", "cgroup2", "proc"]),
                                            ("v1-only", ["tmpfs", "cgroup", "cgroup", "proc"])])
def test_trimmed_host_table_keeps_one_kind_of_hierarchy(keep, types):
    table = trim_mountinfo(HYBRID_TABLE, keep)
    assert [line.split(" - ")[1].split()[0] for line in table.splitlines()] == types
    own = "0::/\n6:freezer:/\n"
    kinds = cgroups.Layout.parse(table, own).hierarchies()
    assert kinds == ([cgroups.V2] if keep == "v2-only" else [cgroups.V1])


def test_unknown_layout_names_are_one_line():
    with pytest.raises(LayoutError, match=r"^cgroup layout 'v3-only' is not one of v2-only, v1-only$"):
        trim_mountinfo(HYBRID_TABLE, "v3-only")
    with pytest.raises(LayoutError, match=r"^cgroup layout 'v3-only' is not one of "):
        FakeCgroupFs(Path("/nonexistent"), "v3-only")
    assert set(LAYOUTS) >= {"v2-only", "v1-only", "hybrid", "none"}
