//! One shard: the local members of the connections hashed to it, per room. It
//! registers joins (reading the history under the room lock), forgets leaves, and fans
//! each window out to its members, writing each plain member's frame inline
//! ([`Conn::push`]) and queueing only what a socket does not take. A giant room is spread
//! over every shard, and a window crosses threads once per shard, never per member.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::conn::{Conn, ConnId, Push};
use super::log::Recovery;
use super::room::Room;
use super::room::RoomState;
use super::window::Batch;
use crate::metrics;
use crate::protocol::{Event, RoomId};

pub(super) enum ShardCmd {
    /// Registers `conn` and answers what `ask` asks ([`Recovery`]).
    Join {
        room: Arc<Room>,
        conn: Arc<Conn>,
        ask: Ask,
        done: oneshot::Sender<Recovery>,
    },
    Leave {
        room: RoomId,
        conn: ConnId,
    },
    Deliver(Arc<Batch>),
}

/// What a joining member's `joined.history` holds.
pub(super) enum Ask {
    /// The last `n` events.
    Recent(usize),
    /// What followed `since` in this node's log, else the last `n` (single node).
    Since(String, usize),
    /// Recovered from the cluster log: `events`, and what this node delivered in its
    /// batches after `after` (read before the cluster log was, so nothing falls between).
    /// `in_flight`: per event, its log number when it came from another node, if this
    /// node was receiving the room's events before the read: one numbered above what
    /// the room has taken yet, and not below the first it ever took (pub/sub brings
    /// everything from that one on, nothing before it), is still on its way here and
    /// comes in a batch. Before the room took any, nothing is left to the batches: a
    /// member may then get an event twice (it drops it by id), never miss one.
    Cluster {
        events: Vec<Arc<Event>>,
        in_flight: Option<Vec<Option<u64>>>,
        after: u64,
    },
    /// The cluster log could not recover: the last `n` events.
    Missed(usize),
}

impl Ask {
    /// The answer, read from the room's state under its lock.
    fn answer(self, st: &RoomState) -> Recovery {
        let log = &st.log;
        match self {
            Ask::Recent(n) | Ask::Missed(n) => Recovery {
                events: log.recent(n),
                recovered: false,
            },
            Ask::Since(since, n) => log.since(&since, n),
            Ask::Cluster {
                mut events,
                in_flight,
                after,
            } => {
                // Still on its way from another node: it comes in a batch.
                if let (Some(seqs), Some(first)) = (in_flight, st.first_remote_seq) {
                    let mut seqs = seqs.into_iter();
                    events.retain(|_| {
                        seqs.next()
                            .flatten()
                            .is_none_or(|seq| seq < first || seq <= st.remote_seq)
                    });
                }
                // What already waits in the room's window goes out in its next batch,
                // which reaches the member: not in `joined` too.
                if !st.pending.is_empty() {
                    let pending: HashSet<&str> = st.pending.iter().map(|e| e.id.as_str()).collect();
                    events.retain(|e| !pending.contains(e.id.as_str()));
                }
                let mut ids: HashSet<String> = events.iter().map(|e| e.id.clone()).collect();
                for e in log.after_batch(after) {
                    if ids.insert(e.id.clone()) {
                        events.push(e);
                    }
                }
                Recovery {
                    events,
                    recovered: true,
                }
            }
        }
    }
}

/// One shard: the local members of its connections, per room.
pub(super) async fn shard_loop(inbox: flume::Receiver<ShardCmd>, cancel: CancellationToken) {
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
                ask,
                done,
            } => {
                // Under the room lock, so no batch is flushed between reading the log
                // and noting how far it goes: what the answer holds is not sent again,
                // what it lacks comes in the member's next batches.
                let (recent, seq) = {
                    let st = room.state.lock().expect("room lock");
                    (ask.answer(&st), st.flushed)
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
                // Frames this shard wrote itself (the common case), counted once per
                // window rather than per member.
                let (mut written, mut bytes, mut deflated) = (0u64, 0u64, 0u64);
                for (conn, joined_at) in members.values() {
                    if batch.seq <= *joined_at {
                        continue;
                    }
                    for frame in batch.frames(conn.format, conn.deflate) {
                        match conn.push(&frame.bytes, batch.accepted, frame.droppable) {
                            Push::Written => {
                                written += 1;
                                bytes += frame.bytes.len() as u64;
                                deflated += u64::from(frame.compressed);
                            }
                            Push::Queued => {
                                queued += 1;
                                deflated += u64::from(frame.compressed);
                            }
                            Push::Dropped => dropped += 1,
                            Push::Killed | Push::Gone => break,
                        }
                    }
                }
                hot.deliveries.increment(queued + written);
                if deflated > 0 {
                    hot.deliveries_deflated.increment(deflated);
                }
                if written > 0 {
                    hot.frames_out.increment(written);
                    hot.bytes_out.increment(bytes);
                    // One observation per shard per window: when its last inline write
                    // of the window was done.
                    hot.broadcast_latency
                        .record(batch.accepted.elapsed().as_secs_f64());
                }
                if dropped > 0 {
                    hot.outbound_dropped.increment(dropped);
                }
            }
        }
    }
}
