#!/bin/bash
# permessage-deflate on shared batches (issue 15): the hot room with compression off and
# on in one run, and idle memory per connection with and without it.
#
#   loadtest/compression_bench.sh [hot|idle|all]
#
# Needs release builds (cargo build --release --workspace).
# hot: 5,000 members in one room, 100 senders x 1 chat/s of the mixed corpus (CJK, emoji,
#   Latin, 5-40 characters, repeats), 20 s; gateway pinned to core 0, the load tool to
#   core 1 (--threads 1); off/on/off/on, a fresh gateway each. "off" = the tool does not
#   offer permessage-deflate; "on" = it offers it (--compress) and the gateway accepts.
#   Reported: gateway CPU per delivered event, bytes read off the sockets per delivered
#   event, batch frames received compressed, and from /metrics: the share of deliveries
#   sent deflated and the time spent deflating per window.
# idle: 15,000 idle viewers, without and with --compress; the gateway's RSS per connection.
set -u
ulimit -n "$(ulimit -Hn)"
cd "$(dirname "$0")/.."
. loadtest/bench_lib.sh
MODE=${1:-all}
GWBIN=./target/release/danmaku-gateway
LT=./target/release/loadtest
TMP=$(mktemp -d)
echo "logs and reports in $TMP"


hot() {
  for round in 1 2; do
    for compress in off on; do
      port=$(free_port); data="$TMP/hot-$compress-$round"; mkdir -p "$data"
      flag=""; [ $compress = on ] && flag="--compress"
      GATEWAY_SERVER__LISTEN=127.0.0.1:$port GATEWAY_DATA__DIR=$data RUST_LOG=warn \
        taskset -c 0 $GWBIN > "$data/gw.log" 2>&1 & gw=$!
      wait_up "$port"
      taskset -c 1 $LT --threads 1 --json fanout $flag --corpus mixed --target "ws://127.0.0.1:$port/ws" \
        --conns 5000 --rooms 1 --senders 100 --rate 100 --duration 20 --pid $gw > "$data/report.json" 2> "$data/lt.err"
      curl -s "localhost:$port/metrics" > "$data/metrics.txt"
      kill -TERM $gw; wait $gw
      python3 - "$data" "compression $compress, round $round" <<'PY'
import json, sys
d, label = sys.argv[1], sys.argv[2]
r = json.load(open(f"{d}/report.json"))
m = {}
for line in open(f"{d}/metrics.txt"):
    if line.startswith("danmaku_") and " " in line:
        k, v = line.rsplit(" ", 1)
        m[k] = float(v)
dl = r["deliveries"]; g = r["usage"]["gateway"]
cpu_us = g["cpu_s"] * 1e6 / max(dl["delivered"], 1)
c = r.get("compression") or {}
frames = c.get("batch_frames_compressed", 0) + c.get("batch_frames_plain", 0) + c.get("batch_frames_unknown", 0)
defl = m.get("danmaku_deliveries_deflated_total", 0) / max(m.get("danmaku_deliveries_total", 1), 1)
n = m.get("danmaku_deflate_seconds_count", 0)
per_window = m.get("danmaku_deflate_seconds_sum", 0) / n * 1e6 if n else 0
bin_, bout = m.get('danmaku_deflate_bytes_total{stage="in"}', 0), m.get('danmaku_deflate_bytes_total{stage="out"}', 0)
fc = int(m.get('danmaku_deflate_frames_total{result="compressed"}', 0))
fp = int(m.get('danmaku_deflate_frames_total{result="plain"}', 0))
print(f"{label}: delivered {dl['delivered']} ratio {dl['ratio']:.6f} p50 {r['latency']['p50_ms']} p99 {r['latency']['p99_ms']} ms; "
      f"gateway cpu {g['cpu_s']:.2f} s = {cpu_us:.3f} us/event; wire {r['wire_bytes_per_delivered_event']:.1f} B/event")
if c:
    print(f"  negotiated {c['negotiated']}/{c['offered']}; batch frames received compressed "
          f"{c.get('batch_frames_compressed', 0)} of {frames} ({c.get('batch_frames_compressed', 0) / max(frames, 1):.1%}); "
          f"deliveries sent deflated {defl:.1%}; windows deflated {int(n)} ({fc} frames compressed, {fp} plain), "
          f"{per_window:.1f} us per window; "
          f"deflate out/in {bout / max(bin_, 1):.3f}")
PY
    done
  done
}

idle() {
  for compress in off on; do
    port=$(free_port); data="$TMP/idle-$compress"; mkdir -p "$data"
    flag=""; [ $compress = on ] && flag="--compress"
    GATEWAY_SERVER__LISTEN=127.0.0.1:$port GATEWAY_DATA__DIR=$data RUST_LOG=warn $GWBIN > "$data/gw.log" 2>&1 & gw=$!
    wait_up "$port"
    $LT --json idle $flag --target "ws://127.0.0.1:$port/ws" --conns 15000 --concurrency 500 --hold 5 \
      --room idle-room --pid $gw > "$data/report.json" 2> "$data/lt.err"
    kill -TERM $gw; wait $gw
    python3 - "$data/report.json" "idle, compression $compress" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); s = r["server_rss"]
print(f"{sys.argv[2]}: gateway RSS {s['before_bytes'] / 2**20:.1f} -> {s['all_joined_bytes'] / 2**20:.1f} MiB, "
      f"{s['per_conn_bytes']} B/conn; compression {r.get('compression')}")
PY
  done
}

case "$MODE" in
  hot) hot ;;
  idle) idle ;;
  all) hot; idle ;;
esac
