//! Flushers: one per shard index, each owning the rooms whose id hashes to it. Flushing
//! a room takes its window (the events gathered since its last flush), appends it to the
//! history, publishes this node's events to the backplane (and records them on the
//! event stream, once per window), and hands one [`Batch`] to
//! every shard holding members of the room. Every `room.presence_ms` a flusher also
//! announces changed online counts and forgets idle empty rooms.
//!
//! Windows are leading-edge, `room.batch_ms` long:
//! - A **quiet** room (nothing flushed during the last `batch_ms`) sends its next event
//!   at once: [`Hub::mark_dirty`] puts it on its flusher's urgent list and wakes the
//!   flusher, which flushes it right away. A lone chat thus waits for no tick.
//! - That flush opens a window: the room stays on the flusher's timer queue until
//!   `batch_ms` later, and what it gets meanwhile is gathered and flushed together when
//!   the window ends (promptly: the flusher sleeps until the earliest end).
//! - A room still busy then (a **hot** room) is flushed every `batch_ms`, on a fixed
//!   schedule, as a plain tick would; one that sent nothing during its last window
//!   leaves the queue, and its next event again goes at once.
//!
//! So a member gets at most one window of a room per `batch_ms` (a window may still be
//! cut into several frames by the outbound frame bound). A window opened by an
//! immediate flush at `t0` is flushed no earlier than `t0 + batch_ms`; a hot room's
//! windows keep their schedule within [`SLACK`] of the timer's lateness. The queue is a
//! heap of the rooms flushed during the last window, so a flusher's work is O(log n) per
//! flushed window, and it sleeps while all its rooms are quiet.
//!
//! Whether a room is on the queue (`next_flush`) is read and written under the room's
//! lock, by the flusher and by `mark_dirty` alike, so an event either finds its room
//! queued (and is flushed when the window ends) or wakes the flusher; none is left
//! waiting for a wake-up that never comes.

use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::Hub;
use super::room::Room;
use super::shard::ShardCmd;
use super::window::Batch;
use crate::metrics;
use crate::protocol::{Event, EventBody};
use crate::stream::Status;

/// A hot room's next window is due `batch_ms` after the previous one was *due*, not
/// after it was flushed, so the timer's lateness (it wakes on a millisecond tick) does
/// not stretch every window; lateness beyond this restarts the schedule from the flush.
/// Two windows are thus never closer than `batch_ms - SLACK` (and never closer than half
/// a window).
const SLACK: Duration = Duration::from_millis(1);

/// A flusher's inbox, shared with publishers.
#[derive(Default)]
pub(super) struct Inbox {
    /// Quiet rooms that got an event: flushed at once.
    pub(super) urgent: Mutex<Vec<Arc<Room>>>,
    /// Woken once something is pushed onto `urgent`.
    pub(super) wake: Notify,
}

/// A room on its flusher's timer queue: its window may be flushed from `at`.
struct Due {
    at: Instant,
    room: Arc<Room>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    /// Reversed: `BinaryHeap` is a max-heap, the earliest window must be on top.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        other.at.cmp(&self.at)
    }
}

impl Hub {
    pub(super) async fn flusher_loop(self, index: usize, cancel: CancellationToken) {
        let window = Duration::from_millis(self.0.cfg.batch_ms);
        let mut presence_tick =
            tokio::time::interval(Duration::from_millis(self.0.cfg.presence_ms));
        presence_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let inbox = &self.0.flushers[index];
        // Rooms flushed during the last window, earliest end first.
        let mut queue: BinaryHeap<Due> = BinaryHeap::new();
        // Swapped with the inbox's list, so neither allocates once grown.
        let mut urgent: Vec<Arc<Room>> = Vec::new();
        loop {
            let next = queue.peek().map(|d| d.at);
            tokio::select! {
                _ = cancel.cancelled() => {
                    self.flush_last(index, window).await;
                    break;
                }
                _ = inbox.wake.notified() => {}
                _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)),
                    if next.is_some() => {}
                _ = presence_tick.tick() => self.sweep(index),
            }
            self.flush_ready(index, window, &mut queue, &mut urgent)
                .await;
        }
    }

    /// At shutdown: every window still open is flushed, so what was accepted (and
    /// acked) reaches the other nodes and the event stream, not only this node's members.
    async fn flush_last(&self, index: usize, window: Duration) {
        let rooms: Vec<Arc<Room>> = self
            .0
            .rooms
            .iter()
            .filter(|r| r.owner == index)
            .map(|r| Arc::clone(&r))
            .collect();
        for room in rooms {
            self.flush(&room, None, window).await;
        }
    }

    /// Flushes the windows of flusher `index` that have ended, then the urgent rooms.
    async fn flush_ready(
        &self,
        index: usize,
        window: Duration,
        queue: &mut BinaryHeap<Due>,
        urgent: &mut Vec<Arc<Room>>,
    ) {
        // Read once: a window re-queued below ends later, so this loop ends.
        let now = Instant::now();
        while queue.peek().is_some_and(|d| d.at <= now) {
            let Due { at, room } = queue.pop().expect("peeked");
            if let Some(next) = self.flush(&room, Some(at), window).await {
                queue.push(Due { at: next, room });
            }
        }
        std::mem::swap(
            &mut *self.0.flushers[index].urgent.lock().expect("urgent lock"),
            urgent,
        );
        for room in urgent.drain(..) {
            if let Some(next) = self.flush(&room, None, window).await {
                queue.push(Due { at: next, room });
            }
        }
    }

    /// Sends `room`'s window as one batch, if it has one. `due`: when the window ended
    /// (None: an urgent room, quiet until now). Returns when the room's next window may
    /// go, for the queue; None when the room is (again) quiet and off the queue.
    async fn flush(&self, room: &Room, due: Option<Instant>, window: Duration) -> Option<Instant> {
        let hot = metrics::hot();
        let (events, accepted, seq, next) = {
            let mut st = room.state.lock().expect("room lock");
            if !st.dirty {
                // Nothing during its last window: its next event goes at once.
                st.next_flush = None;
                return None;
            }
            st.dirty = false;
            let now = Instant::now();
            let accepted = st.window_started.take().unwrap_or(now);
            st.gifts.clear();
            st.grabs_in_window = 0;
            st.gifts_in_window = 0;
            let events: Vec<Arc<Event>> = st.pending.drain(..).map(Arc::new).collect();
            let (mut local, mut seen) = (Vec::new(), Vec::new());
            for (e, origin) in events.iter().zip(st.local.drain(..)) {
                // Presence is each node's own view of the room; never forwarded.
                if let Some(s) = origin.filter(|_| !matches!(e.body, EventBody::Presence { .. })) {
                    local.push(Arc::clone(e));
                    seen.push(s);
                }
            }
            if !local.is_empty() {
                self.0.backplane.publish(&room.id, &local, &seen);
                self.0.stream.events(&room.id, Status::Broadcast, &local);
            }
            let batch_no = st.flushed + 1;
            for e in events.iter().filter(|e| e.body.in_history()) {
                st.log.push(Arc::clone(e), batch_no);
            }
            if !events.is_empty() {
                st.flushed += 1;
            }
            // A window that sent nothing opens none: the room stays (or turns) quiet.
            let next = (!events.is_empty()).then(|| match due {
                // A hot room keeps its schedule unless the flush came late.
                Some(at) => (at + window).max(now + (window - SLACK.min(window / 2))),
                None => now + window,
            });
            st.next_flush = next;
            (events, accepted, st.flushed, next)
        };
        if events.is_empty() {
            return next;
        }
        hot.batches.increment(1);
        hot.batch_events.record(events.len() as f64);
        let batch = Arc::new(Batch::new(
            room.id.clone(),
            seq,
            events,
            accepted,
            self.0.encoding,
        ));
        for (shard, members) in room.per_shard.iter().enumerate() {
            if members.load(Ordering::Acquire) > 0 {
                let _ = self.0.shards[shard]
                    .send_async(ShardCmd::Deliver(Arc::clone(&batch)))
                    .await;
            }
        }
        next
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
