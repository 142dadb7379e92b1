//! The outbound frame bound (PROTOCOL.md v1.1): no frame over
//! `limits.max_out_frame_bytes`; a large window is cut into several `batch` frames in
//! order; `joined.history` is trimmed to fit; nobody is closed because a window was big.
//! And the shipped chat byte budget: a member of a flooded room gets ~256 KiB/s of chat.

mod support;

use std::time::Duration;

use danmaku_gateway::config::Config;
use futures_util::StreamExt;
use serde_json::{Value, json};
use support::{Client, Gateway, metric};
use tokio_tungstenite::tungstenite::Message;

const BOUND: usize = 262_144;

async fn gateway(edit: impl FnOnce(&mut Config)) -> Gateway {
    Gateway::start_with(|c| {
        c.server.drain_s = 0;
        c.room.presence_ms = 60_000;
        edit(c);
    })
    .await
}

/// Reads frames until `done` holds for the batch events of `room` collected so far;
/// every frame's size is checked against the bound. Returns (events, batch frames).
async fn collect(
    c: &mut Client,
    room: &str,
    done: impl Fn(&[Value]) -> bool,
) -> (Vec<Value>, usize) {
    let (mut events, mut frames) = (Vec::new(), 0);
    while !done(&events) {
        let msg = tokio::time::timeout(Duration::from_secs(20), c.ws.next())
            .await
            .expect("timed out waiting for frames")
            .expect("stream ended")
            .expect("socket error");
        let v: Value = match &msg {
            Message::Text(t) => {
                assert!(t.len() <= BOUND, "a frame of {} bytes", t.len());
                serde_json::from_str(t).unwrap()
            }
            Message::Close(f) => panic!("closed: {f:?}"),
            _ => continue,
        };
        if v["op"] == "batch" && v["room"] == room {
            frames += 1;
            // Presence may come along whenever the room's count changed; not counted.
            events.extend(
                v["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|e| e["type"] != "presence")
                    .cloned(),
            );
        }
    }
    (events, frames)
}

async fn post(gw: &Gateway, room: &str, body: Value) -> String {
    let (status, reply) = gw
        .api("POST", &format!("/api/v1/rooms/{room}/events"), Some(&body))
        .await;
    assert_eq!(status, 202, "{reply}");
    reply["id"].as_str().unwrap().to_owned()
}

/// 300 signed-in users × 5 chats of 200 emoji in one window: a window of ~1.4 MB,
/// which before the bound closed every member (1006). Now it arrives cut, intact, in
/// order, and every sender is still connected.
#[tokio::test]
async fn a_huge_window_arrives_cut_in_order_and_nobody_is_closed() {
    let gw = gateway(|c| {
        c.room.batch_ms = 500;
        // The byte budget would sample most of this out; the bound is what is tested.
        c.room.max_chat_bytes_per_s = 0;
    })
    .await;
    let mut observer = gw.client("").await;
    observer.join("hot").await;
    let text = "😀".repeat(200);
    let mut senders = Vec::new();
    for i in 0..300 {
        let mut c = gw.user(&format!("u{i}"), "").await;
        c.join("hot").await;
        senders.push(c);
    }
    // Send everything as fast as possible (replies read afterwards), so it lands in
    // one or two windows.
    for c in &mut senders {
        for k in 0..5 {
            c.send(json!({"op":"chat","room":"hot","text":text,"ref":k}))
                .await;
        }
    }
    let (events, frames) = collect(&mut observer, "hot", |e| e.len() >= 1500).await;
    assert_eq!(events.len(), 1500);
    assert!(
        frames >= 6,
        "a ~1.4 MB window needs at least 6 frames, got {frames}"
    );
    assert!(events.iter().all(|e| e["text"] == text.as_str()));
    // Per sender, its chats in send order (the room's order keeps each sender's order).
    for i in 0..300 {
        let id = format!("u{i}");
        let n = events
            .iter()
            .filter(|e| e["user"]["id"] == id.as_str())
            .count();
        assert_eq!(n, 5, "{id}");
    }
    // Every sender got its acks and is still served.
    for c in &mut senders {
        let mut acks = 0;
        while acks < 5 {
            let v = c.recv().await;
            if v["op"] == "ack" {
                acks += 1;
            }
        }
        let pong = c.call(json!({"op":"ping"}), 77).await;
        assert_eq!(pong["op"], "pong");
    }
    assert_eq!(
        gw.api("GET", "/api/v1/rooms/hot", None).await.1["online"],
        301
    );
    gw.stop().await;
}

/// 30 concurrent 60 KB system events from the API reach every reader.
#[tokio::test]
async fn thirty_large_api_events_reach_every_reader() {
    let gw = gateway(|c| c.room.batch_ms = 200).await;
    let mut readers = Vec::new();
    for _ in 0..5 {
        let mut c = gw.client("").await;
        c.join("big").await;
        readers.push(c);
    }
    let big = "x".repeat(60_000);
    let posts = (0..30).map(|i| {
        let gw = &gw;
        let body = json!({"type":"system","text":format!("{i}:{big}")});
        async move { post(gw, "big", body).await }
    });
    futures_util::future::join_all(posts).await;
    for c in &mut readers {
        let (events, frames) = collect(c, "big", |e| e.len() >= 30).await;
        assert_eq!(events.len(), 30);
        assert!(frames >= 8, "1.8 MB needs at least 8 frames, got {frames}");
        let mut seen: Vec<u32> = events
            .iter()
            .map(|e| {
                e["text"]
                    .as_str()
                    .unwrap()
                    .split(':')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..30).collect::<Vec<_>>());
    }
    gw.stop().await;
}

/// A room whose history holds more than 1 MiB answers `join` with `history: 100`, the
/// history trimmed from its oldest end to fit the bound.
#[tokio::test]
async fn join_with_a_huge_history_is_answered_trimmed() {
    let gw = gateway(|c| c.room.batch_ms = 20).await;
    let mut keeper = gw.client("").await;
    keeper.join("hist").await;
    let big = "y".repeat(60_000);
    let mut ids = Vec::new();
    for i in 0..100 {
        ids.push(
            post(
                &gw,
                "hist",
                json!({"type":"system","text":format!("{i}:{big}")}),
            )
            .await,
        );
    }
    collect(&mut keeper, "hist", |e| e.len() >= 100).await;
    for format in ["json", "msgpack"] {
        let mut c = gw.client(&format!("format={format}")).await;
        c.send(json!({"op":"join","room":"hist","history":100,"ref":1}))
            .await;
        let msg = tokio::time::timeout(Duration::from_secs(10), c.ws.next())
            .await
            .expect("joined in time")
            .expect("open")
            .expect("no error");
        let len = match &msg {
            Message::Text(t) => t.len(),
            Message::Binary(b) => b.len(),
            other => panic!("{other:?}"),
        };
        assert!(len <= BOUND, "{format}: joined of {len} bytes");
        let joined = c.decode(&msg).expect("decodes");
        assert_eq!(joined["op"], "joined", "{format}");
        let history = joined["history"].as_array().unwrap();
        // 4 events of ~60 KB fit in 256 KiB; the newest ones, oldest first.
        assert!(
            (3..=4).contains(&history.len()),
            "{format}: {}",
            history.len()
        );
        let got: Vec<&str> = history.iter().map(|e| e["id"].as_str().unwrap()).collect();
        let want: Vec<&str> = ids[100 - history.len()..]
            .iter()
            .map(String::as_str)
            .collect();
        assert_eq!(got, want, "{format}");
    }
    gw.stop().await;
}

/// With the shipped budget, a flood of chat reaches a member at ~256 KiB/s at most; the
/// rest is acked but sampled out, and counted.
#[tokio::test]
async fn the_default_chat_byte_budget_bounds_what_a_member_receives() {
    let gw = gateway(|c| {
        c.room.batch_ms = 50;
        assert_eq!(c.room.max_chat_bytes_per_s, 262_144, "the shipped default");
    })
    .await;
    let mut observer = gw.client("").await;
    observer.join("flood").await;
    // 10 API posts per user id (no client rate limit on the API) of ~800 bytes each:
    // 1,500 chats, ~1.3 MB offered within about a second.
    let text = "弹".repeat(200);
    let started = std::time::Instant::now();
    let posts = (0..1500).map(|i| {
        let gw = &gw;
        let body = json!({"type":"chat","user":{"id":format!("u{i}"),"name":"n"},"text":text});
        async move { post(gw, "flood", body).await }
    });
    futures_util::stream::iter(posts)
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let offered_for = started.elapsed();
    // Everything accepted so far has been flushed within two windows.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut bytes = 0usize;
    let mut chats = 0usize;
    while let Ok(Some(Ok(msg))) =
        tokio::time::timeout(Duration::from_millis(300), observer.ws.next()).await
    {
        if let Message::Text(t) = &msg {
            let v: Value = serde_json::from_str(t).unwrap();
            if v["op"] == "batch" {
                bytes += t.len();
                chats += v["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|e| e["type"] == "chat")
                    .count();
            }
        }
    }
    // One budget per started second, plus frame overhead.
    let seconds = offered_for.as_secs() as usize + 1;
    assert!(
        bytes <= seconds * (262_144 + 16_384),
        "{bytes} bytes of chat in {offered_for:?}"
    );
    assert!(chats > 0 && chats < 1500, "{chats} chats delivered");
    let sampled = metric(gw.addr, "danmaku_chat_sampled_out_total").await as usize;
    assert_eq!(sampled + chats, 1500, "every chat delivered or counted");
    gw.stop().await;
}
