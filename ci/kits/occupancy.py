"""Metric-gauge kit (generic ``fwd_occupancy``): is the engine busy while it should be?

Catches scheduler regressions before throughput moves (sglang #25886): while
one long request decodes, the engine should be forwarding nearly all the time.
The gauge comes from the backend spec. Two ways to read it:

- ``ratio``: the gauge already is an occupancy fraction (sglang's
  ``fwd_occupancy``); the statistic is the median of the samples.
- ``busy``: the gauge is a request count (vLLM's ``num_requests_running``, its
  honest equivalent); a sample is busy when it reads >= 1 and the statistic is
  the fraction of busy samples. (The median of 0/1 values only says "more
  than half", too weak to catch a scheduler that idles 40 % of the time.)
  Samples before the first busy reading and after the last are set aside:
  vLLM publishes the gauge with engine outputs, so it reads 0 until prefill
  is done and stays 0 while the HTTP response is sent -- publication lag, not
  idleness (3 of 17 samples on the 2-core CPU profile). An engine that idles
  *during* the request still shows as zeros inside the span; a round that
  never reads busy keeps every sample and scores 0 -- unless it has fewer
  than ``min_samples`` samples: a starved sampler that only saw the request's
  edges cannot tell lag from idleness, so that round is set aside as
  inconclusive (and the kit fails if no round is conclusive).

The long request is repeated (up to ``max_rounds``, each round analysed on
its own) until ``target_samples`` samples are in hand: on a 2-core runner
the sampler itself can be starved of CPU for a second or more while the
engine spins, and one short request may then yield only two or three scrapes.

Label sets (DP ranks, engines) are combined per scrape with ``min`` by default
so one idle rank shows instead of being averaged away; NaN samples are dropped
and counted; fewer than ``min_samples`` valid samples is a failure, not a pass.
"""
from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from dataclasses import dataclass, field

from ci.kits.client import KitFailure, ServerLike, client_for
from ci.kits.decode import exact_count_params
from ci.kits.metrics import LabelSet, aggregate, label_str, require, scrape

log = logging.getLogger(__name__)

MODES = ("ratio", "busy")
# Scrape interval: fine enough for >= 20 samples from a few-second request,
# coarse enough that scraping does not steal the engine's CPU on a 2-core box.
SAMPLE_INTERVAL_S = 0.2
# sglang #25886 used a 2048-token request; it is clamped to the model's context.
LONG_MAX_TOKENS = 2048
WARMUP_MAX_TOKENS = 4
# Room left in the context for the prompt (and any chat template tokens).
PROMPT_MARGIN_TOKENS = 64
# Read timeout of the long request: 2048 tokens on a slow runner fit well
# inside; an engine silent for this long is wedged.
LONG_REQUEST_TIMEOUT_S = 300.0
# Ceiling for the sampling loop, just past the long request's own timeout, so
# neither a wedged request nor a never-set event can keep the test alive.
SAMPLING_DEADLINE_S = LONG_REQUEST_TIMEOUT_S + 30.0
LONG_PROMPT = "Write a very long story about a lighthouse, a storm and a ship:"
# Samples wanted before the figure is trusted: 20 puts one stray reading at 5 %.
TARGET_SAMPLES = 20
# Rounds (long requests one after another) allowed to reach TARGET_SAMPLES; a
# GPU gets there in one, a starved 2-core runner in two or three.
MAX_ROUNDS = 3


@dataclass(frozen=True)
class Sample:
    """One scrape: its round, seconds since that round's request started, each label set's value."""

    round: int
    t: float
    values: dict[LabelSet, float]
    accept: dict[LabelSet, float] = field(default_factory=dict)


@dataclass
class OccupancyResult:
    """What the kit measured, for printing and for callers that report it."""

    gauge: str
    mode: str
    aggregation: str
    samples: list[Sample]
    kept: list[Sample]  # valid samples inside the span, in order
    dropped_nan: int
    statistic: float
    long_tokens: int
    accept_length: float | None = None
    outside_span: int = 0  # busy mode: samples before the first / after the last busy one

    def table(self) -> str:
        """The sample table printed before any assertion."""
        kept = {(k.round, k.t) for k in self.kept}
        lines = [f"{self.gauge} ({self.mode}, {self.aggregation} over label sets), "
                 f"long request {self.long_tokens} tokens",
                 f"{'round':>5}  {'t_s':>6}  {'agg':>7}  per label set"]
        for s in self.samples:
            agg = aggregate(s.values, self.aggregation)[0]
            per = "  ".join(f"{label_str(k)}={v:g}" for k, v in sorted(s.values.items()))
            flag = ("" if (s.round, s.t) in kept else "  (dropped: NaN)" if math.isnan(agg)
                    else "  (outside the busy span)")
            lines.append(f"{s.round:>5}  {s.t:6.2f}  {agg:7.3f}  {per}{flag}")
        lines.append(f"kept {len(self.kept)}, dropped {self.dropped_nan} NaN, "
                     f"{self.outside_span} outside the busy span; "
                     f"statistic {self.statistic:.3f}")
        return "\n".join(lines)


def _long_tokens(server: ServerLike, requested: int) -> int:
    """``requested`` clamped to the served model's context (from /v1/models when given)."""
    with client_for(server) as c:
        resp = c.get(server.backend.models_path)
    try:
        entry = next(m for m in resp.json()["data"] if m.get("id") == server.served_model)
        max_len = int(entry["max_model_len"])
    except (ValueError, KeyError, TypeError, StopIteration):
        return requested  # the engine does not say; trust the caller
    return max(1, min(requested, max_len - PROMPT_MARGIN_TOKENS))


def statistic(values: list[float], mode: str) -> float:
    """The occupancy figure for ``mode`` over aggregated, NaN-free ``values``."""
    if mode == "ratio":
        return statistics.median(values)
    if mode == "busy":
        return sum(1 for v in values if v >= 1) / len(values)
    raise ValueError(f"unknown occupancy mode {mode!r}; known: {', '.join(MODES)}")


def check_occupancy(server: ServerLike, *, threshold: float, min_samples: int,
                    aggregation: str = "min", mode: str = "ratio", gauge: str | None = None,
                    interval_s: float = SAMPLE_INTERVAL_S, long_max_tokens: int = LONG_MAX_TOKENS,
                    accept_length_min: float | None = None, long_requests: int = 1,
                    target_samples: int = TARGET_SAMPLES,
                    max_rounds: int = MAX_ROUNDS) -> OccupancyResult:
    """Sample ``gauge`` while a long request runs; assert its statistic >= ``threshold``.

    ``accept_length_min``, when given, also requires the backend's speculative
    accept-length gauge and asserts its median (over the same scrapes) >= it.
    ``long_requests`` runs that many long requests at once: with data
    parallelism, one per rank, so an idle rank under ``min`` means a bad rank
    rather than a rank that was simply given no work.
    """
    if mode not in MODES:
        raise ValueError(f"unknown occupancy mode {mode!r}; known: {', '.join(MODES)}")
    aggregate({}, aggregation)  # validates the name before any traffic
    if min(min_samples, long_requests, max_rounds) < 1:
        raise ValueError(f"min_samples, long_requests and max_rounds must be >= 1, got "
                         f"{min_samples}, {long_requests}, {max_rounds}")
    gauge = gauge or server.backend.gauges.occupancy
    accept_gauge = server.backend.gauges.spec_accept_length if accept_length_min else None
    samples: list[Sample] = []
    kept: list[Sample] = []
    dropped = outside = 0
    error = None
    with client_for(server) as c:
        # Up front, before any load: a missing gauge fails naming the flag, never skips.
        first = scrape(server, c)
        require(server, first, [gauge], "occupancy")
        if accept_length_min is not None:
            require(server, first, [accept_gauge], "speculative accept-length")
        c.completion("Hello", max_tokens=WARMUP_MAX_TOKENS, temperature=0)
        n_long = _long_tokens(server, long_max_tokens)
        for rnd in range(1, max_rounds + 1):
            got, error = _sample_round(server, c, rnd, gauge, accept_gauge, n_long, interval_s,
                                       long_requests)
            got = list(got)  # analyse a copy, never the list the sampler filled
            valid = [g for g in got if not math.isnan(aggregate(g.values, aggregation)[0])]
            span = _busy_span(valid, aggregation, min_samples) if mode == "busy" else valid
            samples += got
            kept += span
            dropped += len(got) - len(valid)
            outside += len(valid) - len(span)
            if error or len(kept) >= max(target_samples, min_samples):
                break
    values = [aggregate(k.values, aggregation)[0] for k in kept]
    stat = statistic(values, mode) if kept else math.nan
    result = OccupancyResult(gauge, mode, aggregation, samples, kept, dropped, stat, n_long,
                             outside_span=outside)
    if accept_gauge:
        accepts = [aggregate(s.accept, aggregation)[0] for s in samples]
        accepts = [a for a in accepts if not math.isnan(a)]
        result.accept_length = statistics.median(accepts) if accepts else math.nan
    print(result.table())
    if error:
        raise KitFailure(f"the long request failed while sampling {gauge}: {error}")
    if len(kept) < min_samples:
        raise KitFailure(f"only {len(kept)} valid samples of {gauge} in {rnd} round(s) "
                         f"({dropped} NaN dropped, {outside} outside the busy span, "
                         f"{len(samples)} scraped); need >= {min_samples}")
    if stat < threshold:
        worst = _worst_label_set(kept, mode)
        where = f"; lowest label set {label_str(worst[0])} at {worst[1]:.3f}" if worst else ""
        raise KitFailure(f"occupancy {stat:.3f} < threshold {threshold:g} ({mode} of {gauge}, "
                         f"{aggregation} over label sets, {len(kept)} samples{where})")
    if accept_gauge and not result.accept_length >= accept_length_min:
        raise KitFailure(f"speculative accept length {result.accept_length:.3f} < "
                         f"{accept_length_min:g} ({accept_gauge}, median of {len(samples)} scrapes)")
    return result


def _busy_span(valid: list[Sample], aggregation: str, min_samples: int) -> list[Sample]:
    """Busy mode: one round's samples from its first busy reading to its last.

    A round that never reads busy keeps every sample (and so scores 0) when it
    has at least ``min_samples`` of them, else none (inconclusive; see above).
    """
    busy = [i for i, v in enumerate(valid) if aggregate(v.values, aggregation)[0] >= 1]
    if busy:
        return valid[busy[0]:busy[-1] + 1]
    return valid if len(valid) >= min_samples else []


def _worst_label_set(samples: list[Sample], mode: str) -> tuple[LabelSet, float] | None:
    """The label set with the lowest statistic of its own, to name in a failure."""
    per: dict[LabelSet, list[float]] = {}
    for s in samples:
        for key, value in s.values.items():
            if not math.isnan(value):
                per.setdefault(key, []).append(value)
    if len(per) < 2:
        return None  # one label set: the aggregate already is its figure
    return min(((k, statistic(v, mode)) for k, v in per.items()), key=lambda kv: kv[1])


def _sample_round(server: ServerLike, c, rnd: int, gauge: str, accept_gauge: str | None,
                  n_long: int, interval_s: float,
                  n_requests: int) -> tuple[list[Sample], str | None]:
    """One round: the long request(s) in threads, scraping on an Event.wait interval
    until all end. Returns the samples and the first request error, if any."""
    done = threading.Event()
    lock = threading.Lock()
    outcome: dict = {"remaining": n_requests}
    extra = exact_count_params(server.backend)

    def long_request() -> None:
        try:
            with client_for(server, timeout_s=LONG_REQUEST_TIMEOUT_S) as lc:
                # Streamed: vLLM's API server then yields to its event loop per
                # token, so /metrics scrapes are answered while it decodes (a
                # non-streamed request starved them for its whole length on 2 cores).
                result = lc.stream_completion(LONG_PROMPT, max_tokens=n_long, temperature=0, **extra)
                if not result.done:
                    raise KitFailure("the long request's stream ended without [DONE]")
        except Exception as exc:  # reported by the main thread, with the samples
            with lock:
                outcome.setdefault("error", str(exc).splitlines()[0] if str(exc) else repr(exc))
        finally:
            with lock:
                outcome["remaining"] -= 1
                if outcome["remaining"] == 0:
                    done.set()

    workers = [threading.Thread(target=long_request, name=f"kiln-occupancy-long-{i}", daemon=True)
               for i in range(n_requests)]
    start = time.monotonic()
    for w in workers:
        w.start()
    samples: list[Sample] = []
    try:
        while not done.is_set():
            if time.monotonic() - start > SAMPLING_DEADLINE_S:
                raise KitFailure(f"long request still running after {SAMPLING_DEADLINE_S:.0f} s")
            snap = scrape(server, c)
            # A gauge that vanishes mid-run is as bad as one never exposed.
            require(server, snap, [gauge], "occupancy")
            # As fractions of "busy all the time" (a percentage gauge divided by 100).
            full = server.backend.gauges.occupancy_full if gauge == server.backend.gauges.occupancy else 1.0
            samples.append(Sample(rnd, time.monotonic() - start, {k: v / full for k, v in snap[gauge].items()},
                                  dict(snap.get(accept_gauge, {})) if accept_gauge else {}))
            done.wait(interval_s)
    finally:
        # Bounded by each request's own read timeout (LONG_REQUEST_TIMEOUT_S).
        for w in workers:
            w.join()
    return samples, outcome.get("error")
