"""Known-issue markers: the decision, marker validation, and the pytest hook end to end."""
from __future__ import annotations

import textwrap

import pytest

from ci.session import known_issues
from ci.session.known_issues import Decision, KnownIssue

pytest_plugins = ["pytester"]

ISSUE = KnownIssue(("mi300-8",), "top-k sampling is nondeterministic on ROCm",
                   "https://github.com/org/repo/issues/1")


def test_skips_only_on_the_listed_profiles():
    assert known_issues.decide([ISSUE], "h100-1", strict=False) == Decision("run")
    d = known_issues.decide([ISSUE], "mi300-8", strict=False)
    assert d == Decision("skip", "known issue on mi300-8: top-k sampling is nondeterministic on "
                                 "ROCm (https://github.com/org/repo/issues/1)")


def test_strict_runs_it_as_a_strict_xfail_there_and_nowhere_else():
    d = known_issues.decide([ISSUE], "mi300-8", strict=True)
    assert d.action == "xfail" and "a pass means the issue is fixed" in d.reason
    assert known_issues.decide([ISSUE], "cpu", strict=True) == Decision("run")


@pytest.mark.parametrize("args, kwargs, cause", [
    ((), {"profiles": "cpu", "reason": "r"}, "profiles must be a non-empty list"),
    ((), {"profiles": [], "reason": "r"}, "profiles must be a non-empty list"),
    ((), {"profiles": ["cpux"], "reason": "r"}, r"unknown profile\(s\) cpux; known: cpu, h100-1"),
    ((), {"profiles": ["cpu"]}, "needs a reason="),
    ((), {"profiles": ["cpu"], "reason": "  "}, "needs a reason="),
    ((), {"profiles": ["cpu"], "reason": "r", "link": "issue 5"}, "link must be an http"),
    ((), {"profiles": ["cpu"], "reason": "r", "resaon": "x"}, r"unknown argument\(s\): resaon"),
    ((["cpu"], "r"), {}, "only positional argument"),
])
def test_malformed_markers_are_rejected_with_a_one_line_cause(args, kwargs, cause):
    with pytest.raises(ValueError, match=cause):
        known_issues.from_marker(args, kwargs)


def test_profiles_may_be_positional():
    assert known_issues.from_marker((["cpu"],), {"reason": " flaky "}) == KnownIssue(("cpu",), "flaky")


# The hook code the pytest plugin carries, verbatim (see the report).
HOOKS = textwrap.dedent("""
    import pytest
    from ci.session import known_issues

    def pytest_addoption(parser):
        parser.addoption("--kiln-profile", default="cpu")
        parser.addoption(known_issues.STRICT_OPTION, action="store_true", default=False,
                         help="run known_issue tests on their profiles as strict xfail, so a "
                              "stale marker (the test passes now) fails the run")

    def pytest_configure(config):
        config.addinivalue_line("markers", "known_issue(profiles, reason, link=None): "
                                           "skip on those profiles")

    def pytest_collection_modifyitems(session, config, items):
        known_issues.apply(items, config.getoption("--kiln-profile"),
                           strict=config.getoption(known_issues.STRICT_OPTION))
""")

TESTS = textwrap.dedent("""
    import pytest

    @pytest.mark.known_issue(profiles=["cpu"], reason="fixed upstream", link="https://x.test/1")
    def test_stale():
        pass

    @pytest.mark.known_issue(profiles=["cpu", "mi300-1"], reason="still broken")
    def test_broken():
        assert False

    @pytest.mark.known_issue(profiles=["h100-1"], reason="h100 only")
    def test_elsewhere():
        pass

    def test_plain():
        pass
""")


@pytest.fixture
def suite(pytester):
    pytester.makeconftest(HOOKS)
    pytester.makepyfile(test_suite=TESTS)
    return pytester


def test_hook_skips_on_the_profile_with_the_reason_in_the_report(suite):
    result = suite.runpytest("-ra", "--kiln-profile=cpu", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, skipped=2)
    result.stdout.fnmatch_lines(["*SKIPPED*known issue on cpu: fixed upstream (https://x.test/1)*",
                                 "*SKIPPED*known issue on cpu: still broken*"])


def test_hook_runs_everything_on_other_profiles(suite):
    result = suite.runpytest("--kiln-profile=mi325-8", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=1)


def test_strict_fails_the_run_when_a_known_issue_passes(suite):
    result = suite.runpytest("-ra", "--kiln-profile=cpu", "--strict-known-issues",
                             "-p", "no:cacheprovider")
    # test_stale passed where it was marked: a strict XPASS is a failure.
    result.assert_outcomes(passed=2, failed=1, xfailed=1)
    out = result.stdout.str()
    assert "FAILED test_suite.py::test_stale - [XPASS(strict)] known issue on cpu" in out
    assert "XFAIL test_suite.py::test_broken - known issue on cpu: still broken" in out
    assert result.ret != 0


def test_a_typo_in_a_marker_stops_the_session(pytester):
    pytester.makeconftest(HOOKS)
    pytester.makepyfile(test_typo="""
        import pytest
        @pytest.mark.known_issue(profiles=["cpu1"], reason="r")
        def test_x():
            pass
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_typo.py::test_x: known_issue names unknown profile(s) cpu1*"])
