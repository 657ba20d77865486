"""The engine's greedy decode against HF transformers on the same weights (ci/kits/reference.py)."""
from __future__ import annotations

import pytest

from ci.engine import realmodel
from ci.kits import reference
from ci.kits.hf_reference import HFReference


@pytest.fixture(scope="module")
def hf_reference():
    # One thread: the engine being compared holds the other core.
    return HFReference(realmodel.ensure_real_model(), threads=1)


@pytest.mark.model(realmodel.MODEL_NAME, args=list(realmodel.SERVE_ARGS))
def test_greedy_decode_matches_hf_transformers(server, hf_reference, record_property, kit_summary):
    result = reference.check_reference(
        server, hf_reference, logprob_tol=reference.FP32_LOGPROB_TOL,
        tie_margin=reference.FP32_TIE_MARGIN, summary_path=kit_summary)
    record_property("kiln_reference", result.line())
