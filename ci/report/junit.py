"""Read pytest's JUnit XML back into test results with real pytest node ids.

The report needs node ids (``tests/e2e/test_api.py::test_chat[stream]``) because
a repro command is only useful if pasting it selects exactly that test; sharding
needs them to match collected items against past durations. pytest writes a
``file`` attribute only with ``junit_family=xunit1``; without it the node id is
rebuilt from ``classname`` (dotted module path + classes) and ``name``.
"""
from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PASSED, FAILED, ERROR, SKIPPED, XFAILED = "passed", "failed", "error", "skipped", "xfailed"
# A test property carrying the exact node id wins over any reconstruction.
NODEID_PROPERTY = "kiln_nodeid"


class JUnitError(ValueError):
    """The JUnit file is missing or is not JUnit XML."""


@dataclass(frozen=True)
class CaseResult:
    """One ``<testcase>``: its node id, outcome and what pytest said about it."""

    nodeid: str
    outcome: str
    duration: float = 0.0
    message: str = ""
    details: str = ""
    properties: tuple[tuple[str, str], ...] = ()

    def prop(self, name: str) -> str | None:
        """The value of test property ``name`` (the last one recorded), or None."""
        found = [v for k, v in self.properties if k == name]
        return found[-1] if found else None


@dataclass(frozen=True)
class RunResult:
    """Every test case of one JUnit file, plus the suite-level facts."""

    cases: tuple[CaseResult, ...]
    duration: float = 0.0
    started: str | None = None
    properties: tuple[tuple[str, str], ...] = ()

    def prop(self, name: str) -> str | None:
        """The value of suite property ``name`` (the last one recorded), or None."""
        found = [v for k, v in self.properties if k == name]
        return found[-1] if found else None

    def count(self, outcome: str) -> int:
        """How many cases ended with ``outcome``."""
        return sum(1 for c in self.cases if c.outcome == outcome)


def _float(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


def nodeid_for(classname: str, name: str, file: str | None = None, root: Path | None = None) -> str:
    """The pytest node id of a JUnit test case.

    With ``file`` (xunit1) the module part of ``classname`` is known exactly.
    Otherwise the longest dotted prefix that is a ``.py`` file under ``root``
    is the module; failing that, trailing capitalised parts are taken as classes
    (Python's naming convention, and pytest only collects ``Test*`` classes).
    """
    parts = [p for p in classname.split(".") if p]
    if file:
        module = file[:-3].replace("/", ".") if file.endswith(".py") else file
        rest = classname[len(module) + 1:] if classname.startswith(module + ".") else ""
        return "::".join([file, *[p for p in rest.split(".") if p], name])
    split = None
    if root is not None:
        for k in range(len(parts), 0, -1):
            if root.joinpath(*parts[:k - 1], parts[k - 1] + ".py").is_file():
                split = k
                break
    if split is None:
        split = len(parts)
        while split > 1 and parts[split - 1][:1].isupper():
            split -= 1
    if not parts:
        return name
    path = "/".join(parts[:split]) + ".py"
    return "::".join([path, *parts[split:], name])


def _properties(element: ET.Element) -> tuple[tuple[str, str], ...]:
    return tuple((p.get("name", ""), p.get("value", "")) for p in element.iterfind("properties/property"))


def _case(element: ET.Element, root: Path | None) -> CaseResult:
    props = _properties(element)
    exact = [v for k, v in props if k == NODEID_PROPERTY]
    nodeid = exact[-1] if exact else nodeid_for(
        element.get("classname", ""), element.get("name", ""), element.get("file"), root)
    failure, error, skipped = (element.find(t) for t in ("failure", "error", "skipped"))
    # A test that failed and then errored in teardown has both; the failure is the news.
    if failure is not None:
        outcome, detail = FAILED, failure
    elif error is not None:
        outcome, detail = ERROR, error
    elif skipped is not None:
        outcome = XFAILED if skipped.get("type") == "pytest.xfail" else SKIPPED
        detail = skipped
    else:
        outcome, detail = PASSED, None
    message = detail.get("message", "") if detail is not None else ""
    text = (detail.text or "") if detail is not None else ""
    return CaseResult(nodeid, outcome, _float(element.get("time")), message, text, props)


def parse_junit(data: str | bytes, root: Path | None = None, source: str = "<junit>") -> RunResult:
    """Parse JUnit XML text; ``root`` (the repo root) helps rebuild node ids."""
    try:
        top = ET.fromstring(data)
    except ET.ParseError as exc:
        raise JUnitError(f"{source}: not valid XML ({exc})") from None
    if top.tag == "testsuite":
        suites = [top]
    elif top.tag == "testsuites":
        suites = top.findall("testsuite")
    else:
        raise JUnitError(f"{source}: root element is <{top.tag}>, not <testsuites> or <testsuite>")
    cases: list[CaseResult] = []
    props: list[tuple[str, str]] = []
    duration = 0.0
    for suite in suites:
        cases.extend(_case(tc, root) for tc in suite.iter("testcase"))
        props.extend(_properties(suite))
        duration += _float(suite.get("time"))
    started = suites[0].get("timestamp") if suites else None
    return RunResult(tuple(cases), duration, started, tuple(props))


def read_junit(path: str | Path, root: Path | None = None) -> RunResult:
    """Read one JUnit file; JUnitError names the file and the cause."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise JUnitError(f"{path}: no such JUnit file") from None
    except OSError as exc:
        raise JUnitError(f"{path}: unreadable ({exc.strerror})") from None
    return parse_junit(data, root, str(path))
