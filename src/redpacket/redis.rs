//! The Redis red-packet store, for clusters: every node grabs from the same packet.
//!
//! A packet's keys share one hash tag (`{rpN}`, N chosen at creation and carried in the
//! packet id) so they live in one slot of a Redis Cluster and one Lua script can touch
//! them all atomically: the grab script checks the user has no share, the packet is
//! open and not expired, pops a pre-split amount, records the grab and appends it to
//! the settlement stream (`XADD danmaku:settlement:{rpN}`) — exactly once, whichever
//! node the user grabs from. The per-packet cap on grabs in flight is a counter in the
//! same slot, raised before the grab and lowered by it (with a short TTL so a node that
//! dies mid-grab cannot leak it).
//!
//! When Redis cannot be reached, or a reply is lost, a grab answers `busy`: the client
//! retries, and a retry of a grab that did land answers `already_grabbed` — never a
//! second payout.

use std::sync::Arc;

use async_trait::async_trait;
use redis::{Script, Value};

use super::{Done, GrabError, GrabRecord, Grabbed, NewPacket, PacketStatus, Store, StoreError};
use crate::protocol::{OpenPacket, RoomId, User, now_ms};
use crate::redis_link::RedisLink;

/// Settlement streams (one per hash-tag group) keep at most about this many entries.
const STREAM_MAXLEN: u64 = 10_000_000;
/// Hash-tag groups: packets spread over this many slots of a cluster.
const GROUPS: u32 = 16;
/// Amounts pushed per RPUSH when creating a packet.
const PUSH_CHUNK: usize = 10_000;
/// An in-flight counter left by a crashed node expires after this.
const INFLIGHT_TTL_MS: u64 = 5_000;

/// The hash tag of `packet`'s keys (`rp3-...` → `{rp3}`).
fn tag(packet: &str) -> Option<&str> {
    let group = packet.split('-').next()?;
    (group.starts_with("rp") && group.len() > 2 && group[2..].bytes().all(|b| b.is_ascii_digit()))
        .then_some(group)
}

fn key(packet: &str, part: &str) -> Option<String> {
    Some(format!("danmaku:{{{}}}:{packet}:{part}", tag(packet)?))
}

/// The settlement stream a packet's grabs are appended to.
pub fn settlement_stream(packet: &str) -> Option<String> {
    Some(format!("danmaku:settlement:{{{}}}", tag(packet)?))
}

fn room_index(room: &RoomId) -> String {
    format!("danmaku:rp:room:{room}")
}

const OPEN_KEY: &str = "danmaku:rp:open";

const ADMIT: &str = r#"
local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if n > tonumber(ARGV[1]) then
  redis.call('DECR', KEYS[1])
  return 0
end
return 1
"#;

/// KEYS: meta, amounts, grabs, inflight, stream.
/// ARGV: user id, user json, room, packet, stream maxlen.
/// Returns {code, amount, left, grabbed, total_grabbed}.
const GRAB: &str = r#"
redis.call('DECR', KEYS[4])
if redis.call('EXISTS', KEYS[1]) == 0 then return {'not_found'} end
local meta = redis.call('HMGET', KEYS[1], 'room', 'expires_at', 'expired')
if meta[1] ~= ARGV[3] then return {'not_found'} end
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return {'already'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if meta[3] == '1' or now >= tonumber(meta[2]) then return {'expired'} end
local amount = redis.call('LPOP', KEYS[2])
if not amount then return {'empty'} end
local user = cjson.decode(ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], cjson.encode({user = user, amount = tonumber(amount)}))
local grabbed = redis.call('HINCRBY', KEYS[1], 'grabbed', 1)
local total = redis.call('HINCRBY', KEYS[1], 'total_grabbed', amount)
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[5], '*',
  'packet', ARGV[4], 'room', ARGV[3], 'user', ARGV[1], 'name', user.name,
  'amount', amount, 'ts', tostring(now))
local left = redis.call('LLEN', KEYS[2])
if left == 0 then redis.call('HSET', KEYS[1], 'finished', '1') end
return {'ok', tonumber(amount), left, grabbed, total}
"#;

/// KEYS: meta. Returns {} if already finished, else {grabbed, total_grabbed}.
const EXPIRE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
if redis.call('HGET', KEYS[1], 'finished') == '1' then return {} end
redis.call('HSET', KEYS[1], 'expired', '1', 'finished', '1')
local m = redis.call('HMGET', KEYS[1], 'grabbed', 'total_grabbed')
return {tonumber(m[1]) or 0, tonumber(m[2]) or 0}
"#;

pub struct RedisStore {
    link: Arc<RedisLink>,
    max_concurrent: usize,
    retain_ms: u64,
    admit: Script,
    grab: Script,
    expire: Script,
}

impl RedisStore {
    pub fn new(link: Arc<RedisLink>, max_concurrent: usize, retain_s: u64) -> Self {
        Self {
            link,
            max_concurrent,
            retain_ms: retain_s * 1000,
            admit: Script::new(ADMIT),
            grab: Script::new(GRAB),
            expire: Script::new(EXPIRE),
        }
    }

    /// A fresh packet id in a random hash-tag group.
    pub fn packet_id(node: &str) -> String {
        format!(
            "rp{}-{node}-{:016x}",
            rand::random_range(0..GROUPS),
            rand::random::<u64>()
        )
    }

    fn conn(&self) -> Result<crate::redis_link::Conn, StoreError> {
        self.link
            .conn()
            .ok_or_else(|| StoreError("redis is unreachable".into()))
    }

    /// Drops a finished packet from the open indexes (they live in other slots).
    async fn unindex(
        &self,
        conn: &mut crate::redis_link::Conn,
        room: Option<&RoomId>,
        packet: &str,
    ) {
        let mut cmds = vec![redis::cmd("ZREM").arg(OPEN_KEY).arg(packet).to_owned()];
        if let Some(room) = room {
            cmds.push(
                redis::cmd("SREM")
                    .arg(room_index(room))
                    .arg(packet)
                    .to_owned(),
            );
        }
        if let Err(e) = conn.run_all(&cmds).await {
            // Harmless if left: readers re-check each packet's own state.
            tracing::debug!(packet, error = %e, "unindexing a finished packet failed");
        }
    }

    fn fail(&self, e: redis::RedisError) -> StoreError {
        if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
            self.link.report_failure();
        }
        StoreError(e.to_string())
    }
}

fn keys(packet: &str) -> Option<[String; 4]> {
    Some([
        key(packet, "meta")?,
        key(packet, "amounts")?,
        key(packet, "grabs")?,
        key(packet, "inflight")?,
    ])
}

#[async_trait]
impl Store for RedisStore {
    fn new_packet_id(&self, node: &str) -> String {
        Self::packet_id(node)
    }

    async fn create(&self, p: NewPacket) -> Result<(), StoreError> {
        let [meta, amounts, _, _] =
            keys(&p.packet).ok_or_else(|| StoreError("bad packet id".into()))?;
        let mut conn = self.conn()?;
        let expire_at = p.expires_at + self.retain_ms;
        let mut pipe = redis::pipe();
        // Amounts first: the packet exists (for grabs) only once `meta` does.
        for chunk in p.amounts.chunks(PUSH_CHUNK) {
            pipe.cmd("RPUSH").arg(&amounts).arg(chunk).ignore();
        }
        pipe.cmd("PEXPIREAT").arg(&amounts).arg(expire_at).ignore();
        let sender = serde_json::to_string(&p.sender).map_err(|e| StoreError(e.to_string()))?;
        pipe.cmd("HSET")
            .arg(&meta)
            .arg(&[
                ("room", p.room.to_string()),
                ("sender", sender),
                ("total", p.total.to_string()),
                ("shares", p.shares.to_string()),
                ("created_at", p.created_at.to_string()),
                ("expires_at", p.expires_at.to_string()),
                ("grabbed", "0".into()),
                ("total_grabbed", "0".into()),
            ])
            .ignore();
        pipe.cmd("PEXPIREAT").arg(&meta).arg(expire_at).ignore();
        // The packet's own keys share a slot: one pipeline. The indexes live elsewhere.
        conn.pipe::<()>(&pipe).await.map_err(|e| self.fail(e))?;
        let index = [
            redis::cmd("SADD")
                .arg(room_index(&p.room))
                .arg(&p.packet)
                .to_owned(),
            redis::cmd("ZADD")
                .arg(OPEN_KEY)
                .arg(p.expires_at)
                .arg(&p.packet)
                .to_owned(),
        ];
        conn.run_all(&index).await.map_err(|e| self.fail(e))?;
        Ok(())
    }

    async fn grab(&self, room: &RoomId, packet: &str, user: &User) -> Result<Grabbed, GrabError> {
        let Some([meta, amounts, grabs, inflight]) = keys(packet) else {
            return Err(GrabError::NotFound);
        };
        let stream = settlement_stream(packet).ok_or(GrabError::NotFound)?;
        // Redis unreachable: busy, never a guess.
        let Some(mut conn) = self.link.conn() else {
            return Err(GrabError::Busy);
        };
        let admitted: Result<i64, _> = match &mut conn {
            crate::redis_link::Conn::Single(c) => {
                self.admit
                    .key(&inflight)
                    .arg(self.max_concurrent)
                    .arg(INFLIGHT_TTL_MS)
                    .invoke_async(c)
                    .await
            }
            crate::redis_link::Conn::Cluster(c) => {
                self.admit
                    .key(&inflight)
                    .arg(self.max_concurrent)
                    .arg(INFLIGHT_TTL_MS)
                    .invoke_async(c)
                    .await
            }
        };
        match admitted {
            Ok(1) => {}
            Ok(_) => return Err(GrabError::Busy),
            Err(e) => {
                self.fail(e);
                return Err(GrabError::Busy);
            }
        }
        let user_json = serde_json::to_string(user).map_err(|e| GrabError::Store(e.to_string()))?;
        let mut inv = self.grab.prepare_invoke();
        inv.key(&meta)
            .key(&amounts)
            .key(&grabs)
            .key(&inflight)
            .key(&stream)
            .arg(&user.id)
            .arg(user_json)
            .arg(room.as_str())
            .arg(packet)
            .arg(STREAM_MAXLEN);
        let reply: Result<Vec<Value>, _> = match &mut conn {
            crate::redis_link::Conn::Single(c) => inv.invoke_async(c).await,
            crate::redis_link::Conn::Cluster(c) => inv.invoke_async(c).await,
        };
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                // The outcome is unknown: `busy` makes the client retry, and a retry
                // of a grab that landed answers `already_grabbed`.
                self.fail(e);
                return Err(GrabError::Busy);
            }
        };
        let code = match reply.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).to_string(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => return Err(GrabError::Store("unexpected grab reply".into())),
        };
        let int = |i: usize| match reply.get(i) {
            Some(Value::Int(n)) => *n as u64,
            _ => 0,
        };
        match code.as_str() {
            "ok" => {
                let done = (int(2) == 0).then(|| Done {
                    grabbed: int(3) as u32,
                    total_grabbed: int(4),
                    expired: false,
                });
                if done.is_some() {
                    self.unindex(&mut conn, Some(room), packet).await;
                }
                Ok(Grabbed {
                    amount: int(1),
                    done,
                })
            }
            "not_found" => Err(GrabError::NotFound),
            "already" => Err(GrabError::AlreadyGrabbed),
            "expired" => Err(GrabError::Expired),
            "empty" => Err(GrabError::Empty),
            other => Err(GrabError::Store(format!("unexpected grab reply {other}"))),
        }
    }

    async fn expire(&self, packet: &str) -> Result<Option<Done>, StoreError> {
        let meta = key(packet, "meta").ok_or_else(|| StoreError("bad packet id".into()))?;
        let mut conn = self.conn()?;
        let mut inv = self.expire.prepare_invoke();
        inv.key(&meta);
        let reply: Vec<u64> = match &mut conn {
            crate::redis_link::Conn::Single(c) => inv.invoke_async(c).await,
            crate::redis_link::Conn::Cluster(c) => inv.invoke_async(c).await,
        }
        .map_err(|e| self.fail(e))?;
        let room: Option<String> = conn
            .query(redis::cmd("HGET").arg(&meta).arg("room"))
            .await
            .map_err(|e| self.fail(e))?;
        let room = room.as_deref().and_then(|r| RoomId::parse(r).ok());
        self.unindex(&mut conn, room.as_ref(), packet).await;
        Ok((reply.len() == 2).then(|| Done {
            grabbed: reply[0] as u32,
            total_grabbed: reply[1],
            expired: true,
        }))
    }

    async fn status(&self, packet: &str) -> Result<Option<PacketStatus>, StoreError> {
        let Some([meta, amounts, grabs, _]) = keys(packet) else {
            return Ok(None);
        };
        let mut conn = self.conn()?;
        let (fields, left, grab_values): (
            std::collections::HashMap<String, String>,
            u64,
            Vec<String>,
        ) = conn
            .pipe(
                redis::pipe()
                    .cmd("HGETALL")
                    .arg(&meta)
                    .cmd("LLEN")
                    .arg(&amounts)
                    .cmd("HVALS")
                    .arg(&grabs),
            )
            .await
            .map_err(|e| self.fail(e))?;
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
            expired: fields.get("expired").is_some_and(|v| v == "1") || now_ms() >= expires_at,
            expires_at,
            grabs,
        }))
    }

    async fn open_in(&self, room: &RoomId) -> Result<Vec<OpenPacket>, StoreError> {
        let mut conn = self.conn()?;
        let ids: Vec<String> = conn
            .query(redis::cmd("SMEMBERS").arg(room_index(room)))
            .await
            .map_err(|e| self.fail(e))?;
        let now = now_ms();
        let mut open = Vec::new();
        for id in ids {
            let Some([meta, amounts, _, _]) = keys(&id) else {
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
                        .arg(&meta)
                        .arg(&["room", "sender", "total", "shares", "expires_at", "expired"])
                        .cmd("LLEN")
                        .arg(&amounts),
                )
                .await
                .map_err(|e| self.fail(e))?;
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
        let Some(mut conn) = self.link.conn() else {
            // Started during an outage: other nodes (or our later restart) expire them.
            return Ok(Vec::new());
        };
        let pairs: Vec<(String, u64)> = conn
            .query(
                redis::cmd("ZRANGE")
                    .arg(OPEN_KEY)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES"),
            )
            .await
            .map_err(|e| self.fail(e))?;
        Ok(pairs)
    }
}
