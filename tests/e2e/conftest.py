"""e2e suites: run against a real engine by ``nox -s e2e-<profile>``.

The ``server`` fixture, the ``model`` marker and the pool come from
ci/session/pytest_plugin.py, which pyproject.toml loads for every pytest run.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ci.kits import enforce, thresholds
from ci.profiles import runners
from ci.report import artefacts, render
from ci.session import pytest_plugin
from ci.text.summary import append_section

log = logging.getLogger("kiln.e2e")
# A test (or parameter) meant for GPU lanes: skipped at collection on the cpu lane, so
# the pool never launches its server there (prelaunch and warmup skip skipped tests).
GPU_ONLY = "kiln_gpu_only"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{GPU_ONLY}(reason): skipped on the cpu lane at collection")


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if pytest_plugin.profile_of(config).vendor != "cpu":
        return
    for item in items:
        marker = item.get_closest_marker(GPU_ONLY)
        if marker is not None:
            item.add_marker(pytest.mark.skip(reason=marker.args[0]))


@pytest.fixture
def kiln_thresholds(kiln_profile) -> thresholds.Thresholds:
    """Thresholds of this run's (profile, default model) pair; one-line failure when it has none."""
    try:
        return thresholds.for_profile(kiln_profile.name, kiln_profile.default_model)
    except thresholds.MissingThreshold as exc:
        pytest.fail(f"kiln: {exc}", pytrace=False)


@pytest.fixture
def kit_summary(pytestconfig) -> Path:
    """Where a kit writes its job-summary section: under reports/ (ci/report/jobsummary.py says why);
    `invoke report` and the chain's report step append it to the job summary."""
    path = artefacts.kit_summary(pytestconfig.getoption("--kiln-reports"),
                                   pytest_plugin.session_name(pytestconfig))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def bounds_rule(kiln_profile, record_property, kit_summary: Path):
    """The function ``enforce_bounds`` gives a test; plain, so tests/unit drives the e2e tests with it."""
    def apply(checks, model: str | None = None, enforced: bool = True) -> enforce.Judgement:
        # The calibrate command names the model only when it is not the profile's own default
        # (--kiln-model or a test's marker chose another).
        model = model or kiln_profile.default_model
        own = runners.get_profile(kiln_profile.name).default_model
        judged = enforce.judge(checks, kiln_profile.name, None if model == own else model)
        line = judged.uncalibrated_line()
        if line:
            # A warning, not a print: e2e sessions show logs live (log_cli), so the line
            # is in the output of a *passing* test too, where pytest hides its prints.
            log.warning("%s", line)
            record_property(render.UNCALIBRATED_PROPERTY, line)
            append_section(kit_summary, judged.markdown())
        failure = judged.failure()
        if failure and enforced:
            pytest.fail(failure, pytrace=False)
        if failure:
            log.warning("report only on %s: %s", kiln_profile.name, failure)
        return judged

    return apply


@pytest.fixture
def enforce_bounds(kiln_profile, record_property, kit_summary):
    """enforce_bounds(checks, model=None, enforced=True): the rule of ci/kits/enforce.py, applied.

    A broken measured bound fails the test (when ``enforced``: a profile may
    make perf report-only); an estimate is not enforced: the test logs a
    warning ``uncalibrated: run `invoke calibrate --profile P` `` (live in e2e
    output), appends it to the job summary, records it for the report's
    verdict line, and passes.
    """
    return bounds_rule(kiln_profile, record_property, kit_summary)
