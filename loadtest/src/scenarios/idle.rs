//! `idle`: open N anonymous viewers into one room, hold them, close them. Measures what an
//! idle connection costs: with `--pid`, the gateway's RSS is read before connecting, once
//! all joined and at the end of the hold, and divided by the connections held (the
//! tool's own RSS is reported the same way, to show the client side stays cheap). With
//! `--compress` every connection offers permessage-deflate and the report says how many
//! the gateway agreed to: what an idle connection costs with compression negotiated.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use super::crowd::Crowd;
use super::{ConnArgs, ConnectSummary, Usage, UsageWatch, secs, sleep_or_interrupt};
use crate::client::DeflateSummary;
use crate::report::{Report, Table};
use crate::slo::{self, SloCheck};
use crate::{progress, sys};

const SCENARIO: &str = "idle";

#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// Room every connection joins.
    #[arg(long, default_value = "lt-idle")]
    pub room: String,
    /// Seconds to hold the connections once all joined.
    #[arg(long, default_value_t = 10.0)]
    pub hold: f64,
}

/// Resident memory of one process over the run.
#[derive(Debug, Clone, Serialize)]
pub struct RssReport {
    pub pid: String,
    pub before_bytes: u64,
    pub all_joined_bytes: u64,
    pub end_of_hold_bytes: u64,
    /// (all joined − before) / connections joined.
    pub per_conn_bytes: i64,
    /// (end of hold − before) / connections joined.
    pub per_conn_end_of_hold_bytes: i64,
}

impl RssReport {
    fn new(pid: String, before: u64, joined: u64, end: u64, conns: u64) -> Self {
        let per = |after: u64| {
            if conns == 0 {
                0
            } else {
                (after as i64 - before as i64) / conns as i64
            }
        };
        Self {
            pid,
            before_bytes: before,
            all_joined_bytes: joined,
            end_of_hold_bytes: end,
            per_conn_bytes: per(joined),
            per_conn_end_of_hold_bytes: per(end),
        }
    }

    fn rows(&self, t: &mut Table) {
        let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
        t.row("pid", &self.pid)
            .row("before", mib(self.before_bytes))
            .row("all joined", mib(self.all_joined_bytes))
            .row("end of hold", mib(self.end_of_hold_bytes))
            .row("per conn (joined)", format!("{} B", self.per_conn_bytes))
            .row(
                "per conn (end of hold)",
                format!("{} B", self.per_conn_end_of_hold_bytes),
            );
    }
}

#[derive(Debug, Serialize)]
pub struct IdleReport {
    pub scenario: &'static str,
    pub url: String,
    pub room: String,
    pub conns: usize,
    pub hold_s: f64,
    pub connect: ConnectSummary,
    /// Joined connections lost before the end of the hold, by reason.
    pub dropped: BTreeMap<String, u64>,
    /// Connections still open at the end of the hold.
    pub open_at_end: u64,
    pub frames_received: u64,
    /// `--compress` only: how the permessage-deflate offers went (the gateway's memory
    /// per connection with compression agreed is what `server_rss` then shows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<DeflateSummary>,
    pub server_rss: Option<RssReport>,
    pub client_rss: Option<RssReport>,
    /// `delivery` is joined / attempted, latencies the connect latency.
    pub slo: Vec<SloCheck>,
    /// CPU and memory of the gateway (`--pid`) and of the tool over the run.
    pub usage: Usage,
    pub passed: bool,
}

impl Report for IdleReport {
    fn passed(&self) -> bool {
        self.passed
    }

    fn human(&self) -> String {
        let mut t = Table::default();
        t.section(&format!(
            "idle: {} conns into {} at {}, held {} s",
            self.conns, self.room, self.url, self.hold_s
        ));
        t.section("connections");
        self.connect.rows(&mut t);
        t.tally("dropped while held", &self.dropped)
            .row("open at end of hold", self.open_at_end)
            .row("frames received", self.frames_received);
        if let Some(c) = &self.compression {
            t.row(
                "deflate negotiated",
                format!("{} of {} upgrades", c.negotiated, c.offered),
            )
            .row("deflate agreed", c.agreed.as_deref().unwrap_or("-"));
        }
        if let Some(rss) = &self.server_rss {
            t.section("gateway RSS");
            rss.rows(&mut t);
        }
        if let Some(rss) = &self.client_rss {
            t.section("loadtest RSS");
            rss.rows(&mut t);
        }
        slo::rows(&mut t, &self.slo, "join ratio", "connect latency");
        self.usage.rows(&mut t);
        t.row("result", if self.passed { "PASS" } else { "FAIL" });
        t.finish()
    }
}

/// Runs the scenario.
///
/// # Errors
/// Setup errors only (bad URL); connection failures are part of the report.
pub async fn run(args: IdleArgs, nofile: u64) -> anyhow::Result<IdleReport> {
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
    let pid = args.conn.pid.map(|p| p.to_string());
    let server_rss = |pid: &Option<String>| pid.as_deref().and_then(sys::vm_rss_bytes);
    let client_rss = || sys::vm_rss_bytes("self");
    let server_before = server_rss(&pid);
    if let (Some(p), None) = (&pid, server_before) {
        eprintln!("warning: cannot read /proc/{p}/status: no server RSS will be reported");
    }
    let client_before = client_rss();

    let deflate = {
        let target = Arc::clone(&target);
        move || target.deflate_summary()
    };
    let crowd = Crowd::spawn(target, args.conns, args.conn.concurrency, &args.room, None);
    let progress = {
        let tracker = Arc::clone(&crowd.tracker);
        let dropped = Arc::clone(&crowd.dropped);
        let frames = Arc::clone(&crowd.frames);
        let mut last = 0;
        progress::spawn(move |elapsed| {
            let lost: u64 = dropped.snapshot().values().sum();
            let now = frames.load(Relaxed);
            let msgs = progress::per_sec(now - last, elapsed);
            last = now;
            format!(
                "idle: {} | open {} dropped {lost} | {msgs:.0} msgs/s | connect p99 {} ms",
                tracker.progress(),
                tracker.joined().saturating_sub(lost),
                tracker.p99_ms()
            )
        })
    };
    crowd
        .tracker
        .wait_settled(secs(args.conn.join_timeout))
        .await;
    let connect = crowd.tracker.summary();
    let server_joined = server_rss(&pid);
    let client_joined = client_rss();
    eprintln!(
        "idle: connect phase over ({} joined, {} failed); holding {} s",
        connect.ok, connect.failed, args.hold
    );

    sleep_or_interrupt(secs(args.hold)).await;
    let server_end = server_rss(&pid);
    let client_end = client_rss();
    let dropped = crowd.dropped.snapshot();
    let frames_received = crowd.frames.load(Relaxed);
    drop(progress);
    let held = crowd.open_now();
    let aborted = crowd.close(Duration::from_secs(10)).await;
    if aborted > 0 {
        eprintln!("idle: {aborted} connection tasks did not close in time");
    }

    let server_rss = match (pid, server_before, server_joined, server_end) {
        (Some(p), Some(b), Some(j), Some(e)) => Some(RssReport::new(p, b, j, e, connect.ok)),
        _ => None,
    };
    let client_rss = match (client_before, client_joined, client_end) {
        (Some(b), Some(j), Some(e)) => Some(RssReport::new("self".into(), b, j, e, connect.ok)),
        _ => None,
    };
    let slo = args
        .conn
        .slo
        .slo()
        .evaluate(connect.join_ratio(), &connect.connect_latency);
    let passed =
        connect.failed == 0 && connect.all_joined && dropped.is_empty() && slo::all_met(&slo);
    Ok(IdleReport {
        scenario: SCENARIO,
        url: args.conn.url(),
        room: args.room,
        conns: args.conns,
        hold_s: args.hold,
        connect,
        dropped,
        open_at_end: held,
        frames_received,
        compression: deflate(),
        server_rss,
        client_rss,
        slo,
        usage: watch_usage.finish(),
        passed,
    })
}
