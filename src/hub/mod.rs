//! The room registry and the sharded actors that batch and fan out room events.
//!
//! Shape (why it is so):
//! - **Rooms** live in a `DashMap`. A room holds its pending events for the current
//!   window, its history, and per shard the number of its local members. Publishing locks
//!   only that room's state for a `Vec::push`; nothing is awaited under a lock.
//! - **Flushers** (one per shard index) own the rooms whose id hashes to them. Every
//!   `room.batch_ms` a flusher takes each dirty room's pending events, appends them to the
//!   history, wraps them in one [`Batch`] and hands that `Arc` to every shard holding
//!   members of the room. A room's events are thus ordered in one place, so every member
//!   on every shard sees the same order, and one window costs one frame per member.
//! - **Shards** (N = cores by default) each own the local members of the connections
//!   hashed to them, per room. A shard takes a window's frames for each member's format
//!   ([`window`]: complete WebSocket frames, encoded once per format, cut to stay within
//!   `limits.max_out_frame_bytes`, shared by all shards) and pushes refcounted clones
//!   into each member's bounded queue. A giant room is spread over every shard, so its fan-out uses every
//!   core, and a slow member never blocks it: a full queue drops a droppable batch (chat,
//!   presence) or marks the connection to be closed with 4010.
//! - Flushers wait on shards (bounded channels, backpressure), shards never wait on
//!   anything but their own inbox, so there is no cycle to deadlock on.
//! - **Joining** is done by the member's shard: it reads the history under the room lock
//!   and remembers the room's batch sequence number at that instant, then skips batches
//!   numbered at or below it. A batch flushed while the join was in flight is thus in
//!   `joined.history` or in the member's first `batch`, never in both and never in
//!   neither.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::{Notify, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backplane::Backplane;
use crate::config::RoomConfig;
use crate::metrics;
use crate::protocol::{CloseCode, Event, EventBody, Format, RoomId, now_ms};

pub mod window;

pub use window::Batch;

/// Connection ids are unique per node and never reused while the process lives.
pub type ConnId = u64;

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

/// The part of a connection that shards need: its format, its bounded outbound queue,
/// and a way to ask its session to close. Shared by the session and every shard it is a
/// member on.
///
/// The queue is a `VecDeque` under a std mutex plus a `Notify`, not a channel: a
/// channel's async receive allocates a waker hook each time it waits, i.e. once per
/// delivered frame, while a `Notified` future lives in the session's own task. An idle
/// connection's queue holds no allocation at all.
pub struct Conn {
    pub id: ConnId,
    pub format: Format,
    /// Bounded by `cap`: the slow-consumer policy applies when it is full.
    queue: Mutex<OutQueue>,
    cap: usize,
    /// Wakes the session when a frame is queued; `notify_one` keeps a permit, so a push
    /// that lands before the session waits is not lost.
    queued: Notify,
    /// Close code requested by a shard (0 = none); the session reads it when notified.
    close: AtomicU16,
    /// Wakes the session when `close` is set; `notify_one` keeps a permit, so a kill that
    /// lands before the session waits is not lost.
    notify: Notify,
}

/// A connection's pending frames; `closed` once its session has ended.
#[derive(Default)]
struct OutQueue {
    frames: VecDeque<Outbound>,
    /// Bytes of the front frame already on the wire (a partial write).
    written: usize,
    closed: bool,
}

/// What one [`Conn::write_front`] took off the queue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Frames written whole.
    pub frames: u64,
    pub bytes: u64,
    /// When the oldest event of the first frame finished was accepted.
    pub oldest: Option<Instant>,
    /// The front frame is only partly written: more must be written before anything
    /// else goes on this socket.
    pub partial: bool,
    /// Frames are still queued.
    pub more: bool,
}

/// One frame in a member's outbound queue.
pub struct Outbound {
    /// A complete WebSocket frame, shared with every other member it goes to.
    pub frame: Bytes,
    /// When the oldest event in it was accepted, for the end-to-end latency histogram.
    pub accepted: Instant,
}

/// Outcome of queueing one frame to a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    Dropped,
    Killed,
    Gone,
}

impl Conn {
    /// A connection whose outbound queue holds at most `queue` frames.
    pub fn new(id: ConnId, format: Format, queue: usize) -> Arc<Conn> {
        Arc::new(Conn {
            id,
            format,
            queue: Mutex::new(OutQueue::default()),
            cap: queue.max(1),
            queued: Notify::new(),
            close: AtomicU16::new(0),
            notify: Notify::new(),
        })
    }

    /// Queues `msg` without waiting; applies the slow-consumer policy when full.
    pub fn push(&self, frame: &Bytes, accepted: Instant, droppable: bool) -> Push {
        {
            let mut q = self.queue.lock().expect("outbound lock");
            if q.closed {
                return Push::Gone;
            }
            if q.frames.len() >= self.cap {
                drop(q);
                if droppable {
                    return Push::Dropped;
                }
                self.kill(CloseCode::SlowConsumer);
                return Push::Killed;
            }
            q.frames.push_back(Outbound {
                frame: frame.clone(),
                accepted,
            });
        }
        self.queued.notify_one();
        Push::Queued
    }

    /// The oldest queued frame, if any.
    pub fn try_next(&self) -> Option<Outbound> {
        let mut q = self.queue.lock().expect("outbound lock");
        q.written = 0;
        q.frames.pop_front()
    }

    /// Resolves once a frame is queued (it stays queued). Only the session calls it.
    pub async fn queued(&self) {
        loop {
            if !self.queue.lock().expect("outbound lock").frames.is_empty() {
                return;
            }
            self.queued.notified().await;
        }
    }

    /// Offers the unwritten bytes of up to `max` queued frames to `write` (one vectored
    /// write) and takes off the queue what it wrote. The queue lock is held for this
    /// one call, never across an await; the frames stay shared (nothing is copied), so a
    /// member that stops reading holds references, not bytes.
    ///
    /// # Errors
    /// `write`'s error.
    pub fn write_front(
        &self,
        max: usize,
        write: impl FnOnce(&[std::io::IoSlice<'_>]) -> std::task::Poll<std::io::Result<usize>>,
    ) -> std::task::Poll<std::io::Result<Written>> {
        use std::io::IoSlice;
        use std::task::Poll;
        const MAX: usize = 16;
        let mut q = self.queue.lock().expect("outbound lock");
        let n = q.frames.len().min(max).min(MAX);
        if n == 0 {
            return Poll::Ready(Ok(Written::default()));
        }
        let mut slices = [IoSlice::new(&[]); MAX];
        for (i, out) in q.frames.iter().take(n).enumerate() {
            let skip = if i == 0 { q.written } else { 0 };
            slices[i] = IoSlice::new(&out.frame[skip..]);
        }
        let mut left = match write(&slices[..n]) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(k)) => k,
        };
        let mut done = Written {
            bytes: left as u64,
            ..Written::default()
        };
        while left > 0 {
            let Some(front) = q.frames.front() else {
                break;
            };
            let rest = front.frame.len() - q.written;
            if left >= rest {
                left -= rest;
                let out = q.frames.pop_front().expect("front exists");
                q.written = 0;
                done.frames += 1;
                done.oldest.get_or_insert(out.accepted);
            } else {
                q.written += left;
                left = 0;
            }
        }
        done.partial = q.written > 0;
        done.more = !q.frames.is_empty();
        Poll::Ready(Ok(done))
    }

    /// The session has ended: refuse further frames and free the queued ones.
    pub fn close_queue(&self) {
        let mut q = self.queue.lock().expect("outbound lock");
        q.closed = true;
        q.written = 0;
        q.frames = VecDeque::new();
    }

    /// Asks the session to close with `code`; the first request wins.
    pub fn kill(&self, code: CloseCode) {
        if self
            .close
            .compare_exchange(0, code.code(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.notify.notify_one();
        }
    }

    /// Resolves once a close was requested, with its code.
    pub async fn killed(&self) -> CloseCode {
        loop {
            self.notify.notified().await;
            let code = self.close.load(Ordering::Acquire);
            if let Some(c) = CloseCode::ALL.into_iter().find(|c| c.code() == code) {
                return c;
            }
        }
    }
}

/// A room's state on this node.
struct Room {
    id: RoomId,
    /// Index of the flusher that batches this room.
    owner: usize,
    /// Local members (connections) on this node.
    online: AtomicU64,
    /// Local members per shard, so a batch goes only to shards that have members.
    per_shard: Box<[AtomicU32]>,
    state: Mutex<RoomState>,
}

struct RoomState {
    /// Events of the current window, in arrival order.
    pending: Vec<Event>,
    /// Per pending event: whether it originated on this node (and so is published to
    /// the backplane) or arrived from another node.
    local: Vec<bool>,
    /// Recent non-presence events, oldest first, at most `history_len`.
    history: VecDeque<Arc<Event>>,
    /// Whether the room is on its flusher's dirty list.
    dirty: bool,
    /// When the first event of the current window was accepted.
    window_started: Option<Instant>,
    /// Online count last announced by a `presence` event.
    presence_sent: u64,
    /// Last join, leave or event: an empty room is forgotten `idle_ttl_s` after this.
    last_active: Instant,
    /// (user id, gift id) → index in `pending` of this window's gift event, so the same
    /// user's same gift is merged (counts summed) instead of repeated.
    gifts: HashMap<(String, String), usize>,
    /// Start of the current one-second window of the room's chat budget.
    chat_window: Instant,
    /// Chat broadcast in the current window (against `room.max_chat_per_s`).
    chat_in_window: u64,
    /// Their weight ([`chat_weight`]) against `room.max_chat_bytes_per_s`.
    chat_bytes_in_window: u64,
    /// `grab` events in the current window (against `room.max_grab_events`).
    grabs_in_window: u64,
    /// Client gift events in the current window (against `room.max_gift_events`).
    gifts_in_window: u64,
    /// Number of the last batch flushed (its events are in `history`).
    flushed: u64,
    /// Set by the idle sweep as it drops the room from the registry: a publisher that
    /// found the room just before must retry on the live one, or its event is lost.
    removed: bool,
    /// Ids of events put into `history` from the backplane's list rather than received
    /// live; one that then also arrives live is not kept or delivered twice.
    seeded: std::collections::HashSet<String>,
}

/// What a successful join returns for the `joined` reply.
pub struct Joined {
    pub online: u64,
    pub history: Vec<Arc<Event>>,
}

enum ShardCmd {
    /// Registers `conn` and answers the last `history` events of the room.
    Join {
        room: Arc<Room>,
        conn: Arc<Conn>,
        history: usize,
        done: oneshot::Sender<Vec<Arc<Event>>>,
    },
    Leave {
        room: RoomId,
        conn: ConnId,
    },
    Deliver(Arc<Batch>),
}

/// Handle to the hub; cheap to clone.
#[derive(Clone)]
pub struct Hub(Arc<Inner>);

struct Inner {
    node: Arc<str>,
    cfg: RoomConfig,
    /// `limits.max_out_frame_bytes`: windows are cut into frames within it.
    max_frame: usize,
    rooms: DashMap<RoomId, Arc<Room>>,
    shards: Box<[flume::Sender<ShardCmd>]>,
    /// Per flusher, the rooms with pending events.
    dirty: Box<[Mutex<Vec<Arc<Room>>>]>,
    hasher: std::collections::hash_map::RandomState,
    seq: AtomicU64,
    /// `{node}-{start ms, hex}`: see [`Hub::next_id`].
    id_prefix: Box<str>,
    backplane: Arc<dyn Backplane>,
}

impl Hub {
    /// Starts `shards` shard actors and as many flushers on `tracker`; they stop when
    /// `cancel` fires.
    pub fn start(
        node: Arc<str>,
        cfg: RoomConfig,
        max_frame: usize,
        shards: usize,
        backplane: Arc<dyn Backplane>,
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
        let hub = Hub(Arc::new(Inner {
            node,
            cfg,
            max_frame,
            rooms: DashMap::new(),
            shards: senders.into(),
            dirty: (0..shards).map(|_| Mutex::new(Vec::new())).collect(),
            hasher: Default::default(),
            seq: AtomicU64::new(0),
            id_prefix,
            backplane,
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
                    history: VecDeque::new(),
                    dirty: false,
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
    ///
    /// # Errors
    /// [`JoinError::RoomFull`] past `room.max_members` local members;
    /// [`JoinError::ShuttingDown`] when the shard has stopped.
    pub async fn join(
        &self,
        room: &RoomId,
        conn: &Arc<Conn>,
        history: usize,
    ) -> Result<Joined, JoinError> {
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
        // Everything that waits on the backplane happens before the shard registers the
        // member: from then on its batches may be written, and `joined` must come first.
        let remote = if first {
            // Subscribe first, then read what the other nodes published before.
            self.0.backplane.interest(room);
            let bp = &self.0.backplane;
            let (earlier, remote) = tokio::join!(
                bp.recent(room, self.0.cfg.history_len),
                bp.online_elsewhere(room)
            );
            if !earlier.is_empty() {
                r.state
                    .lock()
                    .expect("room lock")
                    .seed_history(earlier, self.0.cfg.history_len);
            }
            remote
        } else {
            self.0.backplane.remote_online(room)
        };
        let (done, registered) = oneshot::channel();
        let sent = self.0.shards[shard]
            .send_async(ShardCmd::Join {
                room: Arc::clone(&r),
                conn: Arc::clone(conn),
                history,
                done,
            })
            .await;
        let history = match (sent, registered.await) {
            (Ok(()), Ok(history)) => history,
            _ => {
                self.forget_member(&r, shard);
                return Err(JoinError::ShuttingDown);
            }
        };
        metrics::hot().room_members.increment(1.0);
        r.state.lock().expect("room lock").last_active = Instant::now();
        Ok(Joined {
            online: r.online.load(Ordering::Acquire) + remote,
            history,
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
        st.recent(n)
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
                        // The window closes at most `batch_ms` after it started.
                        let window = Duration::from_millis(self.0.cfg.batch_ms);
                        let open = st.window_started.map_or(Duration::ZERO, |t| t.elapsed());
                        let wait = window.saturating_sub(open).as_millis() as u64;
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
                    return Ok(self.next_id());
                }
                st.chat_in_window += 1;
                st.chat_bytes_in_window += weight;
            }
            EventBody::Grab { .. } if self.0.cfg.max_grab_events > 0 => {
                if st.grabs_in_window >= self.0.cfg.max_grab_events {
                    drop(st);
                    counter_inc(metrics::GRAB_EVENTS_SAMPLED_OUT);
                    return Ok(self.next_id());
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
            return Ok(id);
        }
        st.pending.push(event);
        st.local.push(true);
        self.mark_dirty(&r, st);
        metrics::event(kind);
        Ok(id)
    }

    /// Queues events that another node published (already merged and budgeted there).
    pub fn inject(&self, room: &RoomId, events: Vec<Event>) {
        let r = Arc::clone(&self.room_or_create(room));
        let mut st = r.state.lock().expect("room lock");
        if st.removed {
            drop(st);
            return self.inject(room, events);
        }
        st.last_active = Instant::now();
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
            st.local.push(false);
        }
        self.mark_dirty(&r, st);
    }

    /// Puts `r` on its flusher's dirty list (once per window); consumes the room guard so
    /// the dirty-list lock is never taken under it.
    fn mark_dirty(&self, r: &Arc<Room>, mut st: std::sync::MutexGuard<'_, RoomState>) {
        if st.window_started.is_none() {
            st.window_started = Some(Instant::now());
        }
        if st.dirty {
            return;
        }
        st.dirty = true;
        drop(st);
        self.0.dirty[r.owner]
            .lock()
            .expect("dirty lock")
            .push(Arc::clone(r));
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

    async fn flusher_loop(self, index: usize, cancel: CancellationToken) {
        let mut batch_tick = tokio::time::interval(Duration::from_millis(self.0.cfg.batch_ms));
        batch_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut presence_tick =
            tokio::time::interval(Duration::from_millis(self.0.cfg.presence_ms));
        presence_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = batch_tick.tick() => self.flush(index).await,
                _ = presence_tick.tick() => self.sweep(index),
            }
        }
    }

    /// Sends one batch per dirty room of flusher `index`.
    async fn flush(&self, index: usize) {
        let dirty = std::mem::take(&mut *self.0.dirty[index].lock().expect("dirty lock"));
        let hot = metrics::hot();
        for room in dirty {
            let (events, accepted, seq) = {
                let mut st = room.state.lock().expect("room lock");
                st.dirty = false;
                let accepted = st.window_started.take().unwrap_or_else(Instant::now);
                st.gifts.clear();
                st.grabs_in_window = 0;
                st.gifts_in_window = 0;
                let events: Vec<Arc<Event>> = st.pending.drain(..).map(Arc::new).collect();
                let local: Vec<Arc<Event>> = events
                    .iter()
                    .zip(st.local.drain(..))
                    // Presence is each node's own view of the room; never forwarded.
                    .filter(|(e, local)| *local && !matches!(e.body, EventBody::Presence { .. }))
                    .map(|(e, _)| Arc::clone(e))
                    .collect();
                if !local.is_empty() {
                    self.0.backplane.publish(&room.id, &local);
                }
                let cap = self.0.cfg.history_len;
                for e in events.iter().filter(|e| e.body.in_history()) {
                    if st.history.len() == cap {
                        st.history.pop_front();
                    }
                    if cap > 0 {
                        st.history.push_back(Arc::clone(e));
                    }
                }
                if !events.is_empty() {
                    st.flushed += 1;
                }
                (events, accepted, st.flushed)
            };
            if events.is_empty() {
                continue;
            }
            hot.batches.increment(1);
            hot.batch_events.record(events.len() as f64);
            let batch = Arc::new(Batch::new(
                room.id.clone(),
                seq,
                events,
                accepted,
                self.0.max_frame,
            ));
            for (shard, members) in room.per_shard.iter().enumerate() {
                if members.load(Ordering::Acquire) > 0 {
                    let _ = self.0.shards[shard]
                        .send_async(ShardCmd::Deliver(Arc::clone(&batch)))
                        .await;
                }
            }
        }
    }

    /// Announces changed online counts and forgets idle empty rooms, for flusher `index`.
    fn sweep(&self, index: usize) {
        let idle_ttl = Duration::from_secs(self.0.cfg.idle_ttl_s);
        let mut changed = Vec::new();
        for r in self.0.rooms.iter().filter(|r| r.owner == index) {
            let local = r.online.load(Ordering::Acquire);
            if local == 0 {
                continue;
            }
            let online = local + self.0.backplane.remote_online(&r.id);
            let st = r.state.lock().expect("room lock");
            if online != st.presence_sent {
                changed.push((r.id.clone(), online));
            }
        }
        for (room, online) in changed {
            if let Some(r) = self.0.rooms.get(&room).map(|r| Arc::clone(&r)) {
                r.state.lock().expect("room lock").presence_sent = online;
            }
            self.publish(&room, EventBody::Presence { online });
        }
        let mut removed = 0u64;
        self.0.rooms.retain(|_, r| {
            if r.owner != index || r.online.load(Ordering::Acquire) > 0 {
                return true;
            }
            let mut st = r.state.lock().expect("room lock");
            let keep = st.dirty || !st.pending.is_empty() || st.last_active.elapsed() < idle_ttl;
            if !keep {
                st.removed = true;
                removed += 1;
            }
            keep
        });
        if removed > 0 {
            metrics::hot().rooms.decrement(removed as f64);
        }
    }
}

impl RoomState {
    /// Merges the room's history as the cluster kept it (`earlier`, oldest first) into
    /// what this node holds: each event once (by id), in time order, the newest `cap`.
    fn seed_history(&mut self, earlier: Vec<Event>, cap: usize) {
        let mut merged: Vec<Arc<Event>> = Vec::with_capacity(earlier.len() + self.history.len());
        // Events already waiting in this window go out (and into history) with it.
        let mut seen: std::collections::HashSet<String> =
            self.pending.iter().map(|e| e.id.clone()).collect();
        let local: std::collections::HashSet<String> =
            self.history.iter().map(|e| e.id.clone()).collect();
        self.seeded.clear();
        for e in earlier {
            if seen.insert(e.id.clone()) {
                if !local.contains(&e.id) {
                    self.seeded.insert(e.id.clone());
                }
                merged.push(Arc::new(e));
            }
        }
        for e in self.history.drain(..) {
            if seen.insert(e.id.clone()) {
                merged.push(e);
            }
        }
        // Stable: events of one millisecond keep the cluster's order, then this node's.
        merged.sort_by_key(|e| e.ts);
        let skip = merged.len().saturating_sub(cap);
        self.history = merged.into_iter().skip(skip).collect();
    }

    /// The last `n` history events, oldest first.
    fn recent(&self, n: usize) -> Vec<Arc<Event>> {
        let skip = self.history.len().saturating_sub(n);
        self.history.iter().skip(skip).cloned().collect()
    }
}

/// What a chat event adds to a member's download, as JSON: its text and user plus the
/// fixed part (`id`, `ts`, keys, separators), which is about 90 bytes.
fn chat_weight(user_id: &str, user_name: &str, text: &str) -> u64 {
    const FIXED: usize = 90;
    (FIXED + user_id.len() + user_name.len() + text.len()) as u64
}

/// A publish refused by a room budget: nothing was published.
struct Refused {
    retry_after_ms: u64,
}

fn counter_inc(name: &'static str) {
    ::metrics::counter!(name).increment(1);
}

/// One shard: the local members of its connections, per room.
async fn shard_loop(inbox: flume::Receiver<ShardCmd>, cancel: CancellationToken) {
    // Per room, its members on this shard and, per member, the last batch number its
    // `joined.history` held (batches up to it are skipped for that member).
    let mut rooms: HashMap<RoomId, HashMap<ConnId, (Arc<Conn>, u64)>> = HashMap::new();
    let hot = metrics::hot();
    loop {
        let cmd = tokio::select! {
            _ = cancel.cancelled() => break,
            cmd = inbox.recv_async() => match cmd { Ok(c) => c, Err(_) => break },
        };
        match cmd {
            ShardCmd::Join {
                room,
                conn,
                history,
                done,
            } => {
                // Under the room lock, so no batch is flushed between reading the history
                // and noting how far it goes.
                let (recent, seq) = {
                    let st = room.state.lock().expect("room lock");
                    (st.recent(history), st.flushed)
                };
                rooms
                    .entry(room.id.clone())
                    .or_default()
                    .insert(conn.id, (conn, seq));
                let _ = done.send(recent);
            }
            ShardCmd::Leave { room, conn } => {
                if let Some(members) = rooms.get_mut(&room) {
                    members.remove(&conn);
                    if members.is_empty() {
                        rooms.remove(&room);
                    }
                }
            }
            ShardCmd::Deliver(batch) => {
                let Some(members) = rooms.get(&batch.room) else {
                    continue;
                };
                let (mut queued, mut dropped) = (0u64, 0u64);
                for (conn, joined_at) in members.values() {
                    if batch.seq <= *joined_at {
                        continue;
                    }
                    for frame in batch.frames(conn.format) {
                        match conn.push(&frame.bytes, batch.accepted, frame.droppable) {
                            Push::Queued => queued += 1,
                            Push::Dropped => dropped += 1,
                            Push::Killed | Push::Gone => break,
                        }
                    }
                }
                hot.deliveries.increment(queued);
                if dropped > 0 {
                    hot.outbound_dropped.increment(dropped);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: u8) -> Bytes {
        Bytes::from(vec![n])
    }

    fn payload(o: &Outbound) -> u8 {
        o.frame[0]
    }

    #[tokio::test]
    async fn a_full_queue_drops_droppable_frames_and_kills_for_the_rest() {
        let conn = Conn::new(1, Format::Msgpack, 2);
        let now = Instant::now();
        assert_eq!(conn.push(&msg(1), now, false), Push::Queued);
        assert_eq!(conn.push(&msg(2), now, true), Push::Queued);
        assert_eq!(conn.push(&msg(3), now, true), Push::Dropped);
        assert_eq!(conn.push(&msg(4), now, false), Push::Killed);
        let code = tokio::time::timeout(Duration::from_secs(1), conn.killed())
            .await
            .expect("killed resolves");
        assert_eq!(code, CloseCode::SlowConsumer);
        // What was queued before the overflow is still there, in order.
        conn.queued().await;
        assert_eq!(payload(&conn.try_next().unwrap()), 1);
        assert_eq!(payload(&conn.try_next().unwrap()), 2);
        assert!(conn.try_next().is_none());
    }

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
            crate::config::MIN_OUT_FRAME_BYTES,
            1,
            Arc::new(crate::backplane::Local),
            &cancel,
            &tracker,
        );
        let room = RoomId::parse("r").unwrap();
        // "pending" arrived live and waits for its window; "old" was flushed earlier.
        hub.inject(&room, vec![system("old", 1)]);
        let r = Arc::clone(&hub.room_or_create(&room));
        {
            let mut st = r.state.lock().unwrap();
            let e = Arc::new(st.pending.remove(0));
            st.local.remove(0);
            st.history.push_back(e);
        }
        hub.inject(&room, vec![system("pending", 3)]);
        let earlier = vec![system("older", 0), system("old", 1), system("pending", 3)];
        r.state.lock().unwrap().seed_history(earlier, 10);
        let ids =
            |st: &RoomState| -> Vec<String> { st.history.iter().map(|e| e.id.clone()).collect() };
        assert_eq!(ids(&r.state.lock().unwrap()), ["older", "old"]);
        // "older" arriving live again (the subscription raced the read) is dropped.
        hub.inject(&room, vec![system("older", 0), system("new", 4)]);
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

    /// A partial write keeps the rest of the front frame first in line; whole frames
    /// leave the queue; nothing is copied or reordered.
    #[test]
    fn write_front_resumes_a_partly_written_frame() {
        use std::task::Poll;
        let conn = Conn::new(3, Format::Json, 8);
        let now = Instant::now();
        for f in [&b"abcd"[..], b"ef", b"ghi"] {
            assert_eq!(
                conn.push(&Bytes::copy_from_slice(f), now, false),
                Push::Queued
            );
        }
        let mut wire = Vec::new();
        let mut take = |budget: usize| {
            let Poll::Ready(Ok(w)) = conn.write_front(16, |slices| {
                let mut n = 0;
                for s in slices {
                    let k = s.len().min(budget - n);
                    wire.extend_from_slice(&s[..k]);
                    n += k;
                }
                Poll::Ready(Ok(n))
            }) else {
                panic!("ready");
            };
            w
        };
        let w = take(3);
        assert_eq!((w.frames, w.bytes, w.partial, w.more), (0, 3, true, true));
        let w = take(4);
        assert_eq!((w.frames, w.bytes, w.partial, w.more), (2, 4, true, true));
        let w = take(10);
        assert_eq!((w.frames, w.bytes, w.partial, w.more), (1, 2, false, false));
        assert_eq!(wire, b"abcdefghi");
    }

    #[tokio::test]
    async fn next_waits_for_a_push_and_a_closed_queue_refuses() {
        let conn = Conn::new(2, Format::Json, 4);
        let waiter = {
            let conn = Arc::clone(&conn);
            tokio::spawn(async move {
                conn.queued().await;
                payload(&conn.try_next().unwrap())
            })
        };
        tokio::task::yield_now().await;
        assert_eq!(conn.push(&msg(7), Instant::now(), true), Push::Queued);
        let got = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(got, 7);
        // A push before anyone waits is not lost either (the permit is kept).
        assert_eq!(conn.push(&msg(8), Instant::now(), true), Push::Queued);
        conn.queued().await;
        assert_eq!(payload(&conn.try_next().unwrap()), 8);
        conn.close_queue();
        assert_eq!(conn.push(&msg(9), Instant::now(), false), Push::Gone);
        assert!(conn.try_next().is_none());
    }
}
