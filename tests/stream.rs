//! The event stream on one node (PROTOCOL.md v1.1, *Event stream for the backend*):
//! JSON lines under `data/events/`, a record for every event type and status, rotation
//! by size, and a drain that leaves nothing behind.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Gateway, metric, relax_rate_limits, wait_until};

fn streaming(cfg: &mut danmaku_gateway::config::Config) {
    relax_rate_limits(cfg);
    cfg.stream.enabled = true;
}

/// Every record in the files under `dir`, in file order (by name: date, then number).
fn records(dir: &Path) -> Vec<Value> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
    // events-DATE.jsonl before events-DATE.1.jsonl before events-DATE.2.jsonl
    files.sort_by_key(|p| {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        let n: u32 = name
            .trim_end_matches(".jsonl")
            .rsplit_once('.')
            .and_then(|(_, n)| n.parse().ok())
            .unwrap_or(0);
        (name[..17.min(name.len())].to_string(), n)
    });
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).expect("every line is one JSON record"))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn events_dir(gw: &Gateway) -> std::path::PathBuf {
    gw.cfg.data.dir.join("events")
}

async fn post(gw: &Gateway, room: &str, body: Value) -> (u16, Value) {
    gw.api("POST", &format!("/api/v1/rooms/{room}/events"), Some(&body))
        .await
}

#[tokio::test]
async fn every_event_type_and_status_is_recorded_once_with_its_fields() {
    let gw = Gateway::start_with(|cfg| {
        streaming(cfg);
        // The second chat of a second is sampled out of the broadcast.
        cfg.room.max_chat_per_s = 1;
    })
    .await;
    let mut alice = gw.user("alice", "room=r").await;
    alice.recv_op("joined").await;
    let mut bob = gw.user("bob", "room=r").await;
    bob.recv_op("joined").await;

    // chat: one broadcast, one sampled out.
    for (i, text) in ["first", "second"].iter().enumerate() {
        let r = alice
            .call(json!({"op":"chat","room":"r","text":text}), i as i64)
            .await;
        assert_eq!(r["op"], "ack", "{r}");
    }
    // filtered
    let (st, _) = gw
        .api(
            "PUT",
            "/api/v1/filters",
            Some(&json!({"block":["spam"],"mask":[]})),
        )
        .await;
    assert_eq!(st, 200);
    let r = bob
        .call(json!({"op":"chat","room":"r","text":"buy spam now"}), 10)
        .await;
    assert_eq!(r["code"], "filtered", "{r}");
    // gift (client), gift (paid, API), system
    let r = bob
        .call(json!({"op":"gift","room":"r","gift":"rose"}), 11)
        .await;
    assert_eq!(r["op"], "ack", "{r}");
    post(
        &gw,
        "r",
        json!({"type":"gift","user":{"id":"u9","name":"Nine"},"gift":"rocket","count":2}),
    )
    .await;
    let (_, sys) = post(&gw, "r", json!({"type":"system","text":"hello all"})).await;
    // redpacket, grab, redpacket_done
    let (st, p) = gw
        .api(
            "POST",
            "/api/v1/rooms/r/redpackets",
            Some(&json!({"total":100,"shares":1,"sender":{"id":"s","name":"S"}})),
        )
        .await;
    assert_eq!(st, 201, "{p}");
    let packet = p["packet"].as_str().unwrap();
    let r = alice
        .call(json!({"op":"grab","room":"r","packet":packet}), 12)
        .await;
    assert_eq!(r["op"], "ack", "{r}");
    // recall, and a moderation change
    let (st, recall) = gw
        .api(
            "DELETE",
            &format!("/api/v1/rooms/r/events/{}", sys["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(st, 202);
    let (st, _) = gw
        .api(
            "PUT",
            "/api/v1/rooms/r/mutes/bob",
            Some(&json!({"duration_s":60})),
        )
        .await;
    assert_eq!(st, 204);

    let dir = events_dir(&gw);
    let kinds = |recs: &[Value]| -> HashMap<(String, String), usize> {
        let mut m = HashMap::new();
        for r in recs {
            *m.entry((
                r["type"].as_str().unwrap().to_owned(),
                r["status"].as_str().unwrap().to_owned(),
            ))
            .or_insert(0) += 1;
        }
        m
    };
    let want = [
        ("chat", "broadcast"),
        ("chat", "sampled_out"),
        ("chat", "filtered"),
        ("gift", "broadcast"),
        ("system", "broadcast"),
        ("redpacket", "broadcast"),
        ("grab", "broadcast"),
        ("redpacket_done", "broadcast"),
        ("recall", "broadcast"),
        ("filters", "moderation"),
        ("mute", "moderation"),
    ];
    wait_until("every record is in the file", async || {
        let k = kinds(&records(&dir));
        want.iter()
            .all(|(t, s)| k.contains_key(&(t.to_string(), s.to_string())))
    })
    .await;
    let recs = records(&dir);
    let k = kinds(&recs);
    assert_eq!(k[&("gift".into(), "broadcast".into())], 2, "{recs:?}");
    assert!(recs.iter().all(|r| r["type"] != "presence"), "no presence");
    // Each record once, with every field, and the event as clients see it.
    let mut ids = std::collections::HashSet::new();
    for r in &recs {
        assert!(
            ids.insert(r["id"].as_str().unwrap().to_owned()),
            "twice: {r}"
        );
        assert_eq!(r["node"], "test-node");
        assert!(r["ts"].as_u64().unwrap() > 0);
        if r["status"] != "moderation" {
            assert_eq!(r["room"], "r");
            assert_eq!(r["event"]["id"], r["id"], "{r}");
            assert_eq!(r["event"]["type"], r["type"], "{r}");
        }
    }
    let sampled = recs.iter().find(|r| r["status"] == "sampled_out").unwrap();
    assert_eq!(sampled["event"]["text"], "second");
    let filtered = recs.iter().find(|r| r["status"] == "filtered").unwrap();
    assert_eq!(filtered["event"]["text"], "buy spam now");
    assert_eq!(filtered["event"]["user"]["id"], "bob");
    let recalled = recs.iter().find(|r| r["type"] == "recall").unwrap();
    assert_eq!(recalled["id"], recall["id"]);
    let mute = recs.iter().find(|r| r["type"] == "mute").unwrap();
    assert_eq!(mute["room"], "r");
    assert_eq!(mute["event"]["user"], "bob");
    let filters = recs.iter().find(|r| r["type"] == "filters").unwrap();
    assert_eq!(filters["room"], Value::Null);
    let written = metric(
        gw.addr,
        "danmaku_stream_records_total{status=\"broadcast\"}",
    )
    .await;
    assert!(written >= 8.0, "{written}");
    gw.stop().await;
}

#[tokio::test]
async fn a_day_s_file_continues_in_a_numbered_one_past_max_file_mb() {
    let gw = Gateway::start_with(|cfg| {
        streaming(cfg);
        cfg.stream.max_file_mb = 1;
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..40 {
        let (st, v) = post(
            &gw,
            "r",
            json!({"type":"system","text":format!("{i}{}", "x".repeat(60_000))}),
        )
        .await;
        assert_eq!(st, 202);
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    let dir = events_dir(&gw);
    wait_until("all 40 records written", async || records(&dir).len() == 40).await;
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert!(names.len() >= 2, "rotated: {names:?}");
    for name in &names {
        assert!(
            name.starts_with("events-") && name.ends_with(".jsonl"),
            "{name}"
        );
        let len = std::fs::metadata(dir.join(name)).unwrap().len();
        assert!(len <= 1 << 20, "{name} is {len} bytes");
    }
    let got: Vec<String> = records(&dir)
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, ids, "every record once, in order across the files");
    gw.stop().await;
}

#[tokio::test]
async fn a_drain_writes_everything_queued_and_a_restart_continues_the_file() {
    let gw = Gateway::start_with(streaming).await;
    let data = gw.cfg.data.dir.clone();
    let mut n = 0;
    for i in 0..200 {
        let (st, _) = post(&gw, "r", json!({"type":"system","text":format!("m{i}")})).await;
        assert_eq!(st, 202);
        n += 1;
    }
    // Stopped at once: the drain writes what is queued and syncs.
    gw.stop().await;
    let dir = data.join("events");
    assert_eq!(records(&dir).len(), n);

    let gw = Gateway::start_with(|cfg| {
        streaming(cfg);
        cfg.data.dir = data.clone();
    })
    .await;
    post(&gw, "r", json!({"type":"system","text":"after restart"})).await;
    wait_until("the new record is appended", async || {
        records(&dir).len() == n + 1
    })
    .await;
    let files = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(files, 1, "the day's file is continued");
    gw.stop().await;
}

#[tokio::test]
async fn with_the_stream_off_nothing_is_written() {
    let gw = Gateway::start_with(relax_rate_limits).await;
    post(&gw, "r", json!({"type":"system","text":"x"})).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!events_dir(&gw).exists());
    gw.stop().await;
}
