"""ci/images/containers.py against a real dockerd: labels, logs, stop/kill, stale cleanup by label only.

The runnable test image holds the host's /bin/sh, /bin/sleep and /bin/cat
(docker_env.build_rootfs_tar); ``sleep`` as PID 1 ignores SIGTERM, which is
exactly the engine that needs the kill half of "stop with timeout then kill".
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import docker.errors
import pytest

from ci.images import containers

pytestmark = [pytest.mark.docker, pytest.mark.timeout(120)]

# Bounded poll for log lines to reach the file (they arrive in milliseconds).
LOG_DEADLINE_S = 10.0
POLL_INTERVAL_S = 0.05
# Stop timeout used in tests: short so the SIGKILL path runs quickly.
SHORT_STOP_S = 1.0


def wait_for_text(path: Path, text: str, deadline_s: float = LOG_DEADLINE_S) -> str:
    """The file's content once it contains ``text``; fails after the deadline."""
    deadline = time.monotonic() + deadline_s
    content = ""
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        time.sleep(POLL_INTERVAL_S)
    raise AssertionError(f"{text!r} not in {path} after {deadline_s} s; got {content!r}")


def spec(dk, tag: str, *command: str, **kw) -> containers.ContainerSpec:
    return containers.ContainerSpec(image=dk.run_image, run_tag=tag, command=list(command), **kw)


def exists(client, name: str) -> bool:
    try:
        client.containers.get(name)
    except docker.errors.NotFound:
        return False
    return True


@pytest.fixture
def started():
    """Stops (and so removes) every container a test started, whatever the test did."""
    handles = []
    yield handles
    for h in handles:
        h.stop(SHORT_STOP_S)


def test_start_labels_logs_then_stop_kills_after_timeout(docker_env, docker_client, tmp_path, started, caplog):
    caplog.set_level("INFO", logger="ci.images.containers")
    log_path = tmp_path / "c.log"
    c = containers.start(docker_client, spec(docker_env, "run-a", "/bin/sh", "-c",
                                             "echo engine up; echo to stderr >&2; exec sleep 300"), log_path)
    started.append(c)
    labels = docker_client.containers.get(c.name).labels
    assert labels[containers.LABEL_MANAGED] == "1" and labels[containers.LABEL_RUN_TAG] == "run-a"
    content = wait_for_text(log_path, "to stderr")
    assert "engine up" in content
    t0 = time.monotonic()
    code = c.stop(SHORT_STOP_S)
    elapsed = time.monotonic() - t0
    assert code == 137, "sleep ignores SIGTERM as PID 1: docker must have SIGKILLed it"
    assert SHORT_STOP_S <= elapsed < SHORT_STOP_S + 10
    assert not exists(docker_client, c.name), "container not removed"
    assert "engine up" in caplog.text and "last 30 log lines" in caplog.text  # tail logged
    assert c.stop() == 137  # idempotent


def test_sigterm_is_honoured_before_the_kill(docker_env, docker_client, tmp_path, started):
    c = containers.start(docker_client, spec(docker_env, "run-a", "/bin/sh", "-c",
                                             "trap 'echo got TERM; exit 0' TERM; echo ready; "
                                             "while :; do sleep 0.1; done"), tmp_path / "c.log")
    started.append(c)
    wait_for_text(c.log_path, "ready")
    assert c.stop(timeout=20) == 0
    assert "got TERM" in c.log_path.read_text()


def test_container_that_exits_by_itself_reports_code_and_tail(docker_env, docker_client, tmp_path, started, caplog):
    caplog.set_level("INFO", logger="ci.images.containers")
    c = containers.start(docker_client, spec(docker_env, "run-a", "/bin/sh", "-c", "echo boom >&2; exit 3"),
                         tmp_path / "c.log")
    started.append(c)
    assert c.wait(timeout=LOG_DEADLINE_S) == 3
    assert c.stop() == 3
    assert "boom" in caplog.text and "exited with 3" in caplog.text


def test_log_stream_outlives_a_silence_longer_than_the_client_timeout(docker_env, tmp_path, started):
    # An engine loading weights prints nothing for minutes; the log file must
    # still get what it prints afterwards (no read timeout cuts the stream).
    with contextlib.closing(docker_env.daemon.client()) as client:
        client.api.timeout = 2
        c = containers.start(client, spec(docker_env, "run-a", "/bin/sh", "-c",
                                          "echo first; sleep 3; echo second; exec sleep 300"), tmp_path / "c.log")
        started.append(c)
        content = wait_for_text(c.log_path, "second")
        assert content.splitlines() == ["first", "second"]
        client.api.timeout = 60  # the stop must not race a short timeout
        c.stop(SHORT_STOP_S)


def test_mounts_env_and_shm_are_applied(docker_env, docker_client, tmp_path, started):
    data = tmp_path / "hf-cache"
    data.mkdir()
    (data / "weights.txt").write_text("tiny weights\n")
    c = containers.start(docker_client, spec(docker_env, "run-a", "/bin/sh", "-c",
                                             "cat /models/weights.txt; echo model=$KILN_MODEL; exec sleep 300",
                                             mounts={str(data): "/models:ro"}, env={"KILN_MODEL": "tiny"},
                                             shm_size="64m"), tmp_path / "c.log")
    started.append(c)
    content = wait_for_text(c.log_path, "model=tiny")
    assert "tiny weights" in content
    host_config = docker_client.containers.get(c.name).attrs["HostConfig"]
    assert host_config["ShmSize"] == 64 * 1024 * 1024
    assert host_config["Binds"] == [f"{data}:/models:ro"]


def test_missing_image_is_an_error_not_a_pull(docker_env, docker_client, tmp_path):
    bad = containers.ContainerSpec(image="127.0.0.1:1/kiln/absent:1", run_tag="run-a", command=["/bin/sh"])
    with pytest.raises(containers.ContainerError, match="invoke pull"):
        containers.start(docker_client, bad, tmp_path / "c.log")


def test_command_that_cannot_start_leaves_no_container(docker_env, docker_client, tmp_path, caplog):
    caplog.set_level("INFO", logger="ci.images.containers")
    with pytest.raises(containers.ContainerError, match="did not start") as err:
        containers.start(docker_client, spec(docker_env, "run-bad", "/no/such/binary"), tmp_path / "c.log")
    assert "\n" not in str(err.value)
    left = docker_client.containers.list(all=True, filters={"label": f"{containers.LABEL_RUN_TAG}=run-bad"})
    assert left == []
    assert "last 30 log lines" in caplog.text  # the tail is logged on this path too


def test_stale_cleanup_removes_only_kiln_containers_of_other_runs(docker_env, docker_client, tmp_path, started):
    old = containers.start(docker_client, spec(docker_env, "run-old", "/bin/sleep", "300"), tmp_path / "old.log")
    current = containers.start(docker_client, spec(docker_env, "run-now", "/bin/sleep", "300"), tmp_path / "now.log")
    started += [old, current]
    # Not kiln's: no labels, and one that merely shares the run-tag key.
    foreign = docker_client.containers.run(docker_env.run_image, ["/bin/sleep", "300"], detach=True,
                                           network_mode="none", name="someone-elses")
    lookalike = docker_client.containers.run(docker_env.run_image, ["/bin/sleep", "300"], detach=True,
                                             network_mode="none", labels={containers.LABEL_RUN_TAG: "run-old"})
    try:
        removed = containers.cleanup_stale(docker_client, "run-now")
        assert removed == [old.name]
        assert not exists(docker_client, old.name)
        assert exists(docker_client, current.name)
        foreign.reload()
        lookalike.reload()
        assert foreign.status == "running" and lookalike.status == "running"
    finally:
        foreign.remove(force=True)
        lookalike.remove(force=True)


def test_stale_cleanup_scoped_to_a_runner(docker_env, docker_client, tmp_path, started):
    mine = containers.start(docker_client, spec(docker_env, "run-old", "/bin/sleep", "300", runner="r1"),
                            tmp_path / "a.log")
    neighbour = containers.start(docker_client, spec(docker_env, "run-other", "/bin/sleep", "300", runner="r2"),
                                 tmp_path / "b.log")
    started += [mine, neighbour]
    assert containers.cleanup_stale(docker_client, "run-now", runner="r1") == [mine.name]
    assert exists(docker_client, neighbour.name)


def test_stop_run_stops_every_container_of_that_run_only(docker_env, docker_client, tmp_path, started):
    a = containers.start(docker_client, spec(docker_env, "run-x", "/bin/sh", "-c", "echo a-out; exec sleep 300"),
                         tmp_path / "a.log")
    b = containers.start(docker_client, spec(docker_env, "run-x", "/bin/sleep", "300"), tmp_path / "b.log")
    other = containers.start(docker_client, spec(docker_env, "run-y", "/bin/sleep", "300"), tmp_path / "c.log")
    started += [a, b, other]
    wait_for_text(a.log_path, "a-out")
    # stop_run attaches as `invoke stop` would, from another process: no log pump of its own.
    stopped = containers.stop_run(docker_client, "run-x", timeout=SHORT_STOP_S, log_dir=tmp_path / "stop-logs")
    assert sorted(stopped) == sorted([a.name, b.name])
    assert not exists(docker_client, a.name) and not exists(docker_client, b.name)
    assert exists(docker_client, other.name)
    assert "a-out" in (tmp_path / "stop-logs" / f"{a.name}.log").read_text()


def test_container_of_a_killed_owner_is_reaped_a_live_owners_is_not(docker_env, docker_client, tmp_path,
                                                                     started):
    # The owner a SIGKILLed `invoke ci` leaves behind: a process that is gone.
    # It lives until its stdin closes: long enough to be labelled, then gone.
    dead = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    dead_label = containers.owner_label(dead.pid)
    dead.stdin.close()
    dead.wait(10)
    orphan = containers.start(docker_client, spec(docker_env, "run-dead", "/bin/sleep", "300",
                                                  owner=dead_label), tmp_path / "a.log")
    alive = containers.start(docker_client, spec(docker_env, "run-alive", "/bin/sleep", "300",
                                                 owner=containers.owner_label()), tmp_path / "b.log")
    started += [orphan, alive]
    assert containers.owner_gone(dead_label) is True and containers.owner_gone(None) is None
    assert containers.reap_orphaned(docker_client, dry_run=True)[0].startswith(f"would remove container {orphan.name}")
    assert exists(docker_client, orphan.name)
    lines = containers.reap_orphaned(docker_client)
    assert len(lines) == 1 and orphan.name in lines[0] and "is gone" in lines[0]
    assert not exists(docker_client, orphan.name)
    # Another run's container whose owner still runs: another job on this host.
    assert containers.cleanup_stale(docker_client, "run-now") == []
    assert exists(docker_client, alive.name)


def test_invoke_start_takes_an_entrypoint_and_env_by_name(docker_env, docker_client, tmp_path):
    # What the chain's rerun line for its start step relies on: the image's
    # entrypoint replaced, and a passed-through variable named, not written out.
    secret = "s3cr3t-" + tmp_path.name[-6:]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")},
           "DOCKER_HOST": docker_env.daemon.base_url, "KILN_TEST_PASSED": secret}
    root = Path(__file__).resolve().parents[2]
    tag = "run-entry"
    done = subprocess.run(
        [sys.executable, "-m", "invoke", "start", docker_env.run_image, "--entrypoint", "/bin/sh",
         "--command", "-c 'echo passed=$KILN_TEST_PASSED; exec sleep 300'",
         "--env", "KILN_TEST_PASSED", "--env", "KILN_UNSET_HERE", "--run-tag", tag],
        cwd=root, env=env, capture_output=True, text=True, timeout=60)
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        assert secret not in done.stdout + done.stderr
        box = next(c for c in docker_client.containers.list(all=True)
                   if c.labels.get(containers.LABEL_RUN_TAG) == tag)
        assert box.attrs["Config"]["Entrypoint"] == ["/bin/sh"]
        assert f"KILN_TEST_PASSED={secret}" in box.attrs["Config"]["Env"]
        assert not any(e.startswith("KILN_UNSET_HERE") for e in box.attrs["Config"]["Env"])
    finally:
        stopped = subprocess.run([sys.executable, "-m", "invoke", "stop", "--run-tag", tag, "--timeout", "1"],
                                 cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
