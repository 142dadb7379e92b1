//! permessage-deflate (PROTOCOL.md v1.1, *Compression*): negotiation, shared deflated
//! batches, compressed client frames, and the inflated-size bound.
//!
//! Written with the raw client (`support::raw`): the tests must see RSV1 on the wire,
//! compare the exact bytes different members get, and send compressed frames by hand.

mod support;

use danmaku_gateway::config::Config;
use serde_json::{Value, json};
use support::raw::{FIN, OP_CONTINUATION, OP_TEXT, RSV1, RawWs, ServerFrame, deflate, frame};
use support::{Gateway, TestPki, metric, relax_rate_limits, tls_connect, token};

/// What the gateway answers to any offer it accepts.
const AGREED: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
/// A 200-character chat: its batch is well over `compression.min_bytes` (256).
fn long_text() -> String {
    "弹幕666哈哈哈awsl🔥".repeat(20).chars().take(200).collect()
}

async fn gateway_with(edit: impl FnOnce(&mut Config)) -> Gateway {
    Gateway::start_with(|c| {
        relax_rate_limits(c);
        c.server.drain_s = 0;
        // No presence batches between the ones a test waits for.
        c.room.presence_ms = 3_600_000;
        edit(c);
    })
    .await
}

/// The `Sec-WebSocket-Extensions` line of a response head, if any.
fn extensions(head: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("sec-websocket-extensions")
            .then(|| v.trim().to_string())
    })
}

/// Connects as `user` offering `offer` (if any) with `query`; returns the socket and
/// what the server agreed to.
async fn connect(
    gw: &Gateway,
    user: &str,
    query: &str,
    offer: Option<&str>,
) -> (RawWs, Option<String>) {
    let query = format!("token={}&{query}", token(user, user));
    let headers: Vec<(&str, &str)> = offer
        .map(|o| vec![("Sec-WebSocket-Extensions", o)])
        .unwrap_or_default();
    let (ws, head) = RawWs::connect_with(gw.addr, &query, &headers).await;
    (ws, extensions(&head))
}

/// The next data frame that is a `batch` with more than presence in it; `joined`,
/// replies and the room's online counts before it are skipped.
async fn next_batch(ws: &mut RawWs, msgpack: bool) -> (ServerFrame, Value) {
    loop {
        let f = ws.next_data().await;
        let v: Value = if msgpack {
            rmp_serde::from_slice(&f.data()).unwrap()
        } else {
            serde_json::from_slice(&f.data()).unwrap()
        };
        let presence_only = v["events"]
            .as_array()
            .is_some_and(|evs| evs.iter().all(|e| e["type"] == "presence"));
        if v["op"] == "batch" && !presence_only {
            return (f, v);
        }
    }
}

/// The next data frame that answers `ref`.
async fn reply(ws: &mut RawWs, reference: i64) -> Value {
    loop {
        let v = ws.next_data().await.json();
        if v["ref"] == reference {
            return v;
        }
    }
}

async fn send_json(ws: &mut RawWs, op: Value) {
    ws.send(&frame(FIN | OP_TEXT, op.to_string().as_bytes(), true))
        .await;
}

#[tokio::test]
async fn negotiation_accepts_what_it_can_honour_and_declines_the_rest() {
    let gw = gateway_with(|_| {}).await;
    for (offer, agreed) in [
        (Some("permessage-deflate"), true),
        // Chromium's and Firefox's offer.
        (Some("permessage-deflate; client_max_window_bits"), true),
        (
            Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
            true,
        ),
        (Some("permessage-deflate; client_max_window_bits=9"), true),
        (None, false),
        (Some("x-webkit-deflate-frame"), false),
        // A window smaller than the shared frames are deflated with: cannot honour.
        (Some("permessage-deflate; server_max_window_bits=10"), false),
        (
            Some("permessage-deflate; server_max_window_bits=10, permessage-deflate"),
            true,
        ),
        (Some("permessage-deflate; no_such_parameter"), false),
    ] {
        let (mut ws, got) = connect(&gw, "alice", "", offer).await;
        assert_eq!(got.as_deref(), agreed.then_some(AGREED), "offer {offer:?}");
        // The connection works either way.
        send_json(&mut ws, json!({"op":"ping","ref":7})).await;
        assert_eq!(reply(&mut ws, 7).await, json!({"op":"pong","ref":7}));
    }
    gw.stop().await;

    let off = gateway_with(|c| c.compression.enabled = false).await;
    let (_, got) = connect(&off, "alice", "", Some("permessage-deflate")).await;
    assert_eq!(
        got, None,
        "compression.enabled = false declines every offer"
    );
    off.stop().await;
}

#[tokio::test]
async fn members_of_one_room_each_get_the_frame_they_negotiated() {
    let gw = gateway_with(|_| {}).await;
    let (mut json_deflate, _) = connect(&gw, "a", "room=r", Some("permessage-deflate")).await;
    let (mut json_plain, _) = connect(&gw, "b", "room=r", None).await;
    let (mut mp_deflate, agreed) = connect(
        &gw,
        "c",
        "room=r&format=msgpack",
        Some("permessage-deflate; client_max_window_bits"),
    )
    .await;
    assert_eq!(agreed.as_deref(), Some(AGREED));
    let (mut mp_plain, _) = connect(&gw, "d", "room=r&format=msgpack", None).await;
    for ws in [
        &mut json_deflate,
        &mut json_plain,
        &mut mp_deflate,
        &mut mp_plain,
    ] {
        let joined = ws.next_data().await;
        assert!(!joined.rsv1, "a joined without history is small: plain");
    }

    // A large window: deflated for those who negotiated, the same bytes plain for
    // the others.
    let text = long_text();
    send_json(
        &mut json_plain,
        json!({"op":"chat","room":"r","text":text,"ref":1}),
    )
    .await;
    let (a, a_v) = next_batch(&mut json_deflate, false).await;
    let (b, b_v) = next_batch(&mut json_plain, false).await;
    let (c, c_v) = next_batch(&mut mp_deflate, true).await;
    let (d, d_v) = next_batch(&mut mp_plain, true).await;
    assert!(
        a.rsv1 && c.rsv1,
        "deflate members get the compressed frame: {a_v} {c_v} {} {}",
        a.wire_len,
        c.wire_len
    );
    assert!(!b.rsv1 && !d.rsv1, "the others get the plain frame");
    assert_eq!((a.opcode, b.opcode, c.opcode, d.opcode), (1, 1, 2, 2));
    assert_eq!(
        a.data(),
        b.payload,
        "JSON: inflated = the plain frame's payload"
    );
    assert_eq!(
        c.data(),
        d.payload,
        "MessagePack: inflated = the plain payload"
    );
    assert!(a.wire_len < b.wire_len && c.wire_len < d.wire_len);
    for v in [&a_v, &b_v, &c_v, &d_v] {
        assert_eq!(v["events"][0]["text"], text.as_str(), "{v}");
    }

    // A small window (under compression.min_bytes) goes plain to everyone.
    send_json(
        &mut json_plain,
        json!({"op":"chat","room":"r","text":"hi","ref":2}),
    )
    .await;
    let (small, v) = next_batch(&mut json_deflate, false).await;
    assert!(!small.rsv1, "a {}-byte frame stays plain", small.wire_len);
    assert_eq!(v["events"][0]["text"], "hi");

    let deflated = metric(gw.addr, "danmaku_deliveries_deflated_total").await;
    assert!(deflated >= 2.0, "deflated deliveries counted: {deflated}");
    let yes = metric(
        gw.addr,
        "danmaku_connections_deflate_total{deflate=\"yes\"}",
    )
    .await;
    assert!(yes >= 2.0, "negotiations counted: {yes}");
    gw.stop().await;
}

#[tokio::test]
async fn a_compressed_client_frame_is_inflated() {
    let gw = gateway_with(|_| {}).await;
    let (mut sender, _) = connect(&gw, "a", "room=r", Some("permessage-deflate")).await;
    let (mut viewer, _) = connect(&gw, "b", "room=r", None).await;
    sender.next_data().await;
    viewer.next_data().await;
    let text = long_text();
    let op = json!({"op":"chat","room":"r","text":text,"ref":3}).to_string();
    sender
        .send(&frame(FIN | RSV1 | OP_TEXT, &deflate(op.as_bytes()), true))
        .await;
    assert_eq!(reply(&mut sender, 3).await, json!({"op":"ack","ref":3}));
    let (_, batch) = next_batch(&mut viewer, false).await;
    assert_eq!(batch["events"][0]["text"], text.as_str());
    // A plain frame on the same connection is fine too (RSV1 is per message).
    send_json(&mut sender, json!({"op":"ping","ref":4})).await;
    assert_eq!(reply(&mut sender, 4).await, json!({"op":"pong","ref":4}));
    // A compressed message in two fragments: RSV1 on the first frame only.
    let op = json!({"op":"chat","room":"r","text":"in two parts","ref":5}).to_string();
    let deflated = deflate(op.as_bytes());
    let (a, b) = deflated.split_at(deflated.len() / 2);
    sender.send(&frame(RSV1 | OP_TEXT, a, true)).await;
    sender.send(&frame(FIN | OP_CONTINUATION, b, true)).await;
    assert_eq!(reply(&mut sender, 5).await, json!({"op":"ack","ref":5}));
    gw.stop().await;
}

#[tokio::test]
async fn a_decompression_bomb_closes_with_1009() {
    let gw = gateway_with(|_| {}).await;
    let limit = gw.cfg.limits.max_frame_bytes;
    let (mut ws, _) = connect(&gw, "a", "", Some("permessage-deflate")).await;
    // 16 MiB of one byte deflates to ~16 KiB: small on the wire, far over the limit
    // inflated.
    let bomb = deflate(&vec![b' '; 16 << 20]);
    assert!(bomb.len() < limit, "{} bytes on the wire", bomb.len());
    ws.send(&frame(FIN | RSV1 | OP_TEXT, &bomb, true)).await;
    assert_eq!(ws.close_code().await, 1009);
    gw.stop().await;
}

#[tokio::test]
async fn a_compressed_frame_that_does_not_inflate_closes_with_1007() {
    let gw = gateway_with(|_| {}).await;
    let (mut ws, _) = connect(&gw, "a", "", Some("permessage-deflate")).await;
    // Block type 3 does not exist (RFC 1951 §3.2.3).
    ws.send(&frame(
        FIN | RSV1 | OP_TEXT,
        &[0xff, 0xff, 0xff, 0xff],
        true,
    ))
    .await;
    assert_eq!(ws.close_code().await, 1007);
    gw.stop().await;
}

#[tokio::test]
async fn a_tls_member_gets_the_same_deflated_payload() {
    let pki = TestPki::new("deflate-tls");
    let gw = gateway_with(|c| pki.configure(c)).await;
    let query = format!("token={}&room=r", token("t", "t"));
    let offer = [("Sec-WebSocket-Extensions", "permessage-deflate")];
    let tls = tls_connect(gw.addr, &[&pki.ca], b"", None).await.unwrap();
    let (mut over_tls, head) = RawWs::upgrade_over(Box::new(tls), gw.addr, &query, &offer).await;
    assert_eq!(extensions(&head).as_deref(), Some(AGREED));
    over_tls.next_data().await;
    let (mut plain_tls, _) = {
        let tls = tls_connect(gw.addr, &[&pki.ca], b"", None).await.unwrap();
        let q = format!("token={}&room=r", token("p", "p"));
        RawWs::upgrade_over(Box::new(tls), gw.addr, &q, &[]).await
    };
    plain_tls.next_data().await;
    let text = long_text();
    send_json(
        &mut plain_tls,
        json!({"op":"chat","room":"r","text":text,"ref":1}),
    )
    .await;
    let (f, v) = next_batch(&mut over_tls, false).await;
    let (p, _) = next_batch(&mut plain_tls, false).await;
    assert!(
        f.rsv1 && !p.rsv1,
        "the TLS member that negotiated gets RSV1, the other not"
    );
    assert_eq!(
        f.data(),
        p.payload,
        "the deflated payload inflates to the plain one"
    );
    assert_eq!(v["events"][0]["text"], text.as_str());
    gw.stop().await;
}
