//! Two gateway nodes on a real 3-master Redis Cluster: sharded pub/sub (SSUBSCRIBE /
//! SPUBLISH) carries chat across nodes for rooms on every shard, red-packet grabs stay
//! exactly-once, and presence sums across nodes.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use support::{
    Client, Gateway, RedisCluster, RedisServer, cluster_node, online, until_linked, wait_for,
};

fn channel(room: &str) -> String {
    format!("danmaku:room:{room}")
}

/// `PUBSUB SHARDNUMSUB` (or `NUMSUB`) of `channel` on one node.
fn subscribers(node: &RedisServer, sub: &str, channel: &str) -> u64 {
    let out = node.cli(&["PUBSUB", sub, channel]);
    out.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected PUBSUB {sub} output {out:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_pubsub_carries_rooms_on_every_shard() {
    let cluster = RedisCluster::start();
    // Two rooms per shard.
    let rooms = rooms_on_every_shard(&cluster, "shard-room", 2);
    let a = cluster_node(&cluster, "node-a").await;
    let b = cluster_node(&cluster, "node-b").await;
    let mut alice = a.user("alice", "").await;
    let mut bob = b.user("bob", "").await;
    for room in &rooms {
        alice.join(room).await;
        bob.join(room).await;
    }
    // Each room's channel is SSUBSCRIBEd by both nodes on the shard that owns it.
    for room in &rooms {
        let owner = cluster.owner_of(&channel(room));
        wait_for(
            Duration::from_secs(15),
            &format!("{room}: 2 shard subscribers on its owner"),
            || async { subscribers(owner, "SHARDNUMSUB", &channel(room)) == 2 },
        )
        .await;
        for node in &cluster.nodes {
            assert_eq!(
                subscribers(node, "NUMSUB", &channel(room)),
                0,
                "classic SUBSCRIBE used on a cluster"
            );
        }
    }
    let spublish_before: Vec<u64> = cluster
        .nodes
        .iter()
        .map(|n| n.command_calls("spublish"))
        .collect();
    for room in &rooms {
        until_linked(&mut alice, &mut bob, room, "a2b").await;
        until_linked(&mut bob, &mut alice, room, "b2a").await;
    }
    // Every shard carried SPUBLISHes; nothing used classic PUBLISH.
    for (node, before) in cluster.nodes.iter().zip(spublish_before) {
        assert!(
            node.command_calls("spublish") > before,
            "no SPUBLISH on shard {}",
            node.port
        );
        assert_eq!(node.command_calls("publish"), 0, "PUBLISH on {}", node.port);
    }
    // Leaving SUNSUBSCRIBEs on the owning shard.
    let left = &rooms[0];
    let r = bob.call(json!({"op":"leave","room":left}), 7).await;
    assert_eq!(r["op"], "ack", "{r}");
    let owner = cluster.owner_of(&channel(left));
    wait_for(Duration::from_secs(10), "B unsubscribed", || async {
        subscribers(owner, "SHARDNUMSUB", &channel(left)) == 1
    })
    .await;
    drop((alice, bob));
    a.stop().await;
    b.stop().await;
}

/// A user on `gw`, joined to `room`.
async fn member(gw: &Gateway, user: &str, room: &str) -> Client {
    let mut c = gw.user(user, &format!("room={room}")).await;
    let j = c.recv_op("joined").await;
    assert_eq!(j["room"], room, "{j}");
    c
}

/// A grab and its reply, retrying `busy`.
async fn grab(c: &mut Client, room: &str, packet: &str) -> Value {
    for attempt in 1..200 {
        let r = c
            .call(json!({"op":"grab","room":room,"packet":packet}), attempt)
            .await;
        if r["code"] != "busy" {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("busy for ever");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn red_packet_on_cluster_is_exactly_once_from_both_nodes() {
    const USERS: usize = 150;
    const SHARES: u64 = 100;
    const TOTAL: u64 = 12_345;
    let cluster = RedisCluster::start();
    let a = cluster_node(&cluster, "node-a").await;
    let b = cluster_node(&cluster, "node-b").await;
    let room = "cluster-rp";
    let (st, created) = a
        .api(
            "POST",
            &format!("/api/v1/rooms/{room}/redpackets"),
            Some(&json!({"total": TOTAL, "shares": SHARES, "sender": {"id":"boss","name":"Boss"}})),
        )
        .await;
    assert_eq!(st, 201, "{created}");
    let packet = created["packet"].as_str().unwrap().to_string();
    // Listed on the other node too.
    let mut probe = b.user("probe", "").await;
    let joined = probe.join(room).await;
    assert_eq!(
        joined["redpackets"][0]["packet"],
        packet.as_str(),
        "{joined}"
    );

    let mut clients = Vec::new();
    for i in 0..USERS {
        let gw = if i % 2 == 0 { &a } else { &b };
        clients.push((format!("u{i}"), member(gw, &format!("u{i}"), room).await));
    }
    let mut tasks = Vec::new();
    for (user, mut c) in clients {
        let packet = packet.clone();
        tasks.push(tokio::spawn(async move {
            let r = grab(&mut c, "cluster-rp", &packet).await;
            (user, r)
        }));
    }
    let mut amounts: HashMap<String, u64> = HashMap::new();
    let mut empty = 0;
    for t in tasks {
        let (user, r) = t.await.unwrap();
        if r["op"] == "ack" {
            assert!(
                amounts
                    .insert(user, r["amount"].as_u64().unwrap())
                    .is_none()
            );
        } else {
            assert_eq!(r["code"], "packet_empty", "{r}");
            empty += 1;
        }
    }
    assert_eq!(amounts.len() as u64, SHARES);
    assert_eq!(empty as u64, USERS as u64 - SHARES);
    assert_eq!(amounts.values().sum::<u64>(), TOTAL);
    let stream = danmaku_gateway::redpacket::redis::settlement_stream(&packet).unwrap();
    assert_eq!(cluster.cli_c(&["XLEN", &stream]), SHARES.to_string());
    let (_, status) = b
        .api("GET", &format!("/api/v1/redpackets/{packet}"), None)
        .await;
    assert_eq!(status["grabbed"], SHARES, "{status}");
    assert_eq!(status["total_grabbed"], TOTAL, "{status}");

    // The same user on both nodes at once: one share, whatever the slot.
    let mut tab_a = member(&a, "twin", room).await;
    let mut tab_b = member(&b, "twin", room).await;
    for round in 0..4 {
        let (st, created) = b
            .api(
                "POST",
                &format!("/api/v1/rooms/{room}/redpackets"),
                Some(&json!({"total": 50, "shares": 5, "sender": {"id":"boss","name":"Boss"}})),
            )
            .await;
        assert_eq!(st, 201, "{created}");
        let packet = created["packet"].as_str().unwrap().to_string();
        let (ra, rb) = tokio::join!(
            grab(&mut tab_a, room, &packet),
            grab(&mut tab_b, room, &packet)
        );
        let wins = [&ra, &rb].iter().filter(|r| r["op"] == "ack").count();
        assert_eq!(wins, 1, "round {round}: {ra} {rb}");
        let lost = if ra["op"] == "ack" { &rb } else { &ra };
        assert_eq!(lost["code"], "already_grabbed", "{lost}");
    }
    drop((probe, tab_a, tab_b));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_sums_on_cluster() {
    let cluster = RedisCluster::start();
    let a = cluster_node(&cluster, "node-a").await;
    let b = cluster_node(&cluster, "node-b").await;
    let room = "crowd";
    let mut on_a = Vec::new();
    for i in 0..2 {
        on_a.push(member(&a, &format!("a{i}"), room).await);
    }
    let mut on_b = Vec::new();
    for _ in 0..3 {
        let mut v = b.client(&format!("room={room}")).await;
        v.recv_op("joined").await;
        on_b.push(v);
    }
    wait_for(
        Duration::from_secs(15),
        "online 5 on both nodes",
        || async { online(&a, room).await == 5 && online(&b, room).await == 5 },
    )
    .await;
    // The presence event on A carries the cluster-wide count.
    on_a[0]
        .events_until(room, |ev| {
            ev.iter()
                .any(|e| e["type"] == "presence" && e["online"] == 5)
        })
        .await;
    // Members leaving B are seen on A.
    on_b.truncate(1);
    wait_for(
        Duration::from_secs(10),
        "online 3 on both nodes",
        || async { online(&a, room).await == 3 && online(&b, room).await == 3 },
    )
    .await;
    drop((on_a, on_b));
    a.stop().await;
    b.stop().await;
}

/// Rooms whose channels live on three different shards.
fn rooms_on_every_shard(cluster: &RedisCluster, prefix: &str, per_shard: usize) -> Vec<String> {
    let mut per_owner: HashMap<u16, usize> = HashMap::new();
    let mut rooms = Vec::new();
    for i in 0..1000 {
        let room = format!("{prefix}-{i}");
        let owner = cluster.owner_of(&channel(&room)).port;
        let n = per_owner.entry(owner).or_default();
        if *n < per_shard {
            *n += 1;
            rooms.push(room);
        }
        if rooms.len() == 3 * per_shard {
            return rooms;
        }
    }
    panic!("could not spread rooms over the shards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_sums_on_cluster_with_rooms_on_several_shards() {
    let cluster = RedisCluster::start();
    let a = cluster_node(&cluster, "node-a").await;
    let b = cluster_node(&cluster, "node-b").await;
    let rooms = rooms_on_every_shard(&cluster, "crowd", 1);
    let mut keep = Vec::new();
    for (k, room) in rooms.iter().enumerate() {
        keep.push(member(&a, &format!("a-{k}"), room).await);
        for _ in 0..=k {
            let mut v = b.client(&format!("room={room}")).await;
            v.recv_op("joined").await;
            keep.push(v);
        }
    }
    wait_for(
        Duration::from_secs(15),
        "presence sums per room",
        || async {
            for (k, room) in rooms.iter().enumerate() {
                let want = k as u64 + 2;
                if online(&a, room).await != want || online(&b, room).await != want {
                    return false;
                }
            }
            true
        },
    )
    .await;
    drop(keep);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_rooms_on_different_shards_all_deliver() {
    const ROUNDS: usize = 5;
    let cluster = RedisCluster::start();
    let a = cluster_node(&cluster, "node-a").await;
    let b = cluster_node(&cluster, "node-b").await;
    let rooms = rooms_on_every_shard(&cluster, "busy", 2);
    let mut alice = a.user("alice", "").await;
    let mut bob = b.user("bob", "").await;
    for room in &rooms {
        alice.join(room).await;
        bob.join(room).await;
    }
    for room in &rooms {
        let owner = cluster.owner_of(&channel(room));
        wait_for(
            Duration::from_secs(15),
            &format!("{room}: 2 shard subscribers"),
            || async { subscribers(owner, "SHARDNUMSUB", &channel(room)) == 2 },
        )
        .await;
    }
    until_linked(&mut alice, &mut bob, &rooms[0], "warm").await;
    // Every round: one chat in each room, all inside one window.
    for round in 0..ROUNDS {
        for (k, room) in rooms.iter().enumerate() {
            alice
                .send(json!({"op":"chat","room":room,"text":format!("r{round}-{k}"),"ref":k}))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut want: HashSet<String> = (0..ROUNDS)
        .flat_map(|r| (0..rooms.len()).map(move |k| format!("r{r}-{k}")))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !want.is_empty() {
        let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, bob.ws.next()).await else {
            break;
        };
        let Some(v) = bob.decode(&m) else { continue };
        if v["op"] != "batch" {
            continue;
        }
        for e in v["events"].as_array().unwrap() {
            if let Some(t) = e["text"].as_str() {
                want.remove(t);
            }
        }
    }
    assert!(
        want.is_empty(),
        "{} of {} chats never reached node B: {want:?}",
        want.len(),
        ROUNDS * rooms.len()
    );
    drop((alice, bob));
    a.stop().await;
    b.stop().await;
}
