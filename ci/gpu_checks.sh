#!/usr/bin/env bash
# The GPU checks of issue 12 in one run, for a machine with a CUDA GPU (about 9 minutes on an H100/H200):
#
#   1. the GPU tests: graphs equal eager on every device, flat memory, failed captures, pipelining,
#      TensorRT build/run (test/test_engine_gpu.py, test/test_tensorrt.py, test/test_graph_cache.py);
#   2. label agreement of each backend (torch, tensorrt) in fp16 with fp32 eager on the nine Cityscapes
#      frames (python -m icnet_ros.inference.gpu_check), with the shipped demo checkpoint;
#   3. icnet-benchmark, the headline: 1024x2048, keep 0.5, sub124, batch 1, labels / all outputs, naive vs
#      torch vs tensorrt: forward, latency, throughput and peak memory apart;
#   4. the whole node path (python -m icnet_ros.ros.overhead --device cuda) at 1024x2048;
#   5. the full table: keep 0.5 and 0.25, sub124 and sub4, batch 1 and 4, labels and all outputs.
#
# Run from anywhere: bash ci/gpu_checks.sh. It uses the package from this checkout (PYTHONPATH) and the
# machine's CUDA PyTorch, plus wheels under .whl/ when that folder was carried along (installed into
# /tmp/site; e.g. rosbags). TensorRT steps are skipped with a note when `tensorrt` does not import.
#
# Settings (environment):
#   OUT                  where results go (default /tmp/icnet_gpu_results): gpu_checks.log holds every
#                        step's output; gpu_check_<backend>.json, bench_headline.json, bench_table.json and
#                        overhead.json the figures (at most 8 files, as a lent machine sends back).
#   ICNET_GPU_DATA       the cityscapes_val9 folder (default ../shared/data/cityscapes_val9, else
#                        .gpu_data/cityscapes_val9: ../shared does not travel to a lent machine, so copy
#                        the folder there, ignored by git, and carry it).
#   CHECKPOINT           weights for the agreement check and the node path (default: the demo weights).
#   GPU_CHECKS_BUDGET_S  the whole run's time limit (default 540); a step that cannot fit is skipped.
#   GPU_CHECKS_DEVICE    cuda (default); "cpu" with GPU_CHECKS_QUICK=1 runs every step at toy sizes,
#                        to check this script on a machine without a GPU.
#   PYTHON               the interpreter (default python3).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-/tmp/icnet_gpu_results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_checks.log"
: >"$LOG"
PYTHON="${PYTHON:-python3}"
DEVICE="${GPU_CHECKS_DEVICE:-cuda}"
QUICK="${GPU_CHECKS_QUICK:-0}"
BUDGET_S="${GPU_CHECKS_BUDGET_S:-540}"
START_S=$SECONDS
CHECKPOINT="${CHECKPOINT:-$REPO/icnet_ros/assets/demo_synthetic_keep0.25.safetensors}"
export PYTHONUNBUFFERED=1
export ICNET_ROS_CACHE="${ICNET_ROS_CACHE:-/tmp/icnet_ros_cache}"  # TensorRT engines, built once per run

say() { echo "$*" | tee -a "$LOG"; }

if [ -d "$REPO/.whl" ] && compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$REPO"/.whl/*.whl >>"$LOG" 2>&1 && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

DATA=""
for candidate in "${ICNET_GPU_DATA:-}" "$REPO/../shared/data/cityscapes_val9" "$REPO/.gpu_data/cityscapes_val9"; do
    if [ -n "$candidate" ] && [ -d "$candidate" ]; then DATA="$candidate"; break; fi
done

# step NAME MAX_SECONDS COMMAND...: run with a time limit that fits the budget; record its exit status
STATUS=()
step() {
    local name="$1" max_s="$2"
    shift 2
    local left=$((BUDGET_S - (SECONDS - START_S) - 10))
    local limit=$((max_s < left ? max_s : left))
    if [ "$limit" -lt 30 ]; then
        say "== $name: skipped, ${left}s of the budget left"
        STATUS+=("$name: skipped (budget)")
        return
    fi
    say "== $name (limit ${limit}s): $*"
    local began=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    say "== $name: exit $rc after $((SECONDS - began))s"
    STATUS+=("$name: exit $rc ($((SECONDS - began))s)")
}

say "== environment ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
{ command -v nvidia-smi >/dev/null && nvidia-smi -L; } 2>&1 | tee -a "$LOG"
"$PYTHON" - <<'PY' 2>&1 | tee -a "$LOG"
import torch
from icnet_ros.inference import tensorrt
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs: "
      f"{[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
try:
    trt = tensorrt.import_tensorrt()
    print(f"tensorrt {trt.__version__}")
except tensorrt.TensorRTError as error:
    print(f"tensorrt: not available ({error})")
PY
HAVE_TRT=0
"$PYTHON" -c "from icnet_ros.inference import tensorrt; raise SystemExit(0 if tensorrt.available() else 1)" \
    2>/dev/null && HAVE_TRT=1
BACKENDS=(naive torch)
[ "$HAVE_TRT" = 1 ] && BACKENDS+=(tensorrt)
say "data: ${DATA:-none found (agreement check skipped; the benchmark uses synthetic drives)}; checkpoint: $CHECKPOINT"

if [ "$QUICK" = 1 ]; then
    SIZE=(--resolutions 128x256); ITER=(--iterations 3 --naive-iterations 2 --warmup 1); FRAMES=5
    OVERHEAD_SIZE=(--height 128 --width 256)
else
    SIZE=(--resolutions 1024x2048); ITER=(--iterations 50 --naive-iterations 3 --warmup 5); FRAMES=300
    OVERHEAD_SIZE=(--height 1024 --width 2048)
fi
IMAGES=()
[ -n "$DATA" ] && IMAGES=(--images "$DATA" --images-glob '*_src.png')
BENCH=("$PYTHON" -m icnet_ros.inference.benchmark --device "$DEVICE" "${SIZE[@]}" "${IMAGES[@]}"
       --backends "${BACKENDS[@]}" --output-sets labels all)

# 1. the GPU tests (they skip, saying why, without CUDA or TensorRT)
step "gpu tests" 200 "$PYTHON" -m pytest -q -p no:cacheprovider -rs test/test_engine_gpu.py test/test_tensorrt.py \
    test/test_graph_cache.py

# 2. agreement with fp32 eager, torch backend
if [ -n "$DATA" ]; then
    step "agreement torch" 120 "$PYTHON" -m icnet_ros.inference.gpu_check "$DATA" --checkpoint "$CHECKPOINT" \
        --device "$DEVICE" --backend torch --json "$OUT/gpu_check_torch.json"
fi

# 3. the headline configuration
step "benchmark headline" 180 "${BENCH[@]}" --keep-rates 0.5 --branches sub124 --batch 1 "${ITER[@]}" \
    --json "$OUT/bench_headline.json"

# 4. the node path with the engine (the node's two threads, recycled rclpy-like messages)
step "node path" 120 "$PYTHON" -m icnet_ros.ros.overhead --device "$DEVICE" --checkpoint "$CHECKPOINT" \
    "${OVERHEAD_SIZE[@]}" --inputs rgb8 --frames "$FRAMES" --json "$OUT/overhead.json"

# 5. agreement, TensorRT backend (builds its engine once: a minute or two)
if [ "$HAVE_TRT" = 1 ] && [ -n "$DATA" ]; then
    step "agreement tensorrt" 240 "$PYTHON" -m icnet_ros.inference.gpu_check "$DATA" --checkpoint "$CHECKPOINT" \
        --device "$DEVICE" --backend tensorrt --json "$OUT/gpu_check_tensorrt.json"
else
    say "== agreement tensorrt: skipped (tensorrt: $([ "$HAVE_TRT" = 1 ] && echo yes || echo no), data: ${DATA:-no})"
    STATUS+=("agreement tensorrt: skipped")
fi

# 6. the full table
step "benchmark table" 420 "${BENCH[@]}" --keep-rates 0.5 0.25 --branches sub124 sub4 --batch 1 4 \
    --iterations "$([ "$QUICK" = 1 ] && echo 2 || echo 20)" --naive-iterations 2 --warmup 2 \
    --json "$OUT/bench_table.json"

say "== summary after $((SECONDS - START_S))s"
for line in "${STATUS[@]}"; do say "   $line"; done
say "results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
