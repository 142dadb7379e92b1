#!/bin/bash
# Issue 11's figures for two gateway builds in one run, back to back:
#
#   loadtest/hotpath_bench.sh BEFORE_BINARY AFTER_BINARY [idle|storm|fanout|all]
#
# (copy each build's target/release/danmaku-gateway aside first; the load tool is
# ./target/release/loadtest.)
# idle:   15,000 idle viewers joined through the URL, 5 s hold: the gateway's RSS per
#         connection; before/after/before/after.
# storm:  15,000 connections at concurrency 500, all joined: gateway CPU seconds;
#         before/after/before/after.
# fanout: 5,000 members in one room, 20 chats/s (≈1 event a window) and 100 chats/s;
#         gateway pinned to core 0, the load tool to core 1 (--threads 1): CPU per
#         delivered event, delivery ratio, p50/p99.
set -u
ulimit -n "$(ulimit -Hn)"
cd "$(dirname "$0")/.."
. loadtest/bench_lib.sh
BEFORE=$1 AFTER=$2 MODE=${3:-all}
LT=./target/release/loadtest
TMP=$(mktemp -d)
echo "logs and reports in $TMP"

# run LABEL BINARY PIN -- loadtest args...: one fresh gateway, one load-tool run, a summary.
run() {
  local label=$1 bin=$2 pin=$3; shift 4
  local port data gw gwpin="" ltpin=""
  port=$(free_port); data="$TMP/$label-$RANDOM"; mkdir -p "$data"
  [ "$pin" = pin ] && gwpin="taskset -c 0" && ltpin="taskset -c 1"
  GATEWAY_SERVER__LISTEN=127.0.0.1:$port GATEWAY_DATA__DIR=$data RUST_LOG=warn \
    $gwpin "$bin" > "$data/gw.log" 2>&1 & gw=$!
  wait_up "$port"
  $ltpin $LT --threads "$([ "$pin" = pin ] && echo 1 || nproc)" --json "$@" \
    --target "ws://127.0.0.1:$port/ws" --pid $gw > "$data/report.json" 2> "$data/lt.err"
  kill -TERM $gw; wait $gw
  python3 - "$data/report.json" "$label" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); label = sys.argv[2]; g = r["usage"]["gateway"]
if r["scenario"] == "idle":
    print(f"{label}: {r['server_rss']['per_conn_end_of_hold_bytes']} B per connection "
          f"({r['open_at_end']} open), passed {r['passed']}")
elif r["scenario"] == "storm":
    c = r["connect"]
    print(f"{label}: gateway cpu {g['cpu_s']:.2f} s, all joined {c['all_joined']} "
          f"in {c['time_to_all_joined_s']} s")
else:
    dl = r["deliveries"]
    print(f"{label}: {g['cpu_s'] * 1e6 / max(dl['delivered'], 1):.3f} us/event, ratio "
          f"{dl['ratio']:.6f}, p50 {r['latency']['p50_ms']} p99 {r['latency']['p99_ms']} ms")
PY
}

# alternate ROUNDS LABEL PIN -- loadtest args...: before, after, before, after, ...
alternate() {
  local rounds=$1 label=$2 pin=$3; shift 4
  for round in $(seq "$rounds"); do
    run "$label before $round" "$BEFORE" "$pin" -- "$@"
    run "$label after $round" "$AFTER" "$pin" -- "$@"
  done
}

if [ "$MODE" = idle ] || [ "$MODE" = all ]; then
  alternate 2 idle free -- idle --conns 15000 --concurrency 500 --hold 5 --room idle-room
fi
if [ "$MODE" = storm ] || [ "$MODE" = all ]; then
  alternate 2 storm free -- storm --conns 15000 --concurrency 500
fi
if [ "$MODE" = fanout ] || [ "$MODE" = all ]; then
  for rate in 20 100; do
    alternate 1 "fanout $rate/s" pin -- fanout --conns 5000 --rooms 1 \
      --senders $rate --rate $rate --duration 20
  done
fi
