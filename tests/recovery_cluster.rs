//! Recovery on reconnect across nodes (PROTOCOL.md v1.1, *Recovery on reconnect*): the
//! cluster log in a real `redis-server` lets a client that reconnects to another node,
//! or to a node that came back after SIGKILL, recover; an outage that lost windows is a
//! gap, answered `false`.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Client, Gateway, GatewayProcess, RedisServer, redis_node, relax_rate_limits};

async fn post(addr: std::net::SocketAddr, room: &str, body: Value) -> String {
    let (st, v) = support::http(
        addr,
        "POST",
        &format!("/api/v1/rooms/{room}/events"),
        Some(support::API_TOKEN),
        Some(&body.to_string()),
    )
    .await;
    assert_eq!(st, 202, "{v}");
    v["id"].as_str().unwrap().to_owned()
}

fn gift(user: &str) -> Value {
    json!({"type":"gift","user":{"id":user,"name":user},"gift":"rocket","count":1})
}

async fn ids_until(c: &mut Client, room: &str, id: &str) -> Vec<String> {
    c.events_until(room, |evs| evs.iter().any(|e| e["id"] == id))
        .await
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn join_since(c: &mut Client, room: &str, since: &str) -> Value {
    let r = c
        .call(
            json!({"op":"join","room":room,"since":since,"history":3}),
            42,
        )
        .await;
    assert_eq!(r["op"], "joined", "{r}");
    r
}

fn history_ids(joined: &Value) -> Vec<String> {
    joined["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn two_nodes(redis: &RedisServer) -> (Gateway, Gateway) {
    let a = redis_node(&redis.url(), "node-a", relax_rate_limits).await;
    let b = redis_node(&redis.url(), "node-b", relax_rate_limits).await;
    (a, b)
}

#[tokio::test]
async fn a_viewer_reconnecting_to_another_node_gets_the_gap_from_every_node() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis).await;
    let mut viewer = a.client("room=r").await;
    viewer.recv_op("joined").await;
    let mut on_b = b.user("bob", "room=r").await;
    on_b.recv_op("joined").await;
    let mut on_a = a.user("alice", "room=r").await;
    on_a.recv_op("joined").await;

    // Before the gap: events from both nodes; the viewer's last is from B.
    let from_a = post(a.addr, "r", json!({"type":"system","text":"from a"})).await;
    // B has taken it before X: X's `seen` covers it, so it is not sent again (were
    // X posted first, the answer could repeat it, which a client drops by id).
    ids_until(&mut on_b, "r", &from_a).await;
    let x = post(b.addr, "r", json!({"type":"system","text":"from b"})).await;
    ids_until(&mut viewer, "r", &x).await;
    drop(viewer);

    // The gap: a paid gift through B, a chat on A, a system message through A.
    let g = post(b.addr, "r", gift("ann")).await;
    let r = on_a
        .call(json!({"op":"chat","room":"r","text":"chat in the gap"}), 1)
        .await;
    assert_eq!(r["op"], "ack", "{r}");
    let s = post(a.addr, "r", json!({"type":"system","text":"last"})).await;
    // Everything reached the log once B delivered it.
    let seen_on_b = ids_until(&mut on_b, "r", &s).await;

    let mut back = b.client("").await;
    let joined = join_since(&mut back, "r", &x).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    let got = history_ids(&joined);
    assert!(got.contains(&g) && got.contains(&s), "{got:?}");
    let texts: Vec<&str> = joined["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["text"].as_str())
        .collect();
    assert!(texts.contains(&"chat in the gap"), "{joined}");
    assert!(!got.contains(&x), "since itself is not sent again");
    // Nothing from before the gap but what X's node may have delivered after X.
    assert!(!texts.contains(&"from a"), "{joined}");
    assert!(
        got.iter().all(|id| seen_on_b.contains(id) || id == &g),
        "{got:?} vs {seen_on_b:?}"
    );
    drop((on_a, on_b));
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_node_killed_with_sigkill_leaves_its_viewers_a_recovery_on_another_node() {
    let redis = RedisServer::start();
    let mut a = GatewayProcess::spawn(&redis.url(), "node-a", "").await;
    let b = redis_node(&redis.url(), "node-b", relax_rate_limits).await;
    let mut viewer = a.viewer("r").await;
    let mut watcher = b.client("room=r").await;
    watcher.recv_op("joined").await;
    let x = post(a.addr, "r", json!({"type":"system","text":"before"})).await;
    ids_until(&mut viewer, "r", &x).await;
    // In the cluster log once B has it.
    ids_until(&mut watcher, "r", &x).await;

    a.kill();
    let g1 = post(b.addr, "r", gift("ann")).await;
    let g2 = post(b.addr, "r", gift("ben")).await;
    ids_until(&mut watcher, "r", &g2).await;

    let mut back = b.client("").await;
    let joined = join_since(&mut back, "r", &x).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(history_ids(&joined), [g1, g2], "{joined}");
    b.stop().await;
}

#[tokio::test]
async fn a_recall_in_the_gap_is_applied_across_nodes() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis).await;
    let mut viewer = a.client("room=r").await;
    viewer.recv_op("joined").await;
    let mut watcher = b.client("room=r").await;
    watcher.recv_op("joined").await;
    let x = post(a.addr, "r", json!({"type":"system","text":"x"})).await;
    ids_until(&mut viewer, "r", &x).await;
    drop(viewer);
    let bad = post(b.addr, "r", json!({"type":"system","text":"oops"})).await;
    let (st, v) = a
        .api("DELETE", &format!("/api/v1/rooms/r/events/{bad}"), None)
        .await;
    assert_eq!(st, 202, "{v}");
    let recall = v["id"].as_str().unwrap().to_owned();
    ids_until(&mut watcher, "r", &recall).await;

    let mut back = b.client("").await;
    let joined = join_since(&mut back, "r", &x).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(history_ids(&joined), [recall], "{joined}");
    drop(watcher);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn windows_lost_to_an_outage_leave_a_gap_that_never_recovers() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis).await;
    let mut viewer = a.client("room=r").await;
    viewer.recv_op("joined").await;
    let x = post(a.addr, "r", json!({"type":"system","text":"x"})).await;
    ids_until(&mut viewer, "r", &x).await;

    // Redis stops answering longer than a window may wait: A delivers locally, its
    // windows go stale and are dropped, so the log never holds them.
    redis.pause();
    let lost = post(a.addr, "r", json!({"type":"system","text":"lost"})).await;
    ids_until(&mut viewer, "r", &lost).await;
    drop(viewer);
    tokio::time::sleep(Duration::from_secs(6)).await;
    redis.resume();
    // A writes the gap entry once Redis is back (within its 1 s gap tick).
    let log = "danmaku:log:{danmaku:room:r}";
    support::wait_until("the gap entry is logged", async || {
        redis.cli(&["LRANGE", log, "0", "-1"]).contains(" ! 0 ! ")
    })
    .await;

    let mut back = b.client("").await;
    let joined = join_since(&mut back, "r", &x).await;
    assert_eq!(joined["recovered"], false, "{joined}");
    // An id the log never had is no recovery either.
    let mut other = b.client("").await;
    let joined = join_since(&mut other, "r", "node-a-0-1").await;
    assert_eq!(joined["recovered"], false, "{joined}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn recovery_off_in_a_cluster_answers_false() {
    let redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", |c| c.room.recovery_len = 0).await;
    let mut viewer = a.client("room=r").await;
    viewer.recv_op("joined").await;
    let x = post(a.addr, "r", json!({"type":"system","text":"x"})).await;
    ids_until(&mut viewer, "r", &x).await;
    let mut back = a.client("").await;
    let joined = join_since(&mut back, "r", &x).await;
    assert_eq!(joined["recovered"], false, "{joined}");
    a.stop().await;
}

#[tokio::test]
async fn a_reconnect_storm_with_one_since_recovers_every_viewer_exactly() {
    let redis = RedisServer::start();
    let (a, b) = two_nodes(&redis).await;
    let x = post(a.addr, "r", json!({"type":"system","text":"last seen"})).await;
    // The gap, logged before anyone comes back.
    let mut gap = Vec::new();
    for i in 0..5 {
        gap.push(post(a.addr, "r", gift(&format!("g{i}"))).await);
    }
    let mut watcher = a.client("room=r").await;
    watcher.recv_op("joined").await;
    let after = post(a.addr, "r", json!({"type":"system","text":"after"})).await;
    ids_until(&mut watcher, "r", &after).await;
    gap.push(after);

    // 60 viewers that saw X last join B at once: their recoveries queue together and
    // may share one script call; each must still get exactly the gap.
    let evals_before = redis.command_calls("eval");
    let mut viewers = Vec::new();
    for _ in 0..60 {
        viewers.push(b.client("").await);
    }
    let joins = viewers.iter_mut().map(|v| join_since(v, "r", &x));
    for joined in futures_util::future::join_all(joins).await {
        assert_eq!(joined["recovered"], true, "{joined}");
        assert_eq!(history_ids(&joined), gap, "{joined}");
    }
    let evals = redis.command_calls("eval") - evals_before;
    eprintln!("60 recoveries took {evals} EVAL calls (shared where they queued together)");
    drop((viewers, watcher));
    a.stop().await;
    b.stop().await;
}
