//! The cluster sink: Redis Streams. Each record is one `XADD` to its room's stream key
//! (`danmaku:events`, or with `stream.shards` > 1 `danmaku:events:N` by a hash of the
//! room, so a Redis Cluster spreads them), trimmed with `MAXLEN ~ stream.max_len`. A
//! batch sends one script call per key that makes all of that key's `XADD`s, in one
//! pipeline: the writer batches whatever the flushers queued since its last turn, so
//! Redis sees O(keys) commands per turn, not one per record.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Record, Sink, StreamError, shard_of};
use crate::redis_link::RedisLink;

pub const STREAM_KEY: &str = "danmaku:events";

/// Appends records to the stream KEYS[1], trimmed to about ARGV[1] entries; then per
/// record ARGV holds its id, room, type, status, node, ts and event.
const APPEND: &str = r"
for i = 2, #ARGV, 7 do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
    'id', ARGV[i], 'room', ARGV[i + 1], 'type', ARGV[i + 2], 'status', ARGV[i + 3],
    'node', ARGV[i + 4], 'ts', ARGV[i + 5], 'event', ARGV[i + 6])
end
return (#ARGV - 1) / 7
";

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
        let mut calls: Vec<redis::Cmd> = Vec::new();
        let mut by_key: HashMap<String, usize> = HashMap::new();
        for r in records {
            let room = r.room.as_ref().map(|r| r.as_str());
            let key = stream_key(room, self.shards);
            let i = *by_key.entry(key).or_insert_with_key(|key| {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(APPEND).arg(1).arg(key).arg(self.max_len);
                calls.push(cmd);
                calls.len() - 1
            });
            calls[i]
                .arg(r.id())
                .arg(room.unwrap_or(""))
                .arg(r.kind())
                .arg(r.status.as_str())
                .arg(&self.node)
                .arg(r.ts())
                .arg(r.event_json());
        }
        let groups: Vec<Vec<redis::Cmd>> = calls.into_iter().map(|c| vec![c]).collect();
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
