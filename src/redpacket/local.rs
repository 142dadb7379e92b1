//! The embedded red-packet store: packets in memory, every create and grab in the
//! fsynced journal before it is acknowledged, state rebuilt from the journal at start.
//!
//! A grab reserves its share under the lock (the user is marked, an amount popped, the
//! in-flight count raised), releases the lock, waits for the journal, then settles: on
//! success the grab is recorded, on a journal failure the reservation is undone. So two
//! connections of one user racing each other see the mark of the first, and no lock is
//! held across the fsync.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;

use async_trait::async_trait;

use super::journal::{Journal, JournalError, Record};
use super::{Done, GrabError, GrabRecord, Grabbed, NewPacket, PacketStatus, Store, StoreError};
use crate::protocol::{OpenPacket, RoomId, User, now_ms};

struct Packet {
    room: RoomId,
    sender: User,
    total: u64,
    shares: u32,
    /// Shares not yet handed out (popped from the end).
    remaining: Vec<u64>,
    /// Users holding a share, including grabs still being journaled.
    holders: HashSet<String>,
    /// Recorded (durable) grabs, in order.
    grabs: Vec<GrabRecord>,
    in_flight: usize,
    expires_at: u64,
    expired: bool,
    /// Set once `redpacket_done` is due (last share recorded, or expiry).
    finished: bool,
}

impl Packet {
    fn is_expired(&self, now: u64) -> bool {
        self.expired || now >= self.expires_at
    }

    fn done(&self) -> Done {
        Done {
            grabbed: self.grabs.len() as u32,
            total_grabbed: self.grabs.iter().map(|g| g.amount).sum(),
            expired: self.expired,
        }
    }

    /// Finishes the packet if nothing is left to happen to it; returns how it ended.
    fn try_finish(&mut self) -> Option<Done> {
        if !self.finished && self.in_flight == 0 && (self.remaining.is_empty() || self.expired) {
            self.finished = true;
            return Some(self.done());
        }
        None
    }
}

#[derive(Default)]
struct State {
    packets: HashMap<String, Packet>,
}

pub struct LocalStore {
    journal: Journal,
    state: Mutex<State>,
    max_concurrent: usize,
    retain_ms: u64,
}

impl LocalStore {
    /// Opens the journal under `dir` and replays it.
    ///
    /// # Errors
    /// The journal cannot be opened or read.
    pub fn open(dir: &Path, max_concurrent: usize, retain_s: u64) -> Result<Self, JournalError> {
        let (journal, records) = Journal::open(dir)?;
        let store = Self {
            journal,
            state: Mutex::new(State::default()),
            max_concurrent,
            retain_ms: retain_s * 1000,
        };
        store.replay(records);
        Ok(store)
    }

    fn replay(&self, records: Vec<Record>) {
        let now = now_ms();
        let mut st = self.state.lock().expect("store lock");
        for record in records {
            match record {
                Record::Create {
                    packet,
                    room,
                    sender,
                    total,
                    shares,
                    amounts,
                    expires_at,
                    ..
                } => {
                    let Ok(room) = RoomId::parse(&room) else {
                        continue;
                    };
                    st.packets.insert(
                        packet,
                        Packet {
                            room,
                            sender,
                            total,
                            shares,
                            remaining: amounts,
                            holders: HashSet::new(),
                            grabs: Vec::new(),
                            in_flight: 0,
                            expires_at,
                            expired: false,
                            finished: false,
                        },
                    );
                }
                Record::Grab {
                    packet,
                    user,
                    amount,
                    ..
                } => {
                    let Some(p) = st.packets.get_mut(&packet) else {
                        continue;
                    };
                    // Grabs name their amount, so replay order does not matter.
                    if let Some(i) = p.remaining.iter().position(|&a| a == amount)
                        && p.holders.insert(user.id.clone())
                    {
                        p.remaining.swap_remove(i);
                        p.grabs.push(GrabRecord { user, amount });
                    }
                }
            }
        }
        let retain = self.retain_ms;
        st.packets.retain(|_, p| p.expires_at + retain > now);
        for p in st.packets.values_mut() {
            if p.is_expired(now) {
                p.expired = true;
            }
            // Done events of the past were announced before the restart (or the room
            // has moved on); do not repeat them.
            p.finished = p.remaining.is_empty() || p.expired;
        }
    }

    /// Forgets finished packets past their retention.
    fn prune(st: &mut State, retain_ms: u64, now: u64) {
        st.packets
            .retain(|_, p| !p.finished || p.expires_at + retain_ms > now);
    }
}

#[async_trait]
impl Store for LocalStore {
    async fn create(&self, p: NewPacket) -> Result<(), StoreError> {
        self.journal
            .append(Record::Create {
                packet: p.packet.clone(),
                room: p.room.to_string(),
                sender: p.sender.clone(),
                total: p.total,
                shares: p.shares,
                amounts: p.amounts.clone(),
                created_at: p.created_at,
                expires_at: p.expires_at,
            })
            .await
            .map_err(|e| StoreError(e.to_string()))?;
        let mut st = self.state.lock().expect("store lock");
        Self::prune(&mut st, self.retain_ms, now_ms());
        st.packets.insert(
            p.packet,
            Packet {
                room: p.room,
                sender: p.sender,
                total: p.total,
                shares: p.shares,
                remaining: p.amounts,
                holders: HashSet::new(),
                grabs: Vec::new(),
                in_flight: 0,
                expires_at: p.expires_at,
                expired: false,
                finished: false,
            },
        );
        Ok(())
    }

    async fn grab(&self, room: &RoomId, packet: &str, user: &User) -> Result<Grabbed, GrabError> {
        let now = now_ms();
        let amount = {
            let mut st = self.state.lock().expect("store lock");
            let p = match st.packets.get_mut(packet) {
                Some(p) if p.room == *room => p,
                _ => return Err(GrabError::NotFound),
            };
            if p.holders.contains(&user.id) {
                return Err(GrabError::AlreadyGrabbed);
            }
            if p.is_expired(now) {
                return Err(GrabError::Expired);
            }
            if p.remaining.is_empty() {
                return Err(GrabError::Empty);
            }
            if p.in_flight >= self.max_concurrent {
                return Err(GrabError::Busy);
            }
            let amount = p.remaining.pop().expect("checked non-empty");
            p.holders.insert(user.id.clone());
            p.in_flight += 1;
            amount
        };
        let durable = self
            .journal
            .append(Record::Grab {
                packet: packet.to_string(),
                room: room.to_string(),
                user: user.clone(),
                amount,
                ts: now,
            })
            .await;
        let mut st = self.state.lock().expect("store lock");
        let p = st
            .packets
            .get_mut(packet)
            .expect("a packet with grabs in flight is never pruned");
        p.in_flight -= 1;
        match durable {
            Ok(()) => {
                p.grabs.push(GrabRecord {
                    user: user.clone(),
                    amount,
                });
                Ok(Grabbed {
                    amount,
                    done: p.try_finish(),
                })
            }
            Err(e) => {
                // Not durable, so not granted: put the share back.
                p.remaining.push(amount);
                p.holders.remove(&user.id);
                Err(GrabError::Store(e.to_string()))
            }
        }
    }

    async fn expire(&self, packet: &str) -> Result<Option<Done>, StoreError> {
        let mut st = self.state.lock().expect("store lock");
        let Some(p) = st.packets.get_mut(packet) else {
            return Ok(None);
        };
        if p.finished {
            return Ok(None);
        }
        p.expired = true;
        Ok(p.try_finish())
    }

    async fn status(&self, packet: &str) -> Result<Option<PacketStatus>, StoreError> {
        let now = now_ms();
        let st = self.state.lock().expect("store lock");
        Ok(st.packets.get(packet).map(|p| {
            let done = p.done();
            PacketStatus {
                packet: packet.to_string(),
                room: p.room.to_string(),
                total: p.total,
                shares: p.shares,
                grabbed: done.grabbed,
                total_grabbed: done.total_grabbed,
                remaining: p.shares - done.grabbed,
                remaining_amount: p.total - done.total_grabbed,
                expired: p.is_expired(now),
                expires_at: p.expires_at,
                grabs: p.grabs.clone(),
            }
        }))
    }

    async fn open_in(&self, room: &RoomId) -> Result<Vec<OpenPacket>, StoreError> {
        let now = now_ms();
        let st = self.state.lock().expect("store lock");
        let mut open: Vec<OpenPacket> = st
            .packets
            .iter()
            .filter(|(_, p)| p.room == *room && !p.remaining.is_empty() && !p.is_expired(now))
            .map(|(id, p)| OpenPacket {
                packet: id.clone(),
                user: p.sender.clone(),
                total: p.total,
                shares: p.shares,
                expires_at: p.expires_at,
                remaining: p.remaining.len() as u32,
            })
            .collect();
        open.sort_by_key(|p| p.expires_at);
        Ok(open)
    }

    async fn open_packets(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let st = self.state.lock().expect("store lock");
        Ok(st
            .packets
            .iter()
            .filter(|(_, p)| !p.finished)
            .map(|(id, p)| (id.clone(), p.expires_at))
            .collect())
    }
}
