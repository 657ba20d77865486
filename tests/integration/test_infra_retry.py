"""The infra retry's mechanics with real processes: a fresh server per attempt, only infra, CI's default.

A child pytest with kiln's plugin and the fault engine as its backend (the
real engine's faults are tests/e2e/test_failure_classes.py). The infra cause
is real: writing to /dev/full is ENOSPC, a full disk as the kernel reports it.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

from ci.host import procs
from ci.report import outcome
from ci.report.junit import read_junit

ROOT = Path(__file__).resolve().parents[2]
FAULT_ENGINE = ROOT / "tests" / "fakes" / "fault_engine.py"
# A handful of fault engines and trivial tests: seconds; this bounds a hang.
CHILD_TIMEOUT_S = 120

SUITE = textwrap.dedent('''
    import os, pytest

    def _note(server):
        with open(os.environ["TAGS_FILE"], "a") as f:
            f.write(server.tree.tag + "\\n")

    @pytest.mark.model("fake")
    def test_full_disk(server):
        _note(server)
        with open("/dev/full", "w") as fh:  # ENOSPC, as a full runner disk gives it
            fh.write("kv cache dump")
            fh.flush()

    @pytest.mark.model("other")
    def test_wrong_expectation(server):
        _note(server)
        assert server.served_model == "fake", "asked for the wrong model"
''')


def _run(tmp_path: Path, *args: str, ci: str | None = None) -> subprocess.CompletedProcess:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "test_child.py").write_text(SUITE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "CI")}
    env.update(TAGS_FILE=str(tmp_path / "tags"), PYTHONPATH=str(ROOT), KILN_CACHE_DIR=str(tmp_path / "cache"))
    if ci is not None:
        env["CI"] = ci
    backend = f"generic:{{python}} {shlex.quote(str(FAULT_ENGINE))} --port {{port}} --mode ok"
    argv = [sys.executable, "-m", "pytest", str(tmp_path / "test_child.py"), "-v", "-p", "ci.session.pytest_plugin",
            "-p", "no:cacheprovider", f"--rootdir={tmp_path}", "-o", "junit_family=xunit1", "--kiln-profile=cpu",
            f"--kiln-backend={backend}", f"--kiln-reports={tmp_path / 'reports'}",
            f"--junitxml={tmp_path / 'junit.xml'}", *args]
    return subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)


def _cases(tmp_path: Path) -> dict:
    return {c.nodeid.rpartition("::")[2]: c for c in read_junit(tmp_path / "junit.xml", root=tmp_path).cases}


def test_an_infra_failure_is_retried_on_a_fresh_server_and_a_test_failure_is_not(tmp_path):
    proc = _run(tmp_path, "--kiln-retry-infra=2")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    tags = (tmp_path / "tags").read_text().split()
    # test_full_disk ran three times, each on a server of its own; test_wrong_expectation once.
    assert len(tags) == 4 and len(set(tags)) == 4, tags
    assert all(procs.tagged(t) == [] for t in tags), "every server, retried ones included, is stopped"
    assert out.count("RETRY (infra)") == 2, out
    cases = _cases(tmp_path)
    full = cases["test_full_disk"]
    assert full.prop(outcome.CLASS_PROPERTY) == outcome.INFRA
    assert full.prop(outcome.REASON_PROPERTY) == "runner out of disk: [Errno 28] No space left on device"
    assert full.prop(outcome.RETRY_PROPERTY) == "retried 2 of 2: infra again"
    assert [a.split(": ", 2)[:2] for a in outcome.attempts(full)] == [["1", "infra"], ["2", "infra"]]
    wrong = cases["test_wrong_expectation"]
    assert wrong.prop(outcome.CLASS_PROPERTY) == outcome.TEST and outcome.attempts(wrong) == []
    assert wrong.prop(outcome.RETRY_PROPERTY).startswith("not retried: a test failure is never retried")
    assert len(_cases(tmp_path)) == 2, "retries add no JUnit cases"
    # The server records carry each typed failure, one per attempt's server.
    records = (tmp_path / "reports" / "servers-e2e-cpu.json").read_text()
    assert records.count('"class": "infra"') == 3 and records.count('"class": "test"') == 1


def test_ci_retries_infra_once_by_default_and_a_bad_ci_value_is_one_line(tmp_path):
    assert _run(tmp_path / "ci", "-k", "full_disk", ci="true").returncode == 1
    assert _cases(tmp_path / "ci")["test_full_disk"].prop(outcome.RETRY_PROPERTY) == "retried 1 of 1: infra again"
    assert _run(tmp_path / "local", "-k", "full_disk", ci="false").returncode == 1
    assert (_cases(tmp_path / "local")["test_full_disk"].prop(outcome.RETRY_PROPERTY)
            == "not retried: --kiln-retry-infra is 0 (the default without CI)")
    bad = _run(tmp_path / "bad", ci="maybe")
    assert bad.returncode == 4
    assert "ERROR: kiln: --kiln-retry-infra default: CI='maybe' is neither yes nor no" in bad.stderr, bad.stderr
