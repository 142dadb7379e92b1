//! The scenarios (`fanout`/`rooms`/`soak`, `redpacket`, `idle`, `storm`, `slowloris`,
//! `reconnect`) and what they share: the connection and SLO options common to all of them
//! ([`ConnArgs`], `--compress` among them), the bounded-concurrency connect phase with its bookkeeping
//! ([`ConnectTracker`]), the bounded wait for connection tasks to end, and a small jitter
//! RNG ([`Rng`]).
//!
//! Every scenario is a fixed timeline (connect, maybe warm up / send / hold, drain,
//! close) whose every step has a deadline, so a run always ends by itself.

pub mod crowd;
pub mod fanout;
pub mod idle;
pub mod reconnect;
pub mod redpacket;
pub mod slowloris;
pub mod storm;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;

use crate::client::{Conn, Joined, Target};
use crate::proto::Format;
use crate::report::{LatencySummary, Table, Tally, lock, new_hist, round3};
use crate::slo::SloArgs;

/// Connection (and SLO) options shared by every scenario.
#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// Gateway WebSocket endpoint(s), comma-separated (several nodes, or remote ones):
    /// connections are assigned round-robin. No query: token, room and format are added.
    #[arg(
        long = "target",
        visible_alias = "url",
        value_name = "WS_URL[,WS_URL...]",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:8080/ws"
    )]
    pub targets: Vec<String>,
    /// Connection attempts in flight at once (each holds its slot until `joined`).
    #[arg(long, default_value_t = 500)]
    pub concurrency: usize,
    /// Wire format.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
    /// Source addresses to bind, round-robin per connection (one address reaches ~28k
    /// ports): e.g. 127.0.0.1,127.0.0.2. Default: the kernel's choice.
    #[arg(long, value_delimiter = ',')]
    pub sources: Vec<IpAddr>,
    /// Per-connection bound on TCP connect + upgrade + `joined`, seconds.
    #[arg(long, default_value_t = 30.0)]
    pub connect_timeout: f64,
    /// Bound on the whole connect phase, seconds; the run goes on with what joined.
    #[arg(long, default_value_t = 180.0)]
    pub join_timeout: f64,
    /// The read buffer per connection, KiB (allocated up front: the client's memory per
    /// connection). Larger means fewer read syscalls for heavy traffic.
    #[arg(long, default_value_t = 4)]
    pub read_buffer_kib: usize,
    /// Offer permessage-deflate (RFC 7692) on every WebSocket connection and inflate what
    /// arrives compressed (those connections use yawc instead of tungstenite). Ignored by
    /// `slowloris`, whose connections never upgrade.
    #[arg(long)]
    pub compress: bool,
    /// Gateway process id (same machine): its CPU seconds (utime+stime) and RSS
    /// (VmRSS, VmHWM) before and after the run go into the report.
    #[arg(long)]
    pub pid: Option<u32>,
    #[command(flatten)]
    pub slo: SloArgs,
}

impl ConnArgs {
    /// Resolves the target these options describe.
    ///
    /// # Errors
    /// A bad URL or unresolvable host (see [`Target::resolve`]).
    pub async fn target(&self) -> anyhow::Result<Target> {
        let mut target = Target::resolve(
            &self.targets,
            self.sources.clone(),
            self.format,
            secs(self.connect_timeout),
        )
        .await?;
        target.read_buffer = self.read_buffer_kib.max(1) * 1024;
        if self.compress {
            target.enable_deflate();
        }
        Ok(target)
    }

    /// The targets as one string, for reports.
    pub fn url(&self) -> String {
        self.targets.join(",")
    }

    /// Warns when `conns` sockets will not fit the open-file limit or source ports.
    pub fn check_capacity(&self, conns: usize, nofile: u64) {
        if conns as u64 + 64 > nofile {
            eprintln!(
                "warning: {conns} connections need more than the open-file limit {nofile} allows"
            );
        }
        let sources = self.sources.len().max(1) * self.targets.len().max(1);
        if conns / sources > 28_000 {
            eprintln!(
                "warning: {conns} connections over {sources} source address(es) exceed ~28k \
                 ephemeral ports each: add --sources 127.0.0.1,127.0.0.2,..."
            );
        }
    }
}

/// Seconds (from the command line) as a `Duration`; negative or NaN is zero.
pub fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::ZERO)
}

/// A short id for this run, used in room members' names and chat stamps so that
/// leftovers of an earlier run are never mistaken for this one's.
pub fn run_id() -> String {
    let micros = crate::report::unix_micros();
    format!(
        "{:x}",
        (micros ^ (u64::from(std::process::id()) << 40)) & 0xff_ffff_ffff
    )
}

/// The `TcpExt` counter of accept-backlog overflows.
const LISTEN_OVERFLOWS: &str = "ListenOverflows";

/// Bookkeeping of a connect phase: bounded concurrency, successes, failures by reason,
/// connect latency (attempt start to `joined`), and when the phase settled.
pub struct ConnectTracker {
    total: u64,
    start: Instant,
    sem: Semaphore,
    joined: AtomicU64,
    failed: AtomicU64,
    /// Microseconds after `start` at which the last successful `joined` arrived.
    last_joined_us: AtomicU64,
    /// Largest room `online` count any `joined` reported.
    max_online: AtomicU64,
    /// System-wide `ListenOverflows` when the tracker was made.
    listen_overflows_before: Option<u64>,
    failures: Tally,
    latency: Mutex<Histogram<u64>>,
    settled: Notify,
    /// Set by [`ConnectTracker::close`]: joins from then on are late.
    closed: Mutex<bool>,
}

impl ConnectTracker {
    /// A tracker for `total` connections opened at most `concurrency` at a time.
    pub fn new(total: usize, concurrency: usize) -> Self {
        Self {
            total: total as u64,
            start: Instant::now(),
            sem: Semaphore::new(concurrency.max(1)),
            joined: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            last_joined_us: AtomicU64::new(0),
            max_online: AtomicU64::new(0),
            listen_overflows_before: crate::sys::tcp_ext_counter(LISTEN_OVERFLOWS),
            failures: Tally::default(),
            latency: Mutex::new(new_hist()),
            settled: Notify::new(),
            closed: Mutex::new(false),
        }
    }

    /// Opens connection `index` into `room` once a concurrency slot is free; records
    /// the outcome. `None` on failure (already counted with its reason).
    pub async fn open(
        &self,
        target: &Target,
        index: usize,
        room: &str,
        token: Option<&str>,
    ) -> Option<(Conn, Joined)> {
        self.open_with(target, index, room, token, || {})
            .await
            .map(|(conn, joined, _)| (conn, joined))
    }

    /// As [`ConnectTracker::open`], and tells whether the join came before
    /// [`ConnectTracker::close`]; `on_join` runs, atomically with that decision, only
    /// for a join in time (so a scenario's member counts are complete once the phase
    /// is closed, even for the join that settled it).
    pub async fn open_with(
        &self,
        target: &Target,
        index: usize,
        room: &str,
        token: Option<&str>,
        on_join: impl FnOnce(),
    ) -> Option<(Conn, Joined, bool)> {
        let result = {
            // The semaphore is never closed.
            let _permit = self.sem.acquire().await.ok()?;
            let t0 = Instant::now();
            target
                .open(index, room, token)
                .await
                .map(|ok| (ok, t0.elapsed()))
        };
        let outcome = match result {
            Ok((ok, took)) => {
                let in_time = {
                    let closed = lock(&self.closed);
                    if !*closed {
                        on_join();
                    }
                    !*closed
                };
                lock(&self.latency).saturating_record(took.as_micros() as u64);
                self.max_online.fetch_max(ok.1.online, Relaxed);
                self.last_joined_us
                    .fetch_max(self.start.elapsed().as_micros() as u64, Relaxed);
                self.joined.fetch_add(1, Relaxed);
                Some((ok.0, ok.1, in_time))
            }
            Err(failure) => {
                self.failures.add(failure.to_string());
                self.failed.fetch_add(1, Relaxed);
                None
            }
        };
        if self.joined.load(Relaxed) + self.failed.load(Relaxed) == self.total {
            // notify_one keeps a permit if nobody waits yet.
            self.settled.notify_one();
        }
        outcome
    }

    /// Ends the connect phase: connections that join from now on are late.
    pub fn close(&self) {
        *lock(&self.closed) = true;
    }

    /// Waits until every connection joined or failed, at most `limit`; true if so.
    pub async fn wait_settled(&self, limit: Duration) -> bool {
        if self.total == 0 || self.is_settled() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::timeout(limit, self.settled.notified()) => {}
            () = interrupted() => {}
        }
        self.is_settled()
    }

    fn is_settled(&self) -> bool {
        self.joined.load(Relaxed) + self.failed.load(Relaxed) >= self.total
    }

    pub fn joined(&self) -> u64 {
        self.joined.load(Relaxed)
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Relaxed)
    }

    /// p99 of the connect latency so far, in ms (for progress lines).
    pub fn p99_ms(&self) -> f64 {
        LatencySummary::of(&lock(&self.latency)).p99_ms
    }

    /// `joined J/N failed F` for progress lines.
    pub fn progress(&self) -> String {
        format!(
            "joined {}/{} failed {}",
            self.joined(),
            self.total,
            self.failed()
        )
    }

    /// The connect phase as reported (its length measured to now).
    pub fn summary(&self) -> ConnectSummary {
        let phase_took = self.start.elapsed();
        let ok = self.joined();
        let failed = self.failed();
        let all_joined = ok == self.total;
        let last = Duration::from_micros(self.last_joined_us.load(Relaxed));
        ConnectSummary {
            attempted: self.total,
            ok,
            failed,
            not_finished: self.total.saturating_sub(ok + failed),
            all_joined,
            time_to_all_joined_s: all_joined.then(|| round3(last.as_secs_f64())),
            connect_phase_s: round3(phase_took.as_secs_f64()),
            joins_per_s: round3(crate::progress::per_sec(ok, last)),
            max_online_seen: self.max_online.load(Relaxed),
            listen_overflows: self.listen_overflows_before.and_then(|before| {
                crate::sys::tcp_ext_counter(LISTEN_OVERFLOWS).map(|now| now.saturating_sub(before))
            }),
            failures: self.failures.snapshot(),
            connect_latency: LatencySummary::of(&lock(&self.latency)),
        }
    }
}

/// The outcome of a connect phase.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectSummary {
    pub attempted: u64,
    pub ok: u64,
    pub failed: u64,
    /// Still connecting when the phase's deadline passed.
    pub not_finished: u64,
    pub all_joined: bool,
    /// From the first attempt to the last `joined`, when all joined.
    pub time_to_all_joined_s: Option<f64>,
    /// How long the connect phase lasted (to all settled, or to its deadline).
    pub connect_phase_s: f64,
    /// Successful joins per second over the phase.
    pub joins_per_s: f64,
    /// Largest room `online` count reported by a `joined` (the last joiner of a room
    /// sees every member, so this checks the gateway's count).
    pub max_online_seen: u64,
    /// System-wide TCP `ListenOverflows` during the phase: SYNs or handshakes a listener
    /// dropped because its accept backlog was full; each costs its client a ~1 s SYN
    /// retransmit (the gateway runs on this machine, so this is almost always it).
    pub listen_overflows: Option<u64>,
    /// Failures by reason.
    pub failures: BTreeMap<String, u64>,
    /// Attempt start (slot acquired) to `joined`.
    pub connect_latency: LatencySummary,
}

impl ConnectSummary {
    /// The share of attempted connections that joined (the `delivery` of an SLO for
    /// connect scenarios); `None` when nothing was attempted.
    pub fn join_ratio(&self) -> Option<f64> {
        (self.attempted > 0).then(|| self.ok as f64 / self.attempted as f64)
    }

    /// Appends the connection rows to a human table.
    pub fn rows(&self, t: &mut Table) {
        t.row("attempted", self.attempted)
            .row("ok", self.ok)
            .row("failed", self.failed);
        if self.not_finished > 0 {
            t.row("not finished", self.not_finished);
        }
        t.row(
            "time to all joined",
            self.time_to_all_joined_s
                .map_or_else(|| "never (not all joined)".into(), |s| format!("{s} s")),
        )
        .row("connect phase", format!("{} s", self.connect_phase_s))
        .row("joins/s", self.joins_per_s)
        .row("max online seen", self.max_online_seen)
        .row(
            "listen overflows",
            self.listen_overflows
                .map_or_else(|| "unknown".into(), |n| n.to_string()),
        )
        .row("connect latency", self.connect_latency.line())
        .tally("failures", &self.failures);
    }
}

/// Waits for all `tasks` to end, at most `limit`, then aborts the rest; returns how many
/// had to be aborted.
pub async fn join_all(tasks: &mut JoinSet<()>, limit: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + limit;
    while !tasks.is_empty() {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                let left = tasks.len();
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                return left;
            }
        }
    }
    0
}

/// Set once Ctrl-C was pressed: the scenario cuts its timeline short and still reports.
static INTERRUPTED: LazyLock<watch::Sender<bool>> = LazyLock::new(|| watch::channel(false).0);

/// Installs the Ctrl-C handling: the first press ends the run early (with a report), a
/// second one exits at once.
pub fn watch_ctrl_c() {
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted: finishing the run early (Ctrl-C again to abort)");
            INTERRUPTED.send_replace(true);
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
}

/// Completes once Ctrl-C was pressed (at once if it already was).
pub async fn interrupted() {
    let mut rx = INTERRUPTED.subscribe();
    let _ = rx.wait_for(|v| *v).await;
}

/// Sleeps `d`, or less if Ctrl-C comes; true if interrupted.
pub async fn sleep_or_interrupt(d: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        () = interrupted() => true,
    }
}

/// A small xorshift64* generator for jitter (not for anything that needs real randomness).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from `seed` and the clock (never zero).
    pub fn new(seed: u64) -> Self {
        let mixed = (seed.wrapping_add(1)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ crate::report::unix_micros();
        Self(mixed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1_u64 << 53) as f64
    }

    /// `d` scaled by a uniform factor in `[lo, hi)`.
    pub fn jitter(&mut self, d: Duration, lo: f64, hi: f64) -> Duration {
        d.mul_f64(lo + (hi - lo) * self.unit())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_stays_in_range() {
        let mut r = Rng::new(7);
        for _ in 0..10_000 {
            let u = r.unit();
            assert!((0.0..1.0).contains(&u));
            let d = r.jitter(Duration::from_millis(100), 0.5, 1.5);
            assert!(d >= Duration::from_millis(50) && d < Duration::from_millis(150));
        }
    }
}

/// What a run cost one process: CPU time and memory, read before and after.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessUsage {
    /// The process id, or `self` for the load generator.
    pub pid: String,
    /// utime + stime over the run.
    pub cpu_s: f64,
    pub user_s: f64,
    pub sys_s: f64,
    /// cpu_s / wall time: average cores kept busy.
    pub cpu_cores: f64,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    /// VmHWM (peak RSS since the process started) before and after the run; with a
    /// freshly started gateway, `hwm_after` is the run's peak.
    pub hwm_before_bytes: u64,
    pub hwm_after_bytes: u64,
}

/// Process costs of a run: the gateway's (with `--pid`) and the load generator's own.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub wall_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<ProcessUsage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loadtest: Option<ProcessUsage>,
}

/// Takes the "before" readings; [`UsageWatch::finish`] takes the "after" ones.
pub struct UsageWatch {
    start: Instant,
    gateway: Option<(String, crate::sys::ProcSample)>,
    client: Option<crate::sys::ProcSample>,
}

impl UsageWatch {
    pub fn start(pid: Option<u32>) -> Self {
        let gateway = pid.and_then(|p| {
            let p = p.to_string();
            let sample = crate::sys::proc_sample(&p);
            if sample.is_none() {
                eprintln!("warning: cannot read /proc/{p}: no gateway CPU/RSS in the report");
            }
            sample.map(|s| (p, s))
        });
        Self {
            start: Instant::now(),
            gateway,
            client: crate::sys::proc_sample("self"),
        }
    }

    pub fn finish(&self) -> Usage {
        let wall = self.start.elapsed().as_secs_f64();
        let usage = |pid: &str, before: &crate::sys::ProcSample| {
            let after = crate::sys::proc_sample(pid)?;
            Some(ProcessUsage::between(pid, before, &after, wall))
        };
        Usage {
            wall_s: round3(wall),
            gateway: self.gateway.as_ref().and_then(|(p, b)| usage(p, b)),
            loadtest: self.client.as_ref().and_then(|b| usage("self", b)),
        }
    }
}

impl ProcessUsage {
    /// What process `pid` used between two readings `wall` seconds apart.
    pub fn between(
        pid: &str,
        before: &crate::sys::ProcSample,
        after: &crate::sys::ProcSample,
        wall: f64,
    ) -> Self {
        let user = after.user_s - before.user_s;
        let sys = after.sys_s - before.sys_s;
        Self {
            pid: pid.to_string(),
            cpu_s: round3(user + sys),
            user_s: round3(user),
            sys_s: round3(sys),
            cpu_cores: if wall > 0.0 {
                round3((user + sys) / wall)
            } else {
                0.0
            },
            rss_before_bytes: before.rss_bytes,
            rss_after_bytes: after.rss_bytes,
            hwm_before_bytes: before.hwm_bytes,
            hwm_after_bytes: after.hwm_bytes,
        }
    }

    /// Appends `<name> cpu` and `<name> rss` rows to a human table.
    pub fn rows(&self, t: &mut Table, name: &str) {
        let mib = |b: u64| format!("{:.1} MiB", b as f64 / f64::from(1 << 20));
        t.row(
            &format!("{name} cpu"),
            format!(
                "{} s (user {} + sys {}), {} cores avg  [pid {}]",
                self.cpu_s, self.user_s, self.sys_s, self.cpu_cores, self.pid
            ),
        )
        .row(
            &format!("{name} rss"),
            format!(
                "{} -> {}, peak (VmHWM) {} -> {}",
                mib(self.rss_before_bytes),
                mib(self.rss_after_bytes),
                mib(self.hwm_before_bytes),
                mib(self.hwm_after_bytes)
            ),
        );
    }
}

impl Usage {
    /// Appends a `process usage` section to a human table.
    pub fn rows(&self, t: &mut Table) {
        t.section(&format!("process usage over {} s", self.wall_s));
        for (name, u) in [("gateway", &self.gateway), ("loadtest", &self.loadtest)] {
            if let Some(u) = u {
                u.rows(t, name);
            }
        }
    }
}
