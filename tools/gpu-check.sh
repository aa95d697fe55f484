#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: builds, runs every GPU test (the kernels in simulation and on the
# device, every golden case end to end against the goldens, a short throughput run) and writes a
# summary to the directory given. Budget: under 8 minutes on one H100/H200-class GPU.
#
#   tools/gpu-check.sh OUT_DIR
#
# NVRTC: the system CUDA (driver 580 / CUDA 13.0 ships libnvrtc.so.13) or RETINAFACE_NVRTC_LIB. The
# summary is OUT_DIR/gpu-check.txt; full logs are beside it. Exit status is non-zero on any failure.
set -uo pipefail
OUT="${1:?usage: tools/gpu-check.sh OUT_DIR}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
export RETINAFACE_REQUIRE_GPU=1
export RETINAFACE_KERNEL_CACHE="${RETINAFACE_KERNEL_CACHE:-$OUT/kernel-cache}"
SUMMARY="$OUT/gpu-check.txt"
status=0
{
  echo "retinaface gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
} > "$SUMMARY"

run() {  # name, timeout seconds, command...
  local name="$1" secs="$2"; shift 2
  local t0=$(date +%s)
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: $([ $rc -eq 0 ] && echo PASS || echo "FAIL (exit $rc)") in $(( $(date +%s) - t0 ))s" >> "$SUMMARY"
  [ $rc -eq 0 ] || status=1
}

run build 240 cargo build --release --tests
run gpu-tests 240 cargo test --release --test gpu -- --nocapture --test-threads=1
run nvrtc 60 cargo test --release --test nvrtc_compile -- --nocapture --test-threads=1
run sim-kernels 120 cargo test --release --test kernels_sim
# retinaface video at 1280x720 on the GPU: frames/s and the stage overlap (decode + inference + encode). Needs
# ffmpeg (RETINAFACE_FFMPEG or PATH; the CI venv's imageio-ffmpeg one can be carried over).
if [ -n "${RETINAFACE_FFMPEG:-}" ] || command -v ffmpeg >/dev/null; then
  run video-bench 200 cargo bench --bench video_pipeline -- --backend cuda --frames 300 --rounds 3 --batch 4
  grep -E "^(median|backend)" "$OUT/video-bench.log" | sed 's/^/video: /' >> "$SUMMARY"
else
  echo "video-bench: SKIP (no ffmpeg: set RETINAFACE_FFMPEG)" >> "$SUMMARY"
fi
# f16 tensor-core convolutions: every variant validated and timed on the device for the largest and the
# smallest network at 640x640, batch 64, the tuner's choices cached beside the logs.
export RETINAFACE_TUNE_CACHE="$OUT/conv_tune.json"
run bench-kernels-r50 150 "$CARGO_TARGET_DIR/release/retinaface" bench-kernels --network resnet50 --size 640x640 --batch 64 --backend cuda --tune full
run bench-kernels-mn025 90 "$CARGO_TARGET_DIR/release/retinaface" bench-kernels --network mobilenetv1_0.25 --size 640x640 --batch 64 --backend cuda --tune full
grep -E "raw max error|THROUGHPUT|running on|SKIP" "$OUT/gpu-tests.log" >> "$SUMMARY" 2>/dev/null
grep -E "^(conv|heads|maxpool|select|topk|decode|nms|preprocess|upsample)" "$OUT/nvrtc.log" >> "$SUMMARY" 2>/dev/null
echo "overall: $([ $status -eq 0 ] && echo PASS || echo FAIL)" >> "$SUMMARY"
cat "$SUMMARY"
exit $status
