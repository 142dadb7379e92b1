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
        alice.send(json!({"op":"chat","room":"x","text":format!("hello {n}")})).await;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
        while tokio::time::Instant::now() < deadline {
            if let Ok(v) = tokio::time::timeout(Duration::from_millis(50), bob.recv()).await
                && v["op"] == "batch"
                && v["events"].as_array().unwrap().iter().any(|e| e["type"] == "chat" && e["user"]["id"] == "alice")
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
        let r = c.call(json!({"op":"grab","room":"rp","packet":packet}), 1).await;
        if i < 3 {
            assert_eq!(r["op"], "ack", "{r} {j}");
            total += r["amount"].as_u64().unwrap();
            let again = c.call(json!({"op":"grab","room":"rp","packet":packet}), 2).await;
            assert_eq!(again["code"], "already_grabbed");
        } else {
            assert_eq!(r["code"], "packet_empty", "{r}");
        }
    }
    assert_eq!(total, 1000);
    let (_, status) = b.api("GET", &format!("/api/v1/redpackets/{packet}"), None).await;
    assert_eq!(status["grabbed"], 3);
    assert_eq!(status["total_grabbed"], 1000);
    let stream = danmaku_gateway::redpacket::redis::settlement_stream(&packet).unwrap();
    assert_eq!(redis.cli(&["XLEN", &stream]), "3");
    a.stop().await;
    b.stop().await;
}
