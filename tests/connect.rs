//! Everything decided before the upgrade: query validation, tokens, anonymous access,
//! connection caps, the format subprotocols, and `room=` auto-join.

mod support;

use danmaku_gateway::config::Config;
use danmaku_gateway::protocol::now_ms;
use serde_json::{Value, json};
use support::{ConnectOpts, Gateway, SECRET, relax_rate_limits, token, token_exp};
use tokio_tungstenite::tungstenite::Message;

async fn gateway(edit: impl FnOnce(&mut Config)) -> Gateway {
    Gateway::start_with(|c| {
        relax_rate_limits(c);
        c.server.drain_s = 0;
        edit(c);
    })
    .await
}

/// A refusal must be `status` with a JSON body `{"code": code, "message": <string>}`.
#[track_caller]
fn assert_refused(got: &(u16, String, Value), status: u16, code: Option<&str>, what: &str) {
    let (s, head, body) = got;
    assert_eq!(*s, status, "{what}: {head}\n{body}");
    if let Some(code) = code {
        assert_eq!(body["code"], code, "{what}: {body}");
    } else {
        assert!(body["code"].is_string(), "{what}: {body}");
    }
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {body}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{what}: {head}"
    );
}

#[track_caller]
fn assert_upgraded(got: &(u16, String, Value), what: &str) {
    assert_eq!(got.0, 101, "{what}: {}\n{}", got.1, got.2);
}

/// Signs arbitrary claims with `secret` (to leave one out).
fn jwt(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn in_an_hour() -> u64 {
    now_ms() / 1000 + 3600
}

#[tokio::test]
async fn malformed_room_query_is_400_before_the_upgrade() {
    let gw = gateway(|_| {}).await;
    let long = "x".repeat(65);
    for query in [
        "room=a%20b".to_string(),
        "room=".to_string(),
        format!("room={long}"),
        "room=%E6%88%BF".to_string(),
        "room=a%2Fb".to_string(),
        "room=a%23b".to_string(),
    ] {
        let got = gw.upgrade_raw(&query, &[], None).await;
        assert_refused(&got, 400, Some("bad_request"), &query);
    }
    // The same request with a good room upgrades.
    let edge = "x".repeat(64);
    for query in ["room=Live_1.a:b-c".to_string(), format!("room={edge}")] {
        assert_upgraded(&gw.upgrade_raw(&query, &[], None).await, &query);
    }
    // And a WebSocket client sees the same refusal.
    let err = gw.connect("room=a%20b").await.err().expect("refused");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status().as_u16(), 400)
        }
        e => panic!("expected an HTTP refusal, got {e}"),
    }
    gw.stop().await;
}

#[tokio::test]
async fn unknown_format_is_400_before_the_upgrade() {
    let gw = gateway(|_| {}).await;
    for query in ["format=xml", "format=protobuf", "format=jsonx", "format="] {
        let got = gw.upgrade_raw(query, &[], None).await;
        assert_refused(&got, 400, Some("bad_request"), query);
    }
    for query in ["format=json", "format=msgpack"] {
        assert_upgraded(&gw.upgrade_raw(query, &[], None).await, query);
    }
    gw.stop().await;
}

#[tokio::test]
async fn bad_tokens_are_401_before_the_upgrade() {
    let gw = gateway(|_| {}).await;
    let exp = in_an_hour();
    let cases = [
        (
            "bad signature",
            token_exp_with("other-secret", "u1", "Ann", exp),
        ),
        ("expired", token_exp("u1", "Ann", now_ms() / 1000 - 3600)),
        ("missing sub", jwt(SECRET, json!({"name":"Ann","exp":exp}))),
        ("missing name", jwt(SECRET, json!({"sub":"u1","exp":exp}))),
        ("missing exp", jwt(SECRET, json!({"sub":"u1","name":"Ann"}))),
        ("garbage", "not.a.jwt".to_string()),
        ("empty", String::new()),
    ];
    for (what, t) in &cases {
        let got = gw.upgrade_raw(&format!("token={t}"), &[], None).await;
        assert_refused(&got, 401, Some("unauthorized"), what);
    }
    // A good token upgrades and names the user.
    let good = jwt(SECRET, json!({"sub":"u1","name":"Ann","exp":exp}));
    assert_upgraded(
        &gw.upgrade_raw(&format!("token={good}"), &[], None).await,
        "good",
    );
    let c = gw.client(&format!("token={good}")).await;
    assert_eq!(c.hello["user"], json!({"id":"u1","name":"Ann"}));
    gw.stop().await;
}

fn token_exp_with(secret: &str, sub: &str, name: &str, exp: u64) -> String {
    danmaku_gateway::auth::sign(secret, sub, name, exp)
}

#[tokio::test]
async fn anonymous_needs_allow_anonymous() {
    let closed = gateway(|c| c.auth.allow_anonymous = false).await;
    for query in ["", "room=r", "format=msgpack"] {
        let got = closed.upgrade_raw(query, &[], None).await;
        assert_refused(&got, 401, Some("unauthorized"), query);
    }
    let u = closed.user("alice", "").await;
    assert_eq!(u.hello["user"]["id"], "alice");
    closed.stop().await;

    // The default lets viewers in, read-only.
    let open = gateway(|_| {}).await;
    let c = open.client("").await;
    assert_eq!(c.hello["user"], Value::Null);
    open.stop().await;
}

#[tokio::test]
async fn max_conns_is_503_before_the_upgrade() {
    let gw = gateway(|c| c.limits.max_conns = 2).await;
    let a = gw.client("").await;
    let _b = gw.user("bob", "").await;
    let got = gw.upgrade_raw("", &[], None).await;
    assert_refused(&got, 503, None, "third connection");
    let got = gw
        .upgrade_raw(&format!("token={}", token("u", "u")), &[], None)
        .await;
    assert_refused(&got, 503, None, "third connection with a token");
    // A connection that ends frees its place.
    a.close().await;
    support::wait_until("a place frees up", async || match gw.connect("").await {
        Ok(c) => {
            c.close().await;
            true
        }
        Err(e) => {
            assert_eq!(support::refusal(e).0, 503);
            false
        }
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn max_conns_per_ip_is_429_before_the_upgrade() {
    let gw = gateway(|c| c.limits.max_conns_per_ip = 2).await;
    let a = gw.client("").await;
    let _b = gw.client("").await;
    let got = gw.upgrade_raw("", &[], None).await;
    assert_refused(&got, 429, None, "third from one address");
    // Another address is counted apart (127.0.0.0/8 is all loopback on Linux).
    let other: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    if tokio::net::TcpSocket::new_v4()
        .and_then(|s| s.bind((other, 0).into()))
        .is_ok()
    {
        let opts = ConnectOpts {
            local_ip: Some(other),
            ..Default::default()
        };
        let c = gw.client_opts("", &opts).await;
        assert_eq!(c.hello["op"], "hello");
    } else {
        eprintln!("note: cannot bind 127.0.0.2; skipped the second-address check");
    }
    // A connection that ends frees its address's place.
    a.close().await;
    support::wait_until("a place frees up", async || match gw.connect("").await {
        Ok(_) => true,
        Err(e) => {
            assert_eq!(support::refusal(e).0, 429);
            false
        }
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn per_ip_cap_is_off_by_default() {
    let gw = gateway(|_| {}).await;
    assert_eq!(gw.cfg.limits.max_conns_per_ip, 0);
    let mut clients = Vec::new();
    for _ in 0..40 {
        clients.push(gw.client("").await);
    }
    gw.stop().await;
}

#[tokio::test]
async fn subprotocol_selects_the_format_and_is_echoed() {
    let gw = gateway(|_| {}).await;
    for (proto, binary) in [("danmaku.v1.msgpack", true), ("danmaku.v1.json", false)] {
        let opts = ConnectOpts {
            protocol: Some(proto.into()),
            ..Default::default()
        };
        let mut c = gw.connect_opts("", &opts).await.expect("connect");
        assert_eq!(c.protocol.as_deref(), Some(proto), "echoed subprotocol");
        let first = c.next_raw(support::WAIT).await.expect("hello");
        match (&first, binary) {
            (Message::Binary(_), true) | (Message::Text(_), false) => {}
            (m, _) => panic!("{proto}: hello came as {m:?}"),
        }
        assert_eq!(c.decode(&first).unwrap()["op"], "hello");
        // The whole session speaks that format: replies and batches alike.
        let j = c.call(json!({"op":"join","room":"r"}), 1).await;
        assert_eq!(j["op"], "joined", "{j}");
        let (status, _) = gw
            .api(
                "POST",
                "/api/v1/rooms/r/events",
                Some(&json!({"type":"system","text":"hi"})),
            )
            .await;
        assert_eq!(status, 202);
        let ev = c
            .events_until("r", |e| e.iter().any(|e| e["type"] == "system"))
            .await;
        assert!(ev.iter().any(|e| e["text"] == "hi"));
    }
    // Without a subprotocol: JSON, and none echoed.
    let mut c = gw.connect("").await.unwrap();
    assert_eq!(c.protocol, None);
    let first = c.next_raw(support::WAIT).await.expect("hello");
    assert!(matches!(first, Message::Text(_)), "{first:?}");
    gw.stop().await;
}

#[tokio::test]
async fn room_query_joins_right_after_hello() {
    let gw = gateway(|_| {}).await;
    let mut members = Vec::new();
    for (i, query) in ["room=lobby", "room=lobby&format=msgpack"]
        .iter()
        .enumerate()
    {
        let mut c = gw.user(&format!("u{i}"), query).await;
        let j = c.recv().await;
        assert_eq!(j["op"], "joined", "{query}: {j}");
        assert_eq!(j["room"], "lobby");
        assert_eq!(j["online"], i as u64 + 1, "{j}");
        assert!(j.get("ref").is_none(), "{j}");
        assert_eq!(j["history"], json!([]));
        // Really a member: it may chat there and sees the batch.
        c.send(json!({"op":"chat","room":"lobby","text":format!("hi {i}")}))
            .await;
        let frames = c
            .frames_until(|f| {
                support::events_of(f, "lobby", "chat")
                    .iter()
                    .any(|e| e["text"] == format!("hi {i}"))
            })
            .await;
        let acks = support::ops_of(&frames, "ack");
        assert_eq!(acks.len(), 1, "{frames:?}");
        members.push(c);
    }
    // Anonymous viewers too.
    let mut v = gw.client("room=lobby").await;
    let j = v.recv().await;
    assert_eq!(j["op"], "joined", "{j}");
    assert_eq!(j["online"], 3, "{j}");
    gw.stop().await;
}
