"""``invoke plan``: how many shards each profile's suite needs, and the GitHub Actions matrix of them.

From the durations store (ci/report/durations.py) and a wall-clock target per
job, a profile gets ``ceil(sum of p90 x SHARD_MARGIN / target)`` shards (the
sum: every test's p90 and one launch p90 of every server key they use),
at least 1 and at most its pool's cap (``Profile.max_shards``): SGLang's rule
(sglang #25193, #33329), which keeps each job under the ~20 minutes engine
teams hold a job to. The plan packs the store's tests exactly as each shard
will (ci/session/shard.py: same store, same packer), so it can say what each
shard is expected to take, and when the shards cannot be within
MAX_SPREAD of each other, why: one server group (or test) longer than a fair
share, or the cap.

The matrix is ``profile x shard``: each entry is one job running
``--shard i/n``; ``expected`` lists every (session, n) so the report job can
tell a missing shard from a green one (ci/report/matrix.py).
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ci.profiles import routing, runners
from ci.report import durations
from ci.session import shard as sharding

log = logging.getLogger(__name__)

# SGLang's margin over the summed p90s: the p90 already covers a slow run of
# each test; this covers the job's own start (checkout, install) and the
# packing not being perfect.
SHARD_MARGIN = 1.15
# Engine teams keep a job under ~20 minutes (vLLM's 16-17.5 min shards, SGLang's 20).
DEFAULT_TARGET_S = 20 * 60.0
# Shards of one profile should end within this of each other (longest / shortest - 1):
# beyond it the matrix waits on one slow shard while the others' runners idle.
MAX_SPREAD = sharding.MAX_SPREAD
# A unit this close to the longest shard's load is what sets it: nothing packed beside it matters.
LONGEST_UNIT_SHARE = 0.95
_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*$")


class PlanError(ValueError):
    """Bad input to the plan: a target that is not a duration, an unknown profile."""


def parse_target(text: str) -> float:
    """``20m``, ``1h30m``, ``900s`` or ``900`` -> seconds (> 0); PlanError names the bad value."""
    m = _DURATION.match(str(text))
    if not m or not any(m.groups()):
        raise PlanError(f"--target expects a duration like 20m, 1h30m or 900s, got {text!r}")
    h, mins, secs = (float(g) if g else 0.0 for g in m.groups())
    total = h * 3600 + mins * 60 + secs
    if total <= 0:
        raise PlanError(f"--target must be longer than 0 s, got {text!r}")
    return total


def _clock(seconds: float) -> str:
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes}m {sec:02d}s" if minutes else f"{sec}s"


def shard_count(total_s: float, target_s: float, cap: int) -> tuple[int, int]:
    """(shards, wanted): ``ceil(total x SHARD_MARGIN / target)``, at least 1; ``shards`` capped at ``cap``."""
    wanted = max(1, math.ceil(total_s * SHARD_MARGIN / target_s))
    return min(wanted, max(1, cap)), wanted


@dataclass(frozen=True)
class Plan:
    """One profile's shards: how many, what each is expected to take, and why if they are uneven."""

    profile: runners.Profile
    target_s: float
    total_s: float
    shards: int
    wanted: int
    loads: tuple[float, ...]
    tests: int
    history: durations.Estimates
    reasons: tuple[str, ...] = field(default=())
    launch_s: float = 0.0  # of total_s: one launch of each server key

    @property
    def spread(self) -> float:
        """Longest shard over shortest, minus 1 (0.25: the longest is 25 % longer)."""
        low = min(self.loads, default=0.0)
        return max(self.loads) / low - 1 if low > 0 else 0.0

    def lines(self) -> list[str]:
        """The plan as a reader wants it: the rule with its numbers, each shard, and any why-not."""
        p = self.profile
        out = [f"plan for {p.session} (runner {p.runner_label}, at most {p.max_shards} shards), "
               f"target {_clock(self.target_s)} a job",
               f"  durations: {self.history.age_line()}"]
        if self.tests:
            launches = f" ({_clock(self.launch_s)} of it server launches)" if self.launch_s else ""
            out.append(f"  {self.tests} tests, sum of p90 {_clock(self.total_s)}{launches}: "
                       f"ceil({self.total_s:.0f} s x "
                       f"{SHARD_MARGIN} / {self.target_s:.0f} s) = {self.wanted}"
                       + (f", capped at {self.shards}" if self.wanted > self.shards else "")
                       + f" -> {self.shards} shard{'s' * (self.shards != 1)}")
            out += [f"  shard {i}/{self.shards}: ~{_clock(load)}" for i, load in enumerate(self.loads, 1)]
            if self.shards > 1:
                verdict = "within" if self.spread <= MAX_SPREAD else "over"
                out.append(f"  spread {self.spread:.0%} (longest / shortest - 1), {verdict} the "
                           f"{MAX_SPREAD:.0%} the shards should keep")
        out += [f"  why: {r}" for r in self.reasons]
        return out

    def entries(self) -> list[dict[str, Any]]:
        """One matrix entry per shard: the routing entry's keys plus ``shard`` (i/n) and ``shard_name`` (iofn)."""
        p = self.profile
        base = {"profile": p.name, "session": p.session, "runner": p.runner_label, "gpus": p.gpus,
                "vendor": p.vendor}
        return [{**base, "shard": f"{i}/{self.shards}", "shard_name": f"{i}of{self.shards}"}
                for i in range(1, self.shards + 1)]


def _why_uneven(loads: Sequence[float], units: Mapping[str, tuple[float, int]], fair: float,
                target_s: float) -> list[str]:
    """Why the packed shards are further apart than MAX_SPREAD: the longest unit a split keeps whole."""
    if not units:
        return []
    name, (seconds, count) = max(units.items(), key=lambda kv: (kv[1][0], kv[0]))
    if seconds < max(loads) * LONGEST_UNIT_SHARE:
        return [f"the suite has too few independent units for {len(loads)} even shards; plan fewer"]
    what = f"server group {name} ({count} tests)" if count > 1 else name
    fix = "give some of its tests their own server (other launch args)" if count > 1 else "split the test"
    bound, limit = (target_s, "the target") if seconds > target_s else (fair, "a fair share")
    return [f"{what} takes ~{_clock(seconds)}, longer than {limit} (~{_clock(bound)}): the shard holding it "
            f"sets the pace; {fix} to even them"]


def plan_profile(profile: runners.Profile, history: durations.Estimates, target_s: float) -> Plan:
    """The shards ``profile`` needs for ``target_s`` a job, packed from ``history``'s tests."""
    nodeids = sorted(history.p90)
    if not nodeids:
        # A config with no history once timed out a PyTorch shard after 5 hours: one shard,
        # under the job's own timeout, gives the next plan its figures.
        return Plan(profile, target_s, 0.0, 1, 1, (0.0,), 0, history,
                    (f"no durations history for {profile.name}: one shard; its JUnit feeds the next plan",))
    estimates = history.seconds(nodeids)
    groups = sharding.groups_for(nodeids, history, {})
    launches = history.launches
    launch_s = sharding.launch_cost(groups.family, launches, nodeids)
    total = sum(estimates.values()) + launch_s
    n, wanted = shard_count(total, target_s, profile.max_shards)
    packed = sharding.assign(nodeids, estimates, n, groups, launches=launches)
    loads = tuple(sharding.shard_loads(packed, estimates, groups.family, launches))
    reasons = []
    if wanted > n:
        reasons.append(f"{profile.name}'s pool gives a run at most {n} shards (Profile.max_shards): "
                       f"each ~{_clock(total / n)}, over the {_clock(target_s)} target")
    empty = sum(1 for b in packed if not b)
    if empty:
        reasons.append(f"{empty} of {n} shards would be empty: tests sharing a server stay together")
    plan = Plan(profile, target_s, total, n, wanted, loads, len(nodeids), history, tuple(reasons), launch_s)
    if n > 1 and plan.spread > MAX_SPREAD and not empty:
        # What the packer keeps whole: a server group (with its launch) within its split limit,
        # else each test (each paying the launch again).
        limit = total / n * (1 + sharding.GROUP_SPLIT_TOLERANCE)
        families: dict[str, list[str]] = {}
        for t in nodeids:
            families.setdefault(groups.family.get(t, t), []).append(t)
        units = {}
        for key, members in families.items():
            launch = sharding.launch_cost(groups.family, launches, members[:1])
            weight = sum(estimates[t] for t in members) + launch
            units.update({key: (weight, len(members))} if weight <= limit else
                         {t: (estimates[t] + launch, 1) for t in members})
        plan = Plan(profile, target_s, total, n, wanted, loads, len(nodeids), history,
                    (*reasons, *_why_uneven(loads, units, total / n, target_s)), launch_s)
    return plan


def plan_all(profiles: Sequence[runners.Profile], store: durations.Store, target_s: float) -> list[Plan]:
    """A plan per profile, from one store."""
    return [plan_profile(p, store.estimates(p.name), target_s) for p in profiles]


def expected(plans: Sequence[Plan]) -> str:
    """``e2e-cpu:3 e2e-h100-4:2``: every session's shard count, for ``invoke merge --expect``."""
    return " ".join(f"{p.profile.session}:{p.shards}" for p in plans)


def workflow_outputs(event: str, pool_input: str | None, store: durations.Store, target_s: float, *,
                     gpu: bool = True, profiles: Mapping[str, runners.Profile] | None = None
                     ) -> tuple[dict[str, str], list[Plan]]:
    """``$GITHUB_OUTPUT`` values for a workflow run, and the plans behind them.

    ``pool``/``matrix``/``count``: the routed GPU profiles x their shards (none
    with ``gpu`` False: a fork's PR gets no self-hosted job); ``cpu_matrix``/
    ``cpu_count``: the cpu lane's shards, its own job on GitHub-hosted runners;
    ``expected``: every session and its shard count, for the report job.
    """
    table = profiles if profiles is not None else runners.PROFILES
    routed = routing.outputs(event, pool_input, table)
    names = [e["profile"] for e in json.loads(routed["matrix"])["include"]] if gpu else []
    gpu_plans = plan_all([table[n] for n in names], store, target_s)
    cpu_plans = plan_all([p for p in table.values() if p.vendor in routing.MATRIX_SKIP_VENDORS], store, target_s)
    gpu_entries = [e for p in gpu_plans for e in p.entries()]
    cpu_entries = [e for p in cpu_plans for e in p.entries()]
    compact = {"separators": (",", ":")}
    values = {
        "pool": routed["pool"],
        "matrix": json.dumps({"include": gpu_entries}, **compact), "count": str(len(gpu_entries)),
        "cpu_matrix": json.dumps({"include": cpu_entries}, **compact), "cpu_count": str(len(cpu_entries)),
        "expected": expected([*cpu_plans, *gpu_plans]),
    }
    log.info("plan: %d GPU shard jobs, %d cpu shard jobs", len(gpu_entries), len(cpu_entries))
    return values, [*cpu_plans, *gpu_plans]
