//! Keeps a node's moderation copy current in a cluster: change notices over pub/sub
//! (applied within milliseconds of the change) plus a full re-read of the store every
//! [`RESYNC_EVERY`] and after every (re)subscription, which heals notices lost to a full
//! inbox, a dropped subscriber connection or a Redis restart.
//!
//! The subscription is made before the first re-read, so no change can fall between the
//! two. A notice and a re-read may cross (the re-read older than the notice); the next
//! re-read settles it, and until then the node errs only by one moderator action.

use std::sync::Arc;
use std::time::Duration;

use redis::{PushInfo, PushKind, Value};
use tokio_util::sync::CancellationToken;

use super::Moderation;
use super::store::{CHANNEL, Notice};
use crate::redis_link::{self, RedisLink};

/// How often the whole state is re-read from Redis.
pub const RESYNC_EVERY: Duration = Duration::from_secs(5);
/// Notices buffered between the subscriber connection and this task; beyond it they
/// are dropped and the next re-read comes at once.
const INBOX: usize = 1024;

pub(super) async fn run(m: Arc<Moderation>, link: Arc<RedisLink>, cancel: CancellationToken) {
    let mut attempt = 0u32;
    loop {
        let (push_tx, push_rx) = flume::bounded::<PushInfo>(INBOX);
        let sender = move |info: PushInfo| push_tx.try_send(info);
        let conn = tokio::select! {
            _ = cancel.cancelled() => return,
            c = redis_link::connect(&link.cfg, Some(sender)) => c,
        };
        match conn {
            Ok(mut conn) => {
                attempt = 0;
                if let Err(e) = serve(&m, &mut conn, &push_rx, &cancel).await {
                    tracing::warn!(error = %e, "moderation subscriber connection lost; reconnecting");
                }
                if cancel.is_cancelled() {
                    return;
                }
            }
            Err(e) => {
                if attempt == 0 {
                    tracing::warn!(error = %e, "moderation subscriber cannot connect; retrying with backoff");
                }
            }
        }
        let wait = redis_link::backoff(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn serve(
    m: &Moderation,
    conn: &mut redis_link::Conn,
    pushes: &flume::Receiver<PushInfo>,
    cancel: &CancellationToken,
) -> redis::RedisResult<()> {
    conn.subscribe(CHANNEL).await?;
    resync(m).await;
    let mut every =
        tokio::time::interval_at(tokio::time::Instant::now() + RESYNC_EVERY, RESYNC_EVERY);
    let mut health = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            push = pushes.recv_async() => {
                let Ok(push) = push else { return Err(disconnected()) };
                match push.kind {
                    PushKind::Message | PushKind::SMessage => on_notice(m, push.data).await,
                    // A cluster moving the channel's slot unsubscribes us: follow it.
                    PushKind::Unsubscribe | PushKind::SUnsubscribe => {
                        conn.subscribe(CHANNEL).await?;
                        resync(m).await;
                    }
                    PushKind::Disconnection => return Err(disconnected()),
                    _ => {}
                }
                if pushes.is_full() {
                    // Notices were (or are about to be) dropped: re-read instead.
                    resync(m).await;
                }
            }
            _ = every.tick() => resync(m).await,
            _ = health.tick() => {
                if let redis_link::Conn::Single(_) = conn {
                    tokio::time::timeout(Duration::from_secs(2), conn.query::<Value>(&redis::cmd("PING")))
                        .await
                        .map_err(|_| disconnected())??;
                }
            }
        }
    }
}

async fn resync(m: &Moderation) {
    match m.store.load().await {
        Ok(Some(state)) => m.replace(state).await,
        Ok(None) => {}
        Err(e) => tracing::debug!(error = %e, "moderation re-read failed; retried shortly"),
    }
}

async fn on_notice(m: &Moderation, data: Vec<Value>) {
    let Some(Value::BulkString(payload)) = data.into_iter().nth(1) else {
        return;
    };
    let notice: Notice = match serde_json::from_slice(&payload) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "undecodable moderation notice");
            return;
        }
    };
    if notice.origin == *m.node {
        return;
    }
    m.apply_here(&notice.change, None).await;
}

fn disconnected() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "moderation subscriber disconnected",
    ))
}
