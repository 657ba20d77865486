"""The crash watch on SGLang's own log lines, copied from real SGLang 0.5.17 runs on an H100.

Healthy lines (launch, serving, shutdown: docs/gpu-verification.md, issue 21's
second lease) carry no crash signature; the first lease's real launch crash
(an import-time ValueError under a too-new transformers) fires at its traceback.
"""
from __future__ import annotations

import pytest

from ci.engine.crashwatch import crash_signature

HEALTHY = (
    "/tmp/kiln-deps/torchao/quantization/quant_api.py:1731: SyntaxWarning: invalid escape sequence '\\.'",
    "[2026-12-05 15:18:10] CUDA IPC pool-handle caching is enabled. It reuses mappings to the existing bounded "
    "pool without reserving another pool; set SGLANG_USE_IPC_POOL_HANDLE_CACHE=0 to disable it.",
    "[2026-12-05 16:28:34] Init torch distributed ends. elapsed=0.09 s, mem usage=0.09 GB",
    "Capturing num tokens (num_tokens=8192 avail_mem=6.09 GB):   0%|          | 0/58 [00:00<?, ?it/s]",
    "Capturing batches (bs=1 avail_mem=5.90 GB): 100%|██████████| 36/36 [00:00<00:00, 80.64it/s]",
    "[2026-12-05 15:29:59] max_total_num_tokens=136613112, chunked_prefill_size=8192, max_prefill_tokens=16384, "
    "max_running_requests=4096, context_len=2048, available_gpu_mem=5.90 GB",
    "[2026-12-05 15:30:00] Engine startup timings (s): load_weight=0.10, kv_cache_allocation=0.03, "
    "scheduler_e2e=8.23, cuda_graph={prefill=2.43, decode=1.34, target_verify=0.00}, tokenizer_e2e=35.55",
    "[2026-12-05 15:30:01] The server is fired up and ready to roll!",
    "[2026-12-05 15:22:13] Decode batch, #running-req: 1, #token: 17, token usage: 0.00, cuda graph: True, "
    "gen throughput (token/s): 1.33, #queue-req: 0, fwd occupancy: nan%",
    "[2026-12-05 15:22:13] INFO:     127.0.0.1:35536 - \"POST /v1/completions HTTP/1.1\" 400 Bad Request",
    "[2026-12-05 15:22:14] SIGTERM received. signum=None frame=None. Draining requests and shutting down...",
    "[2026-12-05 15:22:19] Gracefully exiting... Remaining number of requests 0. Remaining requests remaining_rids=[].",
    "[rank0]:[W1205 15:22:20.576415652 ProcessGroupNCCL.cpp:1575] Warning: WARNING: destroy_process_group() was "
    "not called before program exit, which can leak resources.",
    "[2026-12-05 15:22:21] kill_process_tree called: parent_pid=1403, include_parent=True, pid=1403",
)
CRASH = (
    "Traceback (most recent call last):",
    '  File "/tmp/kiln-engine/sglang/srt/configs/qwen3_asr.py", line 167, in <module>',
    "ValueError: 'qwen3_asr' is already used by a Transformers config, pick another name.",
)


@pytest.mark.parametrize("line", HEALTHY)
def test_a_healthy_sglang_line_is_no_crash(line):
    assert crash_signature(line) is None


def test_sglangs_launch_crash_fires_at_its_traceback():
    assert [crash_signature(line) for line in CRASH] == ["Traceback", None, None]
