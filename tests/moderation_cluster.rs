//! Moderation across nodes joined by a real `redis-server`: a change made through any
//! node holds on every node within a second, and lives in Redis, so it survives a node's
//! restart; a change that reached Redis without a notice is picked up by the re-read.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{RedisServer, redis_node, relax_rate_limits, token, wait_until_for};

#[tokio::test]
async fn a_ban_made_on_one_node_closes_the_users_connection_on_another_within_a_second() {
    let redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", |_| {}).await;
    let b = redis_node(&redis.url(), "node-b", |_| {}).await;
    let mut on_b = b.user("mallory", "room=r1").await;
    on_b.recv_op("joined").await;
    // Let node B's subscriber come up before the change (its first re-read would find
    // the ban anyway, but not within the second this test measures).
    tokio::time::sleep(Duration::from_millis(300)).await;

    let t0 = Instant::now();
    let (st, v) = a.api("PUT", "/api/v1/bans/mallory", None).await;
    assert_eq!(st, 204, "{v}");
    assert_eq!(on_b.closed().await, 4030);
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(1), "closed after {took:?}");

    let refused = b
        .connect(&format!("token={}", token("mallory", "m")))
        .await
        .err()
        .expect("banned on node B too");
    assert_eq!(support::refusal(refused).0, 403);
    let (st, _) = b.api("GET", "/api/v1/bans/mallory", None).await;
    assert_eq!(st, 200);

    // Lifted through B, it is lifted on A.
    let (st, _) = b.api("DELETE", "/api/v1/bans/mallory", None).await;
    assert_eq!(st, 204);
    wait_until_for("the unban on node A", Duration::from_secs(1), async || {
        a.api("GET", "/api/v1/bans/mallory", None).await.0 == 404
    })
    .await;
    let _back = a.user("mallory", "").await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn filters_mutes_and_settings_set_on_one_node_apply_on_the_other() {
    let redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", relax_rate_limits).await;
    let b = redis_node(&redis.url(), "node-b", relax_rate_limits).await;
    let mut alice = a.user("alice", "room=r1").await;
    alice.recv_op("joined").await;
    let mut bob = a.user("bob", "room=r1").await;
    bob.recv_op("joined").await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (st, _) = b
        .api(
            "PUT",
            "/api/v1/filters",
            Some(&json!({"block":["spoiler"],"mask":[]})),
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = b
        .api(
            "PUT",
            "/api/v1/rooms/r1/mutes/alice",
            Some(&json!({"duration_s":60})),
        )
        .await;
    assert_eq!(st, 204);
    let (st, _) = b
        .api(
            "PUT",
            "/api/v1/rooms/r2/settings",
            Some(&json!({"chat":"closed"})),
        )
        .await;
    assert_eq!(st, 200);

    let mut n = 0;
    wait_until_for(
        "node A to apply node B's changes",
        Duration::from_secs(1),
        async || {
            n += 1;
            let filtered = bob
                .call(json!({"op":"chat","room":"r1","text":"SPOILER!"}), n)
                .await["code"]
                == "filtered";
            n += 1;
            let muted = alice
                .call(json!({"op":"chat","room":"r1","text":"hi"}), n)
                .await["code"]
                == "muted";
            filtered && muted
        },
    )
    .await;
    let (_, v) = a.api("GET", "/api/v1/rooms/r2/settings", None).await;
    assert_eq!(v["chat"], "closed");
    let (_, v) = a.api("GET", "/api/v1/rooms/r1/mutes", None).await;
    assert_eq!(v["mutes"][0]["user"], "alice", "{v}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_mute_survives_the_restart_of_every_node() {
    let redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", relax_rate_limits).await;
    let (st, _) = a
        .api(
            "PUT",
            "/api/v1/rooms/r1/mutes/alice",
            Some(&json!({"reason":"spam"})),
        )
        .await;
    assert_eq!(st, 204);
    a.stop().await;

    let a = redis_node(&redis.url(), "node-a", relax_rate_limits).await;
    let mut alice = a.user("alice", "room=r1").await;
    alice.recv_op("joined").await;
    let r = alice
        .call(json!({"op":"chat","room":"r1","text":"again"}), 1)
        .await;
    assert_eq!(r["code"], "muted", "{r}");
    let (_, v) = a.api("GET", "/api/v1/rooms/r1/mutes", None).await;
    assert_eq!(
        v,
        json!({"mutes":[{"user":"alice","until":null,"reason":"spam"}]})
    );
    a.stop().await;
}

#[tokio::test]
async fn a_change_that_reached_redis_without_a_notice_is_found_by_the_re_read() {
    let redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", |_| {}).await;
    let mut on_a = a.user("trudy", "").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // As if the notice had been lost (a node cut off from pub/sub while another
    // banned): only the stored state says so.
    redis.cli(&[
        "HSET",
        "danmaku:moderation:bans",
        "trudy",
        r#"{"until":null,"reason":"written directly"}"#,
    ]);
    assert_eq!(on_a.closed().await, 4030);
    let (_, v) = a.api("GET", "/api/v1/bans/trudy", None).await;
    assert_eq!(v["reason"], "written directly");
    a.stop().await;
}

#[tokio::test]
async fn a_recall_made_through_one_node_leaves_the_history_on_the_other() {
    let redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", relax_rate_limits).await;
    let b = redis_node(&redis.url(), "node-b", relax_rate_limits).await;
    let mut alice = a.user("alice", "room=r1").await;
    alice.recv_op("joined").await;
    let mut bob = b.user("bob", "room=r1").await;
    bob.recv_op("joined").await;
    support::until_linked(&mut alice, &mut bob, "r1", "link").await;
    alice
        .call(json!({"op":"chat","room":"r1","text":"oops"}), 1)
        .await;
    let seen = bob
        .events_until("r1", |evs| evs.iter().any(|e| e["text"] == "oops"))
        .await;
    let target = seen.iter().find(|e| e["text"] == "oops").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    let (st, _) = b
        .api("DELETE", &format!("/api/v1/rooms/r1/events/{target}"), None)
        .await;
    assert_eq!(st, 202);
    let evs = alice
        .events_until("r1", |evs| evs.iter().any(|e| e["type"] == "recall"))
        .await;
    assert!(
        evs.iter().any(|e| e["target"] == target.as_str()),
        "{evs:?}"
    );
    let joined = alice
        .call(json!({"op":"join","room":"r1","history":100}), 2)
        .await;
    assert!(
        joined["history"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["id"] != target.as_str()),
        "{joined}"
    );
    // A node that reads the room's history from Redis (its first member) skips it too.
    let c = redis_node(&redis.url(), "node-c", |_| {}).await;
    let mut carol = c.client("").await;
    let joined = carol
        .call(json!({"op":"join","room":"r1","history":100}), 3)
        .await;
    let history = joined["history"].as_array().unwrap();
    assert!(
        history
            .iter()
            .any(|e| e["text"] == "link-1" || e["type"] == "chat"),
        "{joined}"
    );
    assert!(
        history.iter().all(|e| e["id"] != target.as_str()),
        "{joined}"
    );
    a.stop().await;
    b.stop().await;
    c.stop().await;
}
