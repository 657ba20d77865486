"""A local image that can run Python, for the chain's integration test (no image from the internet).

The rootfs holds the host's own interpreter at the same path the e2e venv's
``bin/python`` links to (the venv itself comes in through the workspace bind
mount), ``nox`` and its dependencies copied from the running environment into
that interpreter's site-packages, a shell and a few coreutils, and the shared
libraries ``ldd`` resolves for all of it *and* for every ELF library in the
venv (torch and vLLM need libstdc++, libgomp, libnuma... from the host's
/usr/lib). Only what ldd resolves outside the venv goes in: the venv is
mounted, not copied. The interpreter's own site-packages (hundreds of MB on
the CI box) and test suite are left out so the vfs-stored image stays small.
"""
from __future__ import annotations

import importlib.metadata
import io
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import uv  # nox finds its uv binary through this package; both go into the image
from packaging.requirements import Requirement

log = logging.getLogger(__name__)

# The image's command-line tools: the chain runs `sh -c`, keeps the container
# alive with `sleep infinity` through `/usr/bin/env`. lscpu: vLLM-CPU reads the
# CPU topology with it to bind its OpenMP threads. openssl: Inductor hashes its
# precompiled headers with `openssl sha512` (FileNotFoundError without it).
BINARIES = ("/bin/sh", "/usr/bin/sleep", "/usr/bin/env", "/usr/bin/lscpu", "/usr/bin/openssl")
# Tools the chain needs inside the image: nox runs the sessions, and builds and
# reuses their venvs with uv (requirements/nox.txt, which the chain's bootstrap
# installs on a real runner). Without uv, nox falls back to virtualenv and
# re-creates the host's uv-made venv, empty under `-R`.
PY_PACKAGES = ("nox", "uv")
# Parts of the stdlib tree nothing in a test run imports; the test suite alone
# is ~120 MB. Matched against path parts below lib/pythonX.Y.
STDLIB_SKIP = frozenset({"site-packages", "test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip"})
# The static libpython (~44 MB) is only for embedding builds.
SKIP_SUFFIXES = (".a",)
# ldd is run on this many files per call: one process per library would take
# minutes for a torch+vLLM venv; all at once could exceed the argv limit.
LDD_BATCH = 200
# Bound on each ldd call (it only maps libraries; seconds on the CI box).
LDD_TIMEOUT_S = 120.0
# Top-level usrmerge links (Debian's /bin -> usr/bin ...), recreated as links so
# paths ldd prints (/lib/x86_64-linux-gnu/...) and the real files agree.
MERGED_DIRS = ("bin", "sbin", "lib", "lib64")
# The C++ toolchain: vLLM-CPU runs torch.compile, whose Inductor backend builds
# its kernels with g++ at server start ("InvalidCxxCompiler: No working C++
# compiler found" without it), as real vLLM-CPU images ship it. Taken as the
# files of the Debian packages g++ depends on, less what a compile never runs.
CXX = "g++"
# Never run by `g++ -shared`: the LTO dumper/compiler (~32 MB each), the C
# compiler proper (Inductor compiles C++), gold/dwp/gcov/gprof(ng), the
# sanitizer runtimes.
TOOLCHAIN_SKIP = re.compile(
    r"(^|/)(x86_64-linux-gnu-)?(lto-dump[^/]*|lto1|cc1|ld\.gold|gold|dwp|gcov[^/]*|gprof[^/]*|gp-[^/]*"
    r"|lib(a|hwa|l|t|ub)san\.so[^/]*|libgprofng\.so[^/]*)$")
# Static libraries above this size are whole-program runtimes (libc.a, the
# sanitizers, libstdc++.a) a shared-object link does not use; libgcc.a it does.
STATIC_LIB_MAX_BYTES = 1 << 20
STATIC_LIB_KEEP = frozenset({"libgcc.a", "libgcc_eh.a", "libc_nonshared.a"})
# Docs are not needed to compile; gold and gprofng are the unused tools' own dirs.
TOOLCHAIN_SKIP_DIRS = ("/share/", "/doc/", "/gold-ld/", "/gprofng/")
# dpkg-query/dpkg -L answer in well under a second each.
DPKG_TIMEOUT_S = 60.0
ETC_PASSWD = "root:x:0:0:root:/root:/bin/sh\n"
ETC_GROUP = "root:x:0:\n"
_ELF_MAGIC = b"\x7fELF"
_SO_RE = re.compile(r"\.so(\.\d+)*$")


def venv_python(venv: Path) -> tuple[Path, str]:
    """(interpreter prefix, ``pythonX.Y``) a venv was made from, read from its pyvenv.cfg."""
    cfg = {}
    for line in (venv / "pyvenv.cfg").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            cfg[key.strip()] = value.strip()
    home = cfg.get("base-prefix") or str(Path(cfg["home"]).parent)
    major, minor = (cfg.get("version_info") or cfg.get("version") or "").split(".")[:2]
    return Path(home), f"python{major}.{minor}"


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == _ELF_MAGIC
    except OSError:
        return False


def _shared_objects(roots: Iterable[Path]) -> Iterator[Path]:
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = Path(dirpath) / name
                if _SO_RE.search(name) and not path.is_symlink() and _is_elf(path):
                    yield path


def ldd_closure(files: Sequence[Path]) -> set[Path]:
    """Every absolute path ``ldd`` prints for ``files`` (libraries and the loader)."""
    found: set[Path] = set()
    for i in range(0, len(files), LDD_BATCH):
        batch = [str(f) for f in files[i:i + LDD_BATCH]]
        # ldd exits non-zero when one file of the batch is not dynamic; the rest is still printed.
        out = subprocess.run(["ldd", *batch], capture_output=True, text=True, timeout=LDD_TIMEOUT_S,
                             check=False).stdout
        for line in out.splitlines():
            if "not found" in line:
                log.debug("ldd: %s", line.strip())
            for word in line.split():
                if word.startswith("/") and not word.endswith(":"):
                    found.add(Path(word))
    return found


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _package_files(names: Sequence[str]) -> list[tuple[Path, str]]:
    """(file, path relative to site-packages) for ``names`` and their installed dependencies."""
    seen: set[str] = set()
    todo = list(names)
    files: list[tuple[Path, str]] = []
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
        for rel in dist.files or []:
            if rel.parts and rel.parts[0] == ".." or "__pycache__" in rel.parts:
                continue  # console scripts live in bin/; bytecode is rebuilt on import
            src = Path(dist.locate_file(rel))
            if src.is_file():
                files.append((src, str(rel)))
    return files


def _dpkg(*argv: str) -> str:
    return subprocess.run(["dpkg-query", *argv], capture_output=True, text=True, timeout=DPKG_TIMEOUT_S,
                          check=False).stdout


def _package_closure(first: Iterable[str]) -> set[str]:
    """Installed packages in ``first`` and everything they depend on (first alternative of each).

    Asked level by level, one dpkg-query per level: one call per package made
    this the slowest part of the image build.
    """
    seen: set[str] = set()
    level = set(first)
    while level:
        found = _dpkg("-W", "-f=${Package}\t${Status}\t${Pre-Depends},${Depends}\n", *sorted(level))
        level = set()
        for line in found.splitlines():
            name, status, deps = (line.split("\t") + ["", ""])[:3]
            if "installed" not in status.split() or name in seen:
                continue  # virtual or absent: its provider is named elsewhere in the closure
            seen.add(name)
            for dep in deps.split(","):
                dep_name = re.split(r"[\s(:|]", dep.strip(), maxsplit=1)[0]
                if dep_name and dep_name not in seen:
                    level.add(dep_name)
    return seen


def toolchain_files(cxx: str = CXX) -> list[Path]:
    """The files (and links) of the Debian packages the host's ``cxx`` needs, minus the unused parts."""
    found = shutil.which(cxx)
    if found is None or shutil.which("dpkg-query") is None:
        raise RuntimeError(f"no {cxx} or no dpkg-query on this host: cannot put a C++ toolchain in the image")
    # The `g++` link and the versioned compiler it points at come from two packages (g++, g++-12).
    owners = {_dpkg("-S", p).split(":", 1)[0].strip() for p in (found, os.path.realpath(found))} - {""}
    if not owners:
        raise RuntimeError(f"dpkg does not know who installed {found}")
    files = []
    for line in _dpkg("-L", *sorted(_package_closure(owners))).splitlines():
        path = Path(line)
        if any(d in line for d in TOOLCHAIN_SKIP_DIRS) or TOOLCHAIN_SKIP.search(line):
            continue
        if not (path.is_symlink() or path.is_file()) or (path.is_symlink() and path.is_dir()):
            continue
        if (path.suffix == ".a" and path.name not in STATIC_LIB_KEEP and not path.is_symlink()
                and path.stat().st_size > STATIC_LIB_MAX_BYTES):
            continue
        files.append(path)
    return files


def _canonical(path: Path) -> Path:
    """``path`` with its directory resolved (usrmerge) but its last component kept (a lib's soname link)."""
    return Path(os.path.realpath(path.parent)) / path.name


class _Tar:
    """Adds host files to a rootfs tar once each, keeping symlinks (and their targets) as symlinks."""

    def __init__(self, tar: tarfile.TarFile):
        self.tar = tar
        self.names: set[str] = set()

    def _dirs(self, arc: str) -> None:
        parts = arc.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.names:
                self.names.add(d)
                info = tarfile.TarInfo(d)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                self.tar.addfile(info)

    def add(self, src: Path, arc: str | None = None) -> None:
        arc = (arc or str(src)).lstrip("/")
        if arc in self.names:
            return
        self._dirs(arc)
        self.names.add(arc)
        self.tar.add(str(src), arcname=arc, recursive=False)

    def add_host(self, path: Path) -> None:
        """A host file under its canonical path; a symlink brings its target along."""
        path = _canonical(path)
        self.add(path)
        if path.is_symlink():
            self.add_host(path.parent / os.readlink(path))

    def add_text(self, arc: str, text: str, mode: int = 0o644) -> None:
        if arc in self.names:
            return
        data = text.encode()
        self._dirs(arc)
        info = tarfile.TarInfo(arc)
        info.size, info.mode = len(data), mode
        self.names.add(arc)
        self.tar.addfile(info, io.BytesIO(data))

    def add_dir(self, arc: str, mode: int) -> None:
        """A directory with ``mode`` (call before anything is added below it, or the mode is 0755)."""
        if arc in self.names:
            return
        self._dirs(arc)
        info = tarfile.TarInfo(arc)
        info.type, info.mode = tarfile.DIRTYPE, mode
        self.names.add(arc)
        self.tar.addfile(info)

    def add_link(self, arc: str, target: str) -> None:
        if arc in self.names:
            return
        self._dirs(arc)
        info = tarfile.TarInfo(arc)
        info.type, info.linkname = tarfile.SYMTYPE, target
        self.names.add(arc)
        self.tar.addfile(info)


def _interpreter_files(home: Path, ver: str) -> Iterator[Path]:
    """The interpreter, libpython, the stdlib (less STDLIB_SKIP) and its headers under ``home``."""
    stdlib = home / "lib" / ver
    # include: Python.h, which Inductor's kernels compile against.
    for top in (stdlib, home / "include" / ver):
        for dirpath, dirnames, names in os.walk(top):
            if Path(dirpath) == stdlib:
                dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP]
            for name in names + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
                if not name.endswith(SKIP_SUFFIXES):
                    yield Path(dirpath) / name
    yield from sorted((home / "lib").glob(f"lib{ver}*.so*"))
    for name in ("python3", "python", ver):
        if (home / "bin" / name).exists():
            yield home / "bin" / name


def build_python_rootfs(dest: Path, venvs: Sequence[Path] = (), binaries: Sequence[str] = BINARIES,
                        with_cxx: bool = True) -> Path:
    """Write a rootfs tar at ``dest`` with the interpreter of ``venvs`` (or this one) and its libraries.

    The interpreter keeps its host path, so a venv made from it on the host
    runs unchanged inside a container that mounts the venv at the same
    relative place (/workspace/.nox/<session>). ``with_cxx`` adds the host's
    C++ toolchain (vLLM-CPU's torch.compile needs it); without g++ or dpkg on
    the host that is a RuntimeError.
    """
    if venvs:
        home, ver = venv_python(venvs[0])
    else:
        home, ver = Path(sys.base_prefix), f"python{sys.version_info.major}.{sys.version_info.minor}"
    interpreter = list(_interpreter_files(home, ver))
    elf = [f for f in interpreter if _is_elf(f) and not f.is_symlink()]
    elf += list(_shared_objects(venvs))
    elf += [Path(os.path.realpath(b)) for b in binaries if Path(b).exists()]
    uv_bin = Path(uv.find_uv_bin())  # where nox looks first: the interpreter's scripts dir
    elf.append(uv_bin)
    toolchain = toolchain_files() if with_cxx else []
    elf += [f for f in toolchain if not f.is_symlink() and _is_elf(f)]
    # What resolves inside a venv comes in with the workspace mount, not the image.
    libs = {p for p in ldd_closure(elf) if not _inside(p, [v.resolve() for v in venvs])}
    site = home / "lib" / ver / "site-packages"
    with tarfile.open(dest, "w") as raw:
        tar = _Tar(raw)
        for d, mode in (("tmp", 0o1777), ("root", 0o700), ("workspace", 0o755)):
            tar.add_dir(d, mode)
        for d in MERGED_DIRS:
            if Path("/" + d).is_symlink():
                tar.add_link(d, os.readlink("/" + d))
        for f in interpreter:
            tar.add(f)
        tar.add_dir(str(site).lstrip("/"), 0o755)
        for src, rel in _package_files(PY_PACKAGES):
            tar.add(src, str(site / rel))
        tar.add(uv_bin, str(home / "bin" / "uv"))
        for b in binaries:
            if Path(b).exists():
                tar.add_host(Path(b))
        for lib in sorted(libs):
            tar.add_host(lib)
        for f in toolchain:
            tar.add_host(f)
        tar.add_link("usr/bin/python3", str(home / "bin" / ver))
        tar.add_text("etc/passwd", ETC_PASSWD)
        tar.add_text("etc/group", ETC_GROUP)
    return dest
