//! Per-user rate limits on client actions (chat, free gifts, grabs, joins).
//!
//! GCRA from `governor`, one keyed limiter per action. Keys say whose budget is spent:
//! an authenticated user's id (so five tabs share one budget), an anonymous viewer's
//! connection, and — only where `ratelimit.anon_per_ip` is set — the anonymous viewer's
//! IP as a second budget (off by default: carrier NAT puts thousands of viewers behind
//! one address). Keyed state is swept every few seconds (`retain_recent`): a user whose
//! bucket has refilled costs nothing, so memory is bounded by the users active within
//! one refill period.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Rate, RateLimitConfig};
use crate::protocol::{ErrorCode, ProtoError};

/// How often idle keys are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The actions that spend a budget; also the `action` label of the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Chat,
    Gift,
    Grab,
    Join,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Chat => "chat",
            Action::Gift => "gift",
            Action::Grab => "grab",
            Action::Join => "join",
        }
    }
}

/// Whose budget an action spends.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub enum Key {
    User(Arc<str>),
    /// An anonymous viewer's connection.
    Conn(u64),
    /// An anonymous viewer's address (only with `anon_per_ip`).
    Ip(IpAddr),
}

pub struct RateLimits {
    chat: DefaultKeyedRateLimiter<Key>,
    gift: DefaultKeyedRateLimiter<Key>,
    grab: DefaultKeyedRateLimiter<Key>,
    join: DefaultKeyedRateLimiter<Key>,
    anon_ip: Option<DefaultKeyedRateLimiter<Key>>,
    clock: DefaultClock,
}

fn quota(rate: &Rate) -> Quota {
    // Config validation guarantees rate > 0 and burst >= 1.
    let period = Duration::from_secs_f64(1.0 / rate.rate);
    Quota::with_period(period)
        .expect("validated positive rate")
        .allow_burst(NonZeroU32::new(rate.burst.max(1)).expect("max(1) is non-zero"))
}

impl RateLimits {
    pub fn new(cfg: &RateLimitConfig) -> Arc<Self> {
        Arc::new(Self {
            chat: RateLimiter::dashmap(quota(&cfg.chat)),
            gift: RateLimiter::dashmap(quota(&cfg.gift)),
            grab: RateLimiter::dashmap(quota(&cfg.grab)),
            join: RateLimiter::dashmap(quota(&cfg.join)),
            anon_ip: cfg
                .anon_per_ip
                .as_ref()
                .map(|r| RateLimiter::dashmap(quota(r))),
            clock: DefaultClock::default(),
        })
    }

    /// Spends one unit of `action` for `key` (and, for an anonymous viewer with the
    /// per-IP limit on, of its address).
    ///
    /// # Errors
    /// `rate_limited` with an honest `retry_after_ms` (when one unit will be available).
    pub fn check(&self, action: Action, key: &Key, ip: IpAddr) -> Result<(), ProtoError> {
        let limiter = match action {
            Action::Chat => &self.chat,
            Action::Gift => &self.gift,
            Action::Grab => &self.grab,
            Action::Join => &self.join,
        };
        let mut result = limiter.check_key(key);
        if result.is_ok()
            && let (Key::Conn(_), Some(per_ip)) = (key, &self.anon_ip)
        {
            result = per_ip.check_key(&Key::Ip(ip));
        }
        result.map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            crate::metrics::rate_limited(action.as_str());
            ProtoError {
                code: ErrorCode::RateLimited,
                message: format!("{} rate limit reached", action.as_str()),
                retry_after_ms: Some((wait.as_micros().div_ceil(1000)).max(1) as u64),
            }
        })
    }

    /// Keys currently held (for tests and metrics).
    pub fn tracked_keys(&self) -> usize {
        self.chat.len()
            + self.gift.len()
            + self.grab.len()
            + self.join.len()
            + self.anon_ip.as_ref().map_or(0, |l| l.len())
    }

    /// Drops the state of every key whose bucket is full again.
    pub fn sweep(&self) {
        for l in [&self.chat, &self.gift, &self.grab, &self.join]
            .into_iter()
            .chain(self.anon_ip.as_ref())
        {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// Sweeps every [`SWEEP_EVERY`] until `cancel`.
    pub fn start_sweeper(self: &Arc<Self>, cancel: &CancellationToken, tracker: &TaskTracker) {
        let me = Arc::clone(self);
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => me.sweep(),
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RateLimitConfig {
        RateLimitConfig {
            chat: Rate {
                rate: 1.0,
                burst: 2,
            },
            anon_per_ip: Some(Rate {
                rate: 1.0,
                burst: 3,
            }),
            ..RateLimitConfig::default()
        }
    }

    #[test]
    fn burst_then_limited_with_retry_after() {
        let rl = RateLimits::new(&cfg());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let k = Key::User("u".into());
        assert!(rl.check(Action::Chat, &k, ip).is_ok());
        assert!(rl.check(Action::Chat, &k, ip).is_ok());
        let e = rl.check(Action::Chat, &k, ip).unwrap_err();
        assert_eq!(e.code, ErrorCode::RateLimited);
        let retry = e.retry_after_ms.unwrap();
        assert!((1..=1000).contains(&retry), "{retry}");
        // Another user has their own budget.
        assert!(rl.check(Action::Chat, &Key::User("v".into()), ip).is_ok());
    }

    #[test]
    fn anonymous_ip_budget_is_shared_across_connections() {
        let rl = RateLimits::new(&cfg());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        // join: burst 10 per connection, but only 3 per IP.
        assert!(rl.check(Action::Join, &Key::Conn(1), ip).is_ok());
        assert!(rl.check(Action::Join, &Key::Conn(2), ip).is_ok());
        assert!(rl.check(Action::Join, &Key::Conn(3), ip).is_ok());
        assert!(rl.check(Action::Join, &Key::Conn(4), ip).is_err());
        // Users are not subject to the anonymous per-IP budget.
        assert!(rl.check(Action::Join, &Key::User("u".into()), ip).is_ok());
    }

    #[test]
    fn sweep_forgets_refilled_keys() {
        let rl = RateLimits::new(&RateLimitConfig {
            chat: Rate {
                rate: 1000.0,
                burst: 1,
            },
            ..RateLimitConfig::default()
        });
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for i in 0..100 {
            rl.check(Action::Chat, &Key::Conn(i), ip).unwrap();
        }
        assert!(rl.tracked_keys() >= 100);
        std::thread::sleep(Duration::from_millis(20));
        rl.sweep();
        assert_eq!(rl.tracked_keys(), 0);
    }
}
