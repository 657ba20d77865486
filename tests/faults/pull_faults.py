"""Image pulls with real causes on a real Docker engine, failing on purpose so kiln types them infra.

Not collected by any session: tests/integration/test_pull_failure_classes.py runs it
in a child pytest with kiln's plugin and ``--kiln-retry-infra 1``, against its
own dockerd and registries (tests/integration/docker_env.py), passing them in
through the environment:

- a pull whose mirror and registry are both dead (refused ports): infra, and
  infra again on the retry;
- a pull whose registry is dead and whose LAN mirror answers 500 once (a
  mirror restarting: sglang #23156's case for retrying a mirror) and then
  serves: infra on the first attempt, passed after infra retry on the second.
"""
from __future__ import annotations

import os

import docker

from ci.images import pull as images

DOCKER_HOST_ENV = "KILN_FAULT_DOCKER_HOST"
DEAD_MIRROR_ENV = "KILN_FAULT_DEAD_MIRROR"
DEAD_IMAGE_ENV = "KILN_FAULT_DEAD_IMAGE"
BLIP_MIRROR_ENV = "KILN_FAULT_BLIP_MIRROR"
# One try per source: the retry under test is kiln's test-level infra retry,
# not the pull's own backoff (which would ride out the blip by itself).
ONE_TRY = images.PullPolicy(upstream=images.Backoff(attempts=1, base_s=0.0, cap_s=0.0),
                            mirror=images.Backoff(attempts=1, base_s=0.0, cap_s=0.0))
CLIENT_TIMEOUT_S = 60


def _pull(image: str, mirrors=()) -> images.PullResult:
    client = docker.DockerClient(base_url=os.environ[DOCKER_HOST_ENV], timeout=CLIENT_TIMEOUT_S)
    try:
        return images.pull(image, client=client, mirrors=mirrors, policy=ONE_TRY)
    finally:
        client.close()


def test_pull_from_a_dead_mirror_and_a_dead_registry():
    """infra: nothing answers; the image cannot come from anywhere."""
    _pull(os.environ[DEAD_IMAGE_ENV], mirrors=[os.environ[DEAD_MIRROR_ENV]])


def test_pull_through_a_mirror_blip():
    """infra on the first attempt (the mirror's 500, the registry refused), a real pull on the retry."""
    result = _pull(os.environ[DEAD_IMAGE_ENV], mirrors=[os.environ[BLIP_MIRROR_ENV]])
    assert result.source == "mirror" and result.image_id.startswith("sha256:")
