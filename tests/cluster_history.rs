//! `joined.history` in a cluster: the first viewer of a room on a node gets the room's
//! recent events as every node published them, not only what that node saw.

mod support;

use serde_json::{Value, json};
use support::{RedisServer, redis_node, relax_rate_limits, wait_until};

fn texts(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["text"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test]
async fn first_viewer_on_another_node_gets_the_rooms_history() {
    let redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", |c| {
        relax_rate_limits(c);
        c.room.history_len = 4;
        // The cluster log then keeps exactly the history.
        c.room.recovery_len = 0;
    })
    .await;
    let b = redis_node(&redis.url(), "node-b", |c| {
        relax_rate_limits(c);
        c.room.history_len = 4;
        // The cluster log then keeps exactly the history.
        c.room.recovery_len = 0;
    })
    .await;

    let mut alice = a.user("alice", "").await;
    alice.join("hist").await;
    for i in 0..5 {
        let r = alice
            .call(json!({"op":"chat","room":"hist","text":format!("c{i}")}), i)
            .await;
        assert_eq!(r["op"], "ack", "{r}");
    }
    let (status, _) = a
        .api(
            "POST",
            "/api/v1/rooms/hist/events",
            Some(&json!({"type":"system","text":"s"})),
        )
        .await;
    assert_eq!(status, 202);
    alice
        .events_until("hist", |e| e.iter().any(|e| e["text"] == "s"))
        .await;
    // Kept in Redis: the last history_len events, with an expiry.
    let log = "danmaku:log:{danmaku:room:hist}";
    wait_until("the room's log holds the window", async || {
        redis.cli(&["LLEN", log]) == "4"
    })
    .await;
    for key in [
        log,
        "danmaku:logseq:{danmaku:room:hist}",
        "danmaku:logidx:{danmaku:room:hist}",
    ] {
        let ttl: i64 = redis.cli(&["PTTL", key]).parse().unwrap();
        assert!(ttl > 0, "{key} expires ({ttl})");
    }
    // Trimmed entries leave the index too.
    assert_eq!(
        redis.cli(&["HLEN", "danmaku:logidx:{danmaku:room:hist}"]),
        "4"
    );

    // Node B has never had a member of the room.
    let mut bob = b.client("").await;
    let joined = bob
        .call(json!({"op":"join","room":"hist","history":100}), 1)
        .await;
    assert_eq!(joined["op"], "joined", "{joined}");
    let history = joined["history"].as_array().unwrap();
    assert_eq!(texts(history), ["c2", "c3", "c4", "s"]);
    assert!(history.iter().all(|e| e["type"] != "presence"));
    assert_eq!(history[0]["user"]["id"], "alice");

    // `history` still picks the newest n.
    let mut carol = b.client("").await;
    let joined = carol
        .call(json!({"op":"join","room":"hist","history":2}), 1)
        .await;
    assert_eq!(texts(joined["history"].as_array().unwrap()), ["c4", "s"]);

    // What comes next arrives live, once, and not again as history.
    support::until_linked(&mut alice, &mut bob, "hist", "link").await;
    let r = alice
        .call(json!({"op":"chat","room":"hist","text":"live"}), 9)
        .await;
    assert_eq!(r["op"], "ack");
    let events = bob
        .events_until("hist", |e| e.iter().any(|e| e["text"] == "live"))
        .await;
    let live: Vec<&Value> = events.iter().filter(|e| e["text"] == "live").collect();
    assert_eq!(live.len(), 1);
    assert!(
        events
            .iter()
            .all(|e| !["c2", "c3", "c4", "s"].contains(&e["text"].as_str().unwrap_or(""))),
        "no history event is delivered again: {events:?}"
    );
    a.stop().await;
    b.stop().await;
}

/// `joined` is the first frame of a room a joiner gets: nothing the join waits on
/// (open red packets, other nodes' counts and history in Redis) lets a `batch` of the
/// room overtake it.
#[tokio::test]
async fn joined_comes_before_the_rooms_batches() {
    let redis = RedisServer::start();
    let node = redis_node(&redis.url(), "node-a", |c| {
        relax_rate_limits(c);
        c.room.batch_ms = 5;
    })
    .await;
    let (status, body) = node
        .api(
            "POST",
            "/api/v1/rooms/busy/redpackets",
            Some(&json!({"total": 500, "shares": 5, "sender": {"id":"boss","name":"Boss"}})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let stop = tokio_util::sync::CancellationToken::new();
    let feeder = {
        let addr = node.addr;
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let body = json!({"type":"system","text":"tick"}).to_string();
                support::http(
                    addr,
                    "POST",
                    "/api/v1/rooms/busy/events",
                    Some(support::API_TOKEN),
                    Some(&body),
                )
                .await;
            }
        })
    };
    for round in 0..40 {
        let mut c = node.client("").await;
        c.send(json!({"op":"join","room":"busy","ref":1})).await;
        loop {
            let v = c.recv().await;
            assert!(
                !(v["op"] == "batch" && v["room"] == "busy"),
                "round {round}: a batch of the room came before `joined`: {v}"
            );
            if v["op"] == "joined" {
                assert_eq!(v["redpackets"].as_array().unwrap().len(), 1, "{v}");
                break;
            }
        }
        c.close().await;
    }
    stop.cancel();
    feeder.await.unwrap();
    node.stop().await;
}
