"""The engine's greedy decode against HF transformers on the same weights and device (ci/kits/reference.py).

float32 on every lane of the real model: HF float32 against the engine in
float32, the kit's float32 rule. bfloat16 (the model's native dtype) on GPU
lanes: HF in bfloat16 on the server's GPU, vLLM's top-k swap rule. The logprob
tolerance is the profile's bound for that dtype (ci/kits/thresholds.py): a
measured one fails the test, an estimate reports "uncalibrated".
"""
from __future__ import annotations

import pytest

from ci.engine import realmodel
from ci.kits import reference, thresholds
from ci.kits.enforce import Check
from ci.kits.hf_reference import HFReferenceProcess

# One thread on the cpu lane: the engine being compared holds the other core.
CPU_REFERENCE_THREADS = 1


@pytest.mark.parametrize("dtype", [
    pytest.param(realmodel.FLOAT32, marks=pytest.mark.model(realmodel.MODEL_NAME,
                                                            args=list(realmodel.serve_args(realmodel.FLOAT32)))),
    # vLLM-CPU and HF on CPU both compute bf16 through float32 upcasts of their own: the
    # rule is meant for GPU kernels, and a second real-model server does not fit the cpu
    # lane's time budget. Skipped at collection (tests/e2e/conftest.py), before any launch.
    pytest.param(realmodel.BFLOAT16, marks=[
        pytest.mark.model(realmodel.MODEL_NAME, args=list(realmodel.serve_args(realmodel.BFLOAT16))),
        pytest.mark.kiln_gpu_only("gpu lanes only: the bfloat16 reference checks GPU kernels; "
                                  "the cpu lane compares float32")]),
])
def test_greedy_decode_matches_hf_transformers(dtype, server, kiln_profile, record_property, kit_summary,
                                               enforce_bounds):
    try:
        bound = thresholds.for_profile(kiln_profile.name).reference_bound(dtype)
    except thresholds.MissingThreshold as exc:
        pytest.fail(f"kiln: {exc}", pytrace=False)
    hf = HFReferenceProcess(realmodel.ensure_real_model(), vendor=kiln_profile.vendor,
                            devices=getattr(server, "devices", ()), dtype=dtype,
                            threads=CPU_REFERENCE_THREADS if kiln_profile.vendor == "cpu" else None)
    # Measured here, judged below: the token rules always fail a wrong engine; the
    # logprob tolerance only where it was measured on this runner kind.
    result = reference.check_reference(server, hf, logprob_tol=None, dtype=dtype, summary_path=kit_summary)
    record_property("kiln_reference", result.line())
    ok = result.max_diff <= bound.value
    worst = next((c.worst for c in result.comparisons if c.max_diff == result.max_diff), "")
    enforce_bounds([Check(f"reference.{dtype}", bound, ok,
                          "" if ok else f"reference logprob difference {result.max_diff:.3g} > "
                                        f"{bound.value:g} ({dtype}) at {worst}")],
                   model=realmodel.MODEL_NAME)
