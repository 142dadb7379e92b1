//! The Redis backplane: room channels over pub/sub (sharded pub/sub on a cluster),
//! MessagePack envelopes, and cluster-wide presence in Redis hashes.
//!
//! Three tasks, each with one job:
//! - the **publisher** drains a bounded queue of envelopes (one per room per window)
//!   and sends them in pipelines on the shared command connection; while Redis is
//!   down the queue fills and further envelopes are dropped and counted, and envelopes
//!   queued more than [`STALE_AFTER`] ago are dropped (counted) rather than sent: after
//!   an outage a viewer wants the room as it is now, not a minute-old replay;
//! - the **subscriber** owns a separate RESP3 connection whose pushes land in a bounded
//!   channel; it SUBSCRIBEs a room's channel when the room gets its first local member
//!   and UNSUBSCRIBEs when it loses its last (re-reading the hub, so racing hints
//!   cannot leave it wrong), drops its own node's envelopes, injects the rest into the
//!   hub, and after a disconnect reconnects with jittered backoff and re-subscribes
//!   every room it holds. An unsubscribe it did not ask for (a cluster moving a slot
//!   sends SUNSUBSCRIBE for the slot's shard channels) is answered by subscribing again
//!   where the channel lives now;
//! - each envelope is sent by one Lua call that appends the window's events to the
//!   room's **cluster log** and publishes the envelope, atomically (see "The cluster
//!   log" below): one command per room per window per node, never one per message;
//! - the **presence** task writes this node's per-room counts to
//!   `danmaku:presence:{room}` (a hash, field = incarnation) and a heartbeat to the
//!   `danmaku:nodes` sorted set, then sums the other live nodes' counts; a node whose
//!   heartbeat is older than `presence.node_ttl_s` no longer counts, its fields are
//!   deleted, and when this node itself has not synced for that long it forgets the
//!   other nodes' counts (it can no longer tell who is alive).
//!
//! ## The cluster log
//! A room's log is a list (`danmaku:log:{danmaku:room:R}`) of entries
//! `"<seq> <origin> <seen> <id> <event>"`, numbered by a counter beside it
//! (`danmaku:logseq:...`), with an index from event id to number (`danmaku:logidx:...`);
//! the hash tag keeps all three in the slot of the room's channel. The append script
//! numbers the window's events, appends them, trims the log to
//! `max(room.history_len, room.recovery_len)` entries (dropping their index fields),
//! sets every key to expire `room.idle_ttl_s` after the room's last event, and publishes
//! the envelope prefixed with its first number, all in one step: so every node receives
//! the other nodes' events in log order. A node's own events carry `seen`, the number of
//! the last event from another node it had taken into the room before each of them;
//! [`super::ClusterRecovery`] says why that is what recovery needs. The first viewer of
//! a room on a node reads the log's tail for `joined.history`.
//!
//! Windows this node could not log (queue full, Redis down, sent too late) leave a hole
//! the log cannot show: the room is noted, and a **gap entry** (`origin` `!`) is
//! appended as soon as Redis takes it (before the room's next window), so no recovery
//! across it claims `true`. A `join` with `since` is answered by a script that finds
//! the event by the index and returns the log from its `seen` on; it goes through the
//! publisher's ordered queue, so this node's own earlier windows are in the log first.
//!
//! Presence is keyed by *incarnation* (`{node}#{start ms}.{random}`), not by node id:
//! with a fixed `server.node_id`, a node that crashes and restarts is live again under
//! the same id, and fields written by its previous life (for rooms it no longer holds)
//! would otherwise be summed for ever. Of the live incarnations of one node id only the
//! newest counts; older ones stop heartbeating and are deleted after the TTL.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use redis::{PushInfo, PushKind, Value};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Backplane, ClusterRecovery, DROPPED, ERRORS, LAG, PUBLISHED, RECEIVED, SUBSCRIPTIONS};
use crate::config::{PresenceConfig, RedisConfig};
use crate::hub::Hub;
use crate::protocol::{Event, RoomId, now_ms};
use crate::redis_link::{self, Conn, RECONNECTS, RedisLink};

/// Pub/sub pushes buffered between the connection and the subscriber task.
const INBOX: usize = 16_384;
/// Envelopes sent per pipeline round trip.
const PIPELINE: usize = 256;
/// How long a `join` with `since` waits for the cluster log's answer before it answers
/// `recovered: false`.
const RECOVER_WAIT: Duration = Duration::from_secs(2);
/// A full re-check of subscriptions against the hub, in case a hint was lost.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);
/// Envelopes queued longer ago than this are dropped instead of published: live chat
/// minutes late (replayed after an outage) is worse than chat missed.
pub const STALE_AFTER: Duration = Duration::from_secs(5);
/// Bound on the dead incarnations' presence fields deleted per sync, so a node coming
/// back to a Redis full of leftovers does not stall its sync; the rest go next time.
const STALE_FIELDS_PER_SYNC: usize = 512;
/// Separates the node id from the incarnation suffix in presence fields and heartbeats.
const INCARNATION_SEP: char = '#';

pub const NODES_KEY: &str = "danmaku:nodes";
const CHANNEL_PREFIX: &str = "danmaku:room:";

pub fn channel(room: &RoomId) -> String {
    format!("{CHANNEL_PREFIX}{room}")
}

/// The room's cluster log (a list); hash-tagged to its channel's slot.
pub fn log_key(room: &RoomId) -> String {
    format!("danmaku:log:{{{}}}", channel(room))
}

fn log_seq_key(room: &RoomId) -> String {
    format!("danmaku:logseq:{{{}}}", channel(room))
}

fn log_index_key(room: &RoomId) -> String {
    format!("danmaku:logidx:{{{}}}", channel(room))
}

/// `origin` of a gap entry: not a valid node id.
const GAP_ORIGIN: &str = "!";

/// Appends a window to a room's cluster log and publishes its envelope, in one step.
/// KEYS: log, counter, index. ARGV: channel, publish command, envelope (empty: publish
/// nothing), log cap, ttl ms, origin, gap flag (`1`: a gap entry first), then per event
/// its id, `seen` and encoding. Returns the first event's number.
const LOG_APPEND: &str = r"
local n = (#ARGV - 7) / 3
local gap = ARGV[7] == '1'
local total = n
if gap then total = total + 1 end
if total == 0 then return 0 end
local seq = redis.call('INCRBY', KEYS[2], total) - total + 1
if gap then
  redis.call('RPUSH', KEYS[1], seq .. ' ! 0 ! ')
  seq = seq + 1
end
local first = seq
for i = 0, n - 1 do
  local id = ARGV[8 + 3 * i]
  redis.call('RPUSH', KEYS[1], seq .. ' ' .. ARGV[6] .. ' ' .. ARGV[9 + 3 * i] .. ' ' .. id .. ' ' .. ARGV[10 + 3 * i])
  redis.call('HSET', KEYS[3], id, seq)
  seq = seq + 1
end
local excess = redis.call('LLEN', KEYS[1]) - tonumber(ARGV[4])
if excess > 0 then
  for _, e in ipairs(redis.call('LRANGE', KEYS[1], 0, excess - 1)) do
    local id = string.match(e, '^%d+ %S+ %d+ (%S+) ')
    if id and id ~= '!' then redis.call('HDEL', KEYS[3], id) end
  end
  redis.call('LTRIM', KEYS[1], excess, -1)
end
for k = 1, 3 do redis.call('PEXPIRE', KEYS[k], ARGV[5]) end
if n > 0 and ARGV[3] ~= '' then
  redis.call(ARGV[2], ARGV[1], first .. ' ' .. ARGV[3])
end
return first
";

/// Finds the event ARGV[1] in a room's log (KEYS: log, index) and returns
/// `{1, its number, its origin, its seen, the log from seen + 1 on}`, or `{0}` when it
/// is not there or the log no longer reaches back to its `seen`.
const LOG_RECOVER: &str = r"
local s = redis.call('HGET', KEYS[2], ARGV[1])
if not s then return {0} end
s = tonumber(s)
local head = redis.call('LINDEX', KEYS[1], 0)
if not head then return {0} end
local first = tonumber(string.match(head, '^(%d+) '))
local x = redis.call('LINDEX', KEYS[1], s - first)
if not x then return {0} end
local xseq, xorigin, xseen = string.match(x, '^(%d+) (%S+) (%d+) ')
if tonumber(xseq) ~= s then return {0} end
xseen = tonumber(xseen)
local from = s
if xseen < s then from = xseen + 1 end
if from < first then return {0} end
return {1, s, xorigin, xseen, redis.call('LRANGE', KEYS[1], from - first, -1)}
";

/// Reads [`LOG_RECOVER`]'s reply.
fn parse_recover_reply(v: Value) -> ClusterRecovery {
    let Value::Array(parts) = v else {
        return ClusterRecovery::default();
    };
    let mut parts = parts.into_iter();
    let found: i64 = parts
        .next()
        .and_then(|v| redis::from_redis_value(v).ok())
        .unwrap_or(0);
    if found != 1 {
        return ClusterRecovery::default();
    }
    let (Some(s), Some(origin), Some(_seen), Some(entries)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return ClusterRecovery::default();
    };
    let (Ok(s), Ok(origin), Ok(entries)) = (
        redis::from_redis_value::<u64>(s),
        redis::from_redis_value::<String>(origin),
        redis::from_redis_value::<Vec<Vec<u8>>>(entries),
    ) else {
        return ClusterRecovery::default();
    };
    recovery_from_log(s, &origin, &entries)
}

/// One parsed cluster log entry.
#[derive(Debug, PartialEq)]
struct LogEntry<'a> {
    seq: u64,
    origin: &'a str,
    seen: u64,
    id: &'a str,
    event: &'a [u8],
}

impl LogEntry<'_> {
    fn is_gap(&self) -> bool {
        self.origin == GAP_ORIGIN
    }
}

/// Splits `"<seq> <origin> <seen> <id> <event>"`.
fn parse_entry(raw: &[u8]) -> Option<LogEntry<'_>> {
    let mut rest = raw;
    let mut field = || {
        let i = rest.iter().position(|b| *b == b' ')?;
        let f = std::str::from_utf8(&rest[..i]).ok()?;
        rest = &rest[i + 1..];
        Some(f)
    };
    let seq = field()?.parse().ok()?;
    let origin = field()?;
    let seen = field()?.parse().ok()?;
    let id = field()?;
    Some(LogEntry {
        seq,
        origin,
        seen,
        id,
        event: rest,
    })
}

/// The events of log `entries` (from `seen(X) + 1` on) that a client whose last event
/// was X (number `s`, from `origin`, with `seen`) may have missed: those after X, and
/// those of other origins before it (X's node delivered them after X). Recalled events
/// are taken out. Not recovered when an entry is unreadable or a gap lies in the range.
fn recovery_from_log(s: u64, origin: &str, raw: &[Vec<u8>]) -> ClusterRecovery {
    let not = ClusterRecovery::default();
    let mut events = Vec::new();
    let mut logged = Vec::new();
    for raw in raw {
        let Some(entry) = parse_entry(raw) else {
            return not;
        };
        if entry.is_gap() {
            return not;
        }
        if entry.seq == s || (entry.seq < s && entry.origin == origin) {
            continue;
        }
        match rmp_serde::from_slice::<Event>(entry.event) {
            Ok(e) => {
                events.push(e);
                logged.push((entry.seq, entry.origin.to_owned()));
            }
            Err(_) => return not,
        }
    }
    let recalled: HashSet<String> = events
        .iter()
        .filter_map(|e| match &e.body {
            crate::protocol::EventBody::Recall { target } => Some(target.clone()),
            _ => None,
        })
        .collect();
    let keep: Vec<bool> = events.iter().map(|e| !recalled.contains(&e.id)).collect();
    let mut k = keep.iter();
    events.retain(|_| *k.next().expect("one flag per event"));
    let mut k = keep.iter();
    logged.retain(|_| *k.next().expect("one flag per event"));
    ClusterRecovery {
        events,
        logged,
        recovered: true,
    }
}

pub fn presence_key(room: &RoomId) -> String {
    format!("danmaku:presence:{room}")
}

/// What travels between nodes: one window of one room's events from one node.
#[derive(Serialize, Deserialize)]
struct Envelope<'a> {
    /// Origin node: a node ignores its own envelopes.
    #[serde(borrow)]
    origin: &'a str,
    room: &'a str,
    /// Unix ms at publish, for the lag metric.
    ts: u64,
    events: Vec<Event>,
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    origin: &'a str,
    room: &'a str,
    ts: u64,
    events: &'a [Arc<Event>],
}

/// What the publisher sends, in order.
enum Outgoing {
    /// One window of one room: logged and published by [`LOG_APPEND`].
    Window {
        room: RoomId,
        envelope: Bytes,
        /// Per event: id, `seen`, encoding.
        events: Vec<(String, u64, Vec<u8>)>,
        queued: Instant,
    },
    /// A `join` with `since`: answered by [`LOG_RECOVER`] after the windows before it.
    Recover {
        room: RoomId,
        since: String,
        reply: tokio::sync::oneshot::Sender<Option<Value>>,
    },
}

/// This process's name in presence: the node id, its start time and a random part, so
/// a restarted node (same id) is told apart from its previous life.
fn incarnation(node: &str) -> String {
    format!(
        "{node}{INCARNATION_SEP}{}.{:08x}",
        now_ms(),
        rand::random::<u32>()
    )
}

/// The node id and start time (unix ms) of a presence field or heartbeat member. A
/// plain node id (written by a gateway before incarnations) starts at 0.
fn parse_incarnation(member: &str) -> (&str, u64) {
    member
        .rsplit_once(INCARNATION_SEP)
        .and_then(|(node, rest)| {
            let (started, _) = rest.split_once('.')?;
            Some((node, started.parse().ok()?))
        })
        .unwrap_or((member, 0))
}

/// The incarnations whose heartbeat is younger than the node TTL.
struct Live {
    members: HashSet<String>,
    /// Per node id, the start time of its newest live incarnation: the only one that
    /// counts (an older one is a previous life that has not timed out yet).
    newest: HashMap<String, u64>,
}

impl Live {
    fn new(members: Vec<String>) -> Self {
        let mut newest: HashMap<String, u64> = HashMap::new();
        for m in &members {
            let (node, started) = parse_incarnation(m);
            let e = newest.entry(node.to_string()).or_insert(started);
            *e = (*e).max(started);
        }
        Self {
            members: members.into_iter().collect(),
            newest,
        }
    }

    /// Distinct live node ids.
    fn nodes(&self) -> usize {
        self.newest.len()
    }

    fn is_live(&self, field: &str) -> bool {
        self.members.contains(field)
    }

    /// Members on nodes other than `me`, from a room's presence hash.
    fn others(&self, fields: &HashMap<String, u64>, me: &str) -> u64 {
        fields
            .iter()
            .filter(|(field, _)| {
                let (node, started) = parse_incarnation(field);
                node != me && self.is_live(field) && self.newest.get(node) == Some(&started)
            })
            .map(|(_, n)| *n)
            .sum()
    }
}

/// What the presence task carries from one sync to the next.
#[derive(Default)]
struct PresenceState {
    /// Rooms whose field we wrote and have not yet deleted (successfully).
    reported: HashSet<RoomId>,
    /// Fields (presence key, field) of incarnations that were not live at the last
    /// sync: deleted at the next one if still not live. Deciding on a heartbeat read
    /// *after* the hash read means a node that started in between is never mistaken
    /// for a dead one.
    stale: HashMap<String, Vec<String>>,
}

pub struct RedisBackplane {
    node: Arc<str>,
    /// This process's presence field and heartbeat member (see [`incarnation`]).
    incarnation: String,
    cfg: RedisConfig,
    presence_cfg: PresenceConfig,
    link: Arc<RedisLink>,
    outbox: flume::Sender<Outgoing>,
    outbox_rx: flume::Receiver<Outgoing>,
    /// Rooms whose subscription should be reconciled, with whom to tell once it is.
    interest: flume::Sender<(RoomId, Option<oneshot::Sender<()>>)>,
    interest_rx: flume::Receiver<(RoomId, Option<oneshot::Sender<()>>)>,
    /// Members on other live nodes per room, refreshed by the presence task.
    remote: DashMap<RoomId, u64>,
    subscribed_up: AtomicBool,
    /// Live nodes (this one included) at the last presence sync.
    live_nodes: AtomicUsize,
    /// Entries per room kept in the cluster log (`max(history_len, recovery_len)`).
    log_len: usize,
    /// `room.recovery_len > 0`: a `since` may be answered from the log.
    recovery: bool,
    /// How long a room's log outlives its last event (`room.idle_ttl_s`).
    log_ttl: Duration,
    /// Rooms with a window this node could not log: a gap entry goes first.
    gapped: std::sync::Mutex<HashSet<RoomId>>,
}

impl RedisBackplane {
    /// `log_len` entries per room are kept in the cluster log, for `log_ttl` after the
    /// room's last event; `recovery` says whether a `since` may be answered from it.
    pub fn new(
        node: Arc<str>,
        cfg: RedisConfig,
        presence_cfg: PresenceConfig,
        link: Arc<RedisLink>,
        log_len: usize,
        recovery: bool,
        log_ttl: Duration,
    ) -> Arc<Self> {
        let (outbox, outbox_rx) = flume::bounded(cfg.publish_queue);
        let (interest, interest_rx) = flume::bounded(65_536);
        Arc::new(Self {
            incarnation: incarnation(&node),
            node,
            cfg,
            presence_cfg,
            link,
            outbox,
            outbox_rx,
            interest,
            interest_rx,
            remote: DashMap::new(),
            subscribed_up: AtomicBool::new(false),
            live_nodes: AtomicUsize::new(1),
            log_len: log_len.max(1),
            recovery,
            log_ttl,
            gapped: std::sync::Mutex::new(HashSet::new()),
        })
    }

    /// The [`LOG_APPEND`] call for a window (or, with no events, a gap entry alone).
    fn append_cmd(
        &self,
        room: &RoomId,
        gap: bool,
        envelope: &[u8],
        events: &[(String, u64, Vec<u8>)],
        publish_cmd: &str,
    ) -> redis::Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(LOG_APPEND)
            .arg(3)
            .arg(log_key(room))
            .arg(log_seq_key(room))
            .arg(log_index_key(room))
            .arg(channel(room))
            .arg(publish_cmd)
            .arg(envelope)
            .arg(self.log_len)
            .arg(self.log_ttl.as_millis() as u64)
            .arg(&*self.node)
            .arg(if gap { "1" } else { "0" });
        for (id, seen, bytes) in events {
            cmd.arg(id).arg(*seen).arg(bytes.as_slice());
        }
        cmd
    }

    /// Notes that a window of `room` was not logged: its next append starts with a gap.
    fn gap(&self, room: &RoomId) {
        self.gapped
            .lock()
            .expect("gapped lock")
            .insert(room.clone());
    }

    /// Takes the note of a gap in `room`, if any.
    fn take_gap(&self, room: &RoomId) -> bool {
        self.gapped.lock().expect("gapped lock").remove(room)
    }

    /// Live gateway nodes (at least this one), as of the last presence sync.
    pub fn live_nodes(&self) -> usize {
        self.live_nodes.load(Ordering::Acquire)
    }

    /// Starts the publisher, subscriber and presence tasks.
    pub fn start(self: &Arc<Self>, hub: Hub, cancel: &CancellationToken, tracker: &TaskTracker) {
        tracker.spawn(Arc::clone(self).publisher(cancel.clone()));
        tracker.spawn(Arc::clone(self).subscriber(hub.clone(), cancel.clone()));
        tracker.spawn(Arc::clone(self).presence(hub, cancel.clone()));
    }

    async fn publisher(self: Arc<Self>, cancel: CancellationToken) {
        let mut batch: Vec<Outgoing> = Vec::with_capacity(PIPELINE);
        let mut gaps = tokio::time::interval(Duration::from_secs(1));
        gaps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let first = tokio::select! {
                _ = cancel.cancelled() => return,
                m = self.outbox_rx.recv_async() => match m { Ok(m) => m, Err(_) => return },
                _ = gaps.tick() => {
                    self.write_gaps().await;
                    continue;
                }
            };
            batch.push(first);
            self.refill(&mut batch);
            // Wait for the link rather than drop: the queue behind us is the bound. While
            // waiting, keep discarding what went stale, so the queue keeps room for the
            // latest windows (the ones still worth sending when Redis is back).
            let mut conn = loop {
                if let Some(c) = self.link.conn() {
                    break c;
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                self.refill(&mut batch);
            };
            self.refill(&mut batch);
            if batch.is_empty() {
                continue;
            }
            self.send(&mut conn, &mut batch).await;
        }
    }

    /// Sends one pipeline: each room's windows and recoveries in queue order.
    ///
    /// Recoveries of one room with the same `since` that follow each other in a room's
    /// queue (no window of the room between them) share one `LOG_RECOVER` call: a node's
    /// viewers that lost their connection together saw the same last event, and in a
    /// reconnect storm thousands ask the same question. Sharing is exact: every asker
    /// was registered in the room before its ask was queued, and the one call runs after
    /// all of them were queued, with nothing of this room logged in between.
    async fn send(&self, conn: &mut Conn, batch: &mut Vec<Outgoing>) {
        let mut groups: Vec<Vec<redis::Cmd>> = Vec::new();
        let mut group_of: HashMap<RoomId, usize> = HashMap::new();
        // Per group, the `since` and index of its last command when that is a recovery.
        let mut last_recover: HashMap<usize, (&str, usize)> = HashMap::new();
        // Per item, where its reply lands: (group, index in group).
        let mut slots = Vec::with_capacity(batch.len());
        let publish_cmd = conn.publish_cmd();
        for m in batch.iter() {
            let room = match m {
                Outgoing::Window { room, .. } | Outgoing::Recover { room, .. } => room,
            };
            let g = *group_of.entry(room.clone()).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            let cmd = match m {
                Outgoing::Window {
                    room,
                    envelope,
                    events,
                    ..
                } => {
                    last_recover.remove(&g);
                    self.append_cmd(room, self.take_gap(room), envelope, events, publish_cmd)
                }
                Outgoing::Recover { room, since, .. } => {
                    if let Some(&(asked, i)) = last_recover.get(&g)
                        && asked == since
                    {
                        slots.push((g, i));
                        continue;
                    }
                    last_recover.insert(g, (since, groups[g].len()));
                    redis::cmd("EVAL")
                        .arg(LOG_RECOVER)
                        .arg(2)
                        .arg(log_key(room))
                        .arg(log_index_key(room))
                        .arg(since)
                        .to_owned()
                }
            };
            slots.push((g, groups[g].len()));
            groups[g].push(cmd);
        }
        let result = conn.run_groups(&groups).await;
        // Replies come back flattened in group order.
        let mut offsets = Vec::with_capacity(groups.len());
        let mut at = 0;
        for g in &groups {
            offsets.push(at);
            at += g.len();
        }
        let windows = batch
            .iter()
            .filter(|m| matches!(m, Outgoing::Window { .. }))
            .count() as u64;
        match result {
            Ok(replies) => {
                ::metrics::counter!(PUBLISHED).increment(windows);
                for (m, (g, i)) in batch.drain(..).zip(slots) {
                    if let Outgoing::Recover { reply, .. } = m {
                        // Shared replies are cloned: one recovery's worth per asker.
                        let _ = reply.send(Some(replies[offsets[g] + i].clone()));
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "publish failed");
                ::metrics::counter!(ERRORS, "op" => "publish").increment(1);
                ::metrics::counter!(DROPPED).increment(windows);
                self.link.report_failure();
                for m in batch.drain(..) {
                    match m {
                        // Perhaps logged, perhaps not: a gap either way.
                        Outgoing::Window { room, .. } => self.gap(&room),
                        Outgoing::Recover { reply, .. } => {
                            let _ = reply.send(None);
                        }
                    }
                }
            }
        }
    }

    /// Appends the gap entries noted for rooms that have sent no window since.
    async fn write_gaps(&self) {
        let rooms: Vec<RoomId> = {
            let gapped = self.gapped.lock().expect("gapped lock");
            if gapped.is_empty() {
                return;
            }
            gapped.iter().cloned().collect()
        };
        let Some(mut conn) = self.link.conn() else {
            return;
        };
        let publish_cmd = conn.publish_cmd();
        let mut written = Vec::new();
        for room in rooms {
            if self.take_gap(&room) {
                written.push(room);
            }
        }
        let groups: Vec<Vec<redis::Cmd>> = written
            .iter()
            .map(|room| vec![self.append_cmd(room, true, &[], &[], publish_cmd)])
            .collect();
        if let Err(e) = conn.run_groups(&groups).await {
            tracing::debug!(error = %e, "writing gap entries failed");
            ::metrics::counter!(ERRORS, "op" => "publish").increment(1);
            self.link.report_failure();
            for room in &written {
                self.gap(room);
            }
        }
    }

    /// Drops (and counts) windows of `batch` queued more than [`STALE_AFTER`] ago, then
    /// tops it up to a pipeline from the queue, dropping stale ones on the way. A
    /// recovery is never dropped: it waits for Redis like a client's join.
    fn refill(&self, batch: &mut Vec<Outgoing>) {
        let now = Instant::now();
        let stale = |m: &Outgoing| match m {
            Outgoing::Window { queued, .. } => {
                now.saturating_duration_since(*queued) >= STALE_AFTER
            }
            Outgoing::Recover { .. } => false,
        };
        let mut dropped = 0usize;
        let mut keep = Vec::with_capacity(batch.len());
        for m in batch.drain(..) {
            if stale(&m) {
                dropped += 1;
                self.drop_window(m);
            } else {
                keep.push(m);
            }
        }
        *batch = keep;
        while batch.len() < PIPELINE {
            match self.outbox_rx.try_recv() {
                Ok(m) if stale(&m) => {
                    dropped += 1;
                    self.drop_window(m);
                }
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        if dropped > 0 {
            tracing::debug!(dropped, "dropped stale backplane envelopes");
            ::metrics::counter!(DROPPED).increment(dropped as u64);
        }
    }

    fn drop_window(&self, m: Outgoing) {
        if let Outgoing::Window { room, .. } = m {
            self.gap(&room);
        }
    }

    async fn subscriber(self: Arc<Self>, hub: Hub, cancel: CancellationToken) {
        let mut attempt = 0u32;
        loop {
            let (push_tx, push_rx) = flume::bounded::<PushInfo>(INBOX);
            let sender = move |info: PushInfo| {
                push_tx.try_send(info).inspect_err(|_| {
                    ::metrics::counter!(DROPPED).increment(1);
                })
            };
            let conn = tokio::select! {
                _ = cancel.cancelled() => return,
                c = redis_link::connect(&self.cfg, Some(sender)) => c,
            };
            match conn {
                Ok(mut conn) => {
                    if attempt > 0 {
                        ::metrics::counter!(RECONNECTS, "conn" => "subscriber").increment(1);
                        tracing::info!("redis subscriber reconnected; re-subscribing");
                    }
                    attempt = 0;
                    self.subscribed_up.store(true, Ordering::Release);
                    if let Err(e) = self
                        .serve_subscriptions(&hub, &mut conn, &push_rx, &cancel)
                        .await
                    {
                        tracing::warn!(error = %e, "redis subscriber connection lost");
                        ::metrics::counter!(ERRORS, "op" => "subscribe").increment(1);
                    }
                    self.subscribed_up.store(false, Ordering::Release);
                    ::metrics::gauge!(SUBSCRIPTIONS).set(0.0);
                    if cancel.is_cancelled() {
                        return;
                    }
                }
                Err(e) => {
                    if attempt == 0 {
                        tracing::warn!(error = %e, "redis subscriber cannot connect; retrying with backoff");
                    }
                }
            }
            let wait = redis_link::backoff(attempt);
            attempt = attempt.saturating_add(1);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Runs one subscriber connection until it fails (an error) or the node stops.
    async fn serve_subscriptions(
        &self,
        hub: &Hub,
        conn: &mut redis_link::Conn,
        pushes: &flume::Receiver<PushInfo>,
        cancel: &CancellationToken,
    ) -> redis::RedisResult<()> {
        let mut subscribed: HashSet<RoomId> = HashSet::new();
        self.reconcile_all(hub, conn, &mut subscribed).await?;
        let mut reconcile = tokio::time::interval(RECONCILE_EVERY);
        let mut health = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                room = self.interest_rx.recv_async() => {
                    let Ok((room, done)) = room else { return Ok(()) };
                    self.reconcile(hub, conn, &mut subscribed, room).await?;
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                }
                push = pushes.recv_async() => {
                    let Ok(push) = push else { return Err(disconnected()) };
                    match push.kind {
                        PushKind::Message | PushKind::SMessage => self.on_message(hub, push.data),
                        PushKind::Unsubscribe | PushKind::SUnsubscribe => {
                            self.on_unsubscribed(hub, conn, &mut subscribed, &push.data).await?;
                        }
                        PushKind::Disconnection => return Err(disconnected()),
                        _ => {}
                    }
                }
                _ = reconcile.tick() => self.reconcile_all(hub, conn, &mut subscribed).await?,
                _ = health.tick() => {
                    if let Conn::Single(_) = conn {
                        tokio::time::timeout(Duration::from_secs(2), conn.query::<Value>(&redis::cmd("PING")))
                            .await
                            .map_err(|_| disconnected())??;
                    }
                }
            }
        }
    }

    async fn reconcile_all(
        &self,
        hub: &Hub,
        conn: &mut redis_link::Conn,
        subscribed: &mut HashSet<RoomId>,
    ) -> redis::RedisResult<()> {
        let mut rooms: HashSet<RoomId> = hub
            .local_rooms()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(r, _)| r)
            .collect();
        rooms.extend(subscribed.iter().cloned());
        for room in rooms {
            self.reconcile(hub, conn, subscribed, room).await?;
        }
        Ok(())
    }

    /// Makes the subscription of `room` match whether the hub has local members.
    async fn reconcile(
        &self,
        hub: &Hub,
        conn: &mut redis_link::Conn,
        subscribed: &mut HashSet<RoomId>,
        room: RoomId,
    ) -> redis::RedisResult<()> {
        let want = hub.local_online(&room) > 0;
        let have = subscribed.contains(&room);
        if want && !have {
            conn.subscribe(&channel(&room)).await?;
            subscribed.insert(room);
        } else if !want && have {
            conn.unsubscribe(&channel(&room)).await?;
            subscribed.remove(&room);
        }
        ::metrics::gauge!(SUBSCRIPTIONS).set(subscribed.len() as f64);
        Ok(())
    }

    /// An unsubscribe confirmation. For a room still in `subscribed` it was not ours (we
    /// forget a room before its confirmation is read): the server dropped the
    /// subscription, as a cluster does for the shard channels of a slot it hands to
    /// another master. Forget it and subscribe again if the room is still wanted; the
    /// client routes the new SSUBSCRIBE to the slot's new owner. (A confirmation of our
    /// own that races a re-subscribe of the same room costs one redundant SUBSCRIBE.)
    async fn on_unsubscribed(
        &self,
        hub: &Hub,
        conn: &mut Conn,
        subscribed: &mut HashSet<RoomId>,
        data: &[Value],
    ) -> redis::RedisResult<()> {
        let Some(Value::BulkString(name)) = data.first() else {
            return Ok(());
        };
        let Some(room) = std::str::from_utf8(name)
            .ok()
            .and_then(|c| c.strip_prefix(CHANNEL_PREFIX))
            .and_then(|r| RoomId::parse(r).ok())
        else {
            return Ok(());
        };
        if !subscribed.remove(&room) {
            return Ok(());
        }
        if hub.local_online(&room) == 0 {
            // Not wanted (any more). This may be our own confirmation that overtook a
            // re-subscribe of the same room: unsubscribe again so Redis agrees with the
            // set. Harmless when it already does (its confirmation finds no entry).
            conn.unsubscribe(&channel(&room)).await?;
            ::metrics::gauge!(SUBSCRIPTIONS).set(subscribed.len() as f64);
            return Ok(());
        }
        tracing::info!(%room, "redis dropped a room subscription; subscribing again");
        self.reconcile(hub, conn, subscribed, room).await
    }

    fn on_message(&self, hub: &Hub, data: Vec<Value>) {
        let Some(Value::BulkString(message)) = data.into_iter().nth(1) else {
            return;
        };
        // "<first log number> <envelope>"
        let split = message.iter().position(|b| *b == b' ');
        let Some((first_seq, payload)) = split.and_then(|i| {
            let seq = std::str::from_utf8(&message[..i])
                .ok()?
                .parse::<u64>()
                .ok()?;
            Some((seq, &message[i + 1..]))
        }) else {
            tracing::warn!("backplane message without its log number");
            ::metrics::counter!(ERRORS, "op" => "decode").increment(1);
            return;
        };
        let env: Envelope<'_> = match rmp_serde::from_slice(payload) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable backplane envelope");
                ::metrics::counter!(ERRORS, "op" => "decode").increment(1);
                return;
            }
        };
        if env.origin == &*self.node {
            return;
        }
        let Ok(room) = RoomId::parse(env.room) else {
            return;
        };
        ::metrics::counter!(RECEIVED).increment(1);
        ::metrics::histogram!(LAG).record(now_ms().saturating_sub(env.ts) as f64 / 1000.0);
        hub.inject(&room, env.events, Some(first_seq));
    }

    async fn presence(self: Arc<Self>, hub: Hub, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.presence_cfg.sync_ms));
        let ttl = Duration::from_secs(self.presence_cfg.node_ttl_s);
        let mut state = PresenceState::default();
        let mut last_synced = Instant::now();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            match self.sync_presence(&hub, &mut state).await {
                Ok(true) => last_synced = Instant::now(),
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "presence sync failed");
                    ::metrics::counter!(ERRORS, "op" => "presence").increment(1);
                }
            }
            // Out of touch for longer than a dead node is remembered: the other nodes'
            // counts are as unknowable as a dead node's, and adding them for the whole
            // outage would report viewers who may long be gone. Local counts only.
            if last_synced.elapsed() > ttl && !self.remote.is_empty() {
                tracing::info!(
                    "presence out of sync past the node TTL; counting local members only"
                );
                self.remote.clear();
            }
        }
        // Leaving: withdraw our counts so the others need not wait for the TTL.
        if let Some(mut conn) = self.link.conn() {
            let mut cmds = vec![
                redis::cmd("ZREM")
                    .arg(NODES_KEY)
                    .arg(&self.incarnation)
                    .to_owned(),
            ];
            for room in &state.reported {
                cmds.push(
                    redis::cmd("HDEL")
                        .arg(presence_key(room))
                        .arg(&self.incarnation)
                        .to_owned(),
                );
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.run_all(&cmds)).await;
        }
    }

    /// One presence round: heartbeat, write our counts, read everyone's, delete dead
    /// incarnations' fields. `Ok(false)` when Redis is down (nothing synced).
    async fn sync_presence(
        &self,
        hub: &Hub,
        state: &mut PresenceState,
    ) -> redis::RedisResult<bool> {
        let Some(mut conn) = self.link.conn() else {
            return Ok(false);
        };
        let ttl_ms = self.presence_cfg.node_ttl_s * 1000;
        let now = now_ms();
        let (_, live): (Value, Vec<String>) = conn
            .pipe(
                redis::pipe()
                    .cmd("ZADD")
                    .arg(NODES_KEY)
                    .arg(now)
                    .arg(&self.incarnation)
                    .ignore()
                    .cmd("ZREMRANGEBYSCORE")
                    .arg(NODES_KEY)
                    .arg("-inf")
                    .arg(now.saturating_sub(ttl_ms * 10))
                    .ignore()
                    .cmd("PEXPIRE")
                    .arg(NODES_KEY)
                    .arg(ttl_ms * 10)
                    .cmd("ZRANGEBYSCORE")
                    .arg(NODES_KEY)
                    .arg(now.saturating_sub(ttl_ms))
                    .arg("+inf"),
            )
            .await?;
        let live = Live::new(live);
        self.live_nodes
            .store(live.nodes().max(1), Ordering::Release);
        let rooms = hub.local_rooms();
        // Per room: write our count (or withdraw it), then read every node's.
        let mut cmds: Vec<redis::Cmd> = Vec::new();
        let mut read = Vec::new();
        // Rooms whose field this round deletes: forgotten only once the delete worked,
        // or a failed round would leave our old count behind for as long as we live.
        let mut withdrawn: Vec<RoomId> = Vec::new();
        for (room, count) in &rooms {
            let key = presence_key(room);
            if *count > 0 {
                cmds.push(
                    redis::cmd("HSET")
                        .arg(&key)
                        .arg(&self.incarnation)
                        .arg(*count)
                        .to_owned(),
                );
                cmds.push(redis::cmd("PEXPIRE").arg(&key).arg(ttl_ms * 2).to_owned());
                state.reported.insert(room.clone());
            } else if state.reported.contains(room) {
                cmds.push(
                    redis::cmd("HDEL")
                        .arg(&key)
                        .arg(&self.incarnation)
                        .to_owned(),
                );
                withdrawn.push(room.clone());
            }
            read.push((room.clone(), cmds.len()));
            cmds.push(redis::cmd("HGETALL").arg(&key).to_owned());
        }
        // Rooms we reported but no longer hold at all.
        let held: HashSet<&RoomId> = rooms.iter().map(|(r, _)| r).collect();
        for room in state.reported.iter().filter(|r| !held.contains(r)) {
            cmds.push(
                redis::cmd("HDEL")
                    .arg(presence_key(room))
                    .arg(&self.incarnation)
                    .to_owned(),
            );
            withdrawn.push(room.clone());
        }
        // Fields of incarnations that were dead at the last read and still are.
        for (key, fields) in &state.stale {
            let dead: Vec<&String> = fields.iter().filter(|f| !live.is_live(f)).collect();
            if !dead.is_empty() {
                cmds.push(redis::cmd("HDEL").arg(key).arg(dead).to_owned());
            }
        }
        if cmds.is_empty() {
            self.remote.clear();
            return Ok(true);
        }
        // On failure `state.stale` stays: those fields are checked again next round.
        let replies = conn.run_all(&cmds).await?;
        for room in &withdrawn {
            state.reported.remove(room);
        }
        let mut counts: Vec<HashMap<String, u64>> = Vec::with_capacity(read.len());
        for (_, at) in &read {
            counts.push(redis::from_redis_value(replies[*at].clone())?);
        }
        let read: Vec<RoomId> = read.into_iter().map(|(r, _)| r).collect();

        // Fields of incarnations that are not live: suspects, deleted next round if
        // their heartbeat has not appeared by then.
        state.stale.clear();
        let mut suspects = 0;
        for (room, fields) in read.iter().zip(&counts) {
            let dead: Vec<String> = fields
                .keys()
                .filter(|f| !live.is_live(f))
                .take(STALE_FIELDS_PER_SYNC - suspects)
                .cloned()
                .collect();
            suspects += dead.len();
            if !dead.is_empty() {
                state.stale.insert(presence_key(room), dead);
            }
            if suspects >= STALE_FIELDS_PER_SYNC {
                break;
            }
        }

        // Replace entries in place: a reader must never see an emptied map mid-sync.
        let fresh: HashMap<RoomId, u64> = read
            .into_iter()
            .zip(counts)
            .map(|(room, fields)| {
                let others = live.others(&fields, &self.node);
                (room, others)
            })
            .collect();
        self.remote.retain(|room, _| fresh.contains_key(room));
        for (room, others) in fresh {
            self.remote.insert(room, others);
        }
        Ok(true)
    }
}

fn disconnected() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "redis subscriber disconnected",
    ))
}

#[async_trait::async_trait]
impl Backplane for RedisBackplane {
    fn publish(&self, room: &RoomId, events: &[Arc<Event>], seen: &[u64]) {
        let env = EnvelopeOut {
            origin: &self.node,
            room: room.as_str(),
            ts: now_ms(),
            events,
        };
        let envelope = match rmp_serde::to_vec_named(&env) {
            Ok(p) => Bytes::from(p),
            Err(e) => {
                tracing::error!(error = %e, "encoding backplane envelope");
                return;
            }
        };
        let mut logged = Vec::with_capacity(events.len());
        for (e, seen) in events.iter().zip(seen) {
            match rmp_serde::to_vec_named(&**e) {
                Ok(b) => logged.push((e.id.clone(), *seen, b)),
                Err(err) => {
                    tracing::error!(error = %err, "encoding a logged event");
                    return;
                }
            }
        }
        let out = Outgoing::Window {
            room: room.clone(),
            envelope,
            events: logged,
            queued: Instant::now(),
        };
        if self.outbox.try_send(out).is_err() {
            ::metrics::counter!(DROPPED).increment(1);
            self.gap(room);
        }
    }

    fn interest(&self, room: &RoomId) {
        // A lost hint is repaired by the periodic full reconcile.
        let _ = self.interest.try_send((room.clone(), None));
    }

    async fn subscribe_now(&self, room: &RoomId) -> bool {
        if !self.subscribed_up.load(Ordering::Acquire) {
            self.interest(room);
            return false;
        }
        let (done, subscribed) = oneshot::channel();
        if self.interest.try_send((room.clone(), Some(done))).is_err() {
            return false;
        }
        matches!(
            tokio::time::timeout(RECOVER_WAIT, subscribed).await,
            Ok(Ok(()))
        )
    }

    fn remote_online(&self, room: &RoomId) -> u64 {
        self.remote.get(room).map_or(0, |n| *n)
    }

    async fn recent(&self, room: &RoomId, n: usize) -> Vec<Event> {
        if n == 0 {
            return Vec::new();
        }
        let Some(mut conn) = self.link.conn() else {
            return Vec::new();
        };
        let cmd = redis::cmd("LRANGE")
            .arg(log_key(room))
            .arg(-(n as i64))
            .arg(-1)
            .to_owned();
        let raw: Vec<Vec<u8>> = match conn.run_all(&[cmd]).await {
            Ok(mut replies) => redis::from_redis_value(replies.remove(0)).unwrap_or_default(),
            Err(e) => {
                tracing::debug!(error = %e, "reading a room's history failed");
                ::metrics::counter!(ERRORS, "op" => "history").increment(1);
                return Vec::new();
            }
        };
        raw.iter()
            .filter_map(|b| parse_entry(b))
            .filter(|e| !e.is_gap())
            .filter_map(|e| rmp_serde::from_slice::<Event>(e.event).ok())
            .collect()
    }

    async fn recover(&self, room: &RoomId, since: &str) -> Option<ClusterRecovery> {
        if !self.recovery {
            return Some(ClusterRecovery::default());
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let ask = Outgoing::Recover {
            room: room.clone(),
            since: since.to_owned(),
            reply,
        };
        if self.outbox.try_send(ask).is_err() {
            return Some(ClusterRecovery::default());
        }
        let answer = match tokio::time::timeout(RECOVER_WAIT, answer).await {
            Ok(Ok(Some(v))) => v,
            _ => {
                ::metrics::counter!(ERRORS, "op" => "recover").increment(1);
                return Some(ClusterRecovery::default());
            }
        };
        Some(parse_recover_reply(answer))
    }

    async fn online_elsewhere(&self, room: &RoomId) -> u64 {
        let Some(mut conn) = self.link.conn() else {
            return self.remote_online(room);
        };
        let now = now_ms();
        let ttl_ms = self.presence_cfg.node_ttl_s * 1000;
        let cmds = [
            redis::cmd("ZRANGEBYSCORE")
                .arg(NODES_KEY)
                .arg(now.saturating_sub(ttl_ms))
                .arg("+inf")
                .to_owned(),
            redis::cmd("HGETALL").arg(presence_key(room)).to_owned(),
        ];
        let Ok(replies) = conn.run_all(&cmds).await else {
            return self.remote_online(room);
        };
        let live = Live::new(redis::from_redis_value(replies[0].clone()).unwrap_or_default());
        let counts: HashMap<String, u64> =
            redis::from_redis_value(replies[1].clone()).unwrap_or_default();
        let others = live.others(&counts, &self.node);
        self.remote.insert(room.clone(), others);
        others
    }

    fn is_up(&self) -> bool {
        self.link.is_up() && self.subscribed_up.load(Ordering::Acquire)
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::EventBody;

    fn entry(seq: u64, origin: &str, seen: u64, event: &Event) -> Vec<u8> {
        let mut raw = format!("{seq} {origin} {seen} {} ", event.id).into_bytes();
        raw.extend(rmp_serde::to_vec_named(event).unwrap());
        raw
    }

    fn system(id: &str) -> Event {
        Event {
            id: id.into(),
            ts: 1,
            body: EventBody::System {
                text: format!("text with spaces {id}"),
                data: None,
            },
        }
    }

    fn ids(r: &ClusterRecovery) -> Vec<&str> {
        r.events.iter().map(|e| e.id.as_str()).collect()
    }

    #[test]
    fn log_entries_parse_with_any_bytes_after_the_id() {
        let e = system("n-1-2");
        let raw = entry(7, "node-a", 3, &e);
        let parsed = parse_entry(&raw).unwrap();
        assert_eq!(
            (parsed.seq, parsed.origin, parsed.seen, parsed.id),
            (7, "node-a", 3, "n-1-2")
        );
        assert_eq!(rmp_serde::from_slice::<Event>(parsed.event).unwrap(), e);
        assert!(parse_entry(b"12 ! 0 ! ").unwrap().is_gap());
        assert!(parse_entry(b"x a 0 id ").is_none());
        assert!(parse_entry(b"12 a").is_none());
    }

    /// X (number 10, from A, seen 7): the answer is everything after X, and what other
    /// origins logged between A's `seen` and X (A delivered those after X); A's own
    /// earlier events (A delivered them before X) are not sent again.
    #[test]
    fn a_recovery_takes_what_followed_and_what_x_s_node_had_not_yet_seen() {
        let raw = vec![
            entry(8, "b", 2, &system("b8")),
            entry(9, "a", 7, &system("a9")),
            entry(10, "a", 7, &system("x")),
            entry(11, "b", 9, &system("b11")),
            entry(12, "a", 11, &system("a12")),
        ];
        let r = recovery_from_log(10, "a", &raw);
        assert!(r.recovered);
        assert_eq!(ids(&r), ["b8", "b11", "a12"]);

        // A gap anywhere in the range: no recovery.
        let mut gapped = raw.clone();
        gapped.insert(4, b"12 ! 0 ! ".to_vec());
        assert!(!recovery_from_log(10, "a", &gapped).recovered);
        // An entry that does not read: no recovery.
        let mut broken = raw.clone();
        broken.push(b"13 a 12 id \xc1\xc1".to_vec());
        assert!(!recovery_from_log(10, "a", &broken).recovered);
    }

    #[test]
    fn a_recall_in_the_answer_takes_its_target_out() {
        let recall = Event {
            id: "r".into(),
            ts: 2,
            body: EventBody::Recall {
                target: "b11".into(),
            },
        };
        let raw = vec![
            entry(10, "a", 9, &system("x")),
            entry(11, "b", 9, &system("b11")),
            entry(12, "b", 10, &recall),
        ];
        let r = recovery_from_log(10, "a", &raw);
        assert_eq!((r.recovered, ids(&r)), (true, vec!["r"]));
    }

    fn fields(pairs: &[(&str, u64)]) -> HashMap<String, u64> {
        pairs.iter().map(|(f, n)| (f.to_string(), *n)).collect()
    }

    #[test]
    fn incarnations_parse_back_to_their_node() {
        let me = incarnation("node-a");
        let (node, started) = parse_incarnation(&me);
        assert_eq!(node, "node-a");
        assert!(started > 0);
        assert_ne!(
            me,
            incarnation("node-a"),
            "two lives of a node share a field"
        );
        // A node id with the separator in it still parses (the suffix is split off last).
        assert_eq!(parse_incarnation("a#b#17.00ff"), ("a#b", 17));
        // A plain node id, as written before incarnations, is a node started at 0.
        assert_eq!(parse_incarnation("node-a"), ("node-a", 0));
        assert_eq!(parse_incarnation("node#x"), ("node#x", 0));
    }

    #[test]
    fn only_the_newest_live_incarnation_of_a_node_counts() {
        // node-b crashed (b#100) and restarted (b#200) within the TTL: both heartbeats
        // are still live, but only the new life's counts are real.
        let live = Live::new(vec![
            "a#50.1".into(),
            "b#100.1".into(),
            "b#200.2".into(),
            "c#10.3".into(),
        ]);
        assert_eq!(live.nodes(), 3);
        let room = fields(&[
            ("a#50.1", 1),
            ("b#100.1", 3),
            ("b#200.2", 1),
            ("c#10.3", 5),
            ("dead#1.4", 7),
        ]);
        // From a: b's new life and c; not a itself, b's old life or the dead node.
        assert_eq!(live.others(&room, "a"), 6);
        // From b's new life: its own old life is not someone else either.
        assert_eq!(live.others(&room, "b"), 6);
        // Legacy plain fields of live legacy nodes still count.
        let live = Live::new(vec!["old-node".into(), "a#50.1".into()]);
        assert_eq!(
            live.others(&fields(&[("old-node", 4), ("a#50.1", 1)]), "a"),
            4
        );
    }
}
