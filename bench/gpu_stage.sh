#!/usr/bin/env bash
# Stage vLLM's GPU build for a GPU machine that reaches no index and takes at
# most 64 MiB per transfer (the device machine: /work/.library/device/README.md).
#
#   bench/gpu_stage.sh OUT_DIR [WORK_DIR]      # on a connected host, repo root
#
# OUT_DIR gets part-00, part-01, ... (each <= $KILN_STAGE_CHUNK) of one tar:
#   wheels/          a kiln wheelhouse (ci/install/wheelhouse.py): vLLM's dependencies that
#                    the image lacks (bench/h200-image-packages.txt), nox, invoke,
#                    the harness, and zstandard (the image has no zstd)
#   engine.tar.zst   the vLLM wheel unpacked, minus its FA2 library (below)
# On the GPU machine, bench/gpu_unstage.sh reassembles and installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/gpu_stage.sh OUT_DIR [WORK_DIR]}
work=${2:-$(mktemp -d /tmp/kiln-stage.XXXXXX)}
engine=${KILN_STAGE_ENGINE:-vllm==0.26.0}  # its torch== pin must be the image's torch (README)
chunk=${KILN_STAGE_CHUNK:-56M}             # + the repo tree stays under 64 MiB a call
mkdir -p "$out" "$work"

# Left out (--exclude): kernels packages vLLM lists that the tiny-model path on
# Hopper never imports (with FlashInfer's sampler off, VLLM_USE_FLASHINFER_SAMPLER=0):
# together hundreds of MB, more than the transfer budget; and fastapi's CLI extras.
python3 -m ci.install.wheelhouse "$engine" nox==2026.10.20 invoke==3.0.3 zstandard==0.25.0 \
  -r requirements/e2e-gpu.txt --python 3.12 --dest "$work/wheels" \
  --present bench/h200-image-packages.txt -c bench/gpu_stage_constraints.txt \
  --exclude tilelang --exclude nvidia-cutlass-dsl --exclude quack-kernels \
  --exclude tokenspeed-mla --exclude humming-kernels --exclude pynvvideocodec \
  --exclude torchcodec --exclude fastsafetensors --exclude nvidia-cudnn-frontend \
  --exclude cuda-tile --exclude fastapi-cli --exclude fastapi-cloud-cli

# The engine wheel travels unpacked and zstd-compressed instead: 304 MB as a
# wheel, 127 MB this way. Its FA2 library (305 MB unpacked) is dropped: on
# Hopper vLLM serves with FA3 (_vllm_fa3_C) and never loads FA2 (README).
wheel=$(ls "$work"/wheels/vllm-*.whl)
rm -rf "$work/engine" && mkdir -p "$work/engine"
python3 -m zipfile -e "$wheel" "$work/engine"
rm -f "$work/engine/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so"
rm "$wheel" && sed -i '/^vllm==/d' "$work/wheels/requirements.txt"
# --long=27: a 128 MiB window finds the repeats between the big .so files.
tar -C "$work/engine" -cf - . | zstd -q -19 --long=27 -T2 -o "$work/engine.tar.zst" -f
rm -f "$out"/part-*
tar -C "$work" -cf - wheels engine.tar.zst | split -b "$chunk" -d - "$out/part-"
ls -l "$out"
echo "staged $engine: $(ls "$out" | wc -l) parts in $out (work dir $work)"
