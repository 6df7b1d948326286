#!/usr/bin/env bash
# The GPU checks of issue 19 in one run, for a machine with a CUDA GPU (about 7 minutes on an H100/H200),
# most important first, each step under a time limit that fits what is left of the budget:
#
#   1. the headline (icnet-benchmark, 1024x2048, keep 0.5, sub124, batch 1, fp16, labels / all outputs,
#      naive vs torch vs tensorrt): forward p50 (-> forward fps), end-to-end throughput fps (uint8 host
#      frame -> outputs on the host), latency, peak GPU memory;
#   2. label agreement with fp32 eager on the nine Cityscapes frames (python -m icnet_ros.inference.gpu_check),
#      for every backend (torch, tensorrt) with the bundled CamVid model, and with the bundled Cityscapes
#      model when icnet_ros/assets/cityscapes_keep0.25.safetensors exists; with the CamVid model also
#      batches of 2 and 4 against batch 1 (the frames are 1024x2048: TensorRT's per-frame alignment);
#   3. the whole node path (python -m icnet_ros.ros.overhead --device cuda, the node's two threads,
#      labels only and all outputs) at 1024x2048 with the CamVid model;
#   4. the GPU tests (test/test_engine_gpu.py, test/test_tensorrt.py, test/test_graph_cache.py,
#      test/test_cuda_runner.py, test/test_optimize.py);
#   5. the full table: keep 0.5 and 0.25, sub124 and sub4, batch 1 and 4, labels and all outputs.
#
# Run from anywhere: bash ci/gpu_checks.sh. It uses the package from this checkout (PYTHONPATH) and the
# machine's CUDA PyTorch, plus wheels under .whl/ when that folder was carried along (installed into
# /tmp/site; e.g. rosbags, tensorrt). TensorRT steps are skipped with a note when `tensorrt` does not import.
#
# Settings (environment):
#   OUT                  where results go (default /tmp/icnet_gpu_results), at most 8 files (what a lent
#                        machine sends back): gpu_checks.log (every step's output), bench_headline.json,
#                        agreement.json (every gpu_check report, keyed model/backend), overhead.json,
#                        bench_table.json and summary.json (each step's exit status and time).
#   ICNET_GPU_DATA       the cityscapes_val9 folder (default ../shared/data/cityscapes_val9, else
#                        .gpu_data/cityscapes_val9: ../shared does not travel to a lent machine, so copy
#                        the folder there, ignored by git, and carry it).
#   CHECKPOINT           weights for the node path (default: the bundled CamVid model).
#   GPU_CHECKS_BUDGET_S  the whole run's time limit (default 420); a step that cannot fit is skipped.
#   GPU_CHECKS_DEVICE    cuda (default); "cpu" with GPU_CHECKS_QUICK=1 runs every step at toy sizes (one
#                        frame for the agreement), to check this script on a machine without a GPU.
#   PYTHON               the interpreter (default python3).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-/tmp/icnet_gpu_results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_checks.log"
: >"$LOG"
WORK="$(mktemp -d /tmp/icnet_gpu_checks.XXXXXX)"  # per-step reports, merged into $OUT at the end
PYTHON="${PYTHON:-python3}"
DEVICE="${GPU_CHECKS_DEVICE:-cuda}"
QUICK="${GPU_CHECKS_QUICK:-0}"
BUDGET_S="${GPU_CHECKS_BUDGET_S:-420}"
START_S=$SECONDS
ASSETS="$REPO/icnet_ros/assets"
CAMVID="$ASSETS/camvid_keep0.25.safetensors"
CITYSCAPES="$ASSETS/cityscapes_keep0.25.safetensors"
CHECKPOINT="${CHECKPOINT:-$CAMVID}"
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
STEPS="$WORK/steps.tsv"
: >"$STEPS"
step() {
    local name="$1" max_s="$2"
    shift 2
    local left=$((BUDGET_S - (SECONDS - START_S) - 15))
    local limit=$((max_s < left ? max_s : left))
    if [ "$limit" -lt 30 ]; then
        say "== $name: skipped, ${left}s of the budget left"
        printf '%s\tskipped (budget)\t0\n' "$name" >>"$STEPS"
        return
    fi
    say "== $name (limit ${limit}s): $*"
    local began=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    say "== $name: exit $rc after $((SECONDS - began))s"
    printf '%s\texit %s\t%s\n' "$name" "$rc" "$((SECONDS - began))" >>"$STEPS"
}
skip() {  # skip NAME WHY
    say "== $1: skipped ($2)"
    printf '%s\tskipped (%s)\t0\n' "$1" "$2" >>"$STEPS"
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
AGREE_BACKENDS=(torch)
[ "$HAVE_TRT" = 1 ] && AGREE_BACKENDS+=(tensorrt)
MODELS=(camvid)
[ -f "$CITYSCAPES" ] && MODELS+=(cityscapes)
say "data: ${DATA:-none found (agreement checks skipped; the benchmark uses synthetic drives)}"
say "models for the agreement: ${MODELS[*]}$([ -f "$CITYSCAPES" ] || echo " ($CITYSCAPES not there yet)"); node path: $CHECKPOINT"

if [ "$QUICK" = 1 ]; then
    SIZE=(--resolutions 128x256); ITER=(--iterations 3 --naive-iterations 2 --warmup 1); FRAMES=5
    OVERHEAD_SIZE=(--height 128 --width 256); FRAME_GLOB='frankfurt_*_src.png'; TABLE_ITER=2
else
    SIZE=(--resolutions 1024x2048); ITER=(--iterations 50 --naive-iterations 3 --warmup 5); FRAMES=300
    OVERHEAD_SIZE=(--height 1024 --width 2048); FRAME_GLOB='*_src.png'; TABLE_ITER=20
fi
IMAGES=()
[ -n "$DATA" ] && IMAGES=(--images "$DATA" --images-glob '*_src.png')
BENCH=("$PYTHON" -m icnet_ros.inference.benchmark --device "$DEVICE" "${SIZE[@]}" "${IMAGES[@]}"
       --backends "${BACKENDS[@]}" --output-sets labels all)

# 1. the headline configuration
step "benchmark headline" 180 "${BENCH[@]}" --keep-rates 0.5 --branches sub124 --batch 1 --precision auto \
    "${ITER[@]}" --json "$OUT/bench_headline.json"

# 2. agreement with fp32 eager: every backend, every bundled street model; batches 2 and 4 with CamVid
agree() {  # agree MODEL BACKEND LIMIT [gpu_check options...]
    local model="$1" backend="$2" limit="$3"
    shift 3
    local weights="$CAMVID"
    [ "$model" = cityscapes ] && weights="$CITYSCAPES"
    step "agreement $model $backend" "$limit" "$PYTHON" -m icnet_ros.inference.gpu_check "$DATA" \
        --glob "$FRAME_GLOB" --checkpoint "$weights" --device "$DEVICE" --backend "$backend" \
        --json "$WORK/agreement_${model}_${backend}.json" "$@"
}
if [ -z "$DATA" ]; then
    skip "agreement" "no cityscapes_val9 folder"
else
    for model in "${MODELS[@]}"; do
        for backend in "${AGREE_BACKENDS[@]}"; do
            extra=()
            [ "$model" = camvid ] && extra=(--batches 2 4)
            limit=90
            [ "$backend" = tensorrt ] && limit=240  # the first run builds its engine (a minute or two)
            agree "$model" "$backend" "$limit" "${extra[@]}"
        done
    done
    [ "$HAVE_TRT" = 1 ] || skip "agreement tensorrt" "tensorrt does not import"
fi

# 3. the node path with the engine (the node's two threads, recycled rclpy-like messages)
step "node path" 150 "$PYTHON" -m icnet_ros.ros.overhead --device "$DEVICE" --checkpoint "$CHECKPOINT" \
    "${OVERHEAD_SIZE[@]}" --inputs rgb8 --frames "$FRAMES" --json "$OUT/overhead.json"

# 4. the GPU tests (they skip, saying why, without CUDA or TensorRT)
step "gpu tests" 200 "$PYTHON" -m pytest -q -p no:cacheprovider -rs test/test_engine_gpu.py test/test_tensorrt.py \
    test/test_graph_cache.py test/test_cuda_runner.py test/test_optimize.py

# 5. the full table
step "benchmark table" 420 "${BENCH[@]}" --keep-rates 0.5 0.25 --branches sub124 sub4 --batch 1 4 \
    --iterations "$TABLE_ITER" --naive-iterations 2 --warmup 2 --json "$OUT/bench_table.json"

# one agreement.json and a summary.json (what the headline asks for, side by side), then the listing
"$PYTHON" - "$WORK" "$OUT" "$((SECONDS - START_S))" <<'PY' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path

work, out, seconds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
agreement = {path.stem.removeprefix("agreement_"): json.loads(path.read_text())
             for path in sorted(work.glob("agreement_*.json"))}
if agreement:
    (out / "agreement.json").write_text(json.dumps(agreement, indent=2) + "\n")
steps = [dict(zip(("step", "status", "seconds"), line.split("\t")))
         for line in (work / "steps.tsv").read_text().splitlines() if line]
summary = {"seconds": seconds, "steps": steps, "agreement": {
    name: {"overall": report["overall"], "target": report["target"], "passed": report["passed"],
           "batches": {row["batch"]: {"agreement": row["agreement"], "with_batch_1": row["agreement_with_batch_1"]}
                       for row in report.get("batches", [])}}
    for name, report in agreement.items()}}
headline = out / "bench_headline.json"
if headline.is_file():
    summary["headline"] = [
        {key: record.get(key) for key in ("backend", "outputs", "forward_p50_ms", "throughput_fps", "latency_p50_ms",
                                          "peak_mem_mb")}
        | {"forward_fps": 1e3 / record["forward_p50_ms"] if record.get("forward_p50_ms") else None}
        for record in json.loads(headline.read_text())]
overhead = out / "overhead.json"
if overhead.is_file():
    summary["node_path"] = [{key: record.get(key) for key in ("input", "size", "outputs", "fps", "latency_ms_p50")}
                            for record in json.loads(overhead.read_text())]
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
PY
say "== summary after $((SECONDS - START_S))s"
while IFS=$'\t' read -r name status seconds; do say "   $name: $status (${seconds}s)"; done <"$STEPS"
say "results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
rm -rf "$WORK"
