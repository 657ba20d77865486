"""Step-occupancy kit: does the engine idle *between* its steps while a request decodes?

The gauge kit (ci/kits/occupancy.py) cannot see this on vLLM: its running
gauge reads 1 whenever a request is in flight, so an engine core that sleeps
after every step still scores 1.000 (docs/real-model-checks.md). What does
move is the share of wall time the engine spends inside its steps. An engine
that reports each step's duration (``BackendSpec.step_timer``; vLLM with
``--enable-logging-iteration-details`` logs one line per iteration) lets the
kit measure it directly:

    busy = sum of the decode steps' model time / wall time from first to last token

of one long streamed greedy request, read from the server's own log. A
healthy engine spends most of the decode span in its steps; one that idles
between steps (a scheduler sleeping, polling with a timeout, waiting on a
lock) shows the idle time as the difference. Slow steps do not lower the
figure; idle gaps do, which is the distinction the running gauge cannot make.

The kit needs the server's log (``server.log_path``) and no other traffic on
the server while it runs (the e2e pool lends a server to one test at a time).
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ci.kits.client import KitFailure, ServerLike, client_for
# The gauge kit's long prompt and warm-up request: the two kits load the engine alike.
from ci.kits.occupancy import LONG_PROMPT, WARMUP_MAX_TOKENS

log = logging.getLogger(__name__)

# Long enough that the first and last token's delivery jitter (a few ms on
# a loaded runner) is small against the span: ~0.5 s of decode on the tiny
# model on 2 cores, and hundreds of steps to average over.
LONG_MAX_TOKENS = 256
# Fewer decode steps than this in the log is no measurement: the timer is off
# or the log lost lines.
MIN_STEPS = 32
# The engine's log lines trail its outputs by the frontend's logging; they are
# normally there before the HTTP response ends. Waited for on a deadline.
LOG_DEADLINE_S = 10.0
LOG_POLL_S = 0.05
# Only this many bytes of log written during the request are parsed; a
# 256-token request writes ~60 KiB of iteration lines.
MAX_LOG_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Step:
    """One engine step from the log: its number, tokens it decoded, and its model time."""

    index: int
    gen_tokens: int
    elapsed_s: float


@dataclass
class StepOccupancy:
    """What the kit measured, for printing and for callers that report it."""

    steps: list[Step]  # decode steps of the long request, in order
    span_s: float  # first token to last token, at the client
    tokens: int
    busy: float  # sum of the steps' time / span_s

    def line(self) -> str:
        """One line: the figure and what it is made of."""
        total = sum(s.elapsed_s for s in self.steps)
        gap_ms = (self.span_s - total) / len(self.steps) * 1000 if self.steps else float("nan")
        mean_ms = total / len(self.steps) * 1000 if self.steps else float("nan")
        return (f"step occupancy {self.busy:.3f}: {len(self.steps)} decode steps, "
                f"{total:.3f} s in steps over a {self.span_s:.3f} s decode span "
                f"({self.tokens} tokens; mean step {mean_ms:.2f} ms, mean time between steps "
                f"{gap_ms:.2f} ms)")


def parse_steps(text: str, pattern: str) -> list[Step]:
    """Every step line in ``text`` that matches the backend's ``pattern``, in order."""
    rx = re.compile(pattern)
    return [Step(int(m["index"]), int(m["gen_tokens"]), float(m["elapsed_ms"]) / 1000)
            for m in rx.finditer(text)]


def _read_from(path: Path, offset: int) -> str:
    with path.open("rb") as fh:
        fh.seek(offset)
        return fh.read(MAX_LOG_BYTES).decode("utf-8", "replace")


def request_steps(steps: list[Step]) -> list[Step]:
    """The decode steps of the one request whose prefill is the first prefill in ``steps``.

    Lines of an earlier request can still trail into the log after its
    response (the frontend logs a step after handing its tokens out); they
    come before this request's prefill step and are dropped.
    """
    first_prefill = next((i for i, s in enumerate(steps) if s.gen_tokens == 0), None)
    if first_prefill is None:
        return []
    return [s for s in steps[first_prefill + 1:] if s.gen_tokens > 0]


def _wait_for_steps(path: Path, offset: int, pattern: str, want: int,
                    deadline_s: float) -> list[Step]:
    """The request's decode steps logged since ``offset``, waiting (bounded) until ``want`` are there."""
    deadline = time.monotonic() + deadline_s
    while True:
        steps = request_steps(parse_steps(_read_from(path, offset), pattern))
        if len(steps) >= want or time.monotonic() >= deadline:
            return steps
        time.sleep(LOG_POLL_S)  # polling the log file for a condition, on a deadline


def check_step_occupancy(server: ServerLike, *, threshold: float,
                         long_max_tokens: int = LONG_MAX_TOKENS, min_steps: int = MIN_STEPS,
                         log_deadline_s: float = LOG_DEADLINE_S) -> StepOccupancy:
    """Stream one long greedy request; assert the engine's steps fill >= ``threshold`` of it."""
    timer = getattr(server.backend, "step_timer", None)
    if timer is None:
        raise KitFailure(f"{server.backend.name} reports no per-step timing "
                         f"(BackendSpec.step_timer); the step-occupancy kit cannot run on it")
    log_path = getattr(server, "log_path", None)
    if log_path is None or not Path(log_path).is_file():
        raise KitFailure(f"step occupancy needs the server's log file; got {log_path!r}")
    log_path = Path(log_path)
    with client_for(server) as c:
        c.completion("Hello", max_tokens=WARMUP_MAX_TOKENS, temperature=0)
        offset = log_path.stat().st_size
        result = c.stream_completion(LONG_PROMPT, max_tokens=long_max_tokens, temperature=0,
                                     ignore_eos=True)
    tokens = sum(1 for chunk in result.chunks for ch in chunk.get("choices") or []
                 if ch.get("text"))
    if result.ttft_s is None or tokens < 2:
        raise KitFailure(f"the long request streamed {tokens} token chunk(s); nothing to measure")
    span = result.latency_s - result.ttft_s
    # Every decode step logged for this request is counted; its prefill
    # (no generation tokens, before the first token) is not.
    steps = _wait_for_steps(log_path, offset, timer.pattern, tokens - 1, log_deadline_s)
    if len(steps) < min(min_steps, tokens - 1):
        raise KitFailure(
            f"only {len(steps)} decode step line(s) in {log_path} for a {tokens}-token request "
            f"(need >= {min(min_steps, tokens - 1)}): is the server running with {timer.flag}?")
    busy = sum(s.elapsed_s for s in steps) / span if span > 0 else float("nan")
    measured = StepOccupancy(steps, span, tokens, busy)
    print(measured.line())
    if not busy >= threshold:
        raise KitFailure(f"step occupancy {busy:.3f} < threshold {threshold:g}: the engine idled "
                         f"between steps ({measured.line()})")
    return measured
