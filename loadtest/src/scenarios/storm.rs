//! `storm`: a reconnect storm. N connections are opened at concurrency C, each waiting
//! for `joined`; the report says whether all succeeded, why those that failed did, how
//! long until all had joined, and the per-connection connect latency. With `--auth`
//! every connection is a distinct authenticated user (the gateway verifies N JWTs).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use super::crowd::Crowd;
use super::{ConnArgs, ConnectSummary, run_id, secs, sleep_or_interrupt};
use crate::auth::Minter;
use crate::progress;
use crate::report::{Report, Table};

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
    eprintln!(
        "{}: {} connections -> {} ({}) room {}",
        SCENARIO,
        args.conns,
        target.server(),
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
        let mut last = 0;
        progress::spawn(move |elapsed| {
            let joined = tracker.joined();
            let rate = progress::per_sec(joined - last, elapsed);
            last = joined;
            format!("storm: {} | {rate:.0} joins/s", tracker.progress())
        })
    };
    crowd
        .tracker
        .wait_settled(secs(args.conn.join_timeout))
        .await;
    let connect = crowd.tracker.summary();
    drop(progress);
    if args.hold > 0.0 {
        sleep_or_interrupt(secs(args.hold)).await;
    }
    let dropped = crowd.dropped.snapshot();
    let aborted = crowd.close(Duration::from_secs(10)).await;
    if aborted > 0 {
        eprintln!("storm: {aborted} connection tasks did not close in time");
    }

    let all_succeeded = connect.all_joined && connect.failed == 0;
    let passed = all_succeeded && dropped.is_empty();
    Ok(StormReport {
        scenario: SCENARIO,
        url: args.conn.url,
        room: args.room,
        conns: args.conns,
        concurrency: args.conn.concurrency,
        auth: args.auth,
        all_succeeded,
        connect,
        dropped,
        passed,
    })
}
