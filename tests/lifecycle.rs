//! A connection's life and death: server pings, idle close 4000, oversized frames 1009,
//! the graceful drain (1001, `/readyz` 503, upgrades refused, `run` returns), and the
//! slow-consumer policy (chat dropped, close 4010 for undroppable events).

mod support;

use std::time::{Duration, Instant};

use danmaku_gateway::config::Config;
use serde_json::json;
use support::{ConnectOpts, Ending, Gateway, WAIT, metric, relax_rate_limits, wait_until};
use tokio_tungstenite::tungstenite::Message;

const CLOSED_4000: &str = "danmaku_connections_closed_total{code=\"4000\"}";
const CLOSED_4010: &str = "danmaku_connections_closed_total{code=\"4010\"}";
const CLOSED_1009: &str = "danmaku_connections_closed_total{code=\"1009\"}";
const CLOSED_1001: &str = "danmaku_connections_closed_total{code=\"1001\"}";
const OUTBOUND_DROPPED: &str = "danmaku_outbound_dropped_total";

async fn gateway(edit: impl FnOnce(&mut Config)) -> Gateway {
    Gateway::start_with(|c| {
        relax_rate_limits(c);
        c.server.drain_s = 0;
        edit(c);
    })
    .await
}

#[tokio::test]
async fn server_pings_arrive_and_pongs_keep_the_connection() {
    let gw = gateway(|c| c.server.heartbeat_ms = 200).await;
    let mut c = gw.user("alice", "").await;
    assert_eq!(c.hello["heartbeat_ms"], 200);
    // Reading answers pings (the client library pongs), so the connection lives on well
    // past 2 × heartbeat.
    let start = Instant::now();
    let mut pings = 0;
    while pings < 5 {
        match c.next_raw(WAIT).await {
            Some(Message::Ping(_)) => pings += 1,
            Some(Message::Close(f)) => panic!("closed while answering pings: {f:?}"),
            Some(_) => {}
            None => panic!("stream ended"),
        }
    }
    assert!(
        start.elapsed() >= Duration::from_millis(4 * 200),
        "pings come every heartbeat, not faster: 5 in {:?}",
        start.elapsed()
    );
    let p = c.call(json!({"op":"ping"}), 1).await;
    assert_eq!(p["op"], "pong");
    gw.stop().await;
}

#[tokio::test]
async fn silent_connection_is_closed_4000() {
    let gw = gateway(|c| c.server.heartbeat_ms = 200).await;
    let before = metric(gw.addr, CLOSED_4000).await;
    let mut c = gw.client("").await;
    // Read nothing (so no pong goes out) until the server gave up on us.
    wait_until("idle close counted", async || {
        metric(gw.addr, CLOSED_4000).await > before
    })
    .await;
    // What is waiting for us: a few pings, then the close frame.
    assert_eq!(c.ending().await, Ending::Close(4000));
    gw.stop().await;
}

#[tokio::test]
async fn client_frames_alone_keep_the_connection() {
    // A client that sends data frames but never reads (so never pongs) is not idle.
    let gw = gateway(|c| c.server.heartbeat_ms = 200).await;
    let mut c = gw.client("").await;
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_millis(1200) {
        c.send(json!({"op":"ping","ref":n})).await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // All the pongs are there, in order, and no close frame.
    let mut next = 0;
    while next < n {
        match c.next_raw(WAIT).await {
            Some(m @ Message::Text(_)) => {
                let v = c.decode(&m).unwrap();
                assert_eq!(v, json!({"op":"pong","ref":next}));
                next += 1;
            }
            Some(Message::Close(f)) => panic!("closed although the client talked: {f:?}"),
            Some(_) => {}
            None => panic!("stream ended"),
        }
    }
    gw.stop().await;
}

#[tokio::test]
async fn frame_over_max_frame_bytes_is_closed_1009() {
    let gw = gateway(|c| c.limits.max_frame_bytes = 1024).await;
    for fmt in ["json", "msgpack"] {
        let before = metric(gw.addr, CLOSED_1009).await;
        let mut c = gw.user("alice", &format!("format={fmt}")).await;
        c.join("r").await;
        // Just under the limit: an ordinary refusal (text too long), the socket stays.
        let under = json!({"op":"chat","room":"r","text":"x".repeat(900)});
        let e = c.call(under, 1).await;
        assert_eq!(e["code"], "too_large", "{e}");
        // Over it: close 1009.
        c.send(json!({"op":"chat","room":"r","text":"x".repeat(2000)}))
            .await;
        assert_eq!(c.ending().await, Ending::Close(1009), "{fmt}");
        wait_until("1009 counted", async || {
            metric(gw.addr, CLOSED_1009).await > before
        })
        .await;
    }
    gw.stop().await;
}

#[tokio::test]
async fn drain_closes_1001_refuses_upgrades_and_run_returns() {
    let drain_s = 2;
    let mut gw = gateway(|c| c.server.drain_s = drain_s).await;
    let (status, _) = support::http(gw.addr, "GET", "/readyz", None, None).await;
    assert_eq!(status, 200);
    let before = metric(gw.addr, CLOSED_1001).await;
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut c = gw.user(&format!("u{i}"), "").await;
        c.join("r").await;
        clients.push(c);
    }
    let mut anon = gw.client("format=msgpack").await;
    anon.join("r").await;
    clients.push(anon);

    let start = Instant::now();
    gw.begin_shutdown();
    let addr = gw.addr;
    wait_until("/readyz turns 503", async || {
        support::http(addr, "GET", "/readyz", None, None).await.0 == 503
    })
    .await;
    let (status, body) = support::http(addr, "GET", "/readyz", None, None).await;
    assert_eq!(status, 503);
    assert!(body["code"].is_string(), "{body}");
    // Closes are spread over the drain window: the node still answers, but refuses new
    // sockets (the clients above are very unlikely to have all gone already).
    let (status, _, body) = gw.upgrade_raw("", &[], None).await;
    assert_eq!(status, 503, "upgrade during drain: {body}");
    assert!(body["code"].is_string(), "{body}");
    assert!(body["message"].is_string(), "{body}");

    for c in &mut clients {
        assert_eq!(c.ending().await, Ending::Close(1001));
    }
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(drain_s) + Duration::from_secs(3),
        "drain took {took:?}"
    );
    gw.join().await;
    // Every session ended before `run` returned, each counted as a 1001.
    assert!(support::metric_local(CLOSED_1001) >= before + 4.0);
    // After `run` returned, nothing listens.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn drain_with_no_connections_returns_promptly() {
    let mut gw = gateway(|c| c.server.drain_s = 1).await;
    let (status, _) = support::http(gw.addr, "GET", "/healthz", None, None).await;
    assert_eq!(status, 200);
    gw.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(10), gw.join())
        .await
        .expect("run returns after the drain");
}

/// Posts a chat of `chars` characters into `room` through the API.
async fn post_big_chat(gw: &Gateway, room: &str, chars: usize) {
    let (status, body) = gw
        .api(
            "POST",
            &format!("/api/v1/rooms/{room}/events"),
            Some(&json!({"type":"chat","user":{"id":"bot","name":"Bot"},"text":"z".repeat(chars)})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
}

/// Posts big chats into `room` until the gateway drops some for a slow consumer;
/// returns how many were posted.
async fn flood_until_dropped(gw: &Gateway, room: &str, chars: usize) -> usize {
    let before = metric(gw.addr, OUTBOUND_DROPPED).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut posted = 0;
    loop {
        for _ in 0..10 {
            post_big_chat(gw, room, chars).await;
            posted += 1;
        }
        if metric(gw.addr, OUTBOUND_DROPPED).await > before {
            return posted;
        }
        assert!(
            Instant::now() < deadline,
            "no batch dropped after {posted} chats of {chars} chars to a client that never reads"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_loses_chat_then_is_closed_4010_for_undroppable_events() {
    let chars = 60_000;
    let gw = gateway(|c| {
        c.limits.outbound_queue = 4;
        c.limits.max_text_chars = chars;
        c.room.history_len = 5;
        c.room.presence_ms = 60_000;
        // The flood must reach the member; the byte budget would sample it out.
        c.room.max_chat_bytes_per_s = 0;
    })
    .await;
    // Small kernel buffers, so the socket backs up after a few megabytes at most.
    let small = ConnectOpts {
        recv_buffer: Some(4096),
        ..Default::default()
    };

    // Phase 1: a member that stops reading loses chat batches but stays connected.
    let mut slow = gw.client_opts("", &small).await;
    slow.join("slow-chat").await;
    let posted = flood_until_dropped(&gw, "slow-chat", chars).await;
    // Reading again, it gets what was kept and then everything new, and was never
    // closed. A system event posted after the flood marks the end: every chat the room
    // saw before it that was not dropped arrives before it.
    slow.send(json!({"op":"ping","ref":1})).await;
    let mut frames = Vec::new();
    loop {
        let v = slow.recv().await;
        let pong = v["op"] == "pong";
        frames.push(v);
        if pong {
            break;
        }
    }
    let (status, _) = gw
        .api(
            "POST",
            "/api/v1/rooms/slow-chat/events",
            Some(&json!({"type":"system","text":"still here"})),
        )
        .await;
    assert_eq!(status, 202);
    let rest = slow
        .frames_until(|f| {
            support::events_of(f, "slow-chat", "system")
                .iter()
                .any(|e| e["text"] == "still here")
        })
        .await;
    frames.extend(rest);
    let received = support::events_of(&frames, "slow-chat", "chat").len();
    assert!(
        received < posted,
        "all {posted} chats were kept for a client that did not read (got {received})"
    );
    assert!(received > 0, "the slow member got no chat at all");

    // Phase 2: a member too slow for an undroppable (system) event is closed with 4010.
    // Keep its socket backed up with chat and post system events until one finds its
    // queue full (chat alone never closes it: phase 1).
    let closed_before = metric(gw.addr, CLOSED_4010).await;
    let mut stuck = gw.client_opts("", &small).await;
    stuck.join("slow-system").await;
    flood_until_dropped(&gw, "slow-system", chars).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _) = gw
            .api(
                "POST",
                "/api/v1/rooms/slow-system/events",
                Some(&json!({"type":"system","text":"must arrive"})),
            )
            .await;
        assert_eq!(status, 202);
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(200) {
            if metric(gw.addr, CLOSED_4010).await > closed_before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if metric(gw.addr, CLOSED_4010).await > closed_before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a client that never reads was not closed 4010 for system events"
        );
        for _ in 0..10 {
            post_big_chat(&gw, "slow-system", chars).await;
        }
    }
    // A stuck socket may never get the close frame: accept it or the stream ending.
    match stuck.ending().await {
        Ending::Close(code) => assert_eq!(code, 4010),
        Ending::Gone => {}
    }
    // The closed member left the room.
    wait_until("the closed member left", async || {
        let (_, room) = gw.api("GET", "/api/v1/rooms/slow-system", None).await;
        room["online"] == 0
    })
    .await;
    // The reader of phase 1 was not touched by any of this.
    let p = slow.call(json!({"op":"ping"}), 2).await;
    assert_eq!(p["op"], "pong");
    gw.stop().await;
}
