//! Flushers: one per shard index, each owning the rooms whose id hashes to it. Every
//! `room.batch_ms` a flusher takes each dirty room's window, appends it to the history,
//! publishes this node's events to the backplane, and hands one [`Batch`] to every shard
//! holding members of the room. Every `room.presence_ms` it announces changed online
//! counts and forgets idle empty rooms.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::Hub;
use super::shard::ShardCmd;
use super::window::Batch;
use crate::metrics;
use crate::protocol::{Event, EventBody};

impl Hub {
    pub(super) async fn flusher_loop(self, index: usize, cancel: CancellationToken) {
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
