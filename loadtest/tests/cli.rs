//! End-to-end checks of the `loadtest` binary against a minimal in-process mock of the
//! gateway, so the tool can be tested without the real gateway: hello, joined, chat/gift
//! → ack + one `batch` per op to every member, join/leave, grab (with a `busy` on the
//! first attempt of every third connection, to exercise retries), and the HTTP API's
//! red-packet create/status on the same port, with a settlement log in a directory, and
//! recovery on reconnect (`join` with `since` answers `recovered` and the events that
//! followed, from a per-room log a "restart" forgets while closing everyone with 1001).
//! Checked: delivery accounting, both wire formats, several targets, the JSON reports,
//! SLOs and the exit codes; and, against a bare mock edge, the `slowloris` scenario.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

/// One member of a room: connection id, binary flag, outbox.
type Member = (u64, bool, UnboundedSender<Message>);

/// A mock red packet.
#[derive(Default)]
struct Packet {
    room: String,
    total: u64,
    shares: u64,
    /// Amounts not handed out yet.
    left: Vec<u64>,
    grabs: Vec<(String, u64)>,
    holders: HashSet<String>,
}

#[derive(Default)]
struct Mock {
    rooms: Mutex<HashMap<String, Vec<Member>>>,
    /// Every room's non-presence events, oldest first (the recovery log). Guarded by
    /// `rooms`' lock too: appended and broadcast, or read and joined, atomically.
    logs: Mutex<HashMap<String, Vec<Value>>>,
    next_event: std::sync::atomic::AtomicU64,
    packets: Mutex<HashMap<String, Packet>>,
    /// Where grabs are settled (`settlement.jsonl`), if anywhere.
    settlement: Option<PathBuf>,
}

impl Mock {
    /// Gives each event a unique id, logs the non-presence ones and sends the batch.
    fn broadcast(&self, room: &str, mut events: Value) {
        let rooms = self.rooms.lock().unwrap();
        let mut logs = self.logs.lock().unwrap();
        let log = logs.entry(room.to_string()).or_default();
        for ev in events.as_array_mut().unwrap() {
            let n = self
                .next_event
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            ev["id"] = json!(format!("m-{n}"));
            if ev["type"] != "presence" {
                log.push(ev.clone());
            }
        }
        let batch = json!({"op":"batch","room":room,"events":events});
        for (_, bin, member) in rooms.get(room).map(Vec::as_slice).unwrap_or_default() {
            let _ = member.send(encode(*bin, &batch));
        }
    }

    /// A restart: every member is closed with 1001 and the recovery logs are forgotten.
    fn restart(&self) {
        let mut rooms = self.rooms.lock().unwrap();
        self.logs.lock().unwrap().clear();
        for (_, _, member) in rooms.values().flatten() {
            let _ = member.send(Message::Close(Some(
                tokio_tungstenite::tungstenite::protocol::CloseFrame {
                    code: 1001.into(),
                    reason: "draining".into(),
                },
            )));
        }
        rooms.clear();
    }
}

/// A frame serialized with `op` first, as the gateway does (a `json!` map sorts keys).
struct OpFirst<'a>(&'a Value);

impl serde::Serialize for OpFirst<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let map = self.0.as_object().expect("frames are objects");
        let mut m = s.serialize_map(Some(map.len()))?;
        m.serialize_entry("op", &map["op"])?;
        for (k, v) in map.iter().filter(|(k, _)| *k != "op") {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

fn encode(binary: bool, v: &Value) -> Message {
    if binary {
        Message::binary(rmp_serde::to_vec_named(&OpFirst(v)).unwrap())
    } else {
        Message::text(serde_json::to_string(&OpFirst(v)).unwrap())
    }
}

/// Starts the mock on an ephemeral port of a background runtime; returns its address.
fn start_mock() -> SocketAddr {
    start_mock_with(None)
}

/// The mock, settling grabs into `dir/settlement.jsonl` when given.
fn start_mock_with(settlement: Option<PathBuf>) -> SocketAddr {
    start_mock_handle(settlement).0
}

/// The mock and a handle on it (to restart it).
fn start_mock_handle(settlement: Option<PathBuf>) -> (SocketAddr, Arc<Mock>) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mock = Arc::new(Mock {
                settlement,
                ..Mock::default()
            });
            tx.send((listener.local_addr().unwrap(), Arc::clone(&mock)))
                .unwrap();
            let mut next_id = 0_u64;
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                next_id += 1;
                tokio::spawn(serve(tcp, next_id, Arc::clone(&mock)));
            }
        });
    });
    rx.recv().unwrap()
}

/// The user id in a token (the mock trusts the tool's dev secret).
fn user_of(token: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Claims {
        sub: String,
    }
    jsonwebtoken::decode::<Claims>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(b"dev-secret-change-me"),
        &jsonwebtoken::Validation::default(),
    )
    .unwrap()
    .claims
    .sub
}

async fn serve(tcp: TcpStream, id: u64, mock: Arc<Mock>) {
    let mut head = [0u8; 16];
    let n = tcp.peek(&mut head).await.unwrap_or(0);
    if head[..n].starts_with(b"POST /api") || head[..n].starts_with(b"GET /api") {
        return serve_http(tcp, mock).await;
    }
    let mut query = String::new();
    // The callback's signature is tungstenite's (its error type is a whole response).
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| {
        query = req.uri().query().unwrap_or_default().to_string();
        Ok(resp)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
        return;
    };
    let params: HashMap<&str, &str> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let binary = params.get("format") == Some(&"msgpack");
    let user = params.get("token").map(|t| user_of(t));
    let room = params.get("room").map(|r| r.to_string());
    let (mut sink, mut stream) = ws.split();
    let (out, mut outbox) = unbounded_channel::<Message>();
    tokio::spawn(async move {
        while let Some(m) = outbox.recv().await {
            if sink.send(m).await.is_err() {
                break;
            }
        }
    });
    let send = |v: Value| {
        let _ = out.send(encode(binary, &v));
    };
    send(
        json!({"op":"hello","conn":id.to_string(),"node":"mock","user":null,"heartbeat_ms":25000}),
    );
    let join = |room: &str, reference: Option<&Value>, since: Option<&str>| {
        let mut rooms = mock.rooms.lock().unwrap();
        let logs = mock.logs.lock().unwrap();
        let members = rooms.entry(room.to_string()).or_default();
        if !members.iter().any(|(m, _, _)| *m == id) {
            members.push((id, binary, out.clone()));
        }
        let mut joined =
            json!({"op":"joined","room":room,"online":members.len(),"history":[],"redpackets":[]});
        if let Some(since) = since {
            let log = logs.get(room).map(Vec::as_slice).unwrap_or_default();
            match log.iter().position(|ev| ev["id"] == since) {
                Some(at) => {
                    joined["recovered"] = json!(true);
                    joined["history"] = Value::Array(log[at + 1..].to_vec());
                }
                None => joined["recovered"] = json!(false),
            }
        }
        if let Some(r) = reference {
            joined["ref"] = r.clone();
        }
        let _ = out.send(encode(binary, &joined));
    };
    if let Some(room) = &room {
        join(room, None, None);
    }
    let mut grabs_seen = 0_u64;
    while let Some(Ok(msg)) = stream.next().await {
        let op: Value = match &msg {
            Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
            Message::Binary(b) => rmp_serde::from_slice(b).unwrap(),
            _ => continue,
        };
        let reference = op["ref"].clone();
        let room = op["room"].as_str().unwrap_or_default().to_string();
        let error = |code: &str| json!({"op":"error","ref":reference,"code":code,"message":code});
        match op["op"].as_str().unwrap_or_default() {
            "join" => join(&room, Some(&reference), op["since"].as_str()),
            "leave" => {
                if let Some(members) = mock.rooms.lock().unwrap().get_mut(&room) {
                    members.retain(|(m, _, _)| *m != id);
                }
                send(json!({"op":"ack","ref":reference}));
            }
            "chat" | "gift" => {
                let Some(user) = &user else {
                    send(error("unauthorized"));
                    continue;
                };
                send(json!({"op":"ack","ref":reference}));
                let u = json!({"id":user,"name":"n"});
                let event = if op["op"] == "chat" {
                    json!({"id":"m-1","ts":0,"type":"chat","user":u,"text":op["text"]})
                } else {
                    json!({"id":"m-1","ts":0,"type":"gift","user":u,"gift":op["gift"],"count":op["count"]})
                };
                mock.broadcast(
                    &room,
                    json!([event, {"id":"m-2","ts":0,"type":"presence","online":1}]),
                );
            }
            "grab" => {
                let Some(user) = &user else {
                    send(error("unauthorized"));
                    continue;
                };
                grabs_seen += 1;
                if id.is_multiple_of(3) && grabs_seen == 1 {
                    send(error("busy"));
                    continue;
                }
                let pid = op["packet"].as_str().unwrap_or_default().to_string();
                let outcome = {
                    let mut packets = mock.packets.lock().unwrap();
                    match packets.get_mut(&pid) {
                        None => Err("packet_not_found"),
                        Some(p) if p.holders.contains(user) => Err("already_grabbed"),
                        Some(p) => match p.left.pop() {
                            None => Err("packet_empty"),
                            Some(amount) => {
                                p.holders.insert(user.clone());
                                p.grabs.push((user.clone(), amount));
                                Ok((amount, p.left.is_empty(), p.grabs.len(), p.total))
                            }
                        },
                    }
                };
                match outcome {
                    Err(code) => send(error(code)),
                    Ok((amount, done, grabbed, total)) => {
                        if let Some(dir) = &mock.settlement {
                            let line = json!({"packet":pid,"room":room,
                                "user":{"id":user,"name":"n"},"amount":amount,"ts":1});
                            let mut f = std::fs::OpenOptions::new()
                                .create(true)
                                .append(true)
                                .open(dir.join("settlement.jsonl"))
                                .unwrap();
                            // One write per line: concurrent appends stay whole.
                            f.write_all(format!("{line}\n").as_bytes()).unwrap();
                        }
                        send(json!({"op":"ack","ref":reference,"amount":amount}));
                        let mut events = vec![json!({"id":"g","ts":0,"type":"grab","packet":pid,
                            "user":{"id":user,"name":"n"},"amount":amount})];
                        if done {
                            events.push(json!({"id":"d","ts":0,"type":"redpacket_done",
                                "packet":pid,"grabbed":grabbed,"total_grabbed":total,"expired":false}));
                        }
                        mock.broadcast(&room, Value::Array(events));
                    }
                }
            }
            _ => {}
        }
    }
    for members in mock.rooms.lock().unwrap().values_mut() {
        members.retain(|(m, _, _)| *m != id);
    }
}

/// The mock's HTTP API: create a packet, read its status. One request per connection.
async fn serve_http(mut tcp: TcpStream, mock: Arc<Mock>) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let (head, mut body) = loop {
        let n = tcp.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break (
                String::from_utf8_lossy(&raw[..i]).to_string(),
                raw[i + 4..].to_vec(),
            );
        }
    };
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while body.len() < length {
        let n = tcp.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        body.extend_from_slice(&buf[..n]);
    }
    let request_line = head.lines().next().unwrap_or_default().to_string();
    let authorized = head.contains("Authorization: Bearer dev-api-token-change-me");
    let path = request_line.split(' ').nth(1).unwrap_or_default();
    let (status, reply) = if !authorized {
        (
            401,
            json!({"code":"unauthorized","message":"bad API token"}),
        )
    } else if request_line.starts_with("POST ") && path.ends_with("/redpackets") {
        let room = path.split('/').nth(4).unwrap_or_default().to_string();
        let req: Value = serde_json::from_slice(&body).unwrap();
        let (total, shares) = (
            req["total"].as_u64().unwrap(),
            req["shares"].as_u64().unwrap(),
        );
        let mut left = vec![total / shares; shares as usize];
        left[0] += total % shares;
        let mut packets = mock.packets.lock().unwrap();
        let pid = format!("rp-mock-{}", packets.len());
        packets.insert(
            pid.clone(),
            Packet {
                room,
                total,
                shares,
                left,
                ..Packet::default()
            },
        );
        (201, json!({"packet": pid}))
    } else if let Some(pid) = path.strip_prefix("/api/v1/redpackets/") {
        let packets = mock.packets.lock().unwrap();
        match packets.get(pid) {
            Some(p) => {
                let total_grabbed: u64 = p.grabs.iter().map(|g| g.1).sum();
                let grabs: Vec<Value> = p
                    .grabs
                    .iter()
                    .map(|(u, a)| json!({"user":{"id":u,"name":"n"},"amount":a}))
                    .collect();
                (
                    200,
                    json!({"packet":pid,"room":p.room,"total":p.total,"shares":p.shares,
                        "grabbed":p.grabs.len(),"total_grabbed":total_grabbed,
                        "remaining":p.left.len(),"expired":false,"grabs":grabs}),
                )
            }
            None => (
                404,
                json!({"code":"packet_not_found","message":"no such packet"}),
            ),
        }
    } else {
        (404, json!({"code":"not_found","message":"no such route"}))
    };
    let body = reply.to_string();
    // Chunked, to exercise the tool's decoder.
    let resp = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    let _ = tcp.write_all(resp.as_bytes()).await;
    let _ = tcp.shutdown().await;
}

/// Runs the binary; returns (exit code, stdout parsed as the JSON report).
fn loadtest(args: &[&str]) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not a JSON report ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

#[test]
fn fanout_counts_every_delivery_in_both_formats() {
    let addr = start_mock();
    let url = format!("ws://{addr}/ws");
    for format in ["json", "msgpack"] {
        let (code, r) = loadtest(&[
            "fanout",
            "--url",
            &url,
            "--conns",
            "30",
            "--rooms",
            "3",
            "--senders",
            "3",
            "--rate",
            "3",
            "--duration",
            "1.5",
            "--warmup",
            "0.2",
            "--drain",
            "0.5",
            "--format",
            format,
            "--room-prefix",
            format,
            "--min-delivery-ratio",
            "1",
        ]);
        assert_eq!(code, 0, "{r}");
        assert_eq!(r["connect"]["ok"], 33, "{r}");
        let acked = r["chats"]["acked"].as_u64().unwrap();
        assert!(acked >= 3, "{r}");
        // Every room has 10 receivers + 1 sender.
        assert_eq!(
            r["deliveries"]["expected"].as_u64().unwrap(),
            acked * 11,
            "{r}"
        );
        assert_eq!(
            r["deliveries"]["delivered"], r["deliveries"]["expected"],
            "{r}"
        );
        assert_eq!(r["latency"]["count"], r["deliveries"]["delivered"], "{r}");
        assert_eq!(r["undecodable_frames"], 0, "{r}");
        assert_eq!(r["passed"], true);
    }
}

#[test]
fn idle_and_storm_report_and_fail_on_refused_connections() {
    let addr = start_mock();
    let url = format!("ws://{addr}/ws");
    let (code, r) = loadtest(&[
        "storm",
        "--url",
        &url,
        "--conns",
        "40",
        "--concurrency",
        "8",
    ]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["all_succeeded"], true);
    assert_eq!(r["connect"]["max_online_seen"], 40);
    assert_eq!(r["connect"]["connect_latency"]["count"], 40);

    // The mock runs in this process: it is the "gateway" whose CPU and RSS get reported.
    let me = std::process::id().to_string();
    let (code, r) = loadtest(&[
        "idle", "--url", &url, "--conns", "20", "--hold", "0.3", "--pid", &me,
    ]);
    assert_eq!(code, 0, "{r}");
    let gw = &r["usage"]["gateway"];
    assert_eq!(gw["pid"], me.as_str(), "{r}");
    assert!(gw["cpu_s"].as_f64().unwrap() >= 0.0, "{r}");
    assert!(gw["hwm_after_bytes"].as_u64().unwrap() >= gw["rss_after_bytes"].as_u64().unwrap());
    assert!(r["server_rss"]["before_bytes"].as_u64().unwrap() > 0, "{r}");
    assert!(
        r["usage"]["loadtest"]["rss_after_bytes"].as_u64().unwrap() > 0,
        "{r}"
    );
    assert_eq!(r["open_at_end"], 20, "{r}");
    assert!(r["client_rss"]["before_bytes"].as_u64().unwrap() > 0, "{r}");

    // Nothing listens on the port of a listener that was just dropped.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("ws://{closed}/ws");
    let (code, r) = loadtest(&[
        "storm",
        "--url",
        &url,
        "--conns",
        "5",
        "--connect-timeout",
        "2",
    ]);
    assert_eq!(code, 1, "{r}");
    assert_eq!(r["connect"]["failed"], 5);
    assert_eq!(
        r["connect"]["failures"]["tcp connect: ConnectionRefused"], 5,
        "{r}"
    );
}

#[test]
fn redpacket_storm_checks_sums_server_and_settlement_log() {
    let dir = std::env::temp_dir().join(format!("lt-cli-journal-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let addr = start_mock_with(Some(dir.clone()));
    let url = format!("ws://{addr}/ws");
    let journal = dir.to_str().unwrap();
    let (code, r) = loadtest(&[
        "redpacket",
        "--target",
        &url,
        "--conns",
        "30",
        "--warmup",
        "0.1",
        "--drain",
        "0.3",
        "--journal",
        journal,
        "--slo",
        "delivery=1,p99_ms=5000",
    ]);
    assert_eq!(code, 0, "{r}");
    let g = &r["grabs"];
    assert_eq!(g["successes"], 30, "{r}");
    assert_eq!(g["failures"], 0, "{r}");
    assert_eq!(g["sum"], 3000, "{r}");
    assert_eq!(g["sum_equals_total"], true, "{r}");
    // Every third connection got one `busy` first.
    assert_eq!(g["retried"]["busy"], 10, "{r}");
    assert_eq!(g["attempts"], 40, "{r}");
    assert_eq!(g["latency"]["count"], 30, "{r}");
    assert_eq!(g["attempt_latency"]["count"], 40, "{r}");
    assert_eq!(r["server"]["matches"], true, "{r}");
    assert_eq!(r["server"]["grabbed"], 30, "{r}");
    assert_eq!(r["journal"]["lines"], 30, "{r}");
    assert_eq!(r["journal"]["sum"], 3000, "{r}");
    assert_eq!(r["journal"]["matches"], true, "{r}");
    assert_eq!(r["done_seen"], 30, "{r}");
    assert_eq!(r["slo"].as_array().unwrap().len(), 2, "{r}");
    assert_eq!(r["passed"], true);

    // Fewer shares than users: the rest get `packet_empty`, which is expected; an SLO
    // nobody can meet fails the run.
    let (code, r) = loadtest(&[
        "redpacket",
        "--url",
        &url,
        "--conns",
        "20",
        "--shares",
        "8",
        "--total",
        "801",
        "--warmup",
        "0.1",
        "--drain",
        "0.2",
        "--format",
        "msgpack",
        "--slo-p99-ms",
        "0",
    ]);
    assert_eq!(code, 1, "{r}");
    let g = &r["grabs"];
    assert_eq!(
        (&g["successes"], &g["expected_successes"]),
        (&json!(8), &json!(8)),
        "{r}"
    );
    assert_eq!(g["failures_by_code"]["packet_empty"], 12, "{r}");
    assert_eq!(g["unexpected_failures"], 0, "{r}");
    assert_eq!(g["sum"], 801, "{r}");
    assert_eq!(r["server"]["matches"], true, "{r}");
    assert_eq!(r["slo"][0]["met"], false, "{r}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn rooms_and_soak_account_gifts_churn_and_reconnects() {
    let addr = start_mock();
    let url = format!("ws://{addr}/ws");
    let (code, r) = loadtest(&[
        "rooms",
        "--url",
        &url,
        "--conns",
        "40",
        "--rooms",
        "20",
        "--senders",
        "4",
        "--rate",
        "4",
        "--duration",
        "1",
        "--warmup",
        "0.1",
        "--drain",
        "0.3",
        "--slo",
        "delivery=1",
    ]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["scenario"], "rooms");
    // Senders sit in rooms 0, 5, 10, 15, each with 2 receivers.
    let acked = r["chats"]["acked"].as_u64().unwrap();
    assert!(acked >= 4, "{r}");
    assert_eq!(
        r["deliveries"]["expected"].as_u64().unwrap(),
        acked * 3,
        "{r}"
    );
    assert_eq!(r["deliveries"]["ratio"], 1.0, "{r}");

    let (code, r) = loadtest(&[
        "soak",
        "--url",
        &url,
        "--conns",
        "24",
        "--rooms",
        "2",
        "--senders",
        "4",
        "--rate",
        "4",
        "--gift-rate",
        "8",
        "--churn",
        "0.5",
        "--churn-period",
        "0.3",
        "--away",
        "0.05",
        "--duration",
        "2",
        "--warmup",
        "0.1",
        "--drain",
        "0.5",
        "--slo",
        "delivery=1,p99_ms=5000",
    ]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["scenario"], "soak");
    // Stable members per room: 6 viewers + 2 senders.
    let acked = r["chats"]["acked"].as_u64().unwrap();
    assert_eq!(
        r["deliveries"]["expected"].as_u64().unwrap(),
        acked * 8,
        "{r}"
    );
    assert_eq!(r["deliveries"]["ratio"], 1.0, "{r}");
    let gifts = &r["gifts"];
    assert!(gifts["acked"].as_u64().unwrap() >= 8, "{r}");
    assert_eq!(
        gifts["expected"].as_u64().unwrap(),
        gifts["acked"].as_u64().unwrap() * 8,
        "{r}"
    );
    assert_eq!(gifts["ratio"], 1.0, "{r}");
    let churn = &r["churn"];
    assert_eq!(churn["churners"], 12, "{r}");
    let cycles = churn["rejoins"].as_u64().unwrap() + churn["reconnects"].as_u64().unwrap();
    assert!(cycles >= 12, "{r}");
    assert!(churn["leaves"].as_u64().unwrap() > 0, "{r}");
    assert!(churn["reconnects"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(churn["errors"], json!({}), "{r}");
    assert_eq!(r["passed"], true);
}

#[test]
fn several_targets_share_the_connections() {
    let (a, b) = (start_mock(), start_mock());
    let targets = format!("ws://{a}/ws,ws://{b}/ws");
    let (code, r) = loadtest(&["storm", "--target", &targets, "--conns", "40"]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["connect"]["ok"], 40, "{r}");
    // Each mock saw half of the room.
    assert_eq!(r["connect"]["max_online_seen"], 20, "{r}");
    assert_eq!(r["url"], targets.as_str());
    // An unmeetable connect-latency SLO fails the run.
    let (code, r) = loadtest(&[
        "storm", "--url", &targets, "--conns", "4", "--slo", "p50_ms=0",
    ]);
    assert_eq!(code, 1, "{r}");
    assert_eq!(r["all_succeeded"], true, "{r}");
    assert_eq!(r["slo"][0]["met"], false, "{r}");
}

/// A mock edge for `slowloris`: answers `GET /healthz` with 200, and closes a connection
/// that sent nothing after `close_after` (never, when `None`).
fn start_edge_mock(close_after: Option<std::time::Duration>) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 256];
                    let read = tcp.read(&mut buf);
                    let n = match close_after {
                        Some(after) => match tokio::time::timeout(after, read).await {
                            Ok(r) => r.unwrap_or(0),
                            Err(_) => return,
                        },
                        None => read.await.unwrap_or(0),
                    };
                    if buf[..n].starts_with(b"GET /healthz") {
                        let _ = tcp
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .await;
                    } else {
                        // Silent for good: hold it.
                        std::future::pending::<()>().await;
                    }
                });
            }
        });
    });
    rx.recv().unwrap()
}

#[test]
fn slowloris_measures_the_shedding_and_fails_when_connections_stay() {
    let addr = start_edge_mock(Some(std::time::Duration::from_millis(300)));
    let url = format!("ws://{addr}/ws");
    let (code, r) = loadtest(&[
        "slowloris",
        "--url",
        &url,
        "--conns",
        "60",
        "--concurrency",
        "16",
        "--healthz-every-ms",
        "50",
        "--max-hold",
        "5",
    ]);
    assert_eq!(code, 0, "{r}");
    let silent = &r["silent"];
    assert_eq!(silent["connected"], 60, "{r}");
    assert_eq!(silent["eof"], 60, "{r}");
    assert_eq!(silent["all_shed"], true, "{r}");
    assert!(silent["held"]["p50_ms"].as_f64().unwrap() >= 250.0, "{r}");
    assert!(
        silent["time_to_all_shed_s"].as_f64().unwrap() >= 0.25,
        "{r}"
    );
    // Spread over loopback source addresses by default.
    assert_eq!(r["sources"].as_array().unwrap().len(), 8, "{r}");
    let healthz = &r["healthz"];
    assert!(healthz["ok"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(healthz["ok"], healthz["requests"], "{r}");
    assert_eq!(healthz["latency"]["count"], healthz["ok"], "{r}");

    // A server that never sheds them fails the run.
    let addr = start_edge_mock(None);
    let url = format!("ws://{addr}/ws");
    let (code, r) = loadtest(&[
        "slowloris",
        "--url",
        &url,
        "--conns",
        "10",
        "--max-hold",
        "0.5",
    ]);
    assert_eq!(code, 1, "{r}");
    assert_eq!(r["silent"]["never_shed"], 10, "{r}");
    assert_eq!(r["silent"]["all_shed"], false, "{r}");
    assert_eq!(r["passed"], false, "{r}");
}

#[test]
fn reconnect_after_a_blink_recovers_every_chat_exactly_once() {
    let addr = start_mock();
    let url = format!("ws://{addr}/ws");
    for format in ["json", "msgpack"] {
        let (code, r) = loadtest(&[
            "reconnect",
            "--url",
            &url,
            "--format",
            format,
            "--viewers",
            "20",
            "--senders",
            "2",
            "--rate",
            "4",
            "--duration",
            "2",
            "--warmup",
            "0.2",
            "--drain",
            "1",
            "--blink-at",
            "0.9",
            "--backoff-ms",
            "50",
            "--slo",
            "delivery=1,p99_ms=5000",
        ]);
        assert_eq!(code, 0, "{r}");
        assert_eq!(r["scenario"], "reconnect");
        assert_eq!(r["connect"]["ok"], 22, "{r}");
        assert_eq!(r["blinks"], 1, "{r}");
        assert_eq!(r["disconnects"]["blink"], 20, "{r}");
        assert_eq!(r["disconnects_total"], 20, "{r}");
        assert_eq!(r["reconnects"], 20, "{r}");
        assert_eq!(r["reconnect_time"]["count"], 20, "{r}");
        assert_eq!(r["rejoins"]["recovered_true"], 20, "{r}");
        assert_eq!(r["viewers_connected_at_end"], 20, "{r}");
        let acked = r["chats"]["acked"].as_u64().unwrap();
        assert!(acked >= 6, "{r}");
        assert_eq!(r["chats"]["send_failures"], 0, "{r}");
        let d = &r["delivery"];
        assert_eq!(d["expected"].as_u64().unwrap(), acked * 20, "{r}");
        assert_eq!(d["delivered"], d["expected"], "{r}");
        assert_eq!(d["acked_never_delivered"], 0, "{r}");
        let g = &r["groups"]["recovered_every_time"];
        assert_eq!(
            (&g["viewers"], &g["missing"]),
            (&json!(20), &json!(0)),
            "{r}"
        );
        assert_eq!(g["duplicates"], 0, "{r}");
        assert_eq!(r["groups"]["not_recovered"]["viewers"], 0, "{r}");
        // The mock has no /metrics: no answer, nothing counted.
        assert_eq!(r["sampled_out"]["total"], 0, "{r}");
        assert_eq!(r["passed"], true, "{r}");
    }
}

#[test]
fn reconnect_after_a_restart_counts_unrecovered_viewers_apart() {
    let (addr, mock) = start_mock_handle(None);
    let url = format!("ws://{addr}/ws");
    // Restarts once everyone has joined and chats have been flowing for a while.
    let restarter = std::thread::spawn(move || {
        for _ in 0..500 {
            let members: usize = mock.rooms.lock().unwrap().values().map(Vec::len).sum();
            if members == 22 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::thread::sleep(std::time::Duration::from_millis(1200));
        mock.restart();
    });
    let (code, r) = loadtest(&[
        "reconnect",
        "--url",
        &url,
        "--viewers",
        "20",
        "--senders",
        "2",
        "--rate",
        "4",
        "--duration",
        "2.5",
        "--warmup",
        "0.2",
        "--drain",
        "1",
    ]);
    restarter.join().unwrap();
    // Nobody that kept its connection or recovered missed anything: a pass.
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["disconnects"]["closed by server: 1001"], 20, "{r}");
    assert_eq!(r["reconnects"], 20, "{r}");
    let rejoins = &r["rejoins"];
    let unrecovered =
        rejoins["recovered_false"].as_u64().unwrap() + rejoins["without_since"].as_u64().unwrap();
    assert_eq!(unrecovered, 20, "{r}");
    assert_eq!(r["groups"]["not_recovered"]["viewers"], 20, "{r}");
    assert_eq!(r["groups"]["recovered_every_time"]["viewers"], 0, "{r}");
    assert_eq!(
        r["chats"]["disconnects"]["closed by server: 1001"], 2,
        "{r}"
    );
    assert_eq!(r["chats"]["reconnects"], 2, "{r}");
    // Senders kept sending after their reconnect.
    assert!(r["chats"]["acked"].as_u64().unwrap() >= 8, "{r}");
    assert_eq!(r["passed"], true, "{r}");
}
