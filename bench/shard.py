"""How close ``--shard i/n`` packing comes to a perfect split (goal: makespan / bound <= 1.05).

    python bench/shard.py [--seed 1] [--json-out F]

For generated but realistic e2e suites, prints for n = 2, 4, 8 shards:
- makespan / lower bound of LPT packing (ci.session.shard.assign), where the lower
  bound is max(largest item, total / n) — no split can beat it;
- round-robin in collection order, the naive split, for comparison;
- for the server suite, what the shards really pay when every shard that
  touches a server key launches it: LPT ignoring keys vs keeping them together.

Suites (durations in seconds, seeded):
  api-200      200 small API tests, log-normal around 6 s
  heavy-tail   150 tests, 5% of them long accuracy/perf runs of 4-15 min
  servers-240  240 tests on 16 server keys: each key's first test pays a
               60-420 s launch, the rest 2-40 s
  few-long     24 tests of 1-10 min (a small nightly suite)
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ci.session.shard import assign  # noqa: E402

GOAL = 1.05
SHARDS = (2, 4, 8)


def api_suite(rng: random.Random) -> dict[str, float]:
    return {f"tests/e2e/test_api.py::test_{i}": rng.lognormvariate(1.8, 0.7) for i in range(200)}


def heavy_tail(rng: random.Random) -> dict[str, float]:
    return {f"tests/e2e/test_mix.py::test_{i}": (rng.uniform(240, 900) if rng.random() < 0.05
                                                 else rng.lognormvariate(2.0, 0.9)) for i in range(150)}


SERVER_KEYS = 16


def server_suite(rng: random.Random) -> tuple[dict[str, float], dict[str, str], dict[str, float]]:
    """(estimates as JUnit history shows them, node id -> server key, run time without launch)."""
    launch = [rng.uniform(60, 420) for _ in range(SERVER_KEYS)]
    est, groups, run = {}, {}, {}
    for i in range(240):
        nodeid = f"tests/e2e/test_srv.py::test_{i}"
        groups[nodeid] = f"model-{i % SERVER_KEYS}|tp={1 + i % 4}|"
        run[nodeid] = rng.uniform(2, 40)
        # In JUnit the first test of each key also carries its server's launch.
        est[nodeid] = run[nodeid] + (launch[i] if i < SERVER_KEYS else 0.0)
    return est, groups, run


def few_long(rng: random.Random) -> dict[str, float]:
    return {f"tests/e2e/test_nightly.py::test_{i}": rng.uniform(60, 600) for i in range(24)}


def server_est(rng: random.Random) -> dict[str, float]:
    return server_suite(rng)[0]


SUITES = (("api-200", api_suite), ("heavy-tail", heavy_tail), ("servers-240", server_est), ("few-long", few_long))


def ratio(bins: list[list[str]], est: dict[str, float], n: int) -> float:
    makespan = max(sum(est[t] for t in b) for b in bins)
    return makespan / max(max(est.values()), sum(est.values()) / n)


def true_cost(bins: list[list[str]], est: dict[str, float], groups: dict[str, str],
              run: dict[str, float]) -> float:
    """What the slowest shard really takes: it launches every server key it touches."""
    launch = {groups[t]: est[t] - run[t] for t in est if est[t] > run[t]}
    return max(sum(run[t] for t in b) + sum(launch[k] for k in {groups[t] for t in b}) for b in bins)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    rows = []
    print(f"{'suite':<13} {'n':>2} {'tests':>5} {'total s':>8} {'LPT':>6} {'round-robin':>11}")
    for name, make in SUITES:
        est = make(random.Random(args.seed))
        ids = list(est)
        for n in SHARDS:
            lpt = ratio(assign(ids, est, n), est, n)
            naive = ratio([ids[i::n] for i in range(n)], est, n)
            rows.append({"suite": name, "n": n, "tests": len(ids), "total_s": round(sum(est.values()), 1),
                         "lpt": round(lpt, 4), "round_robin": round(naive, 4)})
            print(f"{name:<13} {n:>2} {len(ids):>5} {sum(est.values()):>8.0f} {lpt:>6.3f} {naive:>11.3f}")
    worst = max(r["lpt"] for r in rows)
    print(f"worst LPT makespan / lower bound: {worst:.3f} (goal <= {GOAL})")

    print("\nservers-240, counting a launch for every server key a shard touches; bound =")
    print("max(one test with its launch, (all tests + each launch once) / n):")
    print(f"{'n':>2} {'LPT, keys ignored':>18} {'LPT, keys kept together':>24}")
    est, groups, run = server_suite(random.Random(args.seed))
    ids = list(est)
    for n in SHARDS:
        bound = max(max(est.values()), sum(est.values()) / n)
        flat = true_cost(assign(ids, est, n), est, groups, run) / bound
        kept = true_cost(assign(ids, est, n, groups), est, groups, run) / bound
        rows.append({"suite": "servers-240 (true cost)", "n": n, "keys_ignored": round(flat, 4),
                     "keys_together": round(kept, 4)})
        print(f"{n:>2} {flat:>18.3f} {kept:>24.3f}")
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
