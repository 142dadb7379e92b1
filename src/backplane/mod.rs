//! The backplane joins gateway nodes: room events published on one node reach the
//! members on every other node.
//!
//! The contract ([`Backplane`]): publishing is fire-and-forget and at-most-once (a node
//! that is down or cut off misses events; chat is ephemeral and red-packet state lives
//! in the store, not in the stream), and never late: a window that could not be sent
//! within a few seconds (the backplane was down) is dropped, not replayed to viewers
//! who have moved on. Per-origin order is kept, a node never receives its
//! own events back, and a node receives a room's events only while it holds members of
//! that room. Publishing happens once per room per batch window per node (the hub calls
//! [`Backplane::publish`] from its flusher with the window's local events), never once
//! per message or per connection: a hot room costs Redis O(nodes / window).
//!
//! A room's recent events are also kept where every node can read them
//! ([`Backplane::recent`]), so the first viewer of a room on a node gets the room's
//! history in `joined`, not only what this node happened to see.
//!
//! [`Local`] is the single-node backplane (nothing to join); [`redis::RedisBackplane`]
//! uses Redis pub/sub (sharded pub/sub on a cluster).

pub mod redis;

use std::sync::Arc;

use crate::protocol::{Event, RoomId};

pub const PUBLISHED: &str = "danmaku_backplane_published_total";
pub const RECEIVED: &str = "danmaku_backplane_received_total";
pub const DROPPED: &str = "danmaku_backplane_dropped_total";
pub const ERRORS: &str = "danmaku_backplane_errors_total";
pub const LAG: &str = "danmaku_backplane_lag_seconds";
pub const SUBSCRIPTIONS: &str = "danmaku_backplane_subscriptions";

#[async_trait::async_trait]
pub trait Backplane: Send + Sync {
    /// Sends a window's locally originated events of `room` to the other nodes. Must not
    /// block: implementations buffer (bounded) and drop, counting drops, when behind.
    fn publish(&self, room: &RoomId, events: &[Arc<Event>]);
    /// The local membership of `room` changed between zero and non-zero: subscribe or
    /// unsubscribe accordingly (the implementation re-reads the current state).
    fn interest(&self, room: &RoomId);
    /// Members of `room` on the other live nodes, as last synchronised; 0 once the last
    /// synchronisation is older than a node is presumed alive (the others' counts can no
    /// longer be told from a dead node's).
    fn remote_online(&self, room: &RoomId) -> u64;
    /// Members of `room` on the other live nodes, read fresh (for the HTTP API, which may
    /// ask about a room this node holds no members of).
    async fn online_elsewhere(&self, room: &RoomId) -> u64 {
        self.remote_online(room)
    }
    /// The room's last `n` events (oldest first) as every node published them, for a node
    /// that has just got its first member of `room` and so has not been receiving them.
    /// Best effort: empty when unreachable.
    async fn recent(&self, _room: &RoomId, _n: usize) -> Vec<Event> {
        Vec::new()
    }
    /// Whether the backplane can reach the other nodes right now.
    fn is_up(&self) -> bool;
    /// Short name for `/readyz` and logs.
    fn kind(&self) -> &'static str;
}

/// The single-node backplane: there is nobody else to tell.
pub struct Local;

#[async_trait::async_trait]
impl Backplane for Local {
    fn publish(&self, _room: &RoomId, _events: &[Arc<Event>]) {}
    fn interest(&self, _room: &RoomId) {}
    fn remote_online(&self, _room: &RoomId) -> u64 {
        0
    }
    fn is_up(&self) -> bool {
        true
    }
    fn kind(&self) -> &'static str {
        "local"
    }
}
