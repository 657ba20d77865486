"""Fixtures for tests that need the real Docker engine (see docker_env.py)."""
from __future__ import annotations

import contextlib

import pytest

from tests import requires
from tests.integration import docker_env as dk


@pytest.fixture(scope="session")
def docker_env():
    """dockerd + registries for the whole session; where they cannot run, the reason (a failure in CI)."""
    reason = dk.engine_unavailable_reason()
    if reason:
        requires.missing(f"real Docker engine unavailable: {reason}")
    with dk.docker_env() as env:
        yield env


@pytest.fixture
def docker_client(docker_env):
    """An SDK client on the test daemon, closed after the test."""
    client = docker_env.daemon.client()
    with contextlib.closing(client):
        yield client


def _remove_test_images(client, repo: str) -> None:
    for image in client.images.list():
        names = list(image.tags) + list(image.attrs.get("RepoDigests") or [])
        if any(f"/{repo}:" in n or f"/{repo}@" in n for n in names):
            client.images.remove(image.id, force=True)


@pytest.fixture
def no_test_image(docker_env, docker_client):
    """The test image absent from the daemon before and after the test, so each pull is real."""
    _remove_test_images(docker_client, docker_env.repo)
    yield
    _remove_test_images(docker_client, docker_env.repo)


@pytest.fixture
def fronts():
    """Collects fault fronts (RefusedPort, BlackHole, FlakyProxy) and closes them after the test."""
    opened = []

    def make(cls, *args, **kwargs):
        front = cls(*args, **kwargs)
        opened.append(front)
        return front

    yield make
    for front in opened:
        front.close()
