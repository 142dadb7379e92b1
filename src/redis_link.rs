//! The node's link to Redis: connecting (single server or Redis Cluster), the shared
//! multiplexed command connection and its supervision through outages.
//!
//! Every Redis user (backplane publishing, presence, red packets, rate limits) borrows a
//! clone of one multiplexed connection from [`RedisLink::conn`]; a `None` means Redis is
//! down right now, and each caller has its own policy for that (buffer and drop, answer
//! `busy`, fall back to local limits). A supervisor task pings every second; on a failure
//! it drops the connection and reconnects with jittered exponential backoff, counting
//! reconnects. The pub/sub subscriber connection is separate (owned by the backplane),
//! built with [`connect`] and a push sender.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::{AsyncPushSender, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Cmd, FromRedisValue, Pipeline, ProtocolVersion, RedisResult, Value,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::RedisConfig;

pub const RECONNECTS: &str = "danmaku_redis_reconnects_total";
pub const UP: &str = "danmaku_redis_up";

/// Bound on connecting and on any one command, so an outage never hangs a caller.
const TIMEOUT: Duration = Duration::from_secs(2);
const HEALTH_EVERY: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One connection, to a single server or to a cluster; cheap to clone (multiplexed).
#[derive(Clone)]
pub enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Conn {
    pub async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> RedisResult<T> {
        match self {
            Conn::Single(c) => cmd.query_async(c).await,
            Conn::Cluster(c) => cmd.query_async(c).await,
        }
    }

    pub async fn pipe<T: FromRedisValue>(&mut self, p: &Pipeline) -> RedisResult<T> {
        match self {
            Conn::Single(c) => p.query_async(c).await,
            Conn::Cluster(c) => p.query_async(c).await,
        }
    }

    /// Runs commands whose keys may live in different slots and returns every reply:
    /// one pipelined round trip on a single server; on a cluster each command on its
    /// own, concurrently (a cluster refuses pipelines that cross slots).
    pub async fn run_all(&mut self, cmds: &[Cmd]) -> RedisResult<Vec<Value>> {
        match self {
            Conn::Single(c) => {
                let mut p = redis::pipe();
                for cmd in cmds {
                    p.add_command(cmd.clone());
                }
                p.query_async(c).await
            }
            Conn::Cluster(c) => {
                let replies = futures_util::future::join_all(cmds.iter().map(|cmd| {
                    let mut c = c.clone();
                    async move { cmd.query_async::<Value>(&mut c).await }
                }))
                .await;
                replies.into_iter().collect()
            }
        }
    }

    /// SUBSCRIBE, or SSUBSCRIBE (sharded pub/sub) on a cluster.
    pub async fn subscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Conn::Single(c) => c.subscribe(channel).await,
            Conn::Cluster(c) => c.ssubscribe(channel).await,
        }
    }

    pub async fn unsubscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Conn::Single(c) => c.unsubscribe(channel).await,
            Conn::Cluster(c) => c.sunsubscribe(channel).await,
        }
    }

    /// The publish command matching [`Conn::subscribe`].
    pub fn publish_cmd(&self) -> &'static str {
        match self {
            Conn::Single(_) => "PUBLISH",
            Conn::Cluster(_) => "SPUBLISH",
        }
    }
}

/// Connects per `cfg`; with `push`, pub/sub messages (RESP3 pushes) go to it.
///
/// # Errors
/// Connection refused, timeout, bad URL.
pub async fn connect(
    cfg: &RedisConfig,
    push: Option<impl AsyncPushSender + Clone>,
) -> RedisResult<Conn> {
    let urls: Vec<String> = cfg.url.split(',').map(|u| u.trim().to_string()).collect();
    if cfg.cluster {
        let mut b = ClusterClient::builder(urls)
            .use_protocol(ProtocolVersion::RESP3)
            .connection_timeout(TIMEOUT)
            .response_timeout(TIMEOUT)
            .retries(1);
        if let Some(p) = push {
            b = b.push_sender(p);
        }
        let client = b.build()?;
        let conn = tokio::time::timeout(TIMEOUT * 2, client.get_async_connection())
            .await
            .map_err(|_| timeout_error())??;
        Ok(Conn::Cluster(conn))
    } else {
        // RESP3: pub/sub messages arrive as pushes on a multiplexed connection.
        let url = &urls[0];
        let url = if url.contains("protocol=") {
            url.clone()
        } else if url.contains('?') {
            format!("{url}&protocol=resp3")
        } else {
            format!("{url}?protocol=resp3")
        };
        let client = redis::Client::open(url.as_str())?;
        let mut config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT));
        if let Some(p) = push {
            config = config.set_push_sender(p);
        }
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok(Conn::Single(conn))
    }
}

fn timeout_error() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "redis connect timed out",
    ))
}

/// Jittered exponential backoff: full jitter over `[min, min·2^attempt]`, capped.
pub fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_MIN
        .saturating_mul(1u32 << attempt.min(10))
        .min(BACKOFF_MAX);
    let ms = ceiling.as_millis() as u64;
    Duration::from_millis(rand::random_range(
        BACKOFF_MIN.as_millis() as u64..=ms.max(BACKOFF_MIN.as_millis() as u64),
    ))
}

/// The supervised command connection.
pub struct RedisLink {
    pub cfg: RedisConfig,
    conn: Mutex<Option<Conn>>,
    up: AtomicBool,
    /// Wakes the supervisor when a caller saw a failure.
    failed: tokio::sync::Notify,
}

impl RedisLink {
    /// Starts the supervisor; the first connection attempt happens in it, so a node
    /// starts (and serves local rooms) even while Redis is down.
    pub fn start(
        cfg: RedisConfig,
        cancel: &CancellationToken,
        tracker: &TaskTracker,
    ) -> std::sync::Arc<Self> {
        let link = std::sync::Arc::new(Self {
            cfg,
            conn: Mutex::new(None),
            up: AtomicBool::new(false),
            failed: tokio::sync::Notify::new(),
        });
        ::metrics::gauge!(UP).set(0.0);
        tracker.spawn(std::sync::Arc::clone(&link).supervise(cancel.clone()));
        link
    }

    /// A clone of the command connection, or `None` while Redis is down.
    pub fn conn(&self) -> Option<Conn> {
        self.conn.lock().expect("link lock").clone()
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Called by a user whose command failed at the connection level.
    pub fn report_failure(&self) {
        self.failed.notify_one();
    }

    /// Waits until the link is up (tests and start-up ordering), at most `limit`.
    pub async fn wait_up(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.is_up() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    fn set(&self, conn: Option<Conn>) {
        let up = conn.is_some();
        *self.conn.lock().expect("link lock") = conn;
        self.up.store(up, Ordering::Release);
        ::metrics::gauge!(UP).set(if up { 1.0 } else { 0.0 });
    }

    async fn supervise(self: std::sync::Arc<Self>, cancel: CancellationToken) {
        let mut attempt = 0u32;
        loop {
            if self.conn().is_none() {
                let res = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = connect(&self.cfg, None::<NoPush>) => r,
                };
                match res {
                    Ok(c) => {
                        if attempt > 0 {
                            ::metrics::counter!(RECONNECTS, "conn" => "command").increment(1);
                            tracing::info!("redis command connection restored");
                        }
                        attempt = 0;
                        self.set(Some(c));
                    }
                    Err(e) => {
                        if attempt == 0 {
                            tracing::warn!(error = %e, "redis unreachable; retrying with backoff");
                        }
                        let wait = backoff(attempt);
                        attempt = attempt.saturating_add(1);
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(wait) => {}
                        }
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(HEALTH_EVERY) => {}
                _ = self.failed.notified() => {}
            }
            let Some(mut c) = self.conn() else { continue };
            let ping: RedisResult<String> =
                tokio::time::timeout(TIMEOUT, c.query(&redis::cmd("PING")))
                    .await
                    .unwrap_or_else(|_| Err(timeout_error()));
            if let Err(e) = ping {
                tracing::warn!(error = %e, "redis command connection lost");
                self.set(None);
                attempt = 1;
            }
        }
    }
}

/// The command connection takes no pushes.
#[derive(Clone)]
struct NoPush;

impl AsyncPushSender for NoPush {
    fn send(&self, _: redis::PushInfo) -> Result<(), redis::aio::SendError> {
        Ok(())
    }
}
