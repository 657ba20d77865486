"""The Markdown report: rendered from hand-written JUnit files in tests/fixtures/junit/."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ci.report import junit, repro, render as report
from ci.text.redact import Redactor

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "junit"
SECRET = "hf_" + "Qw3rTy" * 6  # 39 chars, a plausible Hugging Face token
TIMEOUT_S = 120  # one pytest collection in a subprocess; generous for a loaded 2-core box
# Installed pytest plugins are irrelevant to the tiny project and triple its start-up time.
PYTEST_ENV = {"PATH": "/usr/bin:/bin", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}

# The ids of tests/fixtures/junit/params.xml, plus decoys a sloppy selector would also hit.
PARAM_IDS = ["two words", "[nested] brackets", "it's $HOME `x` & (y)", "plain", "two", "words"]
PARAM_TESTS = textwrap.dedent(f"""
    import os
    import pytest

    IDS = {PARAM_IDS!r}
    FAIL = os.environ.get("KILN_TEST_FAIL") == "1"

    @pytest.mark.parametrize("q", IDS, ids=IDS)
    def test_chat(q):
        assert not FAIL, "forced failure"

    class TestGroup:
        @pytest.mark.parametrize("v", ["a b", "ok", "a"], ids=["a b", "ok", "a"])
        def test_member(self, v):
            assert not FAIL, "forced failure"
""")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A tiny pytest project whose test ids match params.xml (own ini: no kiln plugin)."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    e2e = tmp_path / "tests" / "e2e"
    e2e.mkdir(parents=True)
    (e2e / "test_params.py").write_text(PARAM_TESTS)
    return tmp_path


def repro_lines(markdown: str) -> list[str]:
    return [ln for ln in markdown.splitlines() if ln.startswith("nox -s ")]


def collect_with_pasted_command(command: str, session: str, cwd: Path) -> list[str]:
    """Paste the printed command into bash, with pytest standing in for nox (which
    passes everything after ``--`` to pytest), and return the collected node ids."""
    prefix = f"nox -s {session} -- "
    assert command.startswith(prefix), command
    pasted = f"{sys.executable} -m pytest --collect-only -q -p no:cacheprovider " + command[len(prefix):]
    out = subprocess.run(["bash", "-c", pasted], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S,
                         env=PYTEST_ENV)
    assert out.returncode == 0, out.stdout + out.stderr
    return [ln for ln in out.stdout.splitlines() if "::" in ln]


def test_printed_commands_select_exactly_their_test(project):
    md = report.build_report(FIXTURES / "params.xml", "e2e-h100-4", env={}, root=project)
    commands = repro_lines(md)
    expected = [
        "tests/e2e/test_params.py::test_chat[two words]",
        "tests/e2e/test_params.py::test_chat[[nested] brackets]",
        "tests/e2e/test_params.py::test_chat[it's $HOME `x` & (y)]",
        "tests/e2e/test_params.py::TestGroup::test_member[a b]",
    ]
    assert len(commands) == len(expected)
    assert commands[0] == "nox -s e2e-h100-4 -- 'tests/e2e/test_params.py::test_chat[two words]'"
    for command, nodeid in zip(commands, expected):
        assert collect_with_pasted_command(command, "e2e-h100-4", project) == [nodeid]


@pytest.mark.parametrize("family", ["xunit1", "xunit2"])
def test_commands_from_real_pytest_junit_select_exactly_their_test(project, family):
    junit_file = project / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests",
                    f"--junitxml={junit_file}", "-o", f"junit_family={family}"],
                   cwd=project, capture_output=True, timeout=TIMEOUT_S, env={**PYTEST_ENV, "KILN_TEST_FAIL": "1"})
    md = report.build_report(junit_file, "e2e-cpu", env={}, root=project)
    commands = repro_lines(md)
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                               cwd=project, capture_output=True, text=True, timeout=TIMEOUT_S, env=PYTEST_ENV)
    every_test = [ln for ln in collected.stdout.splitlines() if "::" in ln]
    # Every failing test got a command, naming exactly pytest's own node id ...
    assert [shlex.split(c)[-1] for c in commands] == every_test
    # ... and pasting the trickiest ones selects exactly that test.
    for command in commands:
        if "$HOME" in command or "[nested]" in command or "TestGroup" in command and "[a b]" in command:
            assert collect_with_pasted_command(command, "e2e-cpu", project) == [shlex.split(command)[-1]]


def test_verdict_counts_engine_runner_and_wall_time():
    md = report.build_report(FIXTURES / "params.xml", "e2e-h100-4", env={})
    first = md.splitlines()[0]
    assert first.startswith("### ❌ `e2e-h100-4` failed: 4 failed, 2 passed in 5m 12s")
    assert "runner `linux-h100-4gpu` (4× nvidia)" in first and "engine `vllm 0.11.0`" in first


def test_zero_failures_is_green_with_skips_listed():
    md = report.build_report(FIXTURES / "all_passed.xml", "e2e-mi300-8", env={})
    assert md.startswith("### ✅ `e2e-mi300-8` passed: 2 passed, 1 skipped in 1m 35s")
    assert "engine `sglang 0.5.5`" in md
    assert "Failures" not in md and "nox -s" not in md
    assert "**capacity** (1)" in md and "needs 8 GPUs (model big, tp=8), 4 available" in md


def test_all_skipped_is_not_green_and_groups_reasons():
    run = junit.read_junit(FIXTURES / "all_skipped.xml")
    assert report.run_status(run) == "empty"
    md = report.build_report(FIXTURES / "all_skipped.xml", "e2e-h100-8", env={})
    assert md.startswith("### ⚠️ `e2e-h100-8` tested nothing: 4 skipped, 1 xfailed")
    assert "✅" not in md
    order = [md.index(s) for s in ("**capacity** (3)", "**known issue** (1)", "**expected failure (xfail)** (1)")]
    assert order == sorted(order)
    assert "<summary>2 × needs 4 GPUs (model m, tp=4), 0 available</summary>" in md
    assert "- `tests/e2e/test_tp.py::test_tp4[a]`" in md


@pytest.mark.parametrize("message,outcome,category", [
    ("capacity: Qwen/Qwen2.5-0.5B-Instruct tp=1 needs 1 GPU(s), 0 available on this runner", "skipped", "capacity"),
    ("capacity: needs 2 GPU(s); the cpu profile has none", "skipped", "capacity"),
    ("known issue on mi300-8: kernel-level nondeterminism in top-k", "skipped", "known issue"),
    ("needs a newer engine", "skipped", "other"),
    ("sampler not implemented", "xfailed", "expected failure (xfail)"),
])
def test_skip_categories_match_the_plugins_reasons(message, outcome, category):
    # The reasons as ci/session/pytest_plugin.py and ci/session/known_issues.py word them.
    assert report.skip_category(junit.CaseResult("t.py::t", outcome, 0.0, message)) == category


def _server_record(tmp_path: Path, log_text: str | bytes, **overrides) -> dict:
    log_file = tmp_path / "logs" / "qwen.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    (log_file.write_bytes if isinstance(log_text, bytes) else log_file.write_text)(log_text)
    record = {"key": "Qwen/Qwen2.5-0.5B-Instruct|tp=2|--max-model-len 512", "model": "Qwen/Qwen2.5-0.5B-Instruct",
              "tp": 2, "devices": [0, 1], "log_path": str(log_file), "launched": 1_763_630_000.0,
              "ready": None, "stopped": 1_763_630_600.0, "memory_free": 1_763_630_601.5, "tests": [],
              "error": "server exited with code 1 before ready", "warm_dependent": True}
    record.update(overrides)
    return record


def _write_servers(tmp_path: Path, session: str, records: list[dict]) -> Path:
    path = tmp_path / f"servers-{session}.json"
    path.write_text(json.dumps(records))
    return path


HOSTILE_LOG = (f"INFO loading weights\nDEBUG env HF_TOKEN={SECRET}\n"
               "WARN cc @someone and @org/team <script>alert(document.cookie)</script>\n"
               "\x1b[1;31mERROR\x1b[0m CUDA out of memory \x00\x07\x1b]0;title\x07\n"
               "</details><!-- kiln-report -->```\n")


def test_launch_failure_hostile_log_and_token(tmp_path, monkeypatch):
    servers = _write_servers(tmp_path, "e2e-h100-2", [_server_record(tmp_path, HOSTILE_LOG)])
    for name in [n for n in os.environ if n.startswith("KILN_") or n.endswith("_VISIBLE_DEVICES")]:
        monkeypatch.delenv(name)  # the exact repro below must not pick up this machine's knobs
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    md = report.build_report(FIXTURES / "launch_failure.xml", "e2e-h100-2", servers_path=servers)
    assert SECRET not in md and SECRET[:12] not in md
    assert "@someone" not in md and "@org" not in md
    assert "<script>" not in md and "</script>" not in md and "<!-- kiln-report" not in md
    assert "\x1b" not in md and "\x00" not in md and "\x07" not in md and "#x1B" not in md
    assert "CUDA out of memory" in md and "ERROR" in md
    assert md.count("<details>") == md.count("</details>")  # the log's </details> closed nothing
    # The warm-dependent launch failed: the repro starts with a cold warmup.
    assert ("invoke warmup --cold &&\nCUDA_VISIBLE_DEVICES=0,1 nox -s e2e-h100-2 -- "
            "'tests/e2e/test_api.py::test_completions'") in md
    assert 'failed on setup with "ServerError: server exited with code 1 before ready"' in md
    assert "on GPUs 0,1: `launch failed: server exited with code 1 before ready`" in md
    # Both tests used that server; its log is shown once, then referred to.
    assert md.count("DEBUG env HF_TOKEN=***") == 1
    assert "server log: shown above" in md


def test_warmup_hint_only_for_warm_dependent_launch_failures(tmp_path):
    record = _server_record(tmp_path, "log\n", warm_dependent=False)
    servers = _write_servers(tmp_path, "e2e-h100-2", [record])
    md = report.build_report(FIXTURES / "launch_failure.xml", "e2e-h100-2", servers_path=servers, env={})
    assert "invoke warmup" not in md
    ready = _server_record(tmp_path, "log\n", ready=1_763_630_100.0, error=None)
    servers = _write_servers(tmp_path, "e2e-h100-2", [ready])
    md = report.build_report(FIXTURES / "launch_failure.xml", "e2e-h100-2", servers_path=servers, env={})
    assert "invoke warmup" not in md


def test_50mb_log_renders_fast_and_capped(tmp_path):
    log_file = tmp_path / "big.log"
    with log_file.open("wb") as fh:
        block = b"".join(b"INFO step %06d throughput 123.4 tok/s \x1b[32mok\x1b[0m\n" % i for i in range(20000))
        while fh.tell() < 50 * 1024 * 1024:
            fh.write(block)
        fh.write(HOSTILE_LOG.encode())
    record = _server_record(tmp_path, b"", log_path=str(log_file))
    servers = _write_servers(tmp_path, "e2e-h100-2", [record])
    started = time.perf_counter()
    md = report.build_report(FIXTURES / "launch_failure.xml", "e2e-h100-2", servers_path=servers,
                             env={"HF_TOKEN": SECRET})
    elapsed = time.perf_counter() - started
    assert elapsed < 5.0, f"rendering with a 50 MB log took {elapsed:.1f}s"
    assert len(md) <= report.MAX_REPORT_CHARS
    assert "CUDA out of memory" in md and SECRET not in md and "\x1b" not in md
    assert "MB log; only its last 512 KiB read" in md


def _fenced_blocks(md: str) -> list[list[str]]:
    blocks, current, fence = [], None, None
    for line in md.splitlines():
        if current is None:
            m = re.match(r"^(`{3,})(\w*)$", line)
            if m:
                current, fence = [], m.group(1)
        elif line == fence:
            blocks.append(current)
            current = None
        else:
            current.append(line)
    assert current is None, "unclosed code fence"
    return blocks


def test_caps_hold_whatever_the_logs_hold(tmp_path):
    cases, records = [], []
    details = "\n".join(f"E   frame {j} of a very long traceback " + "z" * 200 for j in range(2000))
    for i in range(400):
        cases.append(junit.CaseResult(f"tests/e2e/test_many.py::test_{i}", junit.FAILED, 1.0,
                                      f"AssertionError: case {i}", details,
                                      (("kiln_server", f"m{i % 20}|tp=1|"),)))
    for k in range(20):
        log_file = tmp_path / f"m{k}.log"
        log_file.write_text("\n".join(f"server {k} line {j} " + "w" * 300 for j in range(1000)))
        records.append(report.ServerInfo(key=f"m{k}|tp=1|", log_path=str(log_file), launched=1.0e9,
                                         ready=1.0e9 + 30, stopped=1.0e9 + 600, memory_free=1.0e9 + 601))
    run = junit.RunResult(tuple(cases), 1234.0)
    md = report.render_report(run, "e2e-h200-8", servers=records, env={}, redactor=Redactor())
    assert len(md) <= report.MAX_REPORT_CHARS
    assert md.startswith("### ❌ `e2e-h200-8` failed: 400 failed")
    assert "more failures not shown" in md
    assert all(len(b) <= report.MAX_SECTION_LINES for b in _fenced_blocks(md))


def test_few_failures_keep_300_line_sections(tmp_path):
    log_file = tmp_path / "s.log"
    log_file.write_text("\n".join(f"l{j}" for j in range(5000)) + "\n")
    record = report.ServerInfo(key="k|tp=1|", log_path=str(log_file), launched=1.0e9, ready=1.0e9 + 5,
                               stopped=1.0e9 + 50, memory_free=None, tests=("tests/e2e/t.py::test_a",))
    case = junit.CaseResult("tests/e2e/t.py::test_a", junit.FAILED, 1.0, "boom", "E  boom\n" * 1000)
    md = report.render_report(junit.RunResult((case,), 2.0), "e2e-cpu", servers=[record], env={})
    sizes = [len(b) for b in _fenced_blocks(md)]
    assert sizes.count(report.MAX_SECTION_LINES) == 2  # pytest output and server log, both at the cap
    assert "l4999" in md and "l4700" in md and "l4699" not in md


def test_timeline_is_mermaid_gantt_with_safe_names(tmp_path):
    records = [
        report.ServerInfo(key="tiny|tp=1|--x 1; %%{init: {}}%% #c", launched=1_000.0, ready=1_030.0,
                          stopped=1_100.0, memory_free=1_102.0, tests=("a", "b")),
        report.ServerInfo(key="big|tp=8|", launched=1_000.0, ready=None, stopped=1_600.0, error="oom"),
        report.ServerInfo(key="leaky|tp=1|", launched=1_000.0, ready=1_010.0, stopped=1_020.0),
    ]
    md = report.timeline_md(records, "e2e-h100-8")
    block = md.split("```mermaid\n", 1)[1].split("\n```", 1)[0]
    assert block.splitlines()[:4] == ["gantt", "    title Servers of e2e-h100-8", "    dateFormat x",
                                      "    axisFormat %H:%M:%S"]
    assert "    launch :done, 1000000, 30s" in block
    assert "    tests (2) :1030000, 70s" in block
    assert "    stop to memory free :1100000, 2s" in block
    assert "    launch failed :crit, 1000000, 600s" in block
    assert "    memory never seen free :crit, 1020000, 1s" in block
    sections = [ln for ln in block.splitlines() if ln.startswith("    section ")]
    assert all(not set(s) & set(":;#%{}") for s in sections)
    assert report.timeline_md([], "x") == ""


def test_missing_or_foreign_junit_still_renders_red(tmp_path):
    servers = _write_servers(tmp_path, "e2e-h100-2", [_server_record(tmp_path, "fatal: no GPU\n")])
    md = report.build_report(tmp_path / "junit-e2e-h100-2.xml", "e2e-h100-2", env={})
    assert md.startswith("### ❌ `e2e-h100-2` failed: no test results")
    assert "no such JUnit file" in md
    # The server records sit beside it: the launch failure and its log still show.
    assert "server exited with code 1 before ready" in md and "fatal: no GPU" in md
    md = report.build_report(FIXTURES / "not_junit.xml", "e2e-cpu", servers_path=servers, env={})
    assert "root element is <\u200bcoverage>" in md  # neutralised, like any text from outside


def test_broken_server_records_are_a_note(tmp_path):
    path = tmp_path / "servers-e2e-cpu.json"
    path.write_text("{not json")
    records, note = report.load_servers(path)
    assert records == () and "unreadable" in note
    path.write_text(json.dumps({"key": "x"}))
    assert "expected a JSON list" in report.load_servers(path)[1]
    path.write_text(json.dumps([{"no": "key"}, {"key": "k", "tp": "two", "devices": [0, "x"]}]))
    records, note = report.load_servers(path)
    assert note is None and [r.key for r in records] == ["k"] and records[0].devices == (0,)
    assert report.load_servers(tmp_path / "absent.json") == ((), None)
    md = report.build_report(FIXTURES / "all_passed.xml", "e2e-cpu", servers_path=path.with_name("x.json"),
                             env={})
    assert md.startswith("### ✅")


def test_env_prefix_allowlist_and_secrets():
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "HIP_VISIBLE_DEVICES": "2", "KILN_WARMUP_DIR": "/cache dir",
           "KILN_API_TOKEN": "tok-" + "x" * 30, "KILN_REGISTRY": "https://bot:p4ssw0rd99@mirror.local",
           "KILN_SESSION": "e2e-h100-4", "HOME": "/root", "HF_TOKEN": SECRET, "KILN_NOTE": SECRET}
    command = repro.repro_command("e2e-h100-4", "tests/e2e/t.py::test_a[x y]", env, Redactor.from_env(env))
    assert command == ("CUDA_VISIBLE_DEVICES=0,1 HIP_VISIBLE_DEVICES=2 KILN_WARMUP_DIR='/cache dir' "
                       "nox -s e2e-h100-4 -- 'tests/e2e/t.py::test_a[x y]'")


def test_shell_quote_round_trips_through_shlex():
    import shlex
    for arg in ["a b", "it's", "$(rm -rf ~)", "`x`", "[1]", "\"q\"", "back\\slash", "new\nline"]:
        assert shlex.split(repro.shell_quote(arg)) == [arg]


@pytest.mark.parametrize("classname,name,file,expected", [
    ("tests.e2e.test_api", "test_chat[stream]", None, "tests/e2e/test_api.py::test_chat[stream]"),
    ("tests.e2e.test_api.TestChat", "test_x[a.b]", None, "tests/e2e/test_api.py::TestChat::test_x[a.b]"),
    ("tests.e2e.test_api.TestChat.TestInner", "test_y", None,
     "tests/e2e/test_api.py::TestChat::TestInner::test_y"),
    ("tests.e2e.test_api.TestChat", "test_x", "tests/e2e/test_api.py", "tests/e2e/test_api.py::TestChat::test_x"),
    ("test_top", "test_z", "test_top.py", "test_top.py::test_z"),
])
def test_nodeid_reconstruction(classname, name, file, expected):
    assert junit.nodeid_for(classname, name, file) == expected


def test_nodeid_uses_the_filesystem_when_it_can(tmp_path):
    # A module named with a capital letter defeats the naming heuristic; the file decides.
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "Test_Caps.py").write_text("")
    assert junit.nodeid_for("tests.Test_Caps", "test_a", root=tmp_path) == "tests/Test_Caps.py::test_a"


def test_nodeid_property_wins():
    xml = ('<testsuite><testcase classname="a.b" name="t"><properties>'
           '<property name="kiln_nodeid" value="x/y.py::t[exact]"/></properties></testcase></testsuite>')
    assert junit.parse_junit(xml).cases[0].nodeid == "x/y.py::t[exact]"


def test_junit_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text("<testsuite><testcase")
    with pytest.raises(junit.JUnitError, match=r"bad\.xml: not valid XML"):
        junit.read_junit(bad)
    with pytest.raises(junit.JUnitError, match="no such JUnit file"):
        junit.read_junit(tmp_path / "missing.xml")


def test_a_stop_that_needed_sigkill_is_said_out_loud(tmp_path):
    path = tmp_path / "servers.json"
    path.write_text(json.dumps([
        {"key": "m|tp=1|", "containment": "cgroup-v2", "stop_killed": ["41 VLLM::EngineCor [VLLM::EngineCore]"]},
        {"key": "clean|tp=1|", "containment": "cgroup-v2", "stop_killed": []}]))
    records, note = report.load_servers(path)
    assert note is None and records[0].stop_killed == ("41 VLLM::EngineCor [VLLM::EngineCore]",)
    md = report.stops_md(records, report.Redactor.from_env({}))
    assert md.startswith("### Stops that needed SIGKILL")
    assert "`m|tp=1|` (cgroup-v2): 1 process(es)" in md and "VLLM::EngineCore" in md
    assert "clean" not in md
    assert report.stops_md(records[1:], report.Redactor.from_env({})) == ""


def test_failures_are_grouped_by_whose_fault_infra_first_and_collapsed():
    md = report.build_report(FIXTURES / "typed.xml", "e2e-h100-4", env={"HF_TOKEN": SECRET})
    first = md.splitlines()[0]
    assert ("2 failed, 1 error (1 infra, 1 engine, 1 test), 2 passed (1 after infra retry), "
            "1 xfailed (1 quarantined: not failing the job)") in first, first
    assert "### Failures (3: 1 infra, 1 engine, 1 test)" in md
    infra = md.index("<details><summary>🏗️ infra (1): the runner, the registry or the hardware")
    engine, test = md.index("### 🔥 engine (1): "), md.index("### ❌ test (1): ")
    assert infra < md.index("test_launch") < md.index("</details>", infra) < engine < md.index("test_stream") < test
    # Each failure names its class, reason, the retry policy and earlier attempts.
    assert ("**Class** **infra**: `launch timeout while the engine was still progressing: vllm not ready after "
            "240 s (its log last grew 0.2 s before)` · retry: `retried 1 of 1: infra again` · attempt "
            "`1: infra: launch timeout") in md
    assert "retry: `not retried: a test failure is never retried (a retry would hide it)`" in md
    # The token in the engine's reason never reaches the report.
    assert SECRET not in md and "crash signature (Traceback) in the server log while it served" in md


def test_a_pass_after_an_infra_retry_is_listed_never_a_plain_pass():
    md = report.build_report(FIXTURES / "typed.xml", "e2e-h100-4", env={})
    assert "### 🔁 Passed after infra retry: 1 (not a plain pass: the first attempt failed on the runner)" in md
    assert ("- `tests/e2e/test_api.py::test_pull`: attempt `1: infra: image pull/registry: could not pull "
            "127.0.0.1:5000/kiln/test:1 after 1 attempts`") in md
    # A quarantined test's failure does not make the run red on its own.
    run = junit.read_junit(FIXTURES / "typed.xml")
    quarantined = [c for c in run.cases if c.nodeid.endswith("test_racy")]
    assert quarantined[0].outcome == "xfailed"
