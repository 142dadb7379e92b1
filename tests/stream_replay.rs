//! The replay consumer (`examples/replay.rs`, docs/stream.md) against a real Redis: records
//! XADDed by hand as the gateway writes them, read through a consumer group into per-room
//! comment files, written once per id, acked after writing; a dead consumer's stale entry
//! is claimed.
//!
//! The example is a binary of its own: these tests build it (`cargo build --example
//! replay`, once per test run, next to this test's own binary) and run it with
//! `--idle-exit 1`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{RedisServer, temp_dir};

/// 2026-01-01T00:00:00Z: the stream's start in these tests.
const START: u64 = 1_767_225_600_000;
const KEY: &str = "danmaku:events";

/// The example's binary, built once (fresh: a stale one would test old code).
fn replay_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // target/<profile>/deps/stream_replay-HASH -> target/<profile>/examples/replay
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap();
        let mut build = Command::new(env!("CARGO"));
        build
            .args(["build", "--quiet", "--example", "replay", "--manifest-path"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let ok = build
            .status()
            .expect("cargo build --example replay")
            .success();
        assert!(ok, "cargo build --example replay failed");
        let bin = profile_dir.join("examples").join("replay");
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
}

/// Runs the example's redis mode until it has been idle for a second; its summary.
fn replay(redis: &RedisServer, out: &Path, extra: &[&str]) -> String {
    let mut child = Command::new(replay_bin())
        .args(["redis", "--url", &redis.url(), "--group", "replay"])
        .args(["--start", &START.to_string(), "--idle-exit", "1", "--out"])
        .arg(out)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run the replay example");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("replay did not exit within 30 s of --idle-exit 1");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(status.success(), "replay failed ({status}): {summary}");
    summary
}

/// The number after `label: ` in the summary.
fn count(summary: &str, label: &str) -> u64 {
    summary
        .lines()
        .find_map(|l| l.strip_prefix(label)?.strip_prefix(": ")?.parse().ok())
        .unwrap_or_else(|| panic!("no `{label}` in the summary:\n{summary}"))
}

/// A chat record as the gateway writes it: id, room, status, ms after [`START`], text.
type Chat<'a> = (&'a str, &'a str, &'a str, i64, &'a str);

/// XADDs `chats` to `key`, in order.
fn xadd(redis: &RedisServer, key: &str, chats: &[Chat]) {
    for &(id, room, status, after, text) in chats {
        let ts = START.checked_add_signed(after).unwrap();
        let event = json!({"id": id, "ts": ts, "type": "chat",
            "user": {"id": "u1", "name": "Ann"}, "text": text})
        .to_string();
        let head = format!("XADD {key} * id {id} room {room} type chat status {status} node n1");
        let ts = ts.to_string();
        let mut args: Vec<&str> = head.split(' ').collect();
        args.extend(["ts", &ts, "event", &event]);
        let entry = redis.cli(&args);
        assert!(entry.contains('-'), "XADD: {entry}");
    }
}

/// Runs a command of space-separated words with `redis-cli`.
fn cli(redis: &RedisServer, words: &str) -> String {
    redis.cli(&words.split(' ').collect::<Vec<_>>())
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn comment(offset_s: f64, id: &str, text: &str) -> Value {
    json!({"offset_s": offset_s, "id": id, "user": {"id": "u1", "name": "Ann"}, "text": text})
}

/// Entries of `key` delivered to the group and not yet acked.
fn pending(redis: &RedisServer, key: &str) -> u64 {
    let out = redis.cli(&["XPENDING", key, "replay"]);
    out.lines().next().unwrap().trim().parse().unwrap()
}

fn room_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn broadcast_chats_are_written_once_per_room_and_acked() {
    let redis = RedisServer::start();
    let out = temp_dir("replay-out");
    xadd(
        &redis,
        KEY,
        &[
            ("n1-1", "r1", "broadcast", 1_500, "first"),
            ("n1-2", "r2", "broadcast", 2_001, "other room"),
            ("n1-3", "r1", "sampled_out", 2_500, "sampled"),
            ("n1-0", "r1", "broadcast", -1, "before the start"),
        ],
    );
    let head = "XADD danmaku:events * id n1-m1-0 room r1 type mute status moderation node n1";
    let ts = (START + 2_800).to_string();
    let mut mute: Vec<&str> = head.split(' ').collect();
    mute.extend(["ts", &ts, "event", r#"{"user":"u2","room":"r1","until":0}"#]);
    assert!(redis.cli(&mute).contains('-'));
    xadd(
        &redis,
        KEY,
        &[
            // The same record again, as a retried batch writes it.
            ("n1-1", "r1", "broadcast", 1_500, "first"),
            ("n1-4", "r1", "broadcast", 3_000, "second"),
        ],
    );

    let summary = replay(&redis, &out, &["--consumer", "c1"]);
    assert_eq!(count(&summary, "records read"), 7, "{summary}");
    assert_eq!(count(&summary, "comments written"), 3, "{summary}");
    assert_eq!(count(&summary, "duplicates skipped"), 1, "{summary}");
    assert_eq!(count(&summary, "before start"), 1, "{summary}");
    assert_eq!(count(&summary, "status broadcast"), 5, "{summary}");
    assert_eq!(count(&summary, "status sampled_out"), 1, "{summary}");
    assert_eq!(count(&summary, "status moderation"), 1, "{summary}");
    assert_eq!(count(&summary, "acked"), 7, "{summary}");
    assert_eq!(count(&summary, "claimed"), 0, "{summary}");

    assert_eq!(room_files(&out), ["r1.jsonl", "r2.jsonl"]);
    let r1 = [
        comment(1.5, "n1-1", "first"),
        comment(3.0, "n1-4", "second"),
    ];
    assert_eq!(lines(&out.join("r1.jsonl")), r1);
    let r2 = [comment(2.001, "n1-2", "other room")];
    assert_eq!(lines(&out.join("r2.jsonl")), r2);
    assert_eq!(pending(&redis, KEY), 0, "everything written is acked");

    // A restart: an entry delivered again (same id) is not written twice, a new one is.
    xadd(
        &redis,
        KEY,
        &[
            ("n1-2", "r2", "broadcast", 2_001, "other room"),
            ("n1-5", "r2", "broadcast", 4_000, "later"),
        ],
    );
    let summary = replay(&redis, &out, &["--consumer", "c1"]);
    assert_eq!(count(&summary, "records read"), 2, "{summary}");
    assert_eq!(count(&summary, "comments written"), 1, "{summary}");
    assert_eq!(count(&summary, "duplicates skipped"), 1, "{summary}");
    let r2 = [r2[0].clone(), comment(4.0, "n1-5", "later")];
    assert_eq!(lines(&out.join("r2.jsonl")), r2);
    assert_eq!(lines(&out.join("r1.jsonl")), r1);
    assert_eq!(pending(&redis, KEY), 0);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_dead_consumers_stale_entries_are_claimed() {
    let redis = RedisServer::start();
    let out = temp_dir("replay-claim");
    assert_eq!(
        cli(&redis, "XGROUP CREATE danmaku:events replay 0 MKSTREAM"),
        "OK"
    );
    xadd(
        &redis,
        KEY,
        &[
            ("n1-1", "r1", "broadcast", 1_000, "held by dead"),
            ("n1-2", "r1", "broadcast", 2_000, "also held"),
        ],
    );
    // Consumer `dead` reads both and never acks (it crashed).
    let read = cli(
        &redis,
        "XREADGROUP GROUP replay dead COUNT 10 STREAMS danmaku:events >",
    );
    assert!(read.contains("held by dead"), "{read}");
    assert_eq!(pending(&redis, KEY), 2);
    xadd(&redis, KEY, &[("n1-3", "r1", "broadcast", 3_000, "new")]);

    let summary = replay(&redis, &out, &["--consumer", "c1", "--claim-idle-ms", "0"]);
    assert_eq!(count(&summary, "claimed"), 2, "{summary}");
    assert_eq!(count(&summary, "comments written"), 3, "{summary}");
    assert_eq!(
        lines(&out.join("r1.jsonl")),
        [
            comment(1.0, "n1-1", "held by dead"),
            comment(2.0, "n1-2", "also held"),
            comment(3.0, "n1-3", "new"),
        ]
    );
    assert_eq!(pending(&redis, KEY), 0, "claimed entries are acked too");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn every_shard_key_is_read() {
    let redis = RedisServer::start();
    let out = temp_dir("replay-shards");
    xadd(
        &redis,
        "danmaku:events:0",
        &[("n1-1", "a", "broadcast", 10, "on 0")],
    );
    xadd(
        &redis,
        "danmaku:events:1",
        &[("n1-2", "b", "broadcast", 20, "on 1")],
    );
    let summary = replay(&redis, &out, &["--consumer", "c1", "--shards", "2"]);
    assert_eq!(count(&summary, "comments written"), 2, "{summary}");
    assert_eq!(lines(&out.join("a.jsonl")), [comment(0.01, "n1-1", "on 0")]);
    assert_eq!(lines(&out.join("b.jsonl")), [comment(0.02, "n1-2", "on 1")]);
    for key in ["danmaku:events:0", "danmaku:events:1"] {
        assert_eq!(pending(&redis, key), 0, "{key}");
    }
    let _ = std::fs::remove_dir_all(&out);
}
