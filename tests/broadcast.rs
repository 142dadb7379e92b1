//! Room broadcast: batching windows, delivery to members only, several rooms per
//! connection, history on join, joining twice, leaving, and presence.

mod support;

use danmaku_gateway::config::Config;
use serde_json::{Value, json};
use support::{Client, Gateway, events_of, ops_of, relax_rate_limits};

async fn gateway(edit: impl FnOnce(&mut Config)) -> Gateway {
    Gateway::start_with(|c| {
        relax_rate_limits(c);
        c.server.drain_s = 0;
        edit(c);
    })
    .await
}

/// Posts a system event into `room`; returns its id.
async fn system(gw: &Gateway, room: &str, text: &str) -> String {
    let (status, body) = gw
        .api(
            "POST",
            &format!("/api/v1/rooms/{room}/events"),
            Some(&json!({"type":"system","text":text})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    body["id"].as_str().expect("id").to_string()
}

/// Collects frames until a system event `text` of `room` arrived.
async fn until_system(c: &mut Client, room: &str, text: &str) -> Vec<Value> {
    c.frames_until(|f| {
        events_of(f, room, "system")
            .iter()
            .any(|e| e["text"] == text)
    })
    .await
}

fn texts(events: &[Value]) -> Vec<&str> {
    events.iter().filter_map(|e| e["text"].as_str()).collect()
}

#[tokio::test]
async fn chats_of_one_window_arrive_in_one_batch_in_send_order() {
    let gw = gateway(|c| {
        c.room.batch_ms = 300;
        c.room.presence_ms = 60_000;
    })
    .await;
    let mut a = gw.user("alice", "").await;
    let mut b = gw.client("format=msgpack").await;
    a.join("r").await;
    b.join("r").await;
    // Line up with the window: right after a batch arrives, a fresh window has begun.
    a.send(json!({"op":"chat","room":"r","text":"sync"})).await;
    a.frames_until(|f| !events_of(f, "r", "chat").is_empty())
        .await;
    let sent: Vec<String> = (0..6).map(|i| format!("m{i}")).collect();
    for t in &sent {
        a.send(json!({"op":"chat","room":"r","text":t})).await;
    }
    let has_all = |f: &[Value]| events_of(f, "r", "chat").iter().any(|e| e["text"] == "m5");
    let fa = a.frames_until(has_all).await;
    let fb = b
        .frames_until(|f| events_of(f, "r", "chat").iter().any(|e| e["text"] == "m5"))
        .await;
    for (who, frames) in [("sender", &fa), ("member", &fb)] {
        let batches: Vec<&Value> = ops_of(frames, "batch")
            .into_iter()
            .filter(|b| {
                b["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|e| e["type"] == "chat")
            })
            .collect();
        // The sender's own `sync` batch may be among the member's frames.
        let ours: Vec<&&Value> = batches
            .iter()
            .filter(|b| {
                b["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|e| e["text"].as_str().is_some_and(|t| t.starts_with('m')))
            })
            .collect();
        assert_eq!(ours.len(), 1, "{who}: one window, one batch: {batches:?}");
        let chats: Vec<Value> = ours[0]["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "chat")
            .cloned()
            .collect();
        assert_eq!(texts(&chats), sent, "{who}: send order");
        assert_eq!(ours[0]["room"], "r");
    }
    // Every viewer sees the same events: same ids in the same order.
    let ids = |f: &[Value]| -> Vec<Value> {
        events_of(f, "r", "chat")
            .iter()
            .filter(|e| e["text"] != "sync")
            .map(|e| e["id"].clone())
            .collect()
    };
    assert_eq!(ids(&fa), ids(&fb));
    gw.stop().await;
}

#[tokio::test]
async fn events_reach_members_of_the_room_only() {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", "").await;
    let mut b = gw.user("bob", "format=msgpack").await;
    let mut c = gw.user("carol", "").await;
    let mut lonely = gw.client("").await;
    a.join("r1").await;
    b.join("r1").await;
    c.join("r2").await;

    a.send(json!({"op":"chat","room":"r1","text":"for r1"}))
        .await;
    // The sender sees its own chat, from the batch.
    let fa = a
        .frames_until(|f| !events_of(f, "r1", "chat").is_empty())
        .await;
    let mine = events_of(&fa, "r1", "chat");
    assert_eq!(texts(&mine), ["for r1"]);
    assert_eq!(mine[0]["user"]["id"], "alice");
    let fb = b
        .frames_until(|f| !events_of(f, "r1", "chat").is_empty())
        .await;
    assert_eq!(events_of(&fb, "r1", "chat")[0]["id"], mine[0]["id"]);

    // Members of r2 only hear r2: the r1 batch was flushed before this r2 event was
    // even posted, so it would have come first.
    system(&gw, "r2", "for r2").await;
    let fc = until_system(&mut c, "r2", "for r2").await;
    assert!(
        fc.iter().all(|f| f["op"] != "batch" || f["room"] == "r2"),
        "a non-member got another room's batch: {fc:?}"
    );
    // A connection in no room gets no batch at all.
    let pings = lonely.until_pong(1).await;
    assert!(
        ops_of(&pings, "batch").is_empty(),
        "a connection in no room got a batch: {pings:?}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn one_connection_in_several_rooms() {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", "").await;
    let mut b = gw.user("bob", "").await;
    let mut c = gw.user("carol", "").await;
    for room in ["r1", "r2", "r3"] {
        a.join(room).await;
    }
    b.join("r1").await;
    c.join("r2").await;
    b.send(json!({"op":"chat","room":"r1","text":"b in r1"}))
        .await;
    c.send(json!({"op":"chat","room":"r2","text":"c in r2"}))
        .await;
    a.send(json!({"op":"chat","room":"r3","text":"a in r3"}))
        .await;
    let f = a
        .frames_until(|f| {
            !events_of(f, "r1", "chat").is_empty()
                && !events_of(f, "r2", "chat").is_empty()
                && !events_of(f, "r3", "chat").is_empty()
        })
        .await;
    assert_eq!(texts(&events_of(&f, "r1", "chat")), ["b in r1"]);
    assert_eq!(texts(&events_of(&f, "r2", "chat")), ["c in r2"]);
    assert_eq!(texts(&events_of(&f, "r3", "chat")), ["a in r3"]);
    // One batch names one room.
    for batch in ops_of(&f, "batch") {
        let room = batch["room"].as_str().unwrap();
        for e in batch["events"].as_array().unwrap() {
            if e["type"] == "chat" {
                assert_eq!(e["text"].as_str().unwrap().split(' ').nth(2), Some(room));
            }
        }
    }
    // Leaving one room keeps the others.
    let ack = a.call(json!({"op":"leave","room":"r1"}), 1).await;
    assert_eq!(ack["op"], "ack");
    let e = a.call(json!({"op":"chat","room":"r1","text":"x"}), 2).await;
    assert_eq!(e["code"], "not_joined");
    a.send(json!({"op":"chat","room":"r2","text":"a in r2"}))
        .await;
    let f = a
        .frames_until(|f| {
            events_of(f, "r2", "chat")
                .iter()
                .any(|e| e["text"] == "a in r2")
        })
        .await;
    assert!(ops_of(&f, "error").is_empty(), "{f:?}");
    gw.stop().await;
}

#[tokio::test]
async fn join_with_history_returns_the_last_n_oldest_first_without_presence() {
    let gw = gateway(|c| c.room.presence_ms = 20).await;
    let mut a = gw.user("alice", "").await;
    a.join("r").await;
    // A second member makes the count change, so presence events are sent.
    let mut b = gw.client("").await;
    b.join("r").await;
    let mut frames = a
        .frames_until(|f| {
            events_of(f, "r", "presence")
                .iter()
                .any(|e| e["online"] == 2)
        })
        .await;
    for i in 0..5 {
        a.send(json!({"op":"chat","room":"r","text":format!("c{i}")}))
            .await;
    }
    frames.extend(a.frames_until(|f| ops_of(f, "ack").len() == 5).await);
    let sys_id = system(&gw, "r", "s5").await;
    frames.extend(until_system(&mut a, "r", "s5").await);
    let seen: Vec<Value> = support::batch_events(&frames, "r");
    assert!(seen.iter().any(|e| e["type"] == "presence"));
    let kept: Vec<Value> = seen
        .iter()
        .filter(|e| e["type"] != "presence")
        .cloned()
        .collect();
    assert_eq!(texts(&kept), ["c0", "c1", "c2", "c3", "c4", "s5"]);
    assert_eq!(kept[5]["id"], sys_id.as_str());

    let mut c = gw.user("carol", "").await;
    for (n, want) in [
        (3, vec!["c3", "c4", "s5"]),
        (1, vec!["s5"]),
        (100, vec!["c0", "c1", "c2", "c3", "c4", "s5"]),
        (6, vec!["c0", "c1", "c2", "c3", "c4", "s5"]),
        (0, vec![]),
    ] {
        let j = c.call(json!({"op":"join","room":"r","history":n}), n).await;
        assert_eq!(j["op"], "joined", "{j}");
        let h = j["history"].as_array().unwrap();
        assert_eq!(texts(h), want, "history={n}");
        assert!(h.iter().all(|e| e["type"] != "presence"), "{h:?}");
        // The very events members saw, same ids and fields.
        for e in h {
            let orig = kept.iter().find(|k| k["id"] == e["id"]).expect("same id");
            assert_eq!(e, orig);
        }
        let ack = c.call(json!({"op":"leave","room":"r"}), 1000).await;
        assert_eq!(ack["op"], "ack");
    }
    // Without `history`: none.
    let j = c.call(json!({"op":"join","room":"r"}), 7).await;
    assert_eq!(j["history"], json!([]));
    gw.stop().await;
}

#[tokio::test]
async fn history_is_capped_at_history_len() {
    let gw = gateway(|c| c.room.history_len = 3).await;
    let mut a = gw.user("alice", "").await;
    a.join("r").await;
    for i in 0..5 {
        a.send(json!({"op":"chat","room":"r","text":format!("c{i}")}))
            .await;
    }
    a.frames_until(|f| events_of(f, "r", "chat").len() == 5)
        .await;
    let mut b = gw.user("bob", "format=msgpack").await;
    let j = b
        .call(json!({"op":"join","room":"r","history":100}), 1)
        .await;
    assert_eq!(texts(j["history"].as_array().unwrap()), ["c2", "c3", "c4"]);
    gw.stop().await;
}

#[tokio::test]
async fn joining_twice_answers_joined_and_changes_nothing() {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", "").await;
    let mut b = gw.user("bob", "").await;
    assert_eq!(a.join("r").await["online"], 1);
    assert_eq!(b.join("r").await["online"], 2);
    for r in 1..=3 {
        let j = b.call(json!({"op":"join","room":"r"}), r).await;
        assert_eq!(j["op"], "joined", "{j}");
        assert_eq!(j["room"], "r");
        assert_eq!(j["online"], 2, "{j}");
    }
    let (_, room) = gw.api("GET", "/api/v1/rooms/r", None).await;
    assert_eq!(room["online"], 2, "{room}");
    // Still one membership: one copy of each event ...
    let ack = a
        .call(json!({"op":"chat","room":"r","text":"once"}), 5)
        .await;
    assert_eq!(ack["op"], "ack");
    system(&gw, "r", "end").await;
    let f = until_system(&mut b, "r", "end").await;
    assert_eq!(texts(&events_of(&f, "r", "chat")), ["once"]);
    // ... and one leave ends it.
    let ack = b.call(json!({"op":"leave","room":"r"}), 10).await;
    assert_eq!(ack["op"], "ack");
    let e = b.call(json!({"op":"leave","room":"r"}), 11).await;
    assert_eq!(e["code"], "not_joined", "{e}");
    let (_, room) = gw.api("GET", "/api/v1/rooms/r", None).await;
    assert_eq!(room["online"], 1, "{room}");
    gw.stop().await;
}

#[tokio::test]
async fn no_batches_after_leave() {
    // No presence events: the room's only events are the two chats.
    let gw = gateway(|c| c.room.presence_ms = 60_000).await;
    let mut a = gw.user("alice", "").await;
    let mut b = gw.user("bob", "").await;
    a.join("r").await;
    b.join("r").await;
    b.join("other").await;
    a.send(json!({"op":"chat","room":"r","text":"before"}))
        .await;
    let f = b
        .frames_until(|f| !events_of(f, "r", "chat").is_empty())
        .await;
    assert_eq!(texts(&events_of(&f, "r", "chat")), ["before"]);
    let ack = b.call(json!({"op":"leave","room":"r"}), 1).await;
    assert_eq!(ack["op"], "ack");
    a.send(json!({"op":"chat","room":"r","text":"after"})).await;
    a.frames_until(|f| {
        events_of(f, "r", "chat")
            .iter()
            .any(|e| e["text"] == "after")
    })
    .await;
    // The `after` batch was flushed before this event of `other` was posted.
    system(&gw, "other", "marker").await;
    let f = until_system(&mut b, "other", "marker").await;
    assert!(
        f.iter().all(|f| f["op"] != "batch" || f["room"] != "r"),
        "a batch of a room it left: {f:?}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn presence_follows_joins_and_leaves() {
    let gw = gateway(|c| c.room.presence_ms = 20).await;
    let mut a = gw.user("alice", "").await;
    assert_eq!(a.join("r").await["online"], 1);
    let last_presence = |f: &[Value]| -> Option<u64> {
        events_of(f, "r", "presence")
            .last()
            .and_then(|e| e["online"].as_u64())
    };
    let f = a.frames_until(|f| last_presence(f) == Some(1)).await;
    let p = &events_of(&f, "r", "presence")[0];
    assert!(p["id"].is_string() && p["ts"].is_u64(), "{p}");

    let mut b = gw.client("").await;
    assert_eq!(b.join("r").await["online"], 2, "anonymous viewers count");
    let mut c = gw.user("carol", "format=msgpack").await;
    assert_eq!(c.join("r").await["online"], 3);
    a.frames_until(|f| last_presence(f) == Some(3)).await;
    // b sees presence too.
    b.frames_until(|f| last_presence(f) == Some(3)).await;

    // A leave and a disconnect.
    let ack = c.call(json!({"op":"leave","room":"r"}), 1).await;
    assert_eq!(ack["op"], "ack");
    b.close().await;
    let f = a.frames_until(|f| last_presence(f) == Some(1)).await;
    // Counts announced on the way are between 1 and 3, never stale beyond that.
    for p in events_of(&f, "r", "presence") {
        let n = p["online"].as_u64().unwrap();
        assert!((1..=3).contains(&n), "{p}");
    }
    let (_, room) = gw.api("GET", "/api/v1/rooms/r", None).await;
    assert_eq!(room["online"], 1);
    // While the count stays put, nothing more is announced (over many presence periods).
    for i in 0..5 {
        system(&gw, "r", &format!("quiet{i}")).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let f = until_system(&mut a, "r", "quiet4").await;
    assert!(
        events_of(&f, "r", "presence").is_empty(),
        "presence re-announced without a change: {f:?}"
    );
    gw.stop().await;
}
