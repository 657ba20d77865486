"""Split one session's e2e tests across n machines: ``nox -s e2e-h100-4 -- --shard 2/4``.

``--shard i/n`` is a harness flag: the noxfile takes it out of the posargs
(``split_shard_arg``) before pytest sees them. Tests are packed by estimated
time, longest first, each onto the least loaded shard (LPT): deterministic for
the same inputs, so the n machines agree on the split without talking. Estimates
come from earlier JUnit files of the same session; an unknown test costs the
median of the known ones.

Tests that share a server key stay on one shard when they can: each shard that
gets a piece of a group pays that server's launch (minutes on a GPU) again. A
group bigger than a fair share is split anyway, since it alone would set the
makespan.
"""
from __future__ import annotations

import heapq
import json
import logging
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from ci.report import artefacts
from ci.report.junit import SKIPPED, XFAILED, CaseResult, JUnitError, read_junit
from ci.text import posargs as posargs_mod

log = logging.getLogger(__name__)

SHARD_FLAG = "--shard"
# With no history at all a test is assumed to take a minute: a small e2e test
# plus its share of a server launch. Any real history replaces this.
DEFAULT_ESTIMATE_S = 60.0
SERVER_PROPERTY = "kiln_server"
# Local search after LPT: a bound on its steps (each is O(items on two shards))
# so a pathological input cannot stall the session start; a few dozen suffice.
MAX_REFINE_STEPS = 200
# Improvements smaller than this are noise next to the estimates themselves.
REFINE_EPSILON_S = 1e-6
_SHARD_RE = re.compile(r"^(\d+)/(\d+)$")


class ShardError(ValueError):
    """A malformed ``--shard`` argument."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"2/4"`` -> Shard(2, 4); ShardError names what is wrong."""
    match = _SHARD_RE.match(text.strip())
    if not match:
        raise ShardError(f"--shard expects i/n (e.g. 2/4), got {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 1 <= index <= count:
        raise ShardError(f"--shard {text}: need 1 <= i <= n and n >= 1")
    return Shard(index, count)


def split_shard_arg(posargs: Sequence[str]) -> tuple[Shard | None, list[str]]:
    """Take ``--shard i/n`` (or ``--shard=i/n``) out of ``posargs``; the rest is for pytest.

    Everything after a literal ``--`` is left alone: it belongs to pytest.
    """
    try:
        value, rest = posargs_mod.take_value(posargs, SHARD_FLAG, hint="i/n (e.g. --shard 2/4)")
    except posargs_mod.PosargError as exc:
        raise ShardError(str(exc)) from None
    return (parse_shard(value) if value is not None else None), rest


def _history(paths: Iterable[str | Path], root: Path | None) -> Iterator[CaseResult]:
    # History is a hint, not an input the run depends on: a missing or broken
    # file is a warning, never a failed session.
    for path in paths:
        try:
            yield from read_junit(path, root).cases
        except JUnitError as exc:
            log.warning("ignoring shard history: %s", exc)


def estimates_from_junit(paths: Iterable[str | Path], root: Path | None = None) -> dict[str, float]:
    """Mean duration per node id over the JUnit files at ``paths``.

    Skipped and xfailed cases are left out: their near-zero time says nothing
    about a run where they execute.
    """
    seen: dict[str, list[float]] = defaultdict(list)
    for case in _history(paths, root):
        if case.outcome not in (SKIPPED, XFAILED):
            seen[case.nodeid].append(case.duration)
    return {nodeid: sum(ts) / len(ts) for nodeid, ts in seen.items()}


def groups_from_junit(paths: Iterable[str | Path], root: Path | None = None) -> dict[str, str]:
    """Node id -> server key, from the ``kiln_server`` property of earlier runs."""
    return {c.nodeid: c.prop(SERVER_PROPERTY) for c in _history(paths, root) if c.prop(SERVER_PROPERTY)}


def groups_from_keys(path: str | Path) -> dict[str, str]:
    """Node id -> server key from ``pytest --kiln-collect-keys`` output (a JSON list)."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        log.warning("no server groups from %s: %s", path, exc)
        return {}
    groups = {}
    for entry in entries if isinstance(entries, list) else ():
        key = json.dumps([entry.get("model"), entry.get("tp"), entry.get("args")])
        groups.update((nodeid, key) for nodeid in entry.get("tests", ()))
    return groups


def default_estimate(estimates: Mapping[str, float]) -> float:
    """The cost assumed for a test with no history: the median known one."""
    return statistics.median(estimates.values()) if estimates else DEFAULT_ESTIMATE_S


def assign(nodeids: Sequence[str], estimates: Mapping[str, float], n: int,
           groups: Mapping[str, str] | None = None, default: float | None = None) -> list[list[str]]:
    """Pack ``nodeids`` onto ``n`` shards, longest first onto the least loaded (LPT),
    then refined by moves/swaps off the fullest shard.

    Ties are broken by node id and shard number, so equal inputs give equal
    splits on every machine. Each shard keeps the collection order (which pytest
    uses to reuse servers). ``groups`` (node id -> server key) keeps tests of one
    server together unless that group alone exceeds a fair share.
    """
    if n < 1:
        raise ShardError(f"cannot split into {n} shards")
    order = {nodeid: i for i, nodeid in enumerate(dict.fromkeys(nodeids))}
    fallback = default_estimate(estimates) if default is None else default
    cost = {nodeid: max(0.0, estimates.get(nodeid, fallback)) for nodeid in order}
    units: dict[tuple[str, str], list[str]] = {}
    for nodeid in order:
        key = (groups or {}).get(nodeid)
        units.setdefault(("group", key) if key else ("test", nodeid), []).append(nodeid)
    fair = sum(cost.values()) / n
    items: list[tuple[float, list[str]]] = []
    for members in units.values():
        weight = sum(cost[m] for m in members)
        if len(members) > 1 and weight > fair:
            items.extend((cost[m], [m]) for m in members)
        else:
            items.append((weight, members))
    items.sort(key=lambda item: (-item[0], min(item[1])))
    # Ties in load go to the shard with fewer items: tests with no cost (an
    # estimate of 0 s) would otherwise all land on shard 1 and leave the others
    # empty -- and an empty shard fails its job (select_for_session).
    heap = [(0.0, 0, shard) for shard in range(n)]
    packed: list[list[tuple[float, list[str]]]] = [[] for _ in range(n)]
    for item in items:
        load, count, shard = heapq.heappop(heap)
        packed[shard].append(item)
        heapq.heappush(heap, (load + item[0], count + 1, shard))
    _refine(packed)
    return [sorted((t for _, members in b for t in members), key=order.__getitem__) for b in packed]


def _refine(packed: list[list[tuple[float, list[str]]]]) -> None:
    """Improve an LPT packing in place by moves and swaps off the fullest shard.

    LPT alone can end up to a third above optimal when each shard gets only a
    few long tests (a small nightly suite on 8 runners). Each step strictly
    lowers the fullest shard's load against one other shard, so it ends; the
    choice of step depends only on loads and node ids, so it stays deterministic.
    """
    loads = [sum(w for w, _ in b) for b in packed]
    for _ in range(MAX_REFINE_STEPS):
        hi = max(range(len(packed)), key=lambda i: (loads[i], -i))
        best: tuple[float, str, str, int, int, int] | None = None
        for lo in range(len(packed)):
            gap = loads[hi] - loads[lo]
            if lo == hi or gap <= REFINE_EPSILON_S:
                continue
            for a, (wa, ma) in enumerate(packed[hi]):
                options = [(wa, -1, "")] + [(wa - wb, b, min(mb)) for b, (wb, mb) in enumerate(packed[lo])
                                            if wb < wa]
                for delta, b, name_b in options:
                    peak = max(loads[hi] - delta, loads[lo] + delta)
                    if peak < loads[hi] - REFINE_EPSILON_S:
                        candidate = (peak, min(ma), name_b, lo, a, b)
                        best = candidate if best is None or candidate < best else best
        if best is None:
            return
        _, _, _, lo, a, b = best
        moved = packed[hi].pop(a)
        if b >= 0:
            back = packed[lo].pop(b)
            packed[hi].append(back)
            loads[hi] += back[0]
            loads[lo] -= back[0]
        packed[lo].append(moved)
        loads[hi] -= moved[0]
        loads[lo] += moved[0]


def select(nodeids: Sequence[str], estimates: Mapping[str, float], shard: Shard,
           groups: Mapping[str, str] | None = None) -> list[str]:
    """The node ids that shard ``shard`` runs."""
    return assign(nodeids, estimates, shard.count, groups)[shard.index - 1]


def parse_collected(output: str) -> list[str]:
    """Node ids from ``pytest --collect-only -q`` output (they end at the first blank line)."""
    nodeids = []
    for line in output.splitlines():
        if not line.strip():
            if nodeids:
                break
            continue
        if "::" in line and not line.startswith(" "):
            nodeids.append(line.rstrip())
    return nodeids


def select_for_session(session, targets: Sequence[str], shard: Shard, reports_dir: Path, *,
                       python: str = "python", pytest_args: Sequence[str] = ()) -> list[str]:
    """Collect ``targets`` in a nox session and return pytest args running only ``shard``.

    ``targets`` are the posargs (paths, node ids, options); the options are kept.

    The shard's node ids go to ``reports/shard-<session>-<i>of<n>.txt`` and
    pytest reads them with ``@file`` (pytest >= 8.2): no argv limit, no quoting.
    An empty shard (more shards than tests, or than groups of tests sharing a
    server) fails the session in one line (:func:`empty_shard_message`).
    ``python`` collects in the interpreter the tests will run in (GPU sessions
    have no venv: the engine's own); ``pytest_args`` (e.g. ``--kiln-model=X``)
    make collection declare the same servers as the run.
    """
    name = session.name
    reports_dir.mkdir(parents=True, exist_ok=True)
    keys_file = reports_dir / f"shard-keys-{name}.json"
    output = session.run(
        python, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
        f"--kiln-profile={name.removeprefix('e2e-')}", f"--kiln-collect-keys={keys_file}",
        *pytest_args, *targets, silent=True, external=python != "python")
    nodeids = parse_collected(output or "")
    # The previous run's JUnit of this session, when present (the workflows upload it as
    # an artifact; restoring it before a sharded run is not wired yet).
    history = [p for p in (artefacts.junit(reports_dir, name),) if p.is_file()]
    estimates = estimates_from_junit(history, Path.cwd())
    shards = assign(nodeids, estimates, shard.count, groups_from_keys(keys_file))
    chosen = shards[shard.index - 1]
    if not chosen:
        # pytest-split's lesson: a shard with nothing to run is a misconfigured
        # split, and a green job for it would hide that a machine tested nothing.
        session.error(empty_shard_message(shard, len(nodeids), sum(1 for b in shards if b)))
    listing = reports_dir / f"shard-{name}-{shard.index}of{shard.count}.txt"
    listing.write_text("\n".join(chosen) + "\n")
    fallback = default_estimate(estimates)
    mine = sum(estimates.get(t, fallback) for t in chosen)
    total = sum(estimates.get(t, fallback) for t in nodeids)
    session.log(f"shard {shard}: {len(chosen)} of {len(nodeids)} tests, ~{mine:.0f}s of ~{total:.0f}s "
                f"({len(history)} earlier JUnit files for estimates)")
    return [*pytest_options(targets), f"@{listing}"]


def empty_shard_message(shard: Shard, collected: int, filled: int) -> str:
    """The one line an empty shard fails with: what was collected and the n that fits."""
    if not collected:
        return f"shard {shard} has no tests: the selection collected none"
    return (f"shard {shard} has no tests: {collected} collected fill only {filled} of {shard.count} "
            f"shards (tests sharing a server stay together); use --shard i/{filled} or fewer")


def pytest_options(args: Sequence[str]) -> list[str]:
    """``args`` without its test paths and node ids (they would re-add every test).

    Options and their values stay (``-x``, ``-k chat``): re-applied to the
    shard's own list they select the same tests again.
    """
    return [a for a in args if a.startswith("-") or not Path(a.split("::", 1)[0]).exists()]
