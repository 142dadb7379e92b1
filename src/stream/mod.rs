//! The event stream for the backend (PROTOCOL.md v1.1, *Event stream for the backend*):
//! every room event this node accepted, with what became of it (`broadcast`,
//! `sampled_out`, `filtered`), and every moderation change made through this node, as
//! records for the platform's own consumers (replay, review, analytics, billing).
//!
//! Shape (why it is so):
//! - **Never in the way.** Producers (a room's flusher once per window, a session for a
//!   filtered chat, the hub for sampled-out chat, moderation for a change) push into one
//!   bounded [`RecordQueue`] under a short lock and wake the writer once per push; beyond
//!   `stream.queue` records they drop and count. Nothing on the broadcast path waits on
//!   Redis or the disk.
//! - **Once per cluster.** Only the node that accepted an event records it (events that
//!   arrive from other nodes are theirs to record).
//! - **One writer task** takes what is queued in batches and hands them to the sink:
//!   Redis Streams with the Redis backplane ([`redis::RedisSink`], one pipeline per
//!   batch), daily JSON-lines files on a single node ([`file::FileSink`]). A failed
//!   batch is kept and retried with backoff (at least once: consumers deduplicate by
//!   `id`), while new records queue up to the bound.
//! - **Drain.** On shutdown the writer writes what is queued (bounded by a deadline) and
//!   syncs the file.

pub mod file;
pub mod redis;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics as names;
use crate::protocol::{Event, RoomId, now_ms};

/// Records written per sink call.
const BATCH: usize = 4096;
/// How long a drain keeps writing what is queued before it gives up (counted dropped).
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// What became of an event (`status` of a record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Sent to the room's members.
    Broadcast,
    /// Accepted (acked) but left out of the broadcast by a room budget or a full window.
    SampledOut,
    /// A chat refused by a block-list word.
    Filtered,
    /// A moderation change.
    Moderation,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Broadcast => "broadcast",
            Status::SampledOut => "sampled_out",
            Status::Filtered => "filtered",
            Status::Moderation => "moderation",
        }
    }

    pub const ALL: [Status; 4] = [
        Status::Broadcast,
        Status::SampledOut,
        Status::Filtered,
        Status::Moderation,
    ];
}

/// A record's payload: an event as clients see it, or a moderation change.
#[derive(Debug, Clone)]
pub enum Payload {
    Event(Arc<Event>),
    /// The change as the moderation API takes it (JSON), and its action (`type`).
    Change {
        id: String,
        kind: &'static str,
        change: serde_json::Value,
    },
}

/// One record of the stream.
#[derive(Debug, Clone)]
pub struct Record {
    pub room: Option<RoomId>,
    pub status: Status,
    pub payload: Payload,
    /// When it was queued (unix ms), for the lag metric.
    pub queued_ms: u64,
}

impl Record {
    pub fn id(&self) -> &str {
        match &self.payload {
            Payload::Event(e) => &e.id,
            Payload::Change { id, .. } => id,
        }
    }

    pub fn kind(&self) -> &'static str {
        match &self.payload {
            Payload::Event(e) => e.body.kind(),
            Payload::Change { kind, .. } => kind,
        }
    }

    /// The event's time, or for a change when it was made.
    pub fn ts(&self) -> u64 {
        match &self.payload {
            Payload::Event(e) => e.ts,
            Payload::Change { .. } => self.queued_ms,
        }
    }

    /// The `event` field: the event as clients see it, or the change, as JSON.
    pub fn event_json(&self) -> String {
        match &self.payload {
            Payload::Event(e) => serde_json::to_string(&**e),
            Payload::Change { change, .. } => serde_json::to_string(change),
        }
        .unwrap_or_else(|_| "null".into())
    }

    /// The whole record as one JSON object (a line of the files).
    pub fn to_json(&self, node: &str) -> String {
        #[derive(Serialize)]
        struct Head<'a> {
            id: &'a str,
            room: Option<&'a str>,
            #[serde(rename = "type")]
            kind: &'a str,
            status: Status,
            node: &'a str,
            ts: u64,
        }
        let mut line = serde_json::to_string(&Head {
            id: self.id(),
            room: self.room.as_ref().map(RoomId::as_str),
            kind: self.kind(),
            status: self.status,
            node,
            ts: self.ts(),
        })
        .unwrap_or_else(|_| "{}".into());
        // The event is already JSON: spliced in rather than parsed back into a value.
        line.pop();
        line.push_str(",\"event\":");
        line.push_str(&self.event_json());
        line.push('}');
        line
    }
}

/// The bounded queue between producers and the writer.
pub struct RecordQueue {
    records: Mutex<VecDeque<Record>>,
    wake: Notify,
    cap: usize,
}

impl RecordQueue {
    fn new(cap: usize) -> Self {
        Self {
            records: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            cap,
        }
    }

    /// Queues what fits, drops (and counts) the rest; wakes the writer once.
    fn push(&self, records: impl IntoIterator<Item = Record>) {
        let mut dropped = 0u64;
        let mut queued = 0u64;
        {
            let mut q = self.records.lock().expect("stream queue lock");
            for r in records {
                if q.len() >= self.cap {
                    dropped += 1;
                } else {
                    q.push_back(r);
                    queued += 1;
                }
            }
        }
        if dropped > 0 {
            ::metrics::counter!(names::STREAM_DROPPED).increment(dropped);
        }
        if queued > 0 {
            self.wake.notify_one();
        }
    }

    /// Takes up to `n` records, oldest first.
    fn take(&self, n: usize, into: &mut Vec<Record>) {
        let mut q = self.records.lock().expect("stream queue lock");
        let n = n.min(q.len());
        into.extend(q.drain(..n));
        ::metrics::gauge!(names::STREAM_QUEUED).set(q.len() as f64);
    }

    fn len(&self) -> usize {
        self.records.lock().expect("stream queue lock").len()
    }
}

/// Where records are written.
#[async_trait::async_trait]
pub trait Sink: Send {
    /// Writes `records` (all, or an error and none counted written; a retry may write
    /// some twice).
    async fn write(&mut self, records: &[Record]) -> Result<(), StreamError>;
    /// Makes what was written durable (files: fsync); called on drain.
    async fn sync(&mut self) -> Result<(), StreamError>;
    fn kind(&self) -> &'static str;
}

/// What a sink reports.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("event stream file {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("event stream: redis is down")]
    RedisDown,
    #[error("event stream: redis: {0}")]
    Redis(#[from] ::redis::RedisError),
}

/// The handle producers hold. Disabled: every call is a no-op.
pub struct EventStream {
    queue: Option<Arc<RecordQueue>>,
    node: Arc<str>,
    /// Numbers moderation records: `{node}-m{start}-{n}`.
    seq: AtomicU64,
    started: u64,
}

impl EventStream {
    /// A stream that records nothing (`stream.enabled = false`).
    pub fn disabled(node: Arc<str>) -> Arc<Self> {
        Arc::new(Self {
            queue: None,
            node,
            seq: AtomicU64::new(0),
            started: now_ms(),
        })
    }

    /// Starts the writer on `sink`; it drains and stops when `cancel` fires.
    pub fn start(
        node: Arc<str>,
        queue: usize,
        sink: Box<dyn Sink>,
        cancel: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Arc<Self> {
        let q = Arc::new(RecordQueue::new(queue));
        tracker.spawn(writer(Arc::clone(&q), sink, cancel.clone()));
        Arc::new(Self {
            queue: Some(q),
            node,
            seq: AtomicU64::new(0),
            started: now_ms(),
        })
    }

    pub fn enabled(&self) -> bool {
        self.queue.is_some()
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Records a window's events of `room` with `status` (one push per window).
    pub fn events<'a>(
        &self,
        room: &RoomId,
        status: Status,
        events: impl IntoIterator<Item = &'a Arc<Event>>,
    ) {
        let Some(q) = &self.queue else { return };
        let now = now_ms();
        q.push(events.into_iter().map(|e| Record {
            room: Some(room.clone()),
            status,
            payload: Payload::Event(Arc::clone(e)),
            queued_ms: now,
        }));
    }

    /// Records one event that was not broadcast.
    pub fn event(&self, room: &RoomId, status: Status, event: Event) {
        self.events(room, status, [&Arc::new(event)]);
    }

    /// Records a moderation change (`kind`: its action; `room` where it has one).
    pub fn change(&self, room: Option<&RoomId>, kind: &'static str, change: serde_json::Value) {
        let Some(q) = &self.queue else { return };
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-m{:x}-{n}", self.node, self.started);
        q.push([Record {
            room: room.cloned(),
            status: Status::Moderation,
            payload: Payload::Change { id, kind, change },
            queued_ms: now_ms(),
        }]);
    }

    /// Records waiting for the writer.
    pub fn queued(&self) -> usize {
        self.queue.as_ref().map_or(0, |q| q.len())
    }
}

async fn writer(queue: Arc<RecordQueue>, mut sink: Box<dyn Sink>, cancel: CancellationToken) {
    let mut batch: Vec<Record> = Vec::with_capacity(BATCH);
    let mut attempt = 0u32;
    loop {
        if batch.is_empty() {
            queue.take(BATCH, &mut batch);
        }
        if batch.is_empty() {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = queue.wake.notified() => continue,
            }
        }
        match sink.write(&batch).await {
            Ok(()) => {
                attempt = 0;
                written(&batch);
                batch.clear();
            }
            Err(e) => {
                if attempt == 0 {
                    tracing::warn!(error = %e, sink = sink.kind(), "event stream write failed; retrying");
                }
                ::metrics::counter!(names::STREAM_ERRORS).increment(1);
                lag(batch[0].queued_ms);
                let wait = crate::redis_link::backoff(attempt);
                attempt = attempt.saturating_add(1);
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    // Drain: what is queued (and a batch that failed) gets one more chance, bounded.
    let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
    loop {
        if batch.is_empty() {
            queue.take(BATCH, &mut batch);
        }
        if batch.is_empty() {
            break;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, sink.write(&batch)).await {
            Ok(Ok(())) => {
                written(&batch);
                batch.clear();
            }
            _ => {
                let lost = batch.len() + queue.len();
                tracing::warn!(lost, "event stream: records not written at drain");
                ::metrics::counter!(names::STREAM_DROPPED).increment(lost as u64);
                break;
            }
        }
    }
    if let Err(e) = sink.sync().await {
        tracing::warn!(error = %e, "event stream: sync at drain failed");
    }
}

fn written(batch: &[Record]) {
    for status in Status::ALL {
        let n = batch.iter().filter(|r| r.status == status).count();
        if n > 0 {
            ::metrics::counter!(names::STREAM_RECORDS, "status" => status.as_str())
                .increment(n as u64);
        }
    }
    lag(batch.last().map_or(now_ms(), |r| r.queued_ms));
}

/// How far behind the writer is: the age of the oldest record it has not yet written.
fn lag(oldest_ms: u64) {
    ::metrics::gauge!(names::STREAM_LAG).set(now_ms().saturating_sub(oldest_ms) as f64 / 1000.0);
}

/// The stream key of `room` among `shards` (a hash every node computes alike).
pub fn shard_of(room: &str, shards: u32) -> u32 {
    // FNV-1a: stable across processes and builds, unlike the std hasher.
    let mut h: u32 = 0x811c_9dc5;
    for b in room.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % shards.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{EventBody, User};

    fn chat(id: &str) -> Arc<Event> {
        Arc::new(Event {
            id: id.into(),
            ts: 5,
            body: EventBody::Chat {
                user: User {
                    id: "u".into(),
                    name: "U".into(),
                },
                text: "hi \"there\"".into(),
            },
        })
    }

    #[test]
    fn a_record_is_one_json_object_with_the_event_as_clients_see_it() {
        let r = Record {
            room: Some(RoomId::parse("r1").unwrap()),
            status: Status::SampledOut,
            payload: Payload::Event(chat("n-1")),
            queued_ms: 9,
        };
        let v: serde_json::Value = serde_json::from_str(&r.to_json("node-a")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id":"n-1","room":"r1","type":"chat","status":"sampled_out",
                "node":"node-a","ts":5,
                "event":{"id":"n-1","ts":5,"type":"chat","user":{"id":"u","name":"U"},"text":"hi \"there\""}})
        );
    }

    #[test]
    fn the_queue_keeps_its_bound_and_counts_the_rest() {
        let q = RecordQueue::new(2);
        let rec = |id: &str| Record {
            room: None,
            status: Status::Broadcast,
            payload: Payload::Event(chat(id)),
            queued_ms: 0,
        };
        q.push([rec("a"), rec("b"), rec("c")]);
        let mut out = Vec::new();
        q.take(10, &mut out);
        assert_eq!(out.iter().map(Record::id).collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn rooms_spread_over_shards_alike_everywhere() {
        assert_eq!(shard_of("room-1", 1), 0);
        let spread: std::collections::HashSet<u32> = (0..100)
            .map(|i| shard_of(&format!("room-{i}"), 4))
            .collect();
        assert_eq!(spread.len(), 4);
        // Fixed values: every node and every build agrees.
        assert_eq!(shard_of("a", 1024), shard_of("a", 1024));
        assert_eq!(shard_of("", 7), 0x811c_9dc5 % 7);
    }
}
