"""Whose fault a red test is, as JUnit carries it: the property names, and reading them back.

The session types every failed or errored test from its evidence
(ci/session/classify.py) as one of three classes and writes, per test case::

    <property name="kiln_failure_class" value="test|engine|infra"/>
    <property name="kiln_failure_reason" value="one line"/>
    <property name="kiln_retry" value="what the retry policy did with it"/>
    <property name="kiln_attempt" value="1: infra: why the first attempt failed"/>   (one per retried attempt)
    <property name="kiln_outcome" value="passed after infra retry"/>                 (such a pass only)

Why three classes: in vLLM's pass over 240 jobs that went green on retry
(vllm #57372) only 6 % were a flaky assertion; the rest were the runner or the
hardware. ``infra`` is retried (on a fresh server), ``engine`` and ``test`` never
are: a retry would hide real breakage (TensorRT-LLM stopped doing it). The
report, the job summary, the sticky comment and ``invoke flakes`` read these
properties back through this module; nothing parses the names elsewhere.
"""
from __future__ import annotations

from typing import Iterable

from ci.report.junit import ERROR, FAILED, PASSED, XFAILED, CaseResult

INFRA, ENGINE, TEST = "infra", "engine", "test"
# Decision order and report order alike: the runner's fault first (collapsed in
# the report: nobody's code to read), then the engine's, then the test's.
CLASSES = (INFRA, ENGINE, TEST)
# A red case without kiln's property (an older artefact, a run without the
# plugin): no evidence was weighed, so the report claims no class for it.
UNTYPED = "untyped"
GROUPS = (*CLASSES, UNTYPED)

CLASS_PROPERTY = "kiln_failure_class"
REASON_PROPERTY = "kiln_failure_reason"
RETRY_PROPERTY = "kiln_retry"
ATTEMPT_PROPERTY = "kiln_attempt"
OUTCOME_PROPERTY = "kiln_outcome"
# A test under quarantine (ci/report/quarantine.py) runs as a non-strict xfail:
# this property carries the figures that put it there.
QUARANTINE_PROPERTY = "kiln_quarantined"
# Suite property: the runner profile the run used, so a history of JUnit files
# can be split per hardware (invoke flakes).
PROFILE_PROPERTY = "kiln_profile"

PASSED_AFTER_RETRY = "passed after infra retry"

# What each class means, for the report's group headings.
MEANING = {
    INFRA: "the runner, the registry or the hardware: retried on a fresh server, nobody's code to fix",
    ENGINE: "the server crashed, exited, answered 5xx, broke the protocol or hung: never retried",
    TEST: "an assertion or a kit's bound failed against a healthy server: never retried",
    UNTYPED: "no class recorded (a JUnit written without kiln's plugin)",
}
ICON = {INFRA: "🏗️", ENGINE: "🔥", TEST: "❌", UNTYPED: "❔"}


def failure_class(case: CaseResult) -> str:
    """The class kiln recorded for a failed or errored case, or ``untyped`` when it recorded none."""
    kind = case.prop(CLASS_PROPERTY)
    return kind if kind in CLASSES else UNTYPED


def failure_reason(case: CaseResult) -> str | None:
    """The one-line reason kiln gave for the case's class, if it wrote one."""
    return case.prop(REASON_PROPERTY)


def retry_note(case: CaseResult) -> str | None:
    """What the retry policy did with the case, as kiln wrote it."""
    return case.prop(RETRY_PROPERTY)


def attempts(case: CaseResult) -> list[str]:
    """Earlier attempts of the case ("1: infra: why"), oldest first."""
    return [v for k, v in case.properties if k == ATTEMPT_PROPERTY]


def passed_after_retry(case: CaseResult) -> bool:
    """True for a pass that needed an infra retry: never to be read as a plain pass."""
    return case.outcome == PASSED and case.prop(OUTCOME_PROPERTY) == PASSED_AFTER_RETRY


def is_red(case: CaseResult) -> bool:
    """A failed or errored case (a quarantined test's xfail is not red: it does not fail the job)."""
    return case.outcome in (FAILED, ERROR)


def quarantined_fail(case: CaseResult) -> bool:
    """A quarantined test that failed: reported as an expected failure, still a failure of the test."""
    return case.outcome == XFAILED and case.prop(QUARANTINE_PROPERTY) is not None


def count_by_class(cases: Iterable[CaseResult]) -> dict[str, int]:
    """Red cases per class (``untyped`` last), every group present (zero when none)."""
    counts = dict.fromkeys(GROUPS, 0)
    for case in cases:
        if is_red(case):
            counts[failure_class(case)] += 1
    return counts


def class_summary(cases: Iterable[CaseResult]) -> str:
    """``1 infra, 2 test`` for the verdict line; empty when nothing red was typed at all."""
    counts = count_by_class(cases)
    if counts[UNTYPED] == sum(counts.values()):
        return ""
    return ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
