//! Red packets (hongbao): creation with pre-split amounts, grabs that are exactly-once
//! per user and durable before they are acknowledged, a per-packet cap on grabs in
//! flight, expiry, and the room events that announce all of it.
//!
//! The seed's incident: packets that could reach only 300 people. Here a packet serves
//! a whole room: amounts are split once at creation ([`split`]), a grab pops one under
//! a short lock and is acknowledged after the record is fsynced (group commit, so a
//! storm costs few fsyncs), and beyond `max_concurrent_grabs` in flight a grab answers
//! `busy` instead of queueing without bound.
//!
//! [`Store`] is the seam between this service and where packets live: [`local`] keeps
//! them in memory with a journal under `data.dir` (embedded mode); a Redis store plugs
//! in behind the same trait for clusters. The service ([`RedPackets`]) owns what does
//! not depend on the store: validation, splitting, events, expiry timers.
//!
//! A packet's `grab` and `redpacket_done` events go out through [`Announce`], called by
//! the store: only the store knows the order its grabs and its expiry commit in, and
//! events published by each caller after the fact could reach the room out of it (a
//! grab after the `redpacket_done` that counted it).

pub mod journal;
pub mod local;
pub mod redis;
pub mod split;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::RedPacketConfig;
use crate::hub::Hub;
use crate::metrics;
use crate::protocol::{ErrorCode, EventBody, OpenPacket, ProtoError, RoomId, User, now_ms};

/// Most shares one packet may have.
pub const MAX_SHARES: u32 = 100_000;
/// Largest total, in cents (100 million in the currency's main unit): beyond any real
/// packet, and far from overflowing sums.
pub const MAX_TOTAL: u64 = 10_000_000_000;

/// A packet as the store keeps it at creation.
#[derive(Debug, Clone, PartialEq)]
pub struct NewPacket {
    pub packet: String,
    pub room: RoomId,
    pub sender: User,
    pub total: u64,
    pub shares: u32,
    pub amounts: Vec<u64>,
    pub created_at: u64,
    pub expires_at: u64,
}

/// How a finished packet ended (the `redpacket_done` event's fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub grabbed: u32,
    pub total_grabbed: u64,
    pub expired: bool,
}

/// A successful grab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grabbed {
    pub amount: u64,
    /// Set when this grab took the last share (the packet is finished).
    pub done: Option<Done>,
}

/// Why a grab was refused; each maps to a protocol error code.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GrabError {
    #[error("no such packet in this room")]
    NotFound,
    #[error("you already grabbed this packet")]
    AlreadyGrabbed,
    #[error("the packet has expired")]
    Expired,
    #[error("all shares are taken")]
    Empty,
    #[error("too many grabs in flight, try again")]
    Busy,
    #[error("store unavailable: {0}")]
    Store(String),
}

impl GrabError {
    pub fn code(&self) -> ErrorCode {
        match self {
            GrabError::NotFound => ErrorCode::PacketNotFound,
            GrabError::AlreadyGrabbed => ErrorCode::AlreadyGrabbed,
            GrabError::Expired => ErrorCode::PacketExpired,
            GrabError::Empty => ErrorCode::PacketEmpty,
            GrabError::Busy => ErrorCode::Busy,
            GrabError::Store(_) => ErrorCode::Internal,
        }
    }
}

/// A store operation that failed for reasons of the store itself.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("red-packet store: {0}")]
pub struct StoreError(pub String);

/// One grab as `GET /api/v1/redpackets/{packet}` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GrabRecord {
    pub user: User,
    pub amount: u64,
}

/// A packet's full state for the HTTP API.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PacketStatus {
    pub packet: String,
    pub room: String,
    pub total: u64,
    pub shares: u32,
    pub grabbed: u32,
    pub total_grabbed: u64,
    pub remaining: u32,
    /// Cents not handed out (reported after expiry).
    pub remaining_amount: u64,
    pub expired: bool,
    pub expires_at: u64,
    pub grabs: Vec<GrabRecord>,
}

/// Where a store announces what it commits: a packet's `grab` and `redpacket_done`
/// events. Implementations are quick and never block on the store.
pub trait Announce: Send + Sync + 'static {
    fn grab(&self, room: &RoomId, packet: &str, user: &User, amount: u64);
    fn done(&self, room: &RoomId, packet: &str, done: Done);
}

impl Announce for Hub {
    fn grab(&self, room: &RoomId, packet: &str, user: &User, amount: u64) {
        self.publish(
            room,
            EventBody::Grab {
                packet: packet.to_string(),
                user: user.clone(),
                amount,
            },
        );
    }

    fn done(&self, room: &RoomId, packet: &str, done: Done) {
        self.publish(
            room,
            EventBody::RedpacketDone {
                packet: packet.to_string(),
                grabbed: done.grabbed,
                total_grabbed: done.total_grabbed,
                expired: done.expired,
            },
        );
    }
}

/// A packet a [`Store::sweep`] finished, whose `redpacket_done` the caller announces.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub room: RoomId,
    pub packet: String,
    pub done: Done,
}

/// Where packets live. Contract for every implementation:
/// - `grab` gives a user at most one share of a packet, ever, however many connections
///   or nodes it grabs from at once; it returns only after the grab is durable;
/// - at most `max_concurrent` grabs of one packet are in flight; beyond → `Busy`, no
///   effect;
/// - shares are the creation's pre-split amounts, each handed out once.
#[async_trait]
pub trait Store: Send + Sync {
    /// A fresh, unique packet id (a store may encode placement in it).
    fn new_packet_id(&self, node: &str) -> String {
        format!("rp-{node}-{:016x}", rand::random::<u64>())
    }
    /// Stores a new packet durably.
    async fn create(&self, packet: NewPacket) -> Result<(), StoreError>;
    /// Takes one share of `packet` (in `room`) for `user`.
    async fn grab(&self, room: &RoomId, packet: &str, user: &User) -> Result<Grabbed, GrabError>;
    /// Marks `packet` expired; returns how it ended if this call finished it.
    async fn expire(&self, packet: &str) -> Result<Option<Done>, StoreError>;
    /// The packet's state, if known.
    async fn status(&self, packet: &str) -> Result<Option<PacketStatus>, StoreError>;
    /// Packets of `room` still open, for `joined.redpackets`.
    async fn open_in(&self, room: &RoomId) -> Result<Vec<OpenPacket>, StoreError>;
    /// Open packets and their expiry (unix ms), to arm timers after a restart.
    async fn open_packets(&self) -> Result<Vec<(String, u64)>, StoreError>;

    /// [`Store::grab`], announcing the grab, and `redpacket_done` if it finished the
    /// packet. This default announces once `grab` has returned, so concurrent grabs may
    /// announce out of commit order; a store that can, overrides it to announce at its
    /// commit point, in commit order, whether or not the caller is still waiting.
    async fn grab_announced(
        &self,
        room: &RoomId,
        packet: &str,
        user: &User,
        announce: Arc<dyn Announce>,
    ) -> Result<Grabbed, GrabError> {
        let g = self.grab(room, packet, user).await?;
        announce.grab(room, packet, user, g.amount);
        if let Some(done) = g.done {
            announce.done(room, packet, done);
        }
        Ok(g)
    }

    /// [`Store::expire`], announcing `redpacket_done` if this finished the packet (the
    /// default looks the packet's room up afterwards; see [`Store::grab_announced`]).
    async fn expire_announced(
        &self,
        packet: &str,
        announce: Arc<dyn Announce>,
    ) -> Result<Option<Done>, StoreError> {
        let done = self.expire(packet).await?;
        if let Some(d) = done {
            match self.status(packet).await? {
                Some(status) => match RoomId::parse(&status.room) {
                    Ok(room) => announce.done(&room, packet, d),
                    Err(e) => tracing::error!(packet, error = %e, "packet with an invalid room"),
                },
                None => tracing::warn!(packet, "expired packet vanished before its announcement"),
            }
        }
        Ok(done)
    }

    /// How often [`Store::sweep`] must run on this node; `None` (the default): never,
    /// for a store whose packets all have a timer on this node.
    fn sweep_every(&self) -> Option<Duration> {
        None
    }
    /// Finishes packets that are due but that no timer finished (their creating node is
    /// gone, or the store was down at expiry; a last grab nobody announced), and returns
    /// those whose `redpacket_done` this call won — one caller per packet across every
    /// node. Failures are the store's to log: the next sweep retries.
    async fn sweep(&self) -> Vec<Finished> {
        Vec::new()
    }
}

/// A create request from the backend (`POST /api/v1/rooms/{room}/redpackets`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub total: u64,
    pub shares: u32,
    pub sender: User,
    #[serde(default)]
    pub expires_in_s: Option<u64>,
}

/// Why a create request was refused (HTTP 400 naming the field, or 503).
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The red-packet service: validation, events, expiry timers; storage behind [`Store`].
pub struct RedPackets {
    store: Arc<dyn Store>,
    hub: Hub,
    /// The hub, as the stores announce grabs and ends through it.
    announce: Arc<dyn Announce>,
    cfg: RedPacketConfig,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl RedPackets {
    /// Wraps `store` and arms expiry timers for its open packets (after a restart; one
    /// that expired while the gateway was down ends at once, announced to its room).
    ///
    /// # Errors
    /// The store could not list its open packets.
    pub async fn start(
        store: Arc<dyn Store>,
        hub: Hub,
        cfg: RedPacketConfig,
        cancel: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Arc<Self>, StoreError> {
        let me = Arc::new(Self {
            store,
            announce: Arc::new(hub.clone()),
            hub,
            cfg,
            cancel: cancel.clone(),
            tracker: tracker.clone(),
        });
        for (packet, expires_at) in me.store.open_packets().await? {
            me.arm_expiry(packet, expires_at);
        }
        if let Some(every) = me.store.sweep_every() {
            me.spawn_sweeper(every);
        }
        Ok(me)
    }

    /// Validates, splits, stores, announces; returns the packet id.
    ///
    /// # Errors
    /// [`CreateError::Invalid`] naming the field; [`CreateError::Store`].
    pub async fn create(
        self: &Arc<Self>,
        room: &RoomId,
        req: CreateRequest,
    ) -> Result<String, CreateError> {
        let invalid = |m: &str| Err(CreateError::Invalid(m.into()));
        if req.shares == 0 || req.shares > MAX_SHARES {
            return invalid("shares: must be 1..=100000");
        }
        if req.total == 0 || req.total > MAX_TOTAL {
            return invalid("total: must be 1..=10000000000 cents");
        }
        if u64::from(req.shares) > req.total {
            return invalid("shares: must not exceed total (every share is at least 1 cent)");
        }
        if req.sender.id.is_empty() || req.sender.id.len() > 128 {
            return invalid("sender.id: must be 1-128 characters");
        }
        let expires_in = req.expires_in_s.unwrap_or(self.cfg.default_expires_in_s);
        if expires_in == 0 || expires_in > self.cfg.max_expires_in_s {
            return Err(CreateError::Invalid(format!(
                "expires_in_s: must be 1..={}",
                self.cfg.max_expires_in_s
            )));
        }
        let amounts = split::split(req.total, req.shares, &mut rand::rng());
        let now = now_ms();
        let packet = NewPacket {
            packet: self.store.new_packet_id(self.hub.node()),
            room: room.clone(),
            sender: req.sender,
            total: req.total,
            shares: req.shares,
            amounts,
            created_at: now,
            expires_at: now + expires_in * 1000,
        };
        let id = packet.packet.clone();
        let event = EventBody::Redpacket {
            packet: id.clone(),
            user: packet.sender.clone(),
            total: packet.total,
            shares: packet.shares,
            expires_at: packet.expires_at,
        };
        let expires_at = packet.expires_at;
        // Stored, announced and armed in a task of its own: a caller that goes away
        // mid-way (an HTTP client timing out) must not leave a packet that is durable
        // but unannounced and without a timer, to reappear grabbable at the next start.
        let me = Arc::clone(self);
        let room = room.clone();
        let task_id = id.clone();
        let commit = self.tracker.spawn(async move {
            me.store.create(packet).await?;
            ::metrics::counter!(metrics::REDPACKETS_CREATED).increment(1);
            me.hub.publish(&room, event);
            me.arm_expiry(task_id, expires_at);
            Ok::<(), StoreError>(())
        });
        match commit.await {
            Ok(stored) => stored?,
            Err(e) => return Err(StoreError(format!("creating the packet: {e}")).into()),
        }
        Ok(id)
    }

    /// One user's grab; the `ack` amount, or the error frame to send.
    ///
    /// # Errors
    /// The packet codes of PROTOCOL.md (`packet_not_found`, `already_grabbed`,
    /// `packet_expired`, `packet_empty`, `busy`) or `internal`.
    pub async fn grab(&self, room: &RoomId, packet: &str, user: &User) -> Result<u64, ProtoError> {
        let started = std::time::Instant::now();
        // The store announces the grab (and the packet's end) in commit order.
        let result = self
            .store
            .grab_announced(room, packet, user, Arc::clone(&self.announce))
            .await;
        ::metrics::histogram!(metrics::REDPACKET_GRAB_SECONDS)
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(g) => {
                metrics::grab("ok");
                Ok(g.amount)
            }
            Err(e) => {
                metrics::grab(e.code().as_str());
                if let GrabError::Store(msg) = &e {
                    tracing::error!(packet, error = %msg, "grab failed in the store");
                }
                Err(ProtoError::new(e.code(), e.to_string()))
            }
        }
    }

    pub async fn status(&self, packet: &str) -> Result<Option<PacketStatus>, StoreError> {
        self.store.status(packet).await
    }

    pub async fn open_in(&self, room: &RoomId) -> Result<Vec<OpenPacket>, StoreError> {
        self.store.open_in(room).await
    }

    /// Expires `packet` at `expires_at` (unix ms), announcing `redpacket_done` if that
    /// finishes it. Timers end with the gateway.
    fn arm_expiry(&self, packet: String, expires_at: u64) {
        let store = Arc::clone(&self.store);
        let announce = Arc::clone(&self.announce);
        let cancel = self.cancel.clone();
        let delay = Duration::from_millis(expires_at.saturating_sub(now_ms()));
        self.tracker.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            if let Err(e) = store.expire_announced(&packet, announce).await {
                tracing::error!(packet, error = %e, "expiring packet failed");
            }
        });
    }

    /// Runs [`Store::sweep`] every `every` to `2 × every` (jittered, so nodes do not
    /// sweep in lockstep) and announces what it finished. Ends with the gateway.
    fn spawn_sweeper(&self, every: Duration) {
        let store = Arc::clone(&self.store);
        let announce = Arc::clone(&self.announce);
        let cancel = self.cancel.clone();
        let every_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX).max(1);
        self.tracker.spawn(async move {
            loop {
                let wait = Duration::from_millis(every_ms + rand::random_range(0..every_ms));
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                for f in store.sweep().await {
                    announce.done(&f.room, &f.packet, f.done);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RoomConfig;
    use crate::redpacket::local::LocalStore;

    /// A create whose caller goes away after the first poll (an HTTP client timing out)
    /// still finishes whole: stored, announced, listed, with its timer.
    #[tokio::test]
    async fn a_create_abandoned_by_its_caller_still_finishes() {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let hub = Hub::start(
            Arc::from("t"),
            RoomConfig::default(),
            crate::hub::Encoding::plain(crate::config::MIN_OUT_FRAME_BYTES),
            1,
            crate::hub::Outlets::local("t"),
            &cancel,
            &tracker,
        );
        let dir = std::env::temp_dir().join(format!(
            "danmaku-create-abandoned-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let store = Arc::new(LocalStore::open(&dir, 100, 3600).unwrap());
        let rp = RedPackets::start(
            store,
            hub.clone(),
            RedPacketConfig::default(),
            &cancel,
            &tracker,
        )
        .await
        .unwrap();
        let room = RoomId::parse("r").unwrap();
        let req = CreateRequest {
            total: 100,
            shares: 3,
            sender: User {
                id: "boss".into(),
                name: "Boss".into(),
            },
            expires_in_s: Some(60),
        };
        // Polled once, then dropped (as a client that times out drops its request): the
        // journal append is still in flight at that point.
        let first_poll = futures_util::FutureExt::now_or_never(rp.create(&room, req));
        assert!(
            first_poll.is_none(),
            "the create had not finished at its first poll"
        );
        let mut open = Vec::new();
        for _ in 0..100 {
            open = rp.open_in(&room).await.unwrap();
            if !open.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(open.len(), 1, "the packet is open and listed");
        // The event is in the room's history once its window is flushed.
        let mut told = false;
        for _ in 0..100 {
            told = hub
                .history(&room, 10)
                .iter()
                .any(|e| matches!(e.body, EventBody::Redpacket { .. }));
            if told {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(told, "the room was told");
        cancel.cancel();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
