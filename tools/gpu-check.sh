#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, in one timed run of at most 8 minutes (GPU time comes
# in sessions of about 15 minutes, start-up included), writes OUT_DIR/gpu-check.md (one markdown table)
# and OUT_DIR/gpu-check.json (the same rows), logs beside them:
#   - the goldens on the device: f32 (tests/gpu.rs, detections included), and f16 through
#     `retinaface forward --precision f16` when the binary has that flag;
#   - `bench-kernels` (every f16 convolution variant validated and timed, resnet50 and mobilenetv1_0.25);
#   - the throughput sweep of all seven networks at 640x640 and 1920x1080 (`retinaface bench`,
#     host images to detections on the host, batch sweep, device time apart where measured);
#   - `serve --backend cuda` under loopback load (tools/loadtest.sh, short);
#   - anchors in the same run on the same GPU and weights (benches/gpu_baselines.py): PyTorch eager
#     f32 / f16 and replayed from CUDA graphs, ONNX Runtime with the CUDA and TensorRT providers.
# Every step has a time-box and the whole timed part a deadline; what a step finished before its
# time-box is kept. Before the timed part: the venv (NVRTC 13 and the anchors' packages from PyPI, as
# .ci/run installs NVRTC), the driver check, the build, oha.
#
#   tools/gpu-check.sh OUT_DIR            # the check (needs a GPU)
#   tools/gpu-check.sh --dry-run [OUT_DIR] # prints the plan and checks prerequisites; no GPU needed
#   tools/gpu-check.sh --report-from DIR   # rebuilds DIR's report from its steps' outputs; nothing run
#
# The report (tools/gpu_check_report.py): per engine row, the end-to-end time (host clock) and the GPU
# time (CUDA events) apart, and one column per stage bench's JSON reports, with its source.
#
# Environment: RETINAFACE_BIN (a built retinaface binary: no cargo build then, e.g. the tests' own),
# GPU_CHECK_VENV (default .venv-gpu), GPU_CHECK_BUDGET_S (default 480), CARGO_TARGET_DIR.
# Exit status: 0 when every step passed (dry run: when the plan is consistent), 1 otherwise.
set -uo pipefail

DRY=0
OUT=""
REPORT_FROM=""
while [ $# -gt 0 ]; do
  arg="$1"
  shift
  case "$arg" in
    --dry-run) DRY=1 ;;
    --report-from)
      [ $# -gt 0 ] || { echo "gpu-check: --report-from needs a directory" >&2; exit 2; }
      REPORT_FROM="$1"
      shift
      ;;
    --report-from=*) REPORT_FROM="${arg#--report-from=}" ;;
    -h | --help) sed -n '2,26p' "$0"; exit 0 ;;
    -*) echo "gpu-check: unknown option $arg" >&2; exit 2 ;;
    *) OUT="$arg" ;;
  esac
done
if [ -n "$REPORT_FROM" ]; then
  exec python3 "$(dirname "$0")/gpu_check_report.py" "$REPORT_FROM"
fi
if [ -z "$OUT" ]; then
  [ "$DRY" = 1 ] || { echo "usage: tools/gpu-check.sh [--dry-run] OUT_DIR" >&2; exit 2; }
  OUT="$(mktemp -d)"
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
case "${RETINAFACE_BIN:-/}" in /*) ;; *) RETINAFACE_BIN="$PWD/$RETINAFACE_BIN" ;; esac
cd "$(dirname "$0")/.."
ROOT="$PWD"
SHARED="$ROOT/../shared"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
VENV="${GPU_CHECK_VENV:-$ROOT/.venv-gpu}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-480}"
BIN="${RETINAFACE_BIN:-$CARGO_TARGET_DIR/release/retinaface}"
NETWORKS="mobilenetv1_0.25 mobilenetv1_0.50 mobilenetv1 mobilenetv2 resnet18 resnet34 resnet50"
# NVRTC 13.0 and its runtime headers, the versions .ci/run pins; the anchors' runtimes (CUDA builds
# from PyPI).
NVRTC_PKGS="nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96"
ANCHOR_PKGS="numpy torch onnx onnxruntime-gpu tensorrt-cu13"
# CUDA 13.0's minimum Linux driver (toolkit release notes): cubins from NVRTC 13 need a driver of the
# CUDA 13 branch.
MIN_DRIVER="580.65.06"
STEPS="$OUT/steps.jsonl"
: >"$STEPS"
problems=0
note() { echo "gpu-check: $*"; }
problem() { echo "gpu-check: PROBLEM: $*" >&2; problems=$((problems + 1)); }

# ---- prerequisites (before the timed part) ----
for t in python3 timeout curl; do
  command -v "$t" >/dev/null || problem "$t is required and not installed"
done
for f in tools/loadtest.sh benches/baselines.py benches/gpu_baselines.py tools/gpu_check_goldens.py tools/gpu_check_report.py \
  "$SHARED/reference/goldens/index.json" "$SHARED/weights/retinaface_mv1_0.25.pth" "$SHARED/images/trio.jpg"; do
  [ -e "$f" ] || problem "$f is missing"
done
bash -n tools/loadtest.sh || problem "tools/loadtest.sh does not parse"
python3 -c 'import ast, sys; [ast.parse(open(f).read(), f) for f in sys.argv[1:]]' \
  benches/gpu_baselines.py tools/gpu_check_goldens.py tools/gpu_check_report.py benches/baselines.py ||
  problem "a Python step does not compile"

if [ -x "$VENV/bin/python" ]; then
  note "venv: $VENV exists"
elif [ "$DRY" = 1 ]; then
  python3 -c 'import venv, ensurepip' 2>/dev/null || problem "python3 cannot make a venv (python3-venv missing)"
  note "venv: would create $VENV"
else
  python3 -m venv "$VENV" || problem "cannot create the venv $VENV"
fi
if [ "$DRY" = 1 ]; then
  note "venv: would pip install $NVRTC_PKGS (required) and $ANCHOR_PKGS (anchors; their absence skips them)"
else
  "$VENV/bin/pip" install -q $NVRTC_PKGS >"$OUT/pip-nvrtc.log" 2>&1 || problem "pip install of NVRTC failed (see pip-nvrtc.log)"
  "$VENV/bin/pip" install -q $ANCHOR_PKGS >"$OUT/pip-anchors.log" 2>&1 || note "anchors' packages did not all install: see pip-anchors.log"
fi
NVRTC_DIR="$(ls -d "$VENV"/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -n1)"
if [ -n "$NVRTC_DIR" ]; then
  export RETINAFACE_NVRTC_LIB="$NVRTC_DIR"
  note "NVRTC: $NVRTC_DIR"
elif [ "$DRY" = 1 ]; then
  note "NVRTC: would be $VENV/lib/python3*/site-packages/nvidia/cu13/lib after the install"
else
  problem "NVRTC is not in $VENV after the install"
fi
export RETINAFACE_REQUIRE_NVRTC=1 RETINAFACE_REQUIRE_GPU=1
export RETINAFACE_KERNEL_CACHE="${RETINAFACE_KERNEL_CACHE:-$OUT/kernel-cache}"
export RETINAFACE_TUNE_CACHE="$OUT/conv_tune.json"

# The driver: NVRTC 13's cubins load only on a CUDA 13 driver.
DRIVER_NOTE=""
if command -v nvidia-smi >/dev/null && drv="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n1)" && [ -n "$drv" ]; then
  gpu="$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -n1)"
  cuda="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -n1)"
  if [ "$(printf '%s\n%s\n' "$MIN_DRIVER" "$drv" | sort -V | head -n1)" = "$MIN_DRIVER" ]; then
    DRIVER_NOTE="driver $drv (CUDA ${cuda:-?}) on $gpu: new enough for NVRTC 13 cubins (needs >= $MIN_DRIVER)"
    note "$DRIVER_NOTE"
  else
    DRIVER_NOTE="driver $drv (CUDA ${cuda:-?}) is older than $MIN_DRIVER, the CUDA 13.0 minimum: NVRTC 13 cubins will not load; update the driver"
    problem "$DRIVER_NOTE"
  fi
elif [ "$DRY" = 1 ]; then
  DRIVER_NOTE="no nvidia-smi here (dry run): the driver is checked against >= $MIN_DRIVER on the GPU host"
  note "$DRIVER_NOTE"
else
  DRIVER_NOTE="nvidia-smi finds no GPU or driver"
  problem "$DRIVER_NOTE"
fi

# oha for the serve load (a Rust tool: cargo installs it).
if command -v oha >/dev/null; then
  note "oha: $(command -v oha)"
elif [ "$DRY" = 1 ]; then
  command -v cargo >/dev/null && note "oha: would cargo install oha --locked" || problem "neither oha nor cargo to install it"
else
  cargo install oha --locked >"$OUT/oha-install.log" 2>&1 || note "oha did not install: the serve step will be skipped"
fi

# The build, before anything is timed.
if [ -n "${RETINAFACE_BIN:-}" ]; then
  note "build: using RETINAFACE_BIN=$BIN"
else
  note "build: cargo build --release --bin retinaface"
  cargo build --release --bin retinaface >"$OUT/build.log" 2>&1 || problem "the build failed (see build.log)"
fi
if [ "$DRY" = 0 ]; then
  cargo test --release --test gpu --no-run >"$OUT/build-tests.log" 2>&1 || problem "tests/gpu.rs does not build (see build-tests.log)"
else
  note "build: would cargo test --release --test gpu --no-run (the f32 goldens on the device)"
fi
[ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1 || problem "$BIN does not run"

# Every flag a step passes must exist in the binary's --help (flags named by other work may be absent:
# those steps are skipped, and the table says so).
help_has() { "$BIN" $1 --help 2>/dev/null | grep -q -- "$2"; }
for pair in "bench --batch" "bench --input-on-device" "bench --forward-only" "bench --json" "bench --size" \
  "bench --iters" "bench --backend" "bench --network" "bench-kernels --tune" "bench-kernels --backend" \
  "serve --backend" "serve --max-batch" "serve --max-queue-delay-us" "serve --max-queue" \
  "serve --queue-timeout-ms" "serve --metrics-port" "serve --weights" "forward --input" "forward --output" \
  "forward --synthetic-seed" "synthetic --seed" "synthetic --output"; do
  # shellcheck disable=SC2086
  help_has ${pair% *} "${pair#* }" || problem "\`retinaface ${pair% *}\` has no ${pair#* } flag"
done
F16=0
if help_has forward --precision; then F16=1; fi
note "f16 goldens: $([ $F16 = 1 ] && echo "forward has --precision: planned" || echo "forward has no --precision yet: skipped")"

# ---- the timed part ----
planned=0
# step NAME BUDGET_S DESCRIPTION -- COMMAND...: runs under min(budget, time left); stderr (and stdout
# unless TO=FILE is set for the call) in NAME.log.
step() {
  local name="$1" budget="$2" desc="$3" to="${TO:-}"
  shift 4
  planned=$((planned + budget))
  if [ "$DRY" = 1 ]; then
    echo "plan: $name (${budget} s): $desc: $*${to:+ > $to}"
    printf '{"step":"%s","status":"planned","budget_s":%s,"seconds":0,"what":"%s"}\n' "$name" "$budget" "$desc" >>"$STEPS"
    return 0
  fi
  local left=$((BUDGET_S - ($(date +%s) - T_START)))
  local box=$((budget < left ? budget : left))
  local status rc t0
  t0=$(date +%s)
  if [ "$box" -le 0 ]; then
    status="SKIP (run deadline)"
  else
    timeout --kill-after=5 "$box" "$@" >"${to:-$OUT/$name.log}" 2>>"$OUT/$name.log"
    rc=$?
    case $rc in
      0) status=PASS ;;
      124 | 137) status="TIMEOUT after ${box} s (partial results kept)" ;;
      *) status="FAIL (exit $rc)" ;;
    esac
  fi
  printf '{"step":"%s","status":"%s","budget_s":%s,"seconds":%s,"what":"%s","log":"%s.log"}\n' \
    "$name" "$status" "$budget" "$(($(date +%s) - t0))" "$desc" "$name" >>"$STEPS"
  echo "$name: $status in $(($(date +%s) - t0)) s"
}
skip_step() {  # NAME BUDGET DESCRIPTION REASON: recorded, not run, budget not spent
  printf '{"step":"%s","status":"SKIP (%s)","budget_s":%s,"seconds":0,"what":"%s"}\n' "$1" "$4" "$2" "$3" >>"$STEPS"
  if [ "$DRY" = 1 ]; then echo "plan: $1: SKIP ($4)"; else echo "$1: SKIP ($4)"; fi
}

[ "$problems" = 0 ] || [ "$DRY" = 1 ] || { echo "gpu-check: prerequisites failed; nothing timed" >&2; exit 1; }
# NVRTC compiles every kernel family once per machine: into the cache here, not inside a time-box.
if [ "$DRY" = 1 ]; then
  note "kernel cache: would warm $RETINAFACE_KERNEL_CACHE with one small bench --backend cuda"
else
  "$BIN" bench --backend cuda --network mobilenetv1_0.25 --size 64x64 --iters 1 >"$OUT/warm-up.log" 2>&1 ||
    { echo "gpu-check: the CUDA warm-up failed (see warm-up.log); nothing timed" >&2; exit 1; }
fi
# The Hopper tiles (conv_f16_wg*: wgmma, sm_90a, compute capability 9.0 only) meet a device here for the
# first time: in a process of their own, on small maps, before anything else tunes with them. A tile
# that computes wrongly is rejected by the tuner's validation anyway; one that faults would end the
# CUDA context of whatever ran it, so when this guard fails they are withdrawn for the whole run
# (RETINAFACE_WGMMA=0) and the table says so. Untimed, like the warm-up.
GUARD_WHAT="the Hopper (wgmma) conv tiles validated and timed on resnet50 at 64x64 in a process of their own (untimed)"
if [ "$DRY" = 1 ]; then
  echo "plan: wgmma-guard (0 s, untimed): $GUARD_WHAT: $BIN bench-kernels --network resnet50 --size 64x64 --batch 2 --backend cuda --tune full; on failure RETINAFACE_WGMMA=0 for the rest"
  printf '{"step":"wgmma-guard","status":"planned","budget_s":0,"seconds":0,"what":"%s"}\n' "$GUARD_WHAT" >>"$STEPS"
else
  t0=$(date +%s)
  if timeout --kill-after=5 120 "$BIN" bench-kernels --network resnet50 --size 64x64 --batch 2 --backend cuda \
    --tune full >"$OUT/wgmma-guard.log" 2>&1; then
    guard="PASS"
  else
    guard="FAIL (exit $?): Hopper tiles withdrawn for this run (RETINAFACE_WGMMA=0)"
    export RETINAFACE_WGMMA=0
  fi
  note "wgmma guard: $guard"
  printf '{"step":"wgmma-guard","status":"%s","budget_s":0,"seconds":%s,"what":"%s","log":"wgmma-guard.log"}\n' \
    "$guard" "$(($(date +%s) - t0))" "$GUARD_WHAT" >>"$STEPS"
fi
PY="$VENV/bin/python"
[ -x "$PY" ] || PY=python3
T_START=$(date +%s)

step goldens 75 "every golden case on the device, f32 raw outputs and detections; the real checkpoints in f16 with the tensor-core bounds (tests/gpu.rs)" -- \
  cargo test --release --test gpu -- --nocapture --test-threads=1 every_golden_case_on_gpu real_weights_f16_goldens_on_gpu
if [ "$F16" = 1 ]; then
  TO="$OUT/goldens-f16.jsonl" step goldens-f16 45 "every golden case on the device, f16 (forward --precision f16, scores within 0.05)" -- \
    "$PY" tools/gpu_check_goldens.py --bin "$BIN" --backend cuda --precision f16
else
  skip_step goldens-f16 0 "every golden case on the device, f16" "the binary has no --precision"
fi
for net in resnet50 mobilenetv1_0.25; do
  step "bench-kernels-$net" 25 "f16 conv variants of $net validated and timed, 640x640, batch 64" -- \
    "$BIN" bench-kernels --network "$net" --size 640x640 --batch 64 --backend cuda --tune full
done
for net in $NETWORKS; do
  TO="$OUT/sweep-$net-640x640.jsonl" step "sweep-$net-640x640" 12 "bench $net 640x640, host images to detections" -- \
    "$BIN" bench --backend cuda --network "$net" --size 640x640 --batch 1,8,64,256 --iters 5 --json
done
for net in $NETWORKS; do
  TO="$OUT/sweep-$net-1920x1080.jsonl" step "sweep-$net-1920x1080" 15 "bench $net 1920x1080, host images to detections" -- \
    "$BIN" bench --backend cuda --network "$net" --size 1920x1080 --batch 1,8,64 --iters 3 --json
done
if command -v oha >/dev/null || [ "$DRY" = 1 ]; then
  step serve 40 "serve --backend cuda under loopback load (tools/loadtest.sh, short)" -- \
    env BACKEND=cuda SERVER="$BIN serve" WEIGHTS="$SHARED/weights/retinaface_mv1_0.25.pth" \
    IMAGE="$SHARED/images/trio.jpg" SWEEP="1 16 64" DUR=3s OVERLOAD_S=4 RECOVER_S=3 SOAK_S=4 BATCH=64 \
    bash tools/loadtest.sh
else
  skip_step serve 40 "serve --backend cuda under loopback load" "no oha"
fi
TO="$OUT/anchors.jsonl" step anchors 74 "PyTorch eager/CUDA graph f32+f16, ONNX Runtime CUDA + TensorRT, mobilenetv1_0.25 and resnet50, 640x640, batch 1 and 64" -- \
  "$PY" benches/gpu_baselines.py --bin "$BIN" --networks mobilenetv1_0.25,resnet50 --size 640x640 --batches 1,64 --budget-s 80

if [ "$planned" -gt "$BUDGET_S" ]; then
  problem "the steps' time-boxes add up to $planned s, over the run's $BUDGET_S s"
fi
note "time-boxes: $planned s of the run's $BUDGET_S s"

# ---- the report ----
# tools/gpu_check_report.py builds the table from the steps' outputs; it still writes what it could
# read when an output is unreadable, and names the file.
dry_flag=()
[ "$DRY" = 1 ] && dry_flag=(--dry-run)
python3 tools/gpu_check_report.py "$OUT" --commit "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  --driver "$DRIVER_NOTE" "${dry_flag[@]}" || problem "the report is incomplete: a step's output could not be read (see above)"

if [ "$DRY" = 1 ]; then
  if [ "$problems" = 0 ]; then note "dry run: consistent ($OUT/gpu-check.md)"; exit 0; fi
  note "dry run: $problems problem(s)"
  exit 1
fi
grep -q '"status":"\(FAIL\|TIMEOUT\)' "$STEPS" && exit 1
[ "$problems" = 0 ] || exit 1
exit 0
