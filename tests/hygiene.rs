//! Protocol hygiene (PROTOCOL.md v1.1): a duplicated `token` in the query, a token whose
//! `nbf` is in the future, chat text that is only whitespace or zero-width characters,
//! an API body with something after its JSON value, and client frames that break RFC 6455
//! (close 1002).
//!
//! The RFC 6455 cases are written as raw bytes over a plain TCP socket: a WebSocket
//! client library refuses to produce such frames, and the test must also see exactly
//! which close frame (if any) the server answers with.

mod support;

use std::net::SocketAddr;

use danmaku_gateway::protocol::now_ms;
use serde_json::{Value, json};
use support::raw::{FIN, OP_CONTINUATION, OP_PING, OP_TEXT, RSV1, RawWs, frame};
use support::{API_TOKEN, Gateway, http, relax_rate_limits, token, token_claims};

use support::assert_http_error as assert_error;

async fn gateway() -> Gateway {
    Gateway::start_with(|c| {
        relax_rate_limits(c);
        c.server.drain_s = 0;
    })
    .await
}

// ---------------------------------------------------------------------------------------
// The query: one `token` only

#[tokio::test]
async fn a_token_given_twice_is_refused_before_the_upgrade() {
    let gw = gateway().await;
    let (a, b) = (token("alice", "Alice"), token("bob", "Bob"));
    for query in [
        format!("token={a}&token={b}"),
        // The same token twice is just as ambiguous to a proxy that rewrites one.
        format!("token={a}&room=r1&token={a}"),
        format!("token=&token={a}"),
    ] {
        let (status, head, body) = gw.upgrade_raw(&query, &[], None).await;
        assert_error(&(status, body.clone()), 400, "bad_request", &query);
        assert!(
            body["message"].as_str().unwrap().contains("token"),
            "message should name `token`: {body}"
        );
        assert!(!head.contains("101"), "{head}");
    }
    // One token is still fine, whatever else the query repeats or holds.
    let mut c = gw.user("carol", "room=r1").await;
    assert_eq!(c.hello["user"]["id"], "carol");
    assert_eq!(c.recv_op("joined").await["room"], "r1");
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Token claims: `nbf`

#[tokio::test]
async fn a_token_whose_nbf_is_in_the_future_gets_401() {
    let gw = gateway().await;
    let now = now_ms() / 1000;
    let future = token_claims(&json!({
        "sub": "alice", "name": "Alice", "exp": now + 7200, "nbf": now + 3600,
    }));
    let (status, _, body) = gw.upgrade_raw(&format!("token={future}"), &[], None).await;
    assert_error(&(status, body), 401, "unauthorized", "nbf in the future");

    let past = token_claims(&json!({
        "sub": "alice", "name": "Alice", "exp": now + 7200, "nbf": now - 60,
    }));
    let c = gw.client(&format!("token={past}")).await;
    assert_eq!(c.hello["user"]["id"], "alice");

    // `nbf` stays optional.
    let without = token_claims(&json!({"sub": "bob", "name": "Bob", "exp": now + 7200}));
    let c = gw.client(&format!("token={without}")).await;
    assert_eq!(c.hello["user"]["id"], "bob");
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// Chat text: blank after whitespace and zero-width characters

/// Texts that render as nothing: whitespace and U+200B..U+200D, U+2060, U+FEFF.
const BLANK_TEXTS: [&str; 6] = [
    "",
    " \t\n",
    "\u{200B}",
    "\u{200C}\u{200D}",
    " \u{2060} ",
    "\u{FEFF}\u{200B}\u{3000}",
];

#[tokio::test]
async fn blank_chat_from_a_client_is_bad_request() {
    let gw = gateway().await;
    let mut c = gw.user("alice", "room=r1").await;
    c.recv_op("joined").await;
    for (i, text) in BLANK_TEXTS.iter().enumerate() {
        let r = c
            .call(json!({"op":"chat","room":"r1","text":text}), i as i64 + 1)
            .await;
        assert_eq!(r["op"], "error", "{text:?}: {r}");
        assert_eq!(r["code"], "bad_request", "{text:?}: {r}");
    }
    // Visible text next to zero-width characters is fine, and reaches the room.
    let r = c
        .call(json!({"op":"chat","room":"r1","text":"\u{200B} hi"}), 100)
        .await;
    assert_eq!(r, json!({"op":"ack","ref":100}));
    let events = c
        .events_until("r1", |e| e.iter().any(|e| e["type"] == "chat"))
        .await;
    let chats: Vec<_> = events.iter().filter(|e| e["type"] == "chat").collect();
    assert_eq!(
        chats.len(),
        1,
        "only the visible chat is broadcast: {events:?}"
    );
    assert_eq!(chats[0]["text"], "\u{200B} hi");
    gw.stop().await;
}

#[tokio::test]
async fn blank_chat_from_the_api_is_400() {
    let gw = gateway().await;
    let user = json!({"id": "bot", "name": "Bot"});
    for text in BLANK_TEXTS {
        let got = gw
            .api(
                "POST",
                "/api/v1/rooms/r1/events",
                Some(&json!({"type":"chat","user":user,"text":text})),
            )
            .await;
        assert_error(&got, 400, "bad_request", &format!("{text:?}"));
        assert!(
            got.1["message"].as_str().unwrap().starts_with("text"),
            "message should name `text`: {}",
            got.1
        );
    }
    let (status, body) = gw
        .api(
            "POST",
            "/api/v1/rooms/r1/events",
            Some(&json!({"type":"chat","user":user,"text":"\u{200B} hi"})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// API bodies: exactly one JSON value

async fn post_raw(addr: SocketAddr, path: &str, body: &str) -> (u16, Value) {
    http(addr, "POST", path, Some(API_TOKEN), Some(body)).await
}

#[tokio::test]
async fn an_api_body_with_trailing_content_is_400() {
    let gw = gateway().await;
    let packet = r#"{"total":100,"shares":1,"sender":{"id":"boss","name":"Boss"}}"#;
    for (path, body) in [
        (
            "/api/v1/rooms/r1/events",
            r#"{"type":"system","text":"x"} {"a":1}"#.to_string(),
        ),
        (
            "/api/v1/rooms/r1/events",
            r#"{"type":"chat","user":{"id":"u","name":"U"},"text":"hi"}]"#.to_string(),
        ),
        ("/api/v1/rooms/r1/redpackets", format!("{packet}garbage")),
        ("/api/v1/rooms/r1/redpackets", format!("{packet} {packet}")),
    ] {
        let got = post_raw(gw.addr, path, &body).await;
        assert_error(&got, 400, "bad_request", &body);
    }
    // Trailing whitespace is not content.
    let got = post_raw(
        gw.addr,
        "/api/v1/rooms/r1/events",
        "{\"type\":\"system\",\"text\":\"x\"} \r\n\t\n",
    )
    .await;
    assert_eq!(got.0, 202, "{}", got.1);
    let got = post_raw(
        gw.addr,
        "/api/v1/rooms/r1/redpackets",
        &format!("{packet}\n"),
    )
    .await;
    assert_eq!(got.0, 201, "{}", got.1);
    // A field error still names the field.
    let got = post_raw(
        gw.addr,
        "/api/v1/rooms/r1/redpackets",
        r#"{"total":"lots","shares":1,"sender":{"id":"boss","name":"Boss"}} x"#,
    )
    .await;
    assert_error(&got, 400, "bad_request", "bad total");
    assert!(
        got.1["message"].as_str().unwrap().contains("total"),
        "{}",
        got.1
    );
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// RFC 6455 violations: close 1002

const PING_OP: &[u8] = br#"{"op":"ping","ref":1}"#;

/// Opens a connection, checks it works (a `ping` op gets its `pong`), sends `bad` and
/// expects close 1002.
async fn expect_1002(gw: &Gateway, what: &str, bad: &[u8]) {
    let mut ws = RawWs::connect(gw.addr, &format!("token={}", token("alice", "Alice"))).await;
    ws.send(&frame(FIN | OP_TEXT, PING_OP, true)).await;
    let pong = ws.next_data().await;
    let pong: Value = serde_json::from_slice(&pong.payload).unwrap();
    assert_eq!(pong, json!({"op":"pong","ref":1}), "{what}");
    ws.send(bad).await;
    assert_eq!(ws.close_code().await, 1002, "{what}");
}

#[tokio::test]
async fn rsv1_without_a_negotiated_extension_closes_with_1002() {
    let gw = gateway().await;
    expect_1002(&gw, "RSV1", &frame(FIN | RSV1 | OP_TEXT, PING_OP, true)).await;
    gw.stop().await;
}

#[tokio::test]
async fn an_unmasked_client_frame_closes_with_1002() {
    let gw = gateway().await;
    expect_1002(&gw, "unmasked", &frame(FIN | OP_TEXT, PING_OP, false)).await;
    gw.stop().await;
}

#[tokio::test]
async fn an_unknown_opcode_closes_with_1002() {
    let gw = gateway().await;
    expect_1002(&gw, "opcode 3", &frame(FIN | 0x3, PING_OP, true)).await;
    gw.stop().await;
}

#[tokio::test]
async fn a_control_frame_over_125_bytes_closes_with_1002() {
    let gw = gateway().await;
    expect_1002(
        &gw,
        "126-byte ping",
        &frame(FIN | OP_PING, &[b'p'; 126], true),
    )
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn a_fragmented_ping_closes_with_1002() {
    let gw = gateway().await;
    expect_1002(&gw, "ping without FIN", &frame(OP_PING, b"hi", true)).await;
    gw.stop().await;
}

#[tokio::test]
async fn a_stray_continuation_frame_closes_with_1002() {
    let gw = gateway().await;
    expect_1002(
        &gw,
        "continuation without a started message",
        &frame(FIN | OP_CONTINUATION, PING_OP, true),
    )
    .await;
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// The reader keeps no buffer between messages: a large one still arrives whole

#[tokio::test]
async fn a_message_larger_than_one_read_is_read_whole() {
    let gw = gateway().await;
    let mut ws = RawWs::connect(gw.addr, &format!("token={}", token("alice", "Alice"))).await;
    // 40 KB: ten times the reader's scratch, so it crosses many socket reads.
    let pad = "x".repeat(40_000);
    let op = json!({"op":"ping","ref":9,"pad":pad}).to_string();
    ws.send(&frame(FIN | OP_TEXT, op.as_bytes(), true)).await;
    // Then a small one right behind it, likely in the same read as the big one's tail.
    ws.send(&frame(FIN | OP_TEXT, PING_OP, true)).await;
    let first: Value = serde_json::from_slice(&ws.next_data().await.payload).unwrap();
    let second: Value = serde_json::from_slice(&ws.next_data().await.payload).unwrap();
    assert_eq!(first["ref"], 9, "{first}");
    assert_eq!(second, json!({"op":"pong","ref":1}));
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------
// The replies the protocol owes: built by the gateway, not the frame reader

#[tokio::test]
async fn a_client_ping_gets_a_pong_with_its_payload() {
    let gw = gateway().await;
    let mut ws = RawWs::connect(gw.addr, &format!("token={}", token("alice", "Alice"))).await;
    ws.send(&frame(FIN | OP_PING, b"are you there", true)).await;
    let pong = loop {
        let f = ws.next_frame().await;
        if f.opcode == 0xA {
            break f;
        }
    };
    assert!(pong.fin && !pong.rsv1);
    assert_eq!(pong.payload, b"are you there");
    gw.stop().await;
}

#[tokio::test]
async fn a_client_close_is_echoed_with_its_code() {
    let gw = gateway().await;
    let mut ws = RawWs::connect(gw.addr, &format!("token={}", token("alice", "Alice"))).await;
    let mut close = 4321u16.to_be_bytes().to_vec();
    close.extend_from_slice(b"bye");
    ws.send(&frame(FIN | 0x8, &close, true)).await;
    assert_eq!(ws.close_code().await, 4321);
    gw.stop().await;
}
