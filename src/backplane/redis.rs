//! The Redis backplane: room channels over pub/sub (sharded pub/sub on a cluster),
//! MessagePack envelopes, and cluster-wide presence in Redis hashes.
//!
//! Three tasks, each with one job:
//! - the **publisher** drains a bounded queue of envelopes (one per room per window)
//!   and sends them in pipelines on the shared command connection; while Redis is
//!   down the queue fills and further envelopes are dropped and counted;
//! - the **subscriber** owns a separate RESP3 connection whose pushes land in a bounded
//!   channel; it SUBSCRIBEs a room's channel when the room gets its first local member
//!   and UNSUBSCRIBEs when it loses its last (re-reading the hub, so racing hints
//!   cannot leave it wrong), drops its own node's envelopes, injects the rest into the
//!   hub, and after a disconnect reconnects with jittered backoff and re-subscribes
//!   every room it holds;
//! - the **presence** task writes this node's per-room counts to
//!   `danmaku:presence:{room}` (a hash, field = node) and a heartbeat to the
//!   `danmaku:nodes` sorted set, then sums the other live nodes' counts; a node whose
//!   heartbeat is older than `presence.node_ttl_s` no longer counts.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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
use crate::redis_link::{self, RECONNECTS, RedisLink};

/// Pub/sub pushes buffered between the connection and the subscriber task.
const INBOX: usize = 16_384;
/// Envelopes sent per pipeline round trip.
const PIPELINE: usize = 256;
/// A full re-check of subscriptions against the hub, in case a hint was lost.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);

pub const NODES_KEY: &str = "danmaku:nodes";

pub fn channel(room: &RoomId) -> String {
    format!("danmaku:room:{room}")
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

pub struct RedisBackplane {
    node: Arc<str>,
    cfg: RedisConfig,
    presence_cfg: PresenceConfig,
    link: Arc<RedisLink>,
    outbox: flume::Sender<(String, Bytes)>,
    outbox_rx: flume::Receiver<(String, Bytes)>,
    interest: flume::Sender<RoomId>,
    interest_rx: flume::Receiver<RoomId>,
    /// Members on other live nodes per room, refreshed by the presence task.
    remote: DashMap<RoomId, u64>,
    subscribed_up: AtomicBool,
    /// Live nodes (this one included) at the last presence sync.
    live_nodes: std::sync::atomic::AtomicUsize,
}

impl RedisBackplane {
    pub fn new(
        node: Arc<str>,
        cfg: RedisConfig,
        presence_cfg: PresenceConfig,
        link: Arc<RedisLink>,
    ) -> Arc<Self> {
        let (outbox, outbox_rx) = flume::bounded(cfg.publish_queue);
        let (interest, interest_rx) = flume::bounded(65_536);
        Arc::new(Self {
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
            live_nodes: std::sync::atomic::AtomicUsize::new(1),
        })
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
        let mut batch = Vec::with_capacity(PIPELINE);
        loop {
            let first = tokio::select! {
                _ = cancel.cancelled() => return,
                m = self.outbox_rx.recv_async() => match m { Ok(m) => m, Err(_) => return },
            };
            batch.push(first);
            while batch.len() < PIPELINE {
                match self.outbox_rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            // Wait for the link rather than drop: the queue behind us is the bound.
            let mut conn = loop {
                if let Some(c) = self.link.conn() {
                    break c;
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            };
            let cmds: Vec<redis::Cmd> = batch
                .iter()
                .map(|(channel, payload)| {
                    let mut c = redis::cmd(conn.publish_cmd());
                    c.arg(channel).arg(payload.as_ref());
                    c
                })
                .collect();
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
        // Rooms whose field we wrote, so a room we left gets its field removed.
        let mut reported: HashSet<RoomId> = HashSet::new();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.sync_presence(&hub, &mut reported).await {
                tracing::debug!(error = %e, "presence sync failed");
                ::metrics::counter!(ERRORS, "op" => "presence").increment(1);
            }
        }
        // Leaving: withdraw our counts so the others need not wait for the TTL.
        if let Some(mut conn) = self.link.conn() {
            let mut cmds = vec![
                redis::cmd("ZREM")
                    .arg(NODES_KEY)
                    .arg(&*self.node)
                    .to_owned(),
            ];
            for room in &reported {
                cmds.push(
                    redis::cmd("HDEL")
                        .arg(presence_key(room))
                        .arg(&*self.node)
                        .to_owned(),
                );
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.run_all(&cmds)).await;
        }
    }

    async fn sync_presence(
        &self,
        hub: &Hub,
        reported: &mut HashSet<RoomId>,
    ) -> redis::RedisResult<()> {
        let Some(mut conn) = self.link.conn() else {
            return Ok(());
        };
        let ttl_ms = self.presence_cfg.node_ttl_s * 1000;
        let now = now_ms();
        let (_, live): ((), Vec<String>) = conn
            .pipe(
                redis::pipe()
                    .cmd("ZADD")
                    .arg(NODES_KEY)
                    .arg(now)
                    .arg(&*self.node)
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
            .await
            .map(|(_, live): (Value, Vec<String>)| ((), live))?;
        let live: HashSet<String> = live.into_iter().collect();
        self.live_nodes.store(live.len().max(1), Ordering::Release);
        let rooms = hub.local_rooms();
        // Per room: write our count (or withdraw it), then read every node's.
        let mut cmds: Vec<redis::Cmd> = Vec::new();
        let mut read = Vec::new();
        for (room, count) in &rooms {
            let key = presence_key(room);
            if *count > 0 {
                cmds.push(
                    redis::cmd("HSET")
                        .arg(&key)
                        .arg(&*self.node)
                        .arg(*count)
                        .to_owned(),
                );
                cmds.push(redis::cmd("PEXPIRE").arg(&key).arg(ttl_ms * 2).to_owned());
                reported.insert(room.clone());
            } else if reported.remove(room) {
                cmds.push(redis::cmd("HDEL").arg(&key).arg(&*self.node).to_owned());
            }
            read.push((room.clone(), cmds.len()));
            cmds.push(redis::cmd("HGETALL").arg(&key).to_owned());
        }
        // Rooms we reported but no longer hold at all.
        let held: HashSet<&RoomId> = rooms.iter().map(|(r, _)| r).collect();
        let gone: Vec<RoomId> = reported
            .iter()
            .filter(|r| !held.contains(r))
            .cloned()
            .collect();
        for room in gone {
            cmds.push(
                redis::cmd("HDEL")
                    .arg(presence_key(&room))
                    .arg(&*self.node)
                    .to_owned(),
            );
            reported.remove(&room);
        }
        if cmds.is_empty() {
            self.remote.clear();
            return Ok(());
        }
        let replies = conn.run_all(&cmds).await?;
        let mut counts: Vec<HashMap<String, u64>> = Vec::with_capacity(read.len());
        for (_, at) in &read {
            counts.push(redis::from_redis_value(replies[*at].clone())?);
        }
        let read: Vec<RoomId> = read.into_iter().map(|(r, _)| r).collect();

        // Replace entries in place: a reader must never see an emptied map mid-sync.
        let fresh: HashMap<RoomId, u64> = read
            .into_iter()
            .zip(counts)
            .map(|(room, fields)| {
                let others: u64 = fields
                    .iter()
                    .filter(|(node, _)| {
                        node.as_str() != &*self.node && live.contains(node.as_str())
                    })
                    .map(|(_, n)| *n)
                    .sum();
                (room, others)
            })
            .collect();
        self.remote.retain(|room, _| fresh.contains_key(room));
        for (room, others) in fresh {
            self.remote.insert(room, others);
        }
        Ok(())
    }
}

use crate::redis_link::Conn;

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
        if self.outbox.try_send((channel(room), payload)).is_err() {
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
        let live: HashSet<String> = redis::from_redis_value(replies[0].clone()).unwrap_or_default();
        let counts: HashMap<String, u64> =
            redis::from_redis_value(replies[1].clone()).unwrap_or_default();
        let others: u64 = counts
            .iter()
            .filter(|(node, _)| node.as_str() != &*self.node && live.contains(node.as_str()))
            .map(|(_, n)| *n)
            .sum();
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
