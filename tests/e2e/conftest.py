"""e2e suites: run against a real engine by ``nox -s e2e-<profile>``.

The ``server`` fixture, the ``model`` marker and the pool come from
ci/pytest_plugin.py, which pyproject.toml loads for every pytest run.
"""
