"""Pull faults on a real Docker engine are typed infra; only infra is retried, and a retried pass says so.

Runs tests/faults/pull_faults.py in a child pytest with kiln's plugin and
``--kiln-retry-infra 1``, against this session's dockerd and registries
(tests/integration/docker_env.py) and fronts on 127.0.0.1: a dead mirror and
a dead registry (refused ports) fail twice; a mirror that answers 500 to the
first attempt's probe and then serves fails once, then passes -- reported as
"passed after infra retry", never as a plain pass. The other five faults run
against the real engine on the cpu lane (tests/e2e/test_failure_classes.py).
"""
from __future__ import annotations

import re

import pytest

from ci.report import outcome
from tests.faults import child, pull_faults
from tests.integration.docker_env import FlakyProxy, RefusedPort

pytestmark = [pytest.mark.docker]
# Two pulls that fail at once (refused ports), one that fails then pulls a
# small image from a local registry: seconds; this bounds a hang.
CHILD_TIMEOUT_S = 180.0


def test_pull_faults_are_infra_and_a_blip_passes_after_infra_retry(docker_env, no_test_image, fronts, tmp_path):
    dead_registry, dead_mirror = fronts(RefusedPort), fronts(RefusedPort)
    blip = fronts(FlakyProxy, docker_env.mirror.address, failures=1)  # one 500: the mirror probe's
    env = {pull_faults.DOCKER_HOST_ENV: docker_env.daemon.base_url,
           pull_faults.DEAD_MIRROR_ENV: dead_mirror.address,
           pull_faults.DEAD_IMAGE_ENV: f"{dead_registry.address}/{docker_env.repo}:{docker_env.tag}",
           pull_faults.BLIP_MIRROR_ENV: blip.address}
    run = child.run_suite("pull_faults.py", tmp_path, "--kiln-retry-infra=1", env=env, timeout_s=CHILD_TIMEOUT_S)
    names = ["test_pull_from_a_dead_mirror_and_a_dead_registry", "test_pull_through_a_mirror_blip"]
    child.show(run, names)
    assert run.returncode == 1, run.output  # the dead pull failed; the blip did not

    dead = run.case(names[0])
    assert dead.outcome == "failed"
    assert dead.prop(outcome.CLASS_PROPERTY) == outcome.INFRA
    assert re.match(r"image pull/registry: could not pull .* after 1 attempts; last error: .*connection refused",
                    dead.prop(outcome.REASON_PROPERTY)), dead.prop(outcome.REASON_PROPERTY)
    assert dead.prop(outcome.RETRY_PROPERTY) == "retried 1 of 1: infra again"
    assert [a.split(": ")[:2] for a in outcome.attempts(dead)] == [["1", "infra"]]

    blipped = run.case(names[1])
    assert blipped.outcome == "passed" and outcome.passed_after_retry(blipped)
    assert blipped.prop(outcome.CLASS_PROPERTY) is None  # its last attempt passed
    assert blipped.prop(outcome.RETRY_PROPERTY) == "retried 1 of 1: passed"
    assert re.match(r"1: infra: image pull/registry: ", outcome.attempts(blipped)[0]), outcome.attempts(blipped)
    assert blip.failed == 1  # the one 500 was the first attempt's; the retry pulled through the mirror

    assert "PASSED after infra retry" in run.output and run.output.count("RETRY (infra)") == 2, run.output
    verdict = run.report.splitlines()[0]
    assert "1 failed (1 infra), 1 passed (1 after infra retry)" in verdict, verdict
    assert "### 🔁 Passed after infra retry: 1" in run.report
