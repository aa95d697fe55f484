#!/usr/bin/env bash
# Load benchmark of `retinaface serve` (CPU backend), with oha (`cargo install oha`).
#
#   tools/loadtest.sh                 # everything, about 4 minutes
#   SOAK_S=600 DUR=10s tools/loadtest.sh
#
# Prints one markdown table: a concurrency sweep (closed loop) with batching and without, an
# open-loop overload at 2x the measured capacity (with oha's latency correction, so coordinated
# omission does not hide queueing), a recovery run right after it, and a soak with the server's
# memory growth. Everything listens on 127.0.0.1 only.
#
# Environment: WEIGHTS, IMAGE, PORT (API; metrics on PORT+2), DUR (per sweep point), SWEEP
# (concurrencies), OVERLOAD_S, RECOVER_S, SOAK_S, BATCH (max batch of the batching run), SERVER
# (command that runs the server given serve flags; default: `retinaface serve` from a release build),
# BACKEND (serve --backend; default cpu; tools/gpu-check.sh sets cuda).
set -euo pipefail
cd "$(dirname "$0")/.."

WEIGHTS=${WEIGHTS:-../shared/weights/retinaface_mv1_0.25.pth}
IMAGE=${IMAGE:-../shared/images/trio.jpg}
PORT=${PORT:-18000}
DUR=${DUR:-4s}
SWEEP=${SWEEP:-"1 2 4 8 16 32 64"}
OVERLOAD_S=${OVERLOAD_S:-15}
RECOVER_S=${RECOVER_S:-10}
SOAK_S=${SOAK_S:-120}
BATCH=${BATCH:-8}
BACKEND=${BACKEND:-cpu}
MAX_QUEUE=${MAX_QUEUE:-64}
URL="http://127.0.0.1:$PORT/v1/detect"
METRICS="http://127.0.0.1:$((PORT + 2))/metrics"
WORK=$(mktemp -d)
trap 'stop_server; rm -rf "$WORK"' EXIT

command -v oha >/dev/null || { echo "oha not found: cargo install oha" >&2; exit 1; }
command -v python3 >/dev/null || { echo "python3 is needed to summarise oha's JSON" >&2; exit 1; }
[ -f "$WEIGHTS" ] || { echo "weights $WEIGHTS not found (set WEIGHTS)" >&2; exit 1; }
[ -f "$IMAGE" ] || { echo "image $IMAGE not found (set IMAGE)" >&2; exit 1; }

if [ -z "${SERVER:-}" ]; then
    cargo build --release --bin retinaface >&2
    SERVER="target/release/retinaface serve"
fi

PID=""
start_server() {
    # $SERVER is a command line: split on spaces on purpose.
    # shellcheck disable=SC2086
    $SERVER --weights "$WEIGHTS" --backend "$BACKEND" --host 127.0.0.1 --port "$PORT" --metrics-port "$((PORT + 2))" \
        --max-queue "$MAX_QUEUE" --queue-timeout-ms 5000 "$@" 2>"$WORK/server.log" &
    PID=$!
    for _ in $(seq 1 200); do
        curl -sf "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null 2>&1 && return 0
        kill -0 "$PID" 2>/dev/null || { cat "$WORK/server.log" >&2; echo "server exited" >&2; exit 1; }
        sleep 0.1
    done
    echo "server not ready after 20 s" >&2
    exit 1
}

stop_server() {
    [ -n "$PID" ] || return 0
    kill -TERM "$PID" 2>/dev/null || true
    local rc=0
    wait "$PID" || rc=$?
    [ "$rc" = 0 ] || echo "warning: server exited with $rc after SIGTERM" >&2
    PID=""
}

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$PID/status"; }

metric() { curl -sf "$METRICS" | awk -v n="$1" '$1 ~ "^"n"[{]" {print $2; exit}'; }

# run LABEL MODE LOAD oha-args...: one table row. The mean batch comes from the server's
# nv_inference_count / nv_inference_exec_count over the run.
run() {
    local label=$1 mode=$2 load=$3
    shift 3
    local c0 e0 c1 e1
    c0=$(metric nv_inference_count)
    e0=$(metric nv_inference_exec_count)
    oha --no-tui --output-format json --stats-success-breakdown --wait-ongoing-requests-after-deadline -m POST -T image/jpeg -D "$IMAGE" "$@" "$URL" >"$WORK/oha.json"
    c1=$(metric nv_inference_count)
    e1=$(metric nv_inference_exec_count)
    python3 - "$WORK/oha.json" "$label" "$mode" "$load" "$((c1 - c0))" "$((e1 - e0))" "$(cut -d' ' -f1 /proc/loadavg)" <<'PY'
import json, sys
path, label, mode, load, infers, execs, loadavg = sys.argv[1:8]
r = json.load(open(path))
codes = {int(k): v for k, v in (r.get("statusCodeDistribution") or {}).items()}
errors = sum((r.get("errorDistribution") or {}).values())
secs = r["summary"]["total"]
ok = codes.get(200, 0)
# Latency of the successful requests when oha reports them apart (fast 503s would flatter the
# percentiles under overload), else of all responses.
lat = r.get("latencyPercentilesSuccessful") or r.get("latencyPercentiles") or {}
ms = lambda k: "%.0f" % (1000 * lat[k]) if lat.get(k) is not None else "-"
five = sum(v for k, v in codes.items() if 500 <= k and k != 503)
other = sum(v for k, v in codes.items() if k not in (200, 503) and not 500 <= k)
batch = "%.2f" % (int(infers) / int(execs)) if int(execs) else "-"
print(f"| {label} | {mode} | {load} | {ok / secs:.1f} | {ms('p50')} | {ms('p90')} | {ms('p99')} | {ok} | {codes.get(503, 0)} | {five} | {other + errors} | {batch} | {loadavg} |")
with open(path + ".okps", "w") as f:
    f.write(str(ok / secs))
PY
}

okps() { cat "$WORK/oha.json.okps"; }

echo "server: $SERVER; image: $IMAGE; weights: $WEIGHTS; $(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo
# The last column is the machine's 1-minute load average after the run: above ~3 on 2 CPUs
# (server + oha) something else was competing for the cores.
echo "| run | batching | load | ok/s | p50 ms | p90 ms | p99 ms | 200 | 503 | 5xx | other errors | mean batch | loadavg |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"

# 1. Sweep with batching.
start_server --max-batch "$BATCH" --max-queue-delay-us 2000
curl -sf -H 'Content-Type: image/jpeg' --data-binary @"$IMAGE" "$URL" >/dev/null # warm-up
cap=0
for c in $SWEEP; do
    run sweep "max-batch $BATCH" "c=$c" -c "$c" -z "$DUR"
    cap=$(python3 -c "print(max($cap, $(okps)))")
done

# 2. Overload: open loop at twice the capacity just measured, more connections than the queue holds.
rate=$(python3 -c "print(max(1, round(2 * $cap)))")
run overload "max-batch $BATCH" "open loop ${rate}/s (2x cap ${cap%.*}/s), c=$((MAX_QUEUE * 3))" \
    -q "$rate" --latency-correction -c "$((MAX_QUEUE * 3))" -z "${OVERLOAD_S}s"
# 3. Recovery: half the capacity, straight after: latency should be back to the light-load level.
half=$(python3 -c "print(max(1, round(0.5 * $cap)))")
run recovery "max-batch $BATCH" "open loop ${half}/s, c=16" -q "$half" --latency-correction -c 16 -z "${RECOVER_S}s"

# 4. Soak at half the capacity; the server's RSS is sampled every 5 s.
soak_rate=$half
rss0=$(rss_kib)
( while sleep 5; do rss_kib >>"$WORK/rss" 2>/dev/null || break; done ) &
sampler=$!
run soak "max-batch $BATCH" "open loop ${soak_rate}/s, c=32, ${SOAK_S}s" -q "$soak_rate" --latency-correction -c 32 -z "${SOAK_S}s"
kill "$sampler" 2>/dev/null || true
rss1=$(rss_kib)
rssmax=$(sort -n "$WORK/rss" 2>/dev/null | tail -1)
stop_server

# 5. Sweep without batching.
start_server --max-batch 1
curl -sf -H 'Content-Type: image/jpeg' --data-binary @"$IMAGE" "$URL" >/dev/null
for c in $SWEEP; do
    run sweep "off (max-batch 1)" "c=$c" -c "$c" -z "$DUR"
done
stop_server

echo
echo "capacity (best ok/s with batching): ${cap}"
echo "soak memory (server RSS): start $((rss0 / 1024)) MiB, end $((rss1 / 1024)) MiB, max ${rssmax:+$((rssmax / 1024))} MiB, growth $(((rss1 - rss0) / 1024)) MiB over ${SOAK_S} s"
