//! `slowloris`: N silent TCP connections (connected, never a byte sent) against the
//! gateway's edge, while `/healthz` is polled. The gateway must close each at
//! `server.handshake_timeout_ms` after accept (or at once, when `limits.max_handshakes`
//! are already waiting) and keep answering health checks meanwhile. The report gives
//! how the silent connections ended (EOF, reset, answered, still open), how long each was
//! held, the time until all were shed, and the health checks' latency and failures.
//!
//! Connections are opened at `--concurrency` (each holds its slot for the TCP connect
//! only) over the `--sources` addresses; against a loopback target without `--sources`
//! they are spread over 127.0.0.1-127.0.0.8, so ephemeral ports never run out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use super::{ConnArgs, Usage, UsageWatch, interrupted, join_all, secs};
use crate::client::{Failure, Target};
use crate::http::Api;
use crate::progress;
use crate::report::{LatencySummary, Report, ShardedHist, Table, Tally, lock, new_hist, round3};
use crate::slo::{self, SloCheck};

const SCENARIO: &str = "slowloris";
/// Loopback source addresses used when none are given (127.0.0.1..=127.0.0.N).
const LOOPBACK_SOURCES: u8 = 8;

#[derive(Debug, Clone, Args)]
pub struct SlowlorisArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Silent connections to open.
    #[arg(long, default_value_t = 5000)]
    pub conns: usize,
    /// Longest a silent connection is kept waiting for the gateway to close it, seconds
    /// after its connect; one still open then counts as never shed (the run fails).
    #[arg(long, default_value_t = 30.0)]
    pub max_hold: f64,
    /// `GET /healthz` this often, milliseconds, from the start until all are shed.
    #[arg(long, default_value_t = 100)]
    pub healthz_every_ms: u64,
    /// Bound on one health check (connect + answer), seconds.
    #[arg(long, default_value_t = 2.0)]
    pub healthz_timeout: f64,
    /// Base URL of `/healthz` (default: derived from the first target, ws://h:p/ws →
    /// http://h:p).
    #[arg(long)]
    pub api_url: Option<String>,
}

/// How the silent connections ended.
#[derive(Debug, Clone, Serialize)]
pub struct SilentSummary {
    pub attempted: u64,
    pub connected: u64,
    /// Connect failures by reason (not counted against the gateway).
    pub connect_failures: BTreeMap<String, u64>,
    /// Closed by the gateway with a FIN (read returned EOF).
    pub eof: u64,
    /// Closed by the gateway with a reset.
    pub reset: u64,
    /// The gateway sent bytes (it never should to a silent client).
    pub answered: u64,
    /// Still open `--max-hold` s after their connect.
    pub never_shed: u64,
    pub all_shed: bool,
    /// First connect attempt → last connection open.
    pub time_to_all_open_s: f64,
    /// First connect attempt → last connection closed by the gateway, when all were.
    pub time_to_all_shed_s: Option<f64>,
    /// Last connection open → last one closed by the gateway, when all were.
    pub shed_after_last_open_s: Option<f64>,
    /// Most silent connections open at once, as the tool saw them.
    pub max_open: u64,
    /// Per connection: its connect → its close by the gateway (the handshake timeout as
    /// a client sees it; near 0 for connections shed at accept).
    pub held: LatencySummary,
}

/// The health checks made meanwhile.
#[derive(Debug, Clone, Serialize)]
pub struct HealthzSummary {
    pub url: String,
    pub requests: u64,
    pub ok: u64,
    /// Failed checks by reason (a status other than 200, timeout, connect error).
    pub failures: BTreeMap<String, u64>,
    /// Request sent → answer read, successful checks only.
    pub latency: LatencySummary,
}

impl HealthzSummary {
    fn ratio(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.ok as f64 / self.requests as f64)
    }
}

#[derive(Debug, Serialize)]
pub struct SlowlorisReport {
    pub scenario: &'static str,
    pub url: String,
    pub sources: Vec<String>,
    pub conns: usize,
    pub concurrency: usize,
    pub silent: SilentSummary,
    pub healthz: HealthzSummary,
    /// `delivery` is successful health checks / made, latencies theirs.
    pub slo: Vec<SloCheck>,
    pub usage: Usage,
    pub passed: bool,
}

impl Report for SlowlorisReport {
    fn passed(&self) -> bool {
        self.passed
    }

    fn human(&self) -> String {
        let s = &self.silent;
        let h = &self.healthz;
        let secs_or =
            |v: Option<f64>, none: &str| v.map_or_else(|| none.to_string(), |v| format!("{v} s"));
        let mut t = Table::default();
        t.section(&format!(
            "slowloris: {} silent conns to {} at concurrency {}, sources {}",
            self.conns,
            self.url,
            self.concurrency,
            if self.sources.is_empty() {
                "kernel's choice".to_string()
            } else {
                self.sources.join(",")
            }
        ));
        t.row("connected", format!("{}/{}", s.connected, s.attempted))
            .tally("connect failures", &s.connect_failures)
            .row("closed (eof)", s.eof)
            .row("closed (reset)", s.reset)
            .row("answered", s.answered)
            .row("never shed", s.never_shed)
            .row("all shed", if s.all_shed { "yes" } else { "NO" })
            .row("max open at once", s.max_open)
            .row("time to all open", format!("{} s", s.time_to_all_open_s))
            .row(
                "time to all shed",
                secs_or(s.time_to_all_shed_s, "never (not all shed)"),
            )
            .row(
                "shed after last open",
                secs_or(s.shed_after_last_open_s, "-"),
            )
            .row("held per conn", s.held.line());
        t.section(&format!("healthz: {}", h.url));
        t.row("requests", h.requests)
            .row("ok", h.ok)
            .tally("failures", &h.failures)
            .row("latency", h.latency.line());
        slo::rows(&mut t, &self.slo, "healthz ok ratio", "healthz latency");
        self.usage.rows(&mut t);
        t.row("result", if self.passed { "PASS" } else { "FAIL" });
        t.finish()
    }
}

/// What the silent connections' tasks record.
struct Silent {
    start: Instant,
    connected: AtomicU64,
    closed: AtomicU64,
    eof: AtomicU64,
    reset: AtomicU64,
    answered: AtomicU64,
    never_shed: AtomicU64,
    max_open: AtomicU64,
    /// Microseconds after `start` of the last connect, and of the last close.
    last_open_us: AtomicU64,
    last_closed_us: AtomicU64,
    connect_failures: Tally,
    held: ShardedHist,
}

impl Silent {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            connected: AtomicU64::new(0),
            closed: AtomicU64::new(0),
            eof: AtomicU64::new(0),
            reset: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            never_shed: AtomicU64::new(0),
            max_open: AtomicU64::new(0),
            last_open_us: AtomicU64::new(0),
            last_closed_us: AtomicU64::new(0),
            connect_failures: Tally::default(),
            held: ShardedHist::default(),
        }
    }

    fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    fn open(&self) -> u64 {
        self.connected
            .load(Relaxed)
            .saturating_sub(self.closed.load(Relaxed))
    }

    /// Opens connection `index` and waits for the gateway to close it.
    async fn run(&self, target: &Target, gate: &Semaphore, index: usize, max_hold: Duration) {
        let connect = async {
            let _slot = gate.acquire().await.ok()?;
            match tokio::time::timeout(target.connect_timeout, target.tcp_connect(index)).await {
                Ok(Ok(tcp)) => Some(tcp),
                Ok(Err(failure)) => {
                    self.connect_failures.add(failure.to_string());
                    None
                }
                Err(_) => {
                    self.connect_failures
                        .add(Failure::Timeout(crate::client::Stage::Tcp).to_string());
                    None
                }
            }
        };
        let Some(mut tcp) = connect.await else {
            return;
        };
        let since = Instant::now();
        self.connected.fetch_add(1, Relaxed);
        self.last_open_us.fetch_max(self.now_us(), Relaxed);
        self.max_open.fetch_max(self.open(), Relaxed);
        let mut buf = [0u8; 512];
        let ended = tokio::time::timeout(max_hold, tcp.read(&mut buf)).await;
        let counter = match ended {
            Err(_) => &self.never_shed,
            Ok(Ok(0)) => &self.eof,
            Ok(Err(_)) => &self.reset,
            Ok(Ok(_)) => &self.answered,
        };
        counter.fetch_add(1, Relaxed);
        if ended.is_ok() {
            self.held
                .shard(index)
                .saturating_record(since.elapsed().as_micros() as u64);
            self.last_closed_us.fetch_max(self.now_us(), Relaxed);
        }
        self.closed.fetch_add(1, Relaxed);
    }

    fn summary(&self, attempted: usize) -> SilentSummary {
        let connected = self.connected.load(Relaxed);
        let (eof, reset) = (self.eof.load(Relaxed), self.reset.load(Relaxed));
        let all_shed = connected > 0 && eof + reset == connected;
        let s = |us: u64| round3(us as f64 / 1e6);
        let (open_us, closed_us) = (
            self.last_open_us.load(Relaxed),
            self.last_closed_us.load(Relaxed),
        );
        SilentSummary {
            attempted: attempted as u64,
            connected,
            connect_failures: self.connect_failures.snapshot(),
            eof,
            reset,
            answered: self.answered.load(Relaxed),
            never_shed: self.never_shed.load(Relaxed),
            all_shed,
            time_to_all_open_s: s(open_us),
            time_to_all_shed_s: all_shed.then(|| s(closed_us)),
            shed_after_last_open_s: all_shed.then(|| s(closed_us.saturating_sub(open_us))),
            max_open: self.max_open.load(Relaxed),
            held: LatencySummary::of(&self.held.snapshot()),
        }
    }
}

/// What the health checks record.
struct Health {
    requests: AtomicU64,
    ok: AtomicU64,
    failures: Tally,
    latency: std::sync::Mutex<Histogram<u64>>,
}

impl Health {
    fn new() -> Self {
        Self {
            requests: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            failures: Tally::default(),
            latency: std::sync::Mutex::new(new_hist()),
        }
    }

    async fn check(&self, api: &Api, timeout: Duration) {
        self.requests.fetch_add(1, Relaxed);
        let t0 = Instant::now();
        match api.request("GET", "/healthz", None, timeout).await {
            Ok(r) if r.status == 200 => {
                self.ok.fetch_add(1, Relaxed);
                lock(&self.latency).saturating_record(t0.elapsed().as_micros() as u64);
            }
            Ok(r) => self.failures.add(format!("http {}", r.status)),
            Err(e) => self.failures.add(short_error(&e)),
        }
    }

    fn summary(&self, url: String) -> HealthzSummary {
        HealthzSummary {
            url,
            requests: self.requests.load(Relaxed),
            ok: self.ok.load(Relaxed),
            failures: self.failures.snapshot(),
            latency: LatencySummary::of(&lock(&self.latency)),
        }
    }
}

/// A low-cardinality label for a failed health check (the outermost context, plus the
/// IO error kind when there is one).
fn short_error(e: &anyhow::Error) -> String {
    let io = e
        .chain()
        .find_map(|c| c.downcast_ref::<std::io::Error>())
        .map(|io| format!(": {:?}", io.kind()));
    let root = e.root_cause().to_string();
    match io {
        Some(kind) => format!("error{kind}"),
        None if e.to_string().contains("no response within") => "timeout".into(),
        // Closed after the request without a (whole) answer: shed at accept, usually.
        None if root.contains("not terminated") => "closed without an answer".into(),
        None => root.split(':').next().unwrap_or("error").to_string(),
    }
}

/// Runs the scenario.
///
/// # Errors
/// Setup errors only (bad URL); connection and health-check failures are in the report.
pub async fn run(args: SlowlorisArgs, nofile: u64) -> anyhow::Result<SlowlorisReport> {
    args.conn.check_capacity(args.conns, nofile);
    let mut target = args.conn.target().await?;
    target.spread_loopback_sources(LOOPBACK_SOURCES);
    let target = Arc::new(target);
    let api_url = args
        .api_url
        .clone()
        .unwrap_or_else(|| args.conn.targets[0].clone());
    let api = Arc::new(Api::resolve(&api_url, "").await?);
    let healthz_url = format!("{}/healthz", api.base());
    let watch_usage = UsageWatch::start(args.conn.pid);
    eprintln!(
        "{SCENARIO}: {} silent connections -> {}, polling {healthz_url} every {} ms",
        args.conns,
        target.describe(),
        args.healthz_every_ms
    );

    let silent = Arc::new(Silent::new());
    let health = Arc::new(Health::new());
    let gate = Arc::new(Semaphore::new(args.conn.concurrency.max(1)));
    let max_hold = secs(args.max_hold);
    let mut tasks = JoinSet::new();
    for index in 0..args.conns {
        let (silent, target, gate) = (Arc::clone(&silent), Arc::clone(&target), Arc::clone(&gate));
        tasks.spawn(async move { silent.run(&target, &gate, index, max_hold).await });
    }

    // Health checks on their own cadence: a slow answer does not delay the next one.
    let (stop_checks, mut stopped) = watch::channel(false);
    let poller = {
        let (health, api) = (Arc::clone(&health), Arc::clone(&api));
        let every = Duration::from_millis(args.healthz_every_ms.max(1));
        let timeout = secs(args.healthz_timeout);
        tokio::spawn(async move {
            let mut checks = JoinSet::new();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.wait_for(|stop| *stop) => break,
                }
                // Reap the finished ones so the set stays small.
                while checks.try_join_next().is_some() {}
                let (health, api) = (Arc::clone(&health), Arc::clone(&api));
                checks.spawn(async move { health.check(&api, timeout).await });
            }
            join_all(&mut checks, timeout + Duration::from_secs(1)).await
        })
    };
    let progress = {
        let (silent, health) = (Arc::clone(&silent), Arc::clone(&health));
        let total = args.conns;
        progress::spawn(move |_| {
            format!(
                "slowloris: connected {}/{total} | open {} | shed {} | healthz ok {}/{} p99 {} ms",
                silent.connected.load(Relaxed),
                silent.open(),
                silent.eof.load(Relaxed) + silent.reset.load(Relaxed),
                health.ok.load(Relaxed),
                health.requests.load(Relaxed),
                LatencySummary::of(&lock(&health.latency)).p99_ms,
            )
        })
    };

    // Every task ends by itself (connect timeout + max hold); Ctrl-C cuts it short.
    tokio::select! {
        () = async { while tasks.join_next().await.is_some() {} } => {}
        () = interrupted() => tasks.abort_all(),
    }
    drop(progress);
    let _ = stop_checks.send(true);
    let aborted = poller.await.unwrap_or(0);
    if aborted > 0 {
        eprintln!("{SCENARIO}: {aborted} health checks did not finish in time");
    }

    let silent = silent.summary(args.conns);
    let healthz = health.summary(healthz_url);
    let slo = args
        .conn
        .slo
        .slo()
        .evaluate(healthz.ratio(), &healthz.latency);
    let passed = silent.all_shed
        && silent.answered == 0
        && healthz.requests > 0
        && healthz.failures.is_empty()
        && slo::all_met(&slo);
    Ok(SlowlorisReport {
        scenario: SCENARIO,
        url: args.conn.url(),
        sources: target.sources().iter().map(ToString::to_string).collect(),
        conns: args.conns,
        concurrency: args.conn.concurrency,
        silent,
        healthz,
        slo,
        usage: watch_usage.finish(),
        passed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_check_errors_have_short_labels() {
        let io = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
            .context("GET /healthz");
        assert_eq!(short_error(&io), "error: ConnectionReset");
        let timeout = anyhow::anyhow!("GET /healthz: no response within 2s");
        assert_eq!(short_error(&timeout), "timeout");
        let empty = crate::http::parse_response(b"")
            .unwrap_err()
            .context("GET /healthz");
        assert_eq!(short_error(&empty), "closed without an answer");
    }
}
