//! `storm`: a reconnect storm. N connections are opened at concurrency C, each waiting
//! for `joined`; the report says whether all succeeded, why those that failed did, how
//! long until all had joined, and the per-connection connect latency. With `--auth`
//! every connection is a distinct authenticated user (the gateway verifies N JWTs).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use super::crowd::Crowd;
use super::{ConnArgs, ConnectSummary, Usage, UsageWatch, run_id, secs, sleep_or_interrupt};
use crate::auth::Minter;
use crate::progress;
use crate::report::{Report, Table};
use crate::slo::{self, SloCheck};

const SCENARIO: &str = "storm";

#[derive(Debug, Clone, Args)]
pub struct StormArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Connections to open.
    #[arg(long, default_value_t = 5000)]
    pub conns: usize,
    /// Room every connection joins.
    #[arg(long, default_value = "lt-storm")]
    pub room: String,
    /// Connect as distinct authenticated users (tokens signed with --secret).
    #[arg(long)]
    pub auth: bool,
    /// HS256 secret of the gateway's `auth.secret`, for minting user tokens.
    #[arg(long, default_value = "dev-secret-change-me")]
    pub secret: String,
    /// Seconds to keep the connections open after the connect phase.
    #[arg(long, default_value_t = 0.0)]
    pub hold: f64,
}

#[derive(Debug, Serialize)]
pub struct StormReport {
    pub scenario: &'static str,
    pub url: String,
    pub room: String,
    pub conns: usize,
    pub concurrency: usize,
    pub auth: bool,
    pub all_succeeded: bool,
    pub connect: ConnectSummary,
    /// Joined connections lost before they were closed, by reason.
    pub dropped: BTreeMap<String, u64>,
    /// `delivery` is joined / attempted, latencies the connect latency.
    pub slo: Vec<SloCheck>,
    /// CPU and memory of the gateway (`--pid`) and of the tool over the run.
    pub usage: Usage,
    pub passed: bool,
}

impl Report for StormReport {
    fn passed(&self) -> bool {
        self.passed
    }

    fn human(&self) -> String {
        let mut t = Table::default();
        t.section(&format!(
            "storm: {} {} conns into {} at {}, concurrency {}",
            self.conns,
            if self.auth {
                "authenticated"
            } else {
                "anonymous"
            },
            self.room,
            self.url,
            self.concurrency
        ));
        t.row(
            "all succeeded",
            if self.all_succeeded { "yes" } else { "NO" },
        );
        self.connect.rows(&mut t);
        t.tally("dropped after join", &self.dropped);
        slo::rows(&mut t, &self.slo, "join ratio", "connect latency");
        self.usage.rows(&mut t);
        t.row("result", if self.passed { "PASS" } else { "FAIL" });
        t.finish()
    }
}

/// Runs the scenario.
///
/// # Errors
/// Setup errors only (bad URL, token signing); connection failures are in the report.
pub async fn run(args: StormArgs, nofile: u64) -> anyhow::Result<StormReport> {
    args.conn.check_capacity(args.conns, nofile);
    let target = Arc::new(args.conn.target().await?);
    let watch_usage = UsageWatch::start(args.conn.pid);
    eprintln!(
        "{}: {} connections -> {} ({}) room {}",
        SCENARIO,
        args.conns,
        target.describe(),
        args.conn.format.as_str(),
        args.room
    );
    let tokens = if args.auth {
        let run = run_id();
        let minter = Minter::new(&args.secret, 3600);
        let tokens = (0..args.conns)
            .map(|i| minter.token(&format!("lt-{run}-u{i}"), &format!("storm {i}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Some(tokens)
    } else {
        None
    };

    let crowd = Crowd::spawn(
        target,
        args.conns,
        args.conn.concurrency,
        &args.room,
        tokens,
    );
    let progress = {
        let tracker = Arc::clone(&crowd.tracker);
        let dropped = Arc::clone(&crowd.dropped);
        let frames = Arc::clone(&crowd.frames);
        let mut last = (0, 0);
        progress::spawn(move |elapsed| {
            let now = (tracker.joined(), frames.load(Relaxed));
            let joins = progress::per_sec(now.0 - last.0, elapsed);
            let msgs = progress::per_sec(now.1 - last.1, elapsed);
            last = now;
            format!(
                "storm: {} | dropped {} | {joins:.0} joins/s | {msgs:.0} msgs/s | connect p99 {} ms",
                tracker.progress(),
                dropped.snapshot().values().sum::<u64>(),
                tracker.p99_ms()
            )
        })
    };
    crowd
        .tracker
        .wait_settled(secs(args.conn.join_timeout))
        .await;
    let connect = crowd.tracker.summary();
    if args.hold > 0.0 {
        sleep_or_interrupt(secs(args.hold)).await;
    }
    drop(progress);
    let dropped = crowd.dropped.snapshot();
    let aborted = crowd.close(Duration::from_secs(10)).await;
    if aborted > 0 {
        eprintln!("storm: {aborted} connection tasks did not close in time");
    }

    let all_succeeded = connect.all_joined && connect.failed == 0;
    let slo = args
        .conn
        .slo
        .slo()
        .evaluate(connect.join_ratio(), &connect.connect_latency);
    let passed = all_succeeded && dropped.is_empty() && slo::all_met(&slo);
    Ok(StormReport {
        scenario: SCENARIO,
        url: args.conn.url(),
        room: args.room,
        conns: args.conns,
        concurrency: args.conn.concurrency,
        auth: args.auth,
        all_succeeded,
        connect,
        dropped,
        slo,
        usage: watch_usage.finish(),
        passed,
    })
}
