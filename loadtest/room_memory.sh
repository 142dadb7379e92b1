#!/bin/bash
# Memory one hot room's recovery log costs, on the node and in Redis: 100 rooms, each
# filled past room.recovery_len (1000) with the load tool's chats (~225-byte log entries).
#   loadtest/room_memory.sh          (release builds; redis-server on PATH)
set -u
ulimit -n $(ulimit -Hn)
cd "$(dirname "$0")/.."
. loadtest/bench_lib.sh
GW=./target/release/danmaku-gateway; LT=./target/release/loadtest
rport=$(free_port)
port=$(free_port)
D=$(mktemp -d)
redis-server --port $rport --save '' --appendonly no --dir $D > $D/redis.log 2>&1 & rpid=$!
sleep 0.5
GATEWAY_BACKPLANE=redis GATEWAY_REDIS__URL=redis://127.0.0.1:$rport GATEWAY_SERVER__LISTEN=127.0.0.1:$port GATEWAY_DATA__DIR=$D \
 GATEWAY_ROOM__MAX_CHAT_PER_S=0 GATEWAY_ROOM__MAX_CHAT_BYTES_PER_S=0 GATEWAY_RATELIMIT__CHAT__RATE=100 GATEWAY_RATELIMIT__CHAT__BURST=100 RUST_LOG=warn \
 $GW > $D/gw.log 2>&1 & gw=$!
for _ in $(seq 100); do curl -sf localhost:$port/healthz >/dev/null && break; sleep 0.1; done
rss() { awk '/VmRSS/ {print $2}' /proc/$gw/status; }
m0=$(redis-cli -p $rport INFO memory | awk -F: '/^used_memory:/ {print $2+0}')
r0=$(rss)
$LT --json fanout --target ws://127.0.0.1:$port/ws --conns 100 --rooms 100 --senders 500 --rate 2500 --duration 45 > $D/report.json 2> $D/lt.err
sleep 2
r1=$(rss)
m1=$(redis-cli -p $rport INFO memory | awk -F: '/^used_memory:/ {print $2+0}')
echo "node RSS before $r0 KiB after $r1 KiB: delta per room $(( (r1 - r0) / 100 )) KiB"
echo "redis used_memory before $m0 after $m1: per room $(( (m1 - m0) / 100 )) bytes"
redis-cli -p $rport --scan --pattern 'danmaku:log*' | head -3
k=$(redis-cli -p $rport --scan --pattern 'danmaku:log:*' | head -1)
room=${k#danmaku:log:}
for key in "danmaku:log:$room" "danmaku:logidx:$room" "danmaku:logseq:$room"; do
  echo "$key: $(redis-cli -p $rport TYPE "$key"), MEMORY USAGE $(redis-cli -p $rport MEMORY USAGE "$key" SAMPLES 0) bytes"
done
echo "log entries: $(redis-cli -p $rport LLEN "danmaku:log:$room"), the last one $(redis-cli -p $rport LINDEX "danmaku:log:$room" -1 | wc -c) bytes"
curl -s localhost:$port/metrics | grep -E "^danmaku_events_total|^danmaku_rooms " | head
python3 -c "import json; r=json.load(open('$D/report.json')); print('chats acked', r['chats']['acked'])"
kill $gw; wait $gw; kill $rpid
