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
use support::{API_TOKEN, Gateway, WAIT, http, relax_rate_limits, token, token_claims};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// A WebSocket over a bare TCP stream, after a hand-written upgrade; bytes past the 101
/// response are kept for the frame reader.
struct RawWs {
    tcp: TcpStream,
    buf: Vec<u8>,
}

/// One server frame as read off the wire.
#[derive(Debug)]
struct ServerFrame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

impl RawWs {
    /// Upgrades (no extension offered) and reads the server's `hello` frame.
    async fn connect(addr: SocketAddr, query: &str) -> Self {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET /ws?{query} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut ws = RawWs {
            tcp,
            buf: Vec::new(),
        };
        let end = loop {
            if let Some(i) = ws.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            ws.fill().await;
        };
        let head = String::from_utf8_lossy(&ws.buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            !head
                .to_ascii_lowercase()
                .contains("sec-websocket-extensions"),
            "no extension was offered, none may be accepted: {head}"
        );
        ws.buf.drain(..end);
        let hello = ws.next_data().await;
        assert_eq!(hello.opcode, 0x1, "{hello:?}");
        let hello: Value = serde_json::from_slice(&hello.payload).unwrap();
        assert_eq!(hello["op"], "hello", "{hello}");
        ws
    }

    /// Reads more bytes; panics at EOF or after [`WAIT`].
    async fn fill(&mut self) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, self.tcp.read(&mut chunk))
            .await
            .expect("timed out reading from the server")
            .expect("read error");
        assert!(n > 0, "connection closed without a close frame");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    async fn need(&mut self, n: usize) {
        while self.buf.len() < n {
            self.fill().await;
        }
    }

    /// The next server frame; asserts it is unmasked (RFC 6455 §5.1).
    async fn next_frame(&mut self) -> ServerFrame {
        self.need(2).await;
        let (b0, b1) = (self.buf[0], self.buf[1]);
        assert_eq!(b1 & 0x80, 0, "server frames must not be masked");
        let (len, header) = match b1 & 0x7F {
            126 => {
                self.need(4).await;
                (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
            }
            127 => {
                self.need(10).await;
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.buf[2..10]);
                (u64::from_be_bytes(b) as usize, 10)
            }
            n => (n as usize, 2),
        };
        self.need(header + len).await;
        let payload = self.buf[header..header + len].to_vec();
        self.buf.drain(..header + len);
        ServerFrame {
            fin: b0 & 0x80 != 0,
            opcode: b0 & 0x0F,
            payload,
        }
    }

    /// The next data frame, skipping the server's pings.
    async fn next_data(&mut self) -> ServerFrame {
        loop {
            let f = self.next_frame().await;
            if f.opcode != 0x9 && f.opcode != 0xA {
                return f;
            }
        }
    }

    /// Reads until the server's close frame and returns its code; panics if the
    /// connection ends without one.
    async fn close_code(&mut self) -> u16 {
        let read = async {
            loop {
                let f = self.next_frame().await;
                if f.opcode == 0x8 {
                    assert!(f.fin, "a close frame is never fragmented");
                    assert!(f.payload.len() >= 2, "close frame without a code: {f:?}");
                    return u16::from_be_bytes([f.payload[0], f.payload[1]]);
                }
            }
        };
        tokio::time::timeout(WAIT * 2, read)
            .await
            .expect("timed out waiting for a close frame")
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.unwrap();
    }
}

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A client frame: first header byte `b0` (FIN, RSV and opcode bits as given), masked
/// with [`MASK`] when `masked`.
fn frame(b0: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut out = vec![b0];
    match payload.len() {
        n @ 0..=125 => out.push(mask_bit | n as u8),
        n @ 126..=0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

const FIN: u8 = 0x80;
const RSV1: u8 = 0x40;
const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_PING: u8 = 0x9;
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
