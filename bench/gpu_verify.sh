#!/usr/bin/env bash
# The device-side steps behind docs/gpu-verification.md, one per call:
#
#   bench/gpu_verify.sh recv PART              keep one staged part (bench/gpu_stage.sh)
#   bench/gpu_verify.sh unstage                reassemble + install (bench/gpu_unstage.sh)
#   bench/gpu_verify.sh e2e PROFILE [ARGS..]   nox -s e2e-PROFILE -- --kiln-model tiny-llama ARGS
#   bench/gpu_verify.sh h200-1                 the same as: e2e h200-1
#   bench/gpu_verify.sh warmup [PROFILE]       invoke warmup --cold, then a warm start (h200-1)
#   bench/gpu_verify.sh throttle PROFILE S     the occupancy kits against an engine idling S s a step
#   bench/gpu_verify.sh h200-2                 nox -s e2e-h200-2 (tp=2 + two servers at once)
#   bench/gpu_verify.sh contain [PROFILE TP]   harness SIGKILLed under a live server (h200-2, tp=2)
#   bench/gpu_verify.sh recv-model PART        keep one part of `bench/gpu_stage.sh smollm2`
#   bench/gpu_verify.sh unstage-model          the real model's wheels in place (bench/gpu_unstage_model.sh)
#   bench/gpu_verify.sh correct PROFILE [ARGS..]  the real model's correctness tests (issue 22):
#                                              reference (float32 + bfloat16), HellaSwag, structured
#                                              output, step occupancy, with --kiln-model smollm2-135m
#   bench/gpu_verify.sh skew PROFILE [DTYPE]   the reference kit against a skewed weight file: must be red
#   bench/gpu_verify.sh calibrate PROFILE [RUNS]  invoke calibrate --model smollm2-135m (proposes; no --write)
#
# Run from the kiln checkout on the GPU machine; logs go to $OUT (or /tmp/kiln-out).
# Every step prints the GPUs' memory and the engine processes before and after:
# counted by name/command line (vLLM: VLLM::EngineCore, VLLM::Worker*, the API server;
# SGLang: sglang::scheduler*, sglang::detokenizer, the launcher), zombies excluded,
# so nothing relies on kiln's own bookkeeping.
set -uo pipefail
step=${1:?usage: bench/gpu_verify.sh STEP [ARG]}
out=${OUT:-/tmp/kiln-out}
mkdir -p "$out" /tmp/kiln-parts /tmp/kiln-model-parts
[ -f /tmp/kiln-env.sh ] && source /tmp/kiln-env.sh
# The device machine's NVLink-multicast guards (KINDS.md), kept for every child.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

engine_procs() {
  # pid stat name args of every live engine process; Z (zombie) rows dropped.
  ps -eo pid=,stat=,comm=,args= | awk '$2 !~ /^Z/' \
    | grep -E 'VLLM::|vllm\.entrypoints|api_server|sglang::|sglang\.launch_server' \
    | grep -v -E 'grep|gpu_verify' || true
}
state() {
  echo "== $1 $(date -u +%T)"
  nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv,noheader
  echo "engine processes: $(engine_procs | wc -l)"
  engine_procs
}
ready_lines() { grep -h -o -E "[^ ]+ is ready|ready \([0-9.]+ s after launch\)|init engine .* took [0-9.]+ s(econds)?" "$@" 2>/dev/null; }

case "$step" in
  recv)
    cp "${2:?part}" /tmp/kiln-parts/ && ls -l /tmp/kiln-parts ;;
  unstage)
    nvidia-smi -L; python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.device_count())'
    time bench/gpu_unstage.sh /tmp/kiln-parts && source /tmp/kiln-env.sh
    python3 -c 'import importlib.util as u, importlib.metadata as m
if u.find_spec("vllm"):
    import vllm; print("vllm", vllm.__version__, vllm.__file__)
    print("fa3", bool(u.find_spec("vllm.vllm_flash_attn._vllm_fa3_C")), "fa2", bool(u.find_spec("vllm.vllm_flash_attn._vllm_fa2_C")))
if u.find_spec("sglang"):
    import sglang, sgl_kernel, transformers
    print("sglang", sglang.__version__, sglang.__file__, "| sglang-kernel", m.version("sglang-kernel"),
          "| transformers", transformers.__version__, "| fa3 (flash_ops)", bool(u.find_spec("sgl_kernel.flash_ops")))'
    cat /tmp/kiln-env.sh
    python3 -m nox --version; python3 -m invoke --version
    state baseline ;;
  h200-1|e2e)
    profile=h200-1; [ "$step" = e2e ] && { profile=${2:?profile}; shift; }; shift
    state before
    CUDA_VISIBLE_DEVICES=0 python3 -m nox -s "e2e-$profile" -- --kiln-model tiny-llama "$@" 2>&1 \
      | tee "$out/$profile.log"
    echo "nox exit ${PIPESTATUS[0]}"
    cp "reports/servers-e2e-$profile.json" "reports/junit-e2e-$profile.xml" \
      "reports/kit-summary-e2e-$profile.md" "$out/" 2>/dev/null
    grep -h -i -E "flash ?attention|FLASH_ATTN|attention backend" "reports/logs/e2e-$profile"/*.log | sort | uniq -c | head
    state after ;;
  warmup)
    profile=${2:-h200-1}
    state before
    export KILN_MODEL=tiny-llama CUDA_VISIBLE_DEVICES=0
    python3 -m invoke warmup --cold --profile "$profile" 2>&1 | tee "$out/warmup-cold.log"
    echo "warmup exit ${PIPESTATUS[0]}"
    python3 -m invoke warmup --profile "$profile" 2>&1 | tail -3   # marked: launches nothing
    python3 -m nox -s "e2e-$profile" -- --kiln-model tiny-llama tests/e2e/test_api.py 2>&1 | tee "$out/warm-start.log"
    echo "nox exit ${PIPESTATUS[0]}"
    echo "cold:"; ready_lines "$out/warmup-cold.log" reports/logs/warmup/*.log
    echo "warm:"; ready_lines "$out/warm-start.log"
    python3 -c 'import json, sys; [print("record", s["key"], "ready", round(s["ready"]-s["launched"],1), "s") for s in json.load(open(sys.argv[1]))]' "reports/servers-e2e-$profile.json"
    state after ;;
  throttle)
    profile=${2:?profile} idle=${3:?idle seconds}
    state before
    # tests/fakes/engine_throttle: every engine process sleeps $idle s after each step.
    CUDA_VISIBLE_DEVICES=0 PYTHONPATH="$PWD/tests/fakes/engine_throttle:${PYTHONPATH:-}" KILN_THROTTLE_IDLE_S=$idle \
      python3 -m nox -s "e2e-$profile" -- --kiln-model tiny-llama tests/e2e/test_occupancy.py -s 2>&1 \
      | tee "$out/throttle-$profile.log"
    echo "nox exit ${PIPESTATUS[0]} (the occupancy kits must fail here)"
    state after ;;
  h200-2)
    state before
    python3 -m nox -s e2e-h200-2 -- --kiln-model tiny-llama tests/e2e/test_multi_gpu.py -s 2>&1 | tee "$out/h200-2.log"
    echo "nox exit ${PIPESTATUS[0]}"
    cp reports/servers-e2e-h200-2.json "$out/" 2>/dev/null
    state after ;;
  contain)
    state before
    python3 bench/gpu_contain.py --profile "${2:-h200-2}" --tp "${3:-2}" 2>&1 | tee "$out/contain.log"
    state after ;;
  recv-model)
    cp "${2:?part}" /tmp/kiln-model-parts/ && ls -l /tmp/kiln-model-parts ;;
  unstage-model)
    # After `unstage`: it rewrites /tmp/kiln-env.sh, this appends to it.
    time bench/gpu_unstage_model.sh /tmp/kiln-model-parts && source /tmp/kiln-env.sh
    python3 -c 'import gguf, transformers, torch; print("gguf", gguf.__file__, "| transformers", transformers.__version__, "| torch", torch.__version__, "cuda", torch.cuda.is_available())'
    state baseline ;;
  correct)
    profile=${2:?profile}; shift 2
    state before
    # CI=true: a real-model test that finds the model unstaged fails instead of skipping.
    CI=true CUDA_VISIBLE_DEVICES=0 python3 -m nox -s "e2e-$profile" -- --kiln-model smollm2-135m \
      tests/e2e/test_reference.py tests/e2e/test_accuracy.py::test_real_model_hellaswag_accuracy_is_above_the_floor \
      tests/e2e/test_api_semantics.py::test_json_schema_structured_output \
      tests/e2e/test_occupancy.py::test_engine_does_not_idle_between_steps -rs "$@" 2>&1 | tee "$out/correct-$profile.log"
    echo "nox exit ${PIPESTATUS[0]}"
    cp "reports/junit-e2e-$profile.xml" "reports/kit-summary-e2e-$profile.md" "reports/servers-e2e-$profile.json" "$out/" 2>/dev/null
    grep -h -E "greedy tokens equal|acc_norm|uncalibrated|step occupancy" "$out/correct-$profile.log" | sort | uniq | head -20
    state after ;;
  skew)
    profile=${2:?profile} dtype=${3:-float32}
    state before
    CUDA_VISIBLE_DEVICES=0 python3 bench/skewed_reference.py --profile "$profile" --dtype "$dtype" 2>&1 \
      | tee "$out/skew-$profile-$dtype.log"
    echo "exit ${PIPESTATUS[0]} (1 = the reference kit failed the skewed weights, as it must)"
    state after ;;
  calibrate)
    profile=${2:?profile} runs=${3:-3}
    state before
    # Proposes bounds (a diff on stdout); --write is a reviewed second step.
    CUDA_VISIBLE_DEVICES=0 python3 -m invoke calibrate --profile "$profile" --model smollm2-135m \
      --runs "$runs" 2>&1 | tee "$out/calibrate-$profile.log"
    echo "calibrate exit ${PIPESTATUS[0]}"
    state after ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
