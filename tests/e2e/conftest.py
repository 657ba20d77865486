"""e2e suites: run against a real engine by ``nox -s e2e-<profile>``.

The ``server`` fixture, the ``model`` marker and the pool come from
ci/session/pytest_plugin.py, which pyproject.toml loads for every pytest run.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from ci.kits import thresholds
from ci.report import artefacts
from ci.session import pytest_plugin


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
