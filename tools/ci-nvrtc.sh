#!/usr/bin/env bash
# Installs NVRTC 13.0 from PyPI into .venv (no CUDA toolkit or GPU needed) and runs the NVRTC compile
# test: every kernel to SASS for sm_80 and sm_90, failing on compile errors and on spills in the hot
# kernels; prints the ptxas resource table. For .ci/run:   tools/ci-nvrtc.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RETINAFACE_VENV:-.venv}"
if [ ! -x "$VENV/bin/pip" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96
LIB="$(ls -d "$VENV"/lib/python3*/site-packages/nvidia/cu13/lib | head -n1)"
export RETINAFACE_NVRTC_LIB="$(cd "$LIB" && pwd)"
export RETINAFACE_REQUIRE_NVRTC=1
export RETINAFACE_KERNEL_CACHE="${RETINAFACE_KERNEL_CACHE:-$PWD/target/kernel-cache}"
cargo test --release --test nvrtc_compile -- --nocapture --test-threads=1
