//! The HTTP surface: health, readiness, metrics, and the backend API for room events and
//! room state (auth, validation with 400s naming the field, 404 JSON).

mod support;

use danmaku_gateway::config::Config;
use serde_json::{Value, json};
use support::{API_TOKEN, Gateway, events_of, http, http_raw, relax_rate_limits};

async fn gateway(edit: impl FnOnce(&mut Config)) -> Gateway {
    Gateway::start_with(|c| {
        relax_rate_limits(c);
        c.server.drain_s = 0;
        edit(c);
    })
    .await
}

use support::assert_http_error as assert_error;

#[tokio::test]
async fn healthz_and_readyz() {
    let gw = gateway(|_| {}).await;
    let (status, body) = http(gw.addr, "GET", "/healthz", None, None).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(gw.addr, "GET", "/readyz", None, None).await;
    assert_eq!(status, 200, "{body}");
    gw.stop().await;
}

#[tokio::test]
async fn metrics_is_prometheus_text() {
    let gw = gateway(|_| {}).await;
    let mut c = gw.user("alice", "").await;
    c.join("r").await;
    let (status, text) = http_raw(gw.addr, "GET", "/metrics", None, None).await;
    assert_eq!(status, 200);
    for name in [
        "danmaku_connections",
        "danmaku_connections_opened_total",
        "danmaku_frames_in_total",
        "danmaku_frames_out_total",
    ] {
        assert!(
            text.lines()
                .any(|l| !l.starts_with('#') && l.split([' ', '{']).next() == Some(name)),
            "no sample of {name} in:\n{text}"
        );
    }
    assert!(text.contains("# TYPE danmaku_connections gauge"), "{text}");
    assert!(
        text.contains("# TYPE danmaku_connections_opened_total counter"),
        "{text}"
    );
    // Every sample line is `name{labels} value` with a numeric value.
    for l in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (_, v) = l.rsplit_once(' ').expect(l);
        assert!(
            v.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&v),
            "bad sample line {l:?}"
        );
    }
    // Counters move: one more connection, more opened.
    let before = support::metric_in(&text, "danmaku_connections_opened_total");
    let _d = gw.client("").await;
    assert!(support::metric(gw.addr, "danmaku_connections_opened_total").await > before);
    gw.stop().await;
}

#[tokio::test]
async fn content_type_of_metrics_is_text_plain() {
    let gw = gateway(|_| {}).await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let head = head.split("\r\n\r\n").next().unwrap();
    assert!(head.contains("content-type: text/plain"), "{head}");
    gw.stop().await;
}

#[tokio::test]
async fn post_system_event_reaches_members() {
    let gw = gateway(|_| {}).await;
    let mut a = gw.user("alice", "room=live").await;
    assert_eq!(a.recv().await["op"], "joined");
    let mut b = gw.client("room=live&format=msgpack").await;
    assert_eq!(b.recv().await["op"], "joined");
    let data = json!({"link":"https://example.com","n":[1,2,3]});
    let (status, body) = gw
        .api(
            "POST",
            "/api/v1/rooms/live/events",
            Some(&json!({"type":"system","text":"welcome","data":data})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    // Without data: the event has none.
    let (status, body2) = gw
        .api(
            "POST",
            "/api/v1/rooms/live/events",
            Some(&json!({"type":"system","text":"plain"})),
        )
        .await;
    assert_eq!(status, 202, "{body2}");
    assert_ne!(body2["id"], id.as_str(), "ids are unique");
    for c in [&mut a, &mut b] {
        let f = c
            .frames_until(|f| events_of(f, "live", "system").len() == 2)
            .await;
        let ev = events_of(&f, "live", "system");
        assert_eq!(ev[0]["id"], id.as_str());
        assert_eq!(ev[0]["text"], "welcome");
        assert_eq!(ev[0]["data"], data);
        assert!(ev[0]["ts"].is_u64());
        assert_eq!(ev[1]["text"], "plain");
        assert!(
            ev[1].get("data").is_none() || ev[1]["data"].is_null(),
            "{}",
            ev[1]
        );
    }
    // Posting to a room nobody is in is fine too.
    let (status, _) = gw
        .api(
            "POST",
            "/api/v1/rooms/empty/events",
            Some(&json!({"type":"system","text":"anyone?"})),
        )
        .await;
    assert_eq!(status, 202);
    gw.stop().await;
}

#[tokio::test]
async fn post_chat_event_with_user() {
    let gw = gateway(|_| {}).await;
    let mut a = gw.client("room=live").await;
    assert_eq!(a.recv().await["op"], "joined");
    let (status, body) = gw
        .api(
            "POST",
            "/api/v1/rooms/live/events",
            Some(&json!({"type":"chat","user":{"id":"mod-1","name":"Moderator"},"text":"be nice"})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let f = a
        .frames_until(|f| !events_of(f, "live", "chat").is_empty())
        .await;
    let e = &events_of(&f, "live", "chat")[0];
    assert_eq!(e["id"], body["id"]);
    assert_eq!(e["user"], json!({"id":"mod-1","name":"Moderator"}));
    assert_eq!(e["text"], "be nice");
    // It is kept in history like any chat.
    let mut b = gw.client("").await;
    let j = b
        .call(json!({"op":"join","room":"live","history":10}), 1)
        .await;
    let h = j["history"].as_array().unwrap();
    assert!(h.iter().any(|x| x["id"] == body["id"]), "{j}");
    gw.stop().await;
}

#[tokio::test]
async fn get_room_reports_online() {
    let gw = gateway(|_| {}).await;
    let (status, body) = gw.api("GET", "/api/v1/rooms/r", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"room":"r","online":0}));
    let mut a = gw.user("alice", "").await;
    let mut b = gw.client("").await;
    a.join("r").await;
    b.join("r").await;
    let (_, body) = gw.api("GET", "/api/v1/rooms/r", None).await;
    assert_eq!(body["room"], "r");
    assert_eq!(body["online"], 2, "anonymous viewers count: {body}");
    let ack = a.call(json!({"op":"leave","room":"r"}), 1).await;
    assert_eq!(ack["op"], "ack");
    let (_, body) = gw.api("GET", "/api/v1/rooms/r", None).await;
    assert_eq!(body["online"], 1, "{body}");
    b.close().await;
    support::wait_until("the disconnected viewer is gone", async || {
        gw.api("GET", "/api/v1/rooms/r", None).await.1["online"] == 0
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn api_routes_need_the_bearer_token() {
    let gw = gateway(|_| {}).await;
    let mut a = gw.client("room=r").await;
    assert_eq!(a.recv().await["op"], "joined");
    let event = json!({"type":"system","text":"sneaky"}).to_string();
    for bearer in [
        None,
        Some("wrong-token"),
        Some(""),
        Some("test-api-token-x"),
    ] {
        let got = http(
            gw.addr,
            "POST",
            "/api/v1/rooms/r/events",
            bearer,
            Some(&event),
        )
        .await;
        assert_error(&got, 401, "unauthorized", &format!("POST with {bearer:?}"));
        let got = http(gw.addr, "GET", "/api/v1/rooms/r", bearer, None).await;
        assert_error(&got, 401, "unauthorized", &format!("GET with {bearer:?}"));
    }
    // A scheme other than Bearer is refused too.
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let req = format!(
            "GET /api/v1/rooms/r HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Basic {API_TOKEN}\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    }
    // None of the refused posts reached the room: the next event is the first.
    let (status, _) = gw
        .api(
            "POST",
            "/api/v1/rooms/r/events",
            Some(&json!({"type":"system","text":"legit"})),
        )
        .await;
    assert_eq!(status, 202);
    let f = a
        .frames_until(|f| !events_of(f, "r", "system").is_empty())
        .await;
    let texts: Vec<_> = events_of(&f, "r", "system")
        .iter()
        .map(|e| e["text"].clone())
        .collect();
    assert_eq!(texts, vec![json!("legit")]);
    gw.stop().await;
}

#[tokio::test]
async fn bad_bodies_are_400_naming_the_field() {
    let gw = gateway(|c| c.limits.max_text_chars = 10).await;
    // Not JSON at all.
    for body in ["{not json", "", "[]", "\"system\"", "null"] {
        let got = http(
            gw.addr,
            "POST",
            "/api/v1/rooms/r/events",
            Some(API_TOKEN),
            Some(body),
        )
        .await;
        assert_error(&got, 400, "bad_request", body);
    }
    // (body, the field the message must name)
    let cases = [
        (json!({"type":"system"}), "text"),
        (json!({"text":"no type"}), "type"),
        (json!({"type":5,"text":"x"}), "type"),
        (json!({"type":"dance","text":"x"}), "type"),
        (json!({"type":"chat","text":"hi"}), "user"),
        (json!({"type":"chat","user":{"id":"b"},"text":"hi"}), "name"),
        (json!({"type":"chat","user":{"id":"b","name":"B"}}), "text"),
        (
            json!({"type":"chat","user":{"id":"b","name":"B"},"text":"x".repeat(11)}),
            "text",
        ),
    ];
    assert_bodies_name_fields(&gw, &cases).await;
    // Bad rooms in the path.
    let long = "x".repeat(65);
    for room in ["a%20b", long.as_str(), "%E6%88%BF", "a%23b"] {
        let got = http(
            gw.addr,
            "POST",
            &format!("/api/v1/rooms/{room}/events"),
            Some(API_TOKEN),
            Some(&json!({"type":"system","text":"x"}).to_string()),
        )
        .await;
        assert_error(&got, 400, "bad_request", room);
        assert!(
            got.1["message"].as_str().unwrap().contains("room"),
            "{}",
            got.1
        );
        let got = http(
            gw.addr,
            "GET",
            &format!("/api/v1/rooms/{room}"),
            Some(API_TOKEN),
            None,
        )
        .await;
        assert_error(&got, 400, "bad_request", room);
    }
    gw.stop().await;
}

/// Whether `message` names `field` as a word or a path (`user.id` names `id` and `user`).
fn names(message: &str, field: &str) -> bool {
    message
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .any(|tok| tok.split('.').any(|part| part == field))
}

/// Posts each body: 400 `bad_request` with a message naming the field.
async fn assert_bodies_name_fields(gw: &Gateway, cases: &[(Value, &str)]) {
    let mut unnamed = Vec::new();
    for (body, field) in cases {
        let got = http(
            gw.addr,
            "POST",
            "/api/v1/rooms/r/events",
            Some(API_TOKEN),
            Some(&body.to_string()),
        )
        .await;
        assert_error(&got, 400, "bad_request", &body.to_string());
        let message = got.1["message"].as_str().unwrap();
        if !names(message, field) {
            unnamed.push(format!("{body} → {message:?} (expected `{field}`)"));
        }
    }
    assert!(
        unnamed.is_empty(),
        "messages that do not name the field:\n{}",
        unnamed.join("\n")
    );
}

#[tokio::test]
async fn wrong_types_in_bodies_are_400_naming_the_field() {
    let gw = gateway(|_| {}).await;
    let cases = [
        (json!({"type":"system","text":5}), "text"),
        (json!({"type":"system","text":null}), "text"),
        (json!({"type":"system","text":["a"]}), "text"),
        (json!({"type":"chat","user":"bob","text":"hi"}), "user"),
        (
            json!({"type":"chat","user":{"id":7,"name":"B"},"text":"hi"}),
            "id",
        ),
    ];
    assert_bodies_name_fields(&gw, &cases).await;
    gw.stop().await;
}

#[tokio::test]
async fn unknown_routes_are_404_json() {
    let gw = gateway(|_| {}).await;
    for (method, path) in [
        ("GET", "/nope"),
        ("GET", "/api/v1/nope"),
        ("POST", "/api/v2/rooms/r/events"),
        ("GET", "/ws/extra"),
    ] {
        let got = http(gw.addr, method, path, Some(API_TOKEN), None).await;
        assert_eq!(got.0, 404, "{method} {path}: {}", got.1);
        assert!(got.1["code"].is_string(), "{method} {path}: {}", got.1);
        assert!(got.1["message"].is_string(), "{method} {path}: {}", got.1);
    }
    gw.stop().await;
}
