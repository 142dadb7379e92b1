//! A consumer of the gateway's event stream (docs/stream.md) to start from: builds what a
//! "danmaku on the video" replay needs, one file of comments per room, each comment with
//! its offset in seconds from the stream's start.
//!
//! ```sh
//! # Redis Streams (the cluster): a consumer group, at least once, acked after writing.
//! cargo run --example replay -- redis --url redis://127.0.0.1:6379 --group replay \
//!   --consumer c1 --start 1767225600000 --out replay/
//! # Single node: the daily JSON-lines files.
//! cargo run --example replay -- files --dir data/events --start 1767225600000 --out replay/
//! ```
//!
//! Output: `OUT/<room>.jsonl`, one line per chat that was broadcast, from `--start` on:
//! `{"offset_s":12.345,"id":"…","user":{"id":"…","name":"…"},"text":"…"}`. A comment is
//! written once however often it is delivered: the ids already in `OUT` are read back at
//! start, so a restarted consumer skips what it wrote before. A summary (records read,
//! comments written, duplicates skipped, records per status) is printed at the end.
//!
//! `redis` mode: creates the group if missing (`XGROUP CREATE … 0 MKSTREAM`), takes back
//! its own unacked entries (`XREADGROUP … 0`) and claims stale ones of other consumers
//! (`XAUTOCLAIM`, `--claim-idle-ms`), then reads new entries (`XREADGROUP … >`, 500 at a
//! time, blocking 1 s), writes and syncs the lines, and only then `XACK`s them. It stops on
//! Ctrl-C (between batches), or with `--idle-exit S` after S seconds without new entries.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use serde_json::Value;

/// The stream key with one shard (`stream.shards = 1`); `danmaku:events:N` with more.
const STREAM_KEY: &str = "danmaku:events";
/// Entries per `XREADGROUP` / `XAUTOCLAIM`.
const COUNT: usize = 500;
/// How long one `XREADGROUP` blocks waiting for new entries.
const BLOCK_MS: u64 = 1000;
/// Room files kept open at once; beyond it they are closed after a commit.
const MAX_OPEN: usize = 256;

#[derive(Parser, Debug)]
#[command(about = "Per-room comment files with offsets, from the gateway's event stream")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Read Redis Streams with a consumer group (the Redis backplane).
    Redis(RedisArgs),
    /// Read the single node's `events-*.jsonl` files.
    Files(FilesArgs),
}

#[derive(Args, Debug, Clone)]
struct RedisArgs {
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    url: String,
    /// Stream keys, comma-separated (default: `danmaku:events`, or see `--shards`).
    #[arg(long, value_delimiter = ',', conflicts_with = "shards")]
    keys: Vec<String>,
    /// The gateway's `stream.shards`: reads `danmaku:events:0` .. `danmaku:events:N-1`.
    #[arg(long)]
    shards: Option<u32>,
    #[arg(long, default_value = "replay")]
    group: String,
    /// This consumer's name in the group; keep it across restarts, so its own unacked
    /// entries come back to it.
    #[arg(long)]
    consumer: String,
    /// The stream's start (unix ms): offsets count from here, earlier comments are skipped.
    #[arg(long)]
    start: u64,
    /// Where the room files go.
    #[arg(long)]
    out: PathBuf,
    /// Exit after this many seconds without new entries (default: run until Ctrl-C).
    #[arg(long)]
    idle_exit: Option<u64>,
    /// Entries another consumer has held unacked this long (ms) are claimed.
    #[arg(long, default_value_t = 30_000)]
    claim_idle_ms: u64,
}

#[derive(Args, Debug, Clone)]
struct FilesArgs {
    /// The gateway's `data.dir/events`.
    #[arg(long, default_value = "data/events")]
    dir: PathBuf,
    /// The stream's start (unix ms): offsets count from here, earlier comments are skipped.
    #[arg(long)]
    start: u64,
    /// Where the room files go.
    #[arg(long)]
    out: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().mode {
        Mode::Files(args) => {
            let stats = run_files(&args)?;
            print!("{}", stats.summary());
        }
        Mode::Redis(args) => {
            let stop = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&stop);
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("replay: stopping after this batch");
                    flag.store(true, Ordering::SeqCst);
                }
            });
            let mut stats = Stats {
                redis: true,
                ..Stats::default()
            };
            let result = run_redis(&args, &stop, &mut stats).await;
            print!("{}", stats.summary());
            result?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Records and comments

/// One record of the stream, from a Redis entry or a line of the files.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    id: String,
    /// None: a moderation change with no room.
    room: Option<String>,
    kind: String,
    status: String,
    node: String,
    ts: u64,
    /// The event as clients see it (a moderation record: the change).
    event: Value,
}

/// A Redis entry's fields (`event` is a JSON string there; `room` "" is no room).
fn record_from_fields(fields: &HashMap<String, String>) -> Result<Record, String> {
    let get = |name: &str| fields.get(name).ok_or_else(|| format!("no `{name}` field"));
    let ts = get("ts")?;
    let event = get("event")?;
    Ok(Record {
        id: get("id")?.clone(),
        room: Some(get("room")?.clone()).filter(|r| !r.is_empty()),
        kind: get("type")?.clone(),
        status: get("status")?.clone(),
        node: fields.get("node").cloned().unwrap_or_default(),
        ts: ts
            .parse()
            .map_err(|_| format!("`ts` is not a number: {ts}"))?,
        event: serde_json::from_str(event).map_err(|e| format!("`event`: {e}"))?,
    })
}

/// A line of the files (one JSON object, `event` an object, `room` null for no room).
fn record_from_line(line: &str) -> Result<Record, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let text = |name: &str| {
        v.get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| format!("no string `{name}`"))
    };
    Ok(Record {
        id: text("id")?,
        room: v
            .get("room")
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty())
            .map(str::to_owned),
        kind: text("type")?,
        status: text("status")?,
        node: text("node").unwrap_or_default(),
        ts: v
            .get("ts")
            .and_then(Value::as_u64)
            .ok_or("no number `ts`")?,
        event: v.get("event").cloned().ok_or("no `event`")?,
    })
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct User {
    id: String,
    name: String,
}

/// A line of a room file.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Comment {
    offset_s: f64,
    id: String,
    user: User,
    text: String,
}

/// Seconds from `start` to `ts` (both unix ms), to the millisecond; None before `start`.
fn offset_s(ts: u64, start: u64) -> Option<f64> {
    ts.checked_sub(start).map(|ms| ms as f64 / 1000.0)
}

/// What a record is to the replay.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// A broadcast chat from `start` on: its room and the line.
    Comment(String, Comment),
    /// A broadcast chat before `start`.
    BeforeStart,
    /// Anything else (another type or status), or a chat not fit to write.
    Skip,
}

fn verdict(r: &Record, start: u64) -> Verdict {
    if r.kind != "chat" || r.status != "broadcast" {
        return Verdict::Skip;
    }
    let Some(room) = r.room.as_deref().filter(|r| room_ok(r)) else {
        return Verdict::Skip;
    };
    let Some(offset_s) = offset_s(r.ts, start) else {
        return Verdict::BeforeStart;
    };
    let text = |v: &Value, name: &str| v.get(name).and_then(Value::as_str).map(str::to_owned);
    let user = r.event.get("user").unwrap_or(&Value::Null);
    match (text(user, "id"), text(user, "name"), text(&r.event, "text")) {
        (Some(id), Some(name), Some(text)) => Verdict::Comment(
            room.to_owned(),
            Comment {
                offset_s,
                id: r.id.clone(),
                user: User { id, name },
                text,
            },
        ),
        _ => Verdict::Skip,
    }
}

/// A room id as the gateway allows them (`[A-Za-z0-9_.:-]`, 1-64): also what keeps
/// `OUT/<room>.jsonl` inside `OUT` whatever a record says.
fn room_ok(room: &str) -> bool {
    (1..=64).contains(&room.len())
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

// ---------------------------------------------------------------------------------------
// Output: the room files, written once per id

struct RoomFile {
    file: BufWriter<File>,
    dirty: bool,
}

struct Output {
    dir: PathBuf,
    /// Every comment id in the room files (read back at start).
    seen: HashSet<String>,
    open: HashMap<String, RoomFile>,
}

impl Output {
    /// Opens `dir` (created if missing) and reads back the ids already written there. A
    /// last line cut short by a crash is removed: it was never acked, so it comes again.
    fn open(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut seen = HashSet::new();
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "jsonl") {
                continue;
            }
            let mut data =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            if !data.is_empty() && !data.ends_with(b"\n") {
                let keep = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                data.truncate(keep);
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(keep as u64))
                    .with_context(|| format!("cutting the torn line of {}", path.display()))?;
            }
            for line in data.split(|&b| b == b'\n') {
                let id = serde_json::from_slice::<Value>(line)
                    .ok()
                    .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_owned));
                seen.extend(id);
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            seen,
            open: HashMap::new(),
        })
    }

    /// Appends `comment` to its room's file unless its id was written before (false).
    fn write(&mut self, room: &str, comment: &Comment) -> anyhow::Result<bool> {
        if self.seen.contains(&comment.id) {
            return Ok(false);
        }
        if !self.open.contains_key(room) {
            let path = self.dir.join(format!("{room}.jsonl"));
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            self.open.insert(
                room.to_owned(),
                RoomFile {
                    file: BufWriter::new(file),
                    dirty: false,
                },
            );
        }
        let f = self.open.get_mut(room).expect("opened above");
        serde_json::to_writer(&mut f.file, comment)?;
        f.file.write_all(b"\n")?;
        f.dirty = true;
        self.seen.insert(comment.id.clone());
        Ok(true)
    }

    /// Flushes and syncs what was written since the last commit: after it, acking the
    /// entries cannot lose a comment.
    fn commit(&mut self) -> anyhow::Result<()> {
        for (room, f) in &mut self.open {
            if f.dirty {
                f.file
                    .flush()
                    .with_context(|| format!("writing {room}.jsonl"))?;
                f.file
                    .get_ref()
                    .sync_data()
                    .with_context(|| format!("syncing {room}.jsonl"))?;
                f.dirty = false;
            }
        }
        if self.open.len() > MAX_OPEN {
            self.open.clear();
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The replay: records in, comments out, counted

#[derive(Debug, Default)]
struct Stats {
    records: u64,
    comments: u64,
    duplicates: u64,
    before_start: u64,
    malformed: u64,
    /// Records read per `status`.
    by_status: BTreeMap<String, u64>,
    /// Redis mode: the summary shows `claimed` and `acked` too.
    redis: bool,
    /// Redis: entries claimed from other consumers.
    claimed: u64,
    acked: u64,
}

impl Stats {
    fn summary(&self) -> String {
        let mut s = format!(
            "records read: {}\ncomments written: {}\nduplicates skipped: {}\n\
             before start: {}\nmalformed: {}\n",
            self.records, self.comments, self.duplicates, self.before_start, self.malformed
        );
        for (status, n) in &self.by_status {
            s.push_str(&format!("status {status}: {n}\n"));
        }
        if self.redis {
            s.push_str(&format!(
                "claimed: {}\nacked: {}\n",
                self.claimed, self.acked
            ));
        }
        s
    }
}

struct Replay<'a> {
    start: u64,
    out: Output,
    stats: &'a mut Stats,
}

impl Replay<'_> {
    /// Takes one record (or why it could not be read: counted, skipped).
    fn apply(&mut self, record: Result<Record, String>) -> anyhow::Result<()> {
        let r = match record {
            Ok(r) => r,
            Err(why) => {
                eprintln!("replay: skipping a malformed record: {why}");
                self.stats.malformed += 1;
                return Ok(());
            }
        };
        self.stats.records += 1;
        *self.stats.by_status.entry(r.status.clone()).or_default() += 1;
        match verdict(&r, self.start) {
            Verdict::Comment(room, c) => {
                if self.out.write(&room, &c)? {
                    self.stats.comments += 1;
                } else {
                    self.stats.duplicates += 1;
                }
            }
            Verdict::BeforeStart => self.stats.before_start += 1,
            Verdict::Skip => {}
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// files mode

/// `(date, continuation)` of `events-DATE.jsonl` (0) or `events-DATE.N.jsonl` (N).
fn file_order(name: &str) -> Option<(String, u32)> {
    let rest = name.strip_prefix("events-")?.strip_suffix(".jsonl")?;
    let (date, n) = match rest.split_once('.') {
        Some((date, n)) => (date, n.parse().ok()?),
        None => (rest, 0),
    };
    let ok = date.len() == 10
        && date.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    ok.then(|| (date.to_owned(), n))
}

/// The event files of `dir` in the order they were written: by date, then number.
fn event_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if let Some(order) = path
            .file_name()
            .and_then(|n| file_order(&n.to_string_lossy()))
        {
            files.push((order, path));
        }
    }
    files.sort();
    Ok(files.into_iter().map(|(_, p)| p).collect())
}

fn run_files(args: &FilesArgs) -> anyhow::Result<Stats> {
    let mut stats = Stats::default();
    let mut replay = Replay {
        start: args.start,
        out: Output::open(&args.out)?,
        stats: &mut stats,
    };
    for path in event_files(&args.dir)? {
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        for line in BufReader::new(file).lines() {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            replay.apply(record_from_line(&line))?;
        }
    }
    replay.out.commit()?;
    Ok(stats)
}

// ---------------------------------------------------------------------------------------
// redis mode

/// The keys to read: `--keys`, or the `--shards` keys, or the one key.
fn keys_of(args: &RedisArgs) -> Vec<String> {
    match args.shards {
        _ if !args.keys.is_empty() => args.keys.clone(),
        Some(n) if n > 1 => (0..n).map(|i| format!("{STREAM_KEY}:{i}")).collect(),
        _ => vec![STREAM_KEY.to_owned()],
    }
}

/// A stream entry: its id and fields (None: deleted from the stream since, e.g. trimmed).
#[derive(Debug, PartialEq)]
struct Entry {
    id: String,
    fields: Option<HashMap<String, String>>,
}

fn text_of(v: &redis::Value) -> Option<String> {
    match v {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        redis::Value::SimpleString(s) => Some(s.clone()),
        redis::Value::VerbatimString { text, .. } => Some(text.clone()),
        redis::Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

/// `[[id, [field, value, …] | nil], …]`.
fn entries_of(v: &redis::Value) -> Vec<Entry> {
    let redis::Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let redis::Value::Array(pair) = item else {
                return None;
            };
            let id = text_of(pair.first()?)?;
            let fields = match pair.get(1) {
                Some(redis::Value::Array(kv)) => Some(
                    kv.chunks(2)
                        .filter_map(|c| Some((text_of(c.first()?)?, text_of(c.get(1)?)?)))
                        .collect(),
                ),
                Some(redis::Value::Map(kv)) => Some(
                    kv.iter()
                        .filter_map(|(k, v)| Some((text_of(k)?, text_of(v)?)))
                        .collect(),
                ),
                _ => None,
            };
            Some(Entry { id, fields })
        })
        .collect()
}

/// An `XREADGROUP` reply: each key's entries (nil, after a timeout: none). RESP2 gives
/// `[[key, entries], …]`, RESP3 a map.
fn read_reply(v: &redis::Value) -> Vec<(String, Vec<Entry>)> {
    match v {
        redis::Value::Array(keys) => keys
            .iter()
            .filter_map(|k| match k {
                redis::Value::Array(pair) if pair.len() == 2 => {
                    Some((text_of(&pair[0])?, entries_of(&pair[1])))
                }
                _ => None,
            })
            .collect(),
        redis::Value::Map(keys) => keys
            .iter()
            .filter_map(|(k, e)| Some((text_of(k)?, entries_of(e))))
            .collect(),
        _ => Vec::new(),
    }
}

/// An `XAUTOCLAIM` reply: the next cursor and the claimed entries.
fn autoclaim_reply(v: &redis::Value) -> anyhow::Result<(String, Vec<Entry>)> {
    let redis::Value::Array(parts) = v else {
        anyhow::bail!("XAUTOCLAIM: unexpected reply {v:?}");
    };
    let cursor = parts
        .first()
        .and_then(text_of)
        .context("XAUTOCLAIM: no cursor")?;
    Ok((cursor, parts.get(1).map(entries_of).unwrap_or_default()))
}

struct Consumer<'a> {
    conn: redis::aio::ConnectionManager,
    args: &'a RedisArgs,
    keys: Vec<String>,
    replay: Replay<'a>,
}

impl Consumer<'_> {
    /// Writes what `entries` of `key` hold, syncs it, then acks them all (a malformed or
    /// deleted entry too: it would otherwise stay pending for ever).
    async fn handle(&mut self, key: &str, entries: &[Entry]) -> anyhow::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        for e in entries {
            if let Some(fields) = &e.fields {
                self.replay.apply(
                    record_from_fields(fields).map_err(|why| format!("entry {}: {why}", e.id)),
                )?;
            }
        }
        self.replay.out.commit()?;
        let mut ack = redis::cmd("XACK");
        ack.arg(key).arg(&self.args.group);
        for e in entries {
            ack.arg(&e.id);
        }
        let n: u64 = ack.query_async(&mut self.conn).await?;
        self.replay.stats.acked += n;
        Ok(())
    }

    /// Makes sure the group exists on every key.
    async fn create_groups(&mut self) -> anyhow::Result<()> {
        for key in &self.keys {
            let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(key)
                .arg(&self.args.group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut self.conn)
                .await;
            match created {
                Err(e) if e.code() != Some("BUSYGROUP") => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }

    /// Takes back this consumer's own unacked entries (an earlier run that stopped between
    /// reading and acking), then claims other consumers' entries idle past
    /// `--claim-idle-ms`. Returns how many entries came.
    async fn recover(&mut self) -> anyhow::Result<u64> {
        let mut got = 0;
        for key in self.keys.clone() {
            let mut from = "0".to_owned();
            loop {
                let v: redis::Value = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(&self.args.group)
                    .arg(&self.args.consumer)
                    .arg("COUNT")
                    .arg(COUNT)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(&from)
                    .query_async(&mut self.conn)
                    .await?;
                let entries: Vec<Entry> = read_reply(&v).into_iter().flat_map(|(_, e)| e).collect();
                let Some(last) = entries.last() else { break };
                from = last.id.clone();
                got += entries.len() as u64;
                self.handle(&key, &entries).await?;
            }
            let mut cursor = "0-0".to_owned();
            loop {
                let v: redis::Value = redis::cmd("XAUTOCLAIM")
                    .arg(&key)
                    .arg(&self.args.group)
                    .arg(&self.args.consumer)
                    .arg(self.args.claim_idle_ms)
                    .arg(&cursor)
                    .arg("COUNT")
                    .arg(COUNT)
                    .query_async(&mut self.conn)
                    .await?;
                let (next, entries) = autoclaim_reply(&v)?;
                got += entries.len() as u64;
                self.replay.stats.claimed += entries.len() as u64;
                self.handle(&key, &entries).await?;
                if next == "0-0" {
                    break;
                }
                cursor = next;
            }
        }
        Ok(got)
    }

    /// One blocking read of new entries, handled; how many came.
    async fn read_new(&mut self) -> anyhow::Result<u64> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.args.group)
            .arg(&self.args.consumer)
            .arg("COUNT")
            .arg(COUNT)
            .arg("BLOCK")
            .arg(BLOCK_MS)
            .arg("STREAMS")
            .arg(&self.keys);
        for _ in &self.keys {
            cmd.arg(">");
        }
        let v: redis::Value = cmd.query_async(&mut self.conn).await?;
        let mut got = 0;
        for (key, entries) in read_reply(&v) {
            got += entries.len() as u64;
            self.handle(&key, &entries).await?;
        }
        Ok(got)
    }

    /// Groups, recovery, then new entries until stopped or idle. A Redis error is
    /// reported and retried (the connection reconnects; recovery runs again, so entries
    /// read but not acked are taken back); a local write error ends the run unacked.
    async fn run(&mut self, stop: &AtomicBool) -> anyhow::Result<()> {
        let idle_exit = self.args.idle_exit.map(Duration::from_secs);
        let reclaim_every = Duration::from_millis(self.args.claim_idle_ms.max(1000));
        let mut last_new = Instant::now();
        let mut recovered: Option<Instant> = None;
        while !stop.load(Ordering::SeqCst) {
            if idle_exit.is_some_and(|d| last_new.elapsed() >= d) {
                break;
            }
            let step = async {
                if recovered.is_none_or(|t| t.elapsed() >= reclaim_every) {
                    self.create_groups().await?;
                    let got = self.recover().await?;
                    recovered = Some(Instant::now());
                    if got > 0 {
                        return Ok(got);
                    }
                }
                self.read_new().await
            };
            match step.await {
                Ok(0) => {}
                Ok(_) => last_new = Instant::now(),
                Err(e) if e.downcast_ref::<redis::RedisError>().is_some() => {
                    eprintln!("replay: redis: {e:#}; retrying in 1 s");
                    recovered = None;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

async fn run_redis(args: &RedisArgs, stop: &AtomicBool, stats: &mut Stats) -> anyhow::Result<()> {
    let client = redis::Client::open(args.url.as_str())?;
    // Each reply may take the whole BLOCK; the default response timeout is shorter.
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(Duration::from_millis(BLOCK_MS + 5000)));
    let conn = client
        .get_connection_manager_with_config(config)
        .await
        .with_context(|| format!("connecting to {}", args.url))?;
    let mut consumer = Consumer {
        conn,
        args,
        keys: keys_of(args),
        replay: Replay {
            start: args.start,
            out: Output::open(&args.out)?,
            stats,
        },
    };
    consumer.run(stop).await
}

// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn temp_dir(tag: &str) -> PathBuf {
        use std::sync::atomic::AtomicU64;
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "danmaku-replay-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn chat_line(id: &str, room: &str, status: &str, ts: u64, text: &str) -> String {
        json!({"id": id, "room": room, "type": "chat", "status": status, "node": "n1",
            "ts": ts, "event": {"id": id, "ts": ts, "type": "chat",
            "user": {"id": "u1", "name": "Ann"}, "text": text}})
        .to_string()
    }

    fn comment(offset_s: f64, id: &str, text: &str) -> Value {
        json!({"offset_s": offset_s, "id": id, "user": {"id": "u1", "name": "Ann"}, "text": text})
    }

    fn lines(path: &Path) -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn a_record_is_read_from_a_redis_entry() {
        // As the gateway XADDs them: every value a string, `event` a JSON string.
        let event = json!({"id": "n1-7", "ts": 1_700_000_001_234_u64, "type": "chat",
            "user": {"id": "u1", "name": "Ann"}, "text": "hi"})
        .to_string();
        let fields: HashMap<String, String> = [
            ("id", "n1-7"),
            ("room", "r1"),
            ("type", "chat"),
            ("status", "broadcast"),
            ("node", "n1"),
            ("ts", "1700000001234"),
            ("event", &event),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let r = record_from_fields(&fields).unwrap();
        assert_eq!(r.id, "n1-7");
        assert_eq!(r.room.as_deref(), Some("r1"));
        assert_eq!((r.kind.as_str(), r.status.as_str()), ("chat", "broadcast"));
        assert_eq!(r.ts, 1_700_000_001_234);
        assert_eq!(r.event["user"]["name"], "Ann");

        // A moderation change with no room: `room` is "" there.
        let mut m = fields.clone();
        m.insert("room".into(), String::new());
        m.insert("status".into(), "moderation".into());
        m.insert("event".into(), r#"{"user":"u9"}"#.into());
        assert_eq!(record_from_fields(&m).unwrap().room, None);

        for (field, bad) in [("ts", "soon"), ("event", "{not json")] {
            let mut b = fields.clone();
            b.insert(field.into(), bad.into());
            assert!(record_from_fields(&b).unwrap_err().contains(field));
        }
        let mut missing = fields.clone();
        missing.remove("id");
        assert!(record_from_fields(&missing).is_err());
    }

    #[test]
    fn a_record_is_read_from_a_json_line() {
        let r = record_from_line(&chat_line("n1-1", "r1", "sampled_out", 5, "x")).unwrap();
        assert_eq!(r.id, "n1-1");
        assert_eq!(r.status, "sampled_out");
        assert_eq!(r.node, "n1");
        assert_eq!(r.event["text"], "x");
        let ban = json!({"id": "n1-m1-0", "room": null, "type": "ban", "status": "moderation",
            "node": "n1", "ts": 9, "event": {"user": "u2"}});
        let m = record_from_line(&ban.to_string()).unwrap();
        assert_eq!((m.room, m.kind.as_str()), (None, "ban"));
        assert!(record_from_line("{\"id\":\"x\"").is_err());
        assert!(record_from_line(r#"{"id":"x","type":"chat","status":"broadcast"}"#).is_err());
    }

    #[test]
    fn offsets_are_seconds_from_the_start_to_the_millisecond() {
        assert_eq!(offset_s(1_000_001_234, 1_000_000_000), Some(1.234));
        assert_eq!(offset_s(1_000_000_000, 1_000_000_000), Some(0.0));
        assert_eq!(offset_s(1_000_000_001, 1_000_000_000), Some(0.001));
        assert_eq!(offset_s(1_003_600_000, 1_000_000_000), Some(3600.0));
        assert_eq!(offset_s(999_999_999, 1_000_000_000), None);
        // As written: three decimals at most.
        let c = Comment {
            offset_s: offset_s(1_700_000_012_345, 1_700_000_000_000).unwrap(),
            id: "a".into(),
            user: User {
                id: "u".into(),
                name: "U".into(),
            },
            text: "t".into(),
        };
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"offset_s":12.345,"id":"a","user":{"id":"u","name":"U"},"text":"t"}"#
        );
    }

    #[test]
    fn only_broadcast_chats_from_the_start_on_are_comments() {
        let r = |status: &str, ts: u64| record_from_line(&chat_line("i", "r1", status, ts, "t"));
        assert!(matches!(
            verdict(&r("broadcast", 2500).unwrap(), 1000),
            Verdict::Comment(room, c) if room == "r1" && c.offset_s == 1.5 && c.text == "t"
        ));
        assert_eq!(
            verdict(&r("broadcast", 999).unwrap(), 1000),
            Verdict::BeforeStart
        );
        for status in ["sampled_out", "filtered"] {
            assert_eq!(verdict(&r(status, 2000).unwrap(), 1000), Verdict::Skip);
        }
        // A room that could leave the output directory is never a file name.
        let evil = record_from_line(&chat_line("i", "../x", "broadcast", 2000, "t")).unwrap();
        assert_eq!(verdict(&evil, 1000), Verdict::Skip);
    }

    #[test]
    fn event_files_go_by_date_then_number() {
        assert_eq!(
            file_order("events-2026-12-06.jsonl"),
            Some(("2026-12-06".into(), 0))
        );
        assert_eq!(
            file_order("events-2026-12-06.12.jsonl"),
            Some(("2026-12-06".into(), 12))
        );
        for other in [
            "events-2026-12-06.x.jsonl",
            "events-2026-12-06.jsonl.tmp",
            "notes.jsonl",
            "events-26-12-06.jsonl",
        ] {
            assert_eq!(file_order(other), None, "{other}");
        }
        let dir = temp_dir("order");
        std::fs::create_dir_all(&dir).unwrap();
        for name in [
            "events-2026-12-07.jsonl",
            "events-2026-12-06.10.jsonl",
            "events-2026-12-06.2.jsonl",
            "events-2026-12-06.jsonl",
            "events-2026-12-06.1.jsonl",
            "README",
        ] {
            std::fs::write(dir.join(name), "").unwrap();
        }
        let names: Vec<String> = event_files(&dir)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "events-2026-12-06.jsonl",
                "events-2026-12-06.1.jsonl",
                "events-2026-12-06.2.jsonl",
                "events-2026-12-06.10.jsonl",
                "events-2026-12-07.jsonl",
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_comment_is_written_once_across_a_restart() {
        let dir = temp_dir("dedup");
        let c = |id: &str| Comment {
            offset_s: 1.0,
            id: id.into(),
            user: User {
                id: "u".into(),
                name: "U".into(),
            },
            text: "t".into(),
        };
        let mut out = Output::open(&dir).unwrap();
        assert!(out.write("r1", &c("a")).unwrap());
        assert!(!out.write("r1", &c("a")).unwrap());
        assert!(out.write("r2", &c("b")).unwrap());
        out.commit().unwrap();
        drop(out);
        // A crash mid-line leaves a torn tail: cut at open, its entry comes again.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.join("r1.jsonl"))
            .unwrap();
        f.write_all(br#"{"offset_s":2.0,"id":"c","us"#).unwrap();
        drop(f);

        let mut out = Output::open(&dir).unwrap();
        assert!(!out.write("r1", &c("a")).unwrap());
        assert!(
            !out.write("r7", &c("b")).unwrap(),
            "ids are per output, not per room"
        );
        assert!(out.write("r1", &c("c")).unwrap());
        out.commit().unwrap();
        let ids: Vec<Value> = lines(&dir.join("r1.jsonl"))
            .iter()
            .map(|l| l["id"].clone())
            .collect();
        assert_eq!(ids, [json!("a"), json!("c")]);
        assert!(!dir.join("r7.jsonl").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn redis_replies_are_read_into_entries() {
        use redis::Value as V;
        let s = |t: &str| V::BulkString(t.as_bytes().to_vec());
        let reply = V::Array(vec![V::Array(vec![
            s("danmaku:events"),
            V::Array(vec![
                V::Array(vec![
                    s("1-0"),
                    V::Array(vec![s("id"), s("a"), s("ts"), s("5")]),
                ]),
                V::Array(vec![s("2-0"), V::Nil]),
            ]),
        ])]);
        let keys = read_reply(&reply);
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].0, "danmaku:events");
        assert_eq!(keys[0].1[0].id, "1-0");
        let f = keys[0].1[0].fields.as_ref().unwrap();
        assert_eq!((f["id"].as_str(), f["ts"].as_str()), ("a", "5"));
        assert_eq!(
            keys[0].1[1].fields, None,
            "a deleted entry still gets acked"
        );
        assert!(read_reply(&V::Nil).is_empty());

        let claimed = V::Array(vec![
            s("0-0"),
            V::Array(vec![V::Array(vec![
                s("3-0"),
                V::Array(vec![s("id"), s("b")]),
            ])]),
            V::Array(vec![]),
        ]);
        let (cursor, entries) = autoclaim_reply(&claimed).unwrap();
        assert_eq!(cursor, "0-0");
        assert_eq!(entries[0].id, "3-0");
    }

    #[test]
    fn keys_come_from_keys_or_shards() {
        let args = |keys: &[&str], shards: Option<u32>| RedisArgs {
            url: String::new(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
            shards,
            group: "g".into(),
            consumer: "c".into(),
            start: 0,
            out: PathBuf::new(),
            idle_exit: None,
            claim_idle_ms: 0,
        };
        assert_eq!(keys_of(&args(&[], None)), ["danmaku:events"]);
        assert_eq!(keys_of(&args(&[], Some(1))), ["danmaku:events"]);
        assert_eq!(
            keys_of(&args(&[], Some(3))),
            ["danmaku:events:0", "danmaku:events:1", "danmaku:events:2"]
        );
        assert_eq!(keys_of(&args(&["a", "b"], None)), ["a", "b"]);
        let cli = Cli::try_parse_from([
            "replay",
            "redis",
            "--keys",
            "k1,k2",
            "--consumer",
            "c1",
            "--start",
            "5",
            "--out",
            "o",
        ])
        .unwrap();
        let Mode::Redis(a) = cli.mode else { panic!() };
        assert_eq!(keys_of(&a), ["k1", "k2"]);
        assert!(
            Cli::try_parse_from([
                "replay",
                "redis",
                "--keys",
                "k",
                "--shards",
                "2",
                "--consumer",
                "c",
                "--start",
                "0",
                "--out",
                "o",
            ])
            .is_err()
        );
    }

    #[test]
    fn files_mode_end_to_end() {
        let events = temp_dir("events");
        let out = temp_dir("out");
        std::fs::create_dir_all(&events).unwrap();
        let start = 1_767_225_600_000; // 2026-01-01T00:00:00Z
        let day1 = [
            chat_line("n1-1", "r1", "broadcast", start - 500, "too early"),
            chat_line("n1-2", "r1", "broadcast", start + 1_500, "first"),
            chat_line("n1-3", "r2", "broadcast", start + 2_001, "other room"),
        ];
        let day1_more = [
            chat_line("n1-4", "r1", "sampled_out", start + 3_000, "sampled"),
            // Delivered twice (a retried batch).
            chat_line("n1-2", "r1", "broadcast", start + 1_500, "first"),
            json!({"id": "n1-m1-0", "room": "r1", "type": "mute", "status": "moderation",
                "node": "n1", "ts": start + 4_000, "event": {"user": "u2"}})
            .to_string(),
            "{\"id\":\"torn".to_owned(),
        ];
        let day2 = [chat_line(
            "n1-5",
            "r1",
            "broadcast",
            start + 86_400_000,
            "day two",
        )];
        std::fs::write(
            events.join("events-2026-01-01.jsonl"),
            day1.join("\n") + "\n",
        )
        .unwrap();
        std::fs::write(
            events.join("events-2026-01-01.1.jsonl"),
            day1_more.join("\n") + "\n",
        )
        .unwrap();
        std::fs::write(
            events.join("events-2026-01-02.jsonl"),
            day2.join("\n") + "\n",
        )
        .unwrap();

        let args = FilesArgs {
            dir: events.clone(),
            start,
            out: out.clone(),
        };
        let stats = run_files(&args).unwrap();
        assert_eq!(stats.records, 7);
        assert_eq!(stats.comments, 3);
        assert_eq!(stats.duplicates, 1);
        assert_eq!(stats.before_start, 1);
        assert_eq!(stats.malformed, 1);
        assert_eq!(stats.by_status["broadcast"], 5);
        assert_eq!(stats.by_status["sampled_out"], 1);
        assert_eq!(stats.by_status["moderation"], 1);
        assert!(stats.summary().contains("comments written: 3\n"));

        assert_eq!(
            lines(&out.join("r1.jsonl")),
            [
                comment(1.5, "n1-2", "first"),
                comment(86400.0, "n1-5", "day two"),
            ]
        );
        assert_eq!(
            lines(&out.join("r2.jsonl")),
            [comment(2.001, "n1-3", "other room"),]
        );

        // Run again over the same files: everything is a duplicate now.
        let again = run_files(&args).unwrap();
        assert_eq!((again.comments, again.duplicates), (0, 4));
        assert_eq!(lines(&out.join("r1.jsonl")).len(), 2);
        std::fs::remove_dir_all(&events).unwrap();
        std::fs::remove_dir_all(&out).unwrap();
    }
}
