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
//! history in `joined`, not only what this node happened to see; in a cluster that
//! store is the room's **cluster log**, numbered in one order for the whole cluster,
//! from which a client reconnecting to any node recovers ([`Backplane::recover`]).
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
    /// `seen[i]`: the cluster log number of the last event from another node that this
    /// node had taken into the room before `events[i]` (see [`ClusterRecovery`]).
    fn publish(&self, room: &RoomId, events: &[Arc<Event>], seen: &[u64]);
    /// The local membership of `room` changed between zero and non-zero: subscribe or
    /// unsubscribe accordingly (the implementation re-reads the current state).
    fn interest(&self, room: &RoomId);
    /// [`Backplane::interest`] for a room that just got its first local member, waiting
    /// until the subscription is in place: events published from then on will arrive,
    /// so the room's log can be read without a hole between what the read returns and
    /// what pub/sub brings. `false` when it could not be confirmed in time (the
    /// subscriber is down or slow): a recovery must then not answer `true`.
    async fn subscribe_now(&self, room: &RoomId) -> bool;
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
    /// What followed the event `since` in `room`, from the cluster log; None where
    /// there is no cluster log (a single node answers from its own log).
    async fn recover(&self, _room: &RoomId, _since: &str) -> Option<ClusterRecovery> {
        None
    }
    /// Whether the backplane can reach the other nodes right now.
    fn is_up(&self) -> bool;
    /// Short name for `/readyz` and logs.
    fn kind(&self) -> &'static str;
}

/// A recovery answered from the cluster log. Nodes deliver their own events at once and
/// the others' as pub/sub brings them, so no two nodes need deliver a room in the same
/// order; the log's order is the one Redis gave, and each of a node's own events
/// carries how far into that order the node had got when it took the event (`seen`).
/// From that the answer is every event a client of *any* node may have missed after
/// `since`: those after it in the log, and those of other origins between its `seen`
/// and it (which its own node delivered after it). A client may thus get again an event
/// it already had, never miss one; it drops repeats by id.
#[derive(Debug, Default)]
pub struct ClusterRecovery {
    /// The events after `since` (oldest first), recalled ones taken out.
    pub events: Vec<Event>,
    /// Per event: its log number, and the node it came from.
    pub logged: Vec<(u64, String)>,
    /// False when the log cannot prove it holds them all.
    pub recovered: bool,
}

/// The single-node backplane: there is nobody else to tell.
pub struct Local;

#[async_trait::async_trait]
impl Backplane for Local {
    fn publish(&self, _room: &RoomId, _events: &[Arc<Event>], _seen: &[u64]) {}
    fn interest(&self, _room: &RoomId) {}
    async fn subscribe_now(&self, _room: &RoomId) -> bool {
        true
    }
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
