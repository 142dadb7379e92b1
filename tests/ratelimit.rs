//! Rate limits (PROTOCOL.md "Default per-user limits"): per-user budgets shared by all of
//! a user's connections, honest `retry_after_ms`, no effect for a refused op, the chat,
//! free-gift, grab and join budgets, anonymous viewers per connection (and per IP only
//! with `ratelimit.anon_per_ip`), and the per-room chat broadcast budget
//! `room.max_chat_per_s`; and across nodes (Redis), that every unit a node admitted
//! is charged to the user's budget exactly once.

mod support;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use danmaku_gateway::config::{Config, Rate, RateLimitConfig, RedisConfig};
use danmaku_gateway::ratelimit::{Action, Key, RateLimits};
use danmaku_gateway::redis_link::RedisLink;
use serde_json::{Value, json};
use support::{Client, ConnectOpts, Gateway, RedisServer, metric, relax_rate_limits};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

async fn gateway(edit: impl FnOnce(&mut Config)) -> Gateway {
    Gateway::start_with(|c| {
        relax_rate_limits(c);
        c.server.drain_s = 0;
        edit(c);
    })
    .await
}

fn rate(rate: f64, burst: u32) -> Rate {
    Rate { rate, burst }
}

fn chat(room: &str, text: &str) -> Value {
    json!({"op":"chat","room":room,"text":text})
}

/// Asserts `reply` is `rate_limited` (echoing `reference`) and returns `retry_after_ms`.
#[track_caller]
fn limited(reply: &Value, reference: i64) -> u64 {
    assert_eq!(reply["op"], "error", "expected rate_limited: {reply}");
    assert_eq!(reply["code"], "rate_limited", "{reply}");
    assert_eq!(reply["ref"], reference, "{reply}");
    let retry = reply["retry_after_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("rate_limited without retry_after_ms: {reply}"));
    assert!(retry > 0, "{reply}");
    retry
}

#[track_caller]
fn acked(reply: &Value, reference: i64) {
    assert_eq!(reply["op"], "ack", "expected ack: {reply}");
    assert_eq!(reply["ref"], reference, "{reply}");
}

/// Posts a `system` event `marker` and collects `room`'s events on `c` through it.
async fn events_through_marker(
    gw: &Gateway,
    c: &mut Client,
    room: &str,
    marker: &str,
) -> Vec<Value> {
    let (status, body) = gw
        .api(
            "POST",
            &format!("/api/v1/rooms/{room}/events"),
            Some(&json!({"type":"system","text": marker})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    c.events_until(room, |evs| {
        evs.iter()
            .any(|e| e["type"] == "system" && e["text"] == marker)
    })
    .await
}

fn of_type(events: &[Value], kind: &str) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["type"] == kind)
        .cloned()
        .collect()
}

fn texts(events: &[Value]) -> Vec<String> {
    of_type(events, "chat")
        .iter()
        .map(|e| e["text"].as_str().unwrap().to_string())
        .collect()
}

async fn create_packet(gw: &Gateway, room: &str, total: u64, shares: u32) -> String {
    let (status, body) = gw
        .api(
            "POST",
            &format!("/api/v1/rooms/{room}/redpackets"),
            Some(&json!({"total":total,"shares":shares,"sender":{"id":"boss","name":"Boss"}})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    body["packet"].as_str().unwrap().to_string()
}

// ---------------------------------------------------------------------------------------
// Chat

#[tokio::test]
async fn chat_budget_is_shared_by_a_users_connections() {
    let gw = gateway(|c| c.ratelimit.chat = rate(0.2, 3)).await;
    let mut a1 = gw.user("alice", "").await;
    let mut a2 = gw.user("alice", "format=msgpack").await;
    let mut bob = gw.user("bob", "").await;
    let mut watcher = gw.client("").await;
    for c in [&mut a1, &mut a2, &mut bob, &mut watcher] {
        c.join("r").await;
    }
    let limited_before = metric(gw.addr, "danmaku_rate_limited_total{action=\"chat\"}").await;

    acked(&a1.call(chat("r", "a1-1"), 1).await, 1);
    acked(&a2.call(chat("r", "a2-1"), 2).await, 2);
    acked(&a1.call(chat("r", "a1-2"), 3).await, 3);
    // Burst 3 spent between the two tabs: both are refused now.
    let retry = limited(&a2.call(chat("r", "a2-refused"), 4).await, 4);
    assert!(
        retry <= 5_000,
        "one unit refills in 5 s at 0.2/s: retry_after_ms {retry}"
    );
    limited(&a1.call(chat("r", "a1-refused"), 5).await, 5);
    // Another user has a budget of their own.
    acked(&bob.call(chat("r", "bob-1"), 6).await, 6);

    // Nothing is broadcast for a refused chat.
    let events = events_through_marker(&gw, &mut watcher, "r", "chat-marker").await;
    assert_eq!(
        texts(&events),
        ["a1-1", "a2-1", "a1-2", "bob-1"],
        "{events:?}"
    );
    let limited_after = metric(gw.addr, "danmaku_rate_limited_total{action=\"chat\"}").await;
    assert!(
        limited_after - limited_before >= 2.0,
        "{limited_before} -> {limited_after}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn retry_after_ms_is_honest() {
    // One chat per 500 ms, no burst beyond one.
    let gw = gateway(|c| c.ratelimit.chat = rate(2.0, 1)).await;
    let mut a = gw.user("alice", "").await;
    let mut watcher = gw.client("").await;
    a.join("r").await;
    watcher.join("r").await;

    acked(&a.call(chat("r", "first"), 1).await, 1);
    let retry = limited(&a.call(chat("r", "too-soon"), 2).await, 2);
    assert!(
        (100..=500).contains(&retry),
        "the next unit is at most 500 ms away (and not already here): {retry}"
    );
    // Much earlier than told: still refused, and the new estimate is shorter.
    tokio::time::sleep(Duration::from_millis(retry / 5)).await;
    let retry2 = limited(&a.call(chat("r", "still-too-soon"), 3).await, 3);
    assert!(retry2 < retry, "{retry2} < {retry}");
    // Waiting exactly what the server said is enough.
    tokio::time::sleep(Duration::from_millis(retry2)).await;
    acked(&a.call(chat("r", "second"), 4).await, 4);
    // ... and the budget is spent again right after.
    let retry3 = limited(&a.call(chat("r", "third-too-soon"), 5).await, 5);
    tokio::time::sleep(Duration::from_millis(retry3)).await;
    acked(&a.call(chat("r", "third"), 6).await, 6);

    let events = events_through_marker(&gw, &mut watcher, "r", "honest-marker").await;
    assert_eq!(texts(&events), ["first", "second", "third"], "{events:?}");
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Free gifts, grabs, joins

#[tokio::test]
async fn free_gift_budget_is_per_user() {
    let gw = gateway(|c| c.ratelimit.gift = rate(0.1, 3)).await;
    let mut a1 = gw.user("alice", "").await;
    let mut a2 = gw.user("alice", "").await;
    let mut bob = gw.user("bob", "").await;
    let mut watcher = gw.client("").await;
    for c in [&mut a1, &mut a2, &mut bob, &mut watcher] {
        c.join("g").await;
    }
    let gift = |g: &str| json!({"op":"gift","room":"g","gift":g});
    acked(&a1.call(gift("rose"), 1).await, 1);
    acked(&a2.call(gift("heart"), 2).await, 2);
    acked(&a1.call(gift("rose"), 3).await, 3);
    let retry = limited(&a2.call(gift("rose"), 4).await, 4);
    assert!(retry <= 10_000, "{retry}");
    limited(&a1.call(gift("heart"), 5).await, 5);
    acked(&bob.call(gift("rose"), 6).await, 6);
    // The chat budget is a separate one.
    acked(&a1.call(chat("g", "still chatting"), 7).await, 7);

    let events = events_through_marker(&gw, &mut watcher, "g", "gift-marker").await;
    let count = |user: &str, g: &str| -> u64 {
        of_type(&events, "gift")
            .iter()
            .filter(|e| e["user"]["id"] == user && e["gift"] == g)
            .map(|e| e["count"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(
        (count("alice", "rose"), count("alice", "heart")),
        (2, 1),
        "refused gifts are not broadcast: {events:?}"
    );
    assert_eq!(count("bob", "rose"), 1);
    gw.stop().await;
}

#[tokio::test]
async fn grab_budget_is_per_user_and_comes_before_packet_codes() {
    let gw = gateway(|c| c.ratelimit.grab = rate(2.0, 2)).await;
    let mut a1 = gw.user("alice", "").await;
    let mut a2 = gw.user("alice", "").await;
    a1.join("rp").await;
    a2.join("rp").await;
    let p1 = create_packet(&gw, "rp", 100, 5).await;
    let p2 = create_packet(&gw, "rp", 100, 5).await;
    let p3 = create_packet(&gw, "rp", 100, 5).await;
    let grab = |p: &str| json!({"op":"grab","room":"rp","packet":p});

    let r = a1.call(grab(&p1), 1).await;
    assert!(r["amount"].as_u64().is_some(), "{r}");
    let r = a2.call(grab(&p2), 2).await;
    assert!(r["amount"].as_u64().is_some(), "{r}");
    // Budget (burst 2) spent across both connections.
    let retry = limited(&a1.call(grab(&p3), 3).await, 3);
    assert!(retry <= 500, "{retry}");
    // rate_limited comes before the packet's own codes.
    limited(&a2.call(grab("no-such-packet"), 4).await, 4);
    limited(&a2.call(grab(&p1), 5).await, 5);
    // The refused grab had no effect.
    let (status, st) = gw
        .api("GET", &format!("/api/v1/redpackets/{p3}"), None)
        .await;
    assert_eq!(status, 200, "{st}");
    assert_eq!((&st["grabbed"], &st["remaining"]), (&json!(0), &json!(5)));
    // Once the budget refills the same grab goes through.
    tokio::time::sleep(Duration::from_millis(retry)).await;
    let r = a1.call(grab(&p3), 6).await;
    assert_eq!(r["op"], "ack", "{r}");
    assert!(r["amount"].as_u64().is_some_and(|a| a >= 1), "{r}");
    let (_, st) = gw
        .api("GET", &format!("/api/v1/redpackets/{p3}"), None)
        .await;
    assert_eq!(st["grabbed"], 1, "{st}");
    assert_eq!(st["grabs"][0]["user"]["id"], "alice", "{st}");
    gw.stop().await;
}

#[tokio::test]
async fn join_budget_is_per_user() {
    let gw = gateway(|c| {
        c.ratelimit.join = rate(2.0, 3);
        c.limits.rooms_per_conn = 2;
    })
    .await;
    let mut a1 = gw.user("alice", "").await;
    let mut a2 = gw.user("alice", "").await;
    let join = |room: &str| json!({"op":"join","room":room});
    assert_eq!(a1.call(join("j1"), 1).await["op"], "joined");
    assert_eq!(a2.call(join("j2"), 2).await["op"], "joined");
    assert_eq!(a1.call(join("j1b"), 3).await["op"], "joined");
    let retry = limited(&a2.call(join("j3"), 4).await, 4);
    assert!(retry <= 500, "{retry}");
    limited(&a1.call(join("j4"), 5).await, 5);
    // The refused join had no effect: a2 is in j2 only.
    let (_, room) = gw.api("GET", "/api/v1/rooms/j3", None).await;
    assert_eq!(room["online"], 0, "{room}");

    tokio::time::sleep(Duration::from_millis(retry)).await;
    let j = a2.call(join("j3"), 6).await;
    assert_eq!(j["op"], "joined", "{j}");
    assert_eq!(j["online"], 1, "{j}");
    // rate_limited comes before the op's own too_many_rooms: a2 is in 2 rooms (the cap)
    // and its budget is spent again.
    let (_, room) = gw.api("GET", "/api/v1/rooms/j2", None).await;
    assert_eq!(room["online"], 1, "{room}");
    let e = a2.call(join("j5"), 7).await;
    limited(&e, 7);
    let retry = e["retry_after_ms"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(retry)).await;
    let e = a2.call(join("j5"), 8).await;
    assert_eq!(e["code"], "too_many_rooms", "{e}");
    gw.stop().await;
}

/// Sends `op` (with increasing refs) until it is refused; returns how many passed, how
/// long that took, and the refusal's `retry_after_ms`.
async fn count_until_limited(c: &mut Client, op: impl Fn(usize) -> Value) -> (u64, Duration, u64) {
    let started = Instant::now();
    for i in 0..1000 {
        let mut frame = op(i);
        frame["ref"] = json!(i);
        let r = c.call(frame, i as i64).await;
        if r["op"] == "error" && r["code"] == "rate_limited" {
            return (i as u64, started.elapsed(), limited(&r, i as i64));
        }
    }
    panic!("never rate limited");
}

/// Asserts `passed` is the burst, give or take what refilled at `rate` per second while
/// sending; and `retry` is at most one refill period.
#[track_caller]
fn assert_budget(what: &str, (passed, spent, retry): (u64, Duration, u64), rate: f64, burst: u64) {
    let refilled = (spent.as_secs_f64() * rate).ceil() as u64;
    assert!(
        (burst..=burst + refilled).contains(&passed),
        "{what}: {passed} passed in {spent:?}, burst {burst} at {rate}/s"
    );
    let period_ms = (1000.0 / rate).ceil() as u64;
    assert!(
        retry <= period_ms,
        "{what}: retry_after_ms {retry} > {period_ms}"
    );
}

/// PROTOCOL.md defaults (rate per second / burst): chat 1/5, free gifts 10/20, grab 5/5,
/// join 5/10.
#[tokio::test]
async fn default_limits_match_the_protocol() {
    let gw = Gateway::start_with(|c| c.server.drain_s = 0).await;
    assert_eq!(gw.cfg.ratelimit, Config::default().ratelimit);
    let mut c = gw.user("dflt", "").await;
    // Distinct rooms: past `limits.rooms_per_conn` the join is `too_many_rooms`, which
    // comes after the rate limit, so it still spends the budget.
    let room = |i: usize| json!({"op":"join","room":format!("d{i}")});
    // One join is spent here; the rest of the join budget is counted below.
    c.join("d").await;
    let r = count_until_limited(&mut c, |i| chat("d", &format!("c{i}"))).await;
    assert_budget("chat", r, 1.0, 5);
    let r = count_until_limited(
        &mut c,
        |i| json!({"op":"gift","room":"d","gift": if i % 2 == 0 { "rose" } else { "heart" }}),
    )
    .await;
    assert_budget("gift", r, 10.0, 20);
    // A grab of an unknown packet passes the budget check, then is not found.
    let r = count_until_limited(&mut c, |_| grab_op("d", "rp-unknown")).await;
    assert_budget("grab", r, 5.0, 5);
    let (passed, spent, retry) = count_until_limited(&mut c, room).await;
    assert_budget("join", (passed + 1, spent, retry), 5.0, 10);
    // Anonymous viewers: join 5/10 per connection.
    let mut anon = gw.client("").await;
    let r = count_until_limited(&mut anon, room).await;
    assert_budget("anonymous join", r, 5.0, 10);
    gw.stop().await;
}

fn grab_op(room: &str, packet: &str) -> Value {
    json!({"op":"grab","room":room,"packet":packet})
}

// ---------------------------------------------------------------------------------------
// Anonymous viewers

const OTHER_IP: &str = "127.0.0.2";

#[tokio::test]
async fn anonymous_joins_are_limited_per_connection() {
    let gw = gateway(|c| c.ratelimit.join = rate(0.1, 3)).await;
    let mut c1 = gw.client("").await;
    let mut c2 = gw.client("").await;
    let join = |room: &str| json!({"op":"join","room":room});
    for (i, room) in ["a", "b", "c"].into_iter().enumerate() {
        assert_eq!(c1.call(join(room), i as i64).await["op"], "joined");
    }
    let retry = limited(&c1.call(join("d"), 10).await, 10);
    assert!(retry <= 10_000, "{retry}");
    // Same IP, another connection: a budget of its own (no per-IP budget by default).
    for (i, room) in ["a", "b", "c"].into_iter().enumerate() {
        assert_eq!(c2.call(join(room), 20 + i as i64).await["op"], "joined");
    }
    limited(&c2.call(join("d"), 30).await, 30);
    // A third one, even with `room=` in the URL, still gets its own.
    let mut c3 = gw.client("room=a").await;
    assert_eq!(c3.reply().await["op"], "joined");
    assert_eq!(c3.call(join("b"), 40).await["op"], "joined");
    gw.stop().await;
}

#[tokio::test]
async fn anonymous_joins_share_a_per_ip_budget_when_configured() {
    let gw = gateway(|c| {
        c.ratelimit.join = rate(0.1, 3);
        c.ratelimit.anon_per_ip = Some(rate(0.1, 4));
    })
    .await;
    let join = |room: &str| json!({"op":"join","room":room});
    let mut c1 = gw.client("").await;
    let mut c2 = gw.client("").await;
    for (i, room) in ["a", "b", "c"].into_iter().enumerate() {
        assert_eq!(c1.call(join(room), i as i64).await["op"], "joined");
    }
    // The address has one unit left of 4, whatever connection spends it.
    assert_eq!(c2.call(join("a"), 10).await["op"], "joined");
    let retry = limited(&c2.call(join("b"), 11).await, 11);
    assert!(retry <= 10_000, "{retry}");
    let mut c3 = gw.client("").await;
    limited(&c3.call(join("a"), 12).await, 12);

    // Another address has its own budget.
    let ip: IpAddr = OTHER_IP.parse().unwrap();
    let opts = ConnectOpts {
        local_ip: Some(ip),
        ..Default::default()
    };
    let mut other = gw.client_opts("", &opts).await;
    assert_eq!(other.call(join("a"), 20).await["op"], "joined");
    // Authenticated users are not subject to the anonymous per-IP budget.
    let mut u = gw.user("alice", "").await;
    for (i, room) in ["a", "b", "c"].into_iter().enumerate() {
        assert_eq!(u.call(join(room), 30 + i as i64).await["op"], "joined");
    }
    gw.stop().await;
}

/// PROTOCOL.md: "A refused op has no effect." With `anon_per_ip` on, an anonymous join
/// refused by the per-IP budget must not spend the connection's own budget.
#[tokio::test]
async fn join_refused_by_the_ip_budget_spends_no_connection_budget() {
    let gw = gateway(|c| {
        // Per connection: 2 joins, then one per 10 s.
        c.ratelimit.join = rate(0.1, 2);
        // Per IP: 1 join, then one per 200 ms.
        c.ratelimit.anon_per_ip = Some(rate(5.0, 1));
    })
    .await;
    let join = |room: &str| json!({"op":"join","room":room});
    let mut c1 = gw.client("").await;
    let mut c2 = gw.client("").await;
    assert_eq!(c1.call(join("a"), 1).await["op"], "joined");
    // c2 is refused twice by the IP budget (its own budget is untouched: 2 left).
    let mut retry = limited(&c2.call(join("a"), 2).await, 2);
    let e = c2.call(join("a"), 3).await;
    if e["op"] == "error" {
        retry = limited(&e, 3);
    }
    tokio::time::sleep(Duration::from_millis(retry)).await;
    // The IP budget has refilled; c2 has never joined anything, so it may join now.
    let j = c2.call(join("a"), 4).await;
    assert_eq!(j["op"], "joined", "{j}");
    gw.stop().await;
}

/// An anonymous connection spamming joins past its own budget must not drain the
/// per-IP budget: everyone else behind the same (NAT) address keeps theirs.
#[tokio::test]
async fn a_spamming_connection_leaves_the_ip_budget_to_its_neighbours() {
    let gw = gateway(|c| {
        // Per connection: 1 join, then one per 1000 s.
        c.ratelimit.join = rate(0.001, 1);
        // Per IP: 3 joins, then one per 1000 s.
        c.ratelimit.anon_per_ip = Some(rate(0.001, 3));
    })
    .await;
    let join = |room: &str| json!({"op":"join","room":room});
    let mut spammer = gw.client("").await;
    assert_eq!(spammer.call(join("a"), 1).await["op"], "joined");
    for i in 0..10 {
        let retry = limited(&spammer.call(join("b"), 10 + i).await, 10 + i);
        assert!(retry > 900_000, "its own budget refuses: {retry}");
    }
    // The address has its two other units, whoever spends them.
    let mut n1 = gw.client("").await;
    let mut n2 = gw.client("").await;
    assert_eq!(n1.call(join("a"), 30).await["op"], "joined");
    assert_eq!(n2.call(join("a"), 31).await["op"], "joined");
    let mut n3 = gw.client("").await;
    limited(&n3.call(join("a"), 32).await, 32);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// The per-room chat budget

#[tokio::test]
async fn room_chat_budget_samples_out_the_broadcast() {
    const BUDGET: u64 = 3;
    const SENT: usize = 12;
    let gw = gateway(|c| c.room.max_chat_per_s = BUDGET).await;
    let mut sender = gw.user("sender", "").await;
    sender.join("hot").await;
    let mut watcher = gw.client("").await;
    watcher.join("hot").await;
    let sampled_before = metric(gw.addr, "danmaku_chat_sampled_out_total").await;

    // Pipelined: all sent at once, then every frame read (acks and batches alike).
    let started = Instant::now();
    for i in 0..SENT {
        let mut op = chat("hot", &format!("m{i}"));
        op["ref"] = json!(i);
        sender.send(op).await;
    }
    let mut frames = sender
        .frames_until(|f| support::ops_of(f, "ack").len() == SENT)
        .await;
    let spent = started.elapsed();
    // Above the budget chat is still acknowledged, each one.
    let acks = support::ops_of(&frames, "ack");
    let refs: Vec<i64> = acks.iter().map(|a| a["ref"].as_i64().unwrap()).collect();
    assert_eq!(refs, (0..SENT as i64).collect::<Vec<_>>());
    assert!(support::ops_of(&frames, "error").is_empty(), "{frames:?}");

    let events = events_through_marker(&gw, &mut watcher, "hot", "budget-marker").await;
    let shown = texts(&events);
    // One-second windows touched while sending: at most BUDGET chats each.
    let windows = spent.as_secs() + 2;
    assert!(
        shown.len() as u64 >= BUDGET && (shown.len() as u64) <= BUDGET * windows,
        "{} of {SENT} shown over {spent:?}: {shown:?}",
        shown.len()
    );
    assert!(shown.len() < SENT, "nothing sampled out: {shown:?}");
    // The first BUDGET chats of the room are always shown; order is kept.
    assert_eq!(shown[..BUDGET as usize], ["m0", "m1", "m2"], "{shown:?}");
    let mut sorted = shown.clone();
    sorted.sort_by_key(|t| t[1..].parse::<usize>().unwrap());
    assert_eq!(sorted, shown, "broadcast chat keeps its order");
    // Sampled-out chat is counted (only this test of the binary samples chat out).
    let sampled_after = metric(gw.addr, "danmaku_chat_sampled_out_total").await;
    assert_eq!(
        sampled_after - sampled_before,
        (SENT - shown.len()) as f64,
        "every chat not shown is counted"
    );
    // The sender sees exactly what everyone sees: its sampled-out chat was acked only.
    frames.extend(
        sender
            .frames_until(|f| {
                support::events_of(f, "hot", "system")
                    .iter()
                    .any(|e| e["text"] == "budget-marker")
            })
            .await,
    );
    assert_eq!(texts(&support::batch_events(&frames, "hot")), shown);

    // Other events are not budgeted, and the next second has a fresh budget.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    acked(&sender.call(chat("hot", "later"), 100).await, 100);
    let events = events_through_marker(&gw, &mut watcher, "hot", "later-marker").await;
    assert_eq!(texts(&events), ["later"], "{events:?}");
    gw.stop().await;
}

#[tokio::test]
async fn room_chat_budget_is_per_room() {
    let gw = gateway(|c| c.room.max_chat_per_s = 2).await;
    let mut a = gw.user("alice", "").await;
    let mut watcher = gw.client("").await;
    for c in [&mut a, &mut watcher] {
        c.join("x").await;
        c.join("y").await;
    }
    let mut r = 0;
    for room in ["x", "y"] {
        for i in 0..2 {
            r += 1;
            acked(&a.call(chat(room, &format!("{room}{i}")), r).await, r);
        }
    }
    for room in ["x", "y"] {
        let (status, body) = gw
            .api(
                "POST",
                &format!("/api/v1/rooms/{room}/events"),
                Some(&json!({"type":"system","text":"marker"})),
            )
            .await;
        assert_eq!(status, 202, "{body}");
    }
    let frames = watcher
        .frames_until(|f| {
            ["x", "y"]
                .iter()
                .all(|room| !support::events_of(f, room, "system").is_empty())
        })
        .await;
    // Each room has its own budget of 2: all four chats are shown.
    assert_eq!(texts(&support::batch_events(&frames, "x")), ["x0", "x1"]);
    assert_eq!(texts(&support::batch_events(&frames, "y")), ["y0", "y1"]);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// The cluster-wide budget (Redis): every unit a node admitted is charged

/// Rate limits of one simulated node on `redis`, believing `nodes` nodes are live.
struct Node {
    limits: Arc<RateLimits>,
    stop: CancellationToken,
}

impl Node {
    async fn start(redis: &RedisServer, cfg: &RateLimitConfig, nodes: usize) -> Self {
        let stop = CancellationToken::new();
        let link = RedisLink::start(
            RedisConfig {
                url: redis.url(),
                ..RedisConfig::default()
            },
            &stop,
            &TaskTracker::new(),
        );
        assert!(link.wait_up(Duration::from_secs(5)).await, "redis link up");
        let limits = RateLimits::clustered(cfg, link, Arc::new(move || nodes));
        Node { limits, stop }
    }

    async fn chat(&self, user: &str) -> Result<(), u64> {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        self.limits
            .check(Action::Chat, &Key::User(user.into()), ip)
            .await
            .map_err(|e| e.retry_after_ms.unwrap())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One unit per 1000 s: nothing refills while a test runs.
const SLOW_PERIOD_MS: f64 = 1_000_000.0;

fn slow_chat(burst: u32) -> RateLimitConfig {
    RateLimitConfig {
        chat: rate(1000.0 / SLOW_PERIOD_MS, burst),
        ..RateLimitConfig::default()
    }
}

/// Units Redis has charged to `user`'s chat budget (its arrival time ahead of now, in
/// periods; nothing refills within a test).
fn charged(redis: &RedisServer, user: &str) -> u64 {
    let tat: f64 = redis
        .cli(&["GET", &format!("danmaku:rl:chat:{user}")])
        .parse()
        .unwrap_or(0.0);
    let time = redis.cli(&["TIME"]);
    let mut parts = time.lines().map(|l| l.trim().parse::<f64>().unwrap());
    let now_ms = parts.next().unwrap() * 1000.0 + parts.next().unwrap() / 1000.0;
    ((tat - now_ms) / SLOW_PERIOD_MS).round().max(0.0) as u64
}

/// A user bursting on two nodes at once: each node spends its share of the budget
/// locally, and a node whose report comes back refused must still have its units charged,
/// else the user's overdraft is forgotten and every burst gets ~40% over the budget.
#[tokio::test]
async fn units_spent_on_two_nodes_are_all_charged_even_when_refused() {
    const BURST: u64 = 10;
    let redis = RedisServer::start();
    let a = Node::start(&redis, &slow_chat(BURST as u32), 2).await;
    let b = Node::start(&redis, &slow_chat(BURST as u32), 2).await;
    let mut admitted = 0;
    let mut refusals = 0;
    let mut last_retry = 0;
    // Alternate until both nodes refused a few times in a row.
    while refusals < 6 {
        for node in [&a, &b] {
            match node.chat("alice").await {
                Ok(()) => {
                    admitted += 1;
                    refusals = 0;
                }
                Err(retry) => {
                    refusals += 1;
                    last_retry = retry;
                }
            }
        }
        assert!(admitted <= 2 * BURST, "never refused: {admitted}");
    }
    a.limits.flush().await;
    b.limits.flush().await;
    assert_eq!(
        charged(&redis, "alice"),
        admitted,
        "every admitted unit is charged in Redis"
    );
    // The overdraft (units the shares let through past the budget) is paid back first:
    // the refusal's wait is for one unit after all of them.
    let debt_ms = (admitted + 1 - BURST) as f64 * SLOW_PERIOD_MS;
    assert!(
        (debt_ms - 60_000.0..=debt_ms).contains(&(last_retry as f64)),
        "retry_after_ms {last_retry} for {admitted} admitted of {BURST}"
    );
}

/// A share that expires with units spent from it (the user moved to another node or
/// stopped) is reported by the sweep, not forgotten.
#[tokio::test]
async fn the_sweep_reports_units_of_expired_shares() {
    let redis = RedisServer::start();
    let node = Node::start(&redis, &slow_chat(10), 1).await;
    // The first check asks Redis (1 unit charged) and gets a share of the 9 left.
    for _ in 0..4 {
        node.chat("bob").await.unwrap();
    }
    assert_eq!(charged(&redis, "bob"), 1, "3 units spent from the share");
    // Shares live five seconds.
    tokio::time::sleep(Duration::from_millis(5_200)).await;
    node.limits.sweep().await;
    assert_eq!(charged(&redis, "bob"), 4);
}

/// Many checks for one user at once on one node (small shares, so they are renewed
/// often and concurrently): no unit is lost or counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_checks_charge_every_unit_once() {
    let redis = RedisServer::start();
    // 50 "live nodes": shares of a few units, renewed all the time.
    let node = Arc::new(Node::start(&redis, &slow_chat(400), 50).await);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let node = Arc::clone(&node);
            tokio::spawn(async move {
                let mut admitted = 0u64;
                for _ in 0..100 {
                    if node.chat("carol").await.is_ok() {
                        admitted += 1;
                    }
                    // Interleave with the other tasks (as sessions do), so a share is
                    // being spent by some while others renew it.
                    tokio::task::yield_now().await;
                }
                admitted
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += t.await.unwrap();
    }
    node.limits.flush().await;
    assert!(admitted > 0 && admitted <= 400, "{admitted}");
    assert_eq!(charged(&redis, "carol"), admitted);
}
