//! Redis dies under live traffic and comes back on the same port (empty): local rooms
//! keep working, `/readyz` tells the truth, Redis-backed grabs answer `busy`, nothing
//! panics, and afterwards the nodes reconnect and re-subscribe the rooms they hold
//! without any client rejoining — with the reconnects and drops counted in `/metrics`.

mod support;

use std::time::Duration;

use danmaku_gateway::config::Config;
use serde_json::{Value, json};
use support::{
    Gateway, RedisServer, http, metric_in, metrics_text, online, redis_node, relax_rate_limits,
    until_linked, wait_for,
};

const SUB_RECONNECTS: &str = r#"danmaku_redis_reconnects_total{conn="subscriber"}"#;
const CMD_RECONNECTS: &str = r#"danmaku_redis_reconnects_total{conn="command"}"#;
const DROPPED: &str = "danmaku_backplane_dropped_total";

fn numsub(redis: &RedisServer, room: &str) -> u64 {
    let channel = format!("danmaku:room:{room}");
    let out = redis.cli(&["PUBSUB", "NUMSUB", &channel]);
    out.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0)
}

async fn readyz(gw: &Gateway) -> (u16, Value) {
    http(gw.addr, "GET", "/readyz", None, None).await
}

async fn create_packet(gw: &Gateway, room: &str, total: u64, shares: u32) -> (u16, Value) {
    gw.api(
        "POST",
        &format!("/api/v1/rooms/{room}/redpackets"),
        Some(&json!({"total": total, "shares": shares, "sender": {"id":"boss","name":"Boss"}})),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_keeps_local_rooms_then_nodes_resubscribe() {
    let mut redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", |cfg: &mut Config| {
        relax_rate_limits(cfg);
        // A tiny publish queue, so an outage overflows it (and counts the drops).
        cfg.redis.publish_queue = 2;
    })
    .await;
    let b = redis_node(&redis.url(), "node-b", relax_rate_limits).await;
    let room = "live";
    let mut alice = a.user("alice", "").await;
    let mut dave = a.user("dave", "").await;
    let mut bob = b.user("bob", "").await;
    for c in [&mut alice, &mut dave, &mut bob] {
        c.join(room).await;
    }
    wait_for(Duration::from_secs(10), "both nodes subscribed", || async {
        numsub(&redis, room) == 2
    })
    .await;
    until_linked(&mut alice, &mut bob, room, "before").await;
    until_linked(&mut bob, &mut alice, room, "before-back").await;
    let (st, created) = create_packet(&a, room, 500, 5).await;
    assert_eq!(st, 201, "{created}");
    let doomed = created["packet"].as_str().unwrap().to_string();
    let (ready, body) = readyz(&a).await;
    assert_eq!(
        (ready, &body["backplane"]["up"]),
        (200, &json!(true)),
        "{body}"
    );

    let m0 = metrics_text(a.addr).await;

    // --- Redis dies mid-traffic.
    redis.kill();
    for gw in [&a, &b] {
        wait_for(
            Duration::from_secs(10),
            "/readyz to report the backplane down",
            || async {
                let (st, body) = readyz(gw).await;
                st == 200 && body["backplane"]["up"] == false
            },
        )
        .await;
        let (st, body) = readyz(gw).await;
        assert_eq!(
            st, 200,
            "redis.required = false keeps the node ready: {body}"
        );
        assert_eq!(
            body,
            json!({"status":"degraded","backplane":{"kind":"redis","up":false}})
        );
        let (st, _) = http(gw.addr, "GET", "/healthz", None, None).await;
        assert_eq!(st, 200);
    }

    // Local rooms keep working: alice's chats reach dave (same node) and herself, once
    // each window; more windows than the publish queue holds, so some are dropped.
    for i in 0..10 {
        let r = alice
            .call(
                json!({"op":"chat","room":room,"text":format!("during-{i}")}),
                100 + i,
            )
            .await;
        assert_eq!(r["op"], "ack", "{r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = dave
        .events_until(room, |ev| ev.iter().any(|e| e["text"] == "during-9"))
        .await;
    let during: Vec<&Value> = got
        .iter()
        .filter(|e| e["type"] == "chat" && e["text"].as_str().unwrap_or("").starts_with("during-"))
        .collect();
    assert_eq!(during.len(), 10, "dave: {got:?}");
    // A newcomer can connect and join during the outage, and hears the room.
    let mut carol = a.user("carol", "").await;
    let joined = carol.join(room).await;
    assert_eq!(joined["room"], room);
    alice
        .call(json!({"op":"chat","room":room,"text":"hi carol"}), 200)
        .await;
    carol
        .events_until(room, |ev| ev.iter().any(|e| e["text"] == "hi carol"))
        .await;

    // Redis-backed red packets: a grab answers `busy` (never a guess), creating fails.
    let mut grabber = a.user("grabber", "").await;
    grabber.join(room).await;
    let r = grabber
        .call(json!({"op":"grab","room":room,"packet":doomed}), 300)
        .await;
    assert_eq!(r["code"], "busy", "{r}");
    let (st, body) = create_packet(&a, room, 100, 2).await;
    assert_eq!(st, 503, "{body}");
    assert_eq!(body["code"], "unavailable", "{body}");

    // --- Redis comes back, empty, on the same port.
    redis.restart();
    for gw in [&a, &b] {
        wait_for(
            Duration::from_secs(20),
            "/readyz to report the backplane up again",
            || async {
                let (st, body) = readyz(gw).await;
                st == 200 && body["backplane"]["up"] == true
            },
        )
        .await;
    }
    // Both nodes re-subscribed the room they hold, nobody rejoined.
    wait_for(
        Duration::from_secs(15),
        "both nodes re-subscribed",
        || async { numsub(&redis, room) == 2 },
    )
    .await;
    until_linked(&mut alice, &mut bob, room, "after").await;
    until_linked(&mut bob, &mut alice, room, "after-back").await;
    // Presence is rebuilt in the empty Redis: alice, dave, carol and grabber on A, bob
    // on B.
    wait_for(Duration::from_secs(10), "presence rebuilt", || async {
        online(&a, room).await == 5 && online(&b, room).await == 5
    })
    .await;

    // Counted: both connections of both nodes reconnected; envelopes were dropped.
    let m1 = metrics_text(a.addr).await;
    let delta = |series: &str| metric_in(&m1, series) - metric_in(&m0, series);
    assert!(
        delta(SUB_RECONNECTS) >= 2.0,
        "subscriber reconnects +{}",
        delta(SUB_RECONNECTS)
    );
    assert!(
        delta(CMD_RECONNECTS) >= 2.0,
        "command reconnects +{}",
        delta(CMD_RECONNECTS)
    );
    assert!(delta(DROPPED) >= 1.0, "dropped +{}", delta(DROPPED));

    // The old packet died with the non-persistent Redis; a new one works across nodes.
    let (st, created) = create_packet(&b, room, 1000, 2).await;
    assert_eq!(st, 201, "{created}");
    let packet = created["packet"].as_str().unwrap().to_string();
    let r1 = grabber
        .call(json!({"op":"grab","room":room,"packet":packet}), 400)
        .await;
    let r2 = bob
        .call(json!({"op":"grab","room":room,"packet":packet}), 401)
        .await;
    assert_eq!(r1["op"], "ack", "{r1}");
    assert_eq!(r2["op"], "ack", "{r2}");
    assert_eq!(
        r1["amount"].as_u64().unwrap() + r2["amount"].as_u64().unwrap(),
        1000
    );
    drop((alice, dave, bob, carol, grabber));
    // stop() re-raises any panic of the server tasks.
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_redis_turns_readyz_503_while_down() {
    let mut redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-req", |cfg: &mut Config| {
        relax_rate_limits(cfg);
        cfg.redis.required = true;
    })
    .await;
    wait_for(Duration::from_secs(10), "ready", || async {
        readyz(&a).await.0 == 200
    })
    .await;
    let (_, body) = readyz(&a).await;
    assert_eq!(
        body,
        json!({"status":"ready","backplane":{"kind":"redis","up":true}})
    );
    let mut alice = a.user("alice", "").await;
    let mut dave = a.user("dave", "").await;
    alice.join("req").await;
    dave.join("req").await;

    redis.kill();
    wait_for(Duration::from_secs(10), "503 from /readyz", || async {
        readyz(&a).await.0 == 503
    })
    .await;
    let (st, body) = readyz(&a).await;
    assert_eq!(st, 503);
    assert_eq!(body["code"], "unavailable", "{body}");
    assert_eq!(
        body["backplane"],
        json!({"kind":"redis","up":false}),
        "{body}"
    );
    // Alive, and still serving its local rooms.
    assert_eq!(http(a.addr, "GET", "/healthz", None, None).await.0, 200);
    let r = alice
        .call(json!({"op":"chat","room":"req","text":"still here"}), 1)
        .await;
    assert_eq!(r["op"], "ack", "{r}");
    dave.events_until("req", |ev| ev.iter().any(|e| e["text"] == "still here"))
        .await;

    redis.restart();
    wait_for(Duration::from_secs(20), "ready again", || async {
        readyz(&a).await.0 == 200
    })
    .await;
    let (_, body) = readyz(&a).await;
    assert_eq!(body["backplane"]["up"], true, "{body}");
    drop((alice, dave));
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_started_during_outage_serves_locally_and_joins_later() {
    let mut redis = RedisServer::start();
    let b = redis_node(&redis.url(), "node-early", relax_rate_limits).await;
    let room = "late";
    let mut bob = b.user("bob", "").await;
    bob.join(room).await;
    wait_for(Duration::from_secs(10), "B subscribed", || async {
        numsub(&redis, room) == 1
    })
    .await;
    redis.kill();
    // A starts while Redis is unreachable: it must come up and serve.
    let a = redis_node(&redis.url(), "node-late", relax_rate_limits).await;
    let (st, body) = readyz(&a).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["backplane"]["up"], false, "{body}");
    let mut alice = a.user("alice", "").await;
    let mut dave = a.user("dave", "").await;
    alice.join(room).await;
    dave.join(room).await;
    alice
        .call(json!({"op":"chat","room":room,"text":"local only"}), 1)
        .await;
    dave.events_until(room, |ev| ev.iter().any(|e| e["text"] == "local only"))
        .await;

    redis.restart();
    wait_for(Duration::from_secs(20), "both subscribed", || async {
        numsub(&redis, room) == 2
    })
    .await;
    until_linked(&mut alice, &mut bob, room, "joined-up").await;
    until_linked(&mut bob, &mut dave, room, "and-back").await;
    drop((alice, dave, bob));
    a.stop().await;
    b.stop().await;
}
