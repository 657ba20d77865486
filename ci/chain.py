"""``invoke ci``: pull -> start -> warmup -> e2e -> report -> stop, as one command.

This is what a GPU runner's workflow step calls and what an engineer pastes
to reproduce a whole job. Inside a container when there is an image (the
engine lives there); on the host when there is no Docker engine and no
``--image`` (so ``invoke ci --profile cpu`` works on a laptop). Every step
prints one header line with its elapsed time; a failing step names itself,
its cause and the command that reruns just that step. The container is
removed and the report rendered on every path.
"""
from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TextIO

from ci.host import amdgpu
from ci.images import device_plan
from ci.profiles import runners
from ci.report import artefacts, jobsummary
from ci.session.shard import parse_shard
from ci.text import redact

log = logging.getLogger(__name__)

WORKDIR = "/workspace"
# NCCL/RCCL move intra-node traffic through /dev/shm; Docker's 64 MiB default
# fails tensor-parallel init on multi-GPU runners.
GPU_SHM_SIZE = "16g"
# vLLM-CPU's engine core moves its messages through /dev/shm too: with Docker's
# 64 MiB default the tiny model already failed ("160 MiB required, 64 MiB free").
CPU_SHM_SIZE = "2g"
# Keeps the container alive for `docker exec` without relying on the image's
# entrypoint (vllm-openai's would start a server). A bare `sleep` as PID 1
# ignores SIGTERM, so every stop waited the full SIGKILL timeout (30 s); the
# trap makes the shell end at once on `docker stop`.
KEEPALIVE = ("sh", "-c", "trap 'exit 0' TERM; sleep infinity & wait")
# Warmup of five models cold took ~45 min in sglang #24253; the e2e suites of
# an 8-GPU profile run for hours. These bound a wedged step, not a slow one.
WARMUP_STEP_TIMEOUT_S = 3 * 3600.0
E2E_STEP_TIMEOUT_S = 5 * 3600.0
# Environment passed into the container by name (values come from the host's
# environment, never from a command line). Secrets among them are redacted
# in everything printed. Not GITHUB_STEP_SUMMARY: its file is on the host, not
# in the container (every GPU chain run's perf kit died on it with
# FileNotFoundError); kits write reports/kit-summary-<session>.md instead and
# the report step appends it to the job summary on the host.
PASSTHROUGH_ENV = ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT", "KILN_CACHE_DIR", "PIP_INDEX_URL",
                   "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS")
# The image's python3 runs nox (bootstrapped below when the image lacks it): a
# `nox` script on PATH may belong to another interpreter or not exist at all.
CONTAINER_NOX = ("python3", "-m", "nox")
NOX_BOOTSTRAP = "python3 -m nox --version >/dev/null 2>&1 || python3 -m pip install -q -r requirements/nox.txt"


class StepFailed(RuntimeError):
    """A chain step failed: ``cause`` is one line, ``rerun`` reruns just that step."""

    def __init__(self, step: str, cause: str, rerun: str):
        self.step, self.cause, self.rerun = step, cause, rerun
        super().__init__(f"step {step} failed: {cause}")


@dataclass(frozen=True)
class Options:
    """What `invoke ci` was asked for."""

    profile: runners.Profile
    image: str | None = None
    mirrors: tuple[str, ...] = ()
    cold: bool = False
    shard: str | None = None
    pytest_args: tuple[str, ...] = ()
    dry_run: bool = False
    reuse_venv: bool = False
    workspace: Path = Path(".")
    run_tag: str = "local"
    devices: tuple[str, ...] = ()
    extra_mounts: dict = field(default_factory=dict)
    # Where the start looks for device nodes and the KFD topology (tests: a fake host).
    dev_root: Path = amdgpu.DEV_ROOT
    sys_root: Path = amdgpu.SYS_ROOT

    @property
    def session(self) -> str:
        return self.profile.session

    @property
    def stem(self) -> str:
        """The name this run's files carry under reports/: a shard's names its shard (ci/report/artefacts.py)."""
        return artefacts.stem(self.session, parse_shard(self.shard).pair if self.shard else None)


def nox_args(opts: Options, *, warmup: bool) -> list[str]:
    """The nox command for the warmup or e2e step (same session, so the same engine env)."""
    if warmup:
        return opts.profile.warmup_command(cold=opts.cold, reuse_venv=opts.reuse_venv, nox=CONTAINER_NOX)
    return opts.profile.nox_command(*(["--shard", opts.shard] if opts.shard else []), *opts.pytest_args,
                                    reuse_venv=opts.reuse_venv, nox=CONTAINER_NOX)


def rerun_command(opts: Options, step: str) -> str:
    """What an engineer types to rerun just ``step`` of this chain."""
    if step == "warmup":
        return shlex.join(["invoke", "warmup", "--profile", opts.profile.name] + (["--cold"] if opts.cold else []))
    # The e2e nox command as run, minus the interpreter: `-R` stays when the
    # chain reused the venv, so the rerun tests the same environment.
    return shlex.join(["nox"] + nox_args(opts, warmup=False)[3:])


def container_spec_args(opts: Options, env: dict) -> dict:
    """Keyword arguments of the ContainerSpec for this profile (pure: tested via --dry-run)."""
    p = opts.profile
    mounts = {str(opts.workspace.resolve()): WORKDIR, **opts.extra_mounts}
    hf_cache = Path.home() / ".cache" / "huggingface"
    if hf_cache.is_dir():
        mounts[str(hf_cache)] = "/root/.cache/huggingface"
    passed = {k: env[k] for k in PASSTHROUGH_ENV if k in env}
    return dict(
        image=opts.image or p.image, run_tag=opts.run_tag, vendor=p.vendor,
        device_ids=opts.devices, shm_size=GPU_SHM_SIZE if p.gpus else CPU_SHM_SIZE, mounts=mounts,
        env={**passed, "KILN_PROFILE": p.name, "PYTHONUNBUFFERED": "1"},
        command=KEEPALIVE, entrypoint=("/usr/bin/env",),
        # This chain's process owns the container: if it is SIGKILLed, the next
        # chain or `invoke reap` sees the owner gone and removes it.
        owner=None if opts.dry_run else containers_owner(),
    )


def containers_owner() -> str:
    from ci.images import containers  # the docker SDK is imported only when a chain runs
    return containers.owner_label()


class Runner:
    """Runs the chain's steps, printing one header line per step to ``out``."""

    def __init__(self, opts: Options, out: TextIO = sys.stdout, env: dict | None = None):
        self.opts = opts
        self.out = out
        self.env = dict(os.environ if env is None else env)
        self.redactor = redact.Redactor.from_env(self.env)
        self.t0 = time.monotonic()
        self.n = 0

    def say(self, text: str) -> None:
        print(self.redactor.redact(text), file=self.out, flush=True)

    def step(self, name: str, shown: str, rerun: str, action: Callable[[], str | None]) -> None:
        """Run one step: header, action (unless dry run), elapsed; StepFailed names the rerun."""
        self.n += 1
        self.say(f"[kiln ci] step {self.n} {name}: {shown}")
        if self.opts.dry_run:
            return
        start = time.monotonic()
        try:
            note = action()
        except StepFailed:
            raise
        except Exception as exc:  # every step's error becomes one line + the rerun
            raise StepFailed(name, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                             rerun) from exc
        self.say(f"[kiln ci] step {self.n} {name}: ok in {time.monotonic() - start:.1f} s"
                 + (f" ({note})" if note else ""))

    def failed(self, err: StepFailed) -> None:
        self.say(f"[kiln ci] FAILED at step {err.step} after {time.monotonic() - self.t0:.1f} s: "
                 f"{err.cause}\n[kiln ci] rerun just this step: {err.rerun}")


def _exec(container, argv: Sequence[str], out: TextIO, timeout_s: float, redactor) -> int:
    """Run ``argv`` in the container, streaming its output; the container is killed at the deadline."""
    api = container.client.api
    exec_id = api.exec_create(container.id, list(argv), workdir=WORKDIR)["Id"]
    stream = api.exec_start(exec_id, stream=True)
    timer = threading.Timer(timeout_s, lambda: container.kill())
    timer.daemon = True
    timer.start()
    try:
        for chunk in stream:
            text = chunk.decode("utf-8", errors="replace")
            out.write(redactor.redact(text))
            out.flush()
    finally:
        timer.cancel()
    code = api.exec_inspect(exec_id).get("ExitCode")
    return -1 if code is None else int(code)


def _host(argv: Sequence[str], cwd: Path, timeout_s: float) -> int:
    """Run ``argv`` on the host in the foreground (output straight to the terminal)."""
    try:
        return subprocess.run(list(argv), cwd=cwd, timeout=timeout_s, check=False).returncode
    except subprocess.TimeoutExpired:
        return -1


def run(opts: Options, *, out: TextIO = sys.stdout, env: dict | None = None,
        docker_available: Callable[[], bool] | None = None) -> int:
    """Run (or, with ``dry_run``, print) the whole chain; returns the exit code for the task."""
    from ci.images import pull as images  # the docker SDK is imported only when a chain runs
    from ci.report import render as reporting

    r = Runner(opts, out, env)
    p = opts.profile
    in_container = bool(opts.image or p.image) and (opts.dry_run or opts.image is not None or
                                                    (docker_available or _docker_up)())
    if not in_container:
        why = "no Docker engine" if (opts.image or p.image) else f"profile {p.name} has no image"
        r.say(f"[kiln ci] {p.name}: {why} — running the steps on the host")
    mirrors = images.mirrors_from_env(opts.mirrors, env=r.env) if in_container else ()
    image = opts.image or p.image
    spec_args = container_spec_args(opts, r.env) if in_container else {}
    holder: dict = {}
    failed: StepFailed | None = None
    junit = artefacts.junit(opts.workspace / "reports", opts.stem)
    if not opts.dry_run:
        # A JUnit file (or kit summary) left by an earlier run must never be reported as this one.
        junit.unlink(missing_ok=True)
        artefacts.kit_summary(junit.parent, opts.stem).unlink(missing_ok=True)
    if not opts.dry_run:
        from ci.host import reaper  # a chain killed earlier on this host may have left its trees
        for done in reaper.reap():
            r.say(f"[kiln ci] {done.line()}")
    try:
        if in_container:
            pull_cmd = shlex.join(["invoke", "pull", image] + [a for m in mirrors for a in ("--mirror", m)])
            r.step("pull", pull_cmd + "  (credentials, if any, from $KILN_REGISTRY_USER/"
                   "$KILN_REGISTRY_PASSWORD)", pull_cmd, lambda: _pull(image, mirrors, opts))
            start_cmd = _start_command(spec_args)
            devices_line = device_plan.describe(p.vendor, opts.devices, sys_root=opts.sys_root,
                                                dev_root=opts.dev_root)
            if devices_line:
                r.say(f"[kiln ci] {devices_line}")
            r.step("start", start_cmd, start_cmd, lambda: _start(holder, spec_args, opts))
        for name, warm in (("warmup", True), ("e2e", False)):
            argv = nox_args(opts, warmup=warm)
            timeout = WARMUP_STEP_TIMEOUT_S if warm else E2E_STEP_TIMEOUT_S
            if in_container:
                inner = NOX_BOOTSTRAP + " && " + shlex.join(argv)
                shown = f"docker exec -w {WORKDIR} <container> sh -c {shlex.quote(inner)}"
                action = _container_step(holder, inner, r, timeout, name)
            else:
                argv = [sys.executable, *argv[1:]]  # the task runner's Python has nox
                shown = shlex.join(argv)
                action = _host_step(argv, opts.workspace, timeout, name)
            r.step(name, shown, rerun_command(opts, name), action)
    except StepFailed as err:
        failed = err
        r.failed(err)
    finally:
        if holder.get("container") is not None:
            code = holder["container"].stop()
            r.say(f"[kiln ci] container {holder['container'].name} stopped (exit {code}) and removed")
        if holder.get("client") is not None:
            holder["client"].close()
        shown = f"invoke report --session {opts.session}" + (f" --junit {junit}" if opts.shard else "")
        try:
            r.step("report", shown, shown, lambda: _report(reporting, junit, opts))
        except StepFailed as err:
            r.failed(err)
            failed = failed or err
    return 1 if failed else 0


def _docker_up() -> bool:
    from ci.images import docker_client
    try:
        docker_client.connect().close()
        return True
    except docker_client.DockerError:
        return False


def _pull(image: str, mirrors, opts: Options) -> str:
    from ci.images import docker_client, pull as images
    with docker_client.session() as client:
        if opts.image and _is_local(client, image):
            return "already local"
        return images.pull(image, client=client, mirrors=mirrors,
                           credentials=images.credentials_from_env()).summary()


def _is_local(client, image: str) -> bool:
    import docker
    try:
        client.images.get(image)
        return True
    except docker.errors.ImageNotFound:
        return False


def _start_command(spec_args: dict) -> str:
    words = ["invoke", "start", spec_args["image"], "--vendor", spec_args["vendor"]]
    for d in spec_args["device_ids"]:
        words += ["--device", d]
    if spec_args["shm_size"]:
        words += ["--shm-size", spec_args["shm_size"]]
    for host, inside in spec_args["mounts"].items():
        words += ["--mount", f"{host}={inside}"]
    for k in spec_args["env"]:
        # A passed-through variable by name only: the pasting shell supplies its value.
        words += ["--env", k if k in PASSTHROUGH_ENV else f"{k}={spec_args['env'][k]}"]
    # The keep-alive, not the image's own entrypoint (an engine image's would
    # start its server and the exec steps would race it).
    words += ["--entrypoint", shlex.join(spec_args["entrypoint"]),
              "--command", shlex.join(spec_args["command"])]
    return shlex.join(words + ["--run-tag", spec_args["run_tag"]])


def _start(holder: dict, spec_args: dict, opts: Options) -> str:
    from ci.images import containers, docker_client
    client = docker_client.connect()
    holder["client"] = client
    containers.cleanup_stale(client, opts.run_tag)
    spec = containers.ContainerSpec(**spec_args)
    holder["container"] = containers.start(client, spec, log_dir=opts.workspace / "reports" / "logs",
                                           dev_root=opts.dev_root, sys_root=opts.sys_root)
    return f"container {holder['container'].name}"


def _container_step(holder: dict, inner: str, r: Runner, timeout: float, name: str):
    def action() -> None:
        box = holder["container"].container
        code = _exec(box, ["sh", "-c", inner], r.out, timeout, r.redactor)
        if code != 0:
            raise RuntimeError(f"{name} exited with {code} inside the container")
    return action


def _host_step(argv: list[str], cwd: Path, timeout: float, name: str):
    def action() -> None:
        code = _host(argv, cwd, timeout)
        if code != 0:
            raise RuntimeError(f"{name} exited with {code}")
    return action


def _report(reporting, junit: Path, opts: Options) -> str:
    md = reporting.build_report(junit, opts.session, root=opts.workspace)
    out = artefacts.report(opts.workspace / "reports", opts.stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md, encoding="utf-8")
    # With what the kits wrote in the container, through the bind mount.
    summary = jobsummary.publish(md, out.parent, opts.stem)
    return f"{out}" + (f", appended to {summary}" if summary else "")
