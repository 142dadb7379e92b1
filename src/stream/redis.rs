//! The cluster sink: Redis Streams. Each record is one `XADD` to its room's stream key
//! (`danmaku:events`, or with `stream.shards` > 1 `danmaku:events:N` by a hash of the
//! room, so a Redis Cluster spreads them), trimmed with `MAXLEN ~ stream.max_len`; a
//! batch is one pipeline (each key's entries in order), never a round trip per record.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Record, Sink, StreamError, shard_of};
use crate::redis_link::RedisLink;

pub const STREAM_KEY: &str = "danmaku:events";

/// The stream key of `room` (None: a change with no room, on the first key).
pub fn stream_key(room: Option<&str>, shards: u32) -> String {
    if shards <= 1 {
        STREAM_KEY.to_owned()
    } else {
        format!("{STREAM_KEY}:{}", shard_of(room.unwrap_or(""), shards))
    }
}

pub struct RedisSink {
    link: Arc<RedisLink>,
    node: String,
    shards: u32,
    max_len: u64,
}

impl RedisSink {
    pub fn new(link: Arc<RedisLink>, node: &str, shards: u32, max_len: u64) -> Self {
        Self {
            link,
            node: node.to_owned(),
            shards,
            max_len,
        }
    }
}

#[async_trait::async_trait]
impl Sink for RedisSink {
    async fn write(&mut self, records: &[Record]) -> Result<(), StreamError> {
        let Some(mut conn) = self.link.conn() else {
            return Err(StreamError::RedisDown);
        };
        let mut groups: Vec<Vec<redis::Cmd>> = Vec::new();
        let mut by_key: HashMap<String, usize> = HashMap::new();
        for r in records {
            let room = r.room.as_ref().map(|r| r.as_str());
            let key = stream_key(room, self.shards);
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&key)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.max_len)
                .arg("*")
                .arg("id")
                .arg(r.id())
                .arg("room")
                .arg(room.unwrap_or(""))
                .arg("type")
                .arg(r.kind())
                .arg("status")
                .arg(r.status.as_str())
                .arg("node")
                .arg(&self.node)
                .arg("ts")
                .arg(r.ts())
                .arg("event")
                .arg(r.event_json());
            let g = *by_key.entry(key).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push(cmd);
        }
        match conn.run_groups(&groups).await {
            Ok(_) => Ok(()),
            Err(e) => {
                self.link.report_failure();
                Err(e.into())
            }
        }
    }

    async fn sync(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shard_is_the_one_key_more_spread_by_room() {
        assert_eq!(stream_key(Some("r"), 1), "danmaku:events");
        assert_eq!(stream_key(None, 1), "danmaku:events");
        let k = stream_key(Some("r"), 8);
        assert!(k.starts_with("danmaku:events:"), "{k}");
        assert_eq!(k, stream_key(Some("r"), 8));
    }
}
