//! The Redis red-packet store, for clusters: every node grabs from the same packet.
//!
//! A packet's keys share one hash tag (`{rpN}`, N chosen at creation and carried in the
//! packet id) so they live in one slot of a Redis Cluster and one Lua script can touch
//! them all atomically. Besides the packet's own keys (meta hash, pre-split amounts list,
//! grabs hash, grab slots), the slot holds its group's *open index* (`danmaku:{rpN}:open`,
//! packet → when it is due), so creating a packet and indexing it for expiry is one
//! script: a packet either exists with every key expiring and indexed, or not at all.
//!
//! A grab is two scripts:
//! - `ADMIT` answers the packet codes in the local store's order (`packet_not_found`,
//!   `already_grabbed`, `packet_expired`, `packet_empty`, then `busy`) and only then
//!   takes one of `max_concurrent_grabs` slots. A slot is an entry of a sorted set scored
//!   by its deadline, not a counter: an admission whose grab never runs (node died, reply
//!   lost) frees its slot by itself when its deadline passes, however busy the packet.
//! - `GRAB` releases the slot, checks the user has no share and the packet is open, pops
//!   a pre-split amount, records the grab (the grabs hash expires with the packet) and
//!   appends it to the settlement stream (`XADD danmaku:settlement:{rpN}`) — exactly
//!   once, whichever node the user grabs from.
//!
//! Folding admission into `GRAB` would not keep the cap: a script runs atomically, so
//! nothing would ever be "in flight" to count, and grabs would queue in Redis without
//! bound — the cap exists to answer `busy` before that.
//!
//! Scripts that may need a rerun are idempotent: when a reply is lost, the node reruns
//! the same call once the link is back (for up to [`Timing::recover_for`]). A rerun of
//! `GRAB` that finds the user's share reports it, so a grab that landed is acknowledged
//! with its amount and its `grab` event published, not turned into `busy` then
//! `already_grabbed`. Only when the outcome stays unknown does the grab answer `busy`.
//!
//! `redpacket_done` is announced exactly once per packet cluster-wide: whoever finishes a
//! packet (the last grab, or expiry) must also *claim* its announcement (`announced` in
//! the meta hash, set to the claimer's token; rerunning a claim with the same token is
//! idempotent). The last grab moves the packet's open-index entry to `now + finish_grace`;
//! every node sweeps due entries ([`Store::sweep`]), expiring packets whose creator is
//! gone and claiming finished packets whose grabber never did. The room listing
//! (`danmaku:rp:room:{room}`) lives in another slot: it is written first and expires,
//! so a create that fails leaves at most a listing that readers skip.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::{ErrorKind, FromRedisValue, RedisError, Script, ScriptInvocation, ServerErrorKind};
use tokio::time::Instant;

use super::{
    Done, Finished, GrabError, GrabRecord, Grabbed, NewPacket, PacketStatus, Store, StoreError,
};
use crate::protocol::{OpenPacket, RoomId, User, now_ms};
use crate::redis_link::{Conn, RedisLink};

/// Settlement streams (one per hash-tag group) keep at most about this many entries.
const STREAM_MAXLEN: u64 = 10_000_000;
/// Hash-tag groups: packets spread over this many slots of a cluster.
const GROUPS: u32 = 16;
/// How often every node sweeps the open indexes (jittered up to twice this).
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Due packets handled per group per sweep, so one sweep's work is bounded.
const SWEEP_BATCH: usize = 64;
/// Pause between reruns while recovering a lost reply.
const RECOVER_PAUSE: Duration = Duration::from_millis(100);
/// The global open index of earlier versions; still read at start and cleaned up, so
/// packets created before an upgrade keep their expiry timers.
const LEGACY_OPEN_KEY: &str = "danmaku:rp:open";

/// Timings of the store: the defaults suit production; tests shorten them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A grab slot is freed this long after its admission if its grab never ran.
    pub slot_ttl: Duration,
    /// A packet emptied by a grab whose node did not claim `redpacket_done` is claimed by
    /// a sweep after this (longer than a grab's recovery, so the grabber normally wins).
    pub finish_grace: Duration,
    /// After a lost reply, how long to rerun an idempotent script before giving up.
    pub recover_for: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            slot_ttl: Duration::from_secs(5),
            finish_grace: Duration::from_secs(5),
            recover_for: Duration::from_secs(3),
        }
    }
}

/// The hash tag of `packet`'s keys (`rp3-...` → `rp3`).
fn tag(packet: &str) -> Option<&str> {
    let group = packet.split('-').next()?;
    (group.starts_with("rp") && group.len() > 2 && group[2..].bytes().all(|b| b.is_ascii_digit()))
        .then_some(group)
}

/// The settlement stream a packet's grabs are appended to.
pub fn settlement_stream(packet: &str) -> Option<String> {
    Some(format!("danmaku:settlement:{{{}}}", tag(packet)?))
}

/// The open index of hash-tag group `tag` (in the same slot as its packets).
fn open_key(tag: &str) -> String {
    format!("danmaku:{{{tag}}}:open")
}

fn room_index(room: &RoomId) -> String {
    format!("danmaku:rp:room:{room}")
}

/// A packet's keys, all in the slot of its hash tag.
struct Keys {
    meta: String,
    amounts: String,
    grabs: String,
    /// Sorted set of admitted grabs (token → deadline).
    slots: String,
    open: String,
    stream: String,
}

impl Keys {
    fn of(packet: &str) -> Option<Self> {
        let tag = tag(packet)?;
        let part = |p: &str| format!("danmaku:{{{tag}}}:{packet}:{p}");
        Some(Self {
            meta: part("meta"),
            amounts: part("amounts"),
            grabs: part("grabs"),
            // Not the `inflight` counter of earlier versions: another type under a new
            // name, so nodes of both versions can run side by side during an upgrade.
            slots: part("grabbing"),
            open: open_key(tag),
            stream: format!("danmaku:settlement:{{{tag}}}"),
        })
    }
}

/// KEYS: room index. ARGV: packet, ttl ms.
/// Lists the packet and keeps the set alive at least `ttl` (never shortens it).
const ROOM_INDEX: &str = r#"
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"#;

/// KEYS: meta, amounts, open.
/// ARGV: packet, expire_at (ms, keys), expires_at (ms, packet), room, sender json,
/// total, shares, created_at, amounts...
/// Returns 1 when created, 0 when the packet already exists (a rerun).
const CREATE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[2])
-- unpack() is limited to a few thousand values: push in chunks.
for i = 9, #ARGV, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('PEXPIREAT', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[1], 'room', ARGV[4], 'sender', ARGV[5], 'total', ARGV[6],
  'shares', ARGV[7], 'created_at', ARGV[8], 'expires_at', ARGV[3],
  'grabbed', '0', 'total_grabbed', '0')
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return 1
"#;

/// KEYS: meta, amounts, grabs, slots.
/// ARGV: user id, room, cap, slot ttl ms, token.
/// Returns not_found | already | expired | empty | busy | admitted.
const ADMIT: &str = r#"
local meta = redis.call('HMGET', KEYS[1], 'room', 'expires_at', 'expired')
if not meta[1] or meta[1] ~= ARGV[2] then return 'not_found' end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return 'already' end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if meta[3] == '1' or now >= tonumber(meta[2]) then return 'expired' end
if redis.call('LLEN', KEYS[2]) == 0 then return 'empty' end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
if redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[3]) then return 'busy' end
local ttl = tonumber(ARGV[4])
redis.call('ZADD', KEYS[4], now + ttl, ARGV[5])
-- Every entry expires within ttl, the newest last: the set lives as long as it.
redis.call('PEXPIRE', KEYS[4], ttl)
return 'admitted'
"#;

/// KEYS: meta, amounts, grabs, slots, stream, open.
/// ARGV: user id, user json, room, packet, stream maxlen, token, finish grace ms.
/// Returns {'ok', amount, left, grabbed, total_grabbed},
/// {'already', amount, finished, grabbed, total_grabbed}, or {code}.
const GRAB: &str = r#"
redis.call('ZREM', KEYS[4], ARGV[6])
local meta = redis.call('HMGET', KEYS[1], 'room', 'expires_at', 'expired',
  'grabbed', 'total_grabbed', 'finished')
if not meta[1] or meta[1] ~= ARGV[3] then return {'not_found'} end
local prev = redis.call('HGET', KEYS[3], ARGV[1])
if prev then
  local ok, rec = pcall(cjson.decode, prev)
  local amount = ok and tonumber(rec.amount) or 0
  return {'already', amount, meta[6] == '1' and 1 or 0,
    tonumber(meta[4]) or 0, tonumber(meta[5]) or 0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if meta[3] == '1' or now >= tonumber(meta[2]) then return {'expired'} end
local amount = redis.call('LPOP', KEYS[2])
if not amount then return {'empty'} end
local user = cjson.decode(ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], cjson.encode({user = user, amount = tonumber(amount)}))
-- The grabs hash goes with the packet: same deadline as its meta.
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[3], ttl) end
local grabbed = redis.call('HINCRBY', KEYS[1], 'grabbed', 1)
local total = redis.call('HINCRBY', KEYS[1], 'total_grabbed', amount)
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[5], '*',
  'packet', ARGV[4], 'room', ARGV[3], 'user', ARGV[1], 'name', user.name,
  'amount', amount, 'ts', tostring(now))
local left = redis.call('LLEN', KEYS[2])
if left == 0 then
  redis.call('HSET', KEYS[1], 'finished', '1')
  -- Due for the sweep after the grace: it claims the announcement if we do not.
  redis.call('ZADD', KEYS[6], now + tonumber(ARGV[7]), ARGV[4])
end
return {'ok', tonumber(amount), left, grabbed, total}
"#;

/// KEYS: meta, open. ARGV: packet, token, mode ('expire' | 'claim').
/// `expire` finishes a due packet first; both then claim its announcement.
/// Returns {'done', room, grabbed, total_grabbed, expired} to the one claimer (again to
/// a rerun with its token), else {'early'} (not due by Redis' clock), {'open'} (claim of
/// an unfinished packet), {'claimed'} (someone else's) or {'gone'}.
const FINISH: &str = r#"
local m = redis.call('HMGET', KEYS[1], 'room', 'expires_at', 'finished', 'announced')
if not m[1] then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {'gone'}
end
if m[3] ~= '1' then
  if ARGV[3] ~= 'expire' then return {'open'} end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if now < tonumber(m[2]) then return {'early'} end
  redis.call('HSET', KEYS[1], 'expired', '1', 'finished', '1')
end
redis.call('ZREM', KEYS[2], ARGV[1])
if m[4] and m[4] ~= ARGV[2] then return {'claimed'} end
redis.call('HSET', KEYS[1], 'announced', ARGV[2])
local d = redis.call('HMGET', KEYS[1], 'grabbed', 'total_grabbed', 'expired')
return {'done', m[1], tonumber(d[1]) or 0, tonumber(d[2]) or 0, d[3] == '1' and 1 or 0}
"#;

/// Why a script call has no reply to act on.
enum Fail {
    /// Redis was unreachable: nothing was sent.
    Down,
    /// Redis answered, with an error (or a reply of the wrong shape): a rerun would
    /// learn nothing more.
    Refused(RedisError),
    /// Sent, but no reply came even after reruns: it may or may not have run.
    Unknown(RedisError),
}

impl Fail {
    fn into_store(self) -> StoreError {
        match self {
            Fail::Down => StoreError("redis is unreachable".into()),
            Fail::Refused(e) => StoreError(e.to_string()),
            Fail::Unknown(e) => StoreError(format!("outcome unknown: {e}")),
        }
    }
}

/// Whether Redis itself answered `e`, as opposed to a transport failure after which
/// the outcome is unknown.
fn answered(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Server(_) | ErrorKind::Extension | ErrorKind::UnexpectedReturnType
    )
}

/// A refusal worth retrying (a cluster moving slots, a server loading): the call did
/// not run and may a moment later.
fn transient(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::Server(
            ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::BusyLoading
                | ServerErrorKind::ReadOnly
        )
    ) || e.code() == Some("BUSY")
}

fn new_token() -> String {
    format!("{:016x}", rand::random::<u64>())
}

async fn invoke<T: FromRedisValue>(
    conn: &mut Conn,
    inv: &ScriptInvocation<'_>,
) -> Result<T, RedisError> {
    match conn {
        Conn::Single(c) => inv.invoke_async(c).await,
        Conn::Cluster(c) => inv.invoke_async(c).await,
    }
}

/// A script's reply: a code, then values.
struct Reply(Vec<redis::Value>);

impl Reply {
    fn text(&self, i: usize) -> Option<String> {
        match self.0.get(i)? {
            redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            redis::Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        }
    }

    fn code(&self) -> String {
        self.text(0).unwrap_or_default()
    }

    fn int(&self, i: usize) -> u64 {
        match self.0.get(i) {
            Some(redis::Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
            _ => 0,
        }
    }
}

/// How a packet this node claimed ended.
struct Claimed {
    room: Option<RoomId>,
    done: Done,
}

pub struct RedisStore {
    link: Arc<RedisLink>,
    max_concurrent: usize,
    retain_ms: u64,
    timing: Timing,
    room_index: Script,
    create: Script,
    admit: Script,
    grab: Script,
    finish: Script,
}

impl RedisStore {
    pub fn new(link: Arc<RedisLink>, max_concurrent: usize, retain_s: u64) -> Self {
        Self {
            link,
            max_concurrent,
            retain_ms: retain_s * 1000,
            timing: Timing::default(),
            room_index: Script::new(ROOM_INDEX),
            create: Script::new(CREATE),
            admit: Script::new(ADMIT),
            grab: Script::new(GRAB),
            finish: Script::new(FINISH),
        }
    }

    /// Replaces the default [`Timing`].
    #[must_use]
    pub fn with_timing(mut self, timing: Timing) -> Self {
        self.timing = timing;
        self
    }

    /// A fresh packet id in a random hash-tag group.
    pub fn packet_id(node: &str) -> String {
        format!(
            "rp{}-{node}-{:016x}",
            rand::random_range(0..GROUPS),
            rand::random::<u64>()
        )
    }

    fn report(&self, e: &RedisError) {
        if !answered(e) {
            self.link.report_failure();
        }
    }

    /// Runs `inv` once: its reply, or why there is none (no rerun: for scripts that are
    /// not idempotent, or whose loss costs little).
    async fn run_once<T: FromRedisValue>(&self, inv: &ScriptInvocation<'_>) -> Result<T, Fail> {
        let mut conn = self.link.conn().ok_or(Fail::Down)?;
        invoke(&mut conn, inv).await.map_err(|e| {
            self.report(&e);
            if answered(&e) {
                Fail::Refused(e)
            } else {
                Fail::Unknown(e)
            }
        })
    }

    /// Runs `inv`, an idempotent script. If the reply is lost (the request went out,
    /// the link failed), reruns it — safe, as running it twice is running it once —
    /// until a reply comes or [`Timing::recover_for`] passes. Returns the reply and
    /// whether it came from a rerun.
    async fn run_idempotent<T: FromRedisValue>(
        &self,
        inv: &ScriptInvocation<'_>,
    ) -> Result<(T, bool), Fail> {
        let mut last = match self.run_once(inv).await {
            Ok(v) => return Ok((v, false)),
            Err(Fail::Unknown(e)) => e,
            Err(other) => return Err(other),
        };
        let deadline = Instant::now() + self.timing.recover_for;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Fail::Unknown(last));
            }
            tokio::time::sleep(RECOVER_PAUSE.min(left)).await;
            // Until the supervisor replaces a broken connection this may be the old one
            // (failing fast) or none.
            let Some(mut conn) = self.link.conn() else {
                continue;
            };
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, invoke::<T>(&mut conn, inv)).await {
                Ok(Ok(v)) => return Ok((v, true)),
                Ok(Err(e)) if answered(&e) && !transient(&e) => return Err(Fail::Refused(e)),
                Ok(Err(e)) => {
                    self.report(&e);
                    last = e;
                }
                Err(_) => {}
            }
        }
    }

    /// Finishes (`expire`) or claims (`claim`, after our grab emptied it) `packet`;
    /// `Some` when this caller won its `redpacket_done`. The winner also drops the
    /// packet from the indexes of other slots.
    async fn finish_packet(
        &self,
        packet: &str,
        token: &str,
        expire: bool,
    ) -> Result<Option<Claimed>, StoreError> {
        let Some(k) = Keys::of(packet) else {
            // Not an id of this store: nothing to finish.
            return Ok(None);
        };
        let mut inv = self.finish.prepare_invoke();
        inv.key(&k.meta)
            .key(&k.open)
            .arg(packet)
            .arg(token)
            .arg(if expire { "expire" } else { "claim" });
        let (reply, _) = self
            .run_idempotent::<Vec<redis::Value>>(&inv)
            .await
            .map_err(Fail::into_store)?;
        let reply = Reply(reply);
        if reply.code() != "done" {
            return Ok(None);
        }
        let room = reply.text(1).and_then(|r| RoomId::parse(&r).ok());
        self.unindex(room.as_ref(), packet).await;
        Ok(Some(Claimed {
            room,
            done: Done {
                grabbed: u32::try_from(reply.int(2)).unwrap_or(u32::MAX),
                total_grabbed: reply.int(3),
                expired: reply.int(4) == 1,
            },
        }))
    }

    /// Drops a finished packet from the indexes in other slots (the room listing, and
    /// the open index of earlier versions).
    async fn unindex(&self, room: Option<&RoomId>, packet: &str) {
        let Some(mut conn) = self.link.conn() else {
            // Harmless if left: readers re-check each packet's own state, and the room
            // listing expires.
            return;
        };
        let mut cmds = vec![
            redis::cmd("ZREM")
                .arg(LEGACY_OPEN_KEY)
                .arg(packet)
                .to_owned(),
        ];
        if let Some(room) = room {
            cmds.push(
                redis::cmd("SREM")
                    .arg(room_index(room))
                    .arg(packet)
                    .to_owned(),
            );
        }
        if let Err(e) = conn.run_all(&cmds).await {
            self.report(&e);
            tracing::debug!(packet, error = %e, "unindexing a finished packet failed");
        }
    }

    /// The `Grabbed` of a grab that took (or, on a rerun, had taken) a share; claims
    /// `redpacket_done` if the packet is finished.
    async fn granted(&self, packet: &str, token: &str, amount: u64, finished: bool) -> Grabbed {
        let done = if finished {
            match self.finish_packet(packet, token, false).await {
                Ok(c) => c.map(|c| c.done),
                Err(e) => {
                    // If our claim did not land, a sweep claims it after the grace.
                    tracing::warn!(packet, error = %e, "claiming a finished packet failed");
                    None
                }
            }
        } else {
            None
        };
        Grabbed { amount, done }
    }
}

#[async_trait]
impl Store for RedisStore {
    fn new_packet_id(&self, node: &str) -> String {
        Self::packet_id(node)
    }

    async fn create(&self, p: NewPacket) -> Result<(), StoreError> {
        let k = Keys::of(&p.packet).ok_or_else(|| StoreError("bad packet id".into()))?;
        let expire_at = p.expires_at + self.retain_ms;
        let sender = serde_json::to_string(&p.sender).map_err(|e| StoreError(e.to_string()))?;
        // The room listing lives in another slot, so it cannot join the packet's script.
        // Written first: if the packet then fails, the listing points at nothing
        // (readers skip it) and expires; the other order could leave an open packet
        // nobody joining the room is shown.
        let mut listing = self.room_index.prepare_invoke();
        listing
            .key(room_index(&p.room))
            .arg(&p.packet)
            .arg(expire_at.saturating_sub(now_ms()).max(1));
        self.run_idempotent::<i64>(&listing)
            .await
            .map_err(Fail::into_store)?;
        let mut inv = self.create.prepare_invoke();
        inv.key(&k.meta)
            .key(&k.amounts)
            .key(&k.open)
            .arg(&p.packet)
            .arg(expire_at)
            .arg(p.expires_at)
            .arg(p.room.as_str())
            .arg(sender)
            .arg(p.total)
            .arg(p.shares)
            .arg(p.created_at)
            .arg(&p.amounts);
        match self.run_idempotent::<i64>(&inv).await {
            Ok((1, _)) => Ok(()),
            // Our rerun found what the first run created.
            Ok((_, true)) => Ok(()),
            Ok((_, false)) => Err(StoreError(format!("packet {} already exists", p.packet))),
            Err(f) => Err(f.into_store()),
        }
    }

    async fn grab(&self, room: &RoomId, packet: &str, user: &User) -> Result<Grabbed, GrabError> {
        let Some(k) = Keys::of(packet) else {
            return Err(GrabError::NotFound);
        };
        let token = new_token();
        let mut admit = self.admit.prepare_invoke();
        admit
            .key(&k.meta)
            .key(&k.amounts)
            .key(&k.grabs)
            .key(&k.slots)
            .arg(&user.id)
            .arg(room.as_str())
            .arg(self.max_concurrent)
            .arg(self.timing.slot_ttl.as_millis() as u64)
            .arg(&token);
        // Not rerun: a lost admission reply answers `busy`; if the admission landed, its
        // slot frees itself at its deadline.
        match self.run_once::<String>(&admit).await {
            Ok(code) => match code.as_str() {
                "admitted" => {}
                "not_found" => return Err(GrabError::NotFound),
                "already" => return Err(GrabError::AlreadyGrabbed),
                "expired" => return Err(GrabError::Expired),
                "empty" => return Err(GrabError::Empty),
                "busy" => return Err(GrabError::Busy),
                other => return Err(GrabError::Store(format!("unexpected admit reply {other}"))),
            },
            Err(Fail::Refused(e)) if !transient(&e) => return Err(GrabError::Store(e.to_string())),
            Err(_) => return Err(GrabError::Busy),
        }
        let user_json = serde_json::to_string(user).map_err(|e| GrabError::Store(e.to_string()))?;
        let mut inv = self.grab.prepare_invoke();
        inv.key(&k.meta)
            .key(&k.amounts)
            .key(&k.grabs)
            .key(&k.slots)
            .key(&k.stream)
            .key(&k.open)
            .arg(&user.id)
            .arg(user_json)
            .arg(room.as_str())
            .arg(packet)
            .arg(STREAM_MAXLEN)
            .arg(&token)
            .arg(self.timing.finish_grace.as_millis() as u64);
        // A rerun uses the same token: if the first run never happened, the rerun holds
        // its slot (or, past the slot's deadline, goes without one: the cap is a load
        // bound, and at most the grabs being recovered exceed it).
        let (reply, rerun) = match self.run_idempotent::<Vec<redis::Value>>(&inv).await {
            Ok(r) => r,
            Err(Fail::Refused(e)) if !transient(&e) => {
                return Err(GrabError::Store(e.to_string()));
            }
            // The outcome stays unknown: `busy` makes the client retry, and a retry of a
            // grab that landed answers `already_grabbed` — never a second payout.
            Err(_) => return Err(GrabError::Busy),
        };
        let reply = Reply(reply);
        match reply.code().as_str() {
            "ok" => Ok(self
                .granted(packet, &token, reply.int(1), reply.int(2) == 0)
                .await),
            // A rerun finding the user's share: our first run landed and its reply was
            // lost (or the user's concurrent grab won; either way the user holds it).
            "already" if rerun => Ok(self
                .granted(packet, &token, reply.int(1), reply.int(2) == 1)
                .await),
            "already" => Err(GrabError::AlreadyGrabbed),
            "not_found" => Err(GrabError::NotFound),
            "expired" => Err(GrabError::Expired),
            "empty" => Err(GrabError::Empty),
            other => Err(GrabError::Store(format!("unexpected grab reply {other}"))),
        }
    }

    async fn expire(&self, packet: &str) -> Result<Option<Done>, StoreError> {
        Ok(self
            .finish_packet(packet, &new_token(), true)
            .await?
            .map(|c| c.done))
    }

    async fn status(&self, packet: &str) -> Result<Option<PacketStatus>, StoreError> {
        let Some(k) = Keys::of(packet) else {
            return Ok(None);
        };
        let mut conn = self
            .link
            .conn()
            .ok_or(Fail::Down)
            .map_err(Fail::into_store)?;
        let (fields, left, grab_values): (
            std::collections::HashMap<String, String>,
            u64,
            Vec<String>,
        ) = conn
            .pipe(
                redis::pipe()
                    .cmd("HGETALL")
                    .arg(&k.meta)
                    .cmd("LLEN")
                    .arg(&k.amounts)
                    .cmd("HVALS")
                    .arg(&k.grabs),
            )
            .await
            .map_err(|e| {
                self.report(&e);
                StoreError(e.to_string())
            })?;
        if fields.is_empty() {
            return Ok(None);
        }
        let num = |k: &str| {
            fields
                .get(k)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        #[derive(serde::Deserialize)]
        struct G {
            user: User,
            amount: u64,
        }
        let grabs: Vec<GrabRecord> = grab_values
            .iter()
            .filter_map(|v| serde_json::from_str::<G>(v).ok())
            .map(|g| GrabRecord {
                user: g.user,
                amount: g.amount,
            })
            .collect();
        let total = num("total");
        let total_grabbed = num("total_grabbed");
        let expires_at = num("expires_at");
        Ok(Some(PacketStatus {
            packet: packet.to_string(),
            room: fields.get("room").cloned().unwrap_or_default(),
            total,
            shares: num("shares") as u32,
            grabbed: num("grabbed") as u32,
            total_grabbed,
            remaining: left as u32,
            remaining_amount: total.saturating_sub(total_grabbed),
            // Ended by expiry, or past it with shares left (before a sweep marks it); a
            // packet emptied in time never reads as expired.
            expired: fields.get("expired").is_some_and(|v| v == "1")
                || (now_ms() >= expires_at && left > 0),
            expires_at,
            grabs,
        }))
    }

    async fn open_in(&self, room: &RoomId) -> Result<Vec<OpenPacket>, StoreError> {
        let mut conn = self
            .link
            .conn()
            .ok_or(Fail::Down)
            .map_err(Fail::into_store)?;
        let fail = |e: RedisError| {
            self.report(&e);
            StoreError(e.to_string())
        };
        let ids: Vec<String> = conn
            .query(redis::cmd("SMEMBERS").arg(room_index(room)))
            .await
            .map_err(fail)?;
        let now = now_ms();
        let mut open = Vec::new();
        for id in ids {
            let Some(k) = Keys::of(&id) else {
                continue;
            };
            let (m, left): (
                (
                    Option<String>,
                    Option<String>,
                    Option<u64>,
                    Option<u32>,
                    Option<u64>,
                    Option<String>,
                ),
                u64,
            ) = conn
                .pipe(
                    redis::pipe()
                        .cmd("HMGET")
                        .arg(&k.meta)
                        .arg(&["room", "sender", "total", "shares", "expires_at", "expired"])
                        .cmd("LLEN")
                        .arg(&k.amounts),
                )
                .await
                .map_err(fail)?;
            // A listing whose packet is missing (its create failed, or it is gone) or
            // finished is skipped: the listing is only a hint.
            let (Some(r), Some(sender), Some(total), Some(shares), Some(expires_at), expired) = m
            else {
                continue;
            };
            if r != room.as_str()
                || left == 0
                || expired.as_deref() == Some("1")
                || now >= expires_at
            {
                continue;
            }
            let Ok(user) = serde_json::from_str::<User>(&sender) else {
                continue;
            };
            open.push(OpenPacket {
                packet: id,
                user,
                total,
                shares,
                expires_at,
                remaining: left as u32,
            });
        }
        open.sort_by_key(|p| p.expires_at);
        Ok(open)
    }

    async fn open_packets(&self) -> Result<Vec<(String, u64)>, StoreError> {
        // Packets of this version are expired by every node's sweep; only those indexed
        // by an earlier version need timers.
        let Some(mut conn) = self.link.conn() else {
            return Ok(Vec::new());
        };
        conn.query(
            redis::cmd("ZRANGE")
                .arg(LEGACY_OPEN_KEY)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES"),
        )
        .await
        .map_err(|e| {
            self.report(&e);
            StoreError(e.to_string())
        })
    }

    fn sweep_every(&self) -> Option<Duration> {
        Some(SWEEP_EVERY)
    }

    async fn sweep(&self) -> Vec<Finished> {
        let Some(mut conn) = self.link.conn() else {
            // Down: the next sweep (here or on another node) does it.
            return Vec::new();
        };
        let now = now_ms();
        let queries: Vec<redis::Cmd> = (0..GROUPS)
            .map(|g| {
                redis::cmd("ZRANGEBYSCORE")
                    .arg(open_key(&format!("rp{g}")))
                    .arg("-inf")
                    .arg(now)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(SWEEP_BATCH)
                    .to_owned()
            })
            .collect();
        let groups = match conn.run_all(&queries).await {
            Ok(v) => v,
            Err(e) => {
                self.report(&e);
                tracing::debug!(error = %e, "sweeping red packets failed");
                return Vec::new();
            }
        };
        let mut finished = Vec::new();
        for group in groups {
            let Ok(due) = Vec::<String>::from_redis_value(group) else {
                continue;
            };
            for packet in due {
                match self.finish_packet(&packet, &new_token(), true).await {
                    Ok(Some(Claimed {
                        room: Some(room),
                        done,
                    })) => finished.push(Finished { room, packet, done }),
                    Ok(Some(Claimed { room: None, .. })) => {
                        tracing::warn!(packet, "finished packet has no valid room to announce to");
                    }
                    Ok(None) => {}
                    Err(e) => {
                        // Keep what this sweep won: it must still be announced.
                        tracing::debug!(packet, error = %e, "sweeping red packets failed");
                        return finished;
                    }
                }
            }
        }
        finished
    }
}
