"""Offline engines: a directory of wheels for one engine version and one runner platform.

Air-gapped GPU runners reach no package index. On a connected host::

    invoke wheelhouse vllm==0.26.0 --python 3.12 --present image-packages.txt --dest wh/

downloads the engine and every dependency the runner's image lacks, for the
runner's Python and platform; on the runner the e2e session installs from it
with no index (``--kiln-wheelhouse DIR`` / ``$KILN_WHEELHOUSE``, see
ci/install/engine_env.py), adding packages only.

Why not one ``pip download vllm``: pip resolves the engine's ``torch==`` pin on
the connected host and downloads gigabytes of CUDA wheels that the runner's
image already holds (the pin must match the runner's CUDA torch anyway:
README, "Offline engines"). pip cannot be told "the target already has these",
so kiln walks the dependency graph itself: each requirement is fetched by pip
(``download --no-deps`` with the target's Python and platform tags), its
metadata read with ``packaging``, and names the runner has (``--present``) are
not followed. A version conflict is reported in one line, never resolved
silently; pin the side you want with ``--constraint``.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import zipfile
from collections import deque
from dataclasses import dataclass, field
from email.parser import HeaderParser
from pathlib import Path
from typing import Iterable

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

log = logging.getLogger(__name__)

MANIFEST = "kiln-wheelhouse.json"
PINS = "requirements.txt"
# manylinux tags pip must be told one by one (it matches each glibc level
# exactly); these cover the wheels vLLM's dependency tree publishes on x86-64.
DEFAULT_PLATFORMS = tuple(
    [f"manylinux_2_{n}_x86_64" for n in (5, 17, 24, 26, 27, 28, 31, 34, 35)]
    + ["manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"])
# pip prints "Saved PATH" for a new file and "  File was already downloaded PATH"
# (indented) when the folder holds it already: a re-run into the same folder.
_SAVED = re.compile(r"^\s*(?:Saved|File was already downloaded) (.+\.whl)\s*$", re.M)


class WheelhouseError(RuntimeError):
    """A wheelhouse cannot be built or used; the message is one line naming the cause."""


@dataclass(frozen=True)
class Target:
    """The runner's interpreter: what markers and wheel tags are evaluated against."""

    python: str = "3.12"
    platforms: tuple[str, ...] = DEFAULT_PLATFORMS
    # Where pip looks (default: its configured index); e.g. ("--no-index", "--find-links", DIR).
    index_args: tuple[str, ...] = ()

    def markers(self, extra: str = "") -> dict[str, str]:
        """PEP 508 marker environment of a CPython ``python`` on x86-64 Linux."""
        return {"python_version": self.python, "python_full_version": f"{self.python}.0",
                "implementation_name": "cpython", "platform_python_implementation": "CPython",
                "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
                "platform_machine": "x86_64", "platform_release": "", "platform_version": "",
                "implementation_version": f"{self.python}.0", "extra": extra}

    def pip_flags(self) -> list[str]:
        flags = [*self.index_args, "--only-binary=:all:", "--python-version", self.python,
                 "--implementation", "cp"]
        for tag in self.platforms:
            flags += ["--platform", tag]
        return flags


@dataclass
class _Chosen:
    version: str
    path: Path
    requires: list[Requirement]
    extras: set[str] = field(default_factory=set)
    wanted_by: str = ""


def read_names(path: Path) -> set[str]:
    """Canonical package names from a ``pip freeze`` / ``pip list`` / one-name-a-line file."""
    names = set()
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-") or line.lower().startswith("package "):
            continue
        names.add(canonicalize_name(re.split(r"[\s=<>!~;@\[]", line, maxsplit=1)[0]))
    return names


def read_requirements(path: Path) -> list[str]:
    """Requirement lines of a requirements file (``-r`` includes followed, options dropped)."""
    out = []
    for raw in Path(path).read_text().splitlines():
        line = raw.split(" #", 1)[0].split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if line.startswith("-r "):
            out += read_requirements(Path(path).parent / line[3:].strip())
        elif line and not line.startswith("-"):
            out.append(line)
    return out


def wheel_metadata(wheel: Path) -> tuple[str, str, list[Requirement]]:
    """(name, version, requirements) read from a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next((n for n in zf.namelist()
                     if n.count("/") == 1 and n.endswith(".dist-info/METADATA")), None)
        if meta is None:
            raise WheelhouseError(f"{wheel.name}: no .dist-info/METADATA in the wheel")
        headers = HeaderParser().parsestr(zf.read(meta).decode("utf-8", "replace"))
    reqs = []
    for line in headers.get_all("Requires-Dist") or []:
        try:
            reqs.append(Requirement(line))
        except InvalidRequirement as exc:
            raise WheelhouseError(f"{wheel.name}: bad Requires-Dist {line!r}: {exc}") from None
    return headers["Name"], headers["Version"], reqs


def _download(req: str, dest: Path, target: Target) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           *target.pip_flags(), "-d", str(dest), req]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = _SAVED.findall(proc.stdout)
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise WheelhouseError(f"no wheel of {req} for Python {target.python} on "
                              f"{target.platforms[0]}...: {last}")
    return Path(found[-1])


def _applies(req: Requirement, target: Target, extras: Iterable[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate(target.markers(e)) for e in ("", *extras))


def build(roots: list[str], dest: Path, target: Target = Target(), *, present: set[str] = frozenset(),
          exclude: set[str] = frozenset(), constraints: list[str] = ()) -> dict:
    """Download ``roots`` and their dependencies minus ``present``/``exclude`` into ``dest``.

    Returns the manifest (also written to ``dest/kiln-wheelhouse.json``, with the
    pins in ``dest/requirements.txt``). Raises WheelhouseError on a conflict.
    """
    dest.mkdir(parents=True, exist_ok=True)
    pinned = {canonicalize_name(r.name): r.specifier for r in map(Requirement, constraints)}
    chosen: dict[str, _Chosen] = {}
    skipped_present, skipped_excluded = set(), set()
    queue = deque((Requirement(r), "(asked)") for r in roots)
    while queue:
        req, parent = queue.popleft()
        name = canonicalize_name(req.name)
        if name in present:
            skipped_present.add(name)
            continue
        if name in exclude:
            skipped_excluded.add(name)
            continue
        have = chosen.get(name)
        if have is not None:
            if not req.specifier.contains(have.version, prereleases=True):
                raise WheelhouseError(
                    f"conflict: {parent} needs {req} but {name} {have.version} was chosen for "
                    f"{have.wanted_by}; pin one side in a --constraint file")
            new = set(req.extras) - have.extras
            if new:
                have.extras |= new
                queue.extend((r, f"{name}[{','.join(sorted(new))}]") for r in have.requires
                             if r.marker is not None and _applies(r, target, new)
                             and not _applies(r, target, ()))
            continue
        spec = req.specifier & pinned.get(name, SpecifierSet())
        wheel = _download(f"{req.name}{spec}", dest, target)
        dist, version, requires = wheel_metadata(wheel)
        chosen[name] = _Chosen(version, wheel, requires, set(req.extras), parent)
        log.info("%s %s (for %s)", dist, version, parent)
        queue.extend((r, f"{name} {version}") for r in requires if _applies(r, target, req.extras))
    manifest = {
        "roots": list(roots), "python": target.python, "platforms": list(target.platforms),
        "wheels": {n: {"version": c.version, "file": c.path.name} for n, c in sorted(chosen.items())},
        "present_not_downloaded": sorted(skipped_present),
        "excluded": sorted(skipped_excluded),
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    (dest / PINS).write_text(
        f"# generated by `invoke wheelhouse {' '.join(roots)} --python {target.python}`;"
        " rebuild the wheelhouse to change it\n"
        + "".join(f"{n}=={c.version}\n" for n, c in sorted(chosen.items())))
    return manifest


def load(dest: Path) -> dict:
    """The manifest of a built wheelhouse; a one-line error when ``dest`` is not one."""
    path = Path(dest) / MANIFEST
    if not path.is_file():
        raise WheelhouseError(f"{dest} is not a kiln wheelhouse (no {MANIFEST}); "
                              f"build one with `invoke wheelhouse ENGINE==VERSION --dest {dest}`")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ci.install.wheelhouse", description=__doc__.splitlines()[0])
    ap.add_argument("roots", nargs="*", help="requirements, e.g. vllm==0.26.0")
    ap.add_argument("-r", "--requirement", action="append", default=[], type=Path)
    ap.add_argument("--dest", required=True, type=Path)
    ap.add_argument("--python", default="3.12", help="the runner's Python (major.minor)")
    ap.add_argument("--platform", action="append", default=None)
    ap.add_argument("--present", type=Path, help="names the runner already has (pip freeze/list)")
    ap.add_argument("--exclude", action="append", default=[], help="names not to download")
    ap.add_argument("-c", "--constraint", action="append", default=[], type=Path)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    roots = list(a.roots) + [r for f in a.requirement for r in read_requirements(f)]
    if not roots:
        ap.error("name at least one requirement (e.g. vllm==0.26.0)")
    target = Target(a.python, tuple(a.platform) if a.platform else DEFAULT_PLATFORMS)
    try:
        manifest = build(roots, a.dest, target,
                         present=read_names(a.present) if a.present else set(),
                         exclude={canonicalize_name(n) for n in a.exclude},
                         constraints=[r for f in a.constraint for r in read_requirements(f)])
    except (WheelhouseError, OSError) as exc:
        print(f"kiln: wheelhouse: {exc}", file=sys.stderr)
        return 2
    print(f"{len(manifest['wheels'])} wheels in {a.dest} for Python {target.python}; "
          f"{len(manifest['present_not_downloaded'])} names left to the runner's image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
