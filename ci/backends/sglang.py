"""SGLang, launched as ``python -m sglang.launch_server`` from the runner image."""
from __future__ import annotations

from typing import Sequence

from ci.backends.spec import BackendSpec, Gauges, python


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
    ),
    # SGLang serves /metrics only when launched with this flag (sglang #25886).
    metrics_flag="--enable-metrics",
    distributions=("sglang",),
    # The launcher keeps its command line; scheduler and detokenizer rename
    # themselves sglang::<role> (setproctitle).
    process_names=("sglang.launch_server", "sglang::"),
)
