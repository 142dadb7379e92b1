//! Recovery on reconnect on one node (PROTOCOL.md v1.1, *Recovery on reconnect*): `join`
//! with `since` answers exactly what followed it, or `recovered: false` whenever that
//! cannot be proven (unknown or too old an id, a restarted node, a frame too large).

mod support;

use serde_json::{Value, json};
use support::{Client, Gateway, relax_rate_limits};

async fn post(gw: &Gateway, room: &str, body: Value) -> String {
    let (st, v) = gw
        .api("POST", &format!("/api/v1/rooms/{room}/events"), Some(&body))
        .await;
    assert_eq!(st, 202, "{v}");
    v["id"].as_str().unwrap().to_owned()
}

async fn system(gw: &Gateway, room: &str, text: &str) -> String {
    post(gw, room, json!({"type":"system","text":text})).await
}

/// Receives batches of `room` until the event `id` came; returns every event id seen.
async fn ids_until(c: &mut Client, room: &str, id: &str) -> Vec<String> {
    c.events_until(room, |evs| evs.iter().any(|e| e["id"] == id))
        .await
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn join_since(c: &mut Client, room: &str, since: &str, history: u32) -> Value {
    let r = c
        .call(
            json!({"op":"join","room":room,"since":since,"history":history}),
            77,
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

#[tokio::test]
async fn a_viewer_that_blinks_gets_exactly_what_it_missed_and_then_the_live_room() {
    let gw = Gateway::start_with(relax_rate_limits).await;
    let mut viewer = gw.client("room=r").await;
    viewer.recv_op("joined").await;
    let mut chatter = gw.user("carol", "room=r").await;
    chatter.recv_op("joined").await;
    system(&gw, "r", "a").await;
    let b = system(&gw, "r", "b").await;
    ids_until(&mut viewer, "r", &b).await;
    drop(viewer);

    // The gap: a system message, a paid gift, a chat; presence changes too (not logged).
    let c = system(&gw, "r", "c").await;
    let gift = post(
        &gw,
        "r",
        json!({"type":"gift","user":{"id":"u1","name":"Ann"},"gift":"rocket","count":1}),
    )
    .await;
    let r = chatter
        .call(json!({"op":"chat","room":"r","text":"in the gap"}), 1)
        .await;
    assert_eq!(r["op"], "ack", "{r}");
    let mut witness = gw.client("room=r").await;
    witness.recv_op("joined").await;
    let chat_id = witness
        .events_until("r", |evs| evs.iter().any(|e| e["text"] == "in the gap"))
        .await
        .into_iter()
        .find(|e| e["text"] == "in the gap")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let mut back = gw.client("").await;
    let joined = join_since(&mut back, "r", &b, 1).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    // Exactly the gap, in order, whatever `history` asked; no presence.
    assert_eq!(history_ids(&joined), [c, gift, chat_id], "{joined}");
    // Live from here, nothing twice.
    let d = system(&gw, "r", "d").await;
    let live = ids_until(&mut back, "r", &d).await;
    assert_eq!(live.iter().filter(|id| **id != d).count(), 0, "{live:?}");
    gw.stop().await;
}

#[tokio::test]
async fn since_at_the_newest_event_recovers_nothing_to_send() {
    let gw = Gateway::start().await;
    let last = system(&gw, "r", "only").await;
    let mut c = gw.client("").await;
    // The event is logged once its window is flushed: a watcher sees it first.
    let mut w = gw.client("").await;
    assert_eq!(
        w.call(json!({"op":"join","room":"r","history":5}), 1).await["history"][0]["id"],
        last
    );
    let joined = join_since(&mut c, "r", &last, 5).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(joined["history"], json!([]));
    gw.stop().await;
}

#[tokio::test]
async fn an_unknown_or_too_old_since_answers_false_with_the_asked_history() {
    let gw = Gateway::start_with(|cfg| {
        cfg.room.history_len = 2;
        cfg.room.recovery_len = 3;
    })
    .await;
    let mut watcher = gw.client("room=r").await;
    watcher.recv_op("joined").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(system(&gw, "r", &format!("e{i}")).await);
    }
    ids_until(&mut watcher, "r", &ids[4]).await;

    let mut c = gw.client("").await;
    // e0 and e1 fell off the 3-event log.
    let joined = join_since(&mut c, "r", &ids[1], 1).await;
    assert_eq!(joined["recovered"], false, "{joined}");
    assert_eq!(history_ids(&joined), [ids[4].clone()]);
    let r = c.call(json!({"op":"leave","room":"r"}), 2).await;
    assert_eq!(r["op"], "ack");
    let joined = join_since(&mut c, "r", "no-such-event", 5).await;
    assert_eq!(joined["recovered"], false, "{joined}");
    // History is capped by history_len, whatever is asked.
    assert_eq!(history_ids(&joined), ids[3..].to_vec());
    c.call(json!({"op":"leave","room":"r"}), 3).await;
    // The oldest event still logged recovers the two after it.
    let joined = join_since(&mut c, "r", &ids[2], 0).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(history_ids(&joined), ids[3..].to_vec());
    // Without since, joined says nothing of recovery.
    let mut plain = gw.client("").await;
    let joined = plain.join("r").await;
    assert!(joined.get("recovered").is_none(), "{joined}");
    gw.stop().await;
}

#[tokio::test]
async fn a_recall_inside_the_gap_takes_the_event_out_and_sends_the_recall() {
    let gw = Gateway::start().await;
    let mut viewer = gw.client("room=r").await;
    viewer.recv_op("joined").await;
    let a = system(&gw, "r", "a").await;
    ids_until(&mut viewer, "r", &a).await;
    drop(viewer);
    let b = system(&gw, "r", "b").await;
    let c = system(&gw, "r", "c").await;
    let (st, v) = gw
        .api("DELETE", &format!("/api/v1/rooms/r/events/{b}"), None)
        .await;
    assert_eq!(st, 202, "{v}");
    let recall = v["id"].as_str().unwrap().to_owned();
    let mut w = gw.client("room=r").await;
    w.recv_op("joined").await;
    let d = system(&gw, "r", "d").await;
    ids_until(&mut w, "r", &d).await;

    let mut back = gw.client("").await;
    let joined = join_since(&mut back, "r", &a, 0).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(history_ids(&joined), [c, recall.clone(), d], "{joined}");
    let r = joined["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == recall.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        (r["type"].clone(), r["target"].clone()),
        (json!("recall"), json!(b))
    );
    gw.stop().await;
}

#[tokio::test]
async fn joining_again_with_since_answers_the_recovery_too() {
    let gw = Gateway::start().await;
    let mut c = gw.client("room=r").await;
    c.recv_op("joined").await;
    let a = system(&gw, "r", "a").await;
    let b = system(&gw, "r", "b").await;
    ids_until(&mut c, "r", &b).await;
    let joined = join_since(&mut c, "r", &a, 0).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(history_ids(&joined), [b]);
    gw.stop().await;
}

#[tokio::test]
async fn a_restarted_node_never_claims_recovery() {
    let gw = Gateway::start().await;
    let data = gw.cfg.data.dir.clone();
    let mut c = gw.client("room=r").await;
    c.recv_op("joined").await;
    let a = system(&gw, "r", "a").await;
    ids_until(&mut c, "r", &a).await;
    drop(c);
    gw.stop().await;

    let gw = Gateway::start_with(|cfg| cfg.data.dir = data).await;
    system(&gw, "r", "after the restart").await;
    let mut back = gw.client("").await;
    let joined = join_since(&mut back, "r", &a, 5).await;
    assert_eq!(joined["recovered"], false, "{joined}");
    gw.stop().await;
}

#[tokio::test]
async fn recovery_off_or_a_recovery_too_large_for_one_frame_answers_false() {
    // Off: recovery_len = 0.
    let gw = Gateway::start_with(|cfg| cfg.room.recovery_len = 0).await;
    let mut c = gw.client("room=r").await;
    c.recv_op("joined").await;
    let a = system(&gw, "r", "a").await;
    let b = system(&gw, "r", "b").await;
    ids_until(&mut c, "r", &b).await;
    let mut back = gw.client("").await;
    let joined = join_since(&mut back, "r", &a, 5).await;
    assert_eq!(joined["recovered"], false, "{joined}");
    assert_eq!(history_ids(&joined), [a.clone(), b]);
    gw.stop().await;

    // Too large: three 60 KB events after `since` do not fit a 128 KiB frame.
    let gw = Gateway::start_with(|cfg| {
        cfg.limits.max_out_frame_bytes = danmaku_gateway::config::MIN_OUT_FRAME_BYTES;
    })
    .await;
    let mut c = gw.client("room=r").await;
    c.recv_op("joined").await;
    let a = system(&gw, "r", "a").await;
    let mut last = String::new();
    for i in 0..3 {
        last = system(&gw, "r", &format!("{i}{}", "x".repeat(60_000))).await;
    }
    ids_until(&mut c, "r", &last).await;
    let mut back = gw.client("").await;
    let joined = join_since(&mut back, "r", &a, 100).await;
    assert_eq!(joined["recovered"], false, "never a cut list called whole");
    let got = history_ids(&joined);
    assert!(!got.is_empty() && got.len() < 3, "{got:?}");
    assert_eq!(got.last(), Some(&last));
    gw.stop().await;
}

#[tokio::test]
async fn a_bad_since_is_a_bad_request() {
    let gw = Gateway::start().await;
    let mut c = gw.client("").await;
    let r = c.call(json!({"op":"join","room":"r","since":""}), 1).await;
    assert_eq!(r["code"], "bad_request", "{r}");
    let r = c
        .call(json!({"op":"join","room":"r","since":"x".repeat(129)}), 2)
        .await;
    assert_eq!(r["code"], "bad_request", "{r}");
    let r = c.call(json!({"op":"join","room":"r","since":7}), 3).await;
    assert_eq!(r["code"], "bad_request", "{r}");
    gw.stop().await;
}

/// The member's shard may write the room's batches the moment it registers the member,
/// but `joined` goes first: a viewer that dropped frames before `joined` (as a client
/// waiting for its reply does) would miss events a recovery claimed to cover.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joined_always_comes_before_the_rooms_batches_in_a_busy_room() {
    let gw = Gateway::start_with(|cfg| cfg.room.batch_ms = 1).await;
    let addr = gw.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut busy = Vec::new();
    for _ in 0..4 {
        let stop = std::sync::Arc::clone(&stop);
        busy.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                support::http(
                    addr,
                    "POST",
                    "/api/v1/rooms/r/events",
                    Some(support::API_TOKEN),
                    Some(&json!({"type":"system","text":format!("tick {i}")}).to_string()),
                )
                .await;
            }
        }));
    }
    let mut joins = Vec::new();
    for n in 0..300 {
        let mut c = gw.client("").await;
        joins.push(tokio::spawn(async move {
            c.send(json!({"op":"join","room":"r","ref":n,"history":100}))
                .await;
            let first = c.recv().await;
            assert_eq!(first["op"], "joined", "join {n}: {first}");
            c
        }));
    }
    for j in joins {
        drop(j.await.expect("the first frame after hello is joined"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for b in busy {
        b.await.unwrap();
    }
    gw.stop().await;
}
