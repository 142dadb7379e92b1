//! Connections that never send a request (or send it too slowly) on a plain listener:
//! each is closed at `server.handshake_timeout_ms` after accept, at most
//! `limits.max_handshakes` wait at once (more are shed at accept), and meanwhile real
//! clients and `/healthz` are served.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use support::{Gateway, WAIT, metric_local};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

/// Slack over the handshake timeout for a close to be seen (a loaded CI machine).
const SLACK: Duration = Duration::from_secs(3);

fn timeouts() -> f64 {
    metric_local(r#"danmaku_edge_handshakes_total{outcome="timeout"}"#)
}

fn sheds() -> f64 {
    metric_local(r#"danmaku_edge_handshakes_total{outcome="shed"}"#)
}

/// This process holds both ends of every socket: make room for thousands.
fn raise_nofile() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
}

/// A TCP connection to `addr` from 127.0.0.`host`.
async fn connect_from(addr: SocketAddr, host: u8) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)),
        0,
    ))?;
    socket.connect(addr).await
}

/// How a silent socket ended, seen from the client.
enum End {
    /// EOF or reset, seen at this instant, this long after the connect returned.
    Closed(Instant, Duration),
    /// The server sent bytes.
    Answered(String),
    /// Still open at the limit.
    Open,
}

/// Waits for `s` to be closed by the server, at most until `limit` after `since`.
async fn wait_closed(s: &mut TcpStream, since: Instant, limit: Duration) -> End {
    let mut buf = [0u8; 256];
    match tokio::time::timeout_at(since + limit, s.read(&mut buf)).await {
        Err(_) => End::Open,
        Ok(Ok(0) | Err(_)) => End::Closed(Instant::now(), since.elapsed()),
        Ok(Ok(n)) => End::Answered(String::from_utf8_lossy(&buf[..n]).into_owned()),
    }
}

/// `GET /healthz` on a fresh connection: the status, or `None` when the connection was
/// closed (or reset) without an answer.
async fn healthz(addr: SocketAddr) -> Option<u16> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    String::from_utf8_lossy(&buf)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
}

#[tokio::test]
async fn silent_connections_are_closed_at_the_deadline_and_harm_nobody() {
    const SILENT: usize = 3000;
    const TIMEOUT: Duration = Duration::from_millis(1000);
    raise_nofile();
    let gw = Gateway::start_with(|cfg| {
        cfg.server.handshake_timeout_ms = TIMEOUT.as_millis() as u64;
    })
    .await;
    let timeouts_before = timeouts();
    let connected = Arc::new(AtomicUsize::new(0));
    let mut silent = tokio::task::JoinSet::new();
    let started = Instant::now();
    // Connects in flight at once: a burst beyond the test listener's backlog (1024)
    // would have SYNs dropped and retried a second later, after the first deadlines.
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    for i in 0..SILENT {
        let (addr, connected, gate) = (gw.addr, Arc::clone(&connected), Arc::clone(&gate));
        silent.spawn(async move {
            let permit = gate.acquire_owned().await.unwrap();
            let mut s = connect_from(addr, 1 + (i % 8) as u8)
                .await
                .unwrap_or_else(|e| panic!("silent connection {i}: {e}"));
            let since = Instant::now();
            drop(permit);
            connected.fetch_add(1, Ordering::Relaxed);
            wait_closed(&mut s, since, TIMEOUT + SLACK).await
        });
    }
    while connected.load(Ordering::Relaxed) < SILENT {
        assert!(started.elapsed() < WAIT, "silent connections not all open");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let all_open = started.elapsed();

    // While they are open, a real client connects, joins, chats; /healthz answers.
    let mut alice = gw.user("alice", "").await;
    alice.join("slowloris").await;
    let ack = alice
        .call(json!({"op":"chat","room":"slowloris","text":"hi"}), 2)
        .await;
    assert_eq!(ack, json!({"op":"ack","ref":2}));
    alice
        .events_until("slowloris", |e| e.iter().any(|e| e["text"] == "hi"))
        .await;
    assert_eq!(healthz(gw.addr).await, Some(200));
    let served = Instant::now();

    let mut early = 0;
    let mut open_when_served = 0;
    let mut latest = Duration::ZERO;
    while let Some(end) = silent.join_next().await {
        match end.unwrap() {
            End::Closed(at, after) => {
                // Closed at the deadline, not before it (nothing was shed).
                if after < TIMEOUT - Duration::from_millis(100) {
                    early += 1;
                }
                if at > served {
                    open_when_served += 1;
                }
                latest = latest.max(after);
            }
            End::Answered(text) => panic!("a silent connection was answered: {text:?}"),
            End::Open => panic!(
                "a silent connection was still open after {:?}",
                TIMEOUT + SLACK
            ),
        }
    }
    assert_eq!(early, 0, "silent connections closed before the deadline");
    let served = served - started;
    // The client was served while the silent connections were open (most of them at
    // least: on a loaded machine the first may time out before the last are opened).
    assert!(
        open_when_served >= SILENT / 2,
        "only {open_when_served} silent connections open when the client was served, \
         {served:?} after the first (all open after {all_open:?})"
    );
    assert!(
        timeouts() - timeouts_before >= SILENT as f64,
        "every silent connection is counted as a timeout"
    );
    // All gone: the gateway is as it was.
    assert_eq!(healthz(gw.addr).await, Some(200));
    eprintln!(
        "all open after {all_open:?}, client served at {served:?} with {open_when_served} \
         silent open, last closed {latest:?} after its connect"
    );
    gw.stop().await;
}

#[tokio::test]
async fn beyond_max_handshakes_the_oldest_waiting_connections_are_shed_at_once() {
    const HELD: usize = 100;
    const EXTRA: usize = 20;
    raise_nofile();
    let gw = Gateway::start_with(|cfg| {
        cfg.limits.max_handshakes = HELD;
        cfg.server.handshake_timeout_ms = 10_000;
    })
    .await;
    let sheds_before = sheds();
    // Accepted in order: these hold every slot (they never send a byte)...
    let mut held = Vec::new();
    for i in 0..HELD {
        held.push(connect_from(gw.addr, 1 + (i % 4) as u8).await.unwrap());
    }
    // ...so each further connection sheds the oldest waiting one at once (long before
    // the timeout), and is itself kept: the attacker's sockets are the old ones.
    let mut extra = Vec::new();
    for (i, oldest) in held.iter_mut().enumerate().take(EXTRA) {
        let s = connect_from(gw.addr, 1 + (i % 4) as u8).await.unwrap();
        let since = Instant::now();
        match wait_closed(oldest, since, Duration::from_secs(2)).await {
            End::Closed(..) => {}
            End::Answered(text) => panic!("held connection {i} was answered: {text:?}"),
            End::Open => panic!("held connection {i} was not shed for a newer one"),
        }
        extra.push(s);
    }
    // The newer ones are still open (the 20 oldest went in their place).
    for (i, s) in extra.iter_mut().enumerate() {
        let mut byte = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_millis(50), s.read(&mut byte)).await;
        assert!(r.is_err(), "extra connection {i} was closed: {r:?}");
    }
    // A health check while every slot is held sheds the oldest waiter and is answered.
    let started = Instant::now();
    assert_eq!(healthz(gw.addr).await, Some(200));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(sheds() - sheds_before > EXTRA as f64, "sheds are counted");
    drop(extra);
    // The held ones leave: their slots are free again and /healthz answers.
    drop(held);
    support::wait_until_for("/healthz answers", Duration::from_secs(3), async || {
        healthz(gw.addr).await == Some(200)
    })
    .await;
    // And a client gets through.
    let mut bob = gw.user("bob", "").await;
    assert_eq!(bob.call(json!({"op":"ping"}), 1).await["op"], "pong");
    gw.stop().await;
}

#[tokio::test]
async fn a_slow_request_head_is_closed_at_the_deadline() {
    let gw = Gateway::start_with(|cfg| cfg.server.handshake_timeout_ms = 1000).await;
    let timeouts_before = timeouts();
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let since = Instant::now();
    s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    match wait_closed(&mut s, since, Duration::from_millis(1000) + SLACK).await {
        End::Closed(_, after) => assert!(
            after >= Duration::from_millis(900),
            "closed after {after:?}"
        ),
        End::Answered(text) => panic!("a partial head was answered: {text:?}"),
        End::Open => panic!("a partial head was left open"),
    }
    assert!(timeouts() > timeouts_before);
    // A whole head sent at once is served as always.
    assert_eq!(healthz(gw.addr).await, Some(200));
    gw.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_timeout() {
    let gw = Gateway::start_with(|cfg| cfg.server.handshake_timeout_ms = 1000).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let since = Instant::now();
    let mut buf = Vec::new();
    // The answer, then (keep-alive, no next request) the close.
    tokio::time::timeout(Duration::from_millis(1000) + SLACK, s.read_to_end(&mut buf))
        .await
        .expect("an idle keep-alive connection was left open")
        .ok();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        since.elapsed() >= Duration::from_millis(900),
        "closed after {:?}",
        since.elapsed()
    );
    gw.stop().await;
}

#[tokio::test]
async fn every_connection_is_counted_by_how_its_handshake_ended() {
    let gw = Gateway::start().await;
    let outcome = |o: &str| format!("danmaku_edge_handshakes_total{{outcome=\"{o}\"}}");
    let (ok, closed, bad) = (outcome("ok"), outcome("closed"), outcome("bad_request"));
    let before = (metric_local(&ok), metric_local(&closed), metric_local(&bad));
    // A request answered and closed at once (`Connection: close`) had its head read.
    assert_eq!(healthz(gw.addr).await, Some(200));
    support::wait_until("counted as ok", async || metric_local(&ok) > before.0).await;
    // A connection that leaves without a request is routine (a TCP health check).
    drop(TcpStream::connect(gw.addr).await.unwrap());
    support::wait_until("counted as closed", async || {
        metric_local(&closed) > before.1
    })
    .await;
    // Bytes that are not HTTP are answered 400 by hyper, closed, and counted.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"\x16\x03\x01 not http\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(buf.is_empty() || text.starts_with("HTTP/1.1 400"), "{text}");
    support::wait_until("counted as bad_request", async || {
        metric_local(&bad) > before.2
    })
    .await;
    gw.stop().await;
}
