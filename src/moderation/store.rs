//! Where moderation state lives beyond the process: a file on a single node, Redis in a
//! cluster.
//!
//! - **File** (`data/moderation.json`): the whole [`State`] as JSON, rewritten on every
//!   change through a temporary file, fsync and rename, so a crash leaves the old state
//!   or the new one, never half of either. Changes are moderators' actions (a few a
//!   second at most), so rewriting the whole state is cheap and keeps the format
//!   trivially readable.
//! - **Redis**: one hash per kind (`danmaku:moderation:mutes` with fields
//!   `{room}/{user}`, `…:bans` by user, `…:settings` by room) and the lists as one JSON
//!   string (`…:filters`), so a change is one command and a full re-read four. Every
//!   change is then announced on the `danmaku:moderation` channel for the other nodes.
//!   Values are JSON [`Restriction`]s / [`RoomSettings`]; expired ones are deleted by
//!   whichever node re-reads them first, compare-and-delete, so a ban renewed meanwhile
//!   survives.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redis::Value;
use serde::{Deserialize, Serialize};

use super::{Change, Lists, Restriction, RoomSettings, State};
use crate::protocol::{RoomId, now_ms};
use crate::redis_link::RedisLink;

pub const MUTES_KEY: &str = "danmaku:moderation:mutes";
pub const BANS_KEY: &str = "danmaku:moderation:bans";
pub const SETTINGS_KEY: &str = "danmaku:moderation:settings";
pub const FILTERS_KEY: &str = "danmaku:moderation:filters";
/// Where changes are announced.
pub const CHANNEL: &str = "danmaku:moderation";
/// File name of the single-node state in the data dir.
pub const FILE_NAME: &str = "moderation.json";
/// Expired entries deleted per re-read, so a Redis full of them does not stall one.
const EXPIRED_PER_READ: usize = 512;

/// Deletes a hash field only if it still holds the value that was read (an expired
/// mute or ban), so one renewed in the meantime is kept.
const DELETE_IF_SAME: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a moderation state: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("redis is unreachable")]
    RedisDown,
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis reply: {0}")]
    Reply(#[from] redis::ParsingError),
}

/// A change as announced to the other nodes.
#[derive(Serialize, Deserialize)]
pub(super) struct Notice {
    /// A node ignores its own notices (it applied the change already).
    pub origin: String,
    pub change: Change,
}

pub(super) enum Store {
    File { path: PathBuf },
    Redis(Arc<RedisLink>),
}

impl Store {
    pub fn file(dir: &Path) -> Self {
        Store::File {
            path: dir.join(FILE_NAME),
        }
    }

    pub fn redis(link: Arc<RedisLink>) -> Self {
        Store::Redis(link)
    }

    /// Whether [`Store::write`] needs the whole state after the change.
    pub fn wants_snapshot(&self) -> bool {
        matches!(self, Store::File { .. })
    }

    /// The stored state; `None` when nothing was ever stored.
    ///
    /// # Errors
    /// The file cannot be read or parsed; Redis is down or failed.
    pub async fn load(&self) -> Result<Option<State>, StoreError> {
        match self {
            Store::File { path } => {
                let bytes = match tokio::fs::read(path).await {
                    Ok(b) => b,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(source) => {
                        return Err(StoreError::Io {
                            path: path.clone(),
                            source,
                        });
                    }
                };
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| StoreError::Parse {
                        path: path.clone(),
                        source,
                    })
            }
            Store::Redis(link) => load_redis(link).await.map(Some),
        }
    }

    /// Stores one change (`after`: the whole state with it, for the file store), and
    /// with Redis announces it.
    ///
    /// # Errors
    /// The file could not be written; Redis is down or refused the command. Nothing was
    /// stored then (a failed announcement is not an error: the others' re-read heals it).
    pub async fn write(
        &self,
        node: &str,
        change: &Change,
        after: Option<&State>,
    ) -> Result<(), StoreError> {
        match self {
            Store::File { path } => {
                let state = after.expect("the file store is given the state after the change");
                let bytes =
                    serde_json::to_vec_pretty(state).map_err(|source| StoreError::Parse {
                        path: path.clone(),
                        source,
                    })?;
                let path = path.clone();
                tokio::task::spawn_blocking(move || write_atomically(&path, &bytes))
                    .await
                    .unwrap_or_else(|e| {
                        Err(StoreError::Io {
                            path: PathBuf::from(FILE_NAME),
                            source: std::io::Error::other(e),
                        })
                    })
            }
            Store::Redis(link) => {
                let Some(mut conn) = link.conn() else {
                    return Err(StoreError::RedisDown);
                };
                let res: Result<Value, _> = conn.query(&command(change)).await;
                if let Err(e) = res {
                    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
                        link.report_failure();
                    }
                    return Err(e.into());
                }
                let notice = Notice {
                    origin: node.to_owned(),
                    change: change.clone(),
                };
                let payload = serde_json::to_vec(&notice).expect("a notice encodes");
                let publish = redis::cmd(conn.publish_cmd())
                    .arg(CHANNEL)
                    .arg(payload)
                    .to_owned();
                if let Err(e) = conn.query::<Value>(&publish).await {
                    tracing::warn!(error = %e, "moderation change stored but not announced; other nodes pick it up on their next re-read");
                }
                Ok(())
            }
        }
    }
}

/// The Redis command that stores `change`.
fn command(change: &Change) -> redis::Cmd {
    match change {
        Change::Mute {
            room,
            user,
            restriction,
        } => redis::cmd("HSET")
            .arg(MUTES_KEY)
            .arg(mute_field(room, user))
            .arg(json(restriction))
            .to_owned(),
        Change::Unmute { room, user } => redis::cmd("HDEL")
            .arg(MUTES_KEY)
            .arg(mute_field(room, user))
            .to_owned(),
        Change::Ban { user, restriction } => redis::cmd("HSET")
            .arg(BANS_KEY)
            .arg(user)
            .arg(json(restriction))
            .to_owned(),
        Change::Unban { user } => redis::cmd("HDEL").arg(BANS_KEY).arg(user).to_owned(),
        Change::Settings { room, settings } if *settings == RoomSettings::default() => {
            redis::cmd("HDEL")
                .arg(SETTINGS_KEY)
                .arg(room.as_str())
                .to_owned()
        }
        Change::Settings { room, settings } => redis::cmd("HSET")
            .arg(SETTINGS_KEY)
            .arg(room.as_str())
            .arg(json(settings))
            .to_owned(),
        Change::Filters(lists) => redis::cmd("SET")
            .arg(FILTERS_KEY)
            .arg(json(lists))
            .to_owned(),
    }
}

fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("moderation values encode")
}

/// Room ids cannot hold `/`, so the first one splits the field back.
fn mute_field(room: &RoomId, user: &str) -> String {
    format!("{room}/{user}")
}

async fn load_redis(link: &RedisLink) -> Result<State, StoreError> {
    let Some(mut conn) = link.conn() else {
        return Err(StoreError::RedisDown);
    };
    let cmds = [
        redis::cmd("HGETALL").arg(MUTES_KEY).to_owned(),
        redis::cmd("HGETALL").arg(BANS_KEY).to_owned(),
        redis::cmd("HGETALL").arg(SETTINGS_KEY).to_owned(),
        redis::cmd("GET").arg(FILTERS_KEY).to_owned(),
    ];
    let replies = conn.run_all(&cmds).await.inspect_err(|e| {
        if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
            link.report_failure();
        }
    })?;
    let mut replies = replies.into_iter();
    let mut next_map = || -> Result<Vec<(String, String)>, StoreError> {
        Ok(redis::from_redis_value(
            replies.next().unwrap_or(Value::Nil),
        )?)
    };
    let (mutes, bans, settings) = (next_map()?, next_map()?, next_map()?);
    let filters: Option<String> = redis::from_redis_value(replies.next().unwrap_or(Value::Nil))?;

    let now = now_ms();
    let mut state = State::default();
    let mut expired: Vec<(&'static str, String, String)> = Vec::new();
    for (field, value) in mutes {
        let Some((room, user)) = field.split_once('/') else {
            continue;
        };
        let (Ok(room), Some(r)) = (RoomId::parse(room), decode::<Restriction>(&field, &value))
        else {
            continue;
        };
        if r.active(now) {
            state
                .mutes
                .entry(room)
                .or_default()
                .insert(user.to_owned(), r);
        } else {
            expired.push((MUTES_KEY, field, value));
        }
    }
    for (user, value) in bans {
        let Some(r) = decode::<Restriction>(&user, &value) else {
            continue;
        };
        if r.active(now) {
            state.bans.insert(user, r);
        } else {
            expired.push((BANS_KEY, user, value));
        }
    }
    for (room, value) in settings {
        if let (Ok(id), Some(s)) = (RoomId::parse(&room), decode::<RoomSettings>(&room, &value)) {
            state.settings.insert(id, s);
        }
    }
    if let Some(lists) = filters
        .as_deref()
        .and_then(|f| decode::<Lists>(FILTERS_KEY, f))
    {
        state.lists = lists;
    }
    if !expired.is_empty() {
        let cmds: Vec<redis::Cmd> = expired
            .iter()
            .take(EXPIRED_PER_READ)
            .map(|(key, field, value)| {
                redis::cmd("EVAL")
                    .arg(DELETE_IF_SAME)
                    .arg(1)
                    .arg(*key)
                    .arg(field)
                    .arg(value)
                    .to_owned()
            })
            .collect();
        if let Err(e) = conn.run_all(&cmds).await {
            tracing::debug!(error = %e, "deleting expired moderation entries failed; retried next time");
        }
    }
    Ok(state)
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, value: &str) -> Option<T> {
    serde_json::from_str(value)
        .inspect_err(
            |e| tracing::warn!(field = what, error = %e, "undecodable moderation entry skipped"),
        )
        .ok()
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    use std::io::Write;
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    // The rename itself is durable only once the directory is synced.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}
