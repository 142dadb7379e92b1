#!/bin/bash
# Recovery on reconnect under load (issue 13): `loadtest reconnect` against a gateway that
# blinks, drains or dies mid-run.
#
#   loadtest/reconnect.sh single    # one node: a blink, a SIGTERM restart, a SIGKILL restart
#   loadtest/reconnect.sh cluster   # redis + nodes a and b: node b SIGKILLed and restarted
#   loadtest/reconnect.sh all       # both
#
# Parameters (environment):
#   VIEWERS=10000   viewers in the one hot room
#   DURATION=30     seconds of sending
#   RATE=20         chats/s in total
#   SENDERS=2*RATE  senders (the gateway allows a user 1 chat/s, burst 5)
#   AT=DURATION/3   seconds into the sending when the blink / signal comes
#   DOWN=1          seconds a killed or drained node stays down before it is restarted
#   DRAIN_S=5       the gateway's server.drain_s (SIGTERM: 1001 closes spread over it)
#   SIGNALS         single: "TERM KILL" (after the blink run); cluster: "KILL"
#                   (add TERM for a drain of node b)
#   NO_BUILD=1      use the release binaries as they are
#
# The room chat budget is switched off (GATEWAY_ROOM__MAX_CHAT_PER_S=0,
# GATEWAY_ROOM__MAX_CHAT_BYTES_PER_S=0): sampled-out chat is acked but never broadcast and
# would count as missing for every viewer.
#
# Open files: every process gets `ulimit -n $(ulimit -Hn)` (20,000 on the reference box).
# The tool needs VIEWERS + SENDERS + ~50 descriptors, a node as many as it holds
# connections (all of them, once the other node is down) + the handshakes in flight; so
# up to ~19,000 viewers fit one tool process and one node. Above that, run several tool
# processes against the same --room (each accounts its own viewers and chats).
set -u
ulimit -n "$(ulimit -Hn)"
cd "$(dirname "$0")/.."

MODE=${1:-single}
VIEWERS=${VIEWERS:-10000}
DURATION=${DURATION:-30}
RATE=${RATE:-20}
SENDERS=${SENDERS:-$(python3 -c "import math; print(max(1, math.ceil(2 * $RATE)))")}
AT=${AT:-$(python3 -c "print(round($DURATION / 3, 1))")}
DOWN=${DOWN:-1}
DRAIN_S=${DRAIN_S:-5}
GWBIN=./target/release/danmaku-gateway
LT=./target/release/loadtest
SOURCES=127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.7,127.0.0.8

if [ -z "${NO_BUILD:-}" ]; then
  cargo build --release -p danmaku-gateway -p loadtest || exit 2
fi
TMP=$(mktemp -d)
echo "logs and reports in $TMP"

# On exit, whatever this script started and is still running (its own jobs only).
cleanup() {
  for p in $(jobs -pr); do
    kill -KILL "$p" 2>/dev/null
  done
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_http() { # port
  for _ in $(seq 1 100); do
    curl -sf -o /dev/null "http://127.0.0.1:$1/healthz" && return 0
    sleep 0.1
  done
  echo "gateway on port $1 did not come up" >&2
  return 1
}

# start_gw NAME PORT [VAR=VALUE...]: starts a gateway; its pid in GW_PID.
start_gw() {
  local name=$1 port=$2
  shift 2
  mkdir -p "$TMP/data-$name"
  env GATEWAY_SERVER__LISTEN="127.0.0.1:$port" GATEWAY_DATA__DIR="$TMP/data-$name" \
    GATEWAY_ROOM__MAX_CHAT_PER_S=0 GATEWAY_ROOM__MAX_CHAT_BYTES_PER_S=0 \
    GATEWAY_SERVER__DRAIN_S="$DRAIN_S" "$@" "$GWBIN" >>"$TMP/gw-$name.log" 2>&1 &
  GW_PID=$!
  wait_http "$port"
}

# start_lt LABEL TARGETS [ARGS...]: starts the tool in the background; its pid in LT_PID.
start_lt() {
  local label=$1 targets=$2
  shift 2
  "$LT" --json reconnect --target "$targets" --viewers "$VIEWERS" --senders "$SENDERS" \
    --rate "$RATE" --duration "$DURATION" --sources "$SOURCES" --pid-file "$TMP/pids" \
    "$@" >"$TMP/$label.json" 2>"$TMP/$label.err" &
  LT_PID=$!
}

# Waits until the tool's sending started, then AT seconds more.
wait_for_sending() {
  for _ in $(seq 1 3000); do
    grep -q "sending started" "$TMP/$1.err" && { sleep "$AT"; return 0; }
    kill -0 "$LT_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "$1: the tool never started sending (see $TMP/$1.err)" >&2
  return 1
}

summary() { # label
  python3 - "$TMP/$1.json" "$1" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print(sys.argv[2], "no report:", e); sys.exit(0)
rt, rj, c, d = r["reconnect_time"], r["rejoins"], r["chats"], r["delivery"]
print(f"== {sys.argv[2]}: {'PASS' if r['passed'] else 'FAIL'}  ({r['viewers_joined']} viewers, "
      f"{r['senders']} senders, {r['rate']} chats/s, {r['duration_s']} s)")
print(f"  disconnects {r['disconnects_total']} {r['disconnects']}")
print(f"  reconnects {r['reconnects']}  time p50 {rt['p50_ms']} p90 {rt['p90_ms']} "
      f"p99 {rt['p99_ms']} max {rt['max_ms']} ms")
print(f"  recovered true {rj['recovered_true']} false {rj['recovered_false']} "
      f"absent {rj['recovered_absent']} without since {rj['without_since']}; "
      f"chats from history {rj['chats_from_history']}")
print(f"  join failures {r['join_failures']}  refusals {r['refusals']}  "
      f"connected at end {r['viewers_connected_at_end']}/{r['viewers_joined']}")
print(f"  chats sent {c['sent']} acked {c['acked']} errors {c['errors']} unanswered "
      f"{c['unanswered']} send failures {c['send_failures']}; acked but seen by nobody "
      f"{d['acked_never_delivered']}; sampled out {r['sampled_out']['total']}")
for name, g in r["groups"].items():
    print(f"  {name:22} viewers {g['viewers']:6}  missing {g['missing']} "
          f"({g['viewers_missing_some']} viewers, max {g['max_missing']})  duplicates "
          f"{g['duplicates']} ({g['viewers_with_duplicates']} viewers)")
    if g["sample"] and name in ("never_disconnected", "recovered_every_time"):
        print(f"  {'':22} e.g. {', '.join(g['sample'])}")
for p in (r.get("gateways") or {}).get("processes", []):
    print(f"  gateway pid {p['pid']}{' (new)' if p['started_during_run'] else ''}: cpu "
          f"{p['cpu_s']} s, rss {p['rss_after_bytes'] / 2**20:.1f} MiB, peak "
          f"{p['hwm_after_bytes'] / 2**20:.1f} MiB")
PY
}

run_single() {
  local port
  port=$(free_port)
  local url="ws://127.0.0.1:$port/ws"
  start_gw single "$port" || exit 1
  echo "$GW_PID" >"$TMP/pids"

  echo "-- single: blink at $AT s"
  start_lt single-blink "$url" --blink-at "$AT"
  wait "$LT_PID"
  summary single-blink

  for sig in ${SIGNALS:-TERM KILL}; do
    local label="single-$(echo "$sig" | tr 'A-Z' 'a-z')"
    echo "-- single: SIG$sig at $AT s, back after ${DOWN} s"
    start_lt "$label" "$url"
    if wait_for_sending "$label"; then
      kill -"$sig" "$GW_PID"
      wait "$GW_PID" 2>/dev/null
      sleep "$DOWN"
      start_gw single "$port"
      echo "$GW_PID" >"$TMP/pids"
    fi
    wait "$LT_PID"
    summary "$label"
  done
  kill -TERM "$GW_PID" && wait "$GW_PID" 2>/dev/null
}

run_cluster() {
  local rport pa pb
  rport=$(free_port)
  redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no \
    >"$TMP/redis.log" 2>&1 &
  local redis_pid=$!
  for _ in $(seq 1 50); do
    redis-cli -p "$rport" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  pa=$(free_port)
  pb=$(free_port)
  local cluster=(GATEWAY_BACKPLANE=redis "GATEWAY_REDIS__URL=redis://127.0.0.1:$rport")
  start_gw a "$pa" "${cluster[@]}" GATEWAY_SERVER__NODE_ID=a || exit 1
  local a_pid=$GW_PID
  start_gw b "$pb" "${cluster[@]}" GATEWAY_SERVER__NODE_ID=b || exit 1
  local b_pid=$GW_PID
  printf '%s\n%s\n' "$a_pid" "$b_pid" >"$TMP/pids"
  local targets="ws://127.0.0.1:$pa/ws,ws://127.0.0.1:$pb/ws"

  for sig in ${SIGNALS:-KILL}; do
    local label="cluster-$(echo "$sig" | tr 'A-Z' 'a-z')"
    echo "-- cluster: node b SIG$sig at $AT s, back after ${DOWN} s"
    start_lt "$label" "$targets"
    if wait_for_sending "$label"; then
      kill -"$sig" "$b_pid"
      wait "$b_pid" 2>/dev/null
      sleep "$DOWN"
      start_gw b "$pb" "${cluster[@]}" GATEWAY_SERVER__NODE_ID=b
      b_pid=$GW_PID
      printf '%s\n%s\n' "$a_pid" "$b_pid" >"$TMP/pids"
    fi
    wait "$LT_PID"
    summary "$label"
  done
  kill -TERM "$a_pid" "$b_pid"
  wait "$a_pid" "$b_pid" 2>/dev/null
  kill -TERM "$redis_pid" && wait "$redis_pid" 2>/dev/null
}

case "$MODE" in
  single) run_single ;;
  cluster) run_cluster ;;
  all) run_single; run_cluster ;;
  *) echo "usage: $0 single|cluster|all" >&2; exit 2 ;;
esac
