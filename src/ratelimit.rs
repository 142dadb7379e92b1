//! Per-user rate limits on client actions (chat, free gifts, grabs, joins).
//!
//! GCRA from `governor`, one keyed limiter per action. Keys say whose budget is spent:
//! an authenticated user's id (so five tabs share one budget), an anonymous viewer's
//! connection, and — only where `ratelimit.anon_per_ip` is set — the anonymous viewer's
//! IP as a second budget (off by default: carrier NAT puts thousands of viewers behind
//! one address). Keyed state is swept every few seconds (`retain_recent`): a user whose
//! bucket has refilled costs nothing, so memory is bounded by the users active within
//! one refill period.
//!
//! With Redis, a user's budget holds across nodes: the authority is a GCRA in a Lua
//! script (`danmaku:rl:{action}:{user}`, Redis `TIME` as the clock). The common case
//! costs no round trip: each answer says how many units the user has left, and this
//! node may spend its share of them (`left / live nodes`, for five seconds) locally; the
//! units it spent are reported with its next round trip. A user far under budget thus
//! touches Redis about once per share, and the cluster cannot admit more than the
//! budget plus the shares outstanding. The local limiter still runs first (a user over
//! budget on this node alone is refused without asking), and while Redis is down the
//! local limits are what holds.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use redis::Script;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Rate, RateLimitConfig};
use crate::protocol::{ErrorCode, ProtoError};

/// How often idle keys are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The actions that spend a budget; also the `action` label of the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    cluster: Option<Cluster>,
}

/// The Redis side of the limits; see the module docs.
struct Cluster {
    link: Arc<crate::redis_link::RedisLink>,
    /// Live gateway nodes, for this node's share of a user's remaining budget.
    nodes: Arc<dyn Fn() -> usize + Send + Sync>,
    grants: DashMap<(Action, Arc<str>), Grant>,
    script: Script,
    quotas: [(f64, u32); 4],
}

/// Units this node may spend for a user without asking Redis.
struct Grant {
    left: u32,
    unreported: u32,
    until: std::time::Instant,
}

/// How long a share of a user's budget may be spent locally. Longer costs nothing in
/// accuracy (a grant never includes refill), and saves round trips for steady senders.
const GRANT_TTL: Duration = Duration::from_secs(5);

const GCRA: &str = r#"
local T = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + n * T
local tau = T * burst
local over = new_tat - (now + tau)
if over > 0 then return {0, math.ceil(over), 0} end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1)
return {1, 0, math.floor((now + tau - new_tat) / T)}
"#;

fn quota(rate: &Rate) -> Quota {
    // Config validation guarantees rate > 0 and burst >= 1.
    let period = Duration::from_secs_f64(1.0 / rate.rate);
    Quota::with_period(period)
        .expect("validated positive rate")
        .allow_burst(NonZeroU32::new(rate.burst.max(1)).expect("max(1) is non-zero"))
}

impl RateLimits {
    pub fn new(cfg: &RateLimitConfig) -> Arc<Self> {
        Self::build(cfg, None)
    }

    /// Limits that hold across nodes through Redis; `nodes` tells the live node count.
    pub fn clustered(
        cfg: &RateLimitConfig,
        link: Arc<crate::redis_link::RedisLink>,
        nodes: Arc<dyn Fn() -> usize + Send + Sync>,
    ) -> Arc<Self> {
        let q = |r: &Rate| (1000.0 / r.rate, r.burst.max(1));
        Self::build(
            cfg,
            Some(Cluster {
                link,
                nodes,
                grants: DashMap::new(),
                script: Script::new(GCRA),
                quotas: [q(&cfg.chat), q(&cfg.gift), q(&cfg.grab), q(&cfg.join)],
            }),
        )
    }

    fn build(cfg: &RateLimitConfig, cluster: Option<Cluster>) -> Arc<Self> {
        Arc::new(Self {
            cluster,
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
    pub async fn check(&self, action: Action, key: &Key, ip: IpAddr) -> Result<(), ProtoError> {
        self.check_local(action, key, ip)?;
        match (&self.cluster, key) {
            // Anonymous budgets are per connection (or IP) and a connection lives on one
            // node: local limits are exact for them.
            (Some(cluster), Key::User(user)) => cluster.check(action, user).await,
            _ => Ok(()),
        }
    }

    /// The node-local GCRA (and per-IP budget of anonymous viewers).
    pub fn check_local(&self, action: Action, key: &Key, ip: IpAddr) -> Result<(), ProtoError> {
        let limiter = match action {
            Action::Chat => &self.chat,
            Action::Gift => &self.gift,
            Action::Grab => &self.grab,
            Action::Join => &self.join,
        };
        // The shared per-IP budget first: when it refuses, the connection's own budget
        // stays untouched (a refused op has no effect on it).
        let per_ip = match (key, &self.anon_ip) {
            (Key::Conn(_), Some(per_ip)) => per_ip.check_key(&Key::Ip(ip)),
            _ => Ok(()),
        };
        per_ip
            .and_then(|()| limiter.check_key(key))
            .map_err(|not_until| {
                let wait = not_until.wait_time_from(self.clock.now());
                limited(action, wait.as_micros().div_ceil(1000) as u64)
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
        if let Some(c) = &self.cluster {
            let now = std::time::Instant::now();
            c.grants.retain(|_, g| g.until > now);
        }
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

fn limited(action: Action, retry_after_ms: u64) -> ProtoError {
    crate::metrics::rate_limited(action.as_str());
    ProtoError {
        code: ErrorCode::RateLimited,
        message: format!("{} rate limit reached", action.as_str()),
        retry_after_ms: Some(retry_after_ms.max(1)),
    }
}

impl Cluster {
    async fn check(&self, action: Action, user: &Arc<str>) -> Result<(), ProtoError> {
        let now = std::time::Instant::now();
        let k = (action, Arc::clone(user));
        let unreported = match self.grants.get_mut(&k) {
            Some(mut g) if g.until > now && g.left > 0 => {
                g.left -= 1;
                g.unreported += 1;
                return Ok(());
            }
            Some(g) => g.unreported,
            None => 0,
        };
        self.grants.remove(&k);
        let Some(conn) = self.link.conn() else {
            // Redis is down: the local limit (already passed) is what holds.
            return Ok(());
        };
        let (period_ms, burst) = self.quotas[action as usize];
        let mut inv = self.script.prepare_invoke();
        inv.key(format!("danmaku:rl:{}:{user}", action.as_str()))
            .arg(period_ms)
            .arg(burst)
            .arg(1 + unreported);
        let reply: redis::RedisResult<(i64, i64, i64)> = match conn {
            crate::redis_link::Conn::Single(mut c) => inv.invoke_async(&mut c).await,
            crate::redis_link::Conn::Cluster(mut c) => inv.invoke_async(&mut c).await,
        };
        match reply {
            Ok((1, _, left)) => {
                let share = (left.max(0) as usize / (self.nodes)().max(1)) as u32;
                if share > 0 {
                    self.grants.insert(
                        k,
                        Grant {
                            left: share,
                            unreported: 0,
                            until: now + GRANT_TTL,
                        },
                    );
                }
                Ok(())
            }
            Ok((_, retry_ms, _)) => Err(limited(action, retry_ms.max(1) as u64)),
            Err(e) => {
                tracing::debug!(error = %e, "cluster rate limit unavailable; local limit applies");
                self.link.report_failure();
                Ok(())
            }
        }
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
        assert!(rl.check_local(Action::Chat, &k, ip).is_ok());
        assert!(rl.check_local(Action::Chat, &k, ip).is_ok());
        let e = rl.check_local(Action::Chat, &k, ip).unwrap_err();
        assert_eq!(e.code, ErrorCode::RateLimited);
        let retry = e.retry_after_ms.unwrap();
        assert!((1..=1000).contains(&retry), "{retry}");
        // Another user has their own budget.
        assert!(
            rl.check_local(Action::Chat, &Key::User("v".into()), ip)
                .is_ok()
        );
    }

    #[test]
    fn anonymous_ip_budget_is_shared_across_connections() {
        let rl = RateLimits::new(&cfg());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        // join: burst 10 per connection, but only 3 per IP.
        assert!(rl.check_local(Action::Join, &Key::Conn(1), ip).is_ok());
        assert!(rl.check_local(Action::Join, &Key::Conn(2), ip).is_ok());
        assert!(rl.check_local(Action::Join, &Key::Conn(3), ip).is_ok());
        assert!(rl.check_local(Action::Join, &Key::Conn(4), ip).is_err());
        // Users are not subject to the anonymous per-IP budget.
        assert!(
            rl.check_local(Action::Join, &Key::User("u".into()), ip)
                .is_ok()
        );
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
            rl.check_local(Action::Chat, &Key::Conn(i), ip).unwrap();
        }
        assert!(rl.tracked_keys() >= 100);
        std::thread::sleep(Duration::from_millis(20));
        rl.sweep();
        assert_eq!(rl.tracked_keys(), 0);
    }
}
