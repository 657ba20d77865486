"""Split one session's e2e tests across n machines: ``nox -s e2e-h100-4 -- --shard 2/4``.

``--shard i/n`` is a harness flag: the noxfile takes it out of the posargs
(``split_shard_arg``) before pytest sees them. Tests are packed by estimated
time, longest first, each onto the least loaded shard (LPT): deterministic for
the same inputs, so the n machines agree on the split without talking. The
estimates are the durations store's (ci/report/durations.py: p90 per test and
server key from earlier runs' JUnit, its wait for servers taken out; a test with
no history costs its file's median, then the suite's; and p90 per server key of
its launch); the store's age and coverage are printed first, and
the shard's record names the store's digest, so the merged report can prove
every shard of a matrix split by the same figures.

Tests that share a server key stay on one shard when they can: a group costs
its tests plus its key's launch, and each shard that gets a piece of a split
group pays that launch (minutes on a GPU) again. A group bigger than a fair
share is split anyway, since it alone would set the makespan.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import logging
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ci.engine.keys import ServerKey, workers_of_label
from ci.report import artefacts, durations
from ci.text import posargs as posargs_mod

log = logging.getLogger(__name__)

SHARD_FLAG = "--shard"
DEFAULT_ESTIMATE_S = durations.DEFAULT_ESTIMATE_S
# Local search after LPT: a bound on its steps (each is O(items on two shards))
# so a pathological input cannot stall the session start; a few dozen suffice.
MAX_REFINE_STEPS = 200
# Improvements smaller than this are noise next to the estimates themselves.
REFINE_EPSILON_S = 1e-6
# Shards should end within 40 % of each other (issue 25; `invoke plan` checks it).
MAX_SPREAD = 0.40
# A server group (its tests and its launch) is split only when it alone is more
# than this over a fair share: every piece of it pays the launch again (the
# items' costs include it, so the packing sees it), and a split that would only
# trim a group already within MAX_SPREAD buys a second launch for little.
GROUP_SPLIT_TOLERANCE = MAX_SPREAD
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

    @property
    def pair(self) -> tuple[int, int]:
        """(index, count): how ci.report.artefacts names this shard's files."""
        return self.index, self.count


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


def groups_from_keys(path: str | Path) -> dict[str, str]:
    """Node id -> server key from ``pytest --kiln-collect-keys`` output (a JSON list).

    Keys are spelled as the JUnit's ``kiln_server`` property spells them
    (``tiny-llama|tp=1|``), so a new test joins the group its history-known
    neighbours on the same server are in.
    """
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        log.warning("no server groups from %s: %s", path, exc)
        return {}
    groups = {}
    for entry in entries if isinstance(entries, list) else ():
        try:
            key = str(ServerKey(str(entry["model"]), int(entry.get("tp", 1)), tuple(entry.get("args") or ())))
        except (KeyError, TypeError, ValueError):
            continue
        groups.update((nodeid, key) for nodeid in entry.get("tests", ()))
    return groups


@dataclass(frozen=True)
class Groups:
    """What keeps tests together: ``family`` (node id -> the server key a shard must launch for it)
    and ``unit`` (node id -> the server or topology it ran as, inside its family)."""

    family: Mapping[str, str]
    unit: Mapping[str, str]


def groups_for(nodeids: Sequence[str], known: durations.Estimates, collected: Mapping[str, str]) -> Groups:
    """Each test's family and unit: its unit from history (else the collected key), its family the unit's
    workers' key for a topology (the pool lends it an idle server of that key), else the unit itself.

    History wins over collection: it names what a test really ran as (a
    topology, not its workers), and the plan, which collects nothing, sees the same.
    """
    unit = {t: k for t in nodeids if (k := known.servers.get(t) or collected.get(t))}
    return Groups({t: workers_of_label(k) or k for t, k in unit.items()}, unit)


def default_estimate(estimates: Mapping[str, float]) -> float:
    """The cost assumed for a test with no estimate given to :func:`assign`: the median known one."""
    return statistics.median(estimates.values()) if estimates else DEFAULT_ESTIMATE_S


def launch_cost(family: Mapping[str, str], launches: Mapping[str, float], nodeids: Sequence[str]) -> float:
    """The launches ``nodeids`` need: each server key among their families once (0 s without history)."""
    return sum(launches.get(k, 0.0) for k in {family[t] for t in nodeids if t in family})


def shard_loads(shards: Sequence[Sequence[str]], estimates: Mapping[str, float], family: Mapping[str, str],
                launches: Mapping[str, float]) -> list[float]:
    """Each shard's expected seconds: its tests, plus one launch of every server key it needs."""
    return [sum(estimates[t] for t in b) + launch_cost(family, launches, b) for b in shards]


def _split(members: list[str], cost: Mapping[str, float], keys: Sequence[Mapping[str, str]],
           limit: float, launch: float = 0.0) -> list[tuple[float, list[str]]]:
    """``members`` as one item, or -- when over ``limit`` -- split by the next finer key, tests last.

    Every item pays ``launch``: each shard that gets a piece launches the server again.
    """
    weight = sum(cost[m] for m in members) + launch
    if len(members) == 1 or weight <= limit:
        return [(weight, members)]
    if not keys:
        return [(cost[m] + launch, [m]) for m in members]
    parts: dict[str, list[str]] = {}
    for m in members:
        parts.setdefault(keys[0].get(m, m), []).append(m)
    if len(parts) == 1:
        return _split(members, cost, keys[1:], limit, launch)
    return [item for part in parts.values() for item in _split(part, cost, keys[1:], limit, launch)]


def assign(nodeids: Sequence[str], estimates: Mapping[str, float], n: int,
           groups: Mapping[str, str] | Groups | None = None, default: float | None = None,
           launches: Mapping[str, float] | None = None) -> list[list[str]]:
    """Pack ``nodeids`` onto ``n`` shards, longest first onto the least loaded (LPT),
    then refined by moves/swaps off the fullest shard.

    Ties are broken by node id and shard number, so equal inputs give equal
    splits on every machine. Each shard keeps the collection order (which pytest
    uses to reuse servers). ``groups`` (node id -> server key, or a
    :class:`Groups`) keeps tests of one server together unless that group alone
    exceeds a fair share by more than GROUP_SPLIT_TOLERANCE; such a group is
    split into its units (a topology, the server itself), then into tests.
    ``launches`` (server key -> seconds) is what a group's key costs to launch,
    paid by each piece of it; a key not in it costs nothing.
    """
    if n < 1:
        raise ShardError(f"cannot split into {n} shards")
    if groups is None or not isinstance(groups, Groups):
        groups = Groups(groups or {}, {})
    order = {nodeid: i for i, nodeid in enumerate(dict.fromkeys(nodeids))}
    fallback = default_estimate(estimates) if default is None else default
    cost = {nodeid: max(0.0, estimates.get(nodeid, fallback)) for nodeid in order}
    families: dict[tuple[str, str], list[str]] = {}
    for nodeid in order:
        key = groups.family.get(nodeid)
        families.setdefault(("group", key) if key else ("test", nodeid), []).append(nodeid)
    launches = launches or {}
    total = sum(cost.values()) + launch_cost(groups.family, launches, list(order))
    limit = total / n * (1 + GROUP_SPLIT_TOLERANCE)
    items = []
    for (kind, key), members in families.items():
        launch = launches.get(key, 0.0) if kind == "group" else 0.0
        items += _split(members, cost, [groups.unit], limit, launch)
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
                       python: str = "python", pytest_args: Sequence[str] = (),
                       store_path: Path | None = None) -> list[str]:
    """Collect ``targets`` in a nox session and return pytest args running only ``shard``.

    ``targets`` are the posargs (paths, node ids, options); the options are kept.

    The shard's node ids go to ``reports/shard-<session>-<i>of<n>.txt`` and
    pytest reads them with ``@file`` (pytest >= 8.2): no argv limit, no quoting;
    beside it a JSON record (what was collected, the store's digest, the
    estimate) for the merged report's union check. An empty shard (more
    shards than tests, or than groups of tests sharing a server) fails the
    session in one line (:func:`empty_shard_message`), and so does a durations
    store that cannot be read. ``python`` collects in the interpreter the
    tests will run in (GPU sessions have no venv: the engine's own);
    ``pytest_args`` (e.g. ``--kiln-model=X``) make collection declare the same
    servers as the run; ``store_path`` defaults to durations.default_path().
    """
    name = session.name
    profile = name.removeprefix("e2e-")
    store_path = store_path or durations.default_path()
    reports_dir.mkdir(parents=True, exist_ok=True)
    keys_file = artefacts.shard_keys(reports_dir, name)
    output = session.run(
        python, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
        f"--kiln-profile={profile}", f"--kiln-collect-keys={keys_file}",
        *pytest_args, *targets, silent=True, external=python != "python")
    nodeids = parse_collected(output or "")
    try:
        known = durations.Store.load(store_path).estimates(profile)
    except durations.DurationsError as exc:
        session.error(f"shard {shard}: {exc}")
    session.log(f"durations store {store_path}: {known.age_line()}")
    session.log(f"durations: {known.coverage(nodeids).line()}")
    estimates = known.seconds(nodeids)
    groups = groups_for(nodeids, known, groups_from_keys(keys_file))
    shards = assign(nodeids, estimates, shard.count, groups, launches=known.launches)
    chosen = shards[shard.index - 1]
    if not chosen:
        # pytest-split's lesson: a shard with nothing to run is a misconfigured
        # split, and a green job for it would hide that a machine tested nothing.
        session.error(empty_shard_message(shard, len(nodeids), sum(1 for b in shards if b)))
    listing = artefacts.shard_listing(reports_dir, name, shard.pair)
    listing.write_text("\n".join(chosen) + "\n")
    loads = shard_loads(shards, estimates, groups.family, known.launches)
    write_record(artefacts.shard_record(reports_dir, name, shard.pair), session=name, shard=shard,
                 collected=nodeids, chosen=chosen, loads=loads, digest=known.digest)
    session.log(f"shard {shard}: {len(chosen)} of {len(nodeids)} tests, ~{loads[shard.index - 1]:.0f}s of "
                f"~{sum(loads):.0f}s (shards ~{', ~'.join(f'{x:.0f}' for x in loads)} s)")
    return [*pytest_options(targets), f"@{listing}"]


def collected_digest(nodeids: Sequence[str]) -> str:
    """sha256 of the collected node ids, order-free: shards that collected the same suite agree on it."""
    return hashlib.sha256("\n".join(sorted(set(nodeids))).encode()).hexdigest()


def write_record(path: Path, *, session: str, shard: Shard, collected: Sequence[str], chosen: Sequence[str],
                 loads: Sequence[float], digest: str) -> None:
    """The shard's record: what it was given out of what, and from which durations store."""
    path.write_text(json.dumps({
        "session": session, "shard": [shard.index, shard.count],
        "collected": len(collected), "collected_sha256": collected_digest(collected),
        "durations_sha256": digest, "estimate_s": round(loads[shard.index - 1], 1),
        "estimates_s": [round(x, 1) for x in loads], "tests": list(chosen),
    }, indent=1) + "\n")


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
