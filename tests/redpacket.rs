//! Red packets: creation through the HTTP API (and its validation), the `redpacket`,
//! `grab` and `redpacket_done` events, `joined.redpackets`, grabs (exactly once per user,
//! amounts summing exactly), the packet error codes, expiry, the in-flight cap (`busy`),
//! a 2,000-grabber storm, and durability across a SIGKILL of the real binary.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use danmaku_gateway::config::Config;
use danmaku_gateway::protocol::now_ms;
use futures_util::StreamExt;
use serde_json::{Value, json};
use support::{API_TOKEN, Client, Gateway, relax_rate_limits};

async fn gateway(edit: impl FnOnce(&mut Config)) -> Gateway {
    Gateway::start_with(|c| {
        relax_rate_limits(c);
        c.server.drain_s = 0;
        edit(c);
    })
    .await
}

fn sender() -> Value {
    json!({"id":"boss","name":"The Boss"})
}

/// Creates a packet in `room`; returns its id.
async fn create(
    gw: &Gateway,
    room: &str,
    total: u64,
    shares: u32,
    expires_in_s: Option<u64>,
) -> String {
    create_at(gw.addr, room, total, shares, expires_in_s).await
}

async fn create_at(
    addr: SocketAddr,
    room: &str,
    total: u64,
    shares: u32,
    expires_in_s: Option<u64>,
) -> String {
    let mut body = json!({"total":total,"shares":shares,"sender":sender()});
    if let Some(s) = expires_in_s {
        body["expires_in_s"] = json!(s);
    }
    let (status, reply) = api_at(
        addr,
        "POST",
        &format!("/api/v1/rooms/{room}/redpackets"),
        Some(&body),
    )
    .await;
    assert_eq!(status, 201, "{body} -> {reply}");
    let packet = reply["packet"].as_str().expect("201 carries the packet id");
    assert!(!packet.is_empty());
    packet.to_string()
}

async fn api_at(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    support::http(
        addr,
        method,
        path,
        Some(API_TOKEN),
        body.map(|b| b.to_string()).as_deref(),
    )
    .await
}

async fn status_at(addr: SocketAddr, packet: &str) -> Value {
    let (status, body) = api_at(addr, "GET", &format!("/api/v1/redpackets/{packet}"), None).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn grab_op(room: &str, packet: &str) -> Value {
    json!({"op":"grab","room":room,"packet":packet})
}

/// Asserts `reply` is an `error` with `code`, echoing `reference`.
#[track_caller]
fn assert_error(reply: &Value, code: &str, reference: i64) {
    assert_eq!(reply["op"], "error", "expected {code}: {reply}");
    assert_eq!(reply["code"], code, "{reply}");
    assert_eq!(reply["ref"], reference, "{reply}");
    if code != "rate_limited" {
        assert!(
            reply.get("retry_after_ms").is_none(),
            "retry_after_ms comes with rate_limited only: {reply}"
        );
    }
}

/// The amount of a grab `ack`.
#[track_caller]
fn amount(reply: &Value, reference: i64) -> u64 {
    assert_eq!(reply["op"], "ack", "expected a grab ack: {reply}");
    assert_eq!(reply["ref"], reference, "{reply}");
    let a = reply["amount"]
        .as_u64()
        .unwrap_or_else(|| panic!("grab ack without amount: {reply}"));
    assert!(a >= 1, "every share is at least one cent: {reply}");
    a
}

/// Checks a `GET /api/v1/redpackets/{packet}` body for internal consistency and returns
/// its grabs as user id → amount.
#[track_caller]
fn check_status(st: &Value, packet: &str, total: u64, shares: u64) -> HashMap<String, u64> {
    assert_eq!(st["packet"], packet, "{st}");
    assert_eq!(st["total"], total, "{st}");
    assert_eq!(st["shares"], shares, "{st}");
    let grabs = st["grabs"].as_array().expect("grabs is an array");
    let mut by_user = HashMap::new();
    for g in grabs {
        let user = g["user"]["id"].as_str().expect("grab user id").to_string();
        assert!(g["user"]["name"].is_string(), "{g}");
        let a = g["amount"].as_u64().expect("grab amount");
        assert!(a >= 1, "{g}");
        assert!(
            by_user.insert(user.clone(), a).is_none(),
            "user {user} grabbed twice: {st}"
        );
    }
    let grabbed = grabs.len() as u64;
    let sum: u64 = by_user.values().sum();
    assert_eq!(st["grabbed"], grabbed, "{st}");
    assert_eq!(st["total_grabbed"], sum, "{st}");
    assert_eq!(st["remaining"], shares - grabbed, "{st}");
    assert!(sum <= total, "{st}");
    assert!(st["expired"].is_boolean(), "{st}");
    by_user
}

/// Reads frames until a reply (anything but a `batch`) arrives, waiting up to `limit`.
async fn reply_within(c: &mut Client, limit: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let msg = c
            .next_raw(left)
            .await
            .expect("connection ended before the reply");
        if let Some(v) = c.decode(&msg)
            && v["op"] != "batch"
        {
            return v;
        }
    }
}

/// Opens `n` connections of distinct users `{prefix}{i}`, each joined to `room` (via
/// `room=` in the URL), a bounded number at a time.
async fn connect_many(gw: &Gateway, room: &str, prefix: &str, n: usize) -> Vec<(String, Client)> {
    futures_util::stream::iter(0..n)
        .map(|i| {
            let user = format!("{prefix}{i}");
            async move {
                let mut c = gw.user(&user, &format!("room={room}")).await;
                let j = reply_within(&mut c, Duration::from_secs(30)).await;
                assert_eq!(j["op"], "joined", "{j}");
                (user, c)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await
}

/// Every client grabs `packet` at the same instant (a barrier releases them together);
/// returns each user's reply, and the client.
async fn grab_all(
    clients: Vec<(String, Client)>,
    room: &str,
    packet: &str,
) -> Vec<(String, Value, Client)> {
    let barrier = Arc::new(tokio::sync::Barrier::new(clients.len()));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(user, mut c)| {
            let barrier = Arc::clone(&barrier);
            let mut op = grab_op(room, packet);
            op["ref"] = json!(1);
            tokio::spawn(async move {
                barrier.wait().await;
                c.send(op).await;
                let reply = reply_within(&mut c, Duration::from_secs(60)).await;
                (user, reply, c)
            })
        })
        .collect();
    futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("grabber task"))
        .collect()
}

fn settlement_lines(dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("settlement.jsonl")).unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("settlement line {l:?}: {e}")))
        .collect()
}

fn of_type(events: &[Value], kind: &str) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["type"] == kind)
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------------------
// Create, announce, join

#[tokio::test]
async fn create_announces_and_joiners_see_open_packets() {
    let gw = gateway(|_| {}).await;
    let mut member = gw.user("member", "").await;
    member.join("rp").await;
    let before = now_ms();
    let packet = create(&gw, "rp", 1000, 10, Some(60)).await;
    let after = now_ms();

    let events = member
        .events_until("rp", |e| e.iter().any(|e| e["type"] == "redpacket"))
        .await;
    let ev = of_type(&events, "redpacket").remove(0);
    assert_eq!(ev["packet"], packet.as_str(), "{ev}");
    assert_eq!(ev["user"], sender(), "{ev}");
    assert_eq!(ev["total"], 1000, "{ev}");
    assert_eq!(ev["shares"], 10, "{ev}");
    let expires_at = ev["expires_at"].as_u64().expect("expires_at is unix ms");
    assert!(
        (before + 60_000..=after + 60_000).contains(&expires_at),
        "expires_at {expires_at} is 60 s after creation ({before}..{after})"
    );
    assert!(ev["id"].is_string() && ev["ts"].is_u64(), "{ev}");

    // A viewer (anonymous, msgpack) joining now sees it open, with every share left.
    let mut viewer = gw.client("format=msgpack").await;
    let j = viewer
        .call(json!({"op":"join","room":"rp","history":10}), 1)
        .await;
    assert_eq!(j["op"], "joined", "{j}");
    assert_eq!(
        j["redpackets"],
        json!([{"packet":packet,"user":sender(),"total":1000,"shares":10,
                "expires_at":expires_at,"remaining":10}]),
        "{j}"
    );
    // The announcement is in the room's history too.
    assert!(
        j["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "redpacket" && e["packet"] == packet.as_str()),
        "{j}"
    );
    // Another room does not list it.
    let j = viewer
        .call(json!({"op":"join","room":"elsewhere"}), 2)
        .await;
    assert_eq!(j["redpackets"], json!([]), "{j}");

    // After a grab, a joiner sees one share fewer.
    let a = member.call(grab_op("rp", &packet), 3).await;
    amount(&a, 3);
    let mut late = gw.client("").await;
    let j = late.join("rp").await;
    assert_eq!(j["redpackets"][0]["remaining"], 9, "{j}");

    // Without expires_in_s: the default lifetime (redpacket.default_expires_in_s).
    let before = now_ms();
    let p2 = create(&gw, "rp", 50, 5, None).await;
    let default_ms = gw.cfg.redpacket.default_expires_in_s * 1000;
    let events = member
        .events_until("rp", |e| {
            e.iter()
                .any(|e| e["type"] == "redpacket" && e["packet"] == p2.as_str())
        })
        .await;
    let ev = events
        .iter()
        .find(|e| e["type"] == "redpacket" && e["packet"] == p2.as_str())
        .unwrap();
    let exp = ev["expires_at"].as_u64().unwrap();
    assert!(
        exp >= before + default_ms && exp <= now_ms() + default_ms,
        "{ev}"
    );
    // Open packets are listed soonest-expiring first.
    let mut late2 = gw.client("").await;
    let j = late2.join("rp").await;
    let listed: Vec<_> = j["redpackets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["packet"].clone())
        .collect();
    assert_eq!(listed, vec![json!(packet), json!(p2)], "{j}");
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Grabs

#[tokio::test]
async fn grab_acks_amount_broadcasts_and_is_once_per_user() {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", "").await;
    let mut a2 = gw.user("alice", "format=msgpack").await;
    let mut b = gw.user("bob", "format=msgpack").await;
    // Watchers read the room's events (a client waiting for replies skips batches).
    let mut wa = gw.client("").await;
    let mut wb = gw.client("format=msgpack").await;
    for c in [&mut a, &mut a2, &mut b, &mut wa, &mut wb] {
        c.join("g").await;
    }
    let packet = create(&gw, "g", 500, 5, None).await;
    let got = amount(&a.call(grab_op("g", &packet), 7).await, 7);
    // Without a ref, the ack has none.
    b.send(grab_op("g", &packet)).await;
    let r = b.reply().await;
    assert_eq!(r["op"], "ack", "{r}");
    assert!(r.get("ref").is_none(), "{r}");
    let got_b = r["amount"].as_u64().unwrap();

    // Members see both grabs, with the amounts of the acks.
    for c in [&mut wa, &mut wb] {
        let events = c.events_until("g", |e| of_type(e, "grab").len() >= 2).await;
        let grabs = of_type(&events, "grab");
        assert_eq!(grabs.len(), 2, "{events:?}");
        assert_eq!(grabs[0]["packet"], packet.as_str());
        assert_eq!(grabs[0]["user"], json!({"id":"alice","name":"alice"}));
        assert_eq!(grabs[0]["amount"], got);
        assert_eq!(grabs[1]["user"]["id"], "bob");
        assert_eq!(grabs[1]["amount"], got_b);
    }
    // Twice: already_grabbed, from the same or another connection of the user.
    assert_error(
        &a.call(grab_op("g", &packet), 8).await,
        "already_grabbed",
        8,
    );
    assert_error(
        &a2.call(grab_op("g", &packet), 9).await,
        "already_grabbed",
        9,
    );
    let st = status_at(gw.addr, &packet).await;
    let grabs = check_status(&st, &packet, 500, 5);
    assert_eq!(
        grabs,
        HashMap::from([("alice".to_string(), got), ("bob".to_string(), got_b)])
    );
    assert_eq!(st["expired"], false);
    gw.stop().await;
}

#[tokio::test]
async fn last_share_finishes_the_packet() {
    let gw = gateway(|_| {}).await;
    let mut watcher = gw.client("").await;
    watcher.join("done").await;
    let mut users = Vec::new();
    for i in 0..4 {
        let mut c = gw.user(&format!("u{i}"), "").await;
        c.join("done").await;
        users.push(c);
    }
    let packet = create(&gw, "done", 301, 3, None).await;
    let mut amounts = HashMap::new();
    for (i, c) in users.iter_mut().take(3).enumerate() {
        let a = amount(&c.call(grab_op("done", &packet), i as i64).await, i as i64);
        amounts.insert(format!("u{i}"), a);
    }
    assert_eq!(amounts.values().sum::<u64>(), 301, "{amounts:?}");
    assert_error(
        &users[3].call(grab_op("done", &packet), 10).await,
        "packet_empty",
        10,
    );
    // A grabber who already has a share is told so, not that it is empty.
    assert_error(
        &users[0].call(grab_op("done", &packet), 11).await,
        "already_grabbed",
        11,
    );

    let events = watcher
        .events_until("done", |e| !of_type(e, "redpacket_done").is_empty())
        .await;
    let grabs = of_type(&events, "grab");
    assert_eq!(grabs.len(), 3, "{events:?}");
    let done = of_type(&events, "redpacket_done");
    assert_eq!(done.len(), 1, "{events:?}");
    let d = &done[0];
    assert_eq!(d["packet"], packet.as_str(), "{d}");
    assert_eq!(d["grabbed"], 3, "{d}");
    assert_eq!(d["total_grabbed"], 301, "{d}");
    assert_eq!(d["expired"], false, "{d}");
    // `redpacket_done` comes after the last grab.
    let pos = |id: &Value| events.iter().position(|e| e["id"] == *id).unwrap();
    assert!(pos(&d["id"]) > pos(&grabs[2]["id"]), "{events:?}");

    let st = status_at(gw.addr, &packet).await;
    assert_eq!(check_status(&st, &packet, 301, 3), amounts);
    assert_eq!(
        (&st["remaining"], &st["expired"]),
        (&json!(0), &json!(false))
    );
    // A finished packet is no longer open.
    let mut late = gw.client("").await;
    assert_eq!(late.join("done").await["redpackets"], json!([]));
    // No second `redpacket_done` follows for it.
    let (s, _) = gw
        .api(
            "POST",
            "/api/v1/rooms/done/events",
            Some(&json!({"type":"system","text":"end"})),
        )
        .await;
    assert_eq!(s, 202);
    let rest = watcher
        .events_until("done", |e| e.iter().any(|e| e["type"] == "system"))
        .await;
    assert!(of_type(&rest, "redpacket_done").is_empty(), "{rest:?}");
    gw.stop().await;
}

#[tokio::test]
async fn grab_refusals() {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", "").await;
    let mut anon = gw.client("").await;
    a.join("here").await;
    anon.join("here").await;
    let here = create(&gw, "here", 100, 2, None).await;
    let there = create(&gw, "there", 100, 2, None).await;

    assert_error(
        &a.call(grab_op("here", "rp-no-such-packet"), 1).await,
        "packet_not_found",
        1,
    );
    // A packet of another room, grabbed from a room the user is in.
    assert_error(
        &a.call(grab_op("here", &there), 2).await,
        "packet_not_found",
        2,
    );
    // The packet's own room, not joined: not_joined comes first.
    assert_error(&a.call(grab_op("there", &there), 3).await, "not_joined", 3);
    // Anonymous viewers may watch but not grab.
    assert_error(
        &anon.call(grab_op("here", &here), 4).await,
        "unauthorized",
        4,
    );
    assert_error(
        &anon.call(grab_op("here", "rp-no-such-packet"), 5).await,
        "unauthorized",
        5,
    );
    // A bad packet id is a bad frame.
    assert_error(&a.call(grab_op("here", ""), 6).await, "bad_request", 6);
    assert_error(
        &a.call(grab_op("here", &"x".repeat(65)), 7).await,
        "bad_request",
        7,
    );
    assert_error(
        &a.call(json!({"op":"grab","room":"here"}), 8).await,
        "bad_request",
        8,
    );
    // None of it had an effect.
    for p in [&here, &there] {
        let st = status_at(gw.addr, p).await;
        assert_eq!((&st["grabbed"], &st["remaining"]), (&json!(0), &json!(2)));
    }
    // GET of an unknown packet: 404.
    let (status, body) = gw.api("GET", "/api/v1/redpackets/rp-nope", None).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["code"], "packet_not_found", "{body}");
    assert!(body["message"].is_string(), "{body}");
    gw.stop().await;
}

#[tokio::test]
async fn expiry_finishes_the_packet() {
    let gw = gateway(|_| {}).await;
    let mut watcher = gw.client("").await;
    watcher.join("exp").await;
    let mut u1 = gw.user("u1", "").await;
    let mut u2 = gw.user("u2", "").await;
    u1.join("exp").await;
    u2.join("exp").await;
    let packet = create(&gw, "exp", 1000, 5, Some(1)).await;
    let empty = create(&gw, "exp", 10, 2, Some(1)).await;
    // Emptied before its expiry: done once (not expired), and not again at expiry.
    let full = create(&gw, "exp", 10, 1, Some(1)).await;
    let got = amount(&u1.call(grab_op("exp", &packet), 1).await, 1);
    amount(&u2.call(grab_op("exp", &full), 3).await, 3);

    // At expiry, `redpacket_done` with expired = true, for each packet.
    let mut events = watcher
        .events_until("exp", |e| of_type(e, "redpacket_done").len() >= 3)
        .await;
    // Past every packet's expiry, nothing more is announced.
    let (_, st) = gw
        .api("GET", &format!("/api/v1/redpackets/{full}"), None)
        .await;
    let full_expires_at = st["expires_at"].as_u64().unwrap_or(now_ms() + 1000);
    tokio::time::sleep(Duration::from_millis(
        full_expires_at.saturating_sub(now_ms()) + 300,
    ))
    .await;
    let (s, _) = gw
        .api(
            "POST",
            "/api/v1/rooms/exp/events",
            Some(&json!({"type":"system","text":"end"})),
        )
        .await;
    assert_eq!(s, 202);
    events.extend(
        watcher
            .events_until("exp", |e| e.iter().any(|e| e["type"] == "system"))
            .await,
    );
    let done = of_type(&events, "redpacket_done");
    assert_eq!(done.len(), 3, "one redpacket_done per packet: {done:?}");
    let d = done.iter().find(|d| d["packet"] == full.as_str()).unwrap();
    assert_eq!(
        (&d["grabbed"], &d["total_grabbed"], &d["expired"]),
        (&json!(1), &json!(10), &json!(false)),
        "{d}"
    );
    let d = done
        .iter()
        .find(|d| d["packet"] == packet.as_str())
        .unwrap();
    assert_eq!(
        (&d["grabbed"], &d["total_grabbed"], &d["expired"]),
        (&json!(1), &json!(got), &json!(true)),
        "{d}"
    );
    let d = done.iter().find(|d| d["packet"] == empty.as_str()).unwrap();
    assert_eq!(
        (&d["grabbed"], &d["total_grabbed"], &d["expired"]),
        (&json!(0), &json!(0), &json!(true)),
        "{d}"
    );

    assert_error(
        &u2.call(grab_op("exp", &packet), 2).await,
        "packet_expired",
        2,
    );
    let st = status_at(gw.addr, &packet).await;
    let grabs = check_status(&st, &packet, 1000, 5);
    assert_eq!(grabs, HashMap::from([("u1".to_string(), got)]));
    assert_eq!(st["expired"], true, "{st}");
    assert_eq!(st["remaining"], 4, "{st}");
    let st = status_at(gw.addr, &empty).await;
    check_status(&st, &empty, 10, 2);
    assert_eq!(
        (&st["expired"], &st["remaining"]),
        (&json!(true), &json!(2))
    );
    // Expired packets are not open.
    let mut late = gw.client("").await;
    assert_eq!(late.join("exp").await["redpackets"], json!([]));
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Concurrency

/// 2,000 distinct users grab a 500-share packet at the same instant.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storm_of_2000_grabbers_on_500_shares() {
    const USERS: usize = 2000;
    const SHARES: u32 = 500;
    const TOTAL: u64 = 123_456;
    let gw = gateway(|c| {
        c.room.presence_ms = 1000;
        c.room.batch_ms = 50;
        // Every grab broadcast, so the watcher can check each one against the acks.
        c.room.max_grab_events = 0;
    })
    .await;
    let mut watcher = gw.client("room=storm").await;
    assert_eq!(watcher.reply().await["op"], "joined");
    let clients = connect_many(&gw, "storm", "grabber-", USERS).await;
    assert_eq!(clients.len(), USERS);
    let packet = create(&gw, "storm", TOTAL, SHARES, Some(600)).await;
    // The watcher reads all along, so it never falls behind.
    let watch = tokio::spawn(async move {
        let events = watcher
            .events_until("storm", |e| !of_type(e, "redpacket_done").is_empty())
            .await;
        (events, watcher)
    });

    let results = grab_all(clients, "storm", &packet).await;
    let mut won = HashMap::new();
    let mut codes: HashMap<String, usize> = HashMap::new();
    for (user, reply, _) in &results {
        if reply["op"] == "ack" {
            assert!(won.insert(user.clone(), amount(reply, 1)).is_none());
        } else {
            assert_eq!(reply["op"], "error", "{reply}");
            *codes
                .entry(reply["code"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    assert_eq!(won.len(), SHARES as usize, "winners; refusals: {codes:?}");
    assert_eq!(
        codes,
        HashMap::from([("packet_empty".to_string(), USERS - SHARES as usize)]),
        "everyone else is told the packet is empty"
    );
    assert_eq!(won.values().sum::<u64>(), TOTAL, "amounts sum exactly");

    let st = status_at(gw.addr, &packet).await;
    assert_eq!(check_status(&st, &packet, TOTAL, u64::from(SHARES)), won);
    assert_eq!(st["total_grabbed"], TOTAL);
    assert_eq!(st["remaining"], 0);

    let (events, _watcher) = tokio::time::timeout(Duration::from_secs(60), watch)
        .await
        .expect("watcher saw redpacket_done")
        .unwrap();
    let grabs = of_type(&events, "grab");
    assert_eq!(grabs.len(), SHARES as usize);
    let seen: HashMap<String, u64> = grabs
        .iter()
        .map(|g| {
            (
                g["user"]["id"].as_str().unwrap().to_string(),
                g["amount"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(seen, won, "grab events match the acks");
    let done = of_type(&events, "redpacket_done");
    assert_eq!(done.len(), 1);
    assert_eq!(
        (
            &done[0]["grabbed"],
            &done[0]["total_grabbed"],
            &done[0]["expired"]
        ),
        (&json!(SHARES), &json!(TOTAL), &json!(false))
    );
    // One settlement line per grab, matching the acks.
    let lines = settlement_lines(&gw.cfg.data.dir);
    let settled: HashMap<String, u64> = lines
        .iter()
        .filter(|l| l["packet"] == packet.as_str())
        .map(|l| {
            (
                l["user"]["id"].as_str().unwrap().to_string(),
                l["amount"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(lines.len(), SHARES as usize);
    assert_eq!(settled, won);
    drop(results);
    gw.stop().await;
}

/// Beyond `redpacket.max_concurrent_grabs` in flight, a grab answers `busy` and has no
/// effect; retrying later succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn busy_beyond_the_in_flight_cap() {
    const USERS: usize = 300;
    let gw = gateway(|c| {
        c.redpacket.max_concurrent_grabs = 1;
        c.room.presence_ms = 1000;
    })
    .await;
    let mut clients = connect_many(&gw, "busy", "b", USERS).await;
    let mut busy_seen = 0;
    for round in 0..5 {
        let total = 3_000 + round;
        let packet = create(&gw, "busy", total, USERS as u32, None).await;
        let results = grab_all(clients, "busy", &packet).await;
        let mut won = HashMap::new();
        let mut busy = Vec::new();
        let mut back = Vec::new();
        for (user, reply, c) in results {
            match (reply["op"].as_str(), reply["code"].as_str()) {
                (Some("ack"), _) => {
                    won.insert(user.clone(), amount(&reply, 1));
                }
                (Some("error"), Some("busy")) => {
                    assert_eq!(reply["ref"], 1, "{reply}");
                    busy.push(user.clone());
                }
                _ => panic!("{user}: neither a share nor busy: {reply}"),
            }
            back.push((user, c));
        }
        // Busy grabs had no effect: exactly the acked users hold shares.
        let st = status_at(gw.addr, &packet).await;
        assert_eq!(check_status(&st, &packet, total, USERS as u64), won);
        busy_seen += busy.len();
        // Retried one at a time, every busy grabber gets a share.
        let busy: HashSet<String> = busy.into_iter().collect();
        for (user, c) in back.iter_mut().filter(|(u, _)| busy.contains(u)) {
            let r = c.call(grab_op("busy", &packet), 2).await;
            won.insert(user.clone(), amount(&r, 2));
        }
        assert_eq!(won.len(), USERS);
        assert_eq!(won.values().sum::<u64>(), total);
        let st = status_at(gw.addr, &packet).await;
        assert_eq!(check_status(&st, &packet, total, USERS as u64), won);
        clients = back;
        if busy_seen > 0 {
            break;
        }
    }
    assert!(busy_seen > 0, "no grab was ever refused as busy");
    gw.stop().await;
}

/// One user grabbing from three connections at the same instant gets one share.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_user_from_three_connections_gets_one_share() {
    let gw = gateway(|_| {}).await;
    let mut clients = Vec::new();
    for fmt in ["json", "msgpack", "json"] {
        let mut c = gw.user("dup", &format!("format={fmt}&room=dup")).await;
        assert_eq!(c.reply().await["op"], "joined");
        clients.push(("dup".to_string(), c));
    }
    for round in 0..10 {
        let packet = create(&gw, "dup", 100, 10, None).await;
        let results = grab_all(clients, "dup", &packet).await;
        let acks: Vec<_> = results
            .iter()
            .filter(|(_, r, _)| r["op"] == "ack")
            .collect();
        assert_eq!(
            acks.len(),
            1,
            "round {round}: {results:?}",
            results = results.iter().map(|r| &r.1).collect::<Vec<_>>()
        );
        let won = acks[0].1["amount"].as_u64().unwrap();
        for (_, r, _) in results.iter().filter(|(_, r, _)| r["op"] != "ack") {
            assert_error(r, "already_grabbed", 1);
        }
        let st = status_at(gw.addr, &packet).await;
        assert_eq!(
            check_status(&st, &packet, 100, 10),
            HashMap::from([("dup".to_string(), won)])
        );
        clients = results.into_iter().map(|(u, _, c)| (u, c)).collect();
    }
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// The HTTP API's validation, and amount splitting through it

#[tokio::test]
async fn create_validation() {
    let gw = gateway(|_| {}).await;
    let s = sender();
    let cases = [
        (json!({"total":-5,"shares":1,"sender":s}), "total"),
        (json!({"total":0,"shares":1,"sender":s}), "total"),
        (json!({"total":5,"shares":6,"sender":s}), "shares"),
        (json!({"total":5,"shares":0,"sender":s}), "shares"),
        (json!({"total":500000,"shares":100001,"sender":s}), "shares"),
        (json!({"total":100,"shares":-1,"sender":s}), "shares"),
        (
            json!({"total":100,"shares":4294967296u64,"sender":s}),
            "shares",
        ),
        (json!({"total":1e30,"shares":1,"sender":s}), "total"),
        (json!({"total":100.5,"shares":1,"sender":s}), "total"),
        (
            json!({"total":10_000_000_001u64,"shares":1,"sender":s}),
            "total",
        ),
        (json!({"total":u64::MAX,"shares":1,"sender":s}), "total"),
        (json!({"total":"100","shares":1,"sender":s}), "total"),
        (json!({"total":100,"shares":"1","sender":s}), "shares"),
        (json!({"total":100,"shares":1}), "sender"),
        (json!({"shares":1,"sender":s}), "total"),
        (json!({"total":100,"sender":s}), "shares"),
        (json!({"total":100,"shares":1,"sender":"boss"}), "sender"),
        (
            json!({"total":100,"shares":1,"sender":{"id":"boss"}}),
            "name",
        ),
        (
            json!({"total":100,"shares":1,"sender":{"id":"","name":"x"}}),
            "sender.id",
        ),
        (
            json!({"total":100,"shares":1,"sender":s,"expires_in_s":0}),
            "expires_in_s",
        ),
        (
            json!({"total":100,"shares":1,"sender":s,"expires_in_s":-1}),
            "expires_in_s",
        ),
        (
            json!({"total":100,"shares":1,"sender":s,"expires_in_s":86401}),
            "expires_in_s",
        ),
        (
            json!({"total":100,"shares":1,"sender":s,"expires_in_s":"60"}),
            "expires_in_s",
        ),
    ];
    for (body, field) in &cases {
        let (status, reply) = gw
            .api("POST", "/api/v1/rooms/v/redpackets", Some(body))
            .await;
        assert_eq!(status, 400, "{body} -> {reply}");
        assert_eq!(reply["code"], "bad_request", "{body} -> {reply}");
        let msg = reply["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(field),
            "{body}: message should name `{field}`: {reply}"
        );
    }
    // Numbers beyond u64, written out literally.
    for raw in [
        r#"{"total":18446744073709551616,"shares":1,"sender":{"id":"b","name":"b"}}"#,
        r#"{"total":100000000000000000000000000000,"shares":1,"sender":{"id":"b","name":"b"}}"#,
        r#"{"total":100,"shares":1,"sender":{"id":"b","name":"b"},"expires_in_s":99999999999999999999}"#,
    ] {
        let (status, reply) = support::http(
            gw.addr,
            "POST",
            "/api/v1/rooms/v/redpackets",
            Some(API_TOKEN),
            Some(raw),
        )
        .await;
        assert_eq!(status, 400, "{raw} -> {reply}");
        assert_eq!(reply["code"], "bad_request", "{reply}");
        let field = if raw.contains("expires_in_s") {
            "expires_in_s"
        } else {
            "total"
        };
        assert!(
            reply["message"]
                .as_str()
                .unwrap_or_default()
                .contains(field),
            "{raw}: {reply}"
        );
    }
    // Not JSON at all, or empty.
    for raw in ["not json", "", "[]"] {
        let (status, reply) = support::http(
            gw.addr,
            "POST",
            "/api/v1/rooms/v/redpackets",
            Some(API_TOKEN),
            Some(raw),
        )
        .await;
        assert_eq!(status, 400, "{raw:?} -> {reply}");
        assert_eq!(reply["code"], "bad_request", "{reply}");
    }
    // A bad room id in the path.
    let (status, reply) = gw
        .api(
            "POST",
            "/api/v1/rooms/bad%20room/redpackets",
            Some(&json!({"total":100,"shares":1,"sender":sender()})),
        )
        .await;
    assert_eq!(status, 400, "{reply}");
    assert_eq!(reply["code"], "bad_request", "{reply}");
    // Without (or with a wrong) bearer token: 401, for create and for GET.
    let body = json!({"total":100,"shares":1,"sender":sender()}).to_string();
    for token in [None, Some("wrong-token")] {
        let (status, reply) = support::http(
            gw.addr,
            "POST",
            "/api/v1/rooms/v/redpackets",
            token,
            Some(&body),
        )
        .await;
        assert_eq!(status, 401, "{reply}");
        assert_eq!(reply["code"], "unauthorized", "{reply}");
        let (status, reply) =
            support::http(gw.addr, "GET", "/api/v1/redpackets/anything", token, None).await;
        assert_eq!(status, 401, "{reply}");
        assert_eq!(reply["code"], "unauthorized", "{reply}");
    }
    // None of the refused creates made a packet: a member joining sees none, and no
    // `redpacket` event went out.
    let mut c = gw.client("").await;
    let j = c.join("v").await;
    assert_eq!(j["redpackets"], json!([]), "{j}");
    // The limits themselves are accepted.
    let p = create(&gw, "v", 10_000_000_000, 1, Some(86_400)).await;
    check_status(&status_at(gw.addr, &p).await, &p, 10_000_000_000, 1);
    gw.stop().await;
}

#[tokio::test]
async fn split_edge_cases_through_the_api() {
    let gw = gateway(|_| {}).await;
    for (total, shares) in [
        (1u64, 1u32),
        (2, 1),
        (100, 100),
        (100_000, 100_000),
        (100_001, 100_000),
        (10_000_000_000, 100_000),
        (10_000_000_000, 1),
        (7, 3),
    ] {
        let p = create(&gw, "split", total, shares, None).await;
        let st = status_at(gw.addr, &p).await;
        check_status(&st, &p, total, u64::from(shares));
        assert_eq!(
            (
                &st["grabbed"],
                &st["total_grabbed"],
                &st["remaining"],
                &st["expired"]
            ),
            (&json!(0), &json!(0), &json!(shares), &json!(false)),
            "{total}/{shares}: {st}"
        );
    }
    // Small packets grabbed out: every share at least a cent, the sum exact.
    for (total, shares) in [(7u64, 7u32), (10, 3), (1_000_003, 9), (25, 1)] {
        let p = create(&gw, "small", total, shares, None).await;
        let mut got = Vec::new();
        for i in 0..shares {
            let mut c = gw.user(&format!("s{total}-{i}"), "room=small").await;
            assert_eq!(c.reply().await["op"], "joined");
            got.push(amount(&c.call(grab_op("small", &p), 1).await, 1));
        }
        assert_eq!(got.iter().sum::<u64>(), total, "{total}/{shares}: {got:?}");
        if total == u64::from(shares) {
            assert!(got.iter().all(|&a| a == 1), "{got:?}");
        }
        let st = status_at(gw.addr, &p).await;
        check_status(&st, &p, total, u64::from(shares));
        assert_eq!(st["total_grabbed"], total);
        assert_eq!(st["remaining"], 0);
    }
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Durability: the real binary, SIGKILLed mid-packet

/// The gateway binary as a child process; killed (SIGKILL) on drop.
struct Process {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Process {
    /// Starts the binary with a config file naming a free port and `data_dir`.
    async fn start(work: &Path, data_dir: &Path) -> Process {
        let port = support::free_port();
        let config = work.join(format!("gateway-{port}.toml"));
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nnode_id = \"restart-node\"\ndrain_s = 0\n\
             shards = 2\n\n[auth]\nsecret = {secret:?}\n\n[api]\ntoken = {api:?}\n\n\
             [room]\nbatch_ms = 20\n\n[data]\ndir = {dir:?}\n",
            secret = support::SECRET,
            api = API_TOKEN,
            dir = data_dir.to_str().unwrap(),
        );
        std::fs::write(&config, text).unwrap();
        let log = std::fs::File::create(work.join(format!("gateway-{port}.log"))).unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_danmaku-gateway"));
        cmd.arg("--config")
            .arg(&config)
            .current_dir(work)
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, _) in std::env::vars() {
            if k.starts_with("GATEWAY_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd.spawn().expect("spawn the gateway binary");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut p = Process { child, addr };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!("gateway exited early with {status}; see {}", work.display());
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                let (status, _) = support::http(addr, "GET", "/readyz", None, None).await;
                if status == 200 {
                    return p;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gateway did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A user's connection joined to `room`.
    async fn user(&self, user: &str, room: &str) -> Client {
        let query = format!("token={}&room={room}", support::token(user, user));
        let mut c = support::client_at(self.addr, &query).await;
        let j = c.reply().await;
        assert_eq!(j["op"], "joined", "{j}");
        c
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test]
async fn grabs_survive_a_sigkill() {
    let work = support::temp_dir("restart");
    std::fs::create_dir_all(&work).unwrap();
    let data: PathBuf = work.join("data");
    const TOTAL: u64 = 1_000;
    const SHARES: u32 = 10;
    const SHORT_S: u64 = 4;

    let mut first = Process::start(&work, &data).await;
    let packet = create_at(first.addr, "rs", TOTAL, SHARES, Some(600)).await;
    // A second packet that expires soon after the restart: its timer must be re-armed.
    let short = create_at(first.addr, "rs", 50, 5, Some(SHORT_S)).await;
    let short_expires_at = status_at(first.addr, &short).await["expires_at"]
        .as_u64()
        .unwrap_or(now_ms() + SHORT_S * 1000);
    let mut c = first.user("short-grabber", "rs").await;
    let short_amount = amount(&c.call(grab_op("rs", &short), 1).await, 1);
    let mut before = HashMap::new();
    for i in 0..4 {
        let user = format!("early{i}");
        let mut c = first.user(&user, "rs").await;
        before.insert(user, amount(&c.call(grab_op("rs", &packet), 1).await, 1));
    }
    assert_eq!(
        check_status(&status_at(first.addr, &packet).await, &packet, TOTAL, 10),
        before
    );
    first.kill(); // SIGKILL: no drain, no flush beyond what was fsynced.
    assert!(data.join("redpackets.journal").is_file());

    let second = Process::start(&work, &data).await;
    let restarted_at = now_ms();
    // The grabs are kept.
    let st = status_at(second.addr, &packet).await;
    assert_eq!(check_status(&st, &packet, TOTAL, 10), before);
    assert_eq!(st["expired"], false, "{st}");
    // A joiner sees the packet still open, with the shares that are left.
    let mut watcher = second.user("watcher", "rs").await;
    let j = watcher.call(json!({"op":"join","room":"rs"}), 1).await;
    let open = j["redpackets"].as_array().unwrap();
    let listed = open
        .iter()
        .find(|p| p["packet"] == packet.as_str())
        .unwrap_or_else(|| panic!("packet not open after restart: {j}"));
    assert_eq!(listed["remaining"], 6, "{j}");
    assert_eq!(listed["total"], TOTAL, "{j}");
    // Earlier grabbers cannot grab again.
    for user in before.keys() {
        let mut c = second.user(user, "rs").await;
        assert_error(
            &c.call(grab_op("rs", &packet), 2).await,
            "already_grabbed",
            2,
        );
    }
    // New users take the rest; the sum is exact.
    let mut all = before.clone();
    for i in 0..6 {
        let user = format!("late{i}");
        let mut c = second.user(&user, "rs").await;
        all.insert(user, amount(&c.call(grab_op("rs", &packet), 3).await, 3));
    }
    let mut c = second.user("too-late", "rs").await;
    assert_error(&c.call(grab_op("rs", &packet), 4).await, "packet_empty", 4);
    assert_eq!(all.values().sum::<u64>(), TOTAL);
    let st = status_at(second.addr, &packet).await;
    assert_eq!(check_status(&st, &packet, TOTAL, 10), all);
    assert_eq!(st["total_grabbed"], TOTAL);
    // The packet finishes after the restart like any other; and the short packet
    // expires on the restarted node, with `redpacket_done` (expired) — checked live
    // unless the restart itself took about as long as the packet lived.
    let live = restarted_at + 500 < short_expires_at;
    let done_for = |e: &[Value], p: &str| {
        of_type(e, "redpacket_done")
            .into_iter()
            .find(|d| d["packet"] == p)
    };
    let events = watcher
        .events_until("rs", |e| {
            done_for(e, &packet).is_some() && (!live || done_for(e, &short).is_some())
        })
        .await;
    let d = done_for(&events, &packet).unwrap();
    assert_eq!(
        (&d["grabbed"], &d["total_grabbed"], &d["expired"]),
        (&json!(SHARES), &json!(TOTAL), &json!(false)),
        "{d}"
    );
    if live {
        let d = done_for(&events, &short).unwrap();
        assert_eq!(
            (&d["grabbed"], &d["total_grabbed"], &d["expired"]),
            (&json!(1), &json!(short_amount), &json!(true)),
            "{d}"
        );
    } else {
        eprintln!("the restart took too long to see the short packet expire live");
        let wait = short_expires_at.saturating_sub(now_ms()) + 100;
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    let st = status_at(second.addr, &short).await;
    check_status(&st, &short, 50, 5);
    assert_eq!(
        (&st["expired"], &st["remaining"]),
        (&json!(true), &json!(4))
    );

    // One settlement line per grab, before and after the restart.
    let lines: Vec<Value> = settlement_lines(&data)
        .into_iter()
        .filter(|l| l["packet"] != short.as_str())
        .collect();
    assert_eq!(settlement_lines(&data).len(), SHARES as usize + 1);
    assert_eq!(lines.len(), SHARES as usize, "{lines:?}");
    let settled: HashMap<String, u64> = lines
        .iter()
        .map(|l| {
            assert_eq!(l["packet"], packet.as_str(), "{l}");
            assert_eq!(l["room"], "rs", "{l}");
            (
                l["user"]["id"].as_str().unwrap().to_string(),
                l["amount"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(settled, all);
    assert!(data.join("redpackets.journal").is_file());
    drop(second);
    let _ = std::fs::remove_dir_all(&work);
}

/// A grab storm is not broadcast in full: at most `room.max_grab_events` grab events per
/// window reach the room, each of them a real grab; the rest are counted, and
/// `redpacket_done` still carries the totals.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grab_storm_broadcast_is_capped_per_window() {
    const USERS: usize = 300;
    const CAP: usize = 10;
    let gw = gateway(|c| {
        c.room.batch_ms = 50;
        c.room.max_grab_events = CAP as u64;
    })
    .await;
    let mut watcher = gw.client("room=capped").await;
    assert_eq!(watcher.reply().await["op"], "joined");
    let clients = connect_many(&gw, "capped", "capped-", USERS).await;
    let packet = create(&gw, "capped", 30_000, USERS as u32, Some(600)).await;
    let sampled_before = support::metric(gw.addr, "danmaku_grab_events_sampled_out_total").await;
    let watch = tokio::spawn(async move {
        let mut frames = Vec::new();
        loop {
            let v = watcher.recv_op("batch").await;
            let done = v["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["type"] == "redpacket_done");
            frames.push(v);
            if done {
                return frames;
            }
        }
    });
    let results = grab_all(clients, "capped", &packet).await;
    let won: HashMap<String, u64> = results
        .iter()
        .map(|(user, reply, _)| (user.clone(), amount(reply, 1)))
        .collect();
    assert_eq!(won.len(), USERS);
    let frames = tokio::time::timeout(Duration::from_secs(60), watch)
        .await
        .expect("watcher saw redpacket_done")
        .unwrap();
    let mut seen = 0;
    for f in &frames {
        let grabs = of_type(f["events"].as_array().unwrap(), "grab");
        assert!(
            grabs.len() <= CAP,
            "{} grab events in one window",
            grabs.len()
        );
        for g in &grabs {
            let user = g["user"]["id"].as_str().unwrap();
            assert_eq!(
                Some(&g["amount"].as_u64().unwrap()),
                won.get(user),
                "a real grab"
            );
        }
        seen += grabs.len();
    }
    assert!(seen < USERS, "the storm was not capped: {seen} grab events");
    let done: Vec<Value> = frames
        .iter()
        .flat_map(|f| of_type(f["events"].as_array().unwrap(), "redpacket_done"))
        .collect();
    assert_eq!(
        (&done[0]["grabbed"], &done[0]["total_grabbed"]),
        (&json!(USERS), &json!(30_000))
    );
    let sampled = support::metric(gw.addr, "danmaku_grab_events_sampled_out_total").await;
    assert!(
        sampled - sampled_before >= (USERS - seen) as f64,
        "{sampled_before} -> {sampled}, seen {seen}"
    );
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// How a packet ended, and telling it after a restart

/// A packet emptied before its deadline ended emptied: its status keeps saying
/// `expired: false` after the deadline, as its `redpacket_done` did.
#[tokio::test]
async fn a_packet_emptied_before_its_deadline_never_reports_expired() {
    let gw = gateway(|_| {}).await;
    let mut u = gw.user("emptier", "").await;
    u.join("emptied").await;
    let packet = create(&gw, "emptied", 10, 1, Some(1)).await;
    amount(&u.call(grab_op("emptied", &packet), 1).await, 1);
    let st = status_at(gw.addr, &packet).await;
    let expires_at = st["expires_at"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(
        expires_at.saturating_sub(now_ms()) + 300,
    ))
    .await;
    let st = status_at(gw.addr, &packet).await;
    assert_eq!(
        (&st["expired"], &st["remaining"], &st["grabbed"]),
        (&json!(false), &json!(0), &json!(1)),
        "{st}"
    );
    gw.stop().await;
}

/// The `redpacket_done` events of `packet` among a room's history.
async fn done_in_history(p: &Process, watcher: &str, room: &str, packet: &str) -> Vec<Value> {
    let mut c = p.user(watcher, room).await;
    let joined = c
        .call(json!({"op":"join","room":room,"history":100}), 1)
        .await;
    assert_eq!(joined["op"], "joined", "{joined}");
    of_type(joined["history"].as_array().unwrap(), "redpacket_done")
        .into_iter()
        .filter(|d| d["packet"] == packet)
        .collect()
}

/// A packet that expired while the gateway was down was never announced as ended; the
/// restarted gateway announces it (once: not again at the next restart).
#[tokio::test]
async fn a_packet_that_expired_while_down_is_announced_after_the_restart() {
    let work = support::temp_dir("down");
    std::fs::create_dir_all(&work).unwrap();
    let data: PathBuf = work.join("data");
    let mut first = Process::start(&work, &data).await;
    let packet = create_at(first.addr, "down", 30, 3, Some(1)).await;
    let expires_at = status_at(first.addr, &packet).await["expires_at"]
        .as_u64()
        .unwrap();
    let mut c = first.user("grabber", "down").await;
    let got = amount(&c.call(grab_op("down", &packet), 1).await, 1);
    first.kill();
    tokio::time::sleep(Duration::from_millis(
        expires_at.saturating_sub(now_ms()) + 200,
    ))
    .await;

    let mut second = Process::start(&work, &data).await;
    let mut done = Vec::new();
    for i in 0..100 {
        // A new watcher each time: joins are rate limited per user.
        done = done_in_history(&second, &format!("w{i}"), "down", &packet).await;
        if !done.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(
        (
            &done[0]["grabbed"],
            &done[0]["total_grabbed"],
            &done[0]["expired"]
        ),
        (&json!(1), &json!(got), &json!(true)),
        "{done:?}"
    );
    let st = status_at(second.addr, &packet).await;
    assert_eq!(
        (&st["expired"], &st["remaining"]),
        (&json!(true), &json!(2))
    );
    // The announcement is journaled before the next restart.
    let journal = data.join("redpackets.journal");
    for _ in 0..100 {
        if std::fs::read_to_string(&journal)
            .unwrap()
            .contains("\"t\":\"expired\"")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    second.kill();

    let third = Process::start(&work, &data).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        done_in_history(&third, "late", "down", &packet)
            .await
            .is_empty(),
        "announced once"
    );
    drop(third);
    let _ = std::fs::remove_dir_all(&work);
}
