"""Metrics-sanity kit, plus the /metrics scraping every gauge-reading kit shares.

Parsing goes through prometheus_client's text parser (the format has escaping,
NaN/Inf spellings and _total/_created suffixes that a regex gets wrong).
Series are matched by *sample* name (``vllm:generation_tokens_total``), which
is what an engine's exposition and the backend spec both spell out.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from typing import Iterable, Mapping

from prometheus_client.parser import text_string_to_metric_families

from ci.kits.api import check_usage
from ci.kits.client import EngineClient, KitFailure, ServerLike, client_for, excerpt
from ci.kits.decode import exact_count_params
from ci.kits.stress import run_concurrent

log = logging.getLogger(__name__)

LabelSet = tuple[tuple[str, str], ...]
Samples = dict[str, dict[LabelSet, float]]

# Engines publish gauges from their stats loop, a beat after the response is
# sent; 30 s is far past any honest lag and short of a wedged scheduler.
SETTLE_DEADLINE_S = 30.0
# Re-scrape interval while waiting for a gauge/counter to settle: cheap for the
# server, fine-grained enough not to add seconds to the test.
SETTLE_POLL_S = 0.25
# Scrape interval while load runs: short, so even a fast GPU engine finishing
# the load in a fraction of a second is seen with requests running.
PEAK_POLL_S = 0.02
# Scrapes during load that make "the running gauge never rose" a finding, and
# load rounds allowed to get them.
MIN_PEAK_SCRAPES = 5
PEAK_ROUNDS = 3
# Launch flags that hide the stats gauges even though /metrics answers.
DISABLING_FLAGS = ("--disable-log-stats",)
AGGREGATIONS = ("min", "max", "sum", "mean")
LOAD_REQUESTS = 8
LOAD_CONCURRENCY = 4
# 64 tokens keep the load running ~0.3 s even on a fast GPU, long enough to be seen.
LOAD_MAX_TOKENS = 64


def parse_samples(text: str) -> Samples:
    """{sample name: {label set: value}} for every sample in a Prometheus exposition."""
    out: Samples = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = float(s.value)
    except ValueError as exc:
        raise KitFailure(f"/metrics is not valid Prometheus text: {excerpt(str(exc), 160)}") from None
    return out


def label_str(labels: LabelSet) -> str:
    """``{engine="0"}``-style rendering of a label set, for tables and messages."""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"


def metrics_hint(server: ServerLike) -> str:
    """What the engine needs for its metrics, phrased for a failure message."""
    backend, args = server.backend, tuple(getattr(server, "args", ()) or ())
    disabling = [f for f in DISABLING_FLAGS if f in args]
    if disabling:
        return f"the server was launched with {' '.join(disabling)}, which hides them"
    flag = getattr(backend, "metrics_flag", None)
    if flag and flag not in args:
        return f"{backend.name} serves them only with {flag}, and the server was launched without it"
    if flag:
        return f"{backend.name} was launched with {flag} but does not expose them"
    return f"{backend.name} launched with args {list(args)}"


def scrape(server: ServerLike, client: EngineClient) -> Samples:
    """Scrape and parse the server's metrics; a missing endpoint fails naming the fix."""
    path = server.backend.metrics_path
    status, text = client.metrics_text(path)
    if status != 200:
        raise KitFailure(f"metrics disabled: {path} -> HTTP {status}; {metrics_hint(server)}")
    return parse_samples(text)


def require(server: ServerLike, samples: Samples, names: Iterable[str | None],
            what: str) -> None:
    """Fail (never skip) when a series the kit needs is absent or unnamed for this engine."""
    names = list(names)
    if any(n is None for n in names):
        raise KitFailure(f"{server.backend.name} has no {what} gauge in its backend spec; "
                         f"this kit cannot run against it")
    missing = [n for n in names if n not in samples]
    if missing:
        raise KitFailure(f"gauge missing: {', '.join(missing)} not in "
                         f"{server.backend.metrics_path}; {metrics_hint(server)}")


def aggregate(values: Mapping[LabelSet, float], how: str) -> tuple[float, LabelSet | None]:
    """Combine one scrape's label sets into one value, dropping NaN.

    Returns (value, the label set that decided it for min/max); value is NaN
    when every label set was NaN. ``min`` is the default in the kits because
    one bad rank must show, not be averaged away (sglang #25886 review).
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; known: {', '.join(AGGREGATIONS)}")
    live = {k: v for k, v in values.items() if not math.isnan(v)}
    if not live:
        return math.nan, None
    if how == "min":
        key = min(live, key=live.__getitem__)
        return live[key], key
    if how == "max":
        key = max(live, key=live.__getitem__)
        return live[key], key
    total = sum(live.values())
    return (total if how == "sum" else total / len(live)), None


def counter_total(samples: Samples, name: str) -> float:
    """Sum of a counter over its label sets (ranks); NaN is a failure, not a zero."""
    values = samples[name]
    if any(math.isnan(v) for v in values.values()):
        raise KitFailure(f"counter {name} reads NaN")
    return sum(values.values())


def _gauge_sum(samples: Samples, name: str) -> float:
    nan = [k for k, v in samples[name].items() if math.isnan(v)]
    if nan:
        raise KitFailure(f"gauge {name}{label_str(nan[0])} reads NaN")
    return sum(samples[name].values())


def _load(server: ServerLike, *, requests: int, concurrency: int, max_tokens: int) -> int:
    """Send ``requests`` completions; return the completion tokens the server reported."""
    extra = exact_count_params(server.backend)

    def one(c: EngineClient, i: int) -> int:
        resp = c.completion(f"Metrics load {i}: the weather today is", max_tokens=max_tokens,
                            temperature=0, **extra)
        return check_usage(resp.get("usage"), where=f"load request {i}")["completion_tokens"]

    outcomes = run_concurrent(server, one, requests=requests, concurrency=concurrency)
    failed = [o for o in outcomes if o.error]
    if failed:
        raise KitFailure(f"load for the metrics check failed: {failed[0].error}")
    return sum(o.completion_tokens for o in outcomes)


def check_metrics_exposed(server: ServerLike) -> Samples:
    """/metrics answers and has the running, waiting and generation-token series."""
    g = server.backend.gauges
    with client_for(server) as c:
        samples = scrape(server, c)
    require(server, samples, [g.running, g.waiting, g.generation_tokens],
            "running/waiting/generation-token")
    return samples


def _peak_during(server: ServerLike, name: str, load) -> tuple[float, int]:
    """Run ``load()`` while a thread scrapes ``name``; return (peak summed value, scrapes)."""
    stop = threading.Event()
    seen = {"peak": 0.0, "scrapes": 0}

    def sample() -> None:
        with client_for(server) as sc:
            while not stop.is_set():
                try:
                    snap = scrape(server, sc)
                except KitFailure:
                    return  # the main thread's own scrapes report a vanished endpoint
                live = [v for v in snap.get(name, {}).values() if not math.isnan(v)]
                seen["peak"] = max(seen["peak"], sum(live))
                seen["scrapes"] += 1
                stop.wait(PEAK_POLL_S)

    sampler = threading.Thread(target=sample, name="kiln-metrics-peak", daemon=True)
    sampler.start()
    try:
        load()
    finally:
        stop.set()
        sampler.join()
    return seen["peak"], seen["scrapes"]


def wait_idle(server: ServerLike, client: EngineClient, *, deadline_s: float = SETTLE_DEADLINE_S,
              after: str = "load") -> tuple[float, int]:
    """Poll until the running and waiting gauges both read 0; (seconds taken, scrapes).

    Fails naming the values when they are still non-zero after ``deadline_s``.
    """
    g = server.backend.gauges
    names = [g.running, g.waiting]
    start = time.monotonic()
    polls = 0
    while True:
        samples = scrape(server, client)
        polls += 1
        require(server, samples, names, "running/waiting")
        values = {n: _gauge_sum(samples, n) for n in names}
        if all(v == 0 for v in values.values()):
            return time.monotonic() - start, polls
        if time.monotonic() - start > deadline_s:
            print(f"after {after}: {values} after {polls} scrapes")
            raise KitFailure(f"gauges not back to 0 {deadline_s:.0f} s after {after}: "
                             + ", ".join(f"{n}={v:g}" for n, v in values.items()))
        time.sleep(SETTLE_POLL_S)


def check_gauges_return_to_zero(server: ServerLike, *, requests: int = LOAD_REQUESTS,
                                concurrency: int = LOAD_CONCURRENCY,
                                max_tokens: int = LOAD_MAX_TOKENS,
                                deadline_s: float = SETTLE_DEADLINE_S) -> None:
    """The running gauge rises under concurrent load, then running and waiting return
    to 0 within ``deadline_s`` (a gauge stuck at 0 would pass the second half alone)."""
    g = server.backend.gauges
    names = [g.running, g.waiting]
    with client_for(server) as c:
        require(server, scrape(server, c), names, "running/waiting")
        peak, peak_scrapes = 0.0, 0
        for _ in range(PEAK_ROUNDS):
            # On a 2-core runner the sampler thread can be starved while the
            # engine spins; load again rather than call a gauge dead unseen.
            got, n = _peak_during(server, g.running, lambda: _load(
                server, requests=requests, concurrency=concurrency, max_tokens=max_tokens))
            peak, peak_scrapes = max(peak, got), peak_scrapes + n
            if peak >= 1 or peak_scrapes >= MIN_PEAK_SCRAPES:
                break
        settled_s, polls = wait_idle(server, c, deadline_s=deadline_s, after="load")
    print(f"during load: {g.running} peaked at {peak:g} over {peak_scrapes} scrapes; "
          f"after load: running/waiting back to 0 in {settled_s:.2f} s ({polls} scrapes)")
    if peak < 1 and peak_scrapes < MIN_PEAK_SCRAPES:
        raise KitFailure(f"{g.running}: only {peak_scrapes} scrapes while load ran "
                         f"({PEAK_ROUNDS} rounds): the sampler was starved, cannot tell "
                         f"whether the gauge tracks requests")
    if peak < 1:
        raise KitFailure(f"{g.running} never rose above {peak:g} in {peak_scrapes} scrapes "
                         f"while {requests} requests ran: it does not track requests")


def check_generation_counter(server: ServerLike, *, requests: int = LOAD_REQUESTS,
                             concurrency: int = LOAD_CONCURRENCY,
                             max_tokens: int = LOAD_MAX_TOKENS,
                             deadline_s: float = SETTLE_DEADLINE_S) -> None:
    """The generation-token counter rises by exactly the completion tokens returned.

    Assumes no other traffic on the server (the pool lends a server to one test
    at a time). Overshoot fails at once; undershoot is polled until the deadline
    because the counter is updated a beat after responses are sent.
    """
    name = server.backend.gauges.generation_tokens
    with client_for(server) as c:
        before_samples = scrape(server, c)
        require(server, before_samples, [name], "generation-token")
        before = counter_total(before_samples, name)
        returned = _load(server, requests=requests, concurrency=concurrency,
                         max_tokens=max_tokens)
        start = time.monotonic()
        while True:
            delta = counter_total(scrape(server, c), name) - before
            if delta == returned:
                break
            if delta > returned or time.monotonic() - start > deadline_s:
                print(f"{name}: before {before:g}, delta {delta:g}, tokens returned {returned}")
                raise KitFailure(f"{name} rose by {delta:g} but {requests} requests returned "
                                 f"{returned} completion tokens")
            time.sleep(SETTLE_POLL_S)
    print(f"{name}: +{delta:g} == {returned} completion tokens returned by {requests} requests")
