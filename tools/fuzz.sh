#!/usr/bin/env bash
# Coverage-guided fuzzing of every loader and parser with libFuzzer (fuzz/: one target per parser).
#
#   tools/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default 20 s, every target)
#
# Builds fuzz/ with SanitizerCoverage instrumentation on stable Rust (the flags cargo-fuzz passes for
# `--sanitizer none`), into target/fuzz, then runs each target for the given time from the committed
# seeds in fuzz/corpus/<target> (read only; new inputs go to a scratch corpus), with libFuzzer's
# memory caps: a process over 2560 MB resident, or a single allocation over 1024 MB, is a failure.
# Prints one line per target with the executions and the coverage reached; exits non-zero on any crash,
# leak of the caps, or timeout (> 10 s for one input), leaving the reproducer in target/fuzz/artifacts.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(image pth unpickler safetensors mat v2)

export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# An explicit --target keeps the instrumentation off build scripts and proc macros (they would not link).
host=$(rustc -vV | sed -n 's/^host: //p')
cargo build --release --manifest-path fuzz/Cargo.toml --target-dir target/fuzz --target "$host" --bins
bin=target/fuzz/$host/release

seeds_of() {
    case "$1" in
        v2) echo tests/serve_util/fuzz_v2 ;;
        *) echo "fuzz/corpus/$1" ;;
    esac
}

mkdir -p target/fuzz/artifacts
status=0
for t in "${targets[@]}"; do
    scratch=$(mktemp -d)
    log=target/fuzz/$t.log
    if ! "$bin/$t" -max_total_time="$secs" -rss_limit_mb=2560 -malloc_limit_mb=1024 -timeout=10 \
        -print_final_stats=1 -artifact_prefix=target/fuzz/artifacts/"$t"- "$scratch" "$(seeds_of "$t")" >"$log" 2>&1; then
        echo "fuzz $t: FAILED (see $log and target/fuzz/artifacts/)"
        tail -30 "$log"
        status=1
    else
        runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
        cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || echo '?')
        echo "fuzz $t: ${runs} executions in ${secs} s, coverage ${cov} edges, no crash"
    fi
    rm -rf "$scratch"
done
exit $status
