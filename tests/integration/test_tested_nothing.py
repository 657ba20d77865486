"""A run that tests nothing fails in one line: an empty shard, an e2e session whose every test skipped.

Each case is a real child run, as CI would start it: ``nox`` with a session
that shards the way the e2e sessions do (ci/session/shard.py), or ``pytest``
with kiln's plugin (ci/session/skips.py). Each failing case has a twin that
differs in one thing and goes green, so the failure comes from the rule.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# A child nox/pytest run collects a handful of trivial tests: seconds; this
# bounds a hang on a loaded 2-core machine.
CHILD_TIMEOUT_S = 120

# Three plain tests; the nox session shards them as `nox -s e2e-cpu -- --shard i/n` does.
SHARDED_TESTS = textwrap.dedent('''
    def test_a(): pass
    def test_b(): pass
    def test_c(): pass
''')
NOXFILE = textwrap.dedent('''
    import sys
    from pathlib import Path
    import nox
    sys.path.insert(0, {root!r})
    from ci.session import shard

    @nox.session(name="e2e-cpu", venv_backend="none")
    def e2e(session):
        spec, rest = shard.split_shard_arg(session.posargs)
        targets = shard.select_for_session(session, rest, spec, Path("reports"), python=sys.executable)
        session.run(sys.executable, "-m", "pytest", *targets, "-p", "no:cacheprovider", external=True)
''')
# What kiln's pyproject.toml gives every run: the plugin.
PYTEST_INI = "[pytest]\naddopts = -p ci.session.pytest_plugin\n"


def _child_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    # No durations store: the split is by count, whatever this checkout's own store holds.
    env.update(PYTHONPATH=str(ROOT), KILN_CACHE_DIR=str(tmp_path / "cache"), CUDA_VISIBLE_DEVICES="-1",
               KILN_DURATIONS=str(tmp_path / "durations.json"))
    return env


def _nox_shard(tmp_path: Path, spec: str) -> subprocess.CompletedProcess:
    (tmp_path / "noxfile.py").write_text(NOXFILE.format(root=str(ROOT)))
    (tmp_path / "pytest.ini").write_text(PYTEST_INI)
    (tmp_path / "test_sharded.py").write_text(SHARDED_TESTS)
    argv = [sys.executable, "-m", "nox", "-f", str(tmp_path / "noxfile.py"), "-s", "e2e-cpu", "--",
            "test_sharded.py", "--shard", spec]
    return subprocess.run(argv, cwd=tmp_path, env=_child_env(tmp_path), capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S)


def test_an_empty_shard_fails_its_nox_session_in_one_line(tmp_path):
    done = _nox_shard(tmp_path, "4/4")
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert ("shard 4/4 has no tests: 3 collected fill only 3 of 4 shards (tests sharing a server stay "
            "together); use --shard i/3 or fewer") in out, out
    assert "passed" not in out, "an empty shard must not run pytest at all"


def test_the_same_split_with_a_fitting_n_is_green(tmp_path):
    done = _nox_shard(tmp_path, "3/3")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "1 passed" in out and "shard 3/3: 1 of 3 tests" in out


# e2e tests (they mark ``gpus`` or ask for ``server``) that skip themselves
# while running, for different reasons; a plain test beside them (not e2e)
# passes but does not count. RUN_ONE lets one e2e test run instead.
RUNTIME_SKIPS = textwrap.dedent('''
    import os, pytest

    @pytest.fixture
    def bound():
        pytest.skip("no measured bound: profile cpu has none (ci/kits/thresholds.py)")

    @pytest.mark.gpus(0)
    def test_perf(bound):
        pass

    @pytest.mark.gpus(0)
    def test_occupancy(bound):
        pass

    @pytest.mark.gpus(0)
    def test_docker():
        if not os.environ.get("RUN_ONE"):
            pytest.skip("real Docker engine unavailable: missing dockerd")

    def test_plain_unit():
        pass
''')
# Skipped before anything runs: a known issue, a skip marker, capacity (tp=2 on cpu).
COLLECTION_SKIPS = textwrap.dedent('''
    import pytest

    @pytest.mark.known_issue(["cpu"], reason="decode differs on this lane")
    @pytest.mark.gpus(0)
    def test_known():
        pass

    @pytest.mark.skip(reason="waiting for engine 0.27")
    @pytest.mark.gpus(0)
    def test_marked():
        pass

    @pytest.mark.model("fake", tp=2)
    def test_tp2(server):
        pass
''')
# kiln's own unit tests: no server, no gpus marker -- not e2e, whatever they skip.
UNIT_SKIPS = textwrap.dedent('''
    import pytest

    def test_a():
        pytest.skip("frobnicator not on PATH")

    @pytest.mark.skip(reason="later")
    def test_b():
        pass
''')


def _pytest(tmp_path: Path, source: str, **env: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_child.py").write_text(source)
    argv = [sys.executable, "-m", "pytest", str(tmp_path / "test_child.py"), "-p", "ci.session.pytest_plugin",
            "-p", "no:cacheprovider", f"--rootdir={tmp_path}", "--kiln-profile=cpu",
            f"--kiln-reports={tmp_path / 'reports'}", "-rs"]
    return subprocess.run(argv, cwd=tmp_path, env={**_child_env(tmp_path), **env}, capture_output=True,
                          text=True, timeout=CHILD_TIMEOUT_S)


def test_every_e2e_test_skipped_while_running_fails_naming_the_reasons(tmp_path):
    done = _pytest(tmp_path, RUNTIME_SKIPS)
    out = done.stdout + done.stderr
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, out
    assert "1 passed, 3 skipped" in out, out  # pytest itself would have called this green
    assert ("kiln: all 3 e2e tests were skipped on profile cpu, so this run tested nothing: "
            "2 no measured bound, 1 real Docker engine unavailable. First reason: no measured bound: "
            "profile cpu has none (ci/kits/thresholds.py)") in out, out


def test_one_e2e_test_that_runs_keeps_the_session_green(tmp_path):
    done = _pytest(tmp_path, RUNTIME_SKIPS, RUN_ONE="1")
    out = done.stdout + done.stderr
    assert done.returncode == pytest.ExitCode.OK, out
    assert "2 passed, 2 skipped" in out and "tested nothing" not in out, out


def test_every_e2e_test_skipped_at_collection_fails_before_anything_starts(tmp_path):
    done = _pytest(tmp_path, COLLECTION_SKIPS)
    out = done.stdout + done.stderr
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, out
    assert ("kiln: all 3 e2e tests were skipped on profile cpu (0 GPU(s) available), so this run tested "
            "nothing: 1 capacity, 1 known issue on cpu, 1 waiting for engine 0.27. First reason: "
            "known issue on cpu: decode differs on this lane") in out, out


def test_kilns_own_tests_all_skipped_stay_a_plain_pytest_run(tmp_path):
    done = _pytest(tmp_path, UNIT_SKIPS)
    out = done.stdout + done.stderr
    assert done.returncode == pytest.ExitCode.OK, out
    assert "2 skipped" in out and "tested nothing" not in out, out
