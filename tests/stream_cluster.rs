//! The event stream in a cluster (PROTOCOL.md v1.1, *Event stream for the backend*):
//! Redis Streams in a real `redis-server`, each event written once per cluster by the
//! node that accepted it, keys spread by room, and a Redis outage that queues records
//! up to `stream.queue`, drops (and counts) the rest, then lets them flow.

mod support;

use std::collections::{HashMap, HashSet};

use serde_json::{Value, json};
use support::{RedisServer, metric, redis_node, relax_rate_limits, wait_until};

/// Every entry of stream `key` as field → value maps (via redis-cli's raw output).
fn entries(redis: &RedisServer, key: &str) -> Vec<HashMap<String, String>> {
    let out = redis.cli(&["XRANGE", key, "-", "+"]);
    // Raw output: entry id, then field and value lines, for each entry.
    let lines: Vec<&str> = out.lines().collect();
    let mut all = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        // An entry id looks like 1733450000000-0.
        if lines[i].contains('-') && lines[i].split('-').all(|p| p.parse::<u64>().is_ok()) {
            let mut m = HashMap::new();
            i += 1;
            while i + 1 < lines.len()
                && !(lines[i].contains('-')
                    && lines[i].split('-').all(|p| p.parse::<u64>().is_ok()))
            {
                m.insert(lines[i].to_owned(), lines[i + 1].to_owned());
                i += 2;
            }
            all.push(m);
        } else {
            i += 1;
        }
    }
    all
}

fn streaming(cfg: &mut danmaku_gateway::config::Config) {
    relax_rate_limits(cfg);
    cfg.stream.enabled = true;
}

#[tokio::test]
async fn every_event_is_written_once_by_the_node_that_accepted_it() {
    let redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", streaming).await;
    let b = redis_node(&redis.url(), "node-b", streaming).await;
    let mut alice = a.user("alice", "room=r").await;
    alice.recv_op("joined").await;
    let mut bob = b.user("bob", "room=r").await;
    bob.recv_op("joined").await;
    let r = alice
        .call(json!({"op":"chat","room":"r","text":"from a"}), 1)
        .await;
    assert_eq!(r["op"], "ack");
    let (st, sys) = b
        .api(
            "POST",
            "/api/v1/rooms/r/events",
            Some(&json!({"type":"system","text":"from b"})),
        )
        .await;
    assert_eq!(st, 202);
    // Both nodes delivered both events.
    bob.events_until("r", |e| e.iter().any(|e| e["text"] == "from a"))
        .await;
    alice
        .events_until("r", |e| e.iter().any(|e| e["text"] == "from b"))
        .await;
    wait_until("both records in the stream", async || {
        entries(&redis, "danmaku:events").len() >= 2
    })
    .await;
    // A little longer: a second copy would come now if either node wrote the other's.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let all = entries(&redis, "danmaku:events");
    assert_eq!(all.len(), 2, "{all:?}");
    let chat = all.iter().find(|e| e["type"] == "chat").unwrap();
    assert_eq!(
        (
            chat["node"].as_str(),
            chat["status"].as_str(),
            chat["room"].as_str()
        ),
        ("node-a", "broadcast", "r")
    );
    let event: Value = serde_json::from_str(&chat["event"]).unwrap();
    assert_eq!(event["text"], "from a");
    assert_eq!(event["id"].as_str(), Some(chat["id"].as_str()));
    let system = all.iter().find(|e| e["type"] == "system").unwrap();
    assert_eq!(system["node"], "node-b");
    assert_eq!(Some(system["id"].as_str()), sys["id"].as_str());
    assert!(system["ts"].parse::<u64>().unwrap() > 0);
    drop((alice, bob));
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn stream_shards_spread_rooms_over_keys() {
    let redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", |c| {
        streaming(c);
        c.stream.shards = 4;
    })
    .await;
    let mut ids = HashSet::new();
    for i in 0..40 {
        let (st, v) = a
            .api(
                "POST",
                &format!("/api/v1/rooms/room-{i}/events"),
                Some(&json!({"type":"system","text":"x"})),
            )
            .await;
        assert_eq!(st, 202);
        ids.insert(v["id"].as_str().unwrap().to_owned());
    }
    let keys = || (0..4).map(|n| format!("danmaku:events:{n}"));
    wait_until("all 40 records written", async || {
        keys().map(|k| entries(&redis, &k).len()).sum::<usize>() == 40
    })
    .await;
    let mut seen = HashSet::new();
    let mut used = 0;
    for (n, key) in keys().enumerate() {
        let es = entries(&redis, &key);
        used += usize::from(!es.is_empty());
        for e in es {
            assert!(seen.insert(e["id"].clone()), "twice: {e:?}");
            let room = &e["room"];
            assert_eq!(
                danmaku_gateway::stream::shard_of(room, 4) as usize,
                n,
                "{room} in the wrong key"
            );
        }
    }
    assert_eq!(seen, ids);
    assert!(used >= 3, "rooms spread over the keys ({used} used)");
    assert_eq!(redis.cli(&["EXISTS", "danmaku:events"]), "0");
    a.stop().await;
}

#[tokio::test]
async fn a_dead_redis_queues_records_up_to_the_bound_then_they_flow() {
    let mut redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", |c| {
        streaming(c);
        c.stream.queue = 5;
    })
    .await;
    let (st, _) = a
        .api(
            "POST",
            "/api/v1/rooms/r/events",
            Some(&json!({"type":"system","text":"before"})),
        )
        .await;
    assert_eq!(st, 202);
    wait_until("the first record is written", async || {
        entries(&redis, "danmaku:events").len() == 1
    })
    .await;

    redis.kill();
    // The room keeps working without Redis; the stream queues 5 and drops the rest.
    for i in 0..20 {
        let (st, _) = a
            .api(
                "POST",
                "/api/v1/rooms/r/events",
                Some(&json!({"type":"system","text":format!("during {i}")})),
            )
            .await;
        assert_eq!(st, 202);
    }
    wait_until(
        "records beyond the queue are dropped and counted",
        async || metric(a.addr, "danmaku_stream_dropped_total").await >= 14.0,
    )
    .await;
    assert!(metric(a.addr, "danmaku_stream_errors_total").await >= 1.0);

    redis.restart();
    // The restarted Redis is empty: the 5 queued records arrive, then new ones.
    wait_until("the queued records flow once Redis is back", async || {
        entries(&redis, "danmaku:events").len() >= 5
    })
    .await;
    let texts: Vec<String> = entries(&redis, "danmaku:events")
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(&e["event"]).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        &texts[..5],
        ["during 0", "during 1", "during 2", "during 3", "during 4"]
    );
    a.stop().await;
}
