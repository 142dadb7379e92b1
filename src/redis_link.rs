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
//!
//! Every reconnect, the first one included, waits a random time first ([`backoff`], full
//! jitter): a Redis restart cuts every node at the same instant, and without jitter they
//! would all reconnect (and re-subscribe) in the same millisecond.

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
/// Shortest wait before a reconnect: even the luckiest node leaves Redis a moment.
const BACKOFF_FLOOR: Duration = Duration::from_millis(10);
/// Ceiling of the first wait; it doubles per failed attempt up to [`BACKOFF_MAX`].
const BACKOFF_BASE: Duration = Duration::from_millis(100);
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

    /// Runs groups of commands, each group in order (a room's windows, whose order the
    /// cluster log must keep), and returns every reply in the order given: one pipelined
    /// round trip on a single server; on a cluster the groups concurrently, each group's
    /// commands one after another.
    pub async fn run_groups(&mut self, groups: &[Vec<Cmd>]) -> RedisResult<Vec<Value>> {
        match self {
            Conn::Single(c) => {
                let mut p = redis::pipe();
                for cmd in groups.iter().flatten() {
                    p.add_command(cmd.clone());
                }
                p.query_async(c).await
            }
            Conn::Cluster(c) => {
                let replies = futures_util::future::join_all(groups.iter().map(|group| {
                    let mut c = c.clone();
                    async move {
                        let mut out = Vec::with_capacity(group.len());
                        for cmd in group {
                            out.push(cmd.query_async::<Value>(&mut c).await?);
                        }
                        Ok::<_, redis::RedisError>(out)
                    }
                }))
                .await;
                let mut out = Vec::new();
                for r in replies {
                    out.extend(r?);
                }
                Ok(out)
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

/// Jittered exponential backoff, full jitter: uniform over
/// `[BACKOFF_FLOOR, min(BACKOFF_BASE · 2^attempt, BACKOFF_MAX)]`, so nodes cut off
/// together spread their reconnects over the whole window instead of retrying in step.
pub fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1u32 << attempt.min(10))
        .min(BACKOFF_MAX)
        .max(BACKOFF_FLOOR);
    Duration::from_millis(rand::random_range(
        BACKOFF_FLOOR.as_millis() as u64..=ceiling.as_millis() as u64,
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
        // 0 only before the very first connection: a starting node connects at once.
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
                        if !pause(wait, &cancel).await {
                            return;
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
                // Every node loses Redis at the same instant (a restart, a failover):
                // wait a jittered moment before the first reconnect too, so they do not
                // all come back in the same millisecond.
                if !pause(backoff(0), &cancel).await {
                    return;
                }
                attempt = 1;
            }
        }
    }
}

/// Sleeps `wait`; `false` when the node stops meanwhile.
async fn pause(wait: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(wait) => true,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    #[test]
    fn backoff_is_fully_jittered_within_bounds() {
        for attempt in [0u32, 1, 3, 20] {
            let ceiling = BACKOFF_BASE
                .saturating_mul(1u32 << attempt.min(10))
                .min(BACKOFF_MAX);
            let samples: Vec<Duration> = (0..2000).map(|_| backoff(attempt)).collect();
            assert!(samples.iter().all(|d| *d >= BACKOFF_FLOOR && *d <= ceiling));
            // Spread over the whole window (the chance of missing a quarter in 2000
            // uniform draws is 0.75^2000): nodes cut off together come back apart.
            let quarter = (ceiling - BACKOFF_FLOOR) / 4;
            assert!(
                samples.iter().any(|d| *d < BACKOFF_FLOOR + quarter),
                "attempt {attempt}: nothing in the lowest quarter"
            );
            assert!(
                samples.iter().any(|d| *d > ceiling - quarter),
                "attempt {attempt}: nothing in the highest quarter"
            );
        }
    }

    /// Reads one RESP command (an array of bulk strings); `None` at EOF.
    async fn read_command(r: &mut BufReader<TcpStream>) -> Option<Vec<String>> {
        let mut line = String::new();
        if r.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let n: usize = line.trim().strip_prefix('*')?.parse().ok()?;
        let mut args = Vec::with_capacity(n);
        for _ in 0..n {
            line.clear();
            r.read_line(&mut line).await.ok()?;
            let len: usize = line.trim().strip_prefix('$')?.parse().ok()?;
            let mut buf = vec![0u8; len + 2];
            r.read_exact(&mut buf).await.ok()?;
            buf.truncate(len);
            args.push(String::from_utf8_lossy(&buf).into_owned());
        }
        Some(args)
    }

    /// A stand-in for Redis speaking just enough RESP3 for the link (HELLO, CLIENT,
    /// PING); answers a PING with an error when `fail` is set, telling `failed` when.
    async fn fake_redis(
        stream: TcpStream,
        fail: Arc<AtomicBool>,
        failed: mpsc::UnboundedSender<Instant>,
    ) {
        let mut r = BufReader::new(stream);
        while let Some(cmd) = read_command(&mut r).await {
            let reply: &[u8] = match cmd.first().map(|c| c.to_ascii_uppercase()).as_deref() {
                Some("HELLO") => b"%1\r\n+server\r\n+fake\r\n",
                Some("PING") if fail.swap(false, Ordering::AcqRel) => {
                    let _ = failed.send(Instant::now());
                    b"-ERR injected failure\r\n"
                }
                Some("PING") => b"+PONG\r\n",
                _ => b"+OK\r\n",
            };
            if r.get_mut().write_all(reply).await.is_err() {
                return;
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lost_command_connection_waits_before_reconnecting() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let fail = Arc::new(AtomicBool::new(false));
        let (failed_tx, mut failed_rx) = mpsc::unbounded_channel();
        let (accepted_tx, mut accepted_rx) = mpsc::unbounded_channel();
        let server_fail = Arc::clone(&fail);
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = accepted_tx.send(Instant::now());
                tokio::spawn(fake_redis(
                    stream,
                    Arc::clone(&server_fail),
                    failed_tx.clone(),
                ));
            }
        });
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let cfg = RedisConfig {
            url: format!("redis://127.0.0.1:{port}"),
            ..RedisConfig::default()
        };
        let link = RedisLink::start(cfg, &cancel, &tracker);
        let limit = Duration::from_secs(5);
        assert!(link.wait_up(limit).await, "never connected");
        tokio::time::timeout(limit, accepted_rx.recv())
            .await
            .unwrap()
            .unwrap();
        for round in 0..5 {
            fail.store(true, Ordering::Release);
            link.report_failure();
            let failed_at = tokio::time::timeout(limit, failed_rx.recv())
                .await
                .unwrap()
                .unwrap();
            let reconnected_at = tokio::time::timeout(limit, accepted_rx.recv())
                .await
                .expect("no reconnect")
                .unwrap();
            let gap = reconnected_at.duration_since(failed_at);
            assert!(
                gap >= BACKOFF_FLOOR,
                "round {round}: reconnected {gap:?} after the failure, without a jittered wait"
            );
            assert!(link.wait_up(limit).await, "round {round}: not up again");
        }
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
        server.abort();
    }
}
