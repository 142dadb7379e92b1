//! Leading-edge windows (issue 11): a quiet room's first event goes out at once, what
//! follows inside `room.batch_ms` goes together when that is up (never sooner), and a
//! busy room still gets one batch per window. Windows of 500 ms make the difference
//! between "at once" and "at the next tick" plain on a loaded machine.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Client, Gateway, relax_rate_limits};

const BATCH: Duration = Duration::from_millis(500);
/// "At once": the event's way through the gateway, with room for a loaded CI machine,
/// far below the 500 ms a tick could make it wait.
const AT_ONCE: Duration = Duration::from_millis(150);

async fn gateway() -> Gateway {
    Gateway::start_with(|c| {
        relax_rate_limits(c);
        c.server.drain_s = 0;
        c.room.batch_ms = BATCH.as_millis() as u64;
        // No presence events: the room's batches are the test's chats only.
        c.room.presence_ms = 60_000;
    })
    .await
}

fn chat(room: &str, text: &str) -> Value {
    json!({"op":"chat","room":room,"text":text})
}

/// The next batch of `room` holding chat: when it arrived, and its chat texts in order.
async fn next_chats(c: &mut Client, room: &str) -> (Instant, Vec<String>) {
    loop {
        let f = c.recv_op("batch").await;
        let at = Instant::now();
        if f["room"] != room {
            continue;
        }
        let texts: Vec<String> = f["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "chat")
            .map(|e| e["text"].as_str().unwrap().to_owned())
            .collect();
        if !texts.is_empty() {
            return (at, texts);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_rooms_chat_goes_at_once_and_the_next_window_waits_batch_ms() {
    let gw = gateway().await;
    let mut alice = gw.user("alice", "").await;
    let mut bob = gw.client("").await;
    alice.join("q").await;
    bob.join("q").await;

    // Nothing was sent in the room yet: the first chat goes at once.
    let t0 = Instant::now();
    alice.send(chat("q", "first")).await;
    let (first_at, texts) = next_chats(&mut bob, "q").await;
    assert_eq!(texts, ["first"]);
    let took = first_at - t0;
    assert!(took < AT_ONCE, "a quiet room's chat took {took:?}");

    // Two chats 50 ms apart, right after: both go in the next window, together, which
    // is flushed no sooner than 500 ms after the first one (flushed after t0) — and
    // promptly then, not a whole window later.
    alice.send(chat("q", "second")).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    alice.send(chat("q", "third")).await;
    let (window_at, texts) = next_chats(&mut bob, "q").await;
    assert_eq!(texts, ["second", "third"], "one window, one batch");
    let after = window_at - t0;
    assert!(after >= BATCH, "the next window came {after:?} after t0");
    assert!(
        after < BATCH + Duration::from_millis(300),
        "the next window came {after:?} after t0, not promptly at its end"
    );

    // That window ended ~t0 + 1000 ms with nothing in it: the room is quiet again, and
    // its next chat goes at once.
    tokio::time::sleep_until((window_at + BATCH + Duration::from_millis(200)).into()).await;
    let t1 = Instant::now();
    alice.send(chat("q", "fourth")).await;
    let (at, texts) = next_chats(&mut bob, "q").await;
    assert_eq!(texts, ["fourth"]);
    let took = at - t1;
    assert!(took < AT_ONCE, "a room quiet again took {took:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_stream_arrives_one_batch_per_window() {
    const CHATS: usize = 40;
    const EVERY: Duration = Duration::from_millis(50);
    let gw = gateway().await;
    let mut alice = gw.user("alice", "").await;
    let mut bob = gw.client("").await;
    alice.join("s").await;
    bob.join("s").await;

    let started = Instant::now();
    let sender = tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVERY);
        for i in 0..CHATS {
            tick.tick().await;
            alice.send(chat("s", &format!("c{i}"))).await;
        }
        (alice, Instant::now())
    });
    let mut batches: Vec<(Instant, Vec<String>)> = Vec::new();
    let last = format!("c{}", CHATS - 1);
    while !batches.last().is_some_and(|(_, t)| t.contains(&last)) {
        batches.push(next_chats(&mut bob, "s").await);
    }
    let (_alice, sent_at) = sender.await.unwrap();
    let stream = sent_at - started;

    // Every chat once, in order.
    let all: Vec<String> = batches.iter().flat_map(|(_, t)| t.clone()).collect();
    let want: Vec<String> = (0..CHATS).map(|i| format!("c{i}")).collect();
    assert_eq!(all, want);
    // The first went at once, alone (the room was quiet).
    let (first_at, first) = &batches[0];
    assert_eq!(first, &["c0"]);
    assert!(*first_at - started < AT_ONCE, "{:?}", *first_at - started);
    // Then one batch per window: 500 ms apart (the server keeps them at least that far
    // apart; 100 ms is for the client's own jitter) ...
    for pair in batches.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(
            gap >= BATCH - Duration::from_millis(100),
            "batches {:?} and {:?} only {gap:?} apart",
            pair[0].1,
            pair[1].1
        );
    }
    // ... and no fewer: one per window of the stream, plus the one sent at once (and
    // one for a window cut by the end of the stream).
    let windows = (stream.as_millis() / BATCH.as_millis()) as usize + 1;
    assert!(
        (windows..=windows + 1).contains(&batches.len()),
        "{} batches for a {stream:?} stream: {batches:?}",
        batches.len()
    );
    // A full window of the stream holds about 10 chats, not one.
    for (_, texts) in &batches[1..batches.len() - 1] {
        assert!(texts.len() >= 5, "a window of the stream: {texts:?}");
    }
    gw.stop().await;
}
