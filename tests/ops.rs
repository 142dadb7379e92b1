//! Every client op and server reply of the single-node core (join, leave, chat, ping →
//! hello, joined, ack, pong, error, batch), in both wire formats, with `ref` echoed when
//! the op carried one and left out when it did not.

mod support;

use danmaku_gateway::config::Config;
use serde_json::{Value, json};
use support::{Client, Gateway, events_of, ops_of, relax_rate_limits};
use tokio_tungstenite::tungstenite::Message;

/// Runs the async fn `$name(fmt)` once per wire format, as `$name::json` and
/// `$name::msgpack`.
macro_rules! both_formats {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn json() {
                super::$name("json").await
            }
            #[tokio::test]
            async fn msgpack() {
                super::$name("msgpack").await
            }
        }
    )*};
}

both_formats!(
    hello_fields,
    join_replies_joined,
    leave_replies_ack,
    chat_replies_ack_and_broadcasts,
    ping_replies_pong,
    ref_values_round_trip,
    errors_echo_ref_or_omit_it,
    every_core_error_code,
    system_event_data_survives_the_format,
);

async fn gateway(edit: impl FnOnce(&mut Config)) -> Gateway {
    Gateway::start_with(|c| {
        relax_rate_limits(c);
        c.server.drain_s = 0;
        edit(c);
    })
    .await
}

fn q(fmt: &str, extra: &str) -> String {
    if extra.is_empty() {
        format!("format={fmt}")
    } else {
        format!("format={fmt}&{extra}")
    }
}

fn assert_no_ref(v: &Value) {
    assert!(
        v.get("ref").is_none(),
        "reply carries a ref it was not given: {v}"
    );
}

async fn hello_fields(fmt: &str) {
    let gw = gateway(|_| {}).await;
    // Raw first frame: text for JSON, a MessagePack *map* (named fields) for msgpack.
    let mut raw = gw.connect(&q(fmt, "")).await.unwrap();
    let first = raw.next_raw(support::WAIT).await.expect("hello");
    match (&first, fmt) {
        (Message::Text(_), "json") => {}
        (Message::Binary(b), "msgpack") => {
            let marker = b[0];
            assert!(
                (0x80..=0x8f).contains(&marker) || marker == 0xde || marker == 0xdf,
                "msgpack hello is not a map (marker {marker:#x})"
            );
        }
        (m, f) => panic!("hello in {f} came as {m:?}"),
    }
    let hello = raw.decode(&first).unwrap();
    assert_eq!(hello["op"], "hello");
    assert_eq!(hello["user"], Value::Null, "anonymous viewer: {hello}");
    assert_eq!(hello["node"], "test-node");
    assert_eq!(hello["heartbeat_ms"], json!(gw.cfg.server.heartbeat_ms));
    let anon_conn = hello["conn"]
        .as_str()
        .expect("conn is a string")
        .to_string();
    assert!(!anon_conn.is_empty());

    let t = support::token("u-42", "Ann Lee");
    let u = gw.client(&q(fmt, &format!("token={t}"))).await;
    assert_eq!(u.hello["user"], json!({"id":"u-42","name":"Ann Lee"}));
    assert_eq!(u.hello["node"], "test-node");
    let conn = u.hello["conn"].as_str().unwrap();
    assert_ne!(conn, anon_conn, "two connections share a conn id");
    gw.stop().await;
}

async fn join_replies_joined(fmt: &str) {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", &q(fmt, "")).await;
    a.send(json!({"op":"join","room":"lobby","ref":7})).await;
    let j = a.reply().await;
    assert_eq!(j["op"], "joined", "{j}");
    assert_eq!(j["ref"], 7);
    assert_eq!(j["room"], "lobby");
    assert_eq!(j["online"], 1);
    assert_eq!(j["history"], json!([]));
    assert_eq!(j["redpackets"], json!([]));

    // Without a ref: the same reply, no ref.
    let mut b = gw.client(&q(fmt, "")).await;
    b.send(json!({"op":"join","room":"lobby"})).await;
    let j = b.reply().await;
    assert_eq!(j["op"], "joined", "{j}");
    assert_no_ref(&j);
    assert_eq!(j["room"], "lobby");
    assert_eq!(j["online"], 2, "anonymous viewers count: {j}");
    assert_eq!(j["history"], json!([]));
    // An explicit history of 0 is the default.
    b.send(json!({"op":"join","room":"lobby-2","history":0,"ref":0}))
        .await;
    let j = b.reply().await;
    assert_eq!((&j["op"], &j["ref"]), (&json!("joined"), &json!(0)), "{j}");
    assert_eq!(j["history"], json!([]));
    gw.stop().await;
}

async fn leave_replies_ack(fmt: &str) {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", &q(fmt, "")).await;
    let mut b = gw.user("bob", &q(fmt, "")).await;
    a.join("r").await;
    a.join("s").await;
    assert_eq!(b.join("r").await["online"], 2);

    let ack = a.call(json!({"op":"leave","room":"r"}), 11).await;
    assert_eq!(ack["op"], "ack", "{ack}");
    assert!(ack.get("amount").is_none(), "{ack}");
    a.send(json!({"op":"leave","room":"s"})).await;
    let ack = a.reply().await;
    assert_eq!(ack["op"], "ack", "{ack}");
    assert_no_ref(&ack);

    // The leave took effect: the room counts one member, and a chat there is refused.
    let j = b.call(json!({"op":"join","room":"r"}), 1).await;
    assert_eq!(j["online"], 1, "{j}");
    let e = a.call(json!({"op":"chat","room":"r","text":"x"}), 12).await;
    assert_eq!(e["code"], "not_joined", "{e}");
    gw.stop().await;
}

async fn chat_replies_ack_and_broadcasts(fmt: &str) {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", &q(fmt, "")).await;
    a.join("r").await;
    let before = danmaku_gateway::protocol::now_ms();
    a.send(json!({"op":"chat","room":"r","text":"弹幕 🎉 one","ref":21}))
        .await;
    a.send(json!({"op":"chat","room":"r","text":"two"})).await;
    // Batches may arrive before, between or after the acks: collect everything.
    let frames = a
        .frames_until(|f| ops_of(f, "ack").len() == 2 && events_of(f, "r", "chat").len() == 2)
        .await;
    let acks = ops_of(&frames, "ack");
    assert_eq!(acks[0]["ref"], 21, "{frames:?}");
    assert!(acks[0].get("amount").is_none());
    assert_no_ref(acks[1]);
    assert!(ops_of(&frames, "error").is_empty(), "{frames:?}");
    let events = events_of(&frames, "r", "chat");
    let texts: Vec<_> = events.iter().map(|e| e["text"].clone()).collect();
    assert_eq!(texts, vec![json!("弹幕 🎉 one"), json!("two")]);
    for e in &events {
        assert_eq!(e["type"], "chat");
        assert_eq!(e["user"], json!({"id":"alice","name":"alice"}));
        assert!(e["id"].as_str().is_some_and(|s| !s.is_empty()), "{e}");
        let ts = e["ts"].as_u64().expect("ts is unix ms");
        assert!(
            ts > before - 60_000 && ts <= danmaku_gateway::protocol::now_ms(),
            "{e}"
        );
    }
    assert_ne!(events[0]["id"], events[1]["id"], "event ids are unique");
    gw.stop().await;
}

async fn ping_replies_pong(fmt: &str) {
    let gw = gateway(|_| {}).await;
    // Anonymous viewers may ping too.
    let mut a = gw.client(&q(fmt, "")).await;
    a.send(json!({"op":"ping","ref":5})).await;
    let p = a.reply().await;
    assert_eq!(p, json!({"op":"pong","ref":5}));
    a.send(json!({"op":"ping"})).await;
    let p = a.reply().await;
    assert_eq!(p["op"], "pong", "{p}");
    assert_no_ref(&p);
    gw.stop().await;
}

async fn ref_values_round_trip(fmt: &str) {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", &q(fmt, "")).await;
    for r in [
        0i64,
        1,
        -1,
        4_294_967_296,
        9_007_199_254_740_993,
        i64::MAX,
        i64::MIN,
    ] {
        a.send(json!({"op":"ping","ref":r})).await;
        let p = a.reply().await;
        assert_eq!(p["op"], "pong", "{p}");
        assert_eq!(p["ref"].as_i64(), Some(r), "ref {r} came back as {p}");
    }
    // Replies to interleaved ops each carry their own ref, in order.
    a.send(json!({"op":"join","room":"r","ref":100})).await;
    a.send(json!({"op":"chat","room":"r","text":"x","ref":101}))
        .await;
    a.send(json!({"op":"leave","room":"r","ref":102})).await;
    a.send(json!({"op":"ping","ref":103})).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        let r = a.reply().await;
        got.push((r["op"].as_str().unwrap().to_string(), r["ref"].clone()));
    }
    assert_eq!(
        got,
        vec![
            ("joined".to_string(), json!(100)),
            ("ack".to_string(), json!(101)),
            ("ack".to_string(), json!(102)),
            ("pong".to_string(), json!(103)),
        ]
    );
    gw.stop().await;
}

async fn errors_echo_ref_or_omit_it(fmt: &str) {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", &q(fmt, "")).await;
    // A refused op (valid frame).
    let e = a.call(json!({"op":"chat","room":"r","text":"x"}), 31).await;
    assert_eq!(e["op"], "error", "{e}");
    assert_eq!(e["code"], "not_joined");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    assert!(e.get("retry_after_ms").is_none(), "{e}");
    a.send(json!({"op":"leave","room":"r"})).await;
    let e = a.reply().await;
    assert_eq!(
        (&e["op"], &e["code"]),
        (&json!("error"), &json!("not_joined"))
    );
    assert_no_ref(&e);
    // An invalid frame whose ref is readable still gets it back.
    let e = a.call(json!({"op":"dance"}), 32).await;
    assert_eq!(e["code"], "bad_request", "{e}");
    let e = a.call(json!({"op":"join","room":"no spaces"}), 33).await;
    assert_eq!(e["code"], "bad_request", "{e}");
    a.send(json!({"op":"dance"})).await;
    let e = a.reply().await;
    assert_eq!(e["code"], "bad_request", "{e}");
    assert_no_ref(&e);
    gw.stop().await;
}

/// Every error code of the single-node core, once per format, with the op refused.
async fn every_core_error_code(fmt: &str) {
    let gw = gateway(|c| {
        c.limits.rooms_per_conn = 1;
        c.room.max_members = 1;
    })
    .await;
    let mut a = gw.user("alice", &q(fmt, "")).await;
    let mut anon = gw.client(&q(fmt, "")).await;
    let expect = async |c: &mut Client, op: Value, code: &str, r: i64| {
        let e = c.call(op.clone(), r).await;
        assert_eq!(e["op"], "error", "{op} → {e}");
        assert_eq!(e["code"], code, "{op} → {e}");
        assert!(e["message"].is_string(), "{e}");
    };
    expect(&mut a, json!({"op":"nope"}), "bad_request", 1).await;
    let long = "x".repeat(gw.cfg.limits.max_text_chars + 1);
    expect(
        &mut a,
        json!({"op":"chat","room":"r","text":long}),
        "too_large",
        2,
    )
    .await;
    expect(
        &mut a,
        json!({"op":"chat","room":"r","text":"hi"}),
        "not_joined",
        3,
    )
    .await;
    expect(&mut a, json!({"op":"leave","room":"r"}), "not_joined", 4).await;
    a.join("r").await;
    expect(
        &mut a,
        json!({"op":"join","room":"other"}),
        "too_many_rooms",
        5,
    )
    .await;
    expect(&mut anon, json!({"op":"join","room":"r"}), "room_full", 6).await;
    anon.join("elsewhere").await;
    expect(
        &mut anon,
        json!({"op":"chat","room":"elsewhere","text":"hi"}),
        "unauthorized",
        7,
    )
    .await;
    // The connections are still fine after all that.
    let p = a.call(json!({"op":"ping"}), 8).await;
    assert_eq!(p["op"], "pong");
    let p = anon.call(json!({"op":"ping"}), 9).await;
    assert_eq!(p["op"], "pong");
    gw.stop().await;
}

/// A system event's arbitrary `data` (nested objects, arrays, numbers, bools, null,
/// unicode) reaches a member of either format unchanged, and the batch has the schema.
async fn system_event_data_survives_the_format(fmt: &str) {
    let gw = gateway(|_| {}).await;
    let mut a = gw.client(&q(fmt, "room=live")).await;
    assert_eq!(a.reply().await["op"], "joined");
    let data = json!({
        "n": 3, "neg": -7, "f": 1.5, "ok": true, "none": null,
        "list": [1, "two", {"three": [3]}], "名": "值"
    });
    let (status, body) = gw
        .api(
            "POST",
            "/api/v1/rooms/live/events",
            Some(&json!({"type":"system","text":"stream starts","data":data})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let batch = loop {
        let b = a.recv_op("batch").await;
        if b["events"]
            .as_array()
            .expect("events array")
            .iter()
            .any(|e| e["type"] == "system")
        {
            break b;
        }
    };
    assert_eq!(batch["room"], "live", "{batch}");
    let e = batch["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "system")
        .expect("system event");
    assert_eq!(e["text"], "stream starts");
    assert_eq!(e["data"], data);
    assert_eq!(e["id"], body["id"]);
    assert!(e["ts"].is_u64());
    gw.stop().await;
}
