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
//! - with each envelope the publisher also appends the window's events to the room's
//!   **history list** (`danmaku:history:{room}`, one Lua call: push, trim to
//!   `room.history_len`, expire after `room.idle_ttl_s`), which a node reads when it
//!   gets a room's first local member: one more command per room per window per node,
//!   still never one per message;
//! - the **presence** task writes this node's per-room counts to
//!   `danmaku:presence:{room}` (a hash, field = incarnation) and a heartbeat to the
//!   `danmaku:nodes` sorted set, then sums the other live nodes' counts; a node whose
//!   heartbeat is older than `presence.node_ttl_s` no longer counts, its fields are
//!   deleted, and when this node itself has not synced for that long it forgets the
//!   other nodes' counts (it can no longer tell who is alive).
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
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Backplane, DROPPED, ERRORS, LAG, PUBLISHED, RECEIVED, SUBSCRIPTIONS};
use crate::config::{PresenceConfig, RedisConfig};
use crate::hub::Hub;
use crate::protocol::{Event, RoomId, now_ms};
use crate::redis_link::{self, Conn, RECONNECTS, RedisLink};

/// Pub/sub pushes buffered between the connection and the subscriber task.
const INBOX: usize = 16_384;
/// Envelopes sent per pipeline round trip.
const PIPELINE: usize = 256;
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

pub fn history_key(room: &RoomId) -> String {
    format!("danmaku:history:{room}")
}

/// Appends events (ARGV[3..]) to a room's history list, keeps the last ARGV[1], and
/// lets the list expire ARGV[2] ms after the room's last event.
const HISTORY_APPEND: &str = r"
for i = 3, #ARGV, 1000 do
  redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

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

/// An envelope waiting for the publisher.
struct Outgoing {
    channel: String,
    payload: Bytes,
    /// The history-list append of the same window (none when nothing is kept).
    history: Option<redis::Cmd>,
    queued: Instant,
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
    interest: flume::Sender<RoomId>,
    interest_rx: flume::Receiver<RoomId>,
    /// Members on other live nodes per room, refreshed by the presence task.
    remote: DashMap<RoomId, u64>,
    subscribed_up: AtomicBool,
    /// Live nodes (this one included) at the last presence sync.
    live_nodes: AtomicUsize,
    /// Events per room kept in the Redis history list (`room.history_len`).
    history_len: usize,
    /// How long a room's history list outlives its last event (`room.idle_ttl_s`).
    history_ttl: Duration,
}

impl RedisBackplane {
    /// `history_len` events per room are kept in Redis for other nodes' joiners, for
    /// `history_ttl` after the room's last event.
    pub fn new(
        node: Arc<str>,
        cfg: RedisConfig,
        presence_cfg: PresenceConfig,
        link: Arc<RedisLink>,
        history_len: usize,
        history_ttl: Duration,
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
            history_len,
            history_ttl,
        })
    }

    /// The EVAL that appends the window's history events of `room` (the last
    /// `history_len` of them), if any.
    fn history_append(&self, room: &RoomId, events: &[Arc<Event>]) -> Option<redis::Cmd> {
        let keep = self.history_len;
        let kept: Vec<&Arc<Event>> = events.iter().filter(|e| e.body.in_history()).collect();
        if keep == 0 || kept.is_empty() {
            return None;
        }
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(HISTORY_APPEND)
            .arg(1)
            .arg(history_key(room))
            .arg(keep)
            .arg(self.history_ttl.as_millis() as u64);
        for e in &kept[kept.len().saturating_sub(keep)..] {
            match rmp_serde::to_vec_named(&***e) {
                Ok(b) => {
                    cmd.arg(b);
                }
                Err(e) => tracing::error!(error = %e, "encoding a history event"),
            }
        }
        Some(cmd)
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
        loop {
            let first = tokio::select! {
                _ = cancel.cancelled() => return,
                m = self.outbox_rx.recv_async() => match m { Ok(m) => m, Err(_) => return },
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
            let mut cmds: Vec<redis::Cmd> = Vec::with_capacity(batch.len() * 2);
            for m in &batch {
                let mut c = redis::cmd(conn.publish_cmd());
                c.arg(&m.channel).arg(m.payload.as_ref());
                cmds.push(c);
                cmds.extend(m.history.clone());
            }
            match conn.run_all(&cmds).await {
                Ok(_) => ::metrics::counter!(PUBLISHED).increment(batch.len() as u64),
                Err(e) => {
                    tracing::debug!(error = %e, "publish failed");
                    ::metrics::counter!(ERRORS, "op" => "publish").increment(1);
                    ::metrics::counter!(DROPPED).increment(batch.len() as u64);
                    self.link.report_failure();
                }
            }
            batch.clear();
        }
    }

    /// Drops (and counts) envelopes of `batch` queued more than [`STALE_AFTER`] ago, then
    /// tops it up to a pipeline from the queue, dropping stale ones on the way.
    fn refill(&self, batch: &mut Vec<Outgoing>) {
        let now = Instant::now();
        let stale = |m: &Outgoing| now.saturating_duration_since(m.queued) >= STALE_AFTER;
        let before = batch.len();
        batch.retain(|m| !stale(m));
        let mut dropped = before - batch.len();
        while batch.len() < PIPELINE {
            match self.outbox_rx.try_recv() {
                Ok(m) if stale(&m) => dropped += 1,
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        if dropped > 0 {
            tracing::debug!(dropped, "dropped stale backplane envelopes");
            ::metrics::counter!(DROPPED).increment(dropped as u64);
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
                    let Ok(room) = room else { return Ok(()) };
                    self.reconcile(hub, conn, &mut subscribed, room).await?;
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
        let Some(Value::BulkString(payload)) = data.into_iter().nth(1) else {
            return;
        };
        let env: Envelope<'_> = match rmp_serde::from_slice(&payload) {
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
        hub.inject(&room, env.events);
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
    fn publish(&self, room: &RoomId, events: &[Arc<Event>]) {
        let env = EnvelopeOut {
            origin: &self.node,
            room: room.as_str(),
            ts: now_ms(),
            events,
        };
        let payload = match rmp_serde::to_vec_named(&env) {
            Ok(p) => Bytes::from(p),
            Err(e) => {
                tracing::error!(error = %e, "encoding backplane envelope");
                return;
            }
        };
        let out = Outgoing {
            channel: channel(room),
            payload,
            history: self.history_append(room, events),
            queued: Instant::now(),
        };
        if self.outbox.try_send(out).is_err() {
            ::metrics::counter!(DROPPED).increment(1);
        }
    }

    fn interest(&self, room: &RoomId) {
        // A lost hint is repaired by the periodic full reconcile.
        let _ = self.interest.try_send(room.clone());
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
            .arg(history_key(room))
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
            .filter_map(|b| rmp_serde::from_slice::<Event>(b).ok())
            .collect()
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
