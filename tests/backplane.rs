//! The Redis backplane across 2–3 real gateway nodes on one real `redis-server`:
//! per-origin order, no echo, subscriptions that follow local membership, cluster-wide
//! presence (and its TTL when a node is SIGKILLed), one rate budget across nodes,
//! exactly-once red-packet grabs under load, and publishing once per room per window.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use danmaku_gateway::config::{Config, Rate};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::{
    Client, GatewayProcess, RedisServer, online, online_at, redis_node, relax_rate_limits, token,
    until_linked, wait_for,
};
use tokio_tungstenite::tungstenite::Message;

/// A chat as a receiver saw it: sender id, text, event id.
type Seen = (String, String, String);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Subscribers of `room`'s channel on `redis` (one per subscribed gateway node).
fn numsub(redis: &RedisServer, room: &str) -> u64 {
    let channel = format!("danmaku:room:{room}");
    let out = redis.cli(&["PUBSUB", "NUMSUB", &channel]);
    // Output: the channel name, then its count, one per line.
    out.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected NUMSUB output {out:?}"))
}

async fn wait_numsub(redis: &RedisServer, room: &str, want: u64) {
    wait_for(
        Duration::from_secs(10),
        &format!("PUBSUB NUMSUB {room} == {want}"),
        || async { numsub(redis, room) == want },
    )
    .await;
}

fn relaxed(cfg: &mut Config) {
    relax_rate_limits(cfg);
}

/// Chat events (sender id, text, event id) of `room` seen by `c` until every sender in
/// `last` has sent its last text, then `linger` more; gives up at `limit`.
async fn collect_chats(
    c: &mut Client,
    room: &str,
    last: &HashMap<String, String>,
    limit: Duration,
    linger: Duration,
) -> Vec<Seen> {
    let mut got = Vec::new();
    let mut seen_last: HashSet<String> = HashSet::new();
    let deadline = tokio::time::Instant::now() + limit;
    let mut stop_at: Option<tokio::time::Instant> = None;
    loop {
        let until = stop_at.unwrap_or(deadline).min(deadline);
        let msg = match tokio::time::timeout_at(until, c.ws.next()).await {
            Err(_) => break,
            Ok(Some(Ok(m))) => m,
            Ok(other) => panic!("connection ended while collecting: {other:?}"),
        };
        let Some(v) = c.decode(&msg) else { continue };
        if v["op"] != "batch" || v["room"] != room {
            continue;
        }
        for e in v["events"].as_array().unwrap() {
            if e["type"] != "chat" {
                continue;
            }
            let user = e["user"]["id"].as_str().unwrap().to_string();
            let text = e["text"].as_str().unwrap().to_string();
            if last.get(&user) == Some(&text) {
                seen_last.insert(user.clone());
            }
            got.push((user, text, e["id"].as_str().unwrap().to_string()));
        }
        if stop_at.is_none() && seen_last.len() == last.len() {
            stop_at = Some(tokio::time::Instant::now() + linger);
        }
    }
    got
}

/// Reads and discards frames on `c` for `d` (e.g. acks of chats sent without waiting).
async fn drain(c: &mut Client, d: Duration) {
    let until = tokio::time::Instant::now() + d;
    while let Ok(Some(Ok(_))) = tokio::time::timeout_at(until, c.ws.next()).await {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_crosses_three_nodes_in_order_exactly_once() {
    const N: usize = 150;
    let redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", relaxed).await;
    let b = redis_node(&redis.url(), "node-b", relaxed).await;
    let c = redis_node(&redis.url(), "node-c", relaxed).await;
    let room = "ordered";
    // Two senders on different nodes, receivers on all three.
    let mut alice = a.user("alice", "").await; // sender on A
    let mut erin = b.user("erin", "").await; // sender on B
    let mut dave = a.user("dave", "").await; // receiver on A (local delivery)
    let mut bob = b.user("bob", "").await;
    let mut carol = c.user("carol", "").await;
    for cl in [&mut alice, &mut erin, &mut dave, &mut bob, &mut carol] {
        cl.join(room).await;
    }
    wait_numsub(&redis, room, 3).await;

    let last: HashMap<String, String> = [
        ("alice".to_string(), format!("alice-{}", N - 1)),
        ("erin".to_string(), format!("erin-{}", N - 1)),
    ]
    .into();
    let limit = Duration::from_secs(30);
    let linger = Duration::from_millis(600);
    // Receivers read concurrently, so no queue overflows while the senders send.
    let mut receivers = Vec::new();
    for (name, mut cl) in [("dave", dave), ("bob", bob), ("carol", carol)] {
        let last = last.clone();
        receivers.push(tokio::spawn(async move {
            let got = collect_chats(&mut cl, "ordered", &last, limit, linger).await;
            (name, got, cl)
        }));
    }
    let erin_task = tokio::spawn(async move {
        for i in 0..N {
            erin.send(json!({"op":"chat","room":"ordered","text":format!("erin-{i}"),"ref":i}))
                .await;
        }
        let got = collect_chats(&mut erin, "ordered", &last, limit, linger).await;
        (got, erin)
    });
    for i in 0..N {
        alice
            .send(json!({"op":"chat","room":room,"text":format!("alice-{i}"),"ref":i}))
            .await;
    }
    let last2: HashMap<String, String> = [
        ("alice".to_string(), format!("alice-{}", N - 1)),
        ("erin".to_string(), format!("erin-{}", N - 1)),
    ]
    .into();
    let alice_got = collect_chats(&mut alice, room, &last2, limit, linger).await;
    let (erin_got, _erin) = erin_task.await.unwrap();

    let expect = |who: &str| -> Vec<String> { (0..N).map(|i| format!("{who}-{i}")).collect() };
    let mut ids_by_text: HashMap<String, String> = HashMap::new();
    let mut all: Vec<(&str, Vec<Seen>)> = vec![("alice", alice_got), ("erin", erin_got)];
    for r in receivers {
        let (name, got, _cl) = r.await.unwrap();
        all.push((name, got));
    }
    for (name, got) in &all {
        for sender in ["alice", "erin"] {
            let texts: Vec<String> = got
                .iter()
                .filter(|(u, _, _)| u == sender)
                .map(|(_, t, _)| t.clone())
                .collect();
            assert_eq!(
                texts.len(),
                N,
                "{name} saw {} chats from {sender}, want exactly {N} (lost or duplicated)",
                texts.len()
            );
            assert_eq!(
                texts,
                expect(sender),
                "{name}: chats from {sender} out of order or duplicated"
            );
        }
        // The same event carries the same id on every node.
        for (_, text, id) in got {
            let prev = ids_by_text
                .entry(text.clone())
                .or_insert_with(|| id.clone());
            assert_eq!(prev, id, "{name}: {text} has another id than elsewhere");
        }
    }
    let distinct: HashSet<&String> = ids_by_text.values().collect();
    assert_eq!(distinct.len(), 2 * N, "event ids must be unique");
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_node_delivers_locally_without_redis_echo() {
    let redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", relaxed).await;
    let b = redis_node(&redis.url(), "node-b", relaxed).await;
    let room = "echo";
    let mut alice = a.user("alice", "").await;
    let mut bob = b.user("bob", "").await;
    alice.join(room).await;
    bob.join(room).await;
    wait_numsub(&redis, room, 2).await;
    until_linked(&mut alice, &mut bob, room, "warm").await;
    drain(&mut alice, Duration::from_millis(400)).await;
    drain(&mut bob, Duration::from_millis(100)).await;

    // One chat: the sender sees it in a batch once, well before a Redis round trip of
    // its own would matter, and never a second time.
    let sent = Instant::now();
    let ack = alice
        .call(json!({"op":"chat","room":room,"text":"only-once"}), 1)
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let mut seen = 0;
    let mut first_at = None;
    let until = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(until, alice.ws.next()).await {
        let Some(v) = alice.decode(&m) else { continue };
        if v["op"] == "batch" {
            for e in v["events"].as_array().unwrap() {
                if e["type"] == "chat" && e["text"] == "only-once" {
                    seen += 1;
                    first_at.get_or_insert_with(|| sent.elapsed());
                }
            }
        }
    }
    assert_eq!(seen, 1, "the sender must see its chat exactly once");
    let first_at = first_at.unwrap();
    assert!(
        first_at < Duration::from_millis(800),
        "local delivery took {first_at:?}"
    );
    // The other node got it too, once.
    let got = bob
        .events_until(room, |ev| ev.iter().any(|e| e["text"] == "only-once"))
        .await;
    assert_eq!(got.iter().filter(|e| e["text"] == "only-once").count(), 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_follows_local_membership() {
    let redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", relaxed).await;
    let b = redis_node(&redis.url(), "node-b", relaxed).await;
    let room = "follow";
    assert_eq!(numsub(&redis, room), 0);
    let mut alice = a.user("alice", "").await;
    alice.join(room).await;
    wait_numsub(&redis, room, 1).await;
    let mut bob = b.user("bob", "").await;
    bob.join(room).await;
    wait_numsub(&redis, room, 2).await;
    until_linked(&mut alice, &mut bob, room, "first").await;

    // The last member on B leaves: B unsubscribes, A stays.
    let r = bob.call(json!({"op":"leave","room":room}), 5).await;
    assert_eq!(r["op"], "ack", "{r}");
    wait_numsub(&redis, room, 1).await;
    // ... and stays unsubscribed (the periodic reconcile must not re-add it).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(numsub(&redis, room), 1);
    drain(&mut bob, Duration::from_millis(200)).await;
    // B no longer receives the room: chats on A do not reach bob (he left, and B holds
    // no members, so it would not even get them).
    alice
        .call(json!({"op":"chat","room":room,"text":"while-away"}), 6)
        .await;
    let frames = bob.until_pong(7).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let frames2 = bob.until_pong(8).await;
    assert!(
        frames
            .iter()
            .chain(&frames2)
            .all(|f| f["op"] != "batch" || f["room"] != room),
        "bob got {frames:?} {frames2:?}"
    );

    // Joining again re-subscribes and delivery resumes.
    bob.join(room).await;
    wait_numsub(&redis, room, 2).await;
    until_linked(&mut alice, &mut bob, room, "again").await;

    // Two members on B: one leaving keeps the subscription, the last one closing its
    // socket drops it.
    let mut bob2 = b.user("bob2", "").await;
    bob2.join(room).await;
    bob.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(numsub(&redis, room), 2, "B still has bob2");
    until_linked(&mut alice, &mut bob2, room, "bob2").await;
    bob2.close().await;
    wait_numsub(&redis, room, 1).await;
    // A's last member goes too: nobody subscribes.
    alice.close().await;
    wait_numsub(&redis, room, 0).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_sums_over_three_nodes() {
    let redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", relaxed).await;
    let b = redis_node(&redis.url(), "node-b", relaxed).await;
    let c = redis_node(&redis.url(), "node-c", relaxed).await;
    let room = "sum";
    // 1 on A, 2 on B (one anonymous), 3 on C (two anonymous).
    let mut on_a = [a.user("a1", &format!("room={room}")).await];
    let mut on_b = vec![
        b.user("b1", &format!("room={room}")).await,
        b.client(&format!("room={room}")).await,
    ];
    let mut on_c = vec![
        c.user("c1", &format!("room={room}")).await,
        c.client(&format!("room={room}")).await,
        c.client(&format!("room={room}")).await,
    ];
    for cl in on_a.iter_mut().chain(&mut on_b).chain(&mut on_c) {
        let j = cl.recv_op("joined").await;
        assert_eq!(j["room"], room);
    }
    wait_for(
        Duration::from_secs(10),
        "online 6 on every node",
        || async {
            online(&a, room).await == 6
                && online(&b, room).await == 6
                && online(&c, room).await == 6
        },
    )
    .await;

    // A newcomer on A (joined.online is covered by
    // `joined_online_counts_members_on_all_nodes`).
    let mut newcomer = a.user("a2", "").await;
    newcomer.join(room).await;
    // Joining again answers `joined` with the cluster-wide count.
    let again = newcomer.join(room).await;
    assert_eq!(again["online"], 7, "{again}");
    // Presence events carry the cluster-wide count, on every node.
    for (name, cl) in [("c1", &mut on_c[0]), ("b1", &mut on_b[0])] {
        let ev = cl
            .events_until(room, |ev| {
                ev.iter()
                    .any(|e| e["type"] == "presence" && e["online"] == 7)
            })
            .await;
        assert!(
            ev.iter()
                .filter(|e| e["type"] == "presence")
                .all(|e| e["online"].as_u64().unwrap() <= 7),
            "{name}: {ev:?}"
        );
    }
    // Three leave C: every node drops to 4 and says so.
    for cl in on_c.drain(..) {
        cl.close().await;
    }
    wait_for(Duration::from_secs(10), "online 4 everywhere", || async {
        online(&a, room).await == 4 && online(&b, room).await == 4 && online(&c, room).await == 4
    })
    .await;
    on_a[0]
        .events_until(room, |ev| {
            ev.iter()
                .any(|e| e["type"] == "presence" && e["online"] == 4)
        })
        .await;
    // A node that stops cleanly withdraws its counts at once (no TTL wait).
    drop(on_b);
    b.stop().await;
    wait_for(Duration::from_secs(5), "online 2 on A and C", || async {
        online(&a, room).await == 2 && online(&c, room).await == 2
    })
    .await;
    a.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_online_counts_members_on_all_nodes() {
    let redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", relaxed).await;
    let b = redis_node(&redis.url(), "node-b", relaxed).await;
    let c = redis_node(&redis.url(), "node-c", relaxed).await;
    let room = "joined-sum";
    let mut members = Vec::new();
    for (gw, n) in [(&a, 1), (&b, 2), (&c, 3)] {
        for _ in 0..n {
            let mut v = gw.client(&format!("room={room}")).await;
            v.recv_op("joined").await;
            members.push(v);
        }
    }
    wait_for(Duration::from_secs(10), "online 6 everywhere", || async {
        online(&a, room).await == 6 && online(&b, room).await == 6 && online(&c, room).await == 6
    })
    .await;
    // PROTOCOL.md: `joined.online` is the room's count across all nodes. A already
    // holds the room and knows the 5 remote members.
    let mut newcomer = a.user("newcomer", "").await;
    let joined = newcomer.join(room).await;
    assert_eq!(
        joined["online"], 7,
        "joined.online must count members on all nodes: {joined}"
    );
    // Counts travel through the presence sync (every `presence.sync_ms`): once C has
    // seen A's newcomer, a join through the query parameter counts everyone.
    wait_for(Duration::from_secs(5), "C sees 7", || async {
        online(&c, room).await == 7
    })
    .await;
    let mut via_query = c.client(&format!("room={room}")).await;
    let joined = via_query.recv_op("joined").await;
    assert_eq!(joined["online"], 8, "{joined}");
    drop(members);
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_api_counts_members_on_a_node_without_members() {
    let redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", relaxed).await;
    let b = redis_node(&redis.url(), "node-b", relaxed).await;
    let room = "elsewhere";
    let mut members = Vec::new();
    for _ in 0..3 {
        let mut v = b.client(&format!("room={room}")).await;
        v.recv_op("joined").await;
        members.push(v);
    }
    wait_for(Duration::from_secs(10), "online 3 on B", || async {
        online(&b, room).await == 3
    })
    .await;
    // The backend's request may land on any node behind the load balancer.
    wait_for(
        Duration::from_secs(5),
        "online 3 on A (which has no members of the room)",
        || async { online(&a, room).await == 3 },
    )
    .await;
    drop(members);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_stops_counting_after_presence_ttl() {
    const TTL_S: u64 = 2;
    let redis = RedisServer::start();
    let mut child = GatewayProcess::spawn(
        &redis.url(),
        "node-doomed",
        &format!("[presence]\nnode_ttl_s = {TTL_S}\nsync_ms = 200\n"),
    )
    .await;
    let b = redis_node(&redis.url(), "node-b", |cfg| {
        relaxed(cfg);
        cfg.presence.node_ttl_s = TTL_S;
        cfg.presence.sync_ms = 200;
    })
    .await;
    let room = "ttl";
    let mut viewers = Vec::new();
    for _ in 0..3 {
        let mut v = child.client(&format!("room={room}")).await;
        v.recv_op("joined").await;
        viewers.push(v);
    }
    let mut bob = b.user("bob", &format!("room={room}")).await;
    bob.recv_op("joined").await;
    wait_for(
        Duration::from_secs(10),
        "online 4 on both nodes",
        || async { online(&b, room).await == 4 && online_at(child.addr, room).await == 4 },
    )
    .await;
    // Bob is told about the viewers on the other node.
    bob.events_until(room, |ev| {
        ev.iter()
            .any(|e| e["type"] == "presence" && e["online"] == 4)
    })
    .await;

    child.kill();
    let killed = Instant::now();
    let limit = Duration::from_secs(TTL_S + 3);
    wait_for(limit, "B's count to drop after the TTL", || async {
        online(&b, room).await == 1
    })
    .await;
    let took = killed.elapsed();
    assert!(took <= limit, "took {took:?}");
    // The members on B learn it from a presence event.
    bob.events_until(room, |ev| {
        ev.iter()
            .any(|e| e["type"] == "presence" && e["online"] == 1)
    })
    .await;
    drop(viewers);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_one_chat_budget_across_three_nodes() {
    const BURST: u32 = 6;
    const NODES: usize = 3;
    let redis = RedisServer::start();
    let limit = |cfg: &mut Config| {
        // Refill is negligible over the test: the burst is the whole budget.
        cfg.ratelimit.chat = Rate {
            rate: 0.01,
            burst: BURST,
        };
    };
    let a = redis_node(&redis.url(), "node-a", limit).await;
    let b = redis_node(&redis.url(), "node-b", limit).await;
    let c = redis_node(&redis.url(), "node-c", limit).await;
    // Every node must see three live nodes, so each takes a third of a share.
    wait_for(Duration::from_secs(10), "3 live nodes", || async {
        redis.cli(&["ZCARD", "danmaku:nodes"]) == "3"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let room = "budget";

    // Sequential, round robin over three tabs.
    let mut tabs = Vec::new();
    for gw in [&a, &b, &c] {
        let mut t = gw.user("eve", "").await;
        t.join(room).await;
        tabs.push(t);
    }
    let (mut acked, mut limited) = (0u32, 0u32);
    for i in 0..30 {
        let t = &mut tabs[i % NODES];
        let r = t
            .call(json!({"op":"chat","room":room,"text":"x"}), i as i64)
            .await;
        if r["op"] == "ack" {
            acked += 1;
        } else {
            assert_eq!(r["code"], "rate_limited", "{r}");
            assert!(r["retry_after_ms"].as_u64().unwrap() >= 1, "{r}");
            limited += 1;
        }
    }
    // One budget (plus at most one outstanding share of a unit per node); a budget per
    // node would admit 3 × 6 = 18.
    assert!(
        (BURST..=BURST + NODES as u32).contains(&acked),
        "sequential: acked {acked}, limited {limited}"
    );

    // Concurrently: three tabs of another user fire ten chats each at once.
    let mut tasks = Vec::new();
    for (k, gw) in [&a, &b, &c].into_iter().enumerate() {
        let mut t = gw.user("mallory", "").await;
        t.join(room).await;
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                t.send(json!({"op":"chat","room":"budget","text":"y","ref":k * 100 + i}))
                    .await;
            }
            let mut acked = 0u32;
            let mut replies = 0;
            while replies < 10 {
                let r = t.reply().await;
                replies += 1;
                if r["op"] == "ack" {
                    acked += 1;
                } else {
                    assert_eq!(r["code"], "rate_limited", "{r}");
                }
            }
            acked
        }));
    }
    let mut acked = 0;
    for t in tasks {
        acked += t.await.unwrap();
    }
    assert!(
        (BURST..=BURST + NODES as u32).contains(&acked),
        "concurrent: acked {acked} of 30"
    );
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

/// A user connected to `addr`, joined to `room` (hello and joined consumed).
async fn connect_joined(addr: SocketAddr, user: &str, room: &str) -> (Ws, Value) {
    let url = format!("ws://{addr}/ws?token={}&room={room}", token(user, user));
    let (mut ws, _) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio_tungstenite::connect_async(url).await
    })
    .await
    .expect("connect timeout")
    .expect("connect");
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("joined timeout")
            .expect("stream ended")
            .expect("socket error");
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["op"] == "joined" {
                return (ws, v);
            }
        }
    }
}

/// Sends a grab and returns the reply, retrying `busy`; batches are skipped unparsed.
async fn grab_on(ws: &mut Ws, room: &str, packet: &str) -> Value {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let op = json!({"op":"grab","room":room,"packet":packet,"ref":attempt});
        ws.send(Message::Text(op.to_string().into())).await.unwrap();
        let reply = loop {
            let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
                .await
                .expect("grab reply timeout")
                .expect("stream ended")
                .unwrap_or_else(|e| panic!("socket error: {e}"));
            match m {
                Message::Text(t) if !t.starts_with(r#"{"op":"batch""#) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["ref"] == attempt {
                        break v;
                    }
                }
                Message::Close(c) => panic!("closed while grabbing: {c:?}"),
                _ => {}
            }
        };
        if reply["code"] == "busy" && attempt < 200 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        return reply;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_grabs_over_three_nodes_exactly_once() {
    const USERS: usize = 2000;
    const SHARES: u64 = 500;
    const TOTAL: u64 = 1_000_000;
    let redis = RedisServer::start();
    let edit = |cfg: &mut Config| {
        relaxed(cfg);
        cfg.room.batch_ms = 100;
        cfg.room.presence_ms = 1000;
        // This test is about exactly-once, not slow consumers.
        cfg.limits.outbound_queue = 4096;
    };
    let a = redis_node(&redis.url(), "node-a", edit).await;
    let b = redis_node(&redis.url(), "node-b", edit).await;
    let c = redis_node(&redis.url(), "node-c", edit).await;
    let room = "storm";
    let (st, created) = a
        .api(
            "POST",
            &format!("/api/v1/rooms/{room}/redpackets"),
            Some(&json!({"total": TOTAL, "shares": SHARES, "sender": {"id":"boss","name":"Boss"}})),
        )
        .await;
    assert_eq!(st, 201, "{created}");
    let packet = created["packet"].as_str().unwrap().to_string();
    let addrs = [a.addr, b.addr, c.addr];

    // Connect in batches; every user waits (reading) for the start signal.
    let (start_tx, start_rx) = tokio::sync::watch::channel(false);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(USERS);
    let mut tasks = Vec::with_capacity(USERS);
    for batch in 0..USERS / 100 {
        for k in 0..100 {
            let i = batch * 100 + k;
            let addr = addrs[i % 3];
            let packet = packet.clone();
            let mut start = start_rx.clone();
            let ready = ready_tx.clone();
            tasks.push(tokio::spawn(async move {
                let user = format!("u{i}");
                let (mut ws, joined) = connect_joined(addr, &user, "storm").await;
                let listed = joined["redpackets"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["packet"] == packet.as_str());
                ready.send(()).await.unwrap();
                loop {
                    tokio::select! {
                        r = start.changed() => { r.unwrap(); if *start.borrow() { break; } }
                        m = ws.next() => { m.expect("stream ended").expect("socket error"); }
                    }
                }
                let reply = grab_on(&mut ws, "storm", &packet).await;
                (user, reply, listed)
            }));
        }
        // Let this batch finish its handshakes before the next one.
        for _ in 0..100 {
            tokio::time::timeout(Duration::from_secs(60), ready_rx.recv())
                .await
                .expect("connections did not open")
                .unwrap();
        }
    }
    start_tx.send(true).unwrap();
    let mut amounts: HashMap<String, u64> = HashMap::new();
    let mut empty = 0;
    let mut listed_everywhere = true;
    for t in tasks {
        let (user, reply, listed) = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("grab task timed out")
            .unwrap();
        listed_everywhere &= listed;
        if reply["op"] == "ack" {
            let amount = reply["amount"].as_u64().unwrap();
            assert!(amount >= 1, "{reply}");
            assert!(
                amounts.insert(user.clone(), amount).is_none(),
                "{user} twice"
            );
        } else {
            assert_eq!(reply["code"], "packet_empty", "{user}: {reply}");
            empty += 1;
        }
    }
    assert!(
        listed_everywhere,
        "joined.redpackets must list the open packet on every node"
    );
    assert_eq!(amounts.len() as u64, SHARES, "successful grabs");
    assert_eq!(empty as u64, USERS as u64 - SHARES);
    assert_eq!(amounts.values().sum::<u64>(), TOTAL, "amounts sum to total");
    let stream = danmaku_gateway::redpacket::redis::settlement_stream(&packet).unwrap();
    assert_eq!(redis.cli(&["XLEN", &stream]), SHARES.to_string());
    let (st, status) = b
        .api("GET", &format!("/api/v1/redpackets/{packet}"), None)
        .await;
    assert_eq!(st, 200, "{status}");
    assert_eq!(status["grabbed"], SHARES);
    assert_eq!(status["total_grabbed"], TOTAL);
    assert_eq!(status["remaining"], 0);
    let grabs = status["grabs"].as_array().unwrap();
    assert_eq!(grabs.len() as u64, SHARES);
    for g in grabs {
        let user = g["user"]["id"].as_str().unwrap();
        assert_eq!(
            amounts.get(user).copied(),
            g["amount"].as_u64(),
            "store and acks disagree for {user}"
        );
    }
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_user_grabbing_on_three_nodes_wins_once() {
    let redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", relaxed).await;
    let b = redis_node(&redis.url(), "node-b", relaxed).await;
    let c = redis_node(&redis.url(), "node-c", relaxed).await;
    let room = "greedy";
    let mut tabs = Vec::new();
    for gw in [&a, &b, &c] {
        tabs.push(connect_joined(gw.addr, "grabby", room).await.0);
    }
    for round in 0..5 {
        let (st, created) = a
            .api(
                "POST",
                &format!("/api/v1/rooms/{room}/redpackets"),
                Some(&json!({"total": 900, "shares": 9, "sender": {"id":"boss","name":"Boss"}})),
            )
            .await;
        assert_eq!(st, 201, "{created}");
        let packet = created["packet"].as_str().unwrap().to_string();
        let mut handles = Vec::new();
        for mut ws in tabs.drain(..) {
            let packet = packet.clone();
            handles.push(tokio::spawn(async move {
                let r = grab_on(&mut ws, "greedy", &packet).await;
                (ws, r)
            }));
        }
        let mut wins = Vec::new();
        for h in handles {
            let (ws, r) = h.await.unwrap();
            tabs.push(ws);
            if r["op"] == "ack" {
                wins.push(r["amount"].as_u64().unwrap());
            } else {
                assert_eq!(r["code"], "already_grabbed", "round {round}: {r}");
            }
        }
        assert_eq!(wins.len(), 1, "round {round}: one success, got {wins:?}");
        let (_, status) = c
            .api("GET", &format!("/api/v1/redpackets/{packet}"), None)
            .await;
        assert_eq!(status["grabbed"], 1, "{status}");
        assert_eq!(status["total_grabbed"], wins[0], "{status}");
        let stream = danmaku_gateway::redpacket::redis::settlement_stream(&packet).unwrap();
        let entries = redis.cli(&["XRANGE", &stream, "-", "+"]);
        assert_eq!(
            entries.matches(packet.as_str()).count(),
            1,
            "one settlement entry for {packet}: {entries}"
        );
    }
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_created_on_one_node_is_listed_and_announced_on_another() {
    let redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", relaxed).await;
    let b = redis_node(&redis.url(), "node-b", relaxed).await;
    let room = "lucky";
    let mut watcher = b.user("watcher", "").await;
    watcher.join(room).await;
    wait_numsub(&redis, room, 1).await;
    let (st, created) = a
        .api(
            "POST",
            &format!("/api/v1/rooms/{room}/redpackets"),
            Some(&json!({"total": 300, "shares": 3, "sender": {"id":"boss","name":"Boss"}, "expires_in_s": 60})),
        )
        .await;
    assert_eq!(st, 201, "{created}");
    let packet = created["packet"].as_str().unwrap().to_string();
    // Announced on B through the backplane.
    let ev = watcher
        .events_until(room, |ev| ev.iter().any(|e| e["type"] == "redpacket"))
        .await;
    let announced = ev.iter().find(|e| e["type"] == "redpacket").unwrap();
    assert_eq!(announced["packet"], packet.as_str());
    assert_eq!(announced["total"], 300);
    assert_eq!(announced["shares"], 3);
    assert_eq!(announced["user"]["id"], "boss");

    // Listed for a viewer joining on B.
    let mut late = b.user("late", "").await;
    let joined = late.join(room).await;
    let listed = joined["redpackets"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{joined}");
    assert_eq!(listed[0]["packet"], packet.as_str());
    assert_eq!(listed[0]["total"], 300);
    assert_eq!(listed[0]["shares"], 3);
    assert_eq!(listed[0]["remaining"], 3);
    assert_eq!(listed[0]["user"]["id"], "boss");
    assert_eq!(listed[0]["expires_at"], announced["expires_at"]);

    // A grab on A shows in B's listing.
    let (mut on_a, _) = connect_joined(a.addr, "grabber", room).await;
    let r = grab_on(&mut on_a, room, &packet).await;
    assert_eq!(r["op"], "ack", "{r}");
    let mut later = b.user("later", "").await;
    let joined = later.join(room).await;
    assert_eq!(joined["redpackets"][0]["remaining"], 2, "{joined}");
    // ... and the grab event reaches the watcher on B.
    let ev = watcher
        .events_until(room, |ev| ev.iter().any(|e| e["type"] == "grab"))
        .await;
    let g = ev.iter().find(|e| e["type"] == "grab").unwrap();
    assert_eq!(g["user"]["id"], "grabber");
    assert_eq!(g["amount"], r["amount"]);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paid_gift_from_api_on_one_node_reaches_members_on_another() {
    let redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", relaxed).await;
    let b = redis_node(&redis.url(), "node-b", relaxed).await;
    let room = "gifts";
    let mut on_b = b.client(&format!("room={room}")).await;
    on_b.recv_op("joined").await;
    wait_numsub(&redis, room, 1).await;
    let (st, body) = a
        .api(
            "POST",
            &format!("/api/v1/rooms/{room}/events"),
            Some(&json!({"type":"gift","user":{"id":"whale","name":"Whale"},"gift":"rocket","count":3})),
        )
        .await;
    assert_eq!(st, 202, "{body}");
    let id = body["id"].as_str().unwrap();
    let ev = on_b
        .events_until(room, |ev| ev.iter().any(|e| e["type"] == "gift"))
        .await;
    let gift = ev.iter().find(|e| e["type"] == "gift").unwrap();
    assert_eq!(gift["id"], id);
    assert_eq!(gift["gift"], "rocket");
    assert_eq!(gift["count"], 3);
    assert_eq!(gift["user"]["id"], "whale");
    // Also a system message, for good measure.
    let (st, _) = a
        .api(
            "POST",
            &format!("/api/v1/rooms/{room}/events"),
            Some(&json!({"type":"system","text":"stream starts"})),
        )
        .await;
    assert_eq!(st, 202);
    on_b.events_until(room, |ev| {
        ev.iter()
            .any(|e| e["type"] == "system" && e["text"] == "stream starts")
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_once_per_room_per_window() {
    const CHATS: usize = 20;
    let redis = RedisServer::start();
    let edit = |cfg: &mut Config| {
        relaxed(cfg);
        cfg.room.batch_ms = 200;
    };
    let a = redis_node(&redis.url(), "node-a", edit).await;
    let b = redis_node(&redis.url(), "node-b", edit).await;
    let room = "batched";
    let mut alice = a.user("alice", "").await;
    let mut bob = b.user("bob", "").await;
    alice.join(room).await;
    bob.join(room).await;
    wait_numsub(&redis, room, 2).await;
    // Nothing is published while nobody writes (presence stays per node).
    let quiet = redis.command_calls("publish");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(redis.command_calls("publish"), quiet, "idle publishes");

    let before = redis.command_calls("publish");
    let started = Instant::now();
    for i in 0..CHATS {
        alice
            .send(json!({"op":"chat","room":room,"text":format!("b-{i}"),"ref":i}))
            .await;
    }
    let sent_in = started.elapsed();
    let last: HashMap<String, String> = [("alice".to_string(), format!("b-{}", CHATS - 1))].into();
    let got = collect_chats(
        &mut bob,
        room,
        &last,
        Duration::from_secs(10),
        Duration::from_millis(10),
    )
    .await;
    assert_eq!(got.len(), CHATS, "bob got {got:?}");
    // Let any straggling window flush before reading the stats.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let published = redis.command_calls("publish") - before;
    assert!(
        (1..=4).contains(&published),
        "{CHATS} chats sent in {sent_in:?} took {published} PUBLISH calls; want one per window"
    );
    a.stop().await;
    b.stop().await;
}
