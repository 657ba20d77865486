"""ci/images/pull.py against a real dockerd and real docker-registry instances on 127.0.0.1.

Each pull starts with the test image absent from the daemon (``no_test_image``)
and registry logs tell which registry actually served the manifest.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from ci.images import docker_client, pull as images
from tests.integration.docker_env import BlackHole, DockerDaemon, FlakyProxy, RefusedPort

pytestmark = [pytest.mark.docker, pytest.mark.timeout(120)]

# Tiny backoff so retry tests take milliseconds; the delays are recorded anyway.
FAST = images.PullPolicy(upstream=images.Backoff(3, 0.01, 0.02), mirror=images.Backoff(3, 0.01, 0.02))
# Issue #4 goals for falling back past a dead mirror.
# Functional bounds ("gives up, does not hang"), loose enough for a loaded CI
# box; the speed goals (<= 1 s refused, <= 3 s black-holed) are measured by
# bench/pull_fallback.py, not asserted here. dockerd alone waits ~25 s.
REFUSED_BOUND_S = 5.0
BLACKHOLE_BOUND_S = 10.0


class Waits(list):
    """Records backoff waits instead of sleeping them (the delays are tiny anyway)."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def manifest_hits(registry) -> int:
    """How many manifest requests a registry has logged so far."""
    return registry.log_path.read_text(errors="replace").count("/manifests/")


def local_tags(client) -> set[str]:
    return {t for i in client.images.list() for t in i.tags}


def test_healthy_mirror_serves_and_image_gets_canonical_name(docker_env, docker_client, no_test_image, caplog):
    upstream_before = manifest_hits(docker_env.upstream)
    result = images.pull(docker_env.canonical, client=docker_client, mirrors=[docker_env.mirror.address],
                         policy=FAST)
    assert (result.source, result.registry, result.attempts) == ("mirror", docker_env.mirror.address, 1)
    assert docker_env.canonical in local_tags(docker_client)
    assert docker_env.ref(docker_env.mirror) not in local_tags(docker_client), "mirror name left behind"
    assert manifest_hits(docker_env.upstream) == upstream_before, "upstream was asked despite a healthy mirror"
    assert docker_client.images.get(docker_env.canonical).id == result.image_id
    assert "[mirror-pull]" not in caplog.text


def test_refused_mirror_falls_back_at_once(docker_env, docker_client, no_test_image, fronts, caplog):
    refused = fronts(RefusedPort)
    t0 = time.monotonic()
    result = images.pull(docker_env.canonical, client=docker_client, mirrors=[refused.address], policy=FAST)
    elapsed = time.monotonic() - t0
    assert result.source == "upstream" and docker_env.canonical in local_tags(docker_client)
    assert elapsed <= REFUSED_BOUND_S, f"fallback took {elapsed:.2f} s"
    line = next(r.message for r in caplog.records if "[mirror-pull]" in r.message)
    assert refused.address in line and "refused" in line
    assert result.attempts == 2  # one mirror probe-failed attempt, one upstream pull: no mirror retries


def test_blackholed_mirror_is_abandoned_not_waited_on(docker_env, docker_client, no_test_image, fronts, caplog):
    hole = fronts(BlackHole)
    t0 = time.monotonic()
    result = images.pull(docker_env.canonical, client=docker_client, mirrors=[hole.address], policy=FAST)
    elapsed = time.monotonic() - t0
    assert result.source == "upstream"
    assert elapsed <= BLACKHOLE_BOUND_S, f"fallback took {elapsed:.2f} s"
    assert hole.accepted >= 1, "the probe never reached the black hole"
    assert any("[mirror-pull]" in r.message and "no answer" in r.message for r in caplog.records)


def test_mirror_500_twice_then_ok_is_retried_on_the_mirror(docker_env, docker_client, no_test_image, fronts, caplog):
    proxy = fronts(FlakyProxy, docker_env.mirror.address, failures=2)
    waits = Waits()
    upstream_before = manifest_hits(docker_env.upstream)
    result = images.pull(docker_env.canonical, client=docker_client, mirrors=[proxy.address], policy=FAST,
                         wait=waits)
    assert result.source == "mirror" and result.registry == proxy.address
    assert proxy.failed == 2 and len(waits) == 2
    assert all(0 <= w <= FAST.mirror.cap_s for w in waits)
    mirror_lines = [r.message for r in caplog.records if "[mirror-pull]" in r.message]
    assert len(mirror_lines) == 2 and all("500" in m for m in mirror_lines)
    assert manifest_hits(docker_env.upstream) == upstream_before
    assert docker_env.canonical in local_tags(docker_client)


def test_mirror_lacking_the_tag_falls_back_without_retrying_it(docker_env, docker_client, no_test_image, caplog):
    waits = Waits()
    result = images.pull(docker_env.canonical, client=docker_client, mirrors=[docker_env.empty_mirror.address],
                         policy=FAST, wait=waits)
    assert result.source == "upstream" and result.attempts == 2 and waits == []
    assert any("[mirror-pull]" in r.message and "not found" in r.message for r in caplog.records)


def test_mirror_that_stalls_after_probe_is_cut_by_the_stall_timeout(docker_env, docker_client, no_test_image,
                                                                    fronts, caplog):
    stalled = fronts(FlakyProxy, docker_env.mirror.address, failures=0, stall_after_v2=True)
    policy = images.PullPolicy(upstream=FAST.upstream, mirror=images.Backoff(1, 0.01, 0.01), mirror_stall_s=1.0)
    t0 = time.monotonic()
    result = images.pull(docker_env.canonical, client=docker_client, mirrors=[stalled.address], policy=policy)
    elapsed = time.monotonic() - t0
    # dockerd on its own waits ~15-25 s for such a registry.
    assert result.source == "upstream" and elapsed < 5.0, f"took {elapsed:.1f} s"
    assert any("[mirror-pull]" in r.message and "no progress" in r.message for r in caplog.records)


def test_mirrors_tried_in_order_until_one_serves(docker_env, docker_client, no_test_image, fronts):
    refused = fronts(RefusedPort)
    result = images.pull(docker_env.canonical, client=docker_client,
                         mirrors=[refused.address, docker_env.empty_mirror.address, docker_env.mirror.address],
                         policy=FAST)
    assert (result.source, result.registry, result.attempts) == ("mirror", docker_env.mirror.address, 3)


def test_pinned_digest_is_pulled_and_checked(docker_env, docker_client, no_test_image):
    pinned = f"{docker_env.canonical}@{docker_env.digest}"
    result = images.pull(pinned, client=docker_client, mirrors=[docker_env.mirror.address], policy=FAST)
    assert result.source == "mirror" and result.digest == docker_env.digest
    assert docker_env.canonical in local_tags(docker_client)
    digests = docker_client.images.get(result.image_id).attrs["RepoDigests"]
    images.check_digest(digests, docker_env.digest)


def test_unknown_digest_stops_at_once(docker_env, docker_client, no_test_image):
    waits = Waits()
    with pytest.raises(images.ImageNotFound, match="not found"):
        images.pull(f"{docker_env.upstream.address}/{docker_env.repo}@sha256:{'0' * 64}", client=docker_client,
                    policy=FAST, wait=waits)
    assert waits == []


def test_upstream_404_is_not_retried(docker_env, docker_client, no_test_image):
    waits = Waits()
    with pytest.raises(images.ImageNotFound) as err:
        images.pull(docker_env.ref(docker_env.upstream, tag="no-such-tag"), client=docker_client, policy=FAST,
                    wait=waits)
    assert waits == [] and "no-such-tag" in str(err.value) and "\n" not in str(err.value)


def test_upstream_down_is_retried_with_backoff_then_fails_clearly(docker_env, docker_client, fronts, caplog):
    refused = fronts(RefusedPort)
    waits = Waits()
    with pytest.raises(images.PullError) as err:
        images.pull(f"{refused.address}/kiln/test:1", client=docker_client, policy=FAST, wait=waits)
    assert len(waits) == FAST.upstream.attempts - 1
    assert all(0 <= w <= FAST.upstream.ceiling(i) for i, w in enumerate(waits))
    assert "after 3 attempts" in str(err.value) and "connection refused" in str(err.value)
    assert sum("retrying in" in r.message for r in caplog.records) == 2


def _scan_argv(secret: bytes, stop: threading.Event, found: list, scans: list) -> None:
    """Read every process's argv until ``stop``; record any that holds ``secret``."""
    while not stop.is_set():
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    argv = Path(entry.path, "cmdline").read_bytes()
                except OSError:
                    continue
                if secret in argv:
                    found.append((entry.name, argv))
        scans.append(time.monotonic())


def test_credentials_from_env_reach_the_registry_but_no_argv_or_log(docker_env, docker_client, no_test_image,
                                                                    fronts, monkeypatch, caplog):
    caplog.set_level("DEBUG")
    # A slow front keeps login and pull in flight long enough to watch /proc.
    slow = fronts(FlakyProxy, docker_env.auth_upstream.address, failures=0, delay_s=0.1)
    monkeypatch.setenv(images.USER_ENV, docker_env.user)
    monkeypatch.setenv(images.PASSWORD_ENV, docker_env.password)
    creds = images.credentials_from_env()
    stop, found, scans = threading.Event(), [], []
    scanner = threading.Thread(target=_scan_argv, args=(docker_env.password.encode(), stop, found, scans))
    scanner.start()
    t0 = time.monotonic()
    try:
        result = images.pull(f"{slow.address}/{docker_env.repo}:{docker_env.tag}", client=docker_client,
                             credentials=creds, policy=FAST)
    finally:
        t1 = time.monotonic()
        stop.set()
        scanner.join()
    assert result.source == "upstream"
    assert sum(t0 <= t <= t1 for t in scans) >= 3, "too few /proc scans while login/pull ran"
    assert found == [], f"password visible in argv of pids {[p for p, _ in found]}"
    assert docker_env.password not in caplog.text
    assert docker_env.password not in repr(creds) + repr(result)
    for path in [docker_env.daemon.log_path, docker_env.auth_upstream.log_path]:
        assert docker_env.password not in path.read_text(errors="replace"), f"password in {path.name}"


def test_wrong_credentials_fail_at_once_with_a_clear_error(docker_env, docker_client, no_test_image):
    waits = Waits()
    t0 = time.monotonic()
    with pytest.raises(images.AuthFailed) as err:
        images.pull(docker_env.ref(docker_env.auth_upstream), client=docker_client,
                    credentials=images.Credentials(docker_env.user, "wrong-" + docker_env.password), policy=FAST,
                    wait=waits)
    assert waits == [] and time.monotonic() - t0 < 5
    message = str(err.value)
    assert "wrong credentials" in message and "401" in message and "\n" not in message
    assert docker_env.password not in message


def test_missing_credentials_say_which_variables_to_set(docker_env, docker_client, no_test_image):
    with pytest.raises(images.AuthFailed, match=images.USER_ENV):
        images.pull(docker_env.ref(docker_env.auth_upstream), client=docker_client, policy=FAST)


def test_credentials_are_never_sent_to_a_mirror(docker_env, docker_client, no_test_image, fronts):
    proxy = fronts(FlakyProxy, docker_env.mirror.address, failures=0)
    # Capture what the mirror front receives by forwarding through it.
    images.pull(docker_env.canonical, client=docker_client, mirrors=[proxy.address], policy=FAST,
                credentials=images.Credentials("kiln", "must-not-leak"))
    assert proxy.requests, "mirror was not used"
    assert not proxy.auth_headers, f"mirror received Authorization headers: {proxy.auth_headers}"



def test_daemon_that_dies_mid_run_is_one_clear_line(docker_env):
    # A second private daemon, so the session's one keeps serving other tests.
    root = Path(tempfile.mkdtemp(prefix="kiln-dk-"))  # short: unix socket paths max 108 bytes
    daemon = DockerDaemon(root).start()
    try:
        client = docker_client.connect(daemon.base_url, timeout=5)
        daemon.stop()
        with pytest.raises(docker_client.DockerUnavailable) as err:
            images.pull(docker_env.canonical, client=client, mirrors=[docker_env.mirror.address], policy=FAST)
        assert "stopped answering" in str(err.value) and "\n" not in str(err.value)
        client.close()
    finally:
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
