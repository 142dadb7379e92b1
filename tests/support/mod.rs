//! Test support: a real gateway on port 0, real WebSocket clients, a tiny HTTP client.
//!
//! `Gateway::start_with` runs `server::run` in a task with a shutdown trigger;
//! `Gateway::stop` triggers the drain and re-raises a panic from the server task, so a
//! crash inside the server fails the test that caused it.
#![allow(dead_code)]

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
