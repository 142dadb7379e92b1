#!/bin/bash
# Hot room CPU per delivered event: filters off vs 10,000 block words (issue 12).
# Gateway pinned to core 0, load tool to core 1 (--threads 1). Needs release builds:
#   cargo build --release --workspace
set -e
ulimit -n $(ulimit -Hn)
cd "$(dirname "$0")/.."
TMP=$(mktemp -d)
GWBIN=./target/release/danmaku-gateway
LT=./target/release/loadtest
python3 - > $TMP/words.json <<'PY'
import json, random
random.seed(7)
latin='abcdefghijklmnopqrstuvwxyz'
words=set()
while len(words)<10000:
    k=random.random()
    if k<0.4: w=''.join(random.choice(latin) for _ in range(random.randint(5,10)))
    elif k<0.8: w=''.join(chr(random.randint(0x4e00,0x9fa5)) for _ in range(random.randint(2,4)))
    else: w=''.join(random.choice(latin) for _ in range(3))+chr(random.randint(0x4e00,0x9fa5))+chr(random.randint(0x1f600,0x1f64f))
    words.add(w)
print(json.dumps({"block":sorted(words),"mask":[]}))
PY
run() {
  label=$1; words=$2; port=$3
  rm -rf $TMP/data-$port; mkdir -p $TMP/data-$port
  GATEWAY_SERVER__LISTEN=127.0.0.1:$port GATEWAY_DATA__DIR=$TMP/data-$port taskset -c 0 $GWBIN > $TMP/gw-$port.log 2>&1 &
  GW=$!
  sleep 1.5
  if [ "$words" = yes ]; then
    curl -sf -X PUT localhost:$port/api/v1/filters -H 'Authorization: Bearer dev-api-token-change-me' --data-binary @$TMP/words.json -o /dev/null -w "filters PUT %{http_code}\n"
    sleep 1
  fi
  echo "== $label RSS before load: $(grep VmRSS /proc/$GW/status)"
  taskset -c 1 $LT --threads 1 --json fanout --target ws://127.0.0.1:$port/ws --conns 5000 --rooms 1 --senders 100 --rate 100 --duration 20 --pid $GW > $TMP/lt-$label.json || true
  python3 - "$TMP/lt-$label.json" "$label" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
g, d = r['usage']['gateway'], r['deliveries']
print(sys.argv[2], 'delivered', d['delivered'], 'ratio', d['ratio'], 'cpu_s', g['cpu_s'],
      'us/event %.3f' % (g['cpu_s'] * 1e6 / max(d['delivered'], 1)),
      'p99', r['latency']['p99_ms'], 'rss_before_MiB %.1f' % (g['rss_before_bytes'] / 2**20))
PY
  kill -TERM $GW; wait $GW || true
}
for i in 1 2; do
  run off-$i no 18101
  run words-$i yes 18102
done
