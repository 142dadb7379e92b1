#!/bin/bash
# Event stream cost (issue 14): the hot room with the stream off and on, on one node
# (files) and on two nodes with Redis (Redis Streams); then 1,000,000 events a minute
# through one node into the files.
#
#   loadtest/stream_bench.sh [single|cluster|volume|all]
#
# Needs release builds (cargo build --release --workspace) and redis-server.
# single: gateway pinned to core 0, load tool to core 1 (--threads 1), off/on/off/on.
# cluster: two nodes and redis-server (unpinned: 2 cores for 4 processes), off/on; CPU is
#   both nodes' utime+stime over the run, Redis commands from INFO stats.
set -u
ulimit -n "$(ulimit -Hn)"
cd "$(dirname "$0")/.."
. loadtest/bench_lib.sh
MODE=${1:-all}
GWBIN=./target/release/danmaku-gateway
LT=./target/release/loadtest
TMP=$(mktemp -d)
echo "logs and reports in $TMP"

summary() { # report.json label -> one line
  python3 - "$1" "$2" "${3:-}" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); label = sys.argv[2]
d = r['deliveries']; g = r['usage'].get('gateway') or {}
extra = sys.argv[3]
cpu = float(extra) if extra else g.get('cpu_s', 0)
print(f"{label}: delivered {d['delivered']} ratio {d['ratio']:.6f} p50 {r['latency']['p50_ms']} p99 {r['latency']['p99_ms']} ms; "
      f"gateway cpu {cpu:.2f} s = {cpu * 1e6 / max(d['delivered'], 1):.3f} us/event")
PY
}

single() {
  for round in 1 2; do
    for stream in false true; do
      port=$(free_port); data="$TMP/single-$stream-$round"; mkdir -p "$data"
      GATEWAY_SERVER__LISTEN=127.0.0.1:$port GATEWAY_DATA__DIR=$data GATEWAY_STREAM__ENABLED=$stream RUST_LOG=warn \
        taskset -c 0 $GWBIN > "$data/gw.log" 2>&1 & gw=$!
      wait_up "$port"
      taskset -c 1 $LT --threads 1 --json fanout --target "ws://127.0.0.1:$port/ws" --conns 5000 --rooms 1 \
        --senders 100 --rate 100 --duration 20 --pid $gw > "$data/report.json" 2> "$data/lt.err"
      dropped=$(curl -s "localhost:$port/metrics" | awk '/^danmaku_stream_dropped_total/ {print $2}')
      kill -TERM $gw; wait $gw
      lines=$(cat "$data"/events/*.jsonl 2>/dev/null | wc -l)
      summary "$data/report.json" "single stream=$stream round $round"
      echo "  records in files: $lines, dropped: ${dropped:-0}"
    done
  done
}

cluster() {
  rport=$(free_port); rdir="$TMP/redis"; mkdir -p "$rdir"
  redis-server --port "$rport" --save '' --appendonly no --dir "$rdir" > "$rdir/log" 2>&1 & rpid=$!
  sleep 0.5
  for stream in false true; do
    pa=$(free_port); pb=$(free_port); data="$TMP/cluster-$stream"; mkdir -p "$data/a" "$data/b"
    redis-cli -p "$rport" FLUSHALL > /dev/null
    for n in a b; do
      port=$pa; [ $n = b ] && port=$pb
      GATEWAY_BACKPLANE=redis GATEWAY_REDIS__URL=redis://127.0.0.1:$rport GATEWAY_SERVER__NODE_ID=$n \
        GATEWAY_SERVER__LISTEN=127.0.0.1:$port GATEWAY_DATA__DIR=$data/$n GATEWAY_STREAM__ENABLED=$stream RUST_LOG=warn \
        $GWBIN > "$data/$n/gw.log" 2>&1 &
      eval "gw_$n=$!"
      wait_up "$port"
    done
    ca=$(cpu_s $gw_a); cb=$(cpu_s $gw_b)
    c0=$(redis-cli -p "$rport" INFO stats | awk -F: '/total_commands_processed/ {print $2+0}')
    t0=$(date +%s.%N)
    $LT --json fanout --target "ws://127.0.0.1:$pa/ws,ws://127.0.0.1:$pb/ws" --conns 5000 --rooms 1 \
      --senders 100 --rate 100 --duration 20 > "$data/report.json" 2> "$data/lt.err"
    t1=$(date +%s.%N)
    c1=$(redis-cli -p "$rport" INFO stats | awk -F: '/total_commands_processed/ {print $2+0}')
    cpu=$(python3 -c "print($(cpu_s $gw_a) - $ca + $(cpu_s $gw_b) - $cb)")
    xlen=$(redis-cli -p "$rport" XLEN danmaku:events)
    kill -TERM $gw_a $gw_b; wait $gw_a $gw_b
    summary "$data/report.json" "cluster stream=$stream" "$cpu"
    python3 -c "print(f'  redis commands: {$c1 - $c0} in {$t1 - $t0:.1f} s = {($c1 - $c0) / ($t1 - $t0):.0f}/s; stream entries: $xlen')"
  done
  kill $rpid
}

volume() {
  port=$(free_port); data="$TMP/volume"; mkdir -p "$data"
  GATEWAY_SERVER__LISTEN=127.0.0.1:$port GATEWAY_DATA__DIR=$data GATEWAY_STREAM__ENABLED=true \
    GATEWAY_ROOM__MAX_CHAT_PER_S=0 GATEWAY_ROOM__MAX_CHAT_BYTES_PER_S=0 \
    GATEWAY_RATELIMIT__CHAT__RATE=100 GATEWAY_RATELIMIT__CHAT__BURST=100 RUST_LOG=warn \
    $GWBIN > "$data/gw.log" 2>&1 & gw=$!
  wait_up "$port"
  $LT --json fanout --target "ws://127.0.0.1:$port/ws" --conns 100 --rooms 100 --senders 1000 \
    --rate 16667 --duration 60 --pid $gw > "$data/report.json" 2> "$data/lt.err"
  metrics=$(curl -s "localhost:$port/metrics")
  kill -TERM $gw; wait $gw
  python3 - "$data/report.json" <<PY
import json, sys
r = json.load(open(sys.argv[1])); c = r['chats']
print(f"volume: chats sent {c['sent']} acked {c['acked']} errors {c['errors']} in {r['duration_s']} s "
      f"= {c['acked'] / r['duration_s'] * 60:.0f} a minute; gateway cpu {r['usage']['gateway']['cpu_s']} s")
PY
  echo "  records in files: $(cat "$data"/events/*.jsonl | wc -l) ($(ls "$data"/events | tr '\n' ' '))"
  echo "$metrics" | grep -E '^danmaku_stream_(dropped|records|errors)' | sed 's/^/  /'
}

case "$MODE" in
  single) single ;;
  cluster) cluster ;;
  volume) volume ;;
  all) single; cluster; volume ;;
esac
