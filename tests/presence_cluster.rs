//! Presence and pub/sub through crashes, outages and cluster changes, on real
//! `redis-server`s and real gateway nodes (some as child processes, so they can be
//! SIGKILLed):
//! - a node restarted with the same `node_id` does not count its previous life's viewers,
//!   and a dead incarnation's presence fields are deleted, not just ignored;
//! - a count whose withdrawal failed is withdrawn once Redis accepts it again;
//! - counts from other nodes vanish when Redis stays down past the node TTL;
//! - envelopes queued during an outage are dropped, not replayed, once stale;
//! - a cluster slot migration (server-initiated SUNSUBSCRIBE) is followed by a new
//!   subscription on the slot's new owner.

mod support;

use std::time::{Duration, Instant};

use danmaku_gateway::config::Config;
use serde_json::json;
use support::{
    Gateway, GatewayProcess, RedisCluster, RedisServer, cluster_node, http, metric, online,
    online_at, redis_node, relax_rate_limits, until_linked, wait_for,
};

const TTL_S: u64 = 2;
const DROPPED: &str = "danmaku_backplane_dropped_total";

fn presence(cfg: &mut Config) {
    relax_rate_limits(cfg);
    cfg.presence.node_ttl_s = TTL_S;
    cfg.presence.sync_ms = 200;
}

/// The [`presence`] settings as the config table of a [`GatewayProcess`].
fn presence_toml() -> String {
    format!("[presence]\nnode_ttl_s = {TTL_S}\nsync_ms = 200\n")
}

/// The fields of `room`'s presence hash.
fn presence_fields(redis: &RedisServer, room: &str) -> Vec<String> {
    let out = redis.cli(&["HKEYS", &format!("danmaku:presence:{room}")]);
    out.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

async fn backplane_up(gw: &Gateway) -> bool {
    let (_, body) = http(gw.addr, "GET", "/readyz", None, None).await;
    body["backplane"]["up"] == true
}

/// Asserts `online(gw, room) == want` at every poll for `d`.
async fn stays(gw: &Gateway, room: &str, want: u64, d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until {
        assert_eq!(online(gw, room).await, want, "{room} drifted from {want}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_with_same_id_does_not_double_count() {
    let redis = RedisServer::start();
    let b = redis_node(&redis.url(), "node-b", presence).await;
    let mut x = GatewayProcess::spawn(&redis.url(), "node-x", &presence_toml()).await;
    // X holds 3 viewers of `left` (a room it will not hold after its restart) and 2 of
    // `kept` (one it will); B holds one of each.
    let mut on_x = Vec::new();
    for room in ["left", "left", "left", "kept", "kept"] {
        on_x.push(x.viewer(room).await);
    }
    let mut on_b = Vec::new();
    for room in ["left", "kept"] {
        let mut c = b.client(&format!("room={room}")).await;
        c.recv_op("joined").await;
        on_b.push(c);
    }
    wait_for(Duration::from_secs(10), "B counts X's viewers", || async {
        online(&b, "left").await == 4 && online(&b, "kept").await == 3
    })
    .await;

    // X crashes and comes straight back under the same node id, well inside the TTL:
    // it is live again, but holds no member of `left`, and one of `kept`.
    x.kill();
    drop(on_x);
    let x = GatewayProcess::spawn(&redis.url(), "node-x", &presence_toml()).await;
    let _again = x.viewer("kept").await;
    wait_for(
        Duration::from_secs(TTL_S + 5),
        "B to drop X's previous life",
        || async { online(&b, "left").await == 1 && online(&b, "kept").await == 2 },
    )
    .await;
    // And for good: the old counts do not come back while X lives on.
    stays(&b, "left", 1, Duration::from_secs(TTL_S * 2)).await;
    assert_eq!(online(&b, "kept").await, 2);
    assert_eq!(online_at(x.addr, "kept").await, 2);
    assert_eq!(online_at(x.addr, "left").await, 1);

    // The dead incarnation's fields are deleted, not merely ignored: `left` keeps only
    // B's field, `kept` B's and X's new life's.
    wait_for(
        Duration::from_secs(TTL_S + 5),
        "the previous life's presence fields deleted",
        || async {
            presence_fields(&redis, "left").len() == 1 && presence_fields(&redis, "kept").len() == 2
        },
    )
    .await;
    drop(on_b);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdrawal_that_failed_is_retried() {
    let redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", presence).await;
    let b = redis_node(&redis.url(), "node-b", presence).await;
    let room = "retry";
    let mut leaver = a.client(&format!("room={room}")).await;
    leaver.recv_op("joined").await;
    let mut stayer = b.client(&format!("room={room}")).await;
    stayer.recv_op("joined").await;
    wait_for(Duration::from_secs(10), "online 2 on B", || async {
        online(&b, room).await == 2
    })
    .await;

    // Redis refuses HDEL for a while: A's withdrawal of its count fails.
    assert_eq!(redis.cli(&["ACL", "SETUSER", "default", "-hdel"]), "OK");
    leaver.close().await;
    wait_for(Duration::from_secs(5), "A to see the leave", || async {
        online(&a, room).await == 1
    })
    .await;
    // Several sync rounds fail meanwhile; A is live throughout.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(online(&b, room).await, 2, "the field is still there");
    assert_eq!(redis.cli(&["ACL", "SETUSER", "default", "+hdel"]), "OK");
    wait_for(
        Duration::from_secs(5),
        "A's count withdrawn once HDEL works again",
        || async { online(&b, room).await == 1 },
    )
    .await;
    stays(&b, room, 1, Duration::from_secs(TTL_S)).await;
    drop(stayer);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_nodes_counts_vanish_during_a_long_outage() {
    let mut redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", presence).await;
    let b = redis_node(&redis.url(), "node-b", presence).await;
    let room = "outage-presence";
    let mut alice = a.client(&format!("room={room}")).await;
    alice.recv_op("joined").await;
    let mut on_b = Vec::new();
    for _ in 0..2 {
        let mut c = b.client(&format!("room={room}")).await;
        c.recv_op("joined").await;
        on_b.push(c);
    }
    wait_for(Duration::from_secs(10), "online 3 on A", || async {
        online(&a, room).await == 3
    })
    .await;

    redis.kill();
    let killed = Instant::now();
    // Past the TTL A can no longer tell whether B's viewers are there: it counts its own.
    wait_for(
        Duration::from_secs(TTL_S + 5),
        "A to forget B's count",
        || async { online(&a, room).await == 1 },
    )
    .await;
    assert!(
        killed.elapsed() >= Duration::from_secs(TTL_S) - Duration::from_millis(500),
        "forgot remote counts before the TTL: {:?}",
        killed.elapsed()
    );
    alice
        .events_until(room, |ev| {
            ev.iter()
                .any(|e| e["type"] == "presence" && e["online"] == 1)
        })
        .await;

    // Back in touch, the remote count returns.
    redis.restart();
    wait_for(Duration::from_secs(20), "online 3 on A again", || async {
        online(&a, room).await == 3
    })
    .await;
    drop(on_b);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_envelopes_are_dropped_not_replayed_after_an_outage() {
    let mut redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-stale", presence).await;
    let room = "stale";
    let mut alice = a.user("alice", "").await;
    alice.join(room).await;
    wait_for(Duration::from_secs(10), "backplane up", || backplane_up(&a)).await;

    redis.kill();
    wait_for(Duration::from_secs(10), "backplane down", || async {
        !backplane_up(&a).await
    })
    .await;
    // The command link notices within a health check (1 s): from then on envelopes
    // queue instead of failing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let dropped_before = metric(a.addr, DROPPED).await;
    for i in 0..5 {
        let r = alice
            .call(
                json!({"op":"chat","room":room,"text":format!("old-{i}")}),
                10 + i,
            )
            .await;
        assert_eq!(r["op"], "ack", "{r}");
        // One window each: one envelope each.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Longer than envelopes are worth sending.
    tokio::time::sleep(Duration::from_secs(6)).await;

    redis.restart();
    wait_for(Duration::from_secs(20), "backplane up again", || {
        backplane_up(&a)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        redis.command_calls("publish"),
        0,
        "envelopes from before the outage were replayed"
    );
    let dropped = metric(a.addr, DROPPED).await - dropped_before;
    assert!(dropped >= 5.0, "stale envelopes dropped: +{dropped}");

    // Fresh envelopes still go out.
    let r = alice
        .call(json!({"op":"chat","room":room,"text":"fresh"}), 99)
        .await;
    assert_eq!(r["op"], "ack", "{r}");
    wait_for(
        Duration::from_secs(5),
        "the fresh chat published",
        || async { redis.command_calls("publish") == 1 },
    )
    .await;
    drop(alice);
    a.stop().await;
}

// ---------------------------------------------------------------------------------------
// Redis Cluster: slot migration.

/// `PUBSUB SHARDNUMSUB channel` on one master.
fn shard_subscribers(node: &RedisServer, channel: &str) -> u64 {
    let out = node.cli(&["PUBSUB", "SHARDNUMSUB", channel]);
    out.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected SHARDNUMSUB output {out:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_resubscribes_after_its_slot_migrates() {
    let cluster = RedisCluster::start();
    let a = cluster_node(&cluster, "node-a").await;
    let b = cluster_node(&cluster, "node-b").await;
    let room = "migrating";
    let channel = format!("danmaku:room:{room}");
    let mut alice = a.user("alice", "").await;
    let mut bob = b.user("bob", "").await;
    alice.join(room).await;
    bob.join(room).await;
    let slot = cluster.keyslot(&channel);
    let from = cluster.owner(slot);
    let to = (from + 1) % cluster.nodes.len();
    wait_for(Duration::from_secs(10), "both nodes subscribed", || async {
        shard_subscribers(&cluster.nodes[from], &channel) == 2
    })
    .await;
    until_linked(&mut alice, &mut bob, room, "before").await;

    // The slot moves: its old master drops the shard channel's subscribers
    // (SUNSUBSCRIBE pushed to them) and the new one has none until they come back.
    cluster.migrate(slot, from, to);
    assert_eq!(cluster.owner(slot), to);
    wait_for(
        Duration::from_secs(10),
        "both nodes subscribed on the slot's new master",
        || async {
            shard_subscribers(&cluster.nodes[to], &channel) == 2
                && shard_subscribers(&cluster.nodes[from], &channel) == 0
        },
    )
    .await;
    until_linked(&mut alice, &mut bob, room, "after").await;
    until_linked(&mut bob, &mut alice, room, "after-back").await;
    drop((alice, bob));
    a.stop().await;
    b.stop().await;
}
