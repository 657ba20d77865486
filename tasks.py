"""invoke tasks: the steps of a GPU runner's job, each runnable on its own.

    invoke gpus [--json]            what GPUs kiln sees and how
    invoke ib [--json]              active RDMA rails, native InfiniBand first
    invoke pull IMAGE [--mirror HOST:PORT ...] [--attempts N]
    invoke start IMAGE [--vendor nvidia --device 0 ...]   /   invoke stop
    invoke reap [--dry-run]         stop what a killed run left (owner gone), nothing else
    invoke calibrate --profile P [--runs N] [--model M] [--write]   measured bounds, as a diff
    invoke flakes --junit DIR [--days 7] [--write]   fail rates per test and profile; the quarantine
    invoke durations --junit DIR    add runs to the durations store the shards are packed by
    invoke plan --profile P --target 20m   shards from measured durations, and the matrix
    invoke merge --shards DIR --expect 'e2e-cpu:3'   one report for every shard of a matrix

Each task is thin: it checks its prerequisite, calls a ci/ module and turns a
kiln error into one clear line (invoke.Exit), never a traceback.
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
from pathlib import Path

from invoke import Exit, task

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from ci.report import artefacts, jobsummary  # noqa: E402  (needs the repo root on sys.path; stdlib only)

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                    datefmt="%H:%M:%S")


@task(help={"json": "print the discovery as JSON instead of text",
            "clear_held": "forget sticky GPU release failures whose memory is back",
            "force": "with --clear-held: forget them even if memory is still held"})
def gpus(c, json=False, clear_held=False, force=False):
    """Show the GPUs kiln sees, how it found them (NVML / nvidia-smi / AMD tools / none), which are visible."""
    from ci.host import gpu, gpumem
    from ci.host.gpu_telemetry import telemetry_for

    try:
        found = gpu.discover()
    except gpu.GpuDiscoveryError as exc:
        raise Exit(f"GPU discovery failed: {exc}") from exc
    print(gpu.to_json(found) if json else gpu.describe(found))
    ledger = gpumem.ReleaseLedger(gpumem.ledger_dir())
    if clear_held:
        cleared = ledger.clear(telemetry=None if force else telemetry_for(found))
        print(f"cleared release failures on GPUs {cleared}", file=sys.stderr)
    for held in ledger.held().values():
        print(f"HELD {held.describe()}", file=sys.stderr)


@task(help={"json": "print the rails as JSON instead of text"})
def ib(c, json=False):
    """List ACTIVE RDMA ports (native InfiniBand before RoCE) and the devices engines should use."""
    from ci.host import ib as rdma

    rails = rdma.active_rails()
    print(rdma.to_json(rails) if json else rdma.describe(rails))


def _docker_modules():
    # Imported per task: `invoke -l` and the GPU tasks must work without the docker SDK.
    from ci.images import containers, docker_client, pull as images
    return containers, docker_client, images


@task(
    iterable=["mirror"],
    help={
        "image": "image reference, e.g. docker.io/vllm/vllm-openai:v0.11.0 (may pin @sha256:...)",
        "mirror": "registry mirror HOST:PORT, tried before the image's registry (repeatable; "
                  "also $KILN_REGISTRY_MIRRORS, comma-separated)",
        "attempts": "attempts on the image's own registry (default 6; backoff 30 s doubling to 300 s)",
    },
)
def pull(c, image, mirror=None, attempts=None):
    """Pull IMAGE: registry mirrors first, then its own registry with backoff (credentials from env)."""
    containers, docker_client, images = _docker_modules()
    try:
        images.parse_ref(image)  # bad input is reported before touching the daemon
        backoff = images.Backoff(attempts=int(attempts)) if attempts else images.Backoff()
        policy = images.PullPolicy(upstream=backoff)
        mirrors = images.mirrors_from_env(mirror or ())
        with docker_client.session() as client:
            result = images.pull(image, client=client, mirrors=mirrors,
                                 credentials=images.credentials_from_env(), policy=policy)
    except (docker_client.DockerError, ValueError) as exc:
        raise Exit(f"pull: {exc}", code=1) from None
    print(result.summary())


@task(
    iterable=["device", "mount", "env"],
    help={
        "image": "image to run (must be local: `invoke pull` first)",
        "vendor": "nvidia | amd | cpu",
        "device": "allocated GPU: NVIDIA index/UUID, AMD index (KFD order) or render node (renderD128) "
                  "(repeatable)",
        "shm_size": "shared memory size, e.g. 16g",
        "mount": "HOST_PATH=CONTAINER_PATH[:ro] (repeatable): HF cache, workspace",
        "env": "KEY=VALUE, or a bare KEY taken from this shell's environment, passed to the "
               "container (repeatable)",
        "command": "command line to run in the container (default: the image's)",
        "entrypoint": "entrypoint replacing the image's (e.g. /usr/bin/env, so --command runs "
                      "instead of an engine image's server)",
        "run_tag": "label for this run's containers (default $KILN_RUN_TAG, the GitHub run id, or 'local')",
        "runner": "runner name label; stale cleanup only touches this runner's containers "
                  "(default $RUNNER_NAME)",
    },
)
def start(c, image, vendor="cpu", device=None, shm_size=None, mount=None, env=None, command="",
          entrypoint="", run_tag=None, runner=None):
    """Start an engine container after removing stale kiln containers of earlier runs."""
    containers, docker_client, _ = _docker_modules()
    try:
        tag = containers.check_run_tag(run_tag) if run_tag else containers.run_tag_from_env()
        runner = runner or os.environ.get("RUNNER_NAME") or None
        spec = containers.ContainerSpec(
            image=image, run_tag=tag, vendor=vendor, device_ids=tuple(device or ()), shm_size=shm_size,
            mounts=containers.parse_assignments(mount or (), "--mount"),
            env=containers.parse_env(env or (), os.environ),
            command=shlex.split(command) or None, entrypoint=shlex.split(entrypoint) or None,
            runner=runner)
        with docker_client.session() as client:
            containers.cleanup_stale(client, tag, runner=runner)
            handle = containers.start(client, spec)
    except docker_client.DockerError as exc:
        raise Exit(f"start: {exc}", code=1) from None
    print(f"started {handle.name} (run tag {tag}); logs: {handle.log_path}; "
          f"stop with: invoke stop --run-tag {tag}")


@task(help={
    "run_tag": "run whose containers to stop (default $KILN_RUN_TAG, the GitHub run id, or 'local')",
    "timeout": "seconds between SIGTERM and SIGKILL (default 30)",
})
def stop(c, run_tag=None, timeout=None):
    """Stop and remove this run's kiln containers (SIGTERM, SIGKILL after --timeout); saves their logs."""
    containers, docker_client, _ = _docker_modules()
    try:
        tag = containers.check_run_tag(run_tag) if run_tag else containers.run_tag_from_env()
        with docker_client.session() as client:
            names = containers.stop_run(client, tag,
                                        timeout=float(timeout or containers.STOP_TIMEOUT_S))
    except docker_client.DockerError as exc:
        raise Exit(f"stop: {exc}", code=1) from None
    print(f"stopped {len(names)} container(s) of run {tag}" + (f": {', '.join(names)}" if names else ""))


@task(help={"dry_run": "only say what would be stopped or removed"})
def reap(c, dry_run=False):
    """Stop engine trees and chain containers whose owner process is gone (never another live job's)."""
    from ci.host import reaper

    done = reaper.reap(dry_run=dry_run)
    for result in done:
        print(result.line())
    lines = []
    try:
        containers, docker_client, _ = _docker_modules()
        with docker_client.session() as client:
            lines = containers.reap_orphaned(client, dry_run=dry_run)
    except ImportError:
        print("containers: docker SDK not installed here; not checked", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 (no daemon is a normal state for this task)
        print(f"containers: not checked ({exc})", file=sys.stderr)
    for line in lines:
        print(line)
    if not done and not lines:
        print("nothing to reap: every registered tree's owner is alive")
    if any(r.survivors for r in done):
        raise Exit("some processes survived SIGKILL (listed above)")


@task(help={"cache_dir": "kiln cache root (default $KILN_CACHE_DIR or .kiln/cache)", "seed": "weight seed"})
def tinymodel(c, cache_dir=None, seed=0):
    """Build (or reuse) the tiny Llama model the cpu profile serves, and print its directory."""
    from ci.engine import tinymodel as tm

    try:
        print(tm.ensure_tiny_model(Path(cache_dir) if cache_dir else None, seed=int(seed)))
    except ValueError as exc:
        raise Exit(f"tinymodel: {exc}") from None


@task(help={"session": "nox session, e.g. e2e-h100-4 or tests",
            "junit": "JUnit XML (default: reports/junit-<session>.xml)",
            "servers": "server records (default: servers-<session>.json beside the JUnit)",
            "out": "write the Markdown here instead of printing it"})
def report(c, session, junit=None, servers=None, out=None):
    """Render a run's Markdown report (verdict, repro commands, logs); appended to $GITHUB_STEP_SUMMARY when set."""
    from ci.report import render as reporting

    junit = Path(junit) if junit else artefacts.junit(ROOT / "reports", session)
    md = reporting.build_report(junit, session, servers_path=servers, root=ROOT)
    # The kits' own sections (perf table, accuracy, reference) go to the job summary too;
    # a shard's carry its JUnit's stem (e2e-cpu-shard2of3).
    summary = jobsummary.publish(md, junit.parent, artefacts.junit_stem(junit) or session)
    if out:
        Path(out).write_text(md, encoding="utf-8")
        print(f"report written to {out}" + (f" and appended to {summary}" if summary else ""))
    else:
        print(md, end="")


@task(help={"session": "nox session, e.g. e2e-h100-4 or tests",
            "junit": "JUnit XML (default: reports/junit-<session>.xml)",
            "servers": "server records (default: beside the JUnit)",
            "pr": "pull request number (default: from $GITHUB_EVENT_PATH)",
            "repo": "owner/name (default: $GITHUB_REPOSITORY)",
            "update_only": "edit an existing sticky comment, never open one (green runs)",
            "markdown": "post this Markdown file as is (`invoke merge`'s report) instead of rendering the JUnit"})
def comment(c, session, junit=None, servers=None, pr=None, repo=None, update_only=False, markdown=None):
    """Create or update this session's sticky PR comment; token from $GITHUB_TOKEN (never printed)."""
    from ci.report import github
    from ci.report import render as reporting

    if markdown:
        try:
            md = Path(markdown).read_text(encoding="utf-8")
        except OSError as exc:
            raise Exit(f"comment: cannot read {markdown}: {exc.strerror}") from None
    else:
        md = reporting.build_report(junit or artefacts.junit(ROOT / "reports", session), session,
                                    servers_path=servers, root=ROOT)
    try:
        outcome, cid = github.post_report(md, session, pr=int(pr) if pr else None, repo=repo,
                                          create=not update_only)
    except (github.GitHubError, ValueError) as exc:
        raise Exit(f"comment: {exc}") from None
    print(f"sticky comment for {session}: {outcome}" + (f" (id {cid})" if cid else ""))


@task(help={"junit": "directory of JUnit files: the workflows' junit-* artefacts (folders or the zips "
                     "GitHub serves) or any folder of them",
            "days": "window in days, ending now (default 7: vLLM's rule)",
            "quarantine": "the quarantine file (default $KILN_QUARANTINE or tests/quarantine.json)",
            "write": "write the proposed quarantine (default: print the diff only)",
            "all": "list every test, not only those that failed or change state"})
def flakes(c, junit, days=7, quarantine=None, write=False, all=False):
    """Runs, fails and fail rate per test and hardware profile from a JUnit history; propose the quarantine."""
    from datetime import timedelta

    from ci.report import flakes as history
    from ci.report import quarantine as rule

    path = Path(quarantine) if quarantine else rule.default_path()
    try:
        if int(days) < 1:
            raise ValueError(f"--days must be >= 1, got {days}")
        review = rule.review(junit, path, window=timedelta(days=int(days)))
    except (history.HistoryError, rule.QuarantineError, ValueError) as exc:
        raise Exit(f"flakes: {exc}") from None
    print(review.text(everything=all))
    if not review.changed():
        print(f"\nquarantine unchanged: {path}")
        return
    print(f"\nproposed change to {path}:\n{review.diff()}", end="")
    if write:
        path.write_text(review.after, encoding="utf-8")
        print(f"written: {path}")
    else:
        print("(not written: rerun with --write to apply it)")


@task(help={"event": "GitHub event: pull_request, schedule or workflow_dispatch",
            "input": "the runner pool a workflow_dispatch asked for (mi300, mi325)"})
def route(c, event, input=None):
    """Print pool=, matrix=, count= for $GITHUB_OUTPUT (pull_request -> MI300, schedule -> MI325)."""
    from ci.profiles import routing

    try:
        print(routing.format_outputs(routing.outputs(event, input)), end="")
    except routing.RoutingError as exc:
        raise Exit(f"route: {exc}", code=2) from None


@task(iterable=["junit"], help={
    "junit": "directory of JUnit files to add (the workflows' artefacts, folders or zips, or reports/); repeatable",
    "store": "the durations store (default $KILN_DURATIONS or .kiln/durations.json)",
})
def durations(c, junit=None, store=None):
    """Add runs' JUnit to the durations store (p90 per test and server key, per profile, last 14 days)."""
    from ci.report import durations as store_mod
    from ci.report import flakes as history

    path = Path(store) if store else store_mod.default_path()
    try:
        found = store_mod.Store.load(path)
        added = sum(found.ingest(history.read_history(d)) for d in junit or ())
    except (store_mod.DurationsError, history.HistoryError) as exc:
        raise Exit(f"durations: {exc}") from None
    found.prune()
    found.save(path)
    print(f"durations store {path}: {added} new run(s) added")
    for profile in sorted(found.tests):
        known = found.estimates(profile)
        print(f"  {profile}: {len(known.p90)} tests; {known.age_line()}")


@task(help={
    "profile": "plan this runner profile alone and print its matrix",
    "event": "plan a workflow run: pull_request, schedule or workflow_dispatch (GPU profiles routed as `invoke route`)",
    "input": "the runner pool a workflow_dispatch asked for (mi300, mi325)",
    "target": "wall-clock target a shard job (default 20m): 20m, 1h30m, 900s",
    "durations": "the durations store (default $KILN_DURATIONS or .kiln/durations.json)",
    "gpu": "plan the self-hosted GPU jobs too (--no-gpu for a fork's PR: it gets none)",
    "github_output": "print key=value lines for $GITHUB_OUTPUT (the plan itself goes to stderr)",
})
def plan(c, profile=None, event=None, input=None, target="20m", durations=None, gpu=True, github_output=False):
    """Shards per profile from measured durations (ceil(sum p90 x 1.15 / target)) and the profile x shard matrix."""
    import json

    from ci.profiles import routing, runners
    from ci.report import durations as store_mod
    from ci.session import plan as planning

    if bool(profile) == bool(event):
        raise Exit("plan: give --profile P (one profile) or --event E (a workflow run), not both or neither", code=2)
    path = Path(durations) if durations else store_mod.default_path()
    try:
        target_s = planning.parse_target(target)
        store = store_mod.Store.load(path)
        if profile:
            plans = [planning.plan_profile(runners.get_profile(profile), store.estimates(profile), target_s)]
            values = {"matrix": json.dumps({"include": plans[0].entries()}, separators=(",", ":")),
                      "count": str(plans[0].shards), "expected": planning.expected(plans)}
        else:
            values, plans = planning.workflow_outputs(event, input, store, target_s, gpu=gpu)
    except (planning.PlanError, store_mod.DurationsError, routing.RoutingError, ValueError) as exc:
        raise Exit(f"plan: {exc}", code=2) from None
    text = "\n".join([f"durations store: {path}", *(ln for p in plans for ln in p.lines())])
    if github_output:
        print(text, file=sys.stderr)
        print(routing.format_outputs(values), end="")
        return
    print(text)
    for key in ("matrix", "cpu_matrix"):
        if key in values:
            entries = json.loads(values[key])["include"]
            print(f"{key} ({len(entries)} jobs): " + "".join(f"\n  {json.dumps(e)}" for e in entries))
    print(f"expected: {values['expected']}")


@task(help={
    "shards": "directory holding every shard's artefacts (JUnit, server records, shard records), any layout",
    "expect": "every session and its shard count, as `invoke plan` printed it: 'e2e-cpu:3 e2e-h100-4:2'",
    "out": "where to write the merged Markdown (default reports/report-e2e-matrix.md; "
           "`invoke comment --markdown` posts it)",
})
def merge(c, shards, expect, out=None):
    """One report for the whole matrix: every shard's results merged; a missing shard is red, never green."""
    from ci.report import matrix

    try:
        report = matrix.build(shards, matrix.parse_expected(expect))
    except matrix.MatrixError as exc:
        raise Exit(f"merge: {exc}", code=2) from None
    target = Path(out) if out else artefacts.report(ROOT / "reports", matrix.MATRIX_SESSION)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(report.markdown, encoding="utf-8")
    summary = jobsummary.append(report.job_summary())
    print(report.markdown, end="")
    print(f"\nmerged report written to {target}" + (f" and appended to {summary}" if summary else ""),
          file=sys.stderr)
    if not report.green:
        raise Exit("merge: the matrix is not green (above: what failed or is missing)", code=1)


def _need_nox(task_name: str, cmd: list[str]) -> None:
    """Stop before running ``cmd`` when its first word is not on PATH (one line, and the fix)."""
    if not shutil.which(cmd[0]):
        raise Exit(f"{task_name}: no `{cmd[0]}` on PATH -- install the task tools: "
                   f"python3 -m pip install -r requirements/tasks.txt", code=127)


@task(iterable=["model"], help={
    "profile": "runner profile (ci/profiles/runners.py) whose e2e declarations say what to warm (default cpu)",
    "cold": "ignore markers and clear kiln's caches for the selected specs first",
    "strict": "fail when any warmup fails (default: report and go on)",
    "model": "warm only this model (repeatable; default: every model the e2e tests declare)",
    "reuse_venv": "reuse the e2e session's venv as is (nox -R: no install)",
})
def warmup(c, profile="cpu", cold=False, strict=False, model=None, reuse_venv=False):
    """Warm the engines' JIT caches for the e2e tests' own server declarations; warm specs cost nothing."""
    from ci.profiles import runners

    try:
        prof = runners.get_profile(profile)
    except ValueError as exc:
        raise Exit(f"warmup: {exc}") from None
    cmd = prof.warmup_command(cold=cold, strict=strict, models=model or (), reuse_venv=reuse_venv)
    _need_nox("warmup", cmd)
    result = c.run(shlex.join(cmd), warn=True, pty=False)
    if result.exited != 0:
        raise Exit(f"warmup failed (exit {result.exited}); rerun: {shlex.join(cmd)}", code=result.exited)


@task(help={
    "profile": "runner profile (ci/profiles/runners.py) to measure, on a runner of that kind",
    "runs": "fresh server launches to measure, >= 3 (default 3): each figure's min/median/max",
    "model": "model to calibrate (default: the profile's)",
    "write": "write the proposed rows to ci/kits/measured_bounds.json (default: print the diff only)",
    "reuse_venv": "reuse the e2e session's venv as is (nox -R: no install)",
})
def calibrate(c, profile, runs=3, model=None, write=False, reuse_venv=False):
    """Measure this runner N times (perf, accuracy, occupancy) and propose its bounds as a reviewable diff."""
    from ci.calibrate import command
    from ci.profiles import runners

    try:
        prof = runners.get_profile(profile)
    except ValueError as exc:
        raise Exit(f"calibrate: {exc}", code=2) from None
    cmd = command.nox_command(prof, runs=int(runs), model=model, write=write, reuse_venv=reuse_venv)
    _need_nox("calibrate", cmd)
    result = c.run(shlex.join(cmd), warn=True, pty=False)
    if result.exited != 0:
        raise Exit(f"calibrate failed (exit {result.exited}); rerun: {shlex.join(cmd)}", code=result.exited)


@task(iterable=["exclude", "constraint", "requirement"], help={
    "engine": "engine requirement, e.g. vllm==0.26.0 (its torch== pin must be the runner's CUDA torch)",
    "dest": "directory to fill (default wheelhouse/<engine>-py<python>)",
    "python": "the runner's Python, major.minor (default 3.12)",
    "present": "file of names the runner's image already has (pip freeze / pip list / one a line)",
    "exclude": "a name not to download (repeatable)",
    "constraint": "constraints file that settles a version conflict (repeatable)",
    "requirement": "requirements file to add, e.g. requirements/e2e-gpu.txt (repeatable)",
})
def wheelhouse(c, engine, dest=None, python="3.12", present=None, exclude=None, constraint=None,
               requirement=None):
    """On a connected host: wheels of ENGINE + what the runner lacks, for `nox -s e2e-<gpu> -- --kiln-wheelhouse DIR`."""
    from ci.install import wheelhouse as wh

    out = Path(dest) if dest else ROOT / "wheelhouse" / f"{engine.replace('==', '-')}-py{python}"
    argv = [engine, "--dest", str(out), "--python", python]
    argv += [a for p in (present,) if p for a in ("--present", p)]
    argv += [a for n in exclude or () for a in ("--exclude", n)]
    argv += [a for f in constraint or () for a in ("-c", f)]
    argv += [a for f in requirement or () for a in ("-r", f)]
    code = wh.main(argv)
    if code:
        raise Exit(code=code)


def _after_double_dash() -> list[str]:
    # invoke joins the remainder with spaces, losing the quoting of ids like
    # 'test_chat[two words]'; argv still has it.
    return sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []


@task(iterable=["mirror", "device"], help={
    "profile": "runner profile (ci/profiles/runners.py), e.g. h100-4 or cpu",
    "image": "engine image to run in (default: the profile's; pulled unless already local)",
    "mirror": "registry mirror HOST:PORT tried before the image's registry (repeatable)",
    "cold": "cold JIT warmup (clear kiln's caches first)",
    "shard": "run shard i/n of the e2e tests (balanced by earlier JUnit timings)",
    "dry_run": "print every command the chain would run (credentials redacted) and run none",
    "device": "GPU indices for the container (default: the first <profile GPUs> visible; AMD: from KFD)",
    "reuse_venv": "reuse the e2e session's venv as is (nox -R: no install)",
    "run_tag": "label for this run's container (default $KILN_RUN_TAG, the GitHub run id, or 'local')",
})
def ci(c, profile, image=None, mirror=None, cold=False, shard=None, dry_run=False, device=None,
       reuse_venv=False, run_tag=None):
    """pull -> start -> warmup -> e2e -> report -> stop, in the profile's container (or on the host)."""
    from ci import chain
    from ci.profiles import runners

    try:
        prof = runners.get_profile(profile)
        if shard:
            from ci.session.shard import parse_shard
            parse_shard(shard)  # a bad --shard is one line now, before any step, not a failed e2e step
        devices = tuple(device or ())
        if not devices:
            from ci.images import device_plan
            devices = device_plan.plan_devices(prof, dry_run=dry_run)
        from ci.images import containers
        tag = containers.check_run_tag(run_tag) if run_tag else containers.run_tag_from_env()
    except (ValueError, RuntimeError) as exc:
        raise Exit(f"ci: {exc}") from None
    opts = chain.Options(profile=prof, image=image, mirrors=tuple(mirror or ()), cold=cold, shard=shard,
                         pytest_args=tuple(_after_double_dash()), dry_run=dry_run, reuse_venv=reuse_venv,
                         workspace=ROOT, run_tag=tag, devices=devices)
    code = chain.run(opts)
    if code:
        raise Exit(code=code)
