//! Two nodes on one Redis: a chat on one reaches members on the other.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{RedisServer, redis_node, wait_for};

#[tokio::test]
async fn chat_crosses_nodes_and_presence_sums() {
    let redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", |_| {}).await;
    let b = redis_node(&redis.url(), "node-b", |_| {}).await;
    let mut alice = a.user("alice", "").await;
    let mut bob = b.user("bob", "").await;
    alice.join("x").await;
    bob.join("x").await;
    // Subscriptions are asynchronous: wait until a's events reach b.
    let mut n = 0;
    let mut got = false;
    for _ in 0..50 {
        n += 1;
        alice
            .send(json!({"op":"chat","room":"x","text":format!("hello {n}")}))
            .await;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
        while tokio::time::Instant::now() < deadline {
            if let Ok(v) = tokio::time::timeout(Duration::from_millis(50), bob.recv()).await
                && v["op"] == "batch"
                && v["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|e| e["type"] == "chat" && e["user"]["id"] == "alice")
            {
                got = true;
                break;
            }
        }
        if got {
            break;
        }
        tokio::time::sleep(Duration::from_millis(900)).await; // chat budget 1/s
    }
    assert!(got, "chat from node a never reached node b");
    wait_for(Duration::from_secs(5), "online 2 on both nodes", || async {
        let (_, ra) = a.api("GET", "/api/v1/rooms/x", None).await;
        let (_, rb) = b.api("GET", "/api/v1/rooms/x", None).await;
        ra["online"] == 2 && rb["online"] == 2
    })
    .await;
    let (_, ready) = a.api("GET", "/readyz", None).await;
    assert_eq!(ready["backplane"], json!({"kind":"redis","up":true}));
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn redis_red_packet_across_nodes() {
    let redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", |_| {}).await;
    let b = redis_node(&redis.url(), "node-b", |_| {}).await;
    let (st, created) = a
        .api(
            "POST",
            "/api/v1/rooms/rp/redpackets",
            Some(&json!({"total": 1000, "shares": 3, "sender": {"id":"boss","name":"Boss"}})),
        )
        .await;
    assert_eq!(st, 201, "{created}");
    let packet = created["packet"].as_str().unwrap().to_string();
    let mut total = 0;
    for (i, gw) in [&a, &b, &a, &b].into_iter().enumerate() {
        let mut c = gw.user(&format!("u{i}"), "").await;
        let j = c.join("rp").await;
        let r = c
            .call(json!({"op":"grab","room":"rp","packet":packet}), 1)
            .await;
        if i < 3 {
            assert_eq!(r["op"], "ack", "{r} {j}");
            total += r["amount"].as_u64().unwrap();
            let again = c
                .call(json!({"op":"grab","room":"rp","packet":packet}), 2)
                .await;
            assert_eq!(again["code"], "already_grabbed");
        } else {
            assert_eq!(r["code"], "packet_empty", "{r}");
        }
    }
    assert_eq!(total, 1000);
    let (_, status) = b
        .api("GET", &format!("/api/v1/redpackets/{packet}"), None)
        .await;
    assert_eq!(status["grabbed"], 3);
    assert_eq!(status["total_grabbed"], 1000);
    let stream = danmaku_gateway::redpacket::redis::settlement_stream(&packet).unwrap();
    assert_eq!(redis.cli(&["XLEN", &stream]), "3");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn one_chat_budget_across_nodes() {
    let redis = RedisServer::start();
    let limit = |cfg: &mut danmaku_gateway::config::Config| {
        cfg.ratelimit.chat = danmaku_gateway::config::Rate {
            rate: 0.1,
            burst: 4,
        };
    };
    let a = redis_node(&redis.url(), "node-a", limit).await;
    let b = redis_node(&redis.url(), "node-b", limit).await;
    // Let presence see both nodes, so each takes half a share.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut on_a = a.user("eve", "").await;
    let mut on_b = b.user("eve", "").await;
    on_a.join("rl").await;
    on_b.join("rl").await;
    let mut acked = 0;
    let mut limited = 0;
    for i in 0..12 {
        let c = if i % 2 == 0 { &mut on_a } else { &mut on_b };
        let r = c.call(json!({"op":"chat","room":"rl","text":"x"}), i).await;
        match r["op"].as_str() {
            Some("ack") => acked += 1,
            _ => {
                assert_eq!(r["code"], "rate_limited", "{r}");
                limited += 1;
            }
        }
    }
    // One budget of 4 for the user, plus at most one node's outstanding share.
    assert!((4..=6).contains(&acked), "acked {acked}, limited {limited}");
    a.stop().await;
    b.stop().await;
}
