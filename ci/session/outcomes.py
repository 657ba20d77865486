"""Typed outcomes in a pytest run: every failure classed from its evidence, and only infra retried.

The kiln plugin (ci/session/pytest_plugin.py) registers :class:`OutcomeHooks`.
For each failed or errored test it gathers the evidence -- the exception
chain, the server's log written while the test ran, whether the server
exited under it -- and asks ci/session/classify.py whose fault it is. The
class and reason go into the JUnit (ci/report/outcome.py names the
properties), the server's record, and the terminal.

``--kiln-retry-infra N`` (default 1 when ``CI`` says yes, else 0) runs a test
again, up to N times, only while its failure was ``infra``, and on a fresh
server: the pool forgets the key's server (and a failed launch of it) first.
``test`` and ``engine`` failures are never retried (TensorRT-LLM stopped
retrying deterministic failures because retries hid real breakage) and their
JUnit says so. A retried attempt shows as ``RETRY (infra)`` in the terminal;
the test's one JUnit case is its last attempt, carrying each earlier one
(``kiln_attempt``), and a pass after a retry says "passed after infra retry"
(PyTorch's rule: a retry inside the same build is no reproduction, so such a
pass is never a plain one).

Why not pytest-rerunfailures: it decides before a rerun from exception names or
message regexes, while kiln's decision needs the engine's log and exit after
the attempt, a fresh server between attempts, and the attempts in the JUnit.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import pytest
import requests
from _pytest.junitxml import xml_key
from _pytest.runner import runtestprotocol

from ci.engine.server import Server, ServerError
from ci.kits.client import EngineFault
from ci.report import outcome
from ci.session.classify import Evidence, Verdict, chain, classify
from ci.text import envflag

log = logging.getLogger(__name__)

RETRY_OPTION = "--kiln-retry-infra"
PLUGIN_NAME = "kiln-outcomes"
# With CI set, one retry: vllm #57372 found most runner faults (a registry blip,
# a wedged GPU, a slow cold start) pass on the next attempt; a second retry
# mostly doubles the cost of a runner that is really broken.
CI_DEFAULT_RETRIES = 1
# The terminal's word for an attempt that will be retried (pytest's teststatus).
RETRIED = "retried"
# At most this much of a server's log is read as evidence: the end of a test's
# window holds the crash; a chatty engine must not make every failure slow.
MAX_LOG_EVIDENCE_BYTES = 512 * 1024

# A killed engine's exit reaches kiln through its supervisor in milliseconds
# (ci/engine/crashwatch.py); a second covers a loaded runner.
EXIT_SETTLE_S = 1.0
EXIT_POLL_S = 0.02

_VERDICT = pytest.StashKey[Verdict]()
_LOG_START = pytest.StashKey["tuple[Server, int]"]()
_ATTEMPTS = pytest.StashKey["list[Verdict]"]()
_WILL_RETRY = pytest.StashKey[bool]()


def add_options(group) -> None:
    """The retry option, in the kiln group of pytest's options."""
    group.addoption(RETRY_OPTION, type=int, default=None, metavar="N",
                    help="re-run a test up to N times while its failure was infra (the runner's, "
                         "not the code's), each time on a fresh server; test and engine failures are "
                         f"never retried (default: {CI_DEFAULT_RETRIES} when $CI says yes, else 0)")


def retries_from(config: pytest.Config) -> int:
    """The retry budget: the option, else the CI default; one clear line on a bad value."""
    value = config.getoption(RETRY_OPTION)
    if value is None:
        try:
            return CI_DEFAULT_RETRIES if envflag.in_ci() else 0
        except envflag.FlagError as exc:
            raise pytest.UsageError(f"kiln: {RETRY_OPTION} default: {exc}") from None
    if value < 0:
        raise pytest.UsageError(f"kiln: {RETRY_OPTION} must be >= 0, got {value}")
    return value


def read_window(path: str | Path, start: int = 0, max_bytes: int = MAX_LOG_EVIDENCE_BYTES) -> str:
    """A log's text from byte ``start`` on (at most its last ``max_bytes``); "" when unreadable."""
    try:
        with open(path, "rb") as fh:
            end = fh.seek(0, 2)
            fh.seek(max(start, end - max_bytes))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _settled_exit(srv: Server, exc: BaseException | None) -> int | None:
    """The server's exit code; after a dropped connection, waited for up to EXIT_SETTLE_S.

    A killed engine's client sees the connection drop a moment before its exit
    reaches kiln through the supervisor; without the wait the stronger evidence
    (it exited) would lose to the weaker (the connection broke).
    """
    code = srv.exit_code()
    if code is not None or not any(isinstance(e, (requests.RequestException, EngineFault)) for e in chain(exc)):
        return code
    deadline = time.monotonic() + EXIT_SETTLE_S
    waiter = threading.Event()
    while code is None and time.monotonic() < deadline:
        waiter.wait(EXIT_POLL_S)
        code = srv.exit_code()
    return code


@dataclass(eq=False)  # hashable by identity: pluggy keeps plugins in sets
class OutcomeHooks:
    """The pytest hooks that type failures and retry infra ones (one instance per session).

    ``fresh(item)`` makes the next attempt's server a fresh one (the pool
    forgets the test's key); ``servers()`` lists every server of the run, to
    find the one a failed launch used.
    """

    retries: int
    fresh: Callable[[pytest.Item], None]
    servers: Callable[[], Iterable[Server]]
    profile: str = ""

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        # The profile as a suite property: a history of JUnit files (invoke flakes) splits by it.
        # What the record_testsuite_property fixture does, once per run instead of per test.
        xml = session.config.stash.get(xml_key, None)
        if xml is not None and self.profile:
            xml.add_global_property(outcome.PROFILE_PROPERTY, self.profile)

    # -- evidence --------------------------------------------------------------
    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item):
        srv = (getattr(item, "funcargs", None) or {}).get("server")
        if isinstance(srv, Server):
            # The test's window of the server's log starts here: earlier lines are other tests'.
            item.stash[_LOG_START] = (srv, srv.log_size())
        return (yield)

    def _server_of(self, item: pytest.Item, exc: BaseException | None) -> tuple[Server | None, int]:
        srv, start = item.stash.get(_LOG_START, (None, 0))
        if srv is not None:
            return srv, start
        paths = {str(e.log_path) for e in chain(exc) if isinstance(e, ServerError) and e.log_path}
        found = [s for s in self.servers() if str(s.log_path) in paths]
        return (found[-1] if found else None), 0

    def evidence(self, item: pytest.Item, exc: BaseException | None) -> tuple[Evidence, Server | None]:
        """What is known about ``item``'s failure: the exception, its server's log window and exit."""
        srv, start = self._server_of(item, exc)
        if srv is not None:
            exit_code = None if srv.stopped_by_harness else _settled_exit(srv, exc)
            text = read_window(srv.log_path, start)
        else:  # a server the test built itself: its error names the log
            paths = [e.log_path for e in chain(exc) if isinstance(e, ServerError) and e.log_path]
            text, exit_code = (read_window(paths[0]) if paths else ""), None
        return Evidence(exc, text, exit_code, served=srv is not None), srv

    # -- classification and properties -----------------------------------------
    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        report = yield
        if call.when == "setup":
            item.stash[_WILL_RETRY] = False
            if _VERDICT in item.stash:
                del item.stash[_VERDICT]
        exc = call.excinfo.value if call.excinfo is not None else None
        # A quarantined test runs as a non-strict xfail: its failure is typed too (not a skip or an xfail() call).
        failed = report.failed or (exc is not None and hasattr(report, "wasxfail")
                                   and not isinstance(exc, (pytest.skip.Exception, pytest.xfail.Exception)))
        if failed and _VERDICT not in item.stash:
            evidence, srv = self.evidence(item, exc)
            verdict = classify(evidence)
            item.stash[_VERDICT] = verdict
            log.warning("%s %s: %s", item.nodeid, "failed" if report.when == "call" else "errored", verdict.line())
            if srv is not None:
                srv.note_failure(item.nodeid, verdict.kind, verdict.reason)
        if call.when == "call" and report.passed and item.stash.get(_ATTEMPTS, None):
            report.kiln_after_retry = True  # the terminal says so (pytest_report_teststatus)
        if call.when == "teardown":
            report.user_properties.extend(self._properties(item, report))
        return report

    def _properties(self, item: pytest.Item, teardown: pytest.TestReport) -> list[tuple[str, str]]:
        earlier = item.stash.get(_ATTEMPTS, [])
        verdict = item.stash.get(_VERDICT, None)
        props = [(outcome.ATTEMPT_PROPERTY, f"{n}: {v.line()}") for n, v in enumerate(earlier, 1)]
        if verdict is None:  # passed (or skipped)
            if earlier and not teardown.failed:
                props += [(outcome.OUTCOME_PROPERTY, outcome.PASSED_AFTER_RETRY),
                          (outcome.RETRY_PROPERTY, f"retried {len(earlier)} of {self.retries}: passed")]
            return props
        props += [(outcome.CLASS_PROPERTY, verdict.kind), (outcome.REASON_PROPERTY, verdict.reason)]
        if verdict.kind != outcome.INFRA:
            article = "an" if verdict.kind[0] in "aeiou" else "a"
            props.append((outcome.RETRY_PROPERTY, f"not retried: {article} {verdict.kind} failure is never "
                                                  f"retried (a retry would hide it)"))
        elif len(earlier) < self.retries:
            item.stash[_WILL_RETRY] = True  # the protocol below runs it again
        elif self.retries == 0:
            props.append((outcome.RETRY_PROPERTY, f"not retried: {RETRY_OPTION} is 0 (the default without CI)"))
        else:
            props.append((outcome.RETRY_PROPERTY, f"retried {len(earlier)} of {self.retries}: infra again"))
        return props

    # -- the retry loop --------------------------------------------------------
    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None):
        if self.retries <= 0:
            return None  # pytest's own protocol; failures are still typed above
        base = list(item.user_properties)
        earlier: list[Verdict] = []
        while True:
            item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
            item.user_properties[:] = base  # properties of a discarded attempt do not leak into the next
            item.stash[_ATTEMPTS] = list(earlier)
            reports = runtestprotocol(item, nextitem=nextitem, log=False)
            if not item.stash.get(_WILL_RETRY, False):
                for report in reports:
                    item.ihook.pytest_runtest_logreport(report=report)
                item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
                return True
            verdict = item.stash[_VERDICT]
            earlier.append(verdict)
            first = next(r for r in reports if r.failed)
            first.outcome = RETRIED  # shown, not counted as a failure: the last attempt decides
            item.ihook.pytest_runtest_logreport(report=first)
            item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
            log.warning("%s: retrying (%d of %d) on a fresh server after %s", item.nodeid, len(earlier),
                        self.retries, verdict.line())
            self.fresh(item)

    def pytest_report_teststatus(self, report: pytest.TestReport):
        if report.outcome == RETRIED:
            return "infra retry", "R", ("RETRY (infra)", {"yellow": True})
        if report.when == "call" and report.passed and getattr(report, "kiln_after_retry", False):
            return "passed after infra retry", "P", ("PASSED after infra retry", {"yellow": True})
        return None
