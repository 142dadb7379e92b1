//! A session while its ops wait, joins racing flushes, the per-room gift budget, and
//! the HTTP and handshake corners of PROTOCOL.md: format negotiation, JSON errors for
//! every refusal, token claims, and a text frame that is not UTF-8.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};
use support::{ConnectOpts, Gateway, RedisServer, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};

/// A grab that waits on a stalled Redis must not stop the connection's outbound queue:
/// undroppable batches keep arriving meanwhile, and a queue of 2 would overflow (4010)
/// if the session stopped writing while it waited.
#[tokio::test]
async fn a_client_waiting_on_its_grab_keeps_receiving_batches() {
    let redis = RedisServer::start();
    let gw = support::redis_node(&redis.url(), "n1", |c| {
        c.limits.outbound_queue = 2;
        c.room.batch_ms = 20;
    })
    .await;
    let mut alice = gw.user("alice", "").await;
    alice.join("stage").await;
    let (status, created) = gw
        .api(
            "POST",
            "/api/v1/rooms/stage/redpackets",
            Some(&json!({"total": 100, "shares": 2, "sender": {"id":"boss","name":"Boss"}})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let packet = created["packet"].as_str().unwrap().to_string();
    alice
        .events_until("stage", |e| e.iter().any(|e| e["type"] == "redpacket"))
        .await;

    redis.pause();
    alice
        .send(json!({"op":"grab","room":"stage","packet":packet,"ref":7}))
        .await;
    // Ten undroppable system events in ten windows while the grab waits on Redis.
    let feeder = {
        let addr = gw.addr;
        tokio::spawn(async move {
            for i in 0..10 {
                let body = json!({"type":"system","text":format!("s{i}")}).to_string();
                let (status, _) = support::http(
                    addr,
                    "POST",
                    "/api/v1/rooms/stage/events",
                    Some(support::API_TOKEN),
                    Some(&body),
                )
                .await;
                assert_eq!(status, 202);
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };
    let mut seen = Vec::new();
    let reply = loop {
        let v = alice.recv().await;
        if v["op"] == "batch" {
            for e in v["events"].as_array().unwrap() {
                if e["type"] == "system" {
                    seen.push(e["text"].as_str().unwrap().to_string());
                }
            }
        } else if v["ref"] == json!(7) {
            break v;
        }
    };
    feeder.await.unwrap();
    redis.resume();
    assert!(
        !seen.is_empty(),
        "batches kept flowing while the grab waited; got reply {reply} first"
    );
    // The grab's outcome is a plain answer (busy while Redis stalled, or the amount).
    assert!(
        reply["op"] == "ack" || reply["code"] == "busy" || reply["code"] == "internal",
        "{reply}"
    );
    // Every system event arrives, and the connection is still open.
    let rest = if seen.iter().any(|t| t == "s9") {
        Vec::new()
    } else {
        alice
            .events_until("stage", |e| e.iter().any(|e| e["text"] == "s9"))
            .await
    };
    seen.extend(
        rest.iter()
            .filter(|e| e["type"] == "system")
            .map(|e| e["text"].as_str().unwrap().to_string()),
    );
    let expected: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
    assert_eq!(seen, expected);
    let pong = alice.call(json!({"op":"ping"}), 8).await;
    assert_eq!(pong["op"], "pong");
    gw.stop().await;
}

/// Joins racing a room's flushes: each event is in the joiner's `history` or in its
/// first batches, never in both and never in neither.
#[tokio::test]
async fn a_join_racing_a_flush_sees_each_event_exactly_once() {
    let gw = Gateway::start_with(|c| {
        c.room.batch_ms = 2;
        c.server.shards = 4;
    })
    .await;
    let mut feeder_client = gw.user("feeder", "").await;
    feeder_client.join("race").await;
    // A steady stream of numbered events through the HTTP API.
    let stop = tokio_util::sync::CancellationToken::new();
    let feeder = {
        let addr = gw.addr;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.is_cancelled() {
                let body = json!({"type":"system","text":"n","data":n}).to_string();
                support::http(
                    addr,
                    "POST",
                    "/api/v1/rooms/race/events",
                    Some(support::API_TOKEN),
                    Some(&body),
                )
                .await;
                n += 1;
            }
        })
    };
    let numbers = |events: &[Value]| -> Vec<u64> {
        events
            .iter()
            .filter(|e| e["type"] == "system")
            .map(|e| e["data"].as_u64().unwrap())
            .collect()
    };
    for round in 0..30 {
        let mut c = gw.client("").await;
        let joined = c
            .call(json!({"op":"join","room":"race","history":100}), 1)
            .await;
        assert_eq!(joined["op"], "joined", "{joined}");
        let history = numbers(joined["history"].as_array().unwrap());
        let frames = c.until_pong(2).await;
        let later = numbers(&support::batch_events(&frames, "race"));
        let all: Vec<u64> = history.iter().chain(&later).copied().collect();
        let unique: HashSet<u64> = all.iter().copied().collect();
        assert_eq!(
            unique.len(),
            all.len(),
            "round {round}: duplicate in {all:?}"
        );
        for w in all.windows(2) {
            assert_eq!(w[1], w[0] + 1, "round {round}: gap or reorder in {all:?}");
        }
        c.close().await;
    }
    stop.cancel();
    feeder.await.unwrap();
    gw.stop().await;
}

/// `room.max_gift_events` caps distinct client gift events per window: beyond it a gift
/// is refused with `rate_limited` (nothing broadcast), a repeat merges and always fits,
/// and paid gifts from the API are never refused.
#[tokio::test]
async fn the_room_gift_budget_refuses_new_gift_events_not_repeats() {
    let gw = Gateway::start_with(|c| {
        c.room.batch_ms = 1000;
        c.room.max_gift_events = 2;
    })
    .await;
    let mut users = Vec::new();
    for name in ["u1", "u2", "u3"] {
        let mut c = gw.user(name, "").await;
        c.join("roses").await;
        users.push(c);
    }
    // Drain the presence noise, then start the test right after a window closed: the
    // quiet room's first event (here the marker) goes at once and opens a window, so the
    // gifts below all fall in the next one, a whole second away. Without the marker u1's
    // gift would go alone, at once, and the budget would reset under the test.
    users[0]
        .events_until("roses", |e| {
            e.iter()
                .any(|e| e["type"] == "presence" && e["online"] == 3)
        })
        .await;
    let (status, _) = gw
        .api(
            "POST",
            "/api/v1/rooms/roses/events",
            Some(&json!({"type":"system","text":"window-sync"})),
        )
        .await;
    assert_eq!(status, 202);
    users[0]
        .events_until("roses", |e| e.iter().any(|e| e["text"] == "window-sync"))
        .await;
    let gift = |r: i64| json!({"op":"gift","room":"roses","gift":"rose","ref":r});
    let a = users[0].call(gift(1), 1).await;
    let b = users[1].call(gift(2), 2).await;
    assert_eq!(
        (a["op"].as_str(), b["op"].as_str()),
        (Some("ack"), Some("ack"))
    );
    let c = users[2].call(gift(3), 3).await;
    if c["op"] == "ack" {
        // The window closed between the gifts (1 s windows, rare): the budget reset.
        return gw.stop().await;
    }
    assert_eq!(c["code"], "rate_limited", "{c}");
    let retry = c["retry_after_ms"].as_u64().unwrap();
    assert!((1..=1000).contains(&retry), "{retry}");
    // A repeat of u1's rose merges into its event: not a new one, so it fits.
    let again = users[0].call(gift(4), 4).await;
    assert_eq!(again["op"], "ack", "{again}");
    // A paid gift from the backend is never refused.
    let (status, _) = gw
        .api(
            "POST",
            "/api/v1/rooms/roses/events",
            Some(&json!({"type":"gift","user":{"id":"vip","name":"VIP"},"gift":"rocket"})),
        )
        .await;
    assert_eq!(status, 202);
    let events = users[2]
        .events_until("roses", |e| e.iter().any(|e| e["gift"] == "rocket"))
        .await;
    let gifts: Vec<(String, u64)> = events
        .iter()
        .filter(|e| e["type"] == "gift")
        .map(|e| {
            (
                e["user"]["id"].as_str().unwrap().to_string(),
                e["count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        gifts,
        vec![("u1".into(), 2), ("u2".into(), 1), ("vip".into(), 1)],
        "u3's refused gift had no effect"
    );
    // After the window, u3 may send.
    tokio::time::sleep(Duration::from_millis(retry + 50)).await;
    let later = users[2].call(gift(5), 5).await;
    assert_eq!(later["op"], "ack", "{later}");
    gw.stop().await;
}

/// The echoed subprotocol always names the format spoken; a `format=` the offered
/// subprotocols contradict is refused before the upgrade.
#[tokio::test]
async fn format_and_subprotocol_never_disagree() {
    let gw = Gateway::start().await;
    let (status, _, body) = gw
        .upgrade_raw(
            "format=msgpack",
            &[("Sec-WebSocket-Protocol", "danmaku.v1.json")],
            None,
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "bad_request");
    assert!(
        body["message"].as_str().unwrap().contains("format"),
        "{body}"
    );

    // Both offered: `format=` picks, and the echo matches it.
    let both = ConnectOpts {
        protocol: Some("danmaku.v1.json, danmaku.v1.msgpack".into()),
        ..Default::default()
    };
    let mut c = gw.connect_opts("format=msgpack", &both).await.unwrap();
    assert_eq!(c.protocol.as_deref(), Some("danmaku.v1.msgpack"));
    let hello = c.next_raw(WAIT).await.unwrap();
    assert!(matches!(hello, Message::Binary(_)), "{hello:?}");

    // Without `format=`, the client's first choice wins.
    let prefers_msgpack = ConnectOpts {
        protocol: Some("danmaku.v1.msgpack, danmaku.v1.json".into()),
        ..Default::default()
    };
    let mut c = gw.connect_opts("", &prefers_msgpack).await.unwrap();
    assert_eq!(c.protocol.as_deref(), Some("danmaku.v1.msgpack"));
    assert!(matches!(
        c.next_raw(WAIT).await.unwrap(),
        Message::Binary(_)
    ));
    gw.stop().await;
}

/// Sends a raw HTTP request and returns the status and the JSON body.
async fn raw_http(gw: &Gateway, head: &str, body: &[u8]) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let req = format!(
        "{head}\r\nHost: test\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    // The server may answer (413) before reading a large body: a failed write is fine.
    let _ = s.write_all(body).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split(' ').nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let v = serde_json::from_str(body).unwrap_or(Value::String(body.into()));
    (status, v)
}

/// Every refusal is JSON `{"code","message"}`: wrong method, oversized body; the bearer
/// scheme is case-insensitive.
#[tokio::test]
async fn http_refusals_are_json_and_bearer_is_case_insensitive() {
    let gw = Gateway::start().await;
    let auth = format!("Authorization: bearer {}", support::API_TOKEN);
    let (status, body) = raw_http(&gw, "POST /ws HTTP/1.1", b"").await;
    assert_eq!(status, 405, "{body}");
    assert_eq!(body["code"], "method_not_allowed", "{body}");
    let (status, body) = raw_http(
        &gw,
        &format!("GET /api/v1/rooms/r/events HTTP/1.1\r\n{auth}"),
        b"",
    )
    .await;
    assert_eq!(status, 405, "{body}");
    assert!(body["message"].is_string(), "{body}");

    let big = format!(r#"{{"type":"system","text":"{}"}}"#, "x".repeat(100 * 1024));
    let (status, body) = raw_http(
        &gw,
        &format!("POST /api/v1/rooms/r/events HTTP/1.1\r\n{auth}"),
        big.as_bytes(),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["code"], "too_large", "{body}");

    let (status, body) = raw_http(
        &gw,
        &format!("POST /api/v1/rooms/r/events HTTP/1.1\r\n{auth}"),
        br#"{"type":"system","text":"lower-case scheme"}"#,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    gw.stop().await;
}

/// A path parameter axum cannot decode (not UTF-8) is our JSON 400, not plain text.
#[tokio::test]
async fn an_undecodable_path_parameter_is_a_json_400() {
    let gw = Gateway::start().await;
    let (status, body) = gw.api("GET", "/api/v1/rooms/%FF%FE", None).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "bad_request", "{body}");
    assert!(
        body["message"].as_str().unwrap().starts_with("path:"),
        "{body}"
    );
    gw.stop().await;
}

/// Event ids stay unique across a restart of a node with a fixed `server.node_id`
/// (a room's history in Redis outlives the process).
#[tokio::test]
async fn event_ids_differ_across_restarts_of_one_node_id() {
    let mut ids = Vec::new();
    for _ in 0..2 {
        let gw = Gateway::start().await;
        assert_eq!(gw.cfg.server.node_id, "test-node");
        let (status, body) = gw
            .api(
                "POST",
                "/api/v1/rooms/ids/events",
                Some(&json!({"type":"system","text":"x"})),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_string());
        gw.stop().await;
        // Process starts a millisecond apart at least.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(ids.iter().all(|i| i.starts_with("test-node-")), "{ids:?}");
    assert_ne!(ids[0], ids[1]);
}

/// A token may carry more claims than ours (an audience included); an expired one is
/// refused even a second after `exp`.
#[tokio::test]
async fn extra_claims_are_accepted_and_expiry_is_exact() {
    let gw = Gateway::start().await;
    let now = danmaku_gateway::protocol::now_ms() / 1000;
    let claims = json!({"sub":"ann","name":"Ann","exp":now + 600,"aud":"web","iss":"billing"});
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(support::SECRET.as_bytes()),
    )
    .unwrap();
    let c = gw.client(&format!("token={token}")).await;
    assert_eq!(c.hello["user"]["id"], "ann", "{}", c.hello);

    let expired = support::token_exp("bob", "Bob", now - 1);
    let (status, _, body) = gw.upgrade_raw(&format!("token={expired}"), &[], None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["code"], "unauthorized");
    gw.stop().await;
}

/// A text frame that is not UTF-8 fails the connection as RFC 6455 requires: close 1007.
#[tokio::test]
async fn a_text_frame_that_is_not_utf8_closes_with_1007() {
    let gw = Gateway::start().await;
    let mut c = gw.client("").await;
    let header = FrameHeader {
        opcode: OpCode::Data(Data::Text),
        is_final: true,
        ..FrameHeader::default()
    };
    let frame = Frame::from_payload(header, vec![0x7b, 0xff, 0xfe, 0x7d].into());
    c.send_raw(Message::Frame(frame)).await;
    assert_eq!(c.ending().await, support::Ending::Close(1007));
    gw.stop().await;
}
