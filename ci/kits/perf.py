"""Performance-budget kit: output tok/s, TTFT and latency p50/p95 under concurrency.

Measures with streaming requests (TTFT = first chunk carrying text), always
prints and reports the figures, and asserts the profile's bounds only where
the profile enforces them (``Profile.enforce_perf``): a 2-core shared CPU
runner measures noise, a dedicated GPU runner measures the engine. A failed
request is always a failure -- figures from a partial run mean nothing.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ci.kits.api import check_usage
from ci.kits.client import EngineClient, KitFailure, ServerLike, client_for
from ci.kits.decode import exact_count_params
from ci.kits.enforce import Check
from ci.kits.stress import run_concurrent
from ci.kits.thresholds import Bound, PerfBudget
from ci.text.summary import append_section

log = logging.getLogger(__name__)

WARMUP_MAX_TOKENS = 8
# Figure -> the PerfBudget field that bounds it, in the order they are shown
# and checked. Throughput has a floor; every time a ceiling.
BOUND_OF = {"output_tok_s": "min_output_tok_s", "ttft_p50_s": "max_ttft_p50_s",
            "ttft_p95_s": "max_ttft_p95_s", "latency_p50_s": "max_latency_p50_s",
            "latency_p95_s": "max_latency_p95_s"}


def bounds(budget: PerfBudget) -> dict[str, Bound]:
    """``budget``'s bound for each figure, by figure name."""
    return {name: getattr(budget, field) for name, field in BOUND_OF.items()}


@dataclass
class PerfResult:
    """What one run measured, and which bounds it broke."""

    requests: int
    concurrency: int
    max_tokens: int
    output_tokens: int
    wall_s: float
    ttft_s: list[float]
    latency_s: list[float]
    enforced: bool
    violations: list[str] = field(default_factory=list)

    @property
    def output_tok_s(self) -> float:
        """Output tokens per second over the whole run (all requests together)."""
        return self.output_tokens / self.wall_s if self.wall_s > 0 else math.nan

    def figures(self) -> dict[str, float]:
        """The measured figures by name, in the order bounds are checked."""
        return {
            "output_tok_s": self.output_tok_s,
            "ttft_p50_s": percentile(self.ttft_s, 50), "ttft_p95_s": percentile(self.ttft_s, 95),
            "latency_p50_s": percentile(self.latency_s, 50),
            "latency_p95_s": percentile(self.latency_s, 95),
        }

    def table(self, budget: PerfBudget | None = None) -> str:
        """Plain-text table for the test output; with ``budget``, each figure beside its bound
        and the bound's basis (where it was measured, or that it is an estimate)."""
        lines = [f"perf: {self.requests} streaming requests, concurrency {self.concurrency}, "
                 f"{self.max_tokens} tokens each, {self.wall_s:.2f} s wall "
                 f"({'enforced' if self.enforced else 'report only'})"]
        limits = bounds(budget) if budget is not None else {}
        for name, value in self.figures().items():
            row = f"  {name:<14} {value:10.3f}"
            if name in limits:
                sign = ">=" if BOUND_OF[name].startswith("min_") else "<="
                row += f"  bound {sign} {limits[name].value:<8g} ({limits[name].reason or 'reference'})"
            lines.append(row)
        lines += [f"  VIOLATION {v}" for v in self.violations]
        return "\n".join(lines)

    def markdown(self, title: str) -> str:
        """A GitHub job-summary section."""
        rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in self.figures().items())
        status = ("within budget" if not self.violations else "; ".join(self.violations))
        mode = "enforced" if self.enforced else "report only"
        return (f"### {title}\n\n{self.requests} requests x {self.max_tokens} tokens, "
                f"concurrency {self.concurrency} ({mode}): {status}\n\n"
                f"| figure | value |\n|---|---|\n{rows}\n")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile by linear interpolation between closest ranks (NaN when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def checks(result: PerfResult, budget: PerfBudget) -> list[Check]:
    """Every bound of ``budget`` checked against ``result``, in figure order (a NaN figure breaks it)."""
    f = result.figures()
    out = []
    for name, bound in bounds(budget).items():
        if name == "output_tok_s":
            ok = f[name] >= bound.value
            detail = f"output {f[name]:.1f} tok/s < {bound.value:g}"
        else:
            ok = f[name] <= bound.value
            detail = f"{name} {f[name]:.3f} > {bound.value:g}"
        out.append(Check(f"perf.{BOUND_OF[name]}", bound, ok, "" if ok else detail))
    return out


def violations(result: PerfResult, budget: PerfBudget) -> list[str]:
    """Every bound of ``budget`` that ``result`` breaks, one line each."""
    return [c.detail for c in checks(result, budget) if not c.ok]


# How a caller judges the checks (the e2e conftest's ``enforce_bounds``: a broken measured
# bound fails, an estimate reports "uncalibrated", ci/kits/enforce.py).
Rule = Callable[..., object]


def measure(server: ServerLike, *, requests: int, concurrency: int, max_tokens: int,
            enforced: bool = False) -> PerfResult:
    """Run ``requests`` streaming completions, ``concurrency`` at a time; collect figures."""
    extra = exact_count_params(server.backend)
    with client_for(server) as c:
        # The first request pays one-off costs (compilation, allocator growth).
        c.completion("warm up", max_tokens=WARMUP_MAX_TOKENS, temperature=0)
    ttft: dict[int, float] = {}
    latency: dict[int, float] = {}

    def one(c: EngineClient, i: int) -> int:
        res = c.stream_completion(f"Perf request {i}: tell a long story about ships",
                                  max_tokens=max_tokens, temperature=0,
                                  stream_options={"include_usage": True}, **extra)
        if not res.done:
            raise KitFailure(f"stream {i} ended without [DONE]")
        if res.ttft_s is None:
            raise KitFailure(f"stream {i} carried no text")
        ttft[i], latency[i] = res.ttft_s, res.latency_s
        return check_usage(res.usage(), where=f"stream {i}",
                           max_tokens=max_tokens)["completion_tokens"]

    start = time.monotonic()
    outcomes = run_concurrent(server, one, requests=requests, concurrency=concurrency)
    wall = time.monotonic() - start
    failed = [o for o in outcomes if o.error]
    if failed:
        raise KitFailure(f"perf run: {len(failed)}/{requests} requests failed; first: "
                         f"{failed[0].error}")
    return PerfResult(requests, concurrency, max_tokens,
                      sum(o.completion_tokens for o in outcomes), wall,
                      [ttft[i] for i in sorted(ttft)], [latency[i] for i in sorted(latency)],
                      enforced)


def check_perf(server: ServerLike, budget: PerfBudget, *, enforce: bool,
               summary_path: str | Path | None = None, title: str = "perf",
               rule: Rule | None = None) -> PerfResult:
    """Measure under ``budget``'s load; report always; judge the bounds.

    ``rule`` (the e2e tests' ``enforce_bounds``) judges the checks: a broken
    measured bound fails, an estimate is reported "uncalibrated" and never fails,
    and ``enforce=False`` makes even measured bounds report-only. Without a rule
    (a plain caller) every bound counts: KitFailure when enforced and one is broken.
    ``enforce=False`` is report-only (a shared CPU runner measures noise): the
    figures and broken bounds are printed, summarised and logged as a warning.
    ``summary_path`` (the session's kit summary under reports/) gets a markdown
    section appended. A failed request is a KitFailure always: figures from a
    partial run mean nothing.
    """
    result = measure(server, requests=budget.requests, concurrency=budget.concurrency,
                     max_tokens=budget.max_tokens, enforced=enforce)
    judged = checks(result, budget)
    result.violations = [c.detail for c in judged if not c.ok]
    print(result.table(budget))
    if summary_path:
        append_section(summary_path, result.markdown(title))
    if rule is not None:
        rule(judged, enforced=enforce)
        return result
    if result.violations:
        if enforce:
            raise KitFailure(f"performance budget broken: {result.violations[0]}"
                             + "".join(f"\n  {v}" for v in result.violations[1:]))
        log.warning("performance outside budget (report only): %s", "; ".join(result.violations))
    return result
