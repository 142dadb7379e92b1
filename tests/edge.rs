//! The edge behind a load balancer: TLS (wss/https, certificate reload, start-up errors),
//! the PROXY protocol (v1, v2, trust, malformed headers), and X-Forwarded-For — each seen
//! through what a client gets, per-IP limits being the witness of "which address counts".

mod support;

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use danmaku_gateway::config::ProxyProtocol;
use danmaku_gateway::server;
use serde_json::json;
use support::{
    EdgeOpts, Gateway, TestPki, WAIT, WssClient, assert_closed, metric_local, peer_leaf, proxy_v1,
    proxy_v2, proxy_v2_local, refusal, tcp_from, tls_connect, token, wait_until, write_atomic,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LOCALHOST_2: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

fn v4(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn trust(cfg: &mut danmaku_gateway::config::Config, list: &[&str]) {
    cfg.server.trusted_proxies = list.iter().map(|s| s.to_string()).collect();
}

async fn https_get(stream: &mut support::TlsClientStream, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    // rustls reports a peer that closes without close_notify as an error; the bytes read
    // before it are the answer.
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn wss_chat_round_trip_and_https_healthz() {
    let pki = TestPki::new("tls-basic");
    let gw = Gateway::start_with(|cfg| pki.configure(cfg)).await;

    let tls = tls_connect(gw.addr, &[&pki.ca], b"", None).await.unwrap();
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"http/1.1"[..]),
        "ALPN must pick http/1.1"
    );
    assert_eq!(peer_leaf(&tls), pki.leaf);
    let mut alice = WssClient::connect(tls, &format!("token={}", token("alice", "Alice")))
        .await
        .unwrap();
    assert_eq!(alice.hello["user"]["id"], "alice");
    let joined = alice.call(json!({"op":"join","room":"tls"}), 1).await;
    assert_eq!(joined["op"], "joined", "{joined}");
    let ack = alice
        .call(json!({"op":"chat","room":"tls","text":"over tls"}), 2)
        .await;
    assert_eq!(ack, json!({"op":"ack","ref":2}));
    loop {
        let v = alice.recv().await;
        if v["op"] == "batch"
            && v["events"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["text"] == "over tls")
        {
            break;
        }
    }

    let mut https = tls_connect(gw.addr, &[&pki.ca], b"", None).await.unwrap();
    let (status, text) = https_get(&mut https, "/healthz").await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"ok\""), "{text}");

    // Plain HTTP on the TLS port is not served.
    let mut plain = tcp_from(gw.addr, None).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, plain.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert!(!String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    gw.stop().await;
}

#[tokio::test]
async fn a_stalled_handshake_stalls_nobody_else() {
    let pki = TestPki::new("tls-stall");
    let gw = Gateway::start_with(|cfg| {
        pki.configure(cfg);
        cfg.server.handshake_timeout_ms = 1500;
    })
    .await;
    // Three clients that connect and never finish a handshake.
    let mut stalled = Vec::new();
    for partial in [&b""[..], b"\x16\x03\x01", b"\x16\x03\x01\x02\x00\x01"] {
        let mut s = tcp_from(gw.addr, None).await.unwrap();
        s.write_all(partial).await.unwrap();
        stalled.push(s);
    }
    // A real client is served meanwhile, well inside the stalled ones' timeout.
    let started = std::time::Instant::now();
    let tls = tls_connect(gw.addr, &[&pki.ca], b"", None).await.unwrap();
    let mut c = WssClient::connect(tls, "").await.unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "served after {:?}",
        started.elapsed()
    );
    assert_eq!(c.call(json!({"op":"ping"}), 7).await["op"], "pong");
    // The stalled ones are closed at the timeout.
    for s in &mut stalled {
        assert_closed(s, "stalled handshake").await;
    }
    gw.stop().await;
}

#[tokio::test]
async fn certificates_reload_when_the_files_change() {
    let mut pki = TestPki::new("tls-reload");
    let gw = Gateway::start_with(|cfg| pki.configure(cfg)).await;
    let (old_ca, old_leaf) = (pki.ca.clone(), pki.leaf.clone());
    let tls = tls_connect(gw.addr, &[&old_ca], b"", None).await.unwrap();
    let mut old = WssClient::connect(tls, "").await.unwrap();

    pki.renew();
    assert_ne!(pki.leaf, old_leaf);
    let new_ca = pki.ca.clone();
    wait_until("new connections to see the new certificate", async || {
        let s = tls_connect(gw.addr, &[&old_ca, &new_ca], b"", None)
            .await
            .unwrap();
        peer_leaf(&s) == pki.leaf
    })
    .await;
    // A client trusting only the new CA gets through; the open connection lives on.
    let tls = tls_connect(gw.addr, &[&new_ca], b"", None).await.unwrap();
    let mut new = WssClient::connect(tls, "").await.unwrap();
    assert_eq!(new.call(json!({"op":"ping"}), 1).await["op"], "pong");
    assert_eq!(old.call(json!({"op":"ping"}), 2).await["op"], "pong");
    gw.stop().await;
}

#[tokio::test]
async fn a_bad_file_during_reload_keeps_the_certificate_in_use() {
    let mut pki = TestPki::new("tls-bad-reload");
    let gw = Gateway::start_with(|cfg| pki.configure(cfg)).await;
    let errors = r#"danmaku_tls_cert_reloads_total{result="error"}"#;
    let leaf = pki.leaf.clone();
    let serves_old = async || {
        let s = tls_connect(gw.addr, &[&pki.ca], b"", None).await.unwrap();
        peer_leaf(&s) == leaf
    };

    assert!(serves_old().await);
    // Garbage in the certificate file.
    let before = metric_local(errors);
    write_atomic(
        &pki.cert,
        b"-----BEGIN CERTIFICATE-----\nnot base64 at all!\n",
    );
    wait_until("the failed reload to be counted", async || {
        metric_local(errors) > before
    })
    .await;
    assert!(serves_old().await);

    // A valid certificate with a key that does not belong to it.
    let (_, _, other_cert, _) = support::issue_cert();
    let before = metric_local(errors);
    write_atomic(&pki.cert, other_cert.as_bytes());
    wait_until("the mismatched pair to be refused", async || {
        metric_local(errors) > before
    })
    .await;
    assert!(serves_old().await);

    // A good pair again: taken.
    pki.renew();
    let ca = pki.ca.clone();
    wait_until("the good pair to be loaded", async || {
        let s = tls_connect(gw.addr, &[&ca], b"", None).await;
        s.is_ok_and(|s| peer_leaf(&s) == pki.leaf)
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn unusable_tls_files_at_start_are_an_error_naming_the_key() {
    let pki = TestPki::new("tls-start");
    let dir = pki.cert.parent().unwrap().to_path_buf();
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "hello").unwrap();
    let (_, _, _, other_key) = support::issue_cert();
    let other_key_file = dir.join("other-key.pem");
    std::fs::write(&other_key_file, other_key).unwrap();
    let missing = dir.join("missing.pem");

    let cases = [
        (
            missing.clone(),
            pki.key.clone(),
            "server.tls.cert",
            "No such file",
        ),
        (
            garbage.clone(),
            pki.key.clone(),
            "server.tls.cert",
            "no certificate",
        ),
        (
            pki.cert.clone(),
            garbage.clone(),
            "server.tls.key",
            "no private key",
        ),
        (
            pki.cert.clone(),
            other_key_file.clone(),
            "server.tls.key",
            "does not match",
        ),
    ];
    for (cert, key, names, says) in cases {
        let mut cfg = support::test_config();
        cfg.server.tls.cert = cert.clone();
        cfg.server.tls.key = key.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = tokio::time::timeout(WAIT, server::run(listener, cfg, std::future::pending()))
            .await
            .expect("run must fail at once")
            .expect_err("run must fail");
        assert!(err.is_config());
        let msg = err.to_string();
        assert!(msg.starts_with(names), "{msg}");
        assert!(msg.contains(says), "{msg}");
        let file = if names == "server.tls.cert" {
            &cert
        } else {
            &key
        };
        assert!(msg.contains(&file.display().to_string()), "{msg}");
    }

    // The binary: a clear message and exit code 2, like any configuration error.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_danmaku-gateway"));
    for (k, _) in std::env::vars() {
        if k.starts_with("GATEWAY_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .arg("--config")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml"))
        .env("GATEWAY_SERVER__LISTEN", "127.0.0.1:0")
        .env("GATEWAY_DATA__DIR", dir.join("data"))
        .env("GATEWAY_SERVER__TLS__CERT", &missing)
        .env("GATEWAY_SERVER__TLS__KEY", &pki.key)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "server.tls.cert: {}: No such file",
            missing.display()
        )),
        "{stderr}"
    );
}

#[tokio::test]
async fn proxy_headers_name_the_client_for_per_ip_limits() {
    let gw = Gateway::start_with(|cfg| {
        cfg.server.proxy_protocol = ProxyProtocol::Required;
        trust(cfg, &["127.0.0.1/32"]);
        cfg.limits.max_conns_per_ip = 1;
    })
    .await;
    let dst = v4(&format!("127.0.0.1:{}", gw.addr.port()));
    let v1_a = proxy_v1(sa("203.0.113.7:40000"), SocketAddr::V4(dst));
    let v2_a = proxy_v2(v4("203.0.113.7:40001"), dst, &[]);
    let v2_b = proxy_v2(v4("203.0.113.8:40002"), dst, &[(0xEA, b"\x01vpce-0abc")]);
    let v1_b6 = proxy_v1(sa("[2001:db8::8]:40003"), sa("[2001:db8::1]:443"));
    let via = |preamble| EdgeOpts {
        preamble,
        ..Default::default()
    };

    // 203.0.113.7 over v1, then again over v2: the second is over the per-IP cap even
    // though both came from the same balancer address.
    let _a = gw.connect_edge("", &via(&v1_a)).await.unwrap();
    let (status, body) = refusal(gw.connect_edge("", &via(&v2_a)).await.err().unwrap());
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], "rate_limited");
    // Other clients behind the same balancer are their own addresses.
    let _b = gw.connect_edge("", &via(&v2_b)).await.unwrap();
    let _b6 = gw.connect_edge("", &via(&v1_b6)).await.unwrap();
    // v2 LOCAL (a health check) and v1 UNKNOWN carry no client: the balancer itself.
    let local = proxy_v2_local();
    let _lb = gw.connect_edge("", &via(&local)).await.unwrap();
    let (status, _) = refusal(
        gw.connect_edge("", &via(b"PROXY UNKNOWN\r\n"))
            .await
            .err()
            .unwrap(),
    );
    assert_eq!(
        status, 429,
        "UNKNOWN counts as the balancer, already connected"
    );
    gw.stop().await;
}

#[tokio::test]
async fn proxy_header_ahead_of_tls() {
    let pki = TestPki::new("tls-proxy");
    let gw = Gateway::start_with(|cfg| {
        pki.configure(cfg);
        cfg.server.proxy_protocol = ProxyProtocol::Optional;
        trust(cfg, &["127.0.0.1"]);
        cfg.limits.max_conns_per_ip = 1;
    })
    .await;
    let dst = v4(&format!("127.0.0.1:{}", gw.addr.port()));
    let header = proxy_v2(v4("198.51.100.20:5555"), dst, &[]);
    let tls = tls_connect(gw.addr, &[&pki.ca], &header, None)
        .await
        .unwrap();
    let mut first = WssClient::connect(tls, "").await.unwrap();
    let tls = tls_connect(gw.addr, &[&pki.ca], &header, None)
        .await
        .unwrap();
    let (status, _) = refusal(WssClient::connect(tls, "").await.err().unwrap());
    assert_eq!(status, 429);
    // Optional: the trusted balancer without a header is served as itself.
    let tls = tls_connect(gw.addr, &[&pki.ca], b"", None).await.unwrap();
    let mut direct = WssClient::connect(tls, "").await.unwrap();
    assert_eq!(direct.call(json!({"op":"ping"}), 1).await["op"], "pong");
    assert_eq!(first.call(json!({"op":"ping"}), 2).await["op"], "pong");
    gw.stop().await;
}

#[tokio::test]
async fn a_header_from_an_untrusted_peer_is_never_believed() {
    let gw = Gateway::start_with(|cfg| {
        cfg.server.proxy_protocol = ProxyProtocol::Optional;
        trust(cfg, &["127.0.0.2/32"]);
    })
    .await;
    let dst = v4(&format!("127.0.0.1:{}", gw.addr.port()));
    let untrusted = r#"danmaku_edge_handshakes_total{outcome="proxy_untrusted"}"#;
    let before = metric_local(untrusted);
    for header in [
        proxy_v1(sa("203.0.113.9:1"), SocketAddr::V4(dst)),
        proxy_v2(v4("203.0.113.9:1"), dst, &[]),
    ] {
        // From 127.0.0.1, which is not trusted.
        let mut s = tcp_from(gw.addr, None).await.unwrap();
        s.write_all(&header).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert_closed(&mut s, "untrusted header").await;
    }
    assert!(metric_local(untrusted) >= before + 2.0);
    // Without a header it is an ordinary client; the trusted peer's header works.
    gw.connect_edge("", &EdgeOpts::default()).await.unwrap();
    let header = proxy_v1(sa("203.0.113.9:1"), SocketAddr::V4(dst));
    gw.connect_edge(
        "",
        &EdgeOpts {
            local_ip: Some(LOCALHOST_2),
            preamble: &header,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    gw.stop().await;
}

#[tokio::test]
async fn required_closes_a_trusted_peer_without_a_header() {
    let gw = Gateway::start_with(|cfg| {
        cfg.server.proxy_protocol = ProxyProtocol::Required;
        trust(cfg, &["127.0.0.2/32"]);
    })
    .await;
    let mut s = tcp_from(gw.addr, Some(LOCALHOST_2)).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_closed(&mut s, "trusted peer without a header").await;
    // A peer that is not a balancer (a kubelet probe) is served as itself.
    let (status, _) = support::http(gw.addr, "GET", "/healthz", None, None).await;
    assert_eq!(status, 200);
    gw.stop().await;
}

#[tokio::test]
async fn malformed_headers_are_closed_and_harm_nothing() {
    let gw = Gateway::start_with(|cfg| {
        cfg.server.proxy_protocol = ProxyProtocol::Required;
        trust(cfg, &["127.0.0.1/32"]);
        cfg.server.handshake_timeout_ms = 500;
    })
    .await;
    let dst = v4(&format!("127.0.0.1:{}", gw.addr.port()));
    let good_v2 = proxy_v2(v4("203.0.113.1:1"), dst, &[]);
    let mut huge_v2 = support::PROXY_V2_SIG.to_vec();
    huge_v2.extend([0x21, 0x11, 0xff, 0xff]);
    huge_v2.extend(vec![0u8; 5000]);
    let mut bad_version = good_v2.clone();
    bad_version[12] = 0x31;
    let mut short_addresses = good_v2[..16].to_vec();
    short_addresses[15] = 4;
    short_addresses.extend([1, 2, 3, 4]);
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("truncated v1", b"PROXY TCP4 203.0.1".to_vec(), true),
        ("garbage v1", b"PROXY garbage here\r\n".to_vec(), false),
        (
            "v1 bad port",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 70000\r\n".to_vec(),
            false,
        ),
        (
            "oversized v1",
            [&b"PROXY TCP4 "[..], &[b'7'; 300]].concat(),
            false,
        ),
        ("oversized v2", huge_v2, false),
        ("truncated v2", good_v2[..20].to_vec(), true),
        ("v2 bad version", bad_version, false),
        ("v2 short addresses", short_addresses, false),
        ("stalled v1", b"PROXY ".to_vec(), false),
        ("random bytes", (0..=255u8).rev().collect(), false),
    ];
    for (what, bytes, then_eof) in cases {
        let mut s = tcp_from(gw.addr, None).await.unwrap();
        // The server may close before all is written: a failed write is fine.
        let _ = s.write_all(&bytes).await;
        if then_eof {
            let _ = s.shutdown().await;
        }
        assert_closed(&mut s, what).await;
    }
    // A connection that connects and leaves (a TCP health check) is routine.
    drop(tcp_from(gw.addr, None).await.unwrap());
    // The server is unharmed: a good header with TLVs is served.
    let with_tlvs = proxy_v2(
        v4("203.0.113.2:2"),
        dst,
        &[(0x04, b""), (0xEA, b"\x01vpce-123"), (0x05, b"unique-id")],
    );
    let mut c = gw
        .connect_edge(
            "",
            &EdgeOpts {
                preamble: &with_tlvs,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(c.call(json!({"op":"ping"}), 1).await["op"], "pong");
    gw.stop().await;
}

#[tokio::test]
async fn x_forwarded_for_from_a_trusted_proxy_names_the_client() {
    let gw = Gateway::start_with(|cfg| {
        trust(cfg, &["127.0.0.2/32", "10.0.0.0/8"]);
        cfg.limits.max_conns_per_ip = 1;
    })
    .await;
    let from_proxy = |xff: &'static str| EdgeOpts {
        local_ip: Some(LOCALHOST_2),
        headers: Box::leak(Box::new([("X-Forwarded-For", xff)])),
        ..Default::default()
    };
    let _a = gw
        .connect_edge("", &from_proxy("198.51.100.1"))
        .await
        .unwrap();
    let (status, _) = refusal(
        gw.connect_edge("", &from_proxy("198.51.100.1"))
            .await
            .err()
            .unwrap(),
    );
    assert_eq!(status, 429);
    let _b = gw
        .connect_edge("", &from_proxy("198.51.100.2"))
        .await
        .unwrap();
    // The client forged the left-most entry; the right-most untrusted one counts.
    let _c = gw
        .connect_edge("", &from_proxy("203.0.113.66, 198.51.100.3, 10.1.2.3"))
        .await
        .unwrap();
    let (status, _) = refusal(
        gw.connect_edge("", &from_proxy("198.51.100.3"))
            .await
            .err()
            .unwrap(),
    );
    assert_eq!(status, 429, "198.51.100.3 was the client of the chain");
    let _d = gw
        .connect_edge("", &from_proxy("203.0.113.66"))
        .await
        .unwrap();
    gw.stop().await;
}

#[tokio::test]
async fn x_forwarded_for_from_an_untrusted_peer_is_ignored() {
    let gw = Gateway::start_with(|cfg| {
        trust(cfg, &["127.0.0.2/32"]);
        cfg.limits.max_conns_per_ip = 1;
    })
    .await;
    let spoof = |xff: &'static str| EdgeOpts {
        headers: Box::leak(Box::new([("X-Forwarded-For", xff)])),
        ..Default::default()
    };
    // From 127.0.0.1: both count as 127.0.0.1 whatever they claim.
    let _a = gw.connect_edge("", &spoof("198.51.100.1")).await.unwrap();
    let (status, _) = refusal(
        gw.connect_edge("", &spoof("198.51.100.2"))
            .await
            .err()
            .unwrap(),
    );
    assert_eq!(status, 429);
    gw.stop().await;
}

/// Writes `pem` into `path` in place (same inode), padded to `len` bytes with text PEM
/// parsers ignore, and puts the old modification time back: a change no poll can see.
fn rewrite_unseen(path: &std::path::Path, pem: &str, len: usize) {
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    let mut text = pem.to_string();
    assert!(text.len() < len);
    text.push_str(&" ".repeat(len - 1 - text.len()));
    text.push('\n');
    std::fs::write(path, &text).unwrap();
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
}

#[tokio::test]
async fn sighup_reloads_the_certificate() {
    const LEN: usize = 4096;
    let pki = TestPki::new("tls-sighup");
    // Start from padded files so the rewrite below keeps their size.
    let (ca, leaf, first_cert, first_key) = support::issue_cert();
    rewrite_unseen(&pki.cert, &first_cert, LEN);
    rewrite_unseen(&pki.key, &first_key, LEN);
    let gw = Gateway::start_with(|cfg| pki.configure(cfg)).await;
    let s = tls_connect(gw.addr, &[&ca], b"", None).await.unwrap();
    assert_eq!(peer_leaf(&s), leaf);

    let (new_ca, new_leaf, new_cert, new_key) = support::issue_cert();
    rewrite_unseen(&pki.key, &new_key, LEN);
    rewrite_unseen(&pki.cert, &new_cert, LEN);
    // Two polls go by without noticing.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let s = tls_connect(gw.addr, &[&ca], b"", None).await.unwrap();
    assert_eq!(
        peer_leaf(&s),
        leaf,
        "the poll must not have seen the change"
    );

    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_until("SIGHUP to load the new certificate", async || {
        let s = tls_connect(gw.addr, &[&ca, &new_ca], b"", None)
            .await
            .unwrap();
        peer_leaf(&s) == new_leaf
    })
    .await;
    gw.stop().await;
}
