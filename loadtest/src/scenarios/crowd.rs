//! A crowd of passive viewers: N connections that join one room and then only read
//! (answering pings) until told to close. `idle` holds a crowd to measure the gateway's
//! memory per connection; `storm` opens one as fast as allowed to measure connect time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{ConnectTracker, join_all};
use crate::client::{Target, short_ws_error};
use crate::proto::{self, Decoded};
use crate::report::Tally;

/// A running crowd of viewer connections.
pub struct Crowd {
    /// Connect-phase bookkeeping.
    pub tracker: Arc<ConnectTracker>,
    /// Joined connections that were lost before the crowd was closed, by reason.
    pub dropped: Arc<Tally>,
    /// Data frames received after `joined` (presence batches and the like).
    pub frames: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Crowd {
    /// Starts `n` connections into `room`, at most `concurrency` connecting at once.
    /// With `tokens`, connection `i` authenticates with `tokens[i]`; else anonymous.
    pub fn spawn(
        target: Arc<Target>,
        n: usize,
        concurrency: usize,
        room: &str,
        tokens: Option<Vec<String>>,
    ) -> Self {
        let tracker = Arc::new(ConnectTracker::new(n, concurrency));
        let dropped = Arc::new(Tally::default());
        let frames = Arc::new(AtomicU64::new(0));
        let (stop, _) = watch::channel(false);
        let tokens = tokens.map(Arc::new);
        let room: Arc<str> = Arc::from(room);
        let mut tasks = JoinSet::new();
        for index in 0..n {
            let viewer = Viewer {
                target: Arc::clone(&target),
                tracker: Arc::clone(&tracker),
                dropped: Arc::clone(&dropped),
                frames: Arc::clone(&frames),
                room: Arc::clone(&room),
                tokens: tokens.clone(),
                stop: stop.subscribe(),
            };
            tasks.spawn(viewer.run(index));
        }
        Self {
            tracker,
            dropped,
            frames,
            stop,
            tasks,
        }
    }

    /// Connections still open (joined and not dropped).
    pub fn open_now(&self) -> u64 {
        let dropped: u64 = self.dropped.snapshot().values().sum();
        self.tracker.joined().saturating_sub(dropped)
    }

    /// Closes every connection (close frames, bounded) and waits for the tasks; returns
    /// how many tasks had to be aborted.
    pub async fn close(mut self, limit: Duration) -> usize {
        self.stop.send_replace(true);
        join_all(&mut self.tasks, limit).await
    }
}

/// One viewer connection's task.
struct Viewer {
    target: Arc<Target>,
    tracker: Arc<ConnectTracker>,
    dropped: Arc<Tally>,
    frames: Arc<AtomicU64>,
    room: Arc<str>,
    tokens: Option<Arc<Vec<String>>>,
    stop: watch::Receiver<bool>,
}

impl Viewer {
    async fn run(mut self, index: usize) {
        let token = self.tokens.as_ref().map(|t| t[index].as_str());
        let Some((mut conn, _)) = self
            .tracker
            .open(&self.target, index, &self.room, token)
            .await
        else {
            return;
        };
        loop {
            tokio::select! {
                msg = conn.recv() => match msg {
                    Some(Ok(msg)) => match proto::decode(&msg) {
                        Decoded::Close(code) => {
                            self.dropped.add(format!("closed by server: {}", code.map_or("-".into(), |c| c.to_string())));
                            return;
                        }
                        Decoded::Frame(_) | Decoded::Garbage(_) => {
                            self.frames.fetch_add(1, Relaxed);
                        }
                        Decoded::Control => {}
                    },
                    Some(Err(e)) => {
                        self.dropped.add(format!("read: {}", short_ws_error(&e)));
                        return;
                    }
                    None => {
                        self.dropped.add("stream ended");
                        return;
                    }
                },
                _ = self.stop.wait_for(|stop| *stop) => break,
            }
        }
        conn.close(Duration::from_secs(2)).await;
    }
}
