"""Known-issue skips: ``@pytest.mark.known_issue(profiles=[...], reason=..., link=...)``.

A test that is known to fail on some platforms (sglang #23156 skipped known
non-deterministic tests on one AMD pool, each with its reason) is skipped on
those profiles only, with the reason and link in the report. With
``--strict-known-issues`` it runs there instead, as a strict xfail: still
failing is reported as XFAIL, but *passing* fails the run, so a skip that
outlived its bug gets noticed and removed.

The pytest plugin calls :func:`apply` from ``pytest_collection_modifyitems``;
the decision itself (:func:`decide`) is plain data, testable without pytest.

Quarantined tests (tests/quarantine.json, proposed by ``invoke flakes`` from
their fail rate: ci/report/quarantine.py) are the data-made kind: on their
profile they still run, as a non-strict xfail (:func:`apply_quarantine`), so
they report and their passes count towards coming out, but do not fail the job.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import pytest

from ci.profiles.runners import PROFILES
from ci.report.outcome import QUARANTINE_PROPERTY
from ci.report.quarantine import Entry

log = logging.getLogger(__name__)

MARKER = "known_issue"
STRICT_OPTION = "--strict-known-issues"


@dataclass(frozen=True)
class KnownIssue:
    """One marker's content, validated."""

    profiles: tuple[str, ...]
    reason: str
    link: str | None = None


@dataclass(frozen=True)
class Decision:
    """What to do with a test on this profile: "run", "skip" or "xfail" (strict)."""

    action: str
    reason: str = ""


def from_marker(args: tuple, kwargs: Mapping[str, Any],
                known_profiles: Iterable[str] = PROFILES) -> KnownIssue:
    """Validate a marker's arguments; a bad marker raises ValueError with a one-line cause."""
    kwargs = dict(kwargs)
    if len(args) > 1:
        raise ValueError("known_issue takes profiles as its only positional argument; "
                         "pass reason= and link= by keyword")
    if args and "profiles" in kwargs:
        raise ValueError("known_issue got profiles both positionally and by keyword")
    profiles = args[0] if args else kwargs.pop("profiles", None)
    reason = kwargs.pop("reason", None)
    link = kwargs.pop("link", None)
    if kwargs:
        raise ValueError(f"known_issue got unknown argument(s): {', '.join(sorted(kwargs))}")
    # A bare string would be iterated character by character: "cpu" -> c, p, u.
    if isinstance(profiles, str) or not isinstance(profiles, (list, tuple)) or not profiles:
        raise ValueError(f"known_issue profiles must be a non-empty list of profile names, "
                         f"got {profiles!r}")
    known = list(known_profiles)
    unknown = [p for p in profiles if p not in known]
    if unknown:
        raise ValueError(f"known_issue names unknown profile(s) {', '.join(map(str, unknown))}; "
                         f"known: {', '.join(known)}")
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError("known_issue needs a reason= saying what fails and why")
    if link is not None and (not isinstance(link, str)
                             or not link.startswith(("https://", "http://"))):
        raise ValueError(f"known_issue link must be an http(s) URL, got {link!r}")
    return KnownIssue(tuple(profiles), reason.strip(), link)


def describe(issue: KnownIssue, profile: str) -> str:
    """The reason shown in the report."""
    text = f"known issue on {profile}: {issue.reason}"
    return f"{text} ({issue.link})" if issue.link else text


def decide(issues: Iterable[KnownIssue], profile: str, *, strict: bool) -> Decision:
    """Skip (or, when ``strict``, strict-xfail) if any issue lists ``profile``; else run."""
    for issue in issues:
        if profile in issue.profiles:
            reason = describe(issue, profile)
            if strict:
                return Decision("xfail", f"{reason} [{STRICT_OPTION}: a pass means the issue "
                                         f"is fixed; remove the marker]")
            return Decision("skip", reason)
    return Decision("run")


def apply(items: Iterable[pytest.Item], profile: str, *, strict: bool) -> None:
    """Mark collected ``items`` for ``profile``: a skip, a strict xfail, or nothing.

    A malformed marker stops the session (UsageError naming the test): a typo
    in a profile name must not silently run -- or skip -- a test everywhere.
    """
    for item in items:
        markers = list(item.iter_markers(MARKER))
        if not markers:
            continue
        try:
            issues = [from_marker(m.args, m.kwargs) for m in markers]
        except ValueError as exc:
            raise pytest.UsageError(f"{item.nodeid}: {exc}") from None
        decision = decide(issues, profile, strict=strict)
        if decision.action == "skip":
            item.add_marker(pytest.mark.skip(reason=decision.reason))
        elif decision.action == "xfail":
            item.add_marker(pytest.mark.xfail(reason=decision.reason, strict=True, run=True))
        if decision.action != "run":
            log.info("%s: %s (%s)", item.nodeid, decision.action, decision.reason)


def apply_quarantine(items: Iterable[pytest.Item], profile: str, entries: Iterable[Entry]) -> int:
    """Run ``profile``'s quarantined tests as non-strict xfails, their figures as the reason; how many.

    Not a skip: a quarantined test must keep running, or it could never earn
    its way out (RESTORE_PASSES straight passes). A test already skipped here
    (a known issue) stays skipped.
    """
    quarantined = {e.nodeid: e for e in entries if e.profile == profile}
    marked = 0
    for item in items:
        entry = quarantined.get(item.nodeid)
        if entry is None or item.get_closest_marker("skip"):
            continue
        item.add_marker(pytest.mark.xfail(reason=f"quarantined on {profile}: {entry.reason}", strict=False,
                                          run=True))
        item.user_properties.append((QUARANTINE_PROPERTY, entry.reason))
        marked += 1
        log.info("%s: quarantined on %s (%s)", item.nodeid, profile, entry.reason)
    return marked
