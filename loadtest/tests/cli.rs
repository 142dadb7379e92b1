//! End-to-end checks of the `loadtest` binary against a minimal in-process mock of the
//! gateway (hello, joined, chat → ack + one `batch` per chat to every member), so the tool
//! can be tested without the real gateway: delivery accounting, both wire formats, the
//! JSON report, and the exit codes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

/// Room → members' outboxes (each with its binary flag).
type Rooms = Arc<Mutex<HashMap<String, Vec<(bool, UnboundedSender<Message>)>>>>;

fn encode(binary: bool, v: &Value) -> Message {
    if binary {
        Message::binary(rmp_serde::to_vec_named(v).unwrap())
    } else {
        Message::text(v.to_string())
    }
}

/// Starts the mock on an ephemeral port of a background runtime; returns its address.
fn start_mock() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let rooms: Rooms = Arc::default();
            let mut next_id = 0_u64;
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                next_id += 1;
                tokio::spawn(serve(tcp, next_id, Arc::clone(&rooms)));
            }
        });
    });
    rx.recv().unwrap()
}

async fn serve(tcp: tokio::net::TcpStream, id: u64, rooms: Rooms) {
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
    let authed = params.contains_key("token");
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
    let hello =
        json!({"op":"hello","conn":id.to_string(),"node":"mock","user":null,"heartbeat_ms":25000});
    let _ = out.send(encode(binary, &hello));
    if let Some(room) = &room {
        let mut rooms = rooms.lock().unwrap();
        let members = rooms.entry(room.clone()).or_default();
        members.push((binary, out.clone()));
        let joined =
            json!({"op":"joined","room":room,"online":members.len(),"history":[],"redpackets":[]});
        let _ = out.send(encode(binary, &joined));
    }
    while let Some(Ok(msg)) = stream.next().await {
        let op: Value = match &msg {
            Message::Text(t) => serde_json::from_str(t.as_str()).unwrap(),
            Message::Binary(b) => rmp_serde::from_slice(b).unwrap(),
            _ => continue,
        };
        if op["op"] != "chat" {
            continue;
        }
        if !authed {
            let err =
                json!({"op":"error","ref":op["ref"],"code":"unauthorized","message":"anonymous"});
            let _ = out.send(encode(binary, &err));
            continue;
        }
        let _ = out.send(encode(binary, &json!({"op":"ack","ref":op["ref"]})));
        let batch = json!({"op":"batch","room":op["room"],"events":[
            {"id":"m-1","ts":0,"type":"chat","user":{"id":"u","name":"n"},"text":op["text"]},
            {"id":"m-2","ts":0,"type":"presence","online":1}]});
        let rooms = rooms.lock().unwrap();
        for (bin, member) in &rooms[op["room"].as_str().unwrap()] {
            let _ = member.send(encode(*bin, &batch));
        }
    }
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

    let (code, r) = loadtest(&["idle", "--url", &url, "--conns", "20", "--hold", "0.3"]);
    assert_eq!(code, 0, "{r}");
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
