//! Per-user rate limits on client actions (chat, free gifts, grabs, joins).
//!
//! GCRA from `governor`, one keyed limiter per action. Keys say whose budget is spent:
//! an authenticated user's id (so five tabs share one budget), an anonymous viewer's
//! connection, and — only where `ratelimit.anon_per_ip` is set — the anonymous viewer's
//! IP as a second budget (off by default: carrier NAT puts thousands of viewers behind
//! one address). The per-IP budget is a small GCRA of our own ([`IpBudget`]) because it
//! decides together with the connection's own budget: a unit of the address is spent
//! only when the connection's own budget agrees, so neither budget pays for a refused op.
//! Keyed state is swept every few seconds (`retain_recent`): a user whose bucket has
//! refilled costs nothing, so memory is bounded by the users active within one refill
//! period.
//!
//! With Redis, a user's budget holds across nodes: the authority is a GCRA in a Lua
//! script (`danmaku:rl:{action}:{user}`, Redis `TIME` as the clock). The common case
//! costs no round trip: each answer says how many units the user has left, and this
//! node may spend its share of them (`left / live nodes`, for five seconds) locally. The
//! units it spent are reported with its next round trip, or by the sweeper once the share
//! expires, and the script charges reported units whatever it answers about the new one:
//! units already handed out are never forgotten, so a user who overdraws by bursting on
//! several nodes at once pays the debt back before the next admission. The cluster thus
//! admits at most the budget plus the shares outstanding at one moment, and no more over
//! time. The local limiter still runs first (a user over budget on this node alone is
//! refused without asking), and while Redis is down the local limits are what holds
//! (units spent meanwhile are not reported).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use futures_util::StreamExt;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use redis::Script;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Rate, RateLimitConfig};
use crate::protocol::{ErrorCode, ProtoError};

/// How often idle keys are swept (and expired shares reported to Redis).
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Reports of expired shares in flight at once during a sweep.
const REPORTS_IN_FLIGHT: usize = 32;
/// At shutdown, how long the last reports may take.
const FLUSH_LIMIT: Duration = Duration::from_secs(1);

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
}

pub struct RateLimits {
    chat: DefaultKeyedRateLimiter<Key>,
    gift: DefaultKeyedRateLimiter<Key>,
    grab: DefaultKeyedRateLimiter<Key>,
    join: DefaultKeyedRateLimiter<Key>,
    anon_ip: Option<IpBudget>,
    clock: DefaultClock,
    cluster: Option<Cluster>,
}

/// The per-IP budget of anonymous viewers: a keyed GCRA (theoretical arrival time per
/// address) whose decision can include another budget's, see [`IpBudget::check`].
struct IpBudget {
    /// One unit refills in this.
    period: Duration,
    /// `period × burst`: how far ahead of now the arrival time may run.
    tau: Duration,
    tats: DashMap<IpAddr, Instant>,
}

impl IpBudget {
    fn new(rate: &Rate) -> Self {
        let (period, burst) = period_and_burst(rate);
        Self {
            period,
            tau: period.saturating_mul(burst.get()).min(MAX_REFILL),
            tats: DashMap::new(),
        }
    }

    /// Spends one unit of `ip`'s budget if it has one and `own` (the connection's own
    /// budget, asked only then) agrees. Both decisions happen under the address's entry
    /// lock, so a concurrent check from the same address sees either neither or both.
    ///
    /// # Errors
    /// How long until the refusing budget has a unit.
    fn check(
        &self,
        ip: IpAddr,
        own: impl FnOnce() -> Result<(), Duration>,
    ) -> Result<(), Duration> {
        let now = Instant::now();
        let mut tat = self.tats.entry(ip).or_insert(now);
        let next = (*tat).max(now) + self.period;
        let limit = now + self.tau;
        if next > limit {
            return Err(next - limit);
        }
        own()?;
        *tat = next;
        Ok(())
    }

    /// Forgets every address whose budget is full again.
    fn sweep(&self) {
        let now = Instant::now();
        self.tats.retain(|_, tat| *tat > now);
        self.tats.shrink_to_fit();
    }
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
    /// Units spent from this node's shares and not yet charged in Redis.
    unreported: u32,
    until: Instant,
}

/// How long a share of a user's budget may be spent locally. Longer costs nothing in
/// accuracy (a grant never includes refill), and saves round trips for steady senders.
const GRANT_TTL: Duration = Duration::from_secs(5);

/// KEYS[1]: the user's theoretical arrival time (ms, Redis clock). ARGV: the period of one
/// unit (ms), the burst, the units this node already admitted from its shares, and the
/// units wanted now (1, or 0 for a report only). The admitted units are charged first
/// and always: they were handed out, so refusing the new unit must not forget them.
/// Replies `{allowed, retry_after_ms for the wanted units, units left}`.
const GCRA: &str = r#"
local T = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local spent = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
tat = tat + spent * T
local limit = now + T * burst
local allowed = 1
local retry = 0
if want > 0 and tat + want * T > limit then
  allowed = 0
  retry = math.ceil(tat + want * T - limit)
else
  tat = tat + want * T
end
if tat > now then
  redis.call('SET', KEYS[1], tostring(tat), 'PX', math.ceil(tat - now) + 1)
end
local left = math.floor((limit - tat) / T)
if left < 0 then left = 0 end
return {allowed, retry, left}
"#;

/// Longest time a full burst may take to refill (`burst / rate`), as config validation
/// enforces.
pub const MAX_REFILL: Duration = Duration::from_secs(365 * 24 * 3600);

/// One unit's refill period and the burst. Config validation keeps `rate` finite, in
/// (0, 1e6] and `burst / rate` within [`MAX_REFILL`], so neither the period nor governor's
/// `period × burst` can overflow; the fallbacks only keep this function total.
fn period_and_burst(rate: &Rate) -> (Duration, NonZeroU32) {
    let period = Duration::try_from_secs_f64(1.0 / rate.rate)
        .ok()
        .filter(|p| !p.is_zero())
        .map_or(Duration::from_secs(1), |p| p.min(MAX_REFILL));
    (
        period,
        NonZeroU32::new(rate.burst).unwrap_or(NonZeroU32::MIN),
    )
}

fn quota(rate: &Rate) -> Quota {
    let (period, burst) = period_and_burst(rate);
    Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst)
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
            anon_ip: cfg.anon_per_ip.as_ref().map(IpBudget::new),
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
        let own = || {
            limiter
                .check_key(key)
                .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
        };
        // An anonymous connection spends its own budget and its address's together: the
        // address's unit is spent only if the connection's own budget agrees, so one
        // connection spamming past its own budget cannot drain the budget everyone behind
        // its (NAT) address shares; and a join the address refuses leaves the
        // connection's own budget untouched ("a refused op has no effect").
        let res = match (key, &self.anon_ip) {
            (Key::Conn(_), Some(per_ip)) => per_ip.check(ip, own),
            _ => own(),
        };
        res.map_err(|wait| limited(action, wait.as_micros().div_ceil(1000) as u64))
    }

    /// Keys currently held (for tests and metrics).
    pub fn tracked_keys(&self) -> usize {
        self.chat.len()
            + self.gift.len()
            + self.grab.len()
            + self.join.len()
            + self.anon_ip.as_ref().map_or(0, |b| b.tats.len())
    }

    /// Drops the state of every key whose bucket is full again, and of every expired
    /// share of a cluster budget after reporting the units spent from it (so they are
    /// charged even if the user never comes back to this node).
    pub async fn sweep(&self) {
        for l in [&self.chat, &self.gift, &self.grab, &self.join] {
            l.retain_recent();
            l.shrink_to_fit();
        }
        if let Some(b) = &self.anon_ip {
            b.sweep();
        }
        if let Some(c) = &self.cluster {
            let now = Instant::now();
            c.report(c.take_grants(|g| g.until <= now)).await;
        }
    }

    /// Reports every unit spent from this node's shares now, live shares included: at
    /// shutdown, so a leaving node's spending is still charged.
    pub async fn flush(&self) {
        if let Some(c) = &self.cluster {
            c.report(c.take_grants(|_| true)).await;
        }
    }

    /// Sweeps every [`SWEEP_EVERY`] until `cancel`, then flushes (best effort, at most
    /// [`FLUSH_LIMIT`]).
    pub fn start_sweeper(self: &Arc<Self>, cancel: &CancellationToken, tracker: &TaskTracker) {
        let me = Arc::clone(self);
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => me.sweep().await,
                }
            }
            let _ = tokio::time::timeout(FLUSH_LIMIT, me.flush()).await;
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

/// What the script answered.
enum Verdict {
    /// Allowed; this many units are left of the user's budget.
    Allowed(u64),
    /// Refused; one unit is available in this many ms.
    Refused(u64),
}

impl Cluster {
    async fn check(&self, action: Action, user: &Arc<str>) -> Result<(), ProtoError> {
        let now = Instant::now();
        let k = (action, Arc::clone(user));
        // Spend from a live share, or take the share out with the units spent from it,
        // in one step under the entry's lock: a concurrent check for the same user either
        // spent its unit before (then it is in `unreported`, reported by us) or finds no
        // share and asks Redis itself; no unit is counted twice or lost.
        let spent = match self.grants.entry(k.clone()) {
            Entry::Occupied(mut e) => {
                let g = e.get_mut();
                if g.until > now && g.left > 0 {
                    g.left -= 1;
                    g.unreported += 1;
                    return Ok(());
                }
                e.remove().unreported
            }
            Entry::Vacant(_) => 0,
        };
        match self.invoke(action, user, spent, 1).await {
            Some(Verdict::Allowed(left)) => {
                let share = u32::try_from(left / (self.nodes)().max(1) as u64).unwrap_or(u32::MAX);
                if share > 0 {
                    // A concurrent check may have put a share back meanwhile, and spent
                    // from it: keep its unreported units, take the fresher share.
                    let mut g = self.grants.entry(k).or_insert(Grant {
                        left: 0,
                        unreported: 0,
                        until: now,
                    });
                    g.left = share;
                    g.until = now + GRANT_TTL;
                }
                Ok(())
            }
            Some(Verdict::Refused(retry_ms)) => Err(limited(action, retry_ms)),
            None => {
                // Redis is down or failed: the local limit (already passed) is what holds.
                // The units taken out go back, for the next round trip or the sweep.
                self.keep_unreported(k, spent);
                Ok(())
            }
        }
    }

    /// Runs the script: charges `spent` units, then asks for `want` more. `None` when
    /// Redis is unreachable or the call failed.
    async fn invoke(&self, action: Action, user: &str, spent: u32, want: u32) -> Option<Verdict> {
        let conn = self.link.conn()?;
        let (period_ms, burst) = self.quotas[action as usize];
        let mut inv = self.script.prepare_invoke();
        inv.key(format!("danmaku:rl:{}:{user}", action.as_str()))
            .arg(period_ms)
            .arg(burst)
            .arg(spent)
            .arg(want);
        let reply: redis::RedisResult<(i64, i64, i64)> = match conn {
            crate::redis_link::Conn::Single(mut c) => inv.invoke_async(&mut c).await,
            crate::redis_link::Conn::Cluster(mut c) => inv.invoke_async(&mut c).await,
        };
        match reply {
            Ok((1, _, left)) => Some(Verdict::Allowed(left.max(0) as u64)),
            Ok((_, retry_ms, _)) => Some(Verdict::Refused(retry_ms.max(1) as u64)),
            Err(e) => {
                tracing::debug!(error = %e, "cluster rate limit unavailable; local limit applies");
                self.link.report_failure();
                None
            }
        }
    }

    /// Puts `units` spent for `k` back among its unreported ones.
    fn keep_unreported(&self, k: (Action, Arc<str>), units: u32) {
        if units == 0 {
            return;
        }
        let now = Instant::now();
        let mut g = self.grants.entry(k).or_insert(Grant {
            left: 0,
            unreported: 0,
            until: now,
        });
        g.unreported = g.unreported.saturating_add(units);
    }

    /// Removes the shares `pick` chooses; returns those with units to report.
    fn take_grants(&self, pick: impl Fn(&Grant) -> bool) -> Vec<((Action, Arc<str>), u32)> {
        let mut due = Vec::new();
        self.grants.retain(|k, g| {
            if !pick(g) {
                return true;
            }
            if g.unreported > 0 {
                due.push((k.clone(), g.unreported));
            }
            false
        });
        self.grants.shrink_to_fit();
        due
    }

    /// Charges taken units in Redis (a few calls at a time). While Redis is down they are
    /// dropped, as any spending then: the local limits are what holds.
    async fn report(&self, due: Vec<((Action, Arc<str>), u32)>) {
        futures_util::stream::iter(due)
            .for_each_concurrent(REPORTS_IN_FLIGHT, |((action, user), units)| async move {
                if self.invoke(action, &user, units, 0).await.is_none() {
                    tracing::debug!(
                        action = action.as_str(),
                        units,
                        "unreported rate-limit units dropped: Redis unavailable"
                    );
                }
            })
            .await;
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

    /// One anonymous connection spamming past its own budget must not spend the
    /// per-IP budget the other viewers behind its address share.
    #[test]
    fn refused_by_its_own_budget_spends_no_ip_budget() {
        let rl = RateLimits::new(&RateLimitConfig {
            join: Rate {
                rate: 0.001,
                burst: 1,
            },
            anon_per_ip: Some(Rate {
                rate: 0.001,
                burst: 3,
            }),
            ..RateLimitConfig::default()
        });
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(rl.check_local(Action::Join, &Key::Conn(1), ip).is_ok());
        for _ in 0..20 {
            let e = rl.check_local(Action::Join, &Key::Conn(1), ip).unwrap_err();
            // The wait is the connection's own (1000 s), not the address's.
            assert!(e.retry_after_ms.unwrap() > 900_000, "{e:?}");
        }
        // The address still has its two other units, for its other viewers.
        assert!(rl.check_local(Action::Join, &Key::Conn(2), ip).is_ok());
        assert!(rl.check_local(Action::Join, &Key::Conn(3), ip).is_ok());
        assert!(rl.check_local(Action::Join, &Key::Conn(4), ip).is_err());
    }

    /// And the other way round: a join the address refuses leaves the connection's own
    /// budget whole.
    #[test]
    fn refused_by_the_ip_budget_spends_no_own_budget() {
        let rl = RateLimits::new(&RateLimitConfig {
            join: Rate {
                rate: 0.001,
                burst: 1,
            },
            anon_per_ip: Some(Rate {
                rate: 100.0,
                burst: 1,
            }),
            ..RateLimitConfig::default()
        });
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(rl.check_local(Action::Join, &Key::Conn(1), ip).is_ok());
        let e = rl.check_local(Action::Join, &Key::Conn(2), ip).unwrap_err();
        assert!(e.retry_after_ms.unwrap() <= 10, "{e:?}");
        std::thread::sleep(Duration::from_millis(15));
        assert!(rl.check_local(Action::Join, &Key::Conn(2), ip).is_ok());
    }

    #[tokio::test]
    async fn sweep_forgets_refilled_keys() {
        let rl = RateLimits::new(&RateLimitConfig {
            chat: Rate {
                rate: 1000.0,
                burst: 1,
            },
            anon_per_ip: Some(Rate {
                rate: 1000.0,
                burst: 1,
            }),
            ..RateLimitConfig::default()
        });
        for i in 0..100u8 {
            let ip = IpAddr::from([10, 0, 0, i]);
            rl.check_local(Action::Chat, &Key::Conn(i.into()), ip)
                .unwrap();
        }
        assert!(rl.tracked_keys() >= 200);
        tokio::time::sleep(Duration::from_millis(20)).await;
        rl.sweep().await;
        assert_eq!(rl.tracked_keys(), 0);
    }
}
