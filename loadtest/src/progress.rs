//! The once-a-second progress line on stderr, so a long run shows it is alive and how it
//! is going (stdout stays reserved for the final report, which may be JSON).

use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

/// A running progress printer; stops when dropped.
pub struct Progress {
    handle: JoinHandle<()>,
}

/// Prints `[  12s] <line()>` to stderr every second until the returned handle is dropped.
/// `line` gets the time since the previous call, for per-second rates.
pub fn spawn<F>(mut line: F) -> Progress
where
    F: FnMut(Duration) -> String + Send + 'static,
{
    let handle = tokio::spawn(async move {
        let start = Instant::now();
        let mut last = start;
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(1),
            Duration::from_secs(1),
        );
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            let now = Instant::now();
            let text = line(now - last);
            last = now;
            eprintln!("[{:>5.0}s] {text}", (now - start).as_secs_f64());
        }
    });
    Progress { handle }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// `count` per `elapsed`, for rate displays.
pub fn per_sec(count: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 { count as f64 / s } else { 0.0 }
}
