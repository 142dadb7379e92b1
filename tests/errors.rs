//! Refusals: malformed and invalid frames, the order checks run in, per-connection and
//! per-room caps, and close 1008 after too many bad frames in a row.

mod support;

use danmaku_gateway::config::Config;
use serde_json::{Value, json};
use support::{Client, Gateway, events_of, relax_rate_limits};
use tokio_tungstenite::tungstenite::Message;

async fn gateway(edit: impl FnOnce(&mut Config)) -> Gateway {
    Gateway::start_with(|c| {
        relax_rate_limits(c);
        c.server.drain_s = 0;
        edit(c);
    })
    .await
}

/// The next reply must be an `error` with `code`; returns it.
async fn expect_error(c: &mut Client, code: &str, what: &str) -> Value {
    let e = c.reply().await;
    assert_eq!(e["op"], "error", "{what}: {e}");
    assert_eq!(e["code"], code, "{what}: {e}");
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {e}"
    );
    e
}

/// The connection still answers: proves a bad frame did not close it.
async fn still_open(c: &mut Client, r: i64) {
    let p = c.call(json!({"op":"ping"}), r).await;
    assert_eq!(p["op"], "pong", "{p}");
}

#[tokio::test]
async fn malformed_json_is_bad_request_and_the_connection_stays() {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", "").await;
    let frames = [
        "{not json",
        "",
        "null",
        "42",
        "\"ping\"",
        "[1,2]",
        "{}",
        r#"{"op":5}"#,
        r#"{"op":null}"#,
        r#"{"OP":"ping"}"#,
        r#"{"op":"ping"} trailing"#,
    ];
    for (i, f) in frames.iter().enumerate() {
        a.send_raw(Message::Text((*f).into())).await;
        let e = expect_error(&mut a, "bad_request", f).await;
        assert!(e.get("ref").is_none(), "{f}: {e}");
        // Stay under limits.max_bad_frames (10): a good frame resets the count.
        if i % 4 == 3 {
            still_open(&mut a, i as i64).await;
        }
    }
    still_open(&mut a, 1000).await;
    gw.stop().await;
}

#[tokio::test]
async fn malformed_msgpack_is_bad_request_and_the_connection_stays() {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", "format=msgpack").await;
    let op_only = rmp_serde::to_vec_named(&json!({"op":"dance","ref":9})).unwrap();
    let not_a_map = rmp_serde::to_vec_named(&json!("ping")).unwrap();
    let truncated = {
        let full = rmp_serde::to_vec_named(&json!({"op":"ping","ref":1})).unwrap();
        full[..full.len() - 2].to_vec()
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("reserved byte", vec![0xc1]),
        ("empty", vec![]),
        ("truncated map", truncated),
        ("a string", not_a_map),
        ("garbage", vec![0x93, 0xff, 0x00, 0xd9]),
    ];
    for (what, bytes) in cases {
        a.send_raw(Message::Binary(bytes.into())).await;
        expect_error(&mut a, "bad_request", what).await;
    }
    still_open(&mut a, 1).await;
    // An unknown op whose ref is readable gets it back.
    a.send_raw(Message::Binary(op_only.into())).await;
    let e = expect_error(&mut a, "bad_request", "unknown op").await;
    assert_eq!(e["ref"], 9);
    still_open(&mut a, 2).await;
    gw.stop().await;
}

#[tokio::test]
async fn unknown_op_is_bad_request_with_ref() {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", "").await;
    for (i, op) in ["dance", "Join", "PING", "subscribe", ""]
        .iter()
        .enumerate()
    {
        let e = a.call(json!({"op":op,"room":"r"}), i as i64 + 1).await;
        assert_eq!(e["op"], "error", "{op}: {e}");
        assert_eq!(e["code"], "bad_request", "{op}: {e}");
    }
    still_open(&mut a, 100).await;
    gw.stop().await;
}

#[tokio::test]
async fn wrong_field_types_and_missing_fields_are_bad_request() {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", "").await;
    a.join("r").await;
    let cases = [
        json!({"op":"join","room":7}),
        json!({"op":"join","room":null}),
        json!({"op":"join","room":["r"]}),
        json!({"op":"join"}),
        json!({"op":"join","room":"r2","history":"5"}),
        json!({"op":"join","room":"r2","history":-1}),
        json!({"op":"join","room":"r2","history":1.5}),
        json!({"op":"join","room":"r2","history":true}),
        json!({"op":"leave","room":{"id":"r"}}),
        json!({"op":"leave"}),
        json!({"op":"chat","room":"r","text":5}),
        json!({"op":"chat","room":"r","text":null}),
        json!({"op":"chat","room":"r","text":["hi"]}),
        json!({"op":"chat","room":"r"}),
        json!({"op":"chat","text":"hi"}),
    ];
    for (i, op) in cases.iter().enumerate() {
        // Bad frames in a row close the connection; a ping in between resets the count.
        let r = 10 + i as i64;
        let e = a.call(op.clone(), r).await;
        assert_eq!(e["op"], "error", "{op}: {e}");
        assert_eq!(e["code"], "bad_request", "{op}: {e}");
        assert_eq!(e["ref"], r, "{op}: {e}");
        still_open(&mut a, 1000 + i as i64).await;
    }
    // A ref of the wrong type: still bad_request (no ref to echo).
    a.send(json!({"op":"ping","ref":"seven"})).await;
    let e = expect_error(&mut a, "bad_request", "string ref").await;
    assert!(e.get("ref").is_none() || e["ref"] == Value::Null, "{e}");
    // Nothing above had an effect: r2 was never joined.
    let e = a
        .call(json!({"op":"chat","room":"r2","text":"x"}), 99)
        .await;
    assert_eq!(e["code"], "not_joined", "{e}");
    gw.stop().await;
}

#[tokio::test]
async fn invalid_room_ids_are_bad_request_for_every_op() {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", "").await;
    let bad = [
        String::new(),
        "x".repeat(65),
        "a b".into(),
        "a/b".into(),
        "a#b".into(),
        "房间".into(),
        "café".into(),
        "tab\there".into(),
        "semi;colon".into(),
    ];
    let mut r = 0;
    for room in &bad {
        for op in [
            json!({"op":"join","room":room}),
            json!({"op":"leave","room":room}),
            // bad_request comes before not_joined.
            json!({"op":"chat","room":room,"text":"hi"}),
        ] {
            r += 1;
            let e = a.call(op.clone(), r).await;
            assert_eq!(e["code"], "bad_request", "{op}: {e}");
            still_open(&mut a, 10_000 + r).await;
        }
    }
    // The edges of the rule are accepted.
    for room in [
        "x".repeat(64),
        "a".into(),
        "Live_1.a:b-c".into(),
        "0".into(),
    ] {
        r += 1;
        let j = a.call(json!({"op":"join","room":room}), r).await;
        assert_eq!(j["op"], "joined", "{room}: {j}");
        assert_eq!(j["room"], room.as_str());
        r += 1;
        let l = a.call(json!({"op":"leave","room":room}), r).await;
        assert_eq!(l["op"], "ack", "{room}: {l}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn text_length_counts_characters_not_bytes() {
    let gw = gateway(|c| c.limits.max_text_chars = 10).await;
    let mut a = gw.user("alice", "").await;
    a.join("r").await;
    // 10 three-byte characters (30 bytes): accepted.
    let ok = "弹".repeat(10);
    let ack = a.call(json!({"op":"chat","room":"r","text":ok}), 1).await;
    assert_eq!(ack["op"], "ack", "{ack}");
    // 11 characters: too_large, whether ASCII or not, with the ref echoed.
    for (i, long) in ["弹".repeat(11), "x".repeat(11), "🎉".repeat(11)]
        .iter()
        .enumerate()
    {
        let e = a
            .call(json!({"op":"chat","room":"r","text":long}), 10 + i as i64)
            .await;
        assert_eq!(e["op"], "error", "{e}");
        assert_eq!(e["code"], "too_large", "{e}");
        still_open(&mut a, 100 + i as i64).await;
    }
    // The refused chats had no effect: the room holds only the first and the last.
    a.send(json!({"op":"chat","room":"r","text":"after"})).await;
    a.frames_until(|f| {
        events_of(f, "r", "chat")
            .iter()
            .any(|e| e["text"] == "after")
    })
    .await;
    let mut b = gw.client("").await;
    let j = b
        .call(json!({"op":"join","room":"r","history":100}), 1)
        .await;
    let texts: Vec<Value> = j["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "chat")
        .map(|e| e["text"].clone())
        .collect();
    assert_eq!(texts, vec![json!(ok), json!("after")]);
    gw.stop().await;
}

#[tokio::test]
async fn history_out_of_range_is_bad_request() {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", "").await;
    for (i, h) in [json!(101), json!(1000), json!(-1), json!(u64::MAX)]
        .iter()
        .enumerate()
    {
        let e = a
            .call(json!({"op":"join","room":"r","history":h}), i as i64)
            .await;
        assert_eq!(e["code"], "bad_request", "history {h}: {e}");
    }
    // The refused joins had no effect.
    let e = a.call(json!({"op":"chat","room":"r","text":"x"}), 10).await;
    assert_eq!(e["code"], "not_joined", "{e}");
    // 100 is the top of the range.
    let j = a
        .call(json!({"op":"join","room":"r","history":100}), 11)
        .await;
    assert_eq!(j["op"], "joined", "{j}");
    gw.stop().await;
}

#[tokio::test]
async fn not_joined_for_chat_and_leave() {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", "").await;
    let e = a.call(json!({"op":"chat","room":"r","text":"x"}), 1).await;
    assert_eq!(e["code"], "not_joined", "{e}");
    let e = a.call(json!({"op":"leave","room":"r"}), 2).await;
    assert_eq!(e["code"], "not_joined", "{e}");
    // In another room is not in this one.
    a.join("other").await;
    let e = a.call(json!({"op":"chat","room":"r","text":"x"}), 3).await;
    assert_eq!(e["code"], "not_joined", "{e}");
    // After leaving, both are refused again.
    a.join("r").await;
    let ack = a.call(json!({"op":"leave","room":"r"}), 4).await;
    assert_eq!(ack["op"], "ack");
    let e = a.call(json!({"op":"leave","room":"r"}), 5).await;
    assert_eq!(e["code"], "not_joined", "{e}");
    let e = a.call(json!({"op":"chat","room":"r","text":"x"}), 6).await;
    assert_eq!(e["code"], "not_joined", "{e}");
    // Refusals are not bad frames: many in a row do not close the connection.
    for i in 0..(gw.cfg.limits.max_bad_frames as i64 + 3) {
        let e = a.call(json!({"op":"leave","room":"nope"}), 100 + i).await;
        assert_eq!(e["code"], "not_joined", "{e}");
    }
    still_open(&mut a, 999).await;
    gw.stop().await;
}

#[tokio::test]
async fn anonymous_viewers_are_read_only_and_checks_run_in_order() {
    let gw = gateway(|c| c.limits.max_text_chars = 10).await;
    let mut anon = gw.client("").await;
    assert_eq!(anon.hello["user"], Value::Null);
    let mut u = gw.user("ulla", "").await;
    // For a user, too_large comes before not_joined.
    let e = u
        .call(json!({"op":"chat","room":"r","text":"x".repeat(11)}), 1)
        .await;
    assert_eq!(e["code"], "too_large", "{e}");
    u.join("r").await;
    // Viewers may join and ping.
    anon.join("r").await;
    still_open(&mut anon, 2).await;
    // Writing is unauthorized, joined or not (unauthorized comes before not_joined).
    let e = anon
        .call(json!({"op":"chat","room":"r","text":"hi"}), 3)
        .await;
    assert_eq!(e["code"], "unauthorized", "{e}");
    let e = anon
        .call(json!({"op":"chat","room":"elsewhere","text":"hi"}), 4)
        .await;
    assert_eq!(e["code"], "unauthorized", "{e}");
    // Frame validity comes before unauthorized.
    let e = anon
        .call(json!({"op":"chat","room":"r","text":"x".repeat(11)}), 5)
        .await;
    assert_eq!(e["code"], "too_large", "{e}");
    let e = anon
        .call(json!({"op":"chat","room":"bad room","text":"hi"}), 6)
        .await;
    assert_eq!(e["code"], "bad_request", "{e}");
    // The viewer's refused chats reached nobody: the member sees only its own.
    u.send(json!({"op":"chat","room":"r","text":"mine"})).await;
    let frames = u
        .frames_until(|f| !events_of(f, "r", "chat").is_empty())
        .await;
    let chats = events_of(&frames, "r", "chat");
    assert_eq!(chats.len(), 1, "{chats:?}");
    assert_eq!(chats[0]["text"], "mine");
    // Viewers may leave.
    let ack = anon.call(json!({"op":"leave","room":"r"}), 7).await;
    assert_eq!(ack["op"], "ack", "{ack}");
    gw.stop().await;
}

#[tokio::test]
async fn too_many_rooms_per_connection() {
    let gw = gateway(|c| c.limits.rooms_per_conn = 2).await;
    let mut a = gw.user("alice", "").await;
    a.join("a").await;
    a.join("b").await;
    let e = a.call(json!({"op":"join","room":"c"}), 1).await;
    assert_eq!(e["op"], "error", "{e}");
    assert_eq!(e["code"], "too_many_rooms", "{e}");
    // The refused join had no effect.
    let e = a.call(json!({"op":"chat","room":"c","text":"x"}), 2).await;
    assert_eq!(e["code"], "not_joined", "{e}");
    let (status, room) = gw.api("GET", "/api/v1/rooms/c", None).await;
    assert_eq!(status, 200);
    assert_eq!(room["online"], 0, "{room}");
    // Joining a room it is already in is fine at the cap.
    let j = a.call(json!({"op":"join","room":"a"}), 3).await;
    assert_eq!(j["op"], "joined", "{j}");
    // The cap is per connection: another connection of the same user may join c.
    let mut a2 = gw.user("alice", "").await;
    a2.join("c").await;
    // Leaving frees a place.
    let ack = a.call(json!({"op":"leave","room":"a"}), 4).await;
    assert_eq!(ack["op"], "ack");
    let j = a.call(json!({"op":"join","room":"c"}), 5).await;
    assert_eq!(j["op"], "joined", "{j}");
    assert_eq!(j["online"], 2, "{j}");
    gw.stop().await;
}

#[tokio::test]
async fn room_full_past_max_members() {
    let gw = gateway(|c| c.room.max_members = 2).await;
    let mut a = gw.user("alice", "").await;
    let mut b = gw.client("").await;
    let mut c = gw.user("carol", "").await;
    a.join("r").await;
    b.join("r").await;
    let e = c.call(json!({"op":"join","room":"r"}), 1).await;
    assert_eq!(e["op"], "error", "{e}");
    assert_eq!(e["code"], "room_full", "{e}");
    // No effect: carol is not in, the count is unchanged.
    let e = c.call(json!({"op":"chat","room":"r","text":"x"}), 2).await;
    assert_eq!(e["code"], "not_joined", "{e}");
    let (_, room) = gw.api("GET", "/api/v1/rooms/r", None).await;
    assert_eq!(room["online"], 2, "{room}");
    // A member joining again is not refused.
    let j = a.call(json!({"op":"join","room":"r"}), 3).await;
    assert_eq!(j["op"], "joined", "{j}");
    assert_eq!(j["online"], 2, "{j}");
    // The cap is per room.
    c.join("other").await;
    // A place frees up when a member leaves (here: disconnects).
    b.close().await;
    support::wait_until("b's place is free", async || {
        let e = c.call(json!({"op":"join","room":"r"}), 4).await;
        match e["op"].as_str() {
            Some("joined") => true,
            _ => {
                assert_eq!(e["code"], "room_full", "{e}");
                false
            }
        }
    })
    .await;
    let (_, room) = gw.api("GET", "/api/v1/rooms/r", None).await;
    assert_eq!(room["online"], 2, "{room}");
    gw.stop().await;
}

#[tokio::test]
async fn bad_frames_in_a_row_close_1008_and_a_good_frame_resets_the_count() {
    let gw = gateway(|c| c.limits.max_bad_frames = 3).await;
    let before = support::metric(gw.addr, "danmaku_connections_closed_total{code=\"1008\"}").await;
    let mut a = gw.user("alice", "").await;
    let bad = || Message::Text("{oops".into());
    for round in 0..3 {
        // Two bad frames, then a good one: never three in a row.
        for _ in 0..2 {
            a.send_raw(bad()).await;
            expect_error(&mut a, "bad_request", "bad frame").await;
        }
        still_open(&mut a, round).await;
    }
    // A refused but valid op also resets the count.
    a.send_raw(bad()).await;
    expect_error(&mut a, "bad_request", "bad").await;
    a.send_raw(bad()).await;
    expect_error(&mut a, "bad_request", "bad").await;
    let e = a.call(json!({"op":"leave","room":"x"}), 50).await;
    assert_eq!(e["code"], "not_joined");
    a.send_raw(bad()).await;
    expect_error(&mut a, "bad_request", "bad").await;
    a.send_raw(bad()).await;
    expect_error(&mut a, "bad_request", "bad").await;
    still_open(&mut a, 51).await;
    // Three in a row: each answered, then the connection closes with 1008.
    for _ in 0..3 {
        a.send_raw(bad()).await;
    }
    for _ in 0..3 {
        expect_error(&mut a, "bad_request", "bad").await;
    }
    assert_eq!(a.closed().await, 1008);
    support::wait_until("close 1008 counted", async || {
        support::metric(gw.addr, "danmaku_connections_closed_total{code=\"1008\"}").await > before
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn bad_msgpack_frames_in_a_row_close_1008() {
    let gw = gateway(|c| c.limits.max_bad_frames = 2).await;
    let mut a = gw.user("alice", "format=msgpack").await;
    a.send_raw(Message::Binary(vec![0xc1].into())).await;
    expect_error(&mut a, "bad_request", "bad").await;
    still_open(&mut a, 1).await;
    a.send_raw(Message::Binary(vec![0xc1].into())).await;
    a.send_raw(Message::Binary(vec![0xc1].into())).await;
    expect_error(&mut a, "bad_request", "bad").await;
    expect_error(&mut a, "bad_request", "bad").await;
    assert_eq!(a.closed().await, 1008);
    gw.stop().await;
}
