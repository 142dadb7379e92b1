//! A room's state on this node: its current window, budgets, event log (history and
//! recovery, [`super::log`]), and where its members are. Publishing locks one room's state for a push; nothing is awaited under
//! the lock.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64};

use tokio::time::Instant;

use super::log::EventLog;
use crate::protocol::{Event, EventBody, RoomId};

/// A room's state on this node.
pub(super) struct Room {
    pub(super) id: RoomId,
    /// Index of the flusher that batches this room.
    pub(super) owner: usize,
    /// Local members (connections) on this node.
    pub(super) online: AtomicU64,
    /// Local members per shard, so a batch goes only to shards that have members.
    pub(super) per_shard: Box<[AtomicU32]>,
    pub(super) state: Mutex<RoomState>,
}

pub(super) struct RoomState {
    /// Events of the current window, in arrival order.
    pub(super) pending: Vec<Event>,
    /// Per pending event: None when it arrived from another node; for one that
    /// originated here (and so is published to the backplane), `remote_seq` when it was
    /// taken: how far into the cluster log this node had got before it.
    pub(super) local: Vec<Option<u64>>,
    /// Cluster log number of the last event taken from another node.
    pub(super) remote_seq: u64,
    /// Cluster log number of the first event this room state took from another node.
    /// Pub/sub is ordered and lossless while subscribed, so every event numbered from it
    /// on reaches this node, and none numbered below it ever will: what a recovery
    /// answer may leave to the member's batches (see `shard::Ask::Cluster`).
    pub(super) first_remote_seq: Option<u64>,
    /// Recent non-presence events, oldest first: the history and the recovery log.
    pub(super) log: EventLog,
    /// Whether the current window holds events not yet flushed: the room is then on its
    /// flusher's timer queue (`next_flush` set) or on its urgent list (not set).
    pub(super) dirty: bool,
    /// Set while the room is on its flusher's timer queue: when its current window may
    /// be flushed (`room.batch_ms` after the last). None: the room is quiet, and its next
    /// event is flushed at once. Read and written under this lock only.
    pub(super) next_flush: Option<Instant>,
    /// When the first event of the current window was accepted.
    pub(super) window_started: Option<Instant>,
    /// Online count last announced by a `presence` event.
    pub(super) presence_sent: u64,
    /// Last join, leave or event: an empty room is forgotten `idle_ttl_s` after this.
    pub(super) last_active: Instant,
    /// (user id, gift id) → index in `pending` of this window's gift event, so the same
    /// user's same gift is merged (counts summed) instead of repeated.
    pub(super) gifts: HashMap<(String, String), usize>,
    /// Start of the current one-second window of the room's chat budget.
    pub(super) chat_window: Instant,
    /// Chat broadcast in the current window (against `room.max_chat_per_s`).
    pub(super) chat_in_window: u64,
    /// Their weight ([`chat_weight`]) against `room.max_chat_bytes_per_s`.
    pub(super) chat_bytes_in_window: u64,
    /// `grab` events in the current window (against `room.max_grab_events`).
    pub(super) grabs_in_window: u64,
    /// Client gift events in the current window (against `room.max_gift_events`).
    pub(super) gifts_in_window: u64,
    /// Number of the last batch flushed (its events are in `history`).
    pub(super) flushed: u64,
    /// Set by the idle sweep as it drops the room from the registry: a publisher that
    /// found the room just before must retry on the live one, or its event is lost.
    pub(super) removed: bool,
    /// Ids of events put into `history` from the backplane's list rather than received
    /// live; one that then also arrives live is not kept or delivered twice.
    pub(super) seeded: std::collections::HashSet<String>,
}

impl RoomState {
    /// Merges the room's history as the cluster kept it (`earlier`, oldest first) into
    /// what this node holds: each event once (by id), in time order, within the log's
    /// bounds.
    pub(super) fn seed_history(&mut self, earlier: Vec<Event>) {
        // Events already waiting in this window go out (and into the log) with it.
        let mut seen: std::collections::HashSet<String> =
            self.pending.iter().map(|e| e.id.clone()).collect();
        let local = self.log.ids();
        let mut merged: Vec<(Arc<Event>, u64)> = Vec::with_capacity(earlier.len() + local.len());
        self.seeded.clear();
        for e in earlier {
            if seen.insert(e.id.clone()) {
                if !local.contains(&e.id) {
                    self.seeded.insert(e.id.clone());
                }
                merged.push((Arc::new(e), 0));
            }
        }
        for (e, batch) in self.log.drain() {
            if seen.insert(e.id.clone()) {
                merged.push((e, batch));
            }
        }
        // Stable: events of one millisecond keep the cluster's order, then this node's.
        merged.sort_by_key(|(e, _)| e.ts);
        // A recall in the cluster's list takes back what it names, as it did live.
        let recalled: std::collections::HashSet<String> = merged
            .iter()
            .filter_map(|(e, _)| match &e.body {
                EventBody::Recall { target } => Some(target.clone()),
                _ => None,
            })
            .collect();
        if !recalled.is_empty() {
            merged.retain(|(e, _)| !recalled.contains(&e.id));
        }
        self.log.replace(merged);
    }
}

/// What a chat event adds to a member's download, as JSON: its text and user plus the
/// fixed part (`id`, `ts`, keys, separators), which is about 90 bytes.
pub(super) fn chat_weight(user_id: &str, user_name: &str, text: &str) -> u64 {
    const FIXED: usize = 90;
    (FIXED + user_id.len() + user_name.len() + text.len()) as u64
}
