#!/usr/bin/env bash
# Runs the simulated CUDA kernels (tests/kernels_sim.rs, tests/mma_sim.rs) with the kernels compiled under AddressSanitizer:
# an out-of-bounds read or write in any .cu file fails the run with its location. The Rust side is not
# instrumented; the ASan runtime is preloaded into the test binary only (never into cargo).
set -euo pipefail
cd "$(dirname "$0")/.."
export RETINAFACE_SIM_ASAN=1 CARGO_TARGET_DIR="$PWD/target/asan"
# kernels_sim: every f32 kernel; mma_sim: the tensor-core, cp.async and wgmma emulations (a trap inside
# a collective unwinds by exception) through their probes.
for t in kernels_sim mma_sim; do
  bin=$(cargo test --release --test "$t" --no-run --message-format=json 2>/dev/null \
    | T="$t" python3 -c 'import json,os,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == os.environ["T"] and m.get("executable"):
        print(m["executable"])')
  test -x "$bin" || { echo "sim-asan: test binary $t not built" >&2; exit 1; }
  # The fibers switch stacks with longjmp, which ASan notes once (a warning, not an error).
  ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 LD_PRELOAD="$(gcc -print-file-name=libasan.so)" "$bin"
done
