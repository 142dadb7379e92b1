//! The demo page and client library served at `/`, and the dev-token helpers
//! (`[web] dev_tokens`): 404 when off, a working token and red packet when on.
//! The browser side itself is tested by `web/test/` (Node) and `web/e2e/` (Chromium).

mod support;

use serde_json::json;
use support::{Gateway, WAIT, http};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// GET `path`: status, lower-cased head, body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("HTTP timeout")
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_string())
}

#[tokio::test]
async fn demo_page_and_client_are_served_with_their_content_types() {
    let gw = Gateway::start().await;
    for (path, content_type, needle) in [
        (
            "/",
            "text/html; charset=utf-8",
            "<script type=\"module\" src=\"/demo.js\">",
        ),
        (
            "/danmaku-client.js",
            "text/javascript; charset=utf-8",
            "export class DanmakuClient",
        ),
        (
            "/msgpack.js",
            "text/javascript; charset=utf-8",
            "export function decode",
        ),
        (
            "/demo.js",
            "text/javascript; charset=utf-8",
            "from '/danmaku-client.js'",
        ),
        ("/demo.css", "text/css; charset=utf-8", ".danmaku"),
    ] {
        let (status, head, body) = get(gw.addr, path).await;
        assert_eq!(status, 200, "{path}");
        assert!(
            head.contains(&format!("content-type: {content_type}")),
            "{path}: {head}"
        );
        assert!(head.contains("x-content-type-options: nosniff"), "{path}");
        assert!(body.contains(needle), "{path} lacks {needle:?}");
    }
    let (_, head, _) = get(gw.addr, "/").await;
    assert!(
        head.contains("content-security-policy: default-src 'self'"),
        "{head}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn dev_helpers_are_not_found_unless_enabled() {
    let gw = Gateway::start().await;
    assert!(!gw.cfg.web.dev_tokens, "off by default");
    let (status, body) = http(gw.addr, "GET", "/dev/token?name=Eve", None, None).await;
    assert_eq!(status, 404);
    assert_eq!(body["code"], "not_found");
    let (status, _) = http(gw.addr, "POST", "/dev/redpacket?room=r1", None, None).await;
    assert_eq!(status, 404);
    gw.stop().await;
}

#[tokio::test]
async fn dev_token_signs_in_and_dev_redpacket_can_be_grabbed() {
    let gw = Gateway::start_with(|cfg| cfg.web.dev_tokens = true).await;
    let (status, body) = http(gw.addr, "GET", "/dev/token?name=%20Alice%20", None, None).await;
    assert_eq!(status, 200, "{body}");
    let token = body["token"].as_str().unwrap().to_string();
    assert_eq!(body["user"]["name"], "Alice");
    let id = body["user"]["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("dev-"), "{id}");

    // Two tokens are two users.
    let (_, other) = http(gw.addr, "GET", "/dev/token", None, None).await;
    assert_eq!(other["user"]["name"], "Guest");
    assert_ne!(other["user"]["id"], body["user"]["id"]);

    let mut c = gw.client(&format!("token={token}")).await;
    assert_eq!(c.hello["user"], json!({"id": id, "name": "Alice"}));
    c.join("dev-room").await;

    let (status, _) = http(
        gw.addr,
        "POST",
        "/dev/redpacket?room=bad%20room",
        None,
        None,
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = http(gw.addr, "POST", "/dev/redpacket", None, None).await;
    assert_eq!(status, 400);
    let (status, created) = http(gw.addr, "POST", "/dev/redpacket?room=dev-room", None, None).await;
    assert_eq!(status, 201, "{created}");
    let packet = created["packet"].as_str().unwrap().to_string();

    let ack = c
        .call(
            json!({"op": "grab", "room": "dev-room", "packet": packet}),
            7,
        )
        .await;
    assert_eq!(ack["op"], "ack", "{ack}");
    assert!(ack["amount"].as_u64().unwrap() >= 1);
    let (_, status) = gw
        .api("GET", &format!("/api/v1/redpackets/{packet}"), None)
        .await;
    assert_eq!(status["total"], 1000);
    assert_eq!(status["shares"], 10);
    assert_eq!(status["grabbed"], 1);
    gw.stop().await;
}
