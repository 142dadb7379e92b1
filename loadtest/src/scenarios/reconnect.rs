//! `reconnect`: viewers that lose their connection come back and resume where they were.
//!
//! N anonymous viewers (round-robin over the targets) and S authenticated senders share one
//! hot room; the senders chat at a total `--rate`, each chat tagged with run, sender and
//! sequence number ([`ChatStamp`]), so every delivery can be identified. Whenever a
//! viewer's connection ends (the gateway restarted or drained, a node died, or the tool's
//! own `--blink-at`), it reconnects with a jittered exponential backoff (at once after
//! close 1001), each attempt to the next target, and sends `join` with `since` = the id of
//! the last event it received in the room; `joined.recovered` says whether its `history`
//! holds exactly what followed. Senders reconnect too and keep their pace (a chat due
//! while a sender has no connection counts as a failed send). With `--corpus mixed` each
//! stamp is followed by a live-room phrase ([`crate::corpus`]); the stamp still identifies
//! the chat.
//!
//! Every viewer keeps the set of this run's chats it received (a bit per chat: sender
//! and sequence number map to one index), counting a chat received twice as a duplicate
//! (as the wire shows it: from a `batch` or a recovered `history`). At the end each
//! viewer's missing chats are the acked ones it never received; viewers are grouped by
//! how their re-joins went (never disconnected, recovered every time, `recovered: false`
//! or no `since` at least once, not connected at the end), because only the first two
//! may expect to have missed nothing.
//!
//! Timeline (a `watch` channel every task follows):
//! `Connecting → Warmup → Sending → Draining → Stopped`; blinks happen at
//! `--blink-at` seconds after the sending started.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_tungstenite::tungstenite::{self, Message};

use super::{
    ConnArgs, ConnectSummary, ConnectTracker, ProcessUsage, Rng, Usage, UsageWatch, join_all,
    run_id, secs,
};
use crate::auth::Minter;
use crate::client::{Conn, Failure, Joined, Target, short_ws_error};
use crate::corpus::{self, Chatter, CorpusArgs};
use crate::http::Api;
use crate::progress::{self, per_sec};
use crate::proto::{self, ChatStamp, Decoded, Format, ServerEvent, Stamped};
use crate::report::{LatencySummary, Report, ShardedHist, Table, Tally, lock, round3, unix_micros};
use crate::slo::{self, SloCheck};
use crate::sys::{self, ProcSample};

const SCENARIO: &str = "reconnect";
/// The gateway's counter of chat sampled out by a room's chat budget.
const SAMPLED_OUT_METRIC: &str = "danmaku_chat_sampled_out_total";
/// Examples of missing or duplicate chats kept per viewer group.
const SAMPLE: usize = 6;
/// Close code of a draining node: reconnect at once.
const CLOSE_GOING_AWAY: u16 = 1001;

#[derive(Debug, Clone, Args)]
pub struct ReconnectArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// Viewers (anonymous), round-robin over the targets.
    #[arg(long, visible_alias = "conns", default_value_t = 1000)]
    pub viewers: usize,
    /// Authenticated senders (distinct users), round-robin over the targets.
    #[arg(long, default_value_t = 10)]
    pub senders: usize,
    /// Total chats per second across all senders (keep rate/senders <= 1).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Seconds between all joined and the first chat.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Seconds after the last chat during which viewers still reconnect and receive.
    #[arg(long, default_value_t = 6.0)]
    pub drain: f64,
    /// The room (default: a fresh `lt-rc-<run>`).
    #[arg(long)]
    pub room: Option<String>,
    /// Seconds after the sending started at which the tool drops every viewer's socket
    /// (a network blink; the gateway stays up). Comma-separated for several.
    #[arg(long, value_delimiter = ',')]
    pub blink_at: Vec<f64>,
    /// First reconnect delay in ms (doubled per failed attempt, 50-100% jitter).
    #[arg(long, default_value_t = 100)]
    pub backoff_ms: u64,
    /// Largest reconnect delay in ms.
    #[arg(long, default_value_t = 5000)]
    pub max_backoff_ms: u64,
    /// Bound on one reconnect attempt (TCP + upgrade + `join` → `joined`), seconds.
    #[arg(long, default_value_t = 10.0)]
    pub rejoin_timeout: f64,
    /// A file of gateway process ids (one a line), read at the start and again at the
    /// end: a gateway restarted during the run (its new pid written there) is reported
    /// from its start.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Bearer token for the gateway's HTTP API (`/metrics` is read for sampled-out chat).
    #[arg(long, default_value = "dev-api-token-change-me")]
    pub api_token: String,
    /// HS256 secret of the gateway's `auth.secret`, for minting user tokens.
    #[arg(long, default_value = "dev-secret-change-me")]
    pub secret: String,
}

/// Where the run is; every task follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Warmup,
    /// Sending: from the first instant (the first chat is due) until the second.
    Sending(tokio::time::Instant, tokio::time::Instant),
    Draining,
    Stopped,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::Warmup => "warmup",
            Phase::Sending(..) => "sending",
            Phase::Draining => "draining",
            Phase::Stopped => "stopped",
        }
    }
}

/// A set of this run's chats: one bit per chat index ([`chat_index`]).
#[derive(Debug, Clone, Default)]
pub struct ChatSet {
    words: Vec<u64>,
    len: u64,
}

impl ChatSet {
    /// Adds chat `i`; false if it was there already.
    pub fn insert(&mut self, i: usize) -> bool {
        let (w, bit) = (i / 64, 1_u64 << (i % 64));
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        if self.words[w] & bit != 0 {
            return false;
        }
        self.words[w] |= bit;
        self.len += 1;
        true
    }

    #[cfg(test)]
    pub fn contains(&self, i: usize) -> bool {
        self.words
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// How many chats of `self` are not in `other`.
    pub fn count_not_in(&self, other: &ChatSet) -> u64 {
        self.words
            .iter()
            .enumerate()
            .map(|(i, w)| u64::from((w & !other.words.get(i).copied().unwrap_or(0)).count_ones()))
            .sum()
    }

    /// How many chats of `self` are also in `other`.
    pub fn count_in(&self, other: &ChatSet) -> u64 {
        self.words
            .iter()
            .zip(&other.words)
            .map(|(a, b)| u64::from((a & b).count_ones()))
            .sum()
    }

    /// The first `n` chats of `self` that are not in `other`, in index order.
    pub fn first_not_in(&self, other: &ChatSet, n: usize) -> Vec<usize> {
        let mut out = Vec::new();
        for (i, w) in self.words.iter().enumerate() {
            let mut left = w & !other.words.get(i).copied().unwrap_or(0);
            while left != 0 && out.len() < n {
                out.push(i * 64 + left.trailing_zeros() as usize);
                left &= left - 1;
            }
        }
        out
    }

    /// Adds every chat of `other`.
    pub fn union_with(&mut self, other: &ChatSet) {
        if other.words.len() > self.words.len() {
            self.words.resize(other.words.len(), 0);
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
        self.len = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
    }
}

/// The index of sender `sender`'s `seq`-th chat among `senders` senders, below `limit`
/// (`None` for a stamp no sender of this run can have written).
pub fn chat_index(s: Stamped, senders: usize, limit: usize) -> Option<usize> {
    if s.sender >= senders {
        return None;
    }
    let i = usize::try_from(s.seq)
        .ok()?
        .checked_mul(senders)?
        .checked_add(s.sender)?;
    (i < limit).then_some(i)
}

/// The delay before reconnect attempt `attempt` (0 = the first after a loss): `base`
/// doubled per earlier failed attempt, at most `cap`, scaled by a 50-100% jitter.
pub fn backoff(attempt: u32, base: Duration, cap: Duration, rng: &mut Rng) -> Duration {
    let full = base.saturating_mul(1_u32 << attempt.min(20)).min(cap);
    rng.jitter(full, 0.5, 1.0)
}

/// How a viewer's re-joins went; decides which group its missing chats count in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewerClass {
    /// Never lost its connection.
    Steady,
    /// Lost it, and every re-join answered `recovered: true`.
    Recovered,
    /// At least one re-join answered `recovered: false`, had no `recovered` at all, or
    /// went without `since` (nothing received yet to resume from).
    NotRecovered,
    /// Not connected when the run ended.
    Away,
}

/// What one viewer saw; lives in [`Shared`] so a task that had to be aborted still counts.
#[derive(Debug, Default)]
struct ViewerRecord {
    /// Joined in the connect phase (only those are accounted).
    member: bool,
    connected: bool,
    seen: ChatSet,
    duplicates: u64,
    /// The first duplicates: chat index, and whether the second copy came in a history.
    first_duplicates: Vec<(usize, bool)>,
    rejoins: u32,
    /// Re-joins that were not `recovered: true`.
    not_recovered: u32,
}

impl ViewerRecord {
    fn class(&self) -> ViewerClass {
        classify(self.connected, self.rejoins, self.not_recovered)
    }
}

/// A viewer's group from whether it is connected at the end, its re-joins, and how many
/// of them were not `recovered: true`.
pub fn classify(connected: bool, rejoins: u32, not_recovered: u32) -> ViewerClass {
    if !connected {
        ViewerClass::Away
    } else if rejoins == 0 {
        ViewerClass::Steady
    } else if not_recovered == 0 {
        ViewerClass::Recovered
    } else {
        ViewerClass::NotRecovered
    }
}

/// Missing and duplicate chats over a group of viewers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GroupStats {
    pub viewers: u64,
    /// Acked chats these viewers never received, summed over them.
    pub missing: u64,
    /// Of those, chats that no viewer at all received (never broadcast: sampled out, or
    /// lost with a node before it sent them).
    pub missing_never_delivered: u64,
    pub viewers_missing_some: u64,
    pub max_missing: u64,
    /// Chats received more than once (as the wire showed them), summed.
    pub duplicates: u64,
    pub viewers_with_duplicates: u64,
    pub max_duplicates: u64,
    /// A few examples to look up in the gateway's logs: `v<viewer> missing <sender>:<seq>`
    /// or `v<viewer> duplicate <sender>:<seq> (again in a batch|history)`.
    pub sample: Vec<String>,
}

impl GroupStats {
    /// Adds one viewer with `missing` (of which `never_delivered`) and `duplicates`.
    pub fn add(&mut self, missing: u64, never_delivered: u64, duplicates: u64) {
        self.viewers += 1;
        self.missing += missing;
        self.missing_never_delivered += never_delivered;
        self.viewers_missing_some += u64::from(missing > 0);
        self.max_missing = self.max_missing.max(missing);
        self.duplicates += duplicates;
        self.viewers_with_duplicates += u64::from(duplicates > 0);
        self.max_duplicates = self.max_duplicates.max(duplicates);
    }

    /// Adds `example` to the sample unless it is full.
    pub fn note(&mut self, example: impl FnOnce() -> String) {
        if self.sample.len() < SAMPLE {
            self.sample.push(example());
        }
    }

    fn clean(&self) -> bool {
        self.missing == 0 && self.duplicates == 0
    }

    fn line(&self) -> String {
        format!(
            "{} viewers | missing {} ({} never delivered to anyone; {} viewers, max {}) | \
             duplicates {} ({} viewers, max {})",
            self.viewers,
            self.missing,
            self.missing_never_delivered,
            self.viewers_missing_some,
            self.max_missing,
            self.duplicates,
            self.viewers_with_duplicates,
            self.max_duplicates
        )
    }
}

/// State shared by all tasks of a run.
struct Shared {
    target: Target,
    tracker: ConnectTracker,
    stamp: ChatStamp,
    room: String,
    senders: usize,
    /// Chat indexes are below this (a bound on every sender's sequence numbers).
    index_limit: usize,
    period: Duration,
    stagger: Duration,
    backoff_base: Duration,
    backoff_cap: Duration,
    rejoin_timeout: Duration,
    // Senders.
    sent: AtomicU64,
    acks: AtomicU64,
    acked: Mutex<ChatSet>,
    errors: Tally,
    /// Chats whose connection was lost (or the run ended) before their ack.
    unanswered: AtomicU64,
    /// Chats due while the sender had no connection, or whose send failed.
    send_failures: AtomicU64,
    ack_latency: ShardedHist,
    sender_disconnects: Tally,
    sender_reconnects: AtomicU64,
    sender_reconnect_failures: Tally,
    // Viewers.
    viewers: Vec<Mutex<ViewerRecord>>,
    disconnects: Tally,
    reconnects: AtomicU64,
    reconnect_time: ShardedHist,
    recovered_true: AtomicU64,
    recovered_false: AtomicU64,
    recovered_absent: AtomicU64,
    without_since: AtomicU64,
    join_failures: Tally,
    /// Chats received inside a re-join's `history`.
    from_history: AtomicU64,
    /// Viewers without a connection right now (after having joined).
    away: AtomicI64,
    open: AtomicI64,
    late: AtomicU64,
    frames: AtomicU64,
    foreign_chats: AtomicU64,
    garbage: AtomicU64,
    /// Chat sent → received in a `batch` (not counting recovered history).
    latency: ShardedHist,
    blinks: AtomicU64,
}

impl Shared {
    fn active(phase: Phase) -> bool {
        !matches!(phase, Phase::Draining | Phase::Stopped)
    }
}

/// Runs `reconnect`.
///
/// # Errors
/// Setup errors only (bad URL, token signing); connection failures are in the report.
pub async fn run(args: ReconnectArgs, nofile: u64) -> anyhow::Result<ReconnectReport> {
    anyhow::ensure!(args.viewers > 0, "--viewers must be at least 1");
    let total = args.viewers + args.senders;
    args.conn.check_capacity(total, nofile);
    warn_about_rates(&args);
    let target = args.conn.target().await?;
    let watch_usage = UsageWatch::start(args.conn.pid);
    let pids_before = args.pid_file.as_deref().map(|p| {
        read_pids(p)
            .into_iter()
            .filter_map(|pid| sys::proc_sample(&pid).map(|s| (pid, s)))
            .collect::<BTreeMap<_, _>>()
    });
    let run = run_id();
    let room = args.room.clone().unwrap_or_else(|| format!("lt-rc-{run}"));
    eprintln!(
        "{SCENARIO}: run {run}: {} viewers + {} senders -> {} ({}), room {room}",
        args.viewers,
        args.senders,
        target.describe(),
        args.conn.format.as_str()
    );
    let minter = Minter::new(&args.secret, 3600 + args.duration as u64);
    let tokens = (0..args.senders)
        .map(|j| minter.token(&format!("lt-{run}-s{j}"), &format!("lt sender {j}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (period, stagger) = if args.rate > 0.0 && args.senders > 0 {
        (
            Duration::from_secs_f64(args.senders as f64 / args.rate),
            Duration::from_secs_f64(1.0 / args.rate),
        )
    } else {
        (Duration::MAX, Duration::ZERO)
    };
    // A sender sends at most one chat per period over the duration; leave slack.
    let per_sender = if period == Duration::MAX {
        0
    } else {
        (args.duration / period.as_secs_f64()).ceil() as usize + 16
    };
    let shards = 16;
    let sh = Arc::new(Shared {
        target,
        tracker: ConnectTracker::new(total, args.conn.concurrency),
        stamp: ChatStamp::new(&run),
        room,
        senders: args.senders,
        index_limit: per_sender.saturating_mul(args.senders.max(1)),
        period,
        stagger,
        backoff_base: Duration::from_millis(args.backoff_ms.max(1)),
        backoff_cap: Duration::from_millis(args.max_backoff_ms.max(args.backoff_ms.max(1))),
        rejoin_timeout: secs(args.rejoin_timeout).max(Duration::from_millis(100)),
        sent: AtomicU64::new(0),
        acks: AtomicU64::new(0),
        acked: Mutex::new(ChatSet::default()),
        errors: Tally::default(),
        unanswered: AtomicU64::new(0),
        send_failures: AtomicU64::new(0),
        ack_latency: ShardedHist::new(shards),
        sender_disconnects: Tally::default(),
        sender_reconnects: AtomicU64::new(0),
        sender_reconnect_failures: Tally::default(),
        viewers: (0..args.viewers).map(|_| Mutex::default()).collect(),
        disconnects: Tally::default(),
        reconnects: AtomicU64::new(0),
        reconnect_time: ShardedHist::new(shards),
        recovered_true: AtomicU64::new(0),
        recovered_false: AtomicU64::new(0),
        recovered_absent: AtomicU64::new(0),
        without_since: AtomicU64::new(0),
        join_failures: Tally::default(),
        from_history: AtomicU64::new(0),
        away: AtomicI64::new(0),
        open: AtomicI64::new(0),
        late: AtomicU64::new(0),
        frames: AtomicU64::new(0),
        foreign_chats: AtomicU64::new(0),
        garbage: AtomicU64::new(0),
        latency: ShardedHist::new(shards),
        blinks: AtomicU64::new(0),
    });

    let (phase_tx, _) = watch::channel(Phase::Connecting);
    let (blink_tx, _) = watch::channel(0_u64);
    let mut tasks = JoinSet::new();
    for (j, token) in tokens.into_iter().enumerate() {
        let sender = SenderTask {
            sh: Arc::clone(&sh),
            j,
            token,
            phase: phase_tx.subscribe(),
            rng: Rng::new(j as u64),
            chatter: args.corpus.chatter(j),
        };
        tasks.spawn(sender.run());
    }
    for i in 0..args.viewers {
        let viewer = Viewer {
            sh: Arc::clone(&sh),
            i,
            index: args.senders + i,
            phase: phase_tx.subscribe(),
            blink: blink_tx.subscribe(),
            last_id: String::new(),
            hops: 0,
            next_ref: 1,
            rng: Rng::new((args.senders + i) as u64),
        };
        tasks.spawn(viewer.run());
    }
    let progress = spawn_progress(Arc::clone(&sh), phase_tx.subscribe(), args.viewers);

    sh.tracker.wait_settled(secs(args.conn.join_timeout)).await;
    sh.tracker.close();
    let connect = sh.tracker.summary();
    eprintln!(
        "{SCENARIO}: connect phase over ({} joined, {} failed) after {} s; warming up {} s",
        connect.ok, connect.failed, connect.connect_phase_s, args.warmup
    );
    let apis = resolve_apis(&args.conn.targets, &args.api_token).await;
    let sampled_before = scrape_sampled_out(&apis).await;
    let mut interrupted = false;
    if connect.ok > 0 {
        phase_tx.send_replace(Phase::Warmup);
        interrupted = super::sleep_or_interrupt(secs(args.warmup)).await;
    }

    let send_start = Instant::now();
    let mut blinker = None;
    if connect.ok > 0 && !interrupted {
        let now = tokio::time::Instant::now();
        phase_tx.send_replace(Phase::Sending(now, now + secs(args.duration)));
        eprintln!(
            "{SCENARIO}: sending started ({} s, then {} s drain)",
            args.duration, args.drain
        );
        blinker = Some(spawn_blinks(
            &args.blink_at,
            now,
            blink_tx.clone(),
            Arc::clone(&sh),
        ));
        super::sleep_or_interrupt(secs(args.duration)).await;
    }
    let sending_took = send_start.elapsed();
    phase_tx.send_replace(Phase::Draining);
    super::sleep_or_interrupt(secs(args.drain)).await;
    if let Some(b) = blinker {
        b.abort();
    }
    phase_tx.send_replace(Phase::Stopped);
    drop(progress);
    let aborted = join_all(&mut tasks, Duration::from_secs(10)).await;
    if aborted > 0 {
        eprintln!("{SCENARIO}: {aborted} tasks did not close in time");
    }
    let sampled_after = scrape_sampled_out(&apis).await;
    let usage = watch_usage.finish();
    let gateways = pids_before.map(|before| gateway_usage(&args, &before, usage.wall_s));
    drop(blink_tx);
    Ok(report(
        &sh,
        &args,
        run,
        connect,
        sending_took,
        SampledOut::between(&args.conn.targets, &sampled_before, &sampled_after),
        usage,
        gateways,
    ))
}

/// Warns about settings that cannot give a clean measurement.
fn warn_about_rates(args: &ReconnectArgs) {
    if args.senders == 0 || args.rate <= 0.0 {
        eprintln!("warning: no senders or no rate: no chats will be sent");
    } else if args.rate / args.senders as f64 > 1.0 {
        eprintln!(
            "warning: {:.2} chats/s per sender exceeds the gateway's per-user chat limit \
             (1/s, burst 5): expect rate_limited errors; use --senders >= {}",
            args.rate / args.senders as f64,
            args.rate.ceil() as u64
        );
    }
    for &at in &args.blink_at {
        if !(0.0..=args.duration + args.drain).contains(&at) {
            eprintln!(
                "warning: --blink-at {at} is outside the sending + drain period (0..{}): it \
                 will not happen",
                args.duration + args.drain
            );
        }
    }
}

/// Drops every viewer's connection at each of `at` seconds after `from`.
fn spawn_blinks(
    at: &[f64],
    from: tokio::time::Instant,
    tx: watch::Sender<u64>,
    sh: Arc<Shared>,
) -> tokio::task::JoinHandle<()> {
    let mut at: Vec<f64> = at.iter().copied().filter(|s| *s >= 0.0).collect();
    at.sort_by(f64::total_cmp);
    tokio::spawn(async move {
        for s in at {
            tokio::time::sleep_until(from + secs(s)).await;
            eprintln!("{SCENARIO}: blink at {s} s: dropping every viewer's connection");
            sh.blinks.fetch_add(1, Relaxed);
            tx.send_modify(|n| *n += 1);
        }
    })
}

/// The once-a-second progress line.
fn spawn_progress(
    sh: Arc<Shared>,
    phase: watch::Receiver<Phase>,
    viewers: usize,
) -> progress::Progress {
    let mut last = (0_u64, 0_u64, 0_u64);
    progress::spawn(move |elapsed| {
        let p = *phase.borrow();
        if p == Phase::Connecting {
            return format!(
                "{SCENARIO}: connecting: {} | away {}",
                sh.tracker.progress(),
                sh.away.load(Relaxed)
            );
        }
        let now = (
            sh.sent.load(Relaxed),
            sh.acks.load(Relaxed),
            sh.frames.load(Relaxed),
        );
        let rate = |a: u64, b: u64| per_sec(a.saturating_sub(b), elapsed);
        let line = format!(
            "{SCENARIO}: {} | viewers {}/{viewers} open, {} away | disconnects {} reconnects {} \
             (recovered {} / not {}) join failures {} | sent {:.0}/s acked {:.0}/s send \
             failures {} | {:.0} msgs/s | reconnect p99 {} ms",
            p.name(),
            sh.open.load(Relaxed),
            sh.away.load(Relaxed),
            sh.disconnects.snapshot().values().sum::<u64>(),
            sh.reconnects.load(Relaxed),
            sh.recovered_true.load(Relaxed),
            sh.recovered_false.load(Relaxed)
                + sh.recovered_absent.load(Relaxed)
                + sh.without_since.load(Relaxed),
            sh.join_failures.snapshot().values().sum::<u64>(),
            rate(now.0, last.0),
            rate(now.1, last.1),
            sh.send_failures.load(Relaxed),
            rate(now.2, last.2),
            LatencySummary::of(&sh.reconnect_time.snapshot()).p99_ms,
        );
        last = now;
        line
    })
}

/// Completes once the run is stopped (or its phase channel is gone).
async fn stopped(phase: &mut watch::Receiver<Phase>) {
    let _ = phase.wait_for(|p| *p == Phase::Stopped).await;
}

/// Why a connection ended: a report label and the close code, if the server sent one.
type Lost = (String, Option<u16>);

fn lost_from(msg: Option<Result<Message, tungstenite::Error>>) -> Result<Message, Lost> {
    match msg {
        Some(Ok(Message::Close(frame))) => {
            let code = frame.as_ref().map(|f| u16::from(f.code));
            let label = code.map_or_else(|| "-".to_string(), |c| c.to_string());
            Err((format!("closed by server: {label}"), code))
        }
        Some(Ok(msg)) => Ok(msg),
        Some(Err(e)) => Err((format!("read: {}", short_ws_error(&e)), None)),
        None => Err(("stream ended".into(), None)),
    }
}

/// One viewer.
struct Viewer {
    sh: Arc<Shared>,
    /// Viewer number (its record).
    i: usize,
    /// Connection number of its first connection (endpoint and source round-robin).
    index: usize,
    phase: watch::Receiver<Phase>,
    blink: watch::Receiver<u64>,
    /// Id of the last non-presence event received in the room (`since`).
    last_id: String,
    /// Reconnect attempts so far: attempt k goes to the target after the previous one.
    hops: usize,
    next_ref: i64,
    rng: Rng,
}

impl Viewer {
    async fn run(mut self) {
        let sh = Arc::clone(&self.sh);
        let rec = &sh.viewers[self.i];
        let Some((mut conn, _, in_time)) = sh
            .tracker
            .open_with(&sh.target, self.index, &sh.room, None, || {
                let mut r = lock(rec);
                r.member = true;
                r.connected = true;
            })
            .await
        else {
            return;
        };
        if !in_time {
            // Too late to be accounted: it would have missed chats for no reason of its own.
            sh.late.fetch_add(1, Relaxed);
            conn.close(Duration::from_secs(1)).await;
            return;
        }
        sh.open.fetch_add(1, Relaxed);
        self.blink.borrow_and_update();
        loop {
            let Some((reason, code)) = self.read(&mut conn).await else {
                sh.open.fetch_sub(1, Relaxed);
                conn.close(Duration::from_secs(1)).await;
                return;
            };
            // Dropped without a close frame: a blink, or the peer is gone anyway.
            drop(conn);
            sh.open.fetch_sub(1, Relaxed);
            sh.away.fetch_add(1, Relaxed);
            lock(rec).connected = false;
            sh.disconnects.add(reason);
            match self.reconnect(code).await {
                Some(c) => conn = c,
                None => return,
            }
        }
    }

    /// Reads until the connection is lost (why) or the run stops (`None`).
    async fn read(&mut self, conn: &mut Conn) -> Option<Lost> {
        loop {
            tokio::select! {
                msg = conn.recv() => {
                    if let Err(lost) = self.on_message(msg) {
                        return Some(lost);
                    }
                }
                () = stopped(&mut self.phase) => return None,
                changed = self.blink.changed() => {
                    changed.ok()?;
                    return Some(("blink".into(), None));
                }
            }
        }
    }

    fn on_message(&mut self, msg: Option<Result<Message, tungstenite::Error>>) -> Result<(), Lost> {
        let msg = lost_from(msg)?;
        match proto::decode(&msg) {
            Decoded::Frame(frame) => {
                self.sh.frames.fetch_add(1, Relaxed);
                if frame.op == "batch" {
                    self.absorb(&frame.events, false);
                }
            }
            Decoded::Garbage(why) => {
                self.sh.frames.fetch_add(1, Relaxed);
                if self.sh.garbage.fetch_add(1, Relaxed) == 0 {
                    eprintln!("warning: undecodable frame (reported once): {why}");
                }
            }
            Decoded::Control | Decoded::Close(_) => {}
        }
        Ok(())
    }

    /// Records the room events of a `batch` (or a re-join's `history`): this run's chats
    /// into the viewer's set, and the last non-presence event's id as the next `since`.
    fn absorb(&mut self, events: &[ServerEvent<'_>], from_history: bool) {
        let sh = &self.sh;
        let mut rec = lock(&sh.viewers[self.i]);
        let mut now = None;
        let (mut foreign, mut recovered) = (0, 0);
        for ev in events {
            if ev.kind == "presence" {
                continue;
            }
            if let Some(id) = &ev.id {
                self.last_id.clear();
                self.last_id.push_str(&id.0);
            }
            if ev.kind != "chat" {
                continue;
            }
            let stamped = ev.text.as_ref().and_then(|t| sh.stamp.parse(&t.0));
            let Some(s) = stamped else {
                foreign += 1;
                continue;
            };
            let Some(ix) = chat_index(s, sh.senders, sh.index_limit) else {
                foreign += 1;
                continue;
            };
            if !rec.seen.insert(ix) {
                rec.duplicates += 1;
                if rec.first_duplicates.len() < 2 {
                    rec.first_duplicates.push((ix, from_history));
                }
            }
            if from_history {
                recovered += 1;
            } else {
                let now = *now.get_or_insert_with(unix_micros);
                sh.latency
                    .shard(self.i)
                    .saturating_record(now.saturating_sub(s.sent_us));
            }
        }
        drop(rec);
        if foreign > 0 {
            sh.foreign_chats.fetch_add(foreign, Relaxed);
        }
        if recovered > 0 {
            sh.from_history.fetch_add(recovered, Relaxed);
        }
    }

    /// Reconnects and re-joins with `since` until it works (`None` if the run stopped
    /// first). `code`: the close code that ended the last connection.
    async fn reconnect(&mut self, code: Option<u16>) -> Option<Conn> {
        let sh = Arc::clone(&self.sh);
        let t0 = Instant::now();
        let mut attempt = 0_u32;
        let mut delay = if code == Some(CLOSE_GOING_AWAY) {
            Duration::ZERO
        } else {
            backoff(0, sh.backoff_base, sh.backoff_cap, &mut self.rng)
        };
        loop {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stopped(&mut self.phase) => return None,
            }
            self.hops += 1;
            let reference = self.next_ref;
            self.next_ref += 1;
            let since = (!self.last_id.is_empty()).then_some(self.last_id.as_str());
            let had_since = since.is_some();
            let join = proto::encode_join(sh.target.format, &sh.room, since, reference);
            let opening = sh.target.open_join(
                self.index + self.hops,
                None,
                join,
                reference,
                sh.rejoin_timeout,
            );
            let result = tokio::select! {
                r = opening => r,
                () = stopped(&mut self.phase) => return None,
            };
            match result {
                Ok((conn, joined)) => {
                    sh.reconnect_time
                        .shard(self.i)
                        .saturating_record(t0.elapsed().as_micros() as u64);
                    sh.reconnects.fetch_add(1, Relaxed);
                    let recovered = match proto::decode(&joined) {
                        Decoded::Frame(f) => {
                            self.absorb(&f.history, true);
                            f.recovered
                        }
                        _ => None,
                    };
                    let ok = match (had_since, recovered) {
                        (false, _) => {
                            sh.without_since.fetch_add(1, Relaxed);
                            false
                        }
                        (true, Some(true)) => {
                            sh.recovered_true.fetch_add(1, Relaxed);
                            true
                        }
                        (true, Some(false)) => {
                            sh.recovered_false.fetch_add(1, Relaxed);
                            false
                        }
                        (true, None) => {
                            sh.recovered_absent.fetch_add(1, Relaxed);
                            false
                        }
                    };
                    {
                        let mut rec = lock(&sh.viewers[self.i]);
                        rec.rejoins += 1;
                        rec.not_recovered += u32::from(!ok);
                        rec.connected = true;
                    }
                    sh.open.fetch_add(1, Relaxed);
                    sh.away.fetch_sub(1, Relaxed);
                    // A blink while away is not one more loss.
                    self.blink.borrow_and_update();
                    return Some(conn);
                }
                Err(failure) => {
                    sh.join_failures.add(failure.to_string());
                    attempt += 1;
                    delay = backoff(attempt, sh.backoff_base, sh.backoff_cap, &mut self.rng);
                }
            }
        }
    }
}

/// A sender's reconnection in progress.
type Opening = Pin<Box<dyn Future<Output = Result<(Conn, Joined), Failure>> + Send>>;

/// One sender.
struct SenderTask {
    sh: Arc<Shared>,
    j: usize,
    token: String,
    phase: watch::Receiver<Phase>,
    rng: Rng,
    /// This sender's phrases (`--corpus mixed`).
    chatter: Option<Chatter>,
}

/// A sender's connection state.
struct SenderState {
    conn: Option<Conn>,
    /// Chats awaiting their ack: ref → when sent.
    pending: HashMap<i64, Instant>,
    /// The next chat's sequence number (its ref is seq + 1).
    seq: u64,
    retry_at: Option<tokio::time::Instant>,
    opening: Option<Opening>,
    attempt: u32,
    hops: usize,
}

impl SenderTask {
    async fn run(mut self) {
        let sh = Arc::clone(&self.sh);
        let Some((first, _, in_time)) = sh
            .tracker
            .open_with(&sh.target, self.j, &sh.room, Some(&self.token), || {})
            .await
        else {
            return;
        };
        if !in_time {
            sh.late.fetch_add(1, Relaxed);
            first.close(Duration::from_secs(1)).await;
            return;
        }
        let mut st = SenderState {
            conn: Some(first),
            pending: HashMap::new(),
            seq: 0,
            retry_at: None,
            opening: None,
            attempt: 0,
            hops: 0,
        };
        let mut ticker: Option<Interval> = None;
        let mut until = None;
        loop {
            let retry = st.retry_at.unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                msg = async { st.conn.as_mut().expect("guarded by is_some").recv().await },
                    if st.conn.is_some() =>
                {
                    if let Err(lost) = self.on_message(msg, &mut st) {
                        self.lose(&mut st, lost);
                    }
                }
                changed = self.phase.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let phase = *self.phase.borrow_and_update();
                    match phase {
                        Phase::Sending(from, to) => {
                            ticker = self.ticker(from);
                            until = Some(to);
                        }
                        Phase::Draining => {
                            ticker = None;
                            st.retry_at = None;
                            st.opening = None;
                        }
                        Phase::Stopped => break,
                        Phase::Connecting | Phase::Warmup => {}
                    }
                }
                tick = async { ticker.as_mut().expect("guarded by is_some").tick().await },
                    if ticker.is_some() =>
                {
                    if until.is_some_and(|u| tick >= u) {
                        ticker = None;
                        continue;
                    }
                    self.send_chat(&mut st).await;
                }
                () = tokio::time::sleep_until(retry), if st.retry_at.is_some() => {
                    st.retry_at = None;
                    st.hops += 1;
                    let sh2 = Arc::clone(&sh);
                    let token = self.token.clone();
                    let index = self.j + st.hops;
                    st.opening = Some(Box::pin(async move {
                        sh2.target.open(index, &sh2.room, Some(&token)).await
                    }));
                }
                result = async { st.opening.as_mut().expect("guarded by is_some").await },
                    if st.opening.is_some() =>
                {
                    st.opening = None;
                    match result {
                        Ok((conn, _)) => {
                            st.conn = Some(conn);
                            st.attempt = 0;
                            sh.sender_reconnects.fetch_add(1, Relaxed);
                        }
                        Err(failure) => {
                            sh.sender_reconnect_failures.add(failure.to_string());
                            st.attempt += 1;
                            if Shared::active(*self.phase.borrow()) {
                                let d = backoff(st.attempt, sh.backoff_base, sh.backoff_cap, &mut self.rng);
                                st.retry_at = Some(tokio::time::Instant::now() + d);
                            }
                        }
                    }
                }
            }
        }
        sh.unanswered.fetch_add(st.pending.len() as u64, Relaxed);
        if let Some(c) = st.conn {
            c.close(Duration::from_secs(1)).await;
        }
    }

    /// This sender's pace: first at `from` + its stagger, then every period.
    fn ticker(&self, from: tokio::time::Instant) -> Option<Interval> {
        let sh = &self.sh;
        if sh.period == Duration::MAX {
            return None;
        }
        let first = from + sh.stagger * (self.j as u32);
        let mut ticker = tokio::time::interval_at(first, sh.period);
        // A late tick is sent once, never as a burst that would trip the rate limit.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        Some(ticker)
    }

    async fn send_chat(&mut self, st: &mut SenderState) {
        let sh = Arc::clone(&self.sh);
        let Some(conn) = st.conn.as_mut() else {
            sh.send_failures.fetch_add(1, Relaxed);
            return;
        };
        let seq = st.seq;
        st.seq += 1;
        let reference = seq as i64 + 1;
        let mut text = sh.stamp.text(self.j, seq, unix_micros());
        if let Some(chatter) = self.chatter.as_mut() {
            corpus::append(&mut text, &chatter.next_text(), corpus::MAX_TEXT_CHARS);
        }
        let msg = proto::encode_chat(sh.target.format, &sh.room, &text, reference);
        match conn.send(msg).await {
            Ok(()) => {
                sh.sent.fetch_add(1, Relaxed);
                st.pending.insert(reference, Instant::now());
            }
            Err(e) => {
                sh.send_failures.fetch_add(1, Relaxed);
                self.lose(st, (format!("send: {}", short_ws_error(&e)), None));
            }
        }
    }

    /// The connection is gone: its unacked chats are unanswered; reconnect while the run
    /// is still sending.
    fn lose(&mut self, st: &mut SenderState, (reason, code): Lost) {
        let sh = &self.sh;
        sh.sender_disconnects.add(reason);
        st.conn = None;
        sh.unanswered.fetch_add(st.pending.len() as u64, Relaxed);
        st.pending.clear();
        st.attempt = 0;
        if Shared::active(*self.phase.borrow()) {
            let d = if code == Some(CLOSE_GOING_AWAY) {
                Duration::ZERO
            } else {
                backoff(0, sh.backoff_base, sh.backoff_cap, &mut self.rng)
            };
            st.retry_at = Some(tokio::time::Instant::now() + d);
        }
    }

    fn on_message(
        &self,
        msg: Option<Result<Message, tungstenite::Error>>,
        st: &mut SenderState,
    ) -> Result<(), Lost> {
        let sh = &self.sh;
        let msg = lost_from(msg)?;
        // The room's traffic comes back to senders too; only replies matter here.
        if proto::is_batch(&msg) {
            return Ok(());
        }
        let Decoded::Frame(frame) = proto::decode(&msg) else {
            return Ok(());
        };
        let Some(sent) = frame.reference.and_then(|r| st.pending.remove(&r)) else {
            return Ok(());
        };
        match frame.op {
            "ack" => {
                sh.acks.fetch_add(1, Relaxed);
                let seq = frame.reference.unwrap_or(1) as u64 - 1;
                let stamped = Stamped {
                    sender: self.j,
                    seq,
                    sent_us: 0,
                };
                if let Some(ix) = chat_index(stamped, sh.senders, sh.index_limit) {
                    lock(&sh.acked).insert(ix);
                }
                sh.ack_latency
                    .shard(self.j)
                    .saturating_record(sent.elapsed().as_micros() as u64);
            }
            "error" => sh.errors.add(frame.code.unwrap_or("?")),
            _ => {}
        }
        Ok(())
    }
}

/// The HTTP APIs of the targets (`ws://h:p/ws` → `http://h:p`), for `/metrics`.
async fn resolve_apis(targets: &[String], token: &str) -> Vec<Option<Api>> {
    let mut apis = Vec::with_capacity(targets.len());
    for t in targets {
        apis.push(Api::resolve(t, token).await.ok());
    }
    apis
}

/// Each target's `danmaku_chat_sampled_out_total` (`None` where `/metrics` did not answer).
async fn scrape_sampled_out(apis: &[Option<Api>]) -> Vec<Option<u64>> {
    let mut out = Vec::with_capacity(apis.len());
    for api in apis {
        let value = match api {
            Some(api) => api
                .request("GET", "/metrics", None, Duration::from_secs(3))
                .await
                .ok()
                .filter(|r| r.status == 200)
                .map(|r| metric_sum(&r.body, SAMPLED_OUT_METRIC)),
            None => None,
        };
        out.push(value);
    }
    out
}

/// The sum of a counter's samples (all label sets) in a Prometheus text exposition; 0 if
/// it is not there (never incremented).
pub fn metric_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Chat the gateways sampled out of the broadcast during the run (their room chat
/// budget), from `/metrics` before and after.
#[derive(Debug, Clone, Serialize)]
pub struct SampledOut {
    /// Per target; `None` where `/metrics` did not answer at the end.
    pub by_target: BTreeMap<String, Option<u64>>,
    /// Sum over the targets that answered.
    pub total: u64,
}

impl SampledOut {
    fn between(targets: &[String], before: &[Option<u64>], after: &[Option<u64>]) -> Self {
        let by_target: BTreeMap<String, Option<u64>> = targets
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let b = before.get(i).copied().flatten();
                let a = after.get(i).copied().flatten();
                (t.clone(), a.map(|a| sampled_delta(b, a)))
            })
            .collect();
        let total = by_target.values().flatten().sum();
        Self { by_target, total }
    }
}

/// A counter's increase from `before` to `after`; a counter that went down belongs to a
/// restarted process, whose whole count is this run's.
pub fn sampled_delta(before: Option<u64>, after: u64) -> u64 {
    match before {
        Some(b) if after >= b => after - b,
        _ => after,
    }
}

/// Pids listed in `path`, one a line (unreadable: none).
fn read_pids(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|s| {
            s.split_whitespace()
                .filter(|p| p.parse::<u32>().is_ok())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The `--pid-file` gateways' usage: those alive at both ends over the run, those that
/// started during it from their start.
fn gateway_usage(
    args: &ReconnectArgs,
    before: &BTreeMap<String, ProcSample>,
    wall: f64,
) -> GatewayUsage {
    let path = args.pid_file.as_deref().expect("called with a pid file");
    let now = read_pids(path);
    let zero = ProcSample {
        user_s: 0.0,
        sys_s: 0.0,
        rss_bytes: 0,
        hwm_bytes: 0,
    };
    let mut processes = Vec::new();
    for pid in &now {
        let Some(after) = sys::proc_sample(pid) else {
            continue;
        };
        let started = !before.contains_key(pid);
        let b = before.get(pid).unwrap_or(&zero);
        processes.push(GatewayProcess {
            started_during_run: started,
            usage: ProcessUsage::between(pid, b, &after, wall),
        });
    }
    let exited = before
        .keys()
        .filter(|p| sys::proc_sample(p).is_none())
        .cloned()
        .collect();
    GatewayUsage { processes, exited }
}

/// Gateways named by `--pid-file`.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayUsage {
    pub processes: Vec<GatewayProcess>,
    /// Pids of the start that were gone at the end (killed or restarted).
    pub exited: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GatewayProcess {
    /// Not running at the start: its usage is from its own start.
    pub started_during_run: bool,
    #[serde(flatten)]
    pub usage: ProcessUsage,
}

/// What the senders' chats got.
#[derive(Debug, Serialize)]
pub struct SenderStats {
    pub sent: u64,
    pub acked: u64,
    /// Refused by code.
    pub errors: BTreeMap<String, u64>,
    /// Sent, but the connection was lost (or the run ended) before an ack or error.
    /// Never counted as missing.
    pub unanswered: u64,
    /// Chats due while the sender had no connection, or whose send failed.
    pub send_failures: u64,
    pub send_rate: f64,
    /// Chat sent to its `ack`.
    pub ack_latency: LatencySummary,
    /// Senders' lost connections by reason.
    pub disconnects: BTreeMap<String, u64>,
    pub reconnects: u64,
    pub reconnect_failures: BTreeMap<String, u64>,
}

/// How the viewers' re-joins were answered.
#[derive(Debug, Serialize)]
pub struct RejoinStats {
    pub recovered_true: u64,
    pub recovered_false: u64,
    /// `joined` without `recovered` (a gateway that does not know `since`).
    pub recovered_absent: u64,
    /// Re-joins without `since` (the viewer had received no event yet).
    pub without_since: u64,
    /// This run's chats received inside re-joins' `history`.
    pub chats_from_history: u64,
}

/// Delivery of the acked chats to the viewers.
#[derive(Debug, Serialize)]
pub struct DeliveryStats {
    /// Acked chats × viewers that joined in the connect phase.
    pub expected: u64,
    /// Distinct acked chats received, summed over the viewers.
    pub delivered: u64,
    pub ratio: f64,
    /// Acked chats that no viewer received (never broadcast: sampled out by the room's
    /// chat budget, or lost with a node that acked them).
    pub acked_never_delivered: u64,
    /// The first few of those as `sender:seq` (the chat text is `lt:<run>:<sender>:<seq>:..`).
    pub acked_never_delivered_sample: Vec<String>,
    /// Chats some viewer received that were never acked (their ack was lost with a
    /// connection, or their send failed after the frame went out).
    pub delivered_unacked: u64,
    /// Chat sent to received in a `batch` (recovered history not included).
    pub latency: LatencySummary,
    pub frames_received: u64,
    /// Chat events that were not this run's.
    pub foreign_chat_events: u64,
    pub undecodable_frames: u64,
}

/// Missing and duplicates per viewer group.
#[derive(Debug, Default, Serialize)]
pub struct Groups {
    /// Never lost their connection.
    pub never_disconnected: GroupStats,
    /// Lost it, and every re-join answered `recovered: true`.
    pub recovered_every_time: GroupStats,
    /// At least one re-join was `recovered: false`, without `recovered`, or without
    /// `since`.
    pub not_recovered: GroupStats,
    /// Not connected at the end (the last reconnect had not succeeded).
    pub away_at_end: GroupStats,
}

#[derive(Debug, Serialize)]
pub struct ReconnectReport {
    pub scenario: &'static str,
    pub url: String,
    pub format: Format,
    pub run_id: String,
    pub room: String,
    pub viewers: usize,
    pub senders: usize,
    pub rate: f64,
    pub duration_s: f64,
    pub blink_at_s: Vec<f64>,
    /// Blinks the tool made.
    pub blinks: u64,
    pub connect: ConnectSummary,
    /// Joined after the connect phase's deadline; closed without taking part.
    pub late_joined: u64,
    /// Viewers' lost connections (close → reconnect) by reason.
    pub disconnects: BTreeMap<String, u64>,
    pub disconnects_total: u64,
    /// Successful re-joins.
    pub reconnects: u64,
    /// Connection lost (or blink) → `joined` of the re-join.
    pub reconnect_time: LatencySummary,
    pub rejoins: RejoinStats,
    /// Failed reconnect attempts by reason (each retried after a backoff).
    pub join_failures: BTreeMap<String, u64>,
    /// Of those, the gateway's refusals: HTTP 503/429 at the upgrade, `busy` or
    /// `rate_limited` answering the `join`.
    pub refusals: BTreeMap<String, u64>,
    /// Viewers that joined in the connect phase (the ones accounted).
    pub viewers_joined: u64,
    pub viewers_connected_at_end: u64,
    pub chats: SenderStats,
    pub delivery: DeliveryStats,
    pub groups: Groups,
    /// Chat the gateways sampled out (`/metrics`); such chat is acked, never broadcast.
    pub sampled_out: SampledOut,
    /// `delivery` is delivered/expected, latencies the reconnect time.
    pub slo: Vec<SloCheck>,
    pub usage: Usage,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateways: Option<GatewayUsage>,
    /// Viewers that never disconnected or recovered every time got every acked chat
    /// exactly once, and every SLO was met.
    pub passed: bool,
}

/// Whether a join failure label is a refusal by the gateway's admission limits.
pub fn is_refusal(label: &str) -> bool {
    label.starts_with("http 503")
        || label.starts_with("http 429")
        || label.ends_with(": busy")
        || label.ends_with(": rate_limited")
}

fn ratio(num: u64, den: u64) -> f64 {
    if den > 0 {
        ((num as f64 / den as f64) * 1e6).round() / 1e6
    } else {
        0.0
    }
}

#[allow(clippy::too_many_arguments)]
fn report(
    sh: &Shared,
    args: &ReconnectArgs,
    run_id: String,
    connect: ConnectSummary,
    sending_took: Duration,
    sampled_out: SampledOut,
    usage: Usage,
    gateways: Option<GatewayUsage>,
) -> ReconnectReport {
    let acked = lock(&sh.acked).clone();
    let records: Vec<_> = sh.viewers.iter().map(|r| lock(r)).collect();
    let mut union = ChatSet::default();
    for r in records.iter().filter(|r| r.member) {
        union.union_with(&r.seen);
    }
    let never_delivered = acked.count_not_in(&union);
    let delivered_unacked = union.count_not_in(&acked);
    let (mut groups, mut expected, mut delivered) = (Groups::default(), 0, 0);
    let (mut connected, mut joined) = (0_u64, 0_u64);
    for (i, r) in records.iter().enumerate().filter(|(_, r)| r.member) {
        let got = acked.count_in(&r.seen);
        let missing = acked.len() - got;
        // A chat nobody got is missing for every viewer.
        let group = match r.class() {
            ViewerClass::Steady => &mut groups.never_disconnected,
            ViewerClass::Recovered => &mut groups.recovered_every_time,
            ViewerClass::NotRecovered => &mut groups.not_recovered,
            ViewerClass::Away => &mut groups.away_at_end,
        };
        group.add(missing, never_delivered, r.duplicates);
        let chat = |ix: usize| format!("{}:{}", ix % sh.senders.max(1), ix / sh.senders.max(1));
        for ix in acked.first_not_in(&r.seen, 2) {
            group.note(|| format!("v{i} missing {}", chat(ix)));
        }
        for &(ix, history) in &r.first_duplicates {
            let via = if history { "history" } else { "a batch" };
            group.note(|| format!("v{i} duplicate {} (again in {via})", chat(ix)));
        }
        expected += acked.len();
        delivered += got;
        connected += u64::from(r.connected);
        joined += 1;
    }
    drop(records);
    let delivery_ratio = ratio(delivered, expected);
    let reconnect_time = LatencySummary::of(&sh.reconnect_time.snapshot());
    let slo = args
        .conn
        .slo
        .slo()
        .evaluate((expected > 0).then_some(delivery_ratio), &reconnect_time);
    let join_failures = sh.join_failures.snapshot();
    let refusals = join_failures
        .iter()
        .filter(|(k, _)| is_refusal(k))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    let disconnects = sh.disconnects.snapshot();
    let sent = sh.sent.load(Relaxed);
    let passed = groups.never_disconnected.clean()
        && groups.recovered_every_time.clean()
        && slo::all_met(&slo);
    ReconnectReport {
        scenario: SCENARIO,
        url: args.conn.url(),
        format: args.conn.format,
        run_id,
        room: sh.room.clone(),
        viewers: args.viewers,
        senders: args.senders,
        rate: args.rate,
        duration_s: args.duration,
        blink_at_s: args.blink_at.clone(),
        blinks: sh.blinks.load(Relaxed),
        connect,
        late_joined: sh.late.load(Relaxed),
        disconnects_total: disconnects.values().sum(),
        disconnects,
        reconnects: sh.reconnects.load(Relaxed),
        reconnect_time,
        rejoins: RejoinStats {
            recovered_true: sh.recovered_true.load(Relaxed),
            recovered_false: sh.recovered_false.load(Relaxed),
            recovered_absent: sh.recovered_absent.load(Relaxed),
            without_since: sh.without_since.load(Relaxed),
            chats_from_history: sh.from_history.load(Relaxed),
        },
        join_failures,
        refusals,
        viewers_joined: joined,
        viewers_connected_at_end: connected,
        chats: SenderStats {
            sent,
            acked: sh.acks.load(Relaxed),
            errors: sh.errors.snapshot(),
            unanswered: sh.unanswered.load(Relaxed),
            send_failures: sh.send_failures.load(Relaxed),
            send_rate: round3(per_sec(sent, sending_took)),
            ack_latency: LatencySummary::of(&sh.ack_latency.snapshot()),
            disconnects: sh.sender_disconnects.snapshot(),
            reconnects: sh.sender_reconnects.load(Relaxed),
            reconnect_failures: sh.sender_reconnect_failures.snapshot(),
        },
        delivery: DeliveryStats {
            expected,
            delivered,
            ratio: delivery_ratio,
            acked_never_delivered: never_delivered,
            acked_never_delivered_sample: acked
                .first_not_in(&union, 10)
                .into_iter()
                .map(|i| format!("{}:{}", i % sh.senders.max(1), i / sh.senders.max(1)))
                .collect(),
            delivered_unacked,
            latency: LatencySummary::of(&sh.latency.snapshot()),
            frames_received: sh.frames.load(Relaxed),
            foreign_chat_events: sh.foreign_chats.load(Relaxed),
            undecodable_frames: sh.garbage.load(Relaxed),
        },
        groups,
        sampled_out,
        slo,
        usage,
        gateways,
        passed,
    }
}

impl Report for ReconnectReport {
    fn passed(&self) -> bool {
        self.passed
    }

    fn human(&self) -> String {
        let mut t = Table::default();
        let blinks = if self.blink_at_s.is_empty() {
            String::new()
        } else {
            format!(", blinks at {:?} s", self.blink_at_s)
        };
        t.section(&format!(
            "reconnect: {} viewers + {} senders in {} at {} ({}), {} chats/s for {} s{blinks}",
            self.viewers,
            self.senders,
            self.room,
            self.url,
            self.format.as_str(),
            self.rate,
            self.duration_s
        ));
        t.section("connect phase");
        self.connect.rows(&mut t);
        t.row("late joined", self.late_joined);
        t.section("viewers: disconnects and re-joins");
        t.row("blinks made", self.blinks)
            .row("disconnects", self.disconnects_total)
            .tally("  by reason", &self.disconnects)
            .row("reconnects", self.reconnects)
            .row("reconnect time", self.reconnect_time.line())
            .row("recovered: true", self.rejoins.recovered_true)
            .row("recovered: false", self.rejoins.recovered_false)
            .row("recovered: absent", self.rejoins.recovered_absent)
            .row("re-joins without since", self.rejoins.without_since)
            .row("chats from history", self.rejoins.chats_from_history)
            .tally("join failures", &self.join_failures)
            .tally("  of which refusals", &self.refusals)
            .row(
                "connected at end",
                format!(
                    "{} / {} joined",
                    self.viewers_connected_at_end, self.viewers_joined
                ),
            );
        let c = &self.chats;
        t.section("senders");
        t.row("sent", c.sent)
            .row("send rate", format!("{} /s", c.send_rate))
            .row("acked", c.acked)
            .tally("errors", &c.errors)
            .row("unanswered (no ack)", c.unanswered)
            .row("send failures", c.send_failures)
            .row("ack latency", c.ack_latency.line())
            .tally("disconnects", &c.disconnects)
            .row("reconnects", c.reconnects)
            .tally("reconnect failures", &c.reconnect_failures);
        let d = &self.delivery;
        t.section("delivery of acked chats to viewers");
        t.row("expected", d.expected)
            .row("delivered", d.delivered)
            .row("ratio", format!("{:.6}", d.ratio))
            .row(
                "acked, seen by nobody",
                if d.acked_never_delivered_sample.is_empty() {
                    d.acked_never_delivered.to_string()
                } else {
                    format!(
                        "{}  (sender:seq {})",
                        d.acked_never_delivered,
                        d.acked_never_delivered_sample.join(" ")
                    )
                },
            )
            .row("seen, never acked", d.delivered_unacked)
            .row("latency (batches)", d.latency.line())
            .row("frames received", d.frames_received)
            .row("foreign chat events", d.foreign_chat_events)
            .row("undecodable frames", d.undecodable_frames);
        t.section("missing / duplicates per viewer group");
        let g = &self.groups;
        t.row("never disconnected", g.never_disconnected.line())
            .row("recovered every time", g.recovered_every_time.line())
            .row("not recovered (>= once)", g.not_recovered.line())
            .row("away at end", g.away_at_end.line());
        for (name, group) in [
            ("never disconnected", &g.never_disconnected),
            ("recovered every time", &g.recovered_every_time),
            ("not recovered", &g.not_recovered),
            ("away at end", &g.away_at_end),
        ] {
            if !group.sample.is_empty() {
                t.row(&format!("  e.g. {name}"), group.sample.join(", "));
            }
        }
        t.section("sampled out by the room chat budget (/metrics)");
        for (target, n) in &self.sampled_out.by_target {
            t.row(
                target,
                n.map_or_else(|| "no answer".to_string(), |n| n.to_string()),
            );
        }
        if self.sampled_out.total > 0 || d.acked_never_delivered > 0 {
            t.row(
                "NOTE",
                "chat was acked but not broadcast (sampled out, or lost with a node): run \
                 the gateway with GATEWAY_ROOM__MAX_CHAT_PER_S=0 \
                 GATEWAY_ROOM__MAX_CHAT_BYTES_PER_S=0",
            );
        }
        slo::rows(&mut t, &self.slo, "delivery ratio", "reconnect time");
        self.usage.rows(&mut t);
        if let Some(gw) = &self.gateways {
            for p in &gw.processes {
                let name = if p.started_during_run {
                    "gateway (new)"
                } else {
                    "gateway"
                };
                p.usage.rows(&mut t, name);
            }
            if !gw.exited.is_empty() {
                t.row("gateways exited", gw.exited.join(", "));
            }
        }
        let verdict = if self.passed {
            "PASS (steady and recovered viewers: 0 missing, 0 duplicates)"
        } else {
            "FAIL (steady or recovered viewers missed or duplicated chats, or an SLO was missed)"
        };
        t.row("result", verdict);
        t.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamped(sender: usize, seq: u64) -> Stamped {
        Stamped {
            sender,
            seq,
            sent_us: 0,
        }
    }

    #[test]
    fn chat_sets_count_missing_duplicates_and_unions() {
        let mut acked = ChatSet::default();
        for i in [0, 1, 2, 63, 64, 200] {
            assert!(acked.insert(i));
        }
        assert!(!acked.insert(64), "already there");
        assert_eq!(acked.len(), 6);
        let mut seen = ChatSet::default();
        for i in [1, 64, 200, 201] {
            seen.insert(i);
        }
        assert!(seen.contains(201) && !seen.contains(0) && !seen.contains(10_000));
        // Missing: acked but not seen; extra: seen but never acked.
        assert_eq!(acked.count_not_in(&seen), 3);
        assert_eq!(acked.first_not_in(&seen, 10), [0, 2, 63]);
        assert_eq!(acked.first_not_in(&seen, 2), [0, 2]);
        assert_eq!(seen.first_not_in(&acked, 10), [201]);
        assert_eq!(seen.count_not_in(&acked), 1);
        assert_eq!(acked.count_in(&seen), 3);
        assert_eq!(acked.len() - acked.count_in(&seen), 3);
        let mut union = ChatSet::default();
        union.union_with(&seen);
        union.union_with(&acked);
        assert_eq!(union.len(), 7);
        assert_eq!(acked.count_not_in(&union), 0);
        // An empty set misses everything.
        assert_eq!(acked.count_not_in(&ChatSet::default()), 6);
        assert_eq!(ChatSet::default().count_in(&acked), 0);
    }

    #[test]
    fn chat_indexes_are_dense_and_bounded() {
        assert_eq!(chat_index(stamped(0, 0), 3, 100), Some(0));
        assert_eq!(chat_index(stamped(2, 0), 3, 100), Some(2));
        assert_eq!(chat_index(stamped(0, 1), 3, 100), Some(3));
        assert_eq!(chat_index(stamped(1, 5), 3, 100), Some(16));
        assert_eq!(chat_index(stamped(3, 0), 3, 100), None, "no such sender");
        assert_eq!(chat_index(stamped(0, 40), 3, 100), None, "beyond the bound");
        assert_eq!(chat_index(stamped(0, u64::MAX), 3, usize::MAX), None);
    }

    #[test]
    fn groups_tally_viewers_by_class() {
        assert_eq!(classify(true, 0, 0), ViewerClass::Steady);
        assert_eq!(classify(true, 3, 0), ViewerClass::Recovered);
        assert_eq!(classify(true, 3, 1), ViewerClass::NotRecovered);
        assert_eq!(classify(false, 3, 0), ViewerClass::Away);
        assert_eq!(classify(false, 0, 0), ViewerClass::Away);
        let mut g = GroupStats::default();
        g.add(0, 0, 0);
        g.add(5, 2, 1);
        g.add(2, 2, 0);
        assert_eq!(
            g,
            GroupStats {
                viewers: 3,
                missing: 7,
                missing_never_delivered: 4,
                viewers_missing_some: 2,
                max_missing: 5,
                duplicates: 1,
                viewers_with_duplicates: 1,
                max_duplicates: 1,
                sample: Vec::new(),
            }
        );
        for n in 0..10 {
            g.note(|| n.to_string());
        }
        assert_eq!(g.sample, ["0", "1", "2", "3", "4", "5"]);
        assert!(!g.clean());
        assert!(GroupStats::default().clean());
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut rng = Rng::new(1);
        let (base, cap) = (Duration::from_millis(100), Duration::from_secs(5));
        for _ in 0..1000 {
            let d0 = backoff(0, base, cap, &mut rng);
            assert!(d0 >= Duration::from_millis(50) && d0 <= base, "{d0:?}");
            let d3 = backoff(3, base, cap, &mut rng);
            assert!(d3 >= Duration::from_millis(400) && d3 <= Duration::from_millis(800));
            let big = backoff(40, base, cap, &mut rng);
            assert!(big >= cap / 2 && big <= cap, "{big:?}");
        }
    }

    #[test]
    fn metrics_and_refusals_parse() {
        let text = "# HELP danmaku_chat_sampled_out_total x\n\
                    # TYPE danmaku_chat_sampled_out_total counter\n\
                    danmaku_chat_sampled_out_total 12\n\
                    danmaku_chat_sampled_out_total_other 99\n\
                    danmaku_chat_sampled_out_total{room=\"a\"} 3\n";
        assert_eq!(metric_sum(text, SAMPLED_OUT_METRIC), 15);
        assert_eq!(metric_sum("up 1\n", SAMPLED_OUT_METRIC), 0);
        assert_eq!(sampled_delta(Some(10), 15), 5);
        assert_eq!(sampled_delta(Some(10), 4), 4, "restarted: its whole count");
        assert_eq!(sampled_delta(None, 7), 7);
        let s = SampledOut::between(
            &["a".into(), "b".into()],
            &[Some(1), None],
            &[Some(3), None],
        );
        assert_eq!(
            (s.total, s.by_target["a"], s.by_target["b"]),
            (2, Some(2), None)
        );
        for refusal in [
            "http 503",
            "http 429",
            "error frame: busy",
            "error frame: rate_limited",
        ] {
            assert!(is_refusal(refusal), "{refusal}");
        }
        for other in [
            "tcp connect: ConnectionRefused",
            "timeout: upgrade",
            "http 401",
        ] {
            assert!(!is_refusal(other), "{other}");
        }
    }
}
