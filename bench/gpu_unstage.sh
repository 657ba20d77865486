#!/usr/bin/env bash
# On the GPU machine: reassemble what bench/gpu_stage.sh made (vLLM or SGLang) and
# install it beside the image's Python, adding packages only (nothing of the image's
# is replaced: the wheels are the names it lacks, installed to their own folders).
# Each run starts from empty folders, so one engine's staging never mixes with the other's.
#
#   bench/gpu_unstage.sh PARTS_DIR        # then: source /tmp/kiln-env.sh
set -euo pipefail
parts=${1:?usage: bench/gpu_unstage.sh PARTS_DIR}
root=${KILN_UNSTAGE_ROOT:-/tmp}
py=${KILN_ENGINE_PYTHON:-python3}
rm -rf "$root/kiln-stage" "$root/kiln-deps" "$root/kiln-engine"
mkdir -p "$root/kiln-stage" "$root/kiln-engine"
cat "$parts"/part-* | tar -C "$root/kiln-stage" -xf -
# Exactly the walk's pins (wheels/requirements.txt), found in the folder.
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --target "$root/kiln-deps" --find-links "$root/kiln-stage/wheels" -r "$root/kiln-stage/wheels/requirements.txt"
# The image has no zstd binary: decompress with the zstandard wheel just installed.
PYTHONPATH="$root/kiln-deps" "$py" -c '
import sys, zstandard
zstandard.ZstdDecompressor(max_window_size=2**27).copy_stream(sys.stdin.buffer, sys.stdout.buffer)
' < "$root/kiln-stage/engine.tar.zst" | tar -C "$root/kiln-engine" -xf -
cat > "$root/kiln-env.sh" <<ENV
export PYTHONPATH=$root/kiln-engine:$root/kiln-deps\${PYTHONPATH:+:\$PYTHONPATH}
export PATH=$root/kiln-deps/bin:\$PATH
ENV
# What this engine's staged build needs set (bench/gpu_stage.sh wrote it).
cat "$root/kiln-stage/stage-env.sh" >> "$root/kiln-env.sh"
echo "installed: $(ls "$root/kiln-deps" | grep -c dist-info) wheels;" \
  "unpacked: $(cd "$root/kiln-engine" && ls -d ./*.dist-info | tr '\n' ' ')"
