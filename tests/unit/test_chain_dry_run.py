"""`invoke ci --dry-run` as an engineer runs it: the commands of every step, in order, and nothing run.

Each test runs the real task in a subprocess from the repo root, with
secrets in its environment and DOCKER_HOST pointing at a socket that does
not exist: a dry run that touched Docker (pull, start) would fail there.
"""
from __future__ import annotations

import os
import re
import secrets
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ci import chain
from ci.profiles import runners

ROOT = Path(__file__).resolve().parents[2]
# One `invoke ci --dry-run` imports the chain and discovers GPUs: ~1 s here;
# the bound only stops a hung subprocess from hanging the suite.
INVOKE_TIMEOUT_S = 60.0
PYTEST_ID = "tests/e2e/test_api.py::test_chat[two words]"
STEP_RE = re.compile(r"^\[kiln ci\] step (\d+) (\w+): (.*)$")

pytestmark = pytest.mark.timeout(120)


def _invoke_ci(tmp_path: Path, *args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "KILN_", "GITHUB_"))}
    # No daemon behind this socket: anything the dry run tried to do with Docker would fail.
    env["DOCKER_HOST"] = f"unix://{tmp_path}/no-docker.sock"
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "invoke", "ci", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=INVOKE_TIMEOUT_S, stdin=subprocess.DEVNULL)


def _steps(stdout: str) -> list[tuple[int, str, str]]:
    return [(int(m[1]), m[2], m[3]) for m in map(STEP_RE.match, stdout.splitlines()) if m]


def _in_container(shown: str) -> list[str]:
    """The words of the command a `docker exec ... sh -c '<bootstrap> && <command>'` step runs."""
    outer = shlex.split(shown)
    assert outer[:7] == ["docker", "exec", "-w", "/workspace", "<container>", "sh", "-c"], shown
    inner = shlex.split(outer[7])
    return inner[len(inner) - inner[::-1].index("&&"):]


@pytest.fixture
def secret_env() -> dict[str, str]:
    """Credentials a runner has in its environment (random, so a hit cannot be a coincidence)."""
    return {
        "KILN_REGISTRY_USER": "kiln-bot",
        "KILN_REGISTRY_PASSWORD": "regpw-" + secrets.token_hex(12),
        "HF_TOKEN": "hf_" + secrets.token_hex(16),
        "GITHUB_TOKEN": "ghs_" + secrets.token_hex(18),
    }


def test_h100_4_dry_run_prints_every_step_in_order_with_devices_and_no_secret(tmp_path, secret_env):
    report = ROOT / "reports" / "report-e2e-h100-4.md"
    before = report.stat().st_mtime_ns if report.exists() else None

    done = _invoke_ci(tmp_path, "--profile", "h100-4", "--dry-run", "--", PYTEST_ID, extra_env=secret_env)

    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    steps = _steps(done.stdout)
    assert [(n, name) for n, name, _ in steps] == [(1, "pull"), (2, "start"), (3, "warmup"), (4, "e2e"),
                                                   (5, "report")], done.stdout
    shown = {name: cmd for _, name, cmd in steps}

    # Nothing ran: no step reports a result, nothing failed, no report was rendered.
    assert " ok in " not in out and "FAILED" not in out, out
    assert (report.stat().st_mtime_ns if report.exists() else None) == before

    # No secret value anywhere; the passed-through token is named, not expanded.
    for name, value in secret_env.items():
        if name != "KILN_REGISTRY_USER":
            assert value not in out, f"{name}'s value leaked into the dry-run output"
    assert "--env HF_TOKEN " in shown["start"] and "$HF_TOKEN" not in shown["start"]

    assert shown["pull"].startswith("invoke pull docker.io/vllm/vllm-openai:")
    start = shlex.split(shown["start"])
    assert start[:3] == ["invoke", "start", "docker.io/vllm/vllm-openai:v0.26.0"]
    assert start[start.index("--vendor") + 1] == "nvidia"
    assert [start[i + 1] for i, w in enumerate(start) if w == "--device"] == ["0", "1", "2", "3"]
    assert start[start.index("--shm-size") + 1] == "16g"
    assert f"{ROOT}=/workspace" in [start[i + 1] for i, w in enumerate(start) if w == "--mount"]
    # Pasted, it starts what the chain started: the keep-alive, not the image's own server.
    assert shlex.split(start[start.index("--entrypoint") + 1]) == ["/usr/bin/env"]
    assert tuple(shlex.split(start[start.index("--command") + 1])) == chain.KEEPALIVE

    # warmup and e2e run in the container, in the profile's nox session, after nox's bootstrap.
    assert _in_container(shown["warmup"]) == ["python3", "-m", "nox", "-s", "e2e-h100-4", "--", "--kiln-warmup"]
    # The pytest id with a space and brackets comes out as one argument, byte for byte.
    assert _in_container(shown["e2e"]) == ["python3", "-m", "nox", "-s", "e2e-h100-4", "--", PYTEST_ID]
    assert shown["report"] == "invoke report --session e2e-h100-4"


def test_cpu_dry_run_without_image_or_docker_says_it_runs_on_the_host(tmp_path):
    done = _invoke_ci(tmp_path, "--profile", "cpu", "--dry-run", "--cold", "--", "tests/e2e/test_api.py")

    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "running the steps on the host" in done.stdout
    steps = _steps(done.stdout)
    assert [name for _, name, _ in steps] == ["warmup", "e2e", "report"], done.stdout
    shown = {name: cmd for _, name, cmd in steps}
    # On the host, nox runs under the task runner's own interpreter (it has nox).
    warm, e2e = shlex.split(shown["warmup"]), shlex.split(shown["e2e"])
    assert Path(warm[0]).name.startswith("python") and Path(e2e[0]).name.startswith("python")
    assert warm[1:] == ["-m", "nox", "-s", "e2e-cpu", "--", "--kiln-warmup", "--kiln-cold"]
    assert e2e[1:] == ["-m", "nox", "-s", "e2e-cpu", "--", "tests/e2e/test_api.py"]
    assert "docker" not in done.stdout.replace("Docker engine", "")
    assert " ok in " not in out and "FAILED" not in out, out


# This machine has no amdgpu driver; on one that has it the plan names its own GPUs instead.
NO_KFD = not Path("/sys/class/kfd/kfd/topology/nodes").exists()


@pytest.mark.skipif(not NO_KFD, reason="this host has a KFD topology: the plan is its own, not a full runner's")
def test_amd_dry_run_plans_the_gpus_and_says_where_their_render_nodes_come_from(tmp_path):
    # Every MI300/MI325 job used to die at step 2: the plan handed an AMD container no device.
    done = _invoke_ci(tmp_path, "--profile", "mi300-2", "--dry-run")

    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    shown = {name: cmd for _, name, cmd in _steps(done.stdout)}
    start = shlex.split(shown["start"])
    assert start[:3] == ["invoke", "start", runners.get_profile("mi300-2").image]
    assert start[start.index("--vendor") + 1] == "amd"
    assert [start[i + 1] for i, w in enumerate(start) if w == "--device"] == ["0", "1"]
    assert ("[kiln ci] AMD GPUs 0 1 get /dev/kfd and their render nodes at the start; not resolvable here: "
            "no KFD topology at /sys/class/kfd/kfd/topology/nodes") in done.stdout


@pytest.mark.skipif(not NO_KFD, reason="this host has a KFD topology: a real run would start")
def test_amd_real_run_on_a_host_without_kfd_fails_in_one_line_before_any_step(tmp_path):
    done = _invoke_ci(tmp_path, "--profile", "mi300-2")

    assert done.returncode == 1
    assert done.stderr.strip() == ("ci: no KFD topology at /sys/class/kfd/kfd/topology/nodes: "
                                   "the amdgpu driver is not loaded on this host"), done.stderr
    assert "[kiln ci]" not in done.stdout, "no step may run without the GPUs"


def test_a_shard_of_the_chain_runs_its_part_and_reports_its_own_junit(tmp_path):
    done = _invoke_ci(tmp_path, "--profile", "h100-4", "--shard", "2/3", "--dry-run")
    assert done.returncode == 0, done.stdout + done.stderr
    shown = {name: cmd for _, name, cmd in _steps(done.stdout)}
    assert _in_container(shown["e2e"]) == ["python3", "-m", "nox", "-s", "e2e-h100-4", "--", "--shard", "2/3"]
    # Its files carry its shard (ci/report/artefacts.py), so the report reads this shard's JUnit.
    report = shlex.split(shown["report"])
    assert report[:4] == ["invoke", "report", "--session", "e2e-h100-4"]
    assert report[4] == "--junit" and report[5].endswith("reports/junit-e2e-h100-4-shard2of3.xml")


@pytest.mark.parametrize("spec,line", [("4/3", "ci: --shard 4/3: need 1 <= i <= n and n >= 1"),
                                       ("two", "ci: --shard expects i/n (e.g. 2/4), got 'two'")])
def test_a_bad_shard_is_one_line_before_any_step(tmp_path, spec, line):
    done = _invoke_ci(tmp_path, "--profile", "h100-4", "--shard", spec, "--dry-run")
    assert done.returncode == 1 and done.stderr.strip() == line
    assert "[kiln ci] step" not in done.stdout
