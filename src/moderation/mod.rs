//! Moderation: mutes, bans, room settings (chat closed, slow mode), keyword filters, and
//! the checks a client's `chat` and `gift` pass through (PROTOCOL.md v1.1, *Moderation*).
//!
//! Shape (why it is so):
//! - **Every node keeps a local copy** of the whole moderation state ([`State`]), so the
//!   checks on the hot path are a read lock and a hash lookup, never a round trip to
//!   Redis or the disk. The filter automaton is built off the hot path (a blocking task)
//!   whenever the lists change and swapped in atomically ([`ArcSwap`]); a chat only
//!   loads the current one.
//! - **Changes go through the store first** ([`store`]): on a single node the whole state
//!   is rewritten atomically to `data/moderation.json` (changes are rare: moderators,
//!   not viewers, make them), with Redis each change is one command on a key every node
//!   can read. Only once stored is a change applied locally and, with Redis, announced to
//!   the other nodes over pub/sub ([`sync`]), which apply it within milliseconds; a full
//!   re-read every few seconds heals whatever a lost notice or an outage missed.
//! - **Expiry needs no timer**: a mute or ban carries its end (`until`, unix ms) and is
//!   simply not active past it; a sweeper drops expired entries from the local copy (and
//!   from Redis, compare-and-delete, so a fresh ban set meanwhile is never lost).
//! - **Bans reach connections** through a registry of this node's signed-in connections by
//!   user id: a ban applied here, from a notice or from a re-read, closes them with 4030.
//! - **Slow mode** is counted per node (the last chat of each user in a slow room): a
//!   user's connections are almost always on one node, and a cluster-wide counter would
//!   cost a Redis round trip per chat (`docs/protocol-notes.md`).

pub mod filter;
mod store;
mod sync;

use crate::stream::EventStream;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use metrics::{Counter, Gauge, counter, gauge};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::hub::{Conn, ConnId};
use crate::metrics as names;
use crate::protocol::{CloseCode, ErrorCode, ProtoError, RoomId, now_ms};
use crate::redis_link::RedisLink;

pub use filter::{Filter, FilterError, Verdict};
use store::Store;
pub use store::StoreError;

/// Longest `reason` of a mute or ban, in characters.
pub const MAX_REASON_CHARS: usize = 256;
/// Longest user id in a moderation path (JWT `sub`), in bytes.
pub const MAX_USER_BYTES: usize = 128;
/// Longest mute or ban (ten years): a bound, so `until` never overflows.
pub const MAX_DURATION_S: u64 = 10 * 365 * 24 * 3600;
/// Longest slow mode: a day.
pub const MAX_SLOW_MODE_S: u32 = 24 * 3600;
/// Words per filter list.
pub const MAX_FILTER_WORDS: usize = 100_000;
/// Characters per filter word.
pub const MAX_WORD_CHARS: usize = 64;
/// How often expired mutes, bans and slow-mode entries are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A mute or a ban: until when (unix ms; `None`: until lifted), and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restriction {
    pub until: Option<u64>,
    pub reason: Option<String>,
}

impl Restriction {
    pub fn active(&self, now: u64) -> bool {
        self.until.is_none_or(|u| u > now)
    }
}

/// Whether clients may chat (and send gifts) in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ChatState {
    #[default]
    Open,
    Closed,
}

/// A room's moderation settings (`GET/PUT /api/v1/rooms/{room}/settings`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RoomSettings {
    pub chat: ChatState,
    /// A user may chat once per this many seconds in the room; 0: off.
    pub slow_mode_s: u32,
}

/// The two keyword lists, as the operator gave them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Lists {
    pub block: Vec<String>,
    pub mask: Vec<String>,
}

/// One moderation change: what is stored, announced to the other nodes, and applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    Mute {
        room: RoomId,
        user: String,
        #[serde(flatten)]
        restriction: Restriction,
    },
    Unmute {
        room: RoomId,
        user: String,
    },
    Ban {
        user: String,
        #[serde(flatten)]
        restriction: Restriction,
    },
    Unban {
        user: String,
    },
    Settings {
        room: RoomId,
        settings: RoomSettings,
    },
    Filters(Lists),
}

impl Change {
    /// The room it applies to; None for bans and filters (everywhere).
    pub fn room(&self) -> Option<&RoomId> {
        match self {
            Change::Mute { room, .. }
            | Change::Unmute { room, .. }
            | Change::Settings { room, .. } => Some(room),
            Change::Ban { .. } | Change::Unban { .. } | Change::Filters(_) => None,
        }
    }

    /// Low-cardinality label for metrics.
    pub fn action(&self) -> &'static str {
        match self {
            Change::Mute { .. } => "mute",
            Change::Unmute { .. } => "unmute",
            Change::Ban { .. } => "ban",
            Change::Unban { .. } => "unban",
            Change::Settings { .. } => "settings",
            Change::Filters(_) => "filters",
        }
    }
}

/// Everything moderation knows; every node holds a copy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    #[serde(default)]
    pub mutes: HashMap<RoomId, HashMap<String, Restriction>>,
    #[serde(default)]
    pub bans: HashMap<String, Restriction>,
    /// Rooms whose settings differ from the defaults.
    #[serde(default)]
    pub settings: HashMap<RoomId, RoomSettings>,
    #[serde(default)]
    pub lists: Lists,
}

impl State {
    fn apply(&mut self, change: &Change) {
        match change {
            Change::Mute {
                room,
                user,
                restriction,
            } => {
                self.mutes
                    .entry(room.clone())
                    .or_default()
                    .insert(user.clone(), restriction.clone());
            }
            Change::Unmute { room, user } => {
                if let Some(m) = self.mutes.get_mut(room) {
                    m.remove(user);
                    if m.is_empty() {
                        self.mutes.remove(room);
                    }
                }
            }
            Change::Ban { user, restriction } => {
                self.bans.insert(user.clone(), restriction.clone());
            }
            Change::Unban { user } => {
                self.bans.remove(user);
            }
            Change::Settings { room, settings } => {
                if *settings == RoomSettings::default() {
                    self.settings.remove(room);
                } else {
                    self.settings.insert(room.clone(), *settings);
                }
            }
            Change::Filters(lists) => self.lists = lists.clone(),
        }
    }

    /// Drops mutes and bans that ended before `now`; whether any did.
    fn prune(&mut self, now: u64) -> bool {
        let before = self.bans.len() + self.mutes.values().map(HashMap::len).sum::<usize>();
        self.bans.retain(|_, b| b.active(now));
        self.mutes.retain(|_, m| {
            m.retain(|_, r| r.active(now));
            !m.is_empty()
        });
        before != self.bans.len() + self.mutes.values().map(HashMap::len).sum::<usize>()
    }

    fn mute_count(&self) -> usize {
        self.mutes.values().map(HashMap::len).sum()
    }

    fn muted(&self, room: &RoomId, user: &str, now: u64) -> Option<&Restriction> {
        self.mutes
            .get(room)
            .and_then(|m| m.get(user))
            .filter(|r| r.active(now))
    }
}

/// What a change found: the mute or ban to lift may not exist (HTTP 404).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Done,
    NotFound,
}

/// What moderation callers handle.
#[derive(Debug, thiserror::Error)]
pub enum ModerationError {
    #[error("filter lists: {0}")]
    Filter(#[from] FilterError),
    #[error("moderation store: {0}")]
    Store(#[from] StoreError),
}

/// Handles resolved once: a chat's checks count without a registry lookup.
struct Meters {
    refused_muted: Counter,
    refused_closed: Counter,
    refused_slow: Counter,
    filtered_block: Counter,
    filtered_mask: Counter,
    active_bans: Gauge,
    active_mutes: Gauge,
}

impl Meters {
    fn new() -> Self {
        Self {
            refused_muted: counter!(names::MODERATION_REFUSED, "reason" => "muted"),
            refused_closed: counter!(names::MODERATION_REFUSED, "reason" => "chat_closed"),
            refused_slow: counter!(names::MODERATION_REFUSED, "reason" => "slow_mode"),
            filtered_block: counter!(names::MODERATION_FILTERED, "list" => "block"),
            filtered_mask: counter!(names::MODERATION_FILTERED, "list" => "mask"),
            active_bans: gauge!(names::MODERATION_ACTIVE_BANS),
            active_mutes: gauge!(names::MODERATION_ACTIVE_MUTES),
        }
    }
}

/// The node's moderation: state, checks, changes, and who to close on a ban.
pub struct Moderation {
    node: Arc<str>,
    state: RwLock<State>,
    /// Bumped whenever the lists change; a filter built for an older generation is not
    /// swapped in (two rebuilds racing must not leave the older one in place).
    lists_generation: std::sync::atomic::AtomicU64,
    filter: ArcSwap<Filter>,
    store: Store,
    /// This node's signed-in connections by user id, for bans.
    users: DashMap<Arc<str>, Vec<Arc<Conn>>>,
    /// Last accepted chat (unix ms) per (room, user) in rooms with slow mode.
    slow: Mutex<HashMap<(RoomId, String), u64>>,
    /// One local change at a time: the file store must write them in order.
    turn: tokio::sync::Mutex<()>,
    meters: Meters,
    /// Every change made through this node is recorded on the event stream.
    stream: Arc<EventStream>,
}

impl Moderation {
    /// Single node: state kept in `dir/moderation.json`, read now.
    ///
    /// # Errors
    /// The file exists but cannot be read or parsed, or its filter lists do not build.
    pub async fn open_local(
        node: Arc<str>,
        dir: &Path,
        stream: Arc<EventStream>,
        cancel: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Arc<Self>, ModerationError> {
        let store = Store::file(dir);
        let state = store.load().await?.unwrap_or_default();
        let m = Self::with_state(node, store, state, stream).await?;
        tracker.spawn(Arc::clone(&m).sweeper(cancel.clone()));
        Ok(m)
    }

    /// Cluster: state in Redis, read now if Redis answers (else by the sync task once it
    /// does), kept current by change notices and periodic re-reads.
    ///
    /// # Errors
    /// The filter lists in Redis do not build.
    pub async fn open_redis(
        node: Arc<str>,
        link: Arc<RedisLink>,
        stream: Arc<EventStream>,
        cancel: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Arc<Self>, ModerationError> {
        let store = Store::redis(Arc::clone(&link));
        let state = match store.load().await {
            Ok(s) => s.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "moderation state not read from redis yet; the sync task retries");
                State::default()
            }
        };
        let m = Self::with_state(node, store, state, stream).await?;
        tracker.spawn(Arc::clone(&m).sweeper(cancel.clone()));
        tracker.spawn(sync::run(Arc::clone(&m), link, cancel.clone()));
        Ok(m)
    }

    async fn with_state(
        node: Arc<str>,
        store: Store,
        mut state: State,
        stream: Arc<EventStream>,
    ) -> Result<Arc<Self>, ModerationError> {
        state.prune(now_ms());
        let filter = build_filter(state.lists.clone()).await?;
        let m = Arc::new(Self {
            node,
            state: RwLock::new(state),
            lists_generation: Default::default(),
            filter: ArcSwap::from_pointee(filter),
            store,
            users: DashMap::new(),
            slow: Mutex::new(HashMap::new()),
            turn: tokio::sync::Mutex::new(()),
            meters: Meters::new(),
            stream,
        });
        m.update_gauges();
        Ok(m)
    }

    // ---------------------------------------------------------------------------------
    // The checks a client's op passes through (no await, no I/O).

    /// `muted`: the room's chat is closed, or `user` is muted in it.
    ///
    /// # Errors
    /// The `muted` refusal, with `retry_after_ms` when the mute has an end.
    pub fn check_send(&self, room: &RoomId, user: &str) -> Result<(), ProtoError> {
        let st = self.state.read().expect("moderation lock");
        if st
            .settings
            .get(room)
            .is_some_and(|s| s.chat == ChatState::Closed)
        {
            self.meters.refused_closed.increment(1);
            return Err(ProtoError::new(
                ErrorCode::Muted,
                format!("chat is closed in room {room}"),
            ));
        }
        if st.mutes.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        if let Some(mute) = st.muted(room, user, now) {
            self.meters.refused_muted.increment(1);
            return Err(ProtoError {
                code: ErrorCode::Muted,
                message: format!("you are muted in room {room}"),
                retry_after_ms: mute.until.map(|u| u - now),
            });
        }
        Ok(())
    }

    /// Slow mode, looked at without spending it: `rate_limited` if `user` chatted in
    /// `room` less than `slow_mode_s` ago. [`Moderation::note_chat`] spends it once the
    /// chat passed the other limits, so a refused chat does not restart the wait.
    ///
    /// # Errors
    /// The `rate_limited` refusal with `retry_after_ms`.
    pub fn check_slow_mode(&self, room: &RoomId, user: &str) -> Result<(), ProtoError> {
        let Some(every_ms) = self.slow_mode_ms(room) else {
            return Ok(());
        };
        let slow = self.slow.lock().expect("slow-mode lock");
        let now = now_ms();
        if let Some(&last) = slow.get(&(room.clone(), user.to_owned()))
            && now < last + every_ms
        {
            self.meters.refused_slow.increment(1);
            return Err(ProtoError {
                code: ErrorCode::RateLimited,
                message: format!("slow mode: one chat per {} s", every_ms / 1000),
                retry_after_ms: Some(last + every_ms - now),
            });
        }
        Ok(())
    }

    /// Starts `user`'s slow-mode wait in `room` (a chat was accepted).
    pub fn note_chat(&self, room: &RoomId, user: &str) {
        if self.slow_mode_ms(room).is_some() {
            self.slow
                .lock()
                .expect("slow-mode lock")
                .insert((room.clone(), user.to_owned()), now_ms());
        }
    }

    fn slow_mode_ms(&self, room: &RoomId) -> Option<u64> {
        let st = self.state.read().expect("moderation lock");
        st.settings
            .get(room)
            .map(|s| u64::from(s.slow_mode_s) * 1000)
            .filter(|&ms| ms > 0)
    }

    /// The keyword filters' verdict on a chat text (counted by list).
    pub fn filter(&self, text: &str) -> Verdict {
        let verdict = self.filter.load().check(text);
        match verdict {
            Verdict::Pass => {}
            Verdict::Masked(_) => self.meters.filtered_mask.increment(1),
            Verdict::Blocked => self.meters.filtered_block.increment(1),
        }
        verdict
    }

    /// `user`'s active ban, if any.
    pub fn ban_of(&self, user: &str) -> Option<Restriction> {
        let st = self.state.read().expect("moderation lock");
        st.bans.get(user).filter(|b| b.active(now_ms())).cloned()
    }

    // ---------------------------------------------------------------------------------
    // Reads for the API.

    /// Active mutes of `room`, by user id.
    pub fn mutes(&self, room: &RoomId) -> Vec<(String, Restriction)> {
        let st = self.state.read().expect("moderation lock");
        let now = now_ms();
        let mut out: Vec<(String, Restriction)> = st
            .mutes
            .get(room)
            .into_iter()
            .flatten()
            .filter(|(_, r)| r.active(now))
            .map(|(u, r)| (u.clone(), r.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    pub fn settings(&self, room: &RoomId) -> RoomSettings {
        let st = self.state.read().expect("moderation lock");
        st.settings.get(room).copied().unwrap_or_default()
    }

    pub fn lists(&self) -> Lists {
        self.state.read().expect("moderation lock").lists.clone()
    }

    // ---------------------------------------------------------------------------------
    // Changes.

    /// Makes a change made through this node: stores it, applies it here, announces it
    /// to the other nodes. Lifting a mute or ban that is not in force changes nothing.
    ///
    /// # Errors
    /// The filter lists do not build (nothing changed), or the store could not take the
    /// change (nothing changed).
    pub async fn apply(&self, change: Change) -> Result<Applied, ModerationError> {
        let _turn = self.turn.lock().await;
        let prebuilt = match &change {
            Change::Filters(lists) => Some(build_filter(lists.clone()).await?),
            _ => None,
        };
        let now = now_ms();
        let (found, after) = {
            let st = self.state.read().expect("moderation lock");
            let found = match &change {
                Change::Unmute { room, user } => st.muted(room, user, now).is_some(),
                Change::Unban { user } => st.bans.get(user).is_some_and(|b| b.active(now)),
                _ => true,
            };
            // Only the file store needs the whole state after the change.
            let after = (found && self.store.wants_snapshot()).then(|| {
                let mut s = st.clone();
                s.apply(&change);
                s
            });
            (found, after)
        };
        if !found {
            return Ok(Applied::NotFound);
        }
        self.store
            .write(&self.node, &change, after.as_ref())
            .await?;
        counter!(names::MODERATION_ACTIONS, "action" => change.action()).increment(1);
        if self.stream.enabled() {
            let json = serde_json::to_value(&change).unwrap_or_default();
            self.stream.change(change.room(), change.action(), json);
        }
        self.apply_here(&change, prebuilt).await;
        Ok(Applied::Done)
    }

    /// Applies a change (made here, or announced by another node) to the local copy.
    async fn apply_here(&self, change: &Change, prebuilt: Option<Filter>) {
        let generation = {
            let mut st = self.state.write().expect("moderation lock");
            st.apply(change);
            match change {
                Change::Filters(_) => Some(
                    self.lists_generation
                        .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
                        + 1,
                ),
                _ => None,
            }
        };
        if let (Some(generation), Change::Filters(lists)) = (generation, change) {
            let filter = match prebuilt {
                Some(f) => f,
                None => match build_filter(lists.clone()).await {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::error!(error = %e, "filter lists from another node do not build; keeping the old filter");
                        return;
                    }
                },
            };
            self.swap_filter(generation, filter);
        }
        if let Change::Ban { user, restriction } = change
            && restriction.active(now_ms())
        {
            self.close_banned(user);
        }
        self.update_gauges();
    }

    /// Replaces the local copy with `fresh` (a full re-read of the store): bans new to
    /// this node close their users' connections, changed lists rebuild the filter.
    async fn replace(&self, mut fresh: State) {
        let now = now_ms();
        fresh.prune(now);
        let (new_bans, lists_changed) = {
            let st = self.state.read().expect("moderation lock");
            let new_bans: Vec<String> = fresh
                .bans
                .iter()
                .filter(|(u, b)| st.bans.get(*u) != Some(*b))
                .map(|(u, _)| u.clone())
                .collect();
            (new_bans, st.lists != fresh.lists)
        };
        let lists = lists_changed.then(|| fresh.lists.clone());
        let generation = {
            let mut st = self.state.write().expect("moderation lock");
            *st = fresh;
            lists.as_ref().map(|_| {
                self.lists_generation
                    .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
                    + 1
            })
        };
        if let (Some(generation), Some(lists)) = (generation, lists) {
            match build_filter(lists).await {
                Ok(f) => self.swap_filter(generation, f),
                Err(e) => {
                    tracing::error!(error = %e, "stored filter lists do not build; keeping the old filter")
                }
            }
        }
        for user in new_bans {
            self.close_banned(&user);
        }
        self.update_gauges();
    }

    fn swap_filter(&self, generation: u64, filter: Filter) {
        // Under the state lock, so a newer generation cannot be stored between the check
        // and the swap.
        let _st = self.state.write().expect("moderation lock");
        if self
            .lists_generation
            .load(std::sync::atomic::Ordering::Acquire)
            == generation
        {
            self.filter.store(Arc::new(filter));
        }
    }

    fn update_gauges(&self) {
        let st = self.state.read().expect("moderation lock");
        self.meters.active_bans.set(st.bans.len() as f64);
        self.meters.active_mutes.set(st.mute_count() as f64);
    }

    // ---------------------------------------------------------------------------------
    // Bans and connections.

    /// Registers a signed-in connection, so a ban of `user` closes it; a user banned
    /// already is closed at once (the ban may have landed after the upgrade's check).
    pub fn register(self: &Arc<Self>, user: &str, conn: &Arc<Conn>) -> Registration {
        let user: Arc<str> = Arc::from(user);
        self.users
            .entry(Arc::clone(&user))
            .or_default()
            .push(Arc::clone(conn));
        if self.ban_of(&user).is_some() {
            conn.kill(CloseCode::Banned);
        }
        Registration {
            moderation: Arc::clone(self),
            user,
            conn: conn.id,
        }
    }

    fn close_banned(&self, user: &str) {
        if let Some(conns) = self.users.get(user) {
            for c in conns.iter() {
                c.kill(CloseCode::Banned);
            }
        }
    }

    /// Drops expired mutes, bans and slow-mode entries once a second.
    async fn sweeper(self: Arc<Self>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = now_ms();
            self.state.write().expect("moderation lock").prune(now);
            // Every tick, not only on a change: the gauges are process-wide, and a node
            // must not leave another's value standing (tests run several in one process).
            self.update_gauges();
            let slow_rooms: HashMap<RoomId, u64> = {
                let st = self.state.read().expect("moderation lock");
                st.settings
                    .iter()
                    .filter(|(_, s)| s.slow_mode_s > 0)
                    .map(|(r, s)| (r.clone(), u64::from(s.slow_mode_s) * 1000))
                    .collect()
            };
            self.slow
                .lock()
                .expect("slow-mode lock")
                .retain(|(room, _), last| slow_rooms.get(room).is_some_and(|ms| now < *last + ms));
        }
    }
}

/// A connection's place in the ban registry; dropping it removes the connection.
pub struct Registration {
    moderation: Arc<Moderation>,
    user: Arc<str>,
    conn: ConnId,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.moderation.users.remove_if_mut(&self.user, |_, conns| {
            conns.retain(|c| c.id != self.conn);
            conns.is_empty()
        });
    }
}

/// Builds a filter on a blocking thread: ten thousand words take milliseconds, which no
/// runtime worker (serving sessions) should spend.
async fn build_filter(lists: Lists) -> Result<Filter, FilterError> {
    if lists.block.is_empty() && lists.mask.is_empty() {
        return Ok(Filter::empty());
    }
    match tokio::task::spawn_blocking(move || Filter::new(&lists.block, &lists.mask)).await {
        Ok(res) => res,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The runtime is shutting down: no chat will be checked any more.
        Err(_) => Ok(Filter::empty()),
    }
}
