//! Test support: a real gateway on port 0, real WebSocket clients, a tiny HTTP client.
//!
//! `Gateway::start_with` runs `server::run` in a task with a shutdown trigger;
//! `Gateway::stop` triggers the drain and re-raises a panic from the server task, so a
//! crash inside the server fails the test that caused it.
#![allow(dead_code)]

pub mod raw;

use std::net::SocketAddr;
use std::time::Duration;

use danmaku_gateway::config::Config;
use danmaku_gateway::{auth, server};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "test-secret";
pub const API_TOKEN: &str = "test-api-token";
/// Long enough for any reply on a loaded CI machine, short enough to fail fast.
pub const WAIT: Duration = Duration::from_secs(5);

/// The config tests start from: loopback, small windows, known secrets.
pub fn test_config() -> Config {
    let mut cfg = Config::default();
    cfg.server.node_id = "test-node".into();
    cfg.server.shards = 2;
    cfg.server.drain_s = 1;
    cfg.auth.secret = SECRET.into();
    cfg.api.token = API_TOKEN.into();
    cfg.room.batch_ms = 20;
    cfg.room.presence_ms = 100;
    cfg.data.dir = temp_dir("data");
    cfg
}

/// A fresh directory under the system temp dir, unique per call.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "danmaku-test-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

pub struct Gateway {
    pub addr: SocketAddr,
    pub cfg: Config,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), server::ServerError>>>,
}

impl Gateway {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(edit: impl FnOnce(&mut Config)) -> Self {
        let mut cfg = test_config();
        edit(&mut cfg);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let run_cfg = cfg.clone();
        let task = tokio::spawn(async move {
            server::run(listener, run_cfg, async {
                let _ = rx.await;
            })
            .await
        });
        Gateway {
            addr,
            cfg,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, query: &str) -> String {
        format!(
            "ws://{}/ws{}{}",
            self.addr,
            if query.is_empty() { "" } else { "?" },
            query
        )
    }

    /// Starts the drain without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Drains and waits for `run` to return; re-raises a server panic.
    pub async fn stop(mut self) {
        self.begin_shutdown();
        let task = self.task.take().unwrap();
        match tokio::time::timeout(Duration::from_secs(30), task).await {
            Ok(Ok(res)) => res.expect("server returned an error"),
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(Err(e)) => panic!("server task failed: {e}"),
            Err(_) => panic!("server did not stop"),
        }
    }

    /// Waits for the server task to end (after `begin_shutdown`).
    pub async fn join(mut self) {
        let task = self.task.take().unwrap();
        match tokio::time::timeout(Duration::from_secs(30), task).await {
            Ok(Ok(res)) => res.expect("server returned an error"),
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(Err(e)) => panic!("server task failed: {e}"),
            Err(_) => panic!("server did not stop"),
        }
    }

    /// Connects and consumes `hello`.
    pub async fn client(&self, query: &str) -> Client {
        let mut c = self.connect(query).await.expect("connect");
        let hello = c.recv().await;
        assert_eq!(hello["op"], "hello", "{hello}");
        c.hello = hello;
        c
    }

    /// Connects with a token for `user` and consumes `hello`.
    pub async fn user(&self, user: &str, extra_query: &str) -> Client {
        let q = format!(
            "token={}{}{}",
            token(user, user),
            if extra_query.is_empty() { "" } else { "&" },
            extra_query
        );
        self.client(&q).await
    }

    /// Connects without reading anything; the error is the HTTP refusal.
    pub async fn connect(
        &self,
        query: &str,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let msgpack = query.contains("format=msgpack");
        let (ws, resp) = tokio_tungstenite::connect_async(self.url(query)).await?;
        let proto = resp
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap().to_string());
        Ok(Client {
            ws,
            msgpack,
            hello: Value::Null,
            protocol: proto,
        })
    }

    pub async fn api(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        http(
            self.addr,
            method,
            path,
            Some(API_TOKEN),
            body.map(|b| b.to_string()).as_deref(),
        )
        .await
    }
}

pub fn token(sub: &str, name: &str) -> String {
    token_exp(sub, name, danmaku_gateway::protocol::now_ms() / 1000 + 3600)
}

pub fn token_exp(sub: &str, name: &str, exp: u64) -> String {
    auth::sign(SECRET, sub, name, exp)
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Frames are MessagePack (binary) rather than JSON (text).
    pub msgpack: bool,
    pub hello: Value,
    pub protocol: Option<String>,
}

impl Client {
    /// Sends an op in this client's format.
    pub async fn send(&mut self, op: Value) {
        let msg = if self.msgpack {
            Message::Binary(rmp_serde::to_vec_named(&op).unwrap().into())
        } else {
            Message::Text(op.to_string().into())
        };
        self.ws.send(msg).await.unwrap();
    }

    pub async fn send_raw(&mut self, msg: Message) {
        self.ws.send(msg).await.unwrap();
    }

    /// Next data frame, decoded; panics on close or timeout.
    pub async fn recv(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for a frame")
                .expect("stream ended")
                .expect("socket error");
            match msg {
                Message::Text(t) => {
                    assert!(!self.msgpack, "JSON frame on a msgpack connection");
                    return serde_json::from_str(&t).unwrap();
                }
                Message::Binary(b) => {
                    assert!(self.msgpack, "binary frame on a JSON connection");
                    return rmp_serde::from_slice(&b).unwrap();
                }
                Message::Close(c) => panic!("closed: {c:?}"),
                _ => {}
            }
        }
    }

    /// Next frame whose `op` is `op`, skipping others (e.g. batches).
    pub async fn recv_op(&mut self, op: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["op"] == op {
                return v;
            }
        }
    }

    /// Next reply (any frame but `batch`).
    pub async fn reply(&mut self) -> Value {
        loop {
            let v = self.recv().await;
            if v["op"] != "batch" {
                return v;
            }
        }
    }

    /// Sends `op` with `ref` and returns the reply to it.
    pub async fn call(&mut self, mut op: Value, reference: i64) -> Value {
        op["ref"] = json!(reference);
        self.send(op).await;
        let r = self.reply().await;
        assert_eq!(r["ref"], json!(reference), "reply without our ref: {r}");
        r
    }

    pub async fn join(&mut self, room: &str) -> Value {
        let r = self.call(json!({"op":"join","room":room}), 900_001).await;
        assert_eq!(r["op"], "joined", "{r}");
        r
    }

    /// Collects events of `room` from batches until `pred` holds for the collected list.
    pub async fn events_until(
        &mut self,
        room: &str,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let mut events = Vec::new();
        while !pred(&events) {
            let v = self.recv_op("batch").await;
            if v["room"] == room {
                events.extend(v["events"].as_array().unwrap().iter().cloned());
            }
        }
        events
    }

    /// Waits for the server's close frame; returns its code.
    pub async fn closed(&mut self) -> u16 {
        loop {
            let msg = tokio::time::timeout(WAIT * 2, self.ws.next())
                .await
                .expect("timed out waiting for close");
            match msg {
                Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
                Some(Ok(Message::Close(None))) => return u16::from(WsCloseCode::Status),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("socket error before close: {e}"),
                None => panic!("stream ended without a close frame"),
            }
        }
    }
}

/// A minimal HTTP/1.1 client (Connection: close); returns status and JSON body
/// (`Value::String` when the body is not JSON).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let (status, body) = http_raw(addr, method, path, bearer, body).await;
    let v = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (status, v)
}

pub async fn http_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let body = body.unwrap_or("");
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("HTTP timeout")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// Refusal status of a failed WebSocket connect, and its JSON body.
pub fn refusal(err: tokio_tungstenite::tungstenite::Error) -> (u16, Value) {
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            let status = resp.status().as_u16();
            let body = resp
                .body()
                .as_ref()
                .map(|b| serde_json::from_slice(b).unwrap())
                .unwrap_or(Value::Null);
            (status, body)
        }
        e => panic!("expected an HTTP refusal, got {e}"),
    }
}

/// A real `redis-server` on a free port, owned by the test; killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<std::process::Child>,
    dir: std::path::PathBuf,
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts with extra `redis-server` arguments (e.g. cluster mode).
    pub fn start_with(extra: &[&str]) -> Self {
        let port = free_port();
        let mut s = RedisServer {
            port,
            child: None,
            dir: temp_dir("redis"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL), as an outage would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered, as
    /// with a Redis stalled by a fork or a slow disk.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a [`RedisServer::pause`]d server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    /// Starts it again on the same port (empty: nothing is persisted).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// `calls` of `cmdstat_<cmd>` in `INFO commandstats` (0 when never called).
    pub fn command_calls(&self, cmd: &str) -> u64 {
        let info = self.cli(&["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{cmd}:calls=");
        info.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(&prefix))
            .map(|rest| rest.split(',').next().unwrap().parse().unwrap())
            .unwrap_or(0)
    }

    /// Runs a command with `redis-cli` and returns its trimmed output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a gateway node on `redis`, with `node_id`.
pub async fn redis_node(redis: &str, node_id: &str, edit: impl FnOnce(&mut Config)) -> Gateway {
    let redis = redis.to_string();
    let node_id = node_id.to_string();
    Gateway::start_with(move |cfg| {
        cfg.backplane = danmaku_gateway::config::BackplaneKind::Redis;
        cfg.redis.url = redis;
        cfg.server.node_id = node_id;
        cfg.presence.sync_ms = 100;
        cfg.presence.node_ttl_s = 2;
        edit(cfg);
    })
    .await
}

/// Waits until `cond` holds, polling; panics after `limit`.
pub async fn wait_for<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Helpers added for the single-node core suites (ops, errors, connect, lifecycle,
// broadcast, http_api). Append-only: the functions above keep their signatures.

/// Raises every rate limit far above what a test sends, so suites that are not about
/// rate limits never trip one.
pub fn relax_rate_limits(cfg: &mut Config) {
    use danmaku_gateway::config::Rate;
    let lots = || Rate {
        rate: 100_000.0,
        burst: 100_000,
    };
    cfg.ratelimit.chat = lots();
    cfg.ratelimit.gift = lots();
    cfg.ratelimit.grab = lots();
    cfg.ratelimit.join = lots();
}

/// Polls `cond` until it holds; panics with `what` after `limit`.
pub async fn wait_until_for(what: &str, limit: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`wait_until_for`] with a generous limit (3 × [`WAIT`]).
pub async fn wait_until(what: &str, cond: impl AsyncFnMut() -> bool) {
    wait_until_for(what, WAIT * 3, cond).await;
}

/// The `/metrics` text of the gateway at `addr`.
pub async fn metrics_text(addr: SocketAddr) -> String {
    let (status, body) = http_raw(addr, "GET", "/metrics", None, None).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Sum of the samples of `series` in a Prometheus text: `series` is a metric name
/// (matching every label set) or a name with labels as rendered, e.g.
/// `danmaku_connections_closed_total{code="4010"}`. 0 when absent.
pub fn metric_in(text: &str, series: &str) -> f64 {
    let with_labels = series.contains('{');
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let name = key.split('{').next().unwrap_or(key);
            let hit = if with_labels {
                key == series
            } else {
                name == series
            };
            hit.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// The current value of `series` (see [`metric_in`]) at `addr`.
pub async fn metric(addr: SocketAddr, series: &str) -> f64 {
    metric_in(&metrics_text(addr).await, series)
}

/// Ways to open a WebSocket beyond [`Gateway::connect`].
#[derive(Debug, Clone, Default)]
pub struct ConnectOpts {
    /// Offered in `Sec-WebSocket-Protocol`.
    pub protocol: Option<String>,
    /// Local address to connect from (e.g. 127.0.0.2 for another client IP).
    pub local_ip: Option<std::net::IpAddr>,
    /// `SO_RCVBUF` of the client socket: small = a client whose kernel buffers fill fast.
    pub recv_buffer: Option<u32>,
}

impl Gateway {
    /// Connects with `opts`; the client is MessagePack when `format=msgpack` is in the
    /// query or the server selected the MessagePack subprotocol.
    pub async fn connect_opts(
        &self,
        query: &str,
        opts: &ConnectOpts,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::http::HeaderValue;
        let socket = if self.addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        if let Some(ip) = opts.local_ip {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        if let Some(n) = opts.recv_buffer {
            socket.set_recv_buffer_size(n)?;
        }
        let stream = socket.connect(self.addr).await?;
        let mut req = self.url(query).into_client_request()?;
        if let Some(p) = &opts.protocol {
            req.headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_str(p).unwrap());
        }
        let (ws, resp) =
            tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(stream)).await?;
        let proto = resp
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap().to_string());
        let msgpack = query.contains("format=msgpack")
            || (!query.contains("format=json") && proto.as_deref() == Some("danmaku.v1.msgpack"));
        Ok(Client {
            ws,
            msgpack,
            hello: Value::Null,
            protocol: proto,
        })
    }

    /// [`Gateway::connect_opts`], then consumes `hello`.
    pub async fn client_opts(&self, query: &str, opts: &ConnectOpts) -> Client {
        let mut c = self.connect_opts(query, opts).await.expect("connect");
        let hello = c.recv().await;
        assert_eq!(hello["op"], "hello", "{hello}");
        c.hello = hello;
        c
    }

    /// Sends a WebSocket upgrade request by hand and returns the status, the response
    /// head and the JSON body (read to its Content-Length; `Null` when empty). Exact
    /// where a WebSocket client may drop a refusal's body.
    pub async fn upgrade_raw(
        &self,
        query: &str,
        extra_headers: &[(&str, &str)],
        local_ip: Option<std::net::IpAddr>,
    ) -> (u16, String, Value) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(ip) = local_ip {
            socket.bind(SocketAddr::new(ip, 0)).unwrap();
        }
        let mut s = socket.connect(self.addr).await.unwrap();
        let mut req = format!(
            "GET /ws{}{} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            if query.is_empty() { "" } else { "?" },
            query,
            self.addr
        );
        for (k, v) in extra_headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let read = async {
            loop {
                if let Some(end) = find(&buf, b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    let status: u16 = head
                        .split(' ')
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .expect("status line");
                    if status == 101 {
                        return (status, head, Value::Null);
                    }
                    let len = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.trim()
                                .eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())
                                .flatten()
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        let body = &buf[end + 4..end + 4 + len];
                        let v = if body.is_empty() {
                            Value::Null
                        } else {
                            serde_json::from_slice(body).unwrap_or_else(|_| {
                                Value::String(String::from_utf8_lossy(body).into())
                            })
                        };
                        return (status, head, v);
                    }
                }
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed mid-response");
                buf.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("upgrade response timeout")
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// How a connection ended, as seen by the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// A close frame with this code.
    Close(u16),
    /// The stream ended (or errored) without a close frame.
    Gone,
}

impl Client {
    /// The next message of any kind (pings included), or `None` when the stream ended or
    /// errored; panics after `limit`.
    pub async fn next_raw(&mut self, limit: Duration) -> Option<Message> {
        match tokio::time::timeout(limit, self.ws.next()).await {
            Ok(Some(Ok(m))) => Some(m),
            Ok(_) => None,
            Err(_) => panic!("timed out waiting for a message"),
        }
    }

    /// Reads until the connection ends: a close frame's code, or [`Ending::Gone`] when the
    /// stream ended or failed first. Data frames before it are skipped.
    pub async fn ending(&mut self) -> Ending {
        loop {
            match self.next_raw(WAIT * 2).await {
                Some(Message::Close(Some(f))) => return Ending::Close(u16::from(f.code)),
                Some(Message::Close(None)) => return Ending::Close(u16::from(WsCloseCode::Status)),
                Some(_) => {}
                None => return Ending::Gone,
            }
        }
    }

    /// Decodes a data message in this client's format (`None` for control frames).
    pub fn decode(&self, msg: &Message) -> Option<Value> {
        match msg {
            Message::Text(t) => {
                assert!(!self.msgpack, "JSON frame on a msgpack connection");
                Some(serde_json::from_str(t).unwrap())
            }
            Message::Binary(b) => {
                assert!(self.msgpack, "binary frame on a JSON connection");
                Some(rmp_serde::from_slice(b).unwrap())
            }
            _ => None,
        }
    }

    /// Sends `ping` with `reference` and collects every frame up to its `pong`
    /// (exclusive): proves everything sent before the pong has arrived.
    pub async fn until_pong(&mut self, reference: i64) -> Vec<Value> {
        self.send(json!({"op":"ping","ref":reference})).await;
        let mut frames = Vec::new();
        loop {
            let v = self.recv().await;
            if v["op"] == "pong" && v["ref"] == json!(reference) {
                return frames;
            }
            frames.push(v);
        }
    }

    /// Closes from the client side and waits for the server's answer (best effort).
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(WAIT, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

/// Events of every batch for `room` in `frames`, in order.
pub fn batch_events(frames: &[Value], room: &str) -> Vec<Value> {
    frames
        .iter()
        .filter(|f| f["op"] == "batch" && f["room"] == room)
        .flat_map(|f| f["events"].as_array().unwrap().iter().cloned())
        .collect()
}

impl Client {
    /// Collects every data frame (replies and batches alike, nothing skipped) until
    /// `pred` holds for the collected list.
    pub async fn frames_until(&mut self, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let mut frames = Vec::new();
        while !pred(&frames) {
            frames.push(self.recv().await);
        }
        frames
    }
}

/// Frames of `frames` whose `op` is `op`.
pub fn ops_of<'a>(frames: &'a [Value], op: &str) -> Vec<&'a Value> {
    frames.iter().filter(|f| f["op"] == op).collect()
}

/// Events of type `kind` in the batches of `room` in `frames`, in order.
pub fn events_of(frames: &[Value], room: &str, kind: &str) -> Vec<Value> {
    batch_events(frames, room)
        .into_iter()
        .filter(|e| e["type"] == kind)
        .collect()
}

/// The current value of `series` (see [`metric_in`]) read from this process's recorder
/// directly: works when no gateway is serving `/metrics` any more (after a drain).
pub fn metric_local(series: &str) -> f64 {
    metric_in(&danmaku_gateway::metrics::install().render(), series)
}

pub async fn online(gw: &Gateway, room: &str) -> u64 {
    online_at(gw.addr, room).await
}

/// `online` of `room` from `GET /api/v1/rooms/{room}` of the gateway at `addr` (an
/// in-process [`Gateway`] or a [`GatewayProcess`]).
pub async fn online_at(addr: SocketAddr, room: &str) -> u64 {
    let (st, v) = http(
        addr,
        "GET",
        &format!("/api/v1/rooms/{room}"),
        Some(API_TOKEN),
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    v["online"].as_u64().unwrap()
}

/// Sends numbered chats from `from` until one reaches `to`; consumes the acks.
pub async fn until_linked(from: &mut Client, to: &mut Client, room: &str, tag: &str) {
    let sender = from.hello["user"]["id"].as_str().unwrap().to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{tag}: chats from {sender} in {room} never reached the other node"
        );
        n += 1;
        from.send(json!({"op":"chat","room":room,"text":format!("{tag}-{n}")}))
            .await;
        let wait_until = tokio::time::Instant::now() + Duration::from_millis(300);
        while let Ok(Some(Ok(m))) = tokio::time::timeout_at(wait_until, to.ws.next()).await {
            if let Some(v) = to.decode(&m)
                && v["op"] == "batch"
                && v["room"] == room
                && v["events"].as_array().unwrap().iter().any(|e| {
                    e["type"] == "chat"
                        && e["user"]["id"] == sender.as_str()
                        && e["text"].as_str().unwrap_or("").starts_with(tag)
                })
            {
                from.until_pong(987_654).await;
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Edge helpers (TLS, PROXY protocol, X-Forwarded-For) for tests/edge.rs. Append-only.

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

/// A private CA and a server certificate for `localhost` / 127.0.0.1 signed by it, as
/// the PEM files `server.tls.cert` / `server.tls.key` name.
pub struct TestPki {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    /// The CA that signed the current leaf: what a client trusts.
    pub ca: CertificateDer<'static>,
    /// The current leaf, as a client sees it in the handshake.
    pub leaf: CertificateDer<'static>,
    /// The current key, PEM (for writing mismatched pairs on purpose).
    pub key_pem: String,
}

impl TestPki {
    /// A fresh CA and leaf, written to a fresh directory.
    pub fn new(tag: &str) -> Self {
        let dir = temp_dir(tag);
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, leaf, cert_pem, key_pem) = issue_cert();
        let pki = TestPki {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            ca,
            leaf,
            key_pem: key_pem.clone(),
        };
        write_atomic(&pki.cert, cert_pem.as_bytes());
        write_atomic(&pki.key, key_pem.as_bytes());
        pki
    }

    /// Points `server.tls` at these files.
    pub fn configure(&self, cfg: &mut Config) {
        cfg.server.tls.cert = self.cert.clone();
        cfg.server.tls.key = self.key.clone();
    }

    /// Issues a new CA and leaf and writes them over the files (key first, each file
    /// replaced atomically, as cert-manager or certbot would).
    pub fn renew(&mut self) {
        let (ca, leaf, cert_pem, key_pem) = issue_cert();
        write_atomic(&self.key, key_pem.as_bytes());
        write_atomic(&self.cert, cert_pem.as_bytes());
        self.ca = ca;
        self.leaf = leaf;
        self.key_pem = key_pem;
    }
}

/// A new CA (its own key, a random serial) and a leaf for localhost/127.0.0.1 signed by
/// it: (CA DER, leaf DER, leaf chain PEM, leaf key PEM).
pub fn issue_cert() -> (
    CertificateDer<'static>,
    CertificateDer<'static>,
    String,
    String,
) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "danmaku test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    (
        ca_cert.der().clone(),
        leaf.der().clone(),
        leaf.pem(),
        leaf_key.serialize_pem(),
    )
}

/// Writes `path` through a temporary file and a rename, so a reader never sees half.
pub fn write_atomic(path: &std::path::Path, contents: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A rustls client trusting `roots`, offering ALPN h2 and http/1.1 (the server must
/// pick http/1.1).
pub fn tls_client(roots: &[&CertificateDer<'static>]) -> tokio_rustls::TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add((*r).clone()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
}

pub type TlsClientStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Opens TCP to `addr` (from `local_ip` if given), writes `preamble` (a PROXY header, or
/// nothing), then does the TLS handshake for `localhost`.
pub async fn tls_connect(
    addr: SocketAddr,
    roots: &[&CertificateDer<'static>],
    preamble: &[u8],
    local_ip: Option<std::net::IpAddr>,
) -> std::io::Result<TlsClientStream> {
    let mut tcp = tcp_from(addr, local_ip).await?;
    tcp.write_all(preamble).await?;
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(WAIT, tls_client(roots).connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

/// The leaf certificate the server presented.
pub fn peer_leaf(s: &TlsClientStream) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// A TCP connection to `addr`, from `local_ip` if given (e.g. 127.0.0.2).
pub async fn tcp_from(
    addr: SocketAddr,
    local_ip: Option<std::net::IpAddr>,
) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    if let Some(ip) = local_ip {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(addr).await
}

/// A WebSocket client over TLS (`wss://`), JSON frames.
pub struct WssClient {
    pub ws: WebSocketStream<TlsClientStream>,
    pub hello: Value,
}

impl WssClient {
    /// `wss://localhost/ws?query` over `tls`; consumes `hello`. The error is the HTTP
    /// refusal.
    pub async fn connect(
        tls: TlsClientStream,
        query: &str,
    ) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        let url = format!(
            "wss://localhost/ws{}{query}",
            if query.is_empty() { "" } else { "?" }
        );
        let (ws, _) = tokio_tungstenite::client_async(url, tls).await?;
        let mut c = WssClient {
            ws,
            hello: Value::Null,
        };
        let hello = c.recv().await;
        assert_eq!(hello["op"], "hello", "{hello}");
        c.hello = hello;
        Ok(c)
    }

    pub async fn send(&mut self, op: Value) {
        self.ws
            .send(Message::Text(op.to_string().into()))
            .await
            .unwrap();
    }

    /// Next data frame; panics on close or timeout.
    pub async fn recv(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for a frame")
                .expect("stream ended")
                .expect("socket error");
            match msg {
                Message::Text(t) => return serde_json::from_str(&t).unwrap(),
                Message::Close(c) => panic!("closed: {c:?}"),
                _ => {}
            }
        }
    }

    /// Sends `op` with `ref`; returns the reply to it (batches skipped).
    pub async fn call(&mut self, mut op: Value, reference: i64) -> Value {
        op["ref"] = json!(reference);
        self.send(op).await;
        loop {
            let v = self.recv().await;
            if v["op"] != "batch" {
                assert_eq!(v["ref"], json!(reference), "reply without our ref: {v}");
                return v;
            }
        }
    }
}

/// How [`Gateway::connect_edge`] opens a plain WebSocket.
#[derive(Debug, Clone, Default)]
pub struct EdgeOpts<'a> {
    /// Local address to connect from (127.0.0.2 for another peer).
    pub local_ip: Option<std::net::IpAddr>,
    /// Bytes sent before the HTTP request: a PROXY header.
    pub preamble: &'a [u8],
    /// Extra request headers (X-Forwarded-For).
    pub headers: &'a [(&'a str, &'a str)],
}

impl Gateway {
    /// A WebSocket client (JSON) opened with `opts`; consumes `hello`. The error is the
    /// HTTP refusal.
    pub async fn connect_edge(
        &self,
        query: &str,
        opts: &EdgeOpts<'_>,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
        let mut tcp = tcp_from(self.addr, opts.local_ip).await?;
        tcp.write_all(opts.preamble).await?;
        let mut req = self.url(query).into_client_request()?;
        for (k, v) in opts.headers {
            req.headers_mut().append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let (ws, _) = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp)).await?;
        let mut c = Client {
            ws,
            msgpack: false,
            hello: Value::Null,
            protocol: None,
        };
        let hello = c.recv().await;
        assert_eq!(hello["op"], "hello", "{hello}");
        c.hello = hello;
        Ok(c)
    }
}

/// A PROXY protocol v1 header: `src` is the client the balancer saw.
pub fn proxy_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let fam = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {fam} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// The PROXY protocol v2 signature.
pub const PROXY_V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// A PROXY protocol v2 `PROXY` header over TCP/IPv4 with `tlvs` (type, value) appended.
/// Encoded here by hand, independently of the gateway's parser.
pub fn proxy_v2(
    src: std::net::SocketAddrV4,
    dst: std::net::SocketAddrV4,
    tlvs: &[(u8, &[u8])],
) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend(src.ip().octets());
    body.extend(dst.ip().octets());
    body.extend(src.port().to_be_bytes());
    body.extend(dst.port().to_be_bytes());
    for (t, v) in tlvs {
        body.push(*t);
        body.extend((v.len() as u16).to_be_bytes());
        body.extend(*v);
    }
    let mut h = PROXY_V2_SIG.to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // AF_INET, STREAM
    h.extend((body.len() as u16).to_be_bytes());
    h.extend(body);
    h
}

/// A PROXY protocol v2 `LOCAL` header (a balancer's own health check).
pub fn proxy_v2_local() -> Vec<u8> {
    let mut h = PROXY_V2_SIG.to_vec();
    h.extend([0x20, 0x00, 0x00, 0x00]);
    h
}

/// Asserts the server closes `s` without answering (EOF or reset), within `WAIT * 2`.
pub async fn assert_closed(s: &mut (impl tokio::io::AsyncRead + Unpin), what: &str) {
    let mut buf = [0u8; 512];
    match tokio::time::timeout(WAIT * 2, s.read(&mut buf)).await {
        Err(_) => panic!("{what}: still open"),
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("{what}: answered {:?}", String::from_utf8_lossy(&buf[..n])),
    }
}

// ---------------------------------------------------------------------------------------
// Multi-process helpers: a gateway as a child process, a Redis Cluster, a gateway node on
// that cluster. Shared by the backplane, presence_cluster, redis_cluster and
// redpacket_redis suites, which each kept a private copy before.

/// A gateway run as a child process of the real binary rather than a task in the test's
/// runtime, so a test can SIGKILL it (no drain, no goodbye to Redis) and see what the
/// other nodes make of that. Configured by a TOML file in its own temp dir: the Redis
/// backplane, the test secrets, small windows, then the caller's `extra_toml`. Its log goes
/// to a file, shown when it fails to come up. Killed and its dir removed on drop.
pub struct GatewayProcess {
    pub addr: SocketAddr,
    child: Option<std::process::Child>,
    dir: std::path::PathBuf,
}

impl GatewayProcess {
    /// Starts the binary on a free port as node `node_id` on `redis_url`, with `extra_toml`
    /// (whole tables, e.g. `[presence]`) appended to the config; waits for `/healthz`.
    pub async fn spawn(redis_url: &str, node_id: &str, extra_toml: &str) -> Self {
        let dir = temp_dir("gwproc");
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let data = dir.join("data");
        let toml = format!(
            r#"backplane = "redis"
[server]
listen = "127.0.0.1:{port}"
node_id = "{node_id}"
shards = 2
drain_s = 1
[auth]
secret = "{SECRET}"
[api]
token = "{API_TOKEN}"
[room]
batch_ms = 20
presence_ms = 100
[data]
dir = "{data}"
[redis]
url = "{redis_url}"
{extra_toml}
"#,
            data = data.display()
        );
        let cfg_path = dir.join("gateway.toml");
        std::fs::write(&cfg_path, toml).unwrap();
        let log = std::fs::File::create(dir.join("gateway.log")).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_danmaku-gateway"))
            .arg("--config")
            .arg(&cfg_path)
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn gateway binary");
        let mut me = GatewayProcess {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: Some(child),
            dir,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = me.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("gateway exited early ({status}): {}", me.log());
            }
            if TcpStream::connect(me.addr).await.is_ok()
                && http(me.addr, "GET", "/healthz", None, None).await.0 == 200
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "gateway did not come up: {}",
                me.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        me
    }

    /// What the process has logged so far (stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("gateway.log")).unwrap_or_default()
    }

    /// SIGKILL: no drain, no goodbye to Redis.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A JSON client connected with `query`; `hello` consumed.
    pub async fn client(&self, query: &str) -> Client {
        client_at(self.addr, query).await
    }

    /// An anonymous viewer joined to `room` (hello and joined consumed).
    pub async fn viewer(&self, room: &str) -> Client {
        let mut c = self.client(&format!("room={room}")).await;
        c.recv_op("joined").await;
        c
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A JSON client connected to `ws://addr/ws?query`, `hello` consumed: for a gateway that
/// runs as a child process (no [`Gateway`] to call [`Gateway::client`] on).
pub async fn client_at(addr: SocketAddr, query: &str) -> Client {
    let url = format!("ws://{addr}/ws?{query}");
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    let mut c = Client {
        ws,
        msgpack: false,
        hello: Value::Null,
        protocol: None,
    };
    c.hello = c.recv().await;
    assert_eq!(c.hello["op"], "hello", "{}", c.hello);
    c
}

/// Three `redis-server --cluster-enabled yes` masters covering all 16384 slots, made with
/// `redis-cli --cluster create`: what the cluster suites run the gateway (or its Redis
/// store) on. Each master keeps its `nodes.conf` in its own `--dir`, removed with it when
/// the cluster is dropped.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// A cluster whose masters use a 2 s `cluster-node-timeout`.
    pub fn start() -> Self {
        Self::start_with(&["--cluster-node-timeout", "2000"])
    }

    /// A cluster whose masters get `extra` `redis-server` arguments after the cluster
    /// ones (none: Redis's defaults). Returns once every master reports the cluster ok,
    /// with 3 known nodes and every slot served.
    pub fn start_with(extra: &[&str]) -> Self {
        // The config file is relative to each server's own `--dir`, removed with it.
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                let mut args = vec![
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ];
                args.extend_from_slice(extra);
                RedisServer::start_with(&args)
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = std::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let me = RedisCluster { nodes };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !me.nodes.iter().all(|n| {
            let info = n.cli(&["CLUSTER", "INFO"]);
            info.contains("cluster_state:ok")
                && info.contains("cluster_known_nodes:3")
                && info.contains("cluster_slots_ok:16384")
        }) {
            assert!(
                std::time::Instant::now() < deadline,
                "cluster never became ok: {}",
                me.nodes[0].cli(&["CLUSTER", "INFO"])
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        me
    }

    /// `redis.url` for a gateway in cluster mode: every master, comma-separated.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`).
    pub fn keyslot(&self, key: &str) -> u16 {
        self.nodes[0]
            .cli(&["CLUSTER", "KEYSLOT", key])
            .parse()
            .unwrap()
    }

    /// The index of the master serving `slot`, as the first master sees it (they agree
    /// once the cluster has converged).
    pub fn owner(&self, slot: u16) -> usize {
        let shards = self.nodes[0].cli(&["CLUSTER", "SLOTS"]);
        // Flat redis-cli output: start, end, then per node ip, port, id (...); read
        // "start end ip port" runs.
        let lines: Vec<&str> = shards.lines().map(str::trim).collect();
        for w in lines.windows(4) {
            if let (Ok(lo), Ok(hi), Ok(port)) = (
                w[0].parse::<u16>(),
                w[1].parse::<u16>(),
                w[3].parse::<u16>(),
            ) && w[2] == "127.0.0.1"
                && (lo..=hi).contains(&slot)
                && let Some(i) = self.nodes.iter().position(|n| n.port == port)
            {
                return i;
            }
        }
        panic!("no owner of slot {slot}: {shards}");
    }

    /// The master that owns `key`'s slot.
    pub fn owner_of(&self, key: &str) -> &RedisServer {
        &self.nodes[self.owner(self.keyslot(key))]
    }

    /// `redis-cli -c` (follows redirects) against the first master.
    pub fn cli_c(&self, args: &[&str]) -> String {
        let mut all = vec!["-c"];
        all.extend_from_slice(args);
        self.nodes[0].cli(&all)
    }

    /// Moves `slot` and its keys from master `from` to master `to`, as
    /// `redis-cli --cluster reshard` would.
    pub fn migrate(&self, slot: u16, from: usize, to: usize) {
        let id = |i: usize| self.nodes[i].cli(&["CLUSTER", "MYID"]);
        let (from_id, to_id) = (id(from), id(to));
        let s = slot.to_string();
        let ok = |out: String| assert_eq!(out, "OK");
        ok(self.nodes[to].cli(&["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id]));
        ok(self.nodes[from].cli(&["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id]));
        let keys = self.nodes[from].cli(&["CLUSTER", "GETKEYSINSLOT", &s, "1000"]);
        let port = self.nodes[to].port.to_string();
        for key in keys.lines().map(str::trim).filter(|k| !k.is_empty()) {
            let out = self.nodes[from].cli(&["MIGRATE", "127.0.0.1", &port, key, "0", "5000"]);
            assert!(out == "OK" || out == "NOKEY", "MIGRATE {key}: {out}");
        }
        assert_eq!(
            self.nodes[from].cli(&["CLUSTER", "COUNTKEYSINSLOT", &s]),
            "0",
            "slot {slot} holds keys"
        );
        ok(self.nodes[to].cli(&["CLUSTER", "SETSLOT", &s, "NODE", &to_id]));
        ok(self.nodes[from].cli(&["CLUSTER", "SETSLOT", &s, "NODE", &to_id]));
        for (i, n) in self.nodes.iter().enumerate() {
            if i != from && i != to {
                ok(n.cli(&["CLUSTER", "SETSLOT", &s, "NODE", &to_id]));
            }
        }
    }
}

/// A gateway node `id` on `cluster` (cluster mode, rate limits relaxed): the node every
/// cluster suite starts, built on [`redis_node`].
pub async fn cluster_node(cluster: &RedisCluster, id: &str) -> Gateway {
    let url = cluster.url();
    redis_node(&url.clone(), id, move |cfg: &mut Config| {
        relax_rate_limits(cfg);
        cfg.redis.cluster = true;
        cfg.redis.url = url;
    })
    .await
}

/// A client token (HS256, [`SECRET`]) carrying exactly `claims`: for claims
/// [`token`]/[`token_exp`] cannot express (`nbf`, a missing `sub`, extra fields).
pub fn token_claims(claims: &Value) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("HS256 signing with an HMAC key cannot fail")
}

/// An HTTP error answer: `status` with `{"code": code, "message": <non-empty string>}`.
#[track_caller]
pub fn assert_http_error(got: &(u16, Value), status: u16, code: &str, what: &str) {
    assert_eq!(got.0, status, "{what}: {}", got.1);
    assert_eq!(got.1["code"], code, "{what}: {}", got.1);
    assert!(
        got.1["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {}",
        got.1
    );
}
