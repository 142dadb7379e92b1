//! The room registry and the sharded actors that batch and fan out room events.
//!
//! A chat message through it: [`Hub::publish`] puts it in its room's window
//! ([`room`]) → the room's flusher ([`flusher`]) closes the window (at once for a quiet
//! room, else when its `room.batch_ms` is up) and hands one [`Batch`] to each shard
//! holding members → the batch is encoded once per format into shared frames
//! ([`window`]) → each shard ([`shard`]) queues them to its members ([`conn`]) → each
//! session writes its queue.
//!
//! Shape (why it is so):
//! - **Rooms** live in a `DashMap`. A room holds its pending events for the current
//!   window, its history, and per shard the number of its local members. Publishing locks
//!   only that room's state for a `Vec::push`; nothing is awaited under a lock.
//! - **Flushers** (one per shard index) own the rooms whose id hashes to them. A room's
//!   events are thus ordered in one place, so every member on every shard sees the same
//!   order, and one window costs one frame per member (more only when it is cut to the
//!   outbound frame bound). Windows are leading-edge: a quiet room's first event goes
//!   at once, what follows within `room.batch_ms` goes together when that is up, so a
//!   member gets at most one window of a room per `batch_ms`.
//! - **Shards** (N = cores by default) each own the local members of the connections
//!   hashed to them, per room. A giant room is spread over every shard, so its fan-out
//!   uses every core, and a slow member never blocks it: a full queue drops a droppable
//!   frame (chat, presence) or marks the connection to be closed with 4010.
//! - Flushers wait on shards (bounded channels, backpressure), shards never wait on
//!   anything but their own inbox, so there is no cycle to deadlock on.
//! - **Joining** is done by the member's shard: it reads the room's event log ([`log`])
//!   under the room lock and remembers the room's batch sequence number at that instant,
//!   then skips batches numbered at or below it. A batch flushed while the join was in
//!   flight is thus in `joined.history` or in the member's first `batch`, never in both
//!   and never in neither.
//! - **Recovery** (`join` with `since`): on one node the answer is what follows `since`
//!   in the room's log; in a cluster it comes from the cluster log
//!   ([`Backplane::recover`]) plus what this node delivered while that was read.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backplane::{Backplane, ClusterRecovery};
use crate::config::RoomConfig;
use crate::metrics;
use crate::protocol::{Event, EventBody, RoomId, now_ms};
use crate::stream::{EventStream, Status};

mod conn;
mod flusher;
mod log;
mod room;
mod shard;
pub mod window;

pub use conn::{Conn, ConnId, Push, Written};
pub use log::Recovery;
pub use window::{Batch, Encoding};

use log::{EventLog, LogBounds};
use room::{Room, RoomState, chat_weight};
use shard::{Ask, ShardCmd, shard_loop};

/// Capacity of each shard's inbox; joins wait when it is full (backpressure on storms).
const SHARD_INBOX: usize = 8192;

/// What callers of [`Hub::join`] handle.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JoinError {
    #[error("room is full")]
    RoomFull,
    #[error("the gateway is shutting down")]
    ShuttingDown,
}

/// What a successful join returns for the `joined` reply.
pub struct Joined {
    pub online: u64,
    pub history: Vec<Arc<Event>>,
    /// With `since`: whether `history` is everything that followed it.
    pub recovered: Option<bool>,
}

/// Where a room's accepted events go besides its members on this node.
pub struct Outlets {
    /// The other nodes (and the cluster log).
    pub backplane: Arc<dyn Backplane>,
    /// The event stream for the backend.
    pub stream: Arc<EventStream>,
}

impl Outlets {
    /// A single node that records nothing: for tests of the hub alone.
    pub fn local(node: &str) -> Self {
        Self {
            backplane: Arc::new(crate::backplane::Local),
            stream: EventStream::disabled(node.into()),
        }
    }
}

/// Handle to the hub; cheap to clone.
#[derive(Clone)]
pub struct Hub(Arc<Inner>);

struct Inner {
    node: Arc<str>,
    cfg: RoomConfig,
    /// Each room's event log bounds.
    log_bounds: LogBounds,
    /// How windows are cut into frames (`limits.max_out_frame_bytes`) and deflated.
    encoding: Encoding,
    rooms: DashMap<RoomId, Arc<Room>>,
    shards: Box<[flume::Sender<ShardCmd>]>,
    /// Per flusher, its urgent rooms and wake-up.
    flushers: Box<[flusher::Inbox]>,
    hasher: std::collections::hash_map::RandomState,
    seq: AtomicU64,
    /// `{node}-{start ms, hex}`: see [`Hub::next_id`].
    id_prefix: Box<str>,
    backplane: Arc<dyn Backplane>,
    stream: Arc<EventStream>,
}

impl Hub {
    /// Starts `shards` shard actors and as many flushers on `tracker`; they stop when
    /// `cancel` fires.
    pub fn start(
        node: Arc<str>,
        cfg: RoomConfig,
        encoding: Encoding,
        shards: usize,
        outlets: Outlets,
        cancel: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Hub {
        let shards = shards.max(1);
        let mut senders = Vec::with_capacity(shards);
        let mut inboxes = Vec::with_capacity(shards);
        for _ in 0..shards {
            let (tx, rx) = flume::bounded(SHARD_INBOX);
            senders.push(tx);
            inboxes.push(rx);
        }
        let id_prefix = format!("{node}-{:x}", now_ms()).into();
        let log_bounds = LogBounds {
            history_len: cfg.history_len,
            recovery_len: cfg.recovery_len,
            max_bytes: cfg.recovery_max_bytes,
        };
        let hub = Hub(Arc::new(Inner {
            node,
            cfg,
            log_bounds,
            encoding,
            rooms: DashMap::new(),
            shards: senders.into(),
            flushers: (0..shards).map(|_| flusher::Inbox::default()).collect(),
            hasher: Default::default(),
            seq: AtomicU64::new(0),
            id_prefix,
            backplane: outlets.backplane,
            stream: outlets.stream,
        }));
        for (i, rx) in inboxes.into_iter().enumerate() {
            tracker.spawn(shard_loop(rx, cancel.clone()));
            tracker.spawn(hub.clone().flusher_loop(i, cancel.clone()));
        }
        hub
    }

    pub fn node(&self) -> &str {
        &self.0.node
    }

    pub fn shard_count(&self) -> usize {
        self.0.shards.len()
    }

    fn index_of(&self, key: impl Hash) -> usize {
        (self.0.hasher.hash_one(key) % self.0.shards.len() as u64) as usize
    }

    fn shard_of(&self, conn: ConnId) -> usize {
        // Connection ids are sequential: a plain modulo spreads them evenly.
        (conn % self.0.shards.len() as u64) as usize
    }

    fn room_or_create(&self, id: &RoomId) -> dashmap::mapref::one::RefMut<'_, RoomId, Arc<Room>> {
        self.0.rooms.entry(id.clone()).or_insert_with(|| {
            metrics::hot().rooms.increment(1.0);
            Arc::new(Room {
                id: id.clone(),
                owner: self.index_of(id),
                online: AtomicU64::new(0),
                per_shard: (0..self.0.shards.len())
                    .map(|_| AtomicU32::new(0))
                    .collect(),
                state: Mutex::new(RoomState {
                    pending: Vec::new(),
                    local: Vec::new(),
                    remote_seq: 0,
                    first_remote_seq: None,
                    log: EventLog::new(self.0.log_bounds),
                    dirty: false,
                    next_flush: None,
                    window_started: None,
                    presence_sent: 0,
                    last_active: Instant::now(),
                    gifts: HashMap::new(),
                    chat_window: Instant::now(),
                    chat_in_window: 0,
                    chat_bytes_in_window: 0,
                    grabs_in_window: 0,
                    gifts_in_window: 0,
                    flushed: 0,
                    removed: false,
                    seeded: Default::default(),
                }),
            })
        })
    }

    /// Adds `conn` to `room`; once this returns, every later batch of the room reaches it.
    /// The answer holds the last `history` events, or with `since` what followed it.
    ///
    /// # Errors
    /// [`JoinError::RoomFull`] past `room.max_members` local members;
    /// [`JoinError::ShuttingDown`] when the shard has stopped.
    pub async fn join(
        &self,
        room: &RoomId,
        conn: &Arc<Conn>,
        history: usize,
        since: Option<String>,
    ) -> Result<Joined, JoinError> {
        let asked = since.is_some();
        let shard = self.shard_of(conn.id);
        let (r, first) = {
            // The entry guard makes "create or find, then count" atomic against the
            // idle-room sweep, which removes only rooms with no members.
            let entry = self.room_or_create(room);
            let max = self.0.cfg.max_members as u64;
            let prev = entry.online.fetch_add(1, Ordering::AcqRel);
            if max > 0 && prev >= max {
                entry.online.fetch_sub(1, Ordering::AcqRel);
                return Err(JoinError::RoomFull);
            }
            entry.per_shard[shard].fetch_add(1, Ordering::AcqRel);
            (Arc::clone(&entry), prev == 0)
        };
        // The batch this node had delivered before the cluster log is read: what it
        // delivers after goes into the answer too (see [`shard::Ask::Cluster`]).
        let after = r.state.lock().expect("room lock").flushed;
        let bp = &self.0.backplane;
        let recover = async {
            match &since {
                Some(s) => bp.recover(room, s).await,
                None => None,
            }
        };
        // Everything that waits on the backplane happens before the shard registers the
        // member: from then on its batches may be written, and `joined` must come first.
        let (remote, cluster) = if first {
            // Subscribe first (and wait until the subscription is in place), then read
            // what the other nodes published before: what the read misses, pub/sub
            // brings. Unconfirmed, a recovery could have a hole: it answers `false`.
            let live = bp.subscribe_now(room).await;
            let (earlier, remote, cluster) = tokio::join!(
                bp.recent(room, self.0.cfg.history_len),
                bp.online_elsewhere(room),
                recover
            );
            if !earlier.is_empty() {
                r.state.lock().expect("room lock").seed_history(earlier);
            }
            (
                remote,
                cluster.map(|c| ClusterRecovery {
                    recovered: c.recovered && live,
                    ..c
                }),
            )
        } else {
            (bp.remote_online(room), recover.await)
        };
        let ask = match (since, cluster) {
            (None, _) => Ask::Recent(history),
            (Some(since), None) => Ask::Since(since, history),
            (Some(_), Some(c)) if c.recovered => Ask::Cluster {
                // A room this node was already receiving (and still is): events of
                // other nodes not yet taken may be on their way and come in a batch
                // (which ones is decided under the room's lock, see `Ask::answer`).
                in_flight: (!first && bp.is_up()).then(|| {
                    c.logged
                        .iter()
                        .map(|(seq, origin)| (*origin != *self.0.node).then_some(*seq))
                        .collect()
                }),
                events: c.events.into_iter().map(Arc::new).collect(),
                after,
            },
            (Some(_), Some(_)) => Ask::Missed(history),
        };
        let (done, registered) = oneshot::channel();
        let sent = self.0.shards[shard]
            .send_async(ShardCmd::Join {
                room: Arc::clone(&r),
                conn: Arc::clone(conn),
                ask,
                done,
            })
            .await;
        let answer = match (sent, registered.await) {
            (Ok(()), Ok(answer)) => answer,
            _ => {
                self.forget_member(&r, shard);
                return Err(JoinError::ShuttingDown);
            }
        };
        metrics::hot().room_members.increment(1.0);
        r.state.lock().expect("room lock").last_active = Instant::now();
        if asked {
            metrics::recovery(answer.recovered);
        }
        Ok(Joined {
            online: r.online.load(Ordering::Acquire) + remote,
            history: answer.events,
            recovered: asked.then_some(answer.recovered),
        })
    }

    /// Removes `conn` from `room` (a member, as the session tracks).
    pub async fn leave(&self, room: &RoomId, conn: ConnId) {
        let shard = self.shard_of(conn);
        let _ = self.0.shards[shard]
            .send_async(ShardCmd::Leave {
                room: room.clone(),
                conn,
            })
            .await;
        if let Some(r) = self.0.rooms.get(room).map(|r| Arc::clone(&r)) {
            self.forget_member(&r, shard);
            metrics::hot().room_members.decrement(1.0);
        }
    }

    fn forget_member(&self, r: &Room, shard: usize) {
        r.per_shard[shard].fetch_sub(1, Ordering::AcqRel);
        let last = r.online.fetch_sub(1, Ordering::AcqRel) == 1;
        r.state.lock().expect("room lock").last_active = Instant::now();
        if last {
            self.0.backplane.interest(&r.id);
        }
    }

    /// The last `n` history events of `room`, oldest first.
    pub fn history(&self, room: &RoomId, n: usize) -> Vec<Arc<Event>> {
        let Some(r) = self.0.rooms.get(room).map(|r| Arc::clone(&r)) else {
            return Vec::new();
        };
        let st = r.state.lock().expect("room lock");
        st.log.recent(n)
    }

    /// What followed `since` in `room`, for a member joining again: like a join's answer,
    /// but the member already receives the room's batches.
    pub async fn recover(&self, room: &RoomId, since: &str, n: usize) -> Recovery {
        let answer = match self.0.backplane.recover(room, since).await {
            Some(c) if c.recovered => Recovery {
                events: c.events.into_iter().map(Arc::new).collect(),
                recovered: true,
            },
            Some(_) => Recovery {
                events: self.history(room, n),
                recovered: false,
            },
            None => match self.0.rooms.get(room).map(|r| Arc::clone(&r)) {
                Some(r) => r.state.lock().expect("room lock").log.since(since, n),
                None => Recovery {
                    events: Vec::new(),
                    recovered: false,
                },
            },
        };
        metrics::recovery(answer.recovered);
        answer
    }

    /// Local members of `room` on this node.
    pub fn online(&self, room: &RoomId) -> u64 {
        self.local_online(room) + self.0.backplane.remote_online(room)
    }

    /// Rooms this node holds state for.
    pub fn room_count(&self) -> usize {
        self.0.rooms.len()
    }

    /// A fresh cluster-unique event id: node, this process's start, sequence. The start
    /// keeps ids unique across restarts of a node with a fixed `server.node_id`, whose
    /// earlier events may still be in a room's history.
    fn next_id(&self) -> String {
        let n = self.0.seq.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.0.id_prefix)
    }

    /// Accepts an event for `room`: it goes out with the room's next batch. Returns the
    /// event's id (for a merged gift, the id of the event it was merged into).
    ///
    /// Bounded by design: a droppable event arriving when the window already holds
    /// `room.max_pending` events is discarded, chat above `room.max_chat_per_s` is
    /// sampled out, and a user's repeated gift inside one window is merged — all counted.
    pub fn publish(&self, room: &RoomId, body: EventBody) -> String {
        // Without the gift budget nothing refuses, so the error arm is never taken.
        self.publish_inner(room, body, false).unwrap_or_default()
    }

    /// Publishes a client's free gift, within the room's per-window gift budget
    /// (`room.max_gift_events`); a repeat of a gift the user already sent this window
    /// merges and always fits.
    ///
    /// # Errors
    /// The window's budget is spent: nothing was published; retry in `retry_after_ms`.
    pub fn publish_client_gift(&self, room: &RoomId, body: EventBody) -> Result<String, u64> {
        self.publish_inner(room, body, true)
            .map_err(|r| r.retry_after_ms)
    }

    fn publish_inner(
        &self,
        room: &RoomId,
        body: EventBody,
        gift_budget: bool,
    ) -> Result<String, Refused> {
        let r = Arc::clone(&self.room_or_create(room));
        let mut st = r.state.lock().expect("room lock");
        if st.removed {
            // The idle sweep dropped this room between our lookup and our lock; the next
            // lookup finds (or creates) the live one.
            drop(st);
            return self.publish_inner(room, body, gift_budget);
        }
        st.last_active = Instant::now();
        match &body {
            EventBody::Gift { user, gift, count } => {
                let key = (user.id.clone(), gift.clone());
                if let Some(&i) = st.gifts.get(&key) {
                    let merged = &mut st.pending[i];
                    if let EventBody::Gift { count: total, .. } = &mut merged.body {
                        *total += count;
                    }
                    let id = merged.id.clone();
                    drop(st);
                    counter_inc(metrics::GIFTS_MERGED);
                    return Ok(id);
                }
                let cap = self.0.cfg.max_gift_events;
                if gift_budget && cap > 0 {
                    if st.gifts_in_window >= cap {
                        // The window closes when its flusher's timer says, or at once
                        // in a room that was quiet.
                        let wait = st.next_flush.map_or(Duration::ZERO, |t| {
                            t.saturating_duration_since(Instant::now())
                        });
                        let wait = wait.as_millis() as u64;
                        return Err(Refused {
                            retry_after_ms: wait.max(1),
                        });
                    }
                    st.gifts_in_window += 1;
                }
                let index = st.pending.len();
                st.gifts.insert(key, index);
            }
            EventBody::Chat { user, text }
                if self.0.cfg.max_chat_per_s > 0 || self.0.cfg.max_chat_bytes_per_s > 0 =>
            {
                if st.chat_window.elapsed() >= Duration::from_secs(1) {
                    st.chat_window = Instant::now();
                    st.chat_in_window = 0;
                    st.chat_bytes_in_window = 0;
                }
                let weight = chat_weight(&user.id, &user.name, text);
                let (count_cap, bytes_cap) =
                    (self.0.cfg.max_chat_per_s, self.0.cfg.max_chat_bytes_per_s);
                if (count_cap > 0 && st.chat_in_window >= count_cap)
                    || (bytes_cap > 0 && st.chat_bytes_in_window + weight > bytes_cap)
                {
                    drop(st);
                    counter_inc(metrics::CHAT_SAMPLED_OUT);
                    return Ok(self.unsent(room, body, Status::SampledOut));
                }
                st.chat_in_window += 1;
                st.chat_bytes_in_window += weight;
            }
            EventBody::Grab { .. } if self.0.cfg.max_grab_events > 0 => {
                if st.grabs_in_window >= self.0.cfg.max_grab_events {
                    drop(st);
                    counter_inc(metrics::GRAB_EVENTS_SAMPLED_OUT);
                    return Ok(self.unsent(room, body, Status::SampledOut));
                }
                st.grabs_in_window += 1;
            }
            _ => {}
        }
        let event = Event {
            id: self.next_id(),
            ts: now_ms(),
            body,
        };
        let id = event.id.clone();
        let kind = event.body.kind();
        if event.body.droppable() && st.pending.len() >= self.0.cfg.max_pending {
            drop(st);
            metrics::hot().events_dropped.increment(1);
            if self.0.stream.enabled() {
                self.0.stream.event(room, Status::SampledOut, event);
            }
            return Ok(id);
        }
        st.pending.push(event);
        let seen = st.remote_seq;
        st.local.push(Some(seen));
        self.mark_dirty(&r, st);
        metrics::event(kind);
        Ok(id)
    }

    /// An event accepted but not broadcast: a fresh id, and a record on the event
    /// stream with `status` (sampled out by a room budget, or filtered). Returns the id.
    pub fn unsent(&self, room: &RoomId, body: EventBody, status: Status) -> String {
        let id = self.next_id();
        if self.0.stream.enabled() {
            let event = Event {
                id: id.clone(),
                ts: now_ms(),
                body,
            };
            self.0.stream.event(room, status, event);
        }
        id
    }

    /// Queues events that another node published (already merged and budgeted there).
    /// `first_seq`: the cluster log number of the first (the rest follow it).
    pub fn inject(&self, room: &RoomId, events: Vec<Event>, first_seq: Option<u64>) {
        let r = Arc::clone(&self.room_or_create(room));
        let mut st = r.state.lock().expect("room lock");
        if st.removed {
            drop(st);
            return self.inject(room, events, first_seq);
        }
        st.last_active = Instant::now();
        if let (Some(first), Some(n)) = (first_seq, events.len().checked_sub(1)) {
            // The latest, not the highest: a Redis that lost its data numbers anew.
            st.remote_seq = first + n as u64;
            st.first_remote_seq.get_or_insert(first);
        }
        for e in events {
            if !st.seeded.is_empty() && st.seeded.remove(&e.id) {
                continue;
            }
            // The same bound as local publishing: a stalled flusher must not let remote
            // chat grow the window without limit.
            if e.body.droppable() && st.pending.len() >= self.0.cfg.max_pending {
                metrics::hot().events_dropped.increment(1);
                continue;
            }
            st.pending.push(e);
            st.local.push(None);
        }
        self.mark_dirty(&r, st);
    }

    /// Notes that `r`'s window holds events (once per window). A room on its flusher's
    /// timer queue (flushed during the last `room.batch_ms`) is flushed when its window
    /// ends; a quiet one is put on the flusher's urgent list and the flusher woken, so
    /// its first event goes at once. Consumes the room guard so the urgent-list lock is
    /// never taken under it; allocates nothing once the list has grown.
    fn mark_dirty(&self, r: &Arc<Room>, mut st: std::sync::MutexGuard<'_, RoomState>) {
        if st.window_started.is_none() {
            st.window_started = Some(Instant::now());
        }
        if st.dirty {
            return;
        }
        st.dirty = true;
        if st.next_flush.is_some() {
            return;
        }
        drop(st);
        let flusher = &self.0.flushers[r.owner];
        flusher
            .urgent
            .lock()
            .expect("urgent lock")
            .push(Arc::clone(r));
        flusher.wake.notify_one();
    }

    /// Rooms with state on this node and their local member counts.
    pub fn local_rooms(&self) -> Vec<(RoomId, u64)> {
        self.0
            .rooms
            .iter()
            .map(|r| (r.id.clone(), r.online.load(Ordering::Acquire)))
            .collect()
    }

    /// Members of `room` on this node only.
    pub fn local_online(&self, room: &RoomId) -> u64 {
        self.0
            .rooms
            .get(room)
            .map_or(0, |r| r.online.load(Ordering::Acquire))
    }
}

/// A publish refused by a room budget: nothing was published.
struct Refused {
    retry_after_ms: u64,
}

fn counter_inc(name: &'static str) {
    ::metrics::counter!(name).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn system(id: &str, ts: u64) -> Event {
        Event {
            id: id.into(),
            ts,
            body: EventBody::System {
                text: id.into(),
                data: None,
            },
        }
    }

    /// History seeded from the backplane holds each event once: not one already waiting
    /// in this window (it goes into history when flushed), and not one that then also
    /// arrives live.
    // Single-threaded and without an await, so the flusher never runs in between.
    #[tokio::test(flavor = "current_thread")]
    async fn seeded_history_never_holds_an_event_twice() {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let hub = Hub::start(
            Arc::from("n"),
            RoomConfig::default(),
            Encoding::plain(crate::config::MIN_OUT_FRAME_BYTES),
            1,
            Outlets::local("n"),
            &cancel,
            &tracker,
        );
        let room = RoomId::parse("r").unwrap();
        // "pending" arrived live and waits for its window; "old" was flushed earlier.
        hub.inject(&room, vec![system("old", 1)], None);
        let r = Arc::clone(&hub.room_or_create(&room));
        {
            let mut st = r.state.lock().unwrap();
            let e = Arc::new(st.pending.remove(0));
            st.local.remove(0);
            st.log.push(e, 1);
        }
        hub.inject(&room, vec![system("pending", 3)], None);
        let earlier = vec![system("older", 0), system("old", 1), system("pending", 3)];
        r.state.lock().unwrap().seed_history(earlier);
        let ids = |st: &RoomState| -> Vec<String> {
            st.log.recent(100).iter().map(|e| e.id.clone()).collect()
        };
        assert_eq!(ids(&r.state.lock().unwrap()), ["older", "old"]);
        // "older" arriving live again (the subscription raced the read) is dropped.
        hub.inject(&room, vec![system("older", 0), system("new", 4)], None);
        let pending: Vec<String> = r
            .state
            .lock()
            .unwrap()
            .pending
            .iter()
            .map(|e| e.id.clone())
            .collect();
        assert_eq!(pending, ["pending", "new"]);
        cancel.cancel();
    }

    /// (windows flushed, ids in history) of `room`.
    fn flushed(hub: &Hub, room: &RoomId) -> (u64, Vec<String>) {
        let r = Arc::clone(&hub.0.rooms.get(room).expect("room"));
        let st = r.state.lock().unwrap();
        (
            st.flushed,
            st.log.recent(100).iter().map(|e| e.id.clone()).collect(),
        )
    }

    /// Leading edge: a quiet room's first event is flushed at once; what follows inside
    /// `batch_ms` goes together, no sooner than `batch_ms` after that flush and promptly
    /// then; a busy room is flushed once per `batch_ms`; a room that sent nothing for a
    /// window is quiet again.
    // Paused clock: the flusher's timers fire exactly, so the instants below are exact.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_quiet_rooms_first_event_goes_at_once_and_windows_stay_batch_ms_apart() {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let cfg = RoomConfig {
            batch_ms: 100,
            presence_ms: 3_600_000,
            ..RoomConfig::default()
        };
        let hub = Hub::start(
            Arc::from("n"),
            cfg,
            Encoding::plain(crate::config::MIN_OUT_FRAME_BYTES),
            2,
            Outlets::local("n"),
            &cancel,
            &tracker,
        );
        let room = RoomId::parse("r").unwrap();
        let say = |text: &str| {
            hub.publish(
                &room,
                EventBody::System {
                    text: text.into(),
                    data: None,
                },
            )
        };
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let at = |n: u64| tokio::time::sleep_until(t0 + ms(n));

        let a = say("a");
        // Nothing but the wake-up: the flusher runs without the clock moving.
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert_eq!(Instant::now(), t0, "the clock did not move");
        assert_eq!(flushed(&hub, &room), (1, vec![a.clone()]), "sent at once");

        // Two events inside the window go together when it ends, at t0 + 100 ms.
        at(10).await;
        let b = say("b");
        at(60).await;
        let c = say("c");
        at(99).await;
        assert_eq!(flushed(&hub, &room).0, 1, "not before the window ends");
        at(101).await;
        assert_eq!(
            flushed(&hub, &room),
            (2, vec![a.clone(), b.clone(), c.clone()]),
            "one window, at its end"
        );

        // Still busy: one window per batch_ms, on schedule (t0 + 200, t0 + 300).
        at(150).await;
        let d = say("d");
        at(199).await;
        assert_eq!(flushed(&hub, &room).0, 2);
        at(201).await;
        assert_eq!(flushed(&hub, &room).0, 3);
        at(210).await;
        let e = say("e");
        at(299).await;
        assert_eq!(flushed(&hub, &room).0, 3);
        at(301).await;
        assert_eq!(flushed(&hub, &room).1, [a, b, c, d, e.clone()]);

        // Nothing during t0 + 300..400: quiet again, so the next event goes at once.
        at(450).await;
        let f = say("f");
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert_eq!(Instant::now(), t0 + ms(450));
        let (n, ids) = flushed(&hub, &room);
        assert_eq!(
            (n, ids.last()),
            (5, Some(&f)),
            "a quiet room's event goes at once"
        );
        // ... and opens a window: the next one waits for t0 + 550.
        at(460).await;
        let g = say("g");
        at(549).await;
        assert_eq!(flushed(&hub, &room).0, 5);
        at(551).await;
        assert_eq!(flushed(&hub, &room).1.last(), Some(&g));
        assert_ne!(e, g);
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
