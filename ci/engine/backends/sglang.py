"""SGLang, launched as ``python -m sglang.launch_server`` from the runner image."""
from __future__ import annotations

from typing import Sequence

from ci.engine.backends.spec import (COMMON_CACHES, DEEPGEMM_CACHES, FLASHINFER_CACHES, TVM_FFI_CACHES, BackendSpec,
                                     Gauges, python)


# SGLang (python/sglang/srt/environ.py): SGLANG_CACHE_DIR (default
# ~/.cache/sglang). Its deep_gemm_wrapper/compile_utils.py *overwrites*
# DG_JIT_CACHE_DIR with SGLANG_DG_CACHE_DIR (default ~/.cache/deep_gemm) at
# import, so DG_JIT_CACHE_DIR alone would be silently ignored; both point at
# the same directory here.
_SGLANG_CACHES = (("SGLANG_CACHE_DIR", "sglang"), ("SGLANG_DG_CACHE_DIR", "deep_gemm"))


def _argv(model: str, port: int, tp: int, args: Sequence[str]) -> list[str]:
    cmd = [python(), "-m", "sglang.launch_server",
           "--model-path", model, "--host", "127.0.0.1", "--port", str(port)]
    if tp > 1:
        cmd += ["--tp-size", str(tp)]
    return cmd + list(args)


SGLANG = BackendSpec(
    name="sglang",
    argv=_argv,
    metrics_prefix="sglang:",
    gauges=Gauges(
        running="sglang:num_running_reqs",
        waiting="sglang:num_queue_reqs",
        generation_tokens="sglang:generation_tokens_total",
        prompt_tokens="sglang:prompt_tokens_total",
        occupancy="sglang:fwd_occupancy",
        kv_usage="sglang:token_usage",
        spec_accept_length="sglang:spec_accept_length",
        requests="sglang:num_requests_total",  # "Number of requests processed" (metrics/collector.py)
        occupancy_full=100.0,  # a 0-100 percentage (sglang #25886's kit reads it so)
    ),
    # /health answers 200 as soon as the server is up; /health_generate runs a
    # one-token generation through the scheduler when it is idle (http_server.py),
    # so "ready" means the engine really generates.
    health_path="/health_generate",
    # SGLang serves /metrics only when launched with this flag (sglang #25886);
    # every kiln launch carries it (BackendSpec.command).
    metrics_flag="--enable-metrics",
    # fwd_occupancy (forward time / wall time, from CUDA events) is published only
    # with the device timer on (scheduler_components/metrics_reporter.py; seed
    # sglang #25886's kit names it as a prerequisite of the server).
    env=(("SGLANG_ENABLE_METRICS_DEVICE_TIMER", "1"),),
    distributions=("sglang",),
    # The launcher keeps its command line; scheduler and detokenizer rename
    # themselves sglang::<role> (setproctitle).
    process_names=("sglang.launch_server", "sglang::"),
    cache_vars=COMMON_CACHES + _SGLANG_CACHES + DEEPGEMM_CACHES + FLASHINFER_CACHES + TVM_FFI_CACHES,
    accepts_ignore_eos=True,
    reference="sglang",
    rejects_unknown_model=False,
    seed_flag="--enable-deterministic-inference",
)
