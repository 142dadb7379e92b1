//! `fanout`, `rooms` and `soak`: end-to-end delivery under load. One engine, three sets of
//! defaults and features:
//!
//! - `fanout`: N anonymous receivers over R rooms (`<prefix>-0 .. <prefix>-R-1`) plus S
//!   authenticated senders chatting at a total `--rate` (a hot room when R is small).
//! - `rooms`: the same with many small rooms (defaults: 10,000 receivers over 1,000
//!   rooms, 100 senders spread across them at 100 chats/s).
//! - `soak`: steady mixed traffic for `--duration`: chat, free gifts (`--gift`, default
//!   "rose") at `--gift-rate`, and a `--churn` share of viewers that keep leaving and
//!   rejoining (`leave`/`join` on the same connection, or close and reconnect); a
//!   connection the gateway drops is reconnected.
//!
//! Each chat's text carries its send time (see [`ChatStamp`]); every member (senders
//! too: a client sees its own chat in the room's `batch`) records `now - sent` per
//! delivered chat. The delivery ratio counts the *stable* members only (senders and
//! viewers that never churn), each of which is a member from the connect phase to the
//! end: expected = Σ over rooms of acked chats × stable members. Gifts are counted the
//! same way by their `count` (the gateway merges a user's same gift within a window).
//! With `--corpus mixed` the stamp is followed by a live-room phrase ([`crate::corpus`]),
//! so the payloads (and how well they compress) look like a real room's.
//!
//! Bytes on the wire: the sockets' reads of all connections are counted
//! ([`crate::wire`]) from the first chat to the end of the drain, and divided by the chat
//! events delivered in that window (`wire_bytes_per_delivered_event`): what one delivered
//! chat costs the gateway's egress, frame headers, acks and presence included. With
//! `--compress` the report also says how many upgrades agreed permessage-deflate and how
//! many `batch` frames arrived compressed (RSV1) or plain.
//!
//! Timeline, driven by a `watch` channel every connection task follows:
//! `Connecting → Warmup → Sending → Draining → Stopped`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_tungstenite::tungstenite::{self, Message};

use super::{
    ConnArgs, ConnectSummary, ConnectTracker, Rng, Usage, UsageWatch, join_all, run_id, secs,
};
use crate::auth::Minter;
use crate::client::{Conn, DeflateSummary, Target, short_ws_error};
use crate::corpus::{self, Chatter, CorpusArgs, CorpusKind};
use crate::progress::{self, per_sec};
use crate::proto::{self, ChatStamp, ClientOp, Decoded, Format, ServerFrame};
use crate::report::{LatencySummary, Report, ShardedHist, Table, Tally, round3, unix_micros};
use crate::slo::{self, SloCheck};

/// How long a `leave` or `join` of a churning viewer may wait for its reply.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause before reconnecting a connection the gateway dropped (soak).
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// Receivers (anonymous, read-only), spread round-robin over the rooms.
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// Rooms: <room-prefix>-0 .. <room-prefix>-(R-1).
    #[arg(long, default_value_t = 10)]
    pub rooms: usize,
    /// Authenticated senders (distinct users), spread evenly over the rooms.
    #[arg(long, default_value_t = 10)]
    pub senders: usize,
    /// Total chats per second across all senders.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds between all joined and the first chat.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Seconds to keep receiving after the last chat was sent.
    #[arg(long, default_value_t = 2.0)]
    pub drain: f64,
    /// Room name prefix.
    #[arg(long, default_value = "lt")]
    pub room_prefix: String,
    /// HS256 secret of the gateway's `auth.secret`, for minting user tokens.
    #[arg(long, default_value = "dev-secret-change-me")]
    pub secret: String,
    /// Fail (exit 1) when delivered / expected is below this (0 = never fail; same as
    /// --slo delivery=X).
    #[arg(long, default_value_t = 0.0)]
    pub min_delivery_ratio: f64,
}

/// `rooms`: many small rooms. The same options as `fanout`, other defaults.
#[derive(Debug, Clone, Args)]
pub struct RoomsArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// Receivers (anonymous, read-only), spread round-robin over the rooms.
    #[arg(long, default_value_t = 10_000)]
    pub conns: usize,
    /// Rooms: <room-prefix>-0 .. <room-prefix>-(R-1).
    #[arg(long, default_value_t = 1000)]
    pub rooms: usize,
    /// Authenticated senders (distinct users), spread evenly over the rooms.
    #[arg(long, default_value_t = 100)]
    pub senders: usize,
    /// Total chats per second across all senders (keep rate/senders <= 1).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 20.0)]
    pub duration: f64,
    /// Seconds between all joined and the first chat.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Seconds to keep receiving after the last chat was sent.
    #[arg(long, default_value_t = 2.0)]
    pub drain: f64,
    /// Room name prefix.
    #[arg(long, default_value = "lt-rooms")]
    pub room_prefix: String,
    /// HS256 secret of the gateway's `auth.secret`, for minting user tokens.
    #[arg(long, default_value = "dev-secret-change-me")]
    pub secret: String,
    /// Fail (exit 1) when delivered / expected is below this (0 = never fail).
    #[arg(long, default_value_t = 0.0)]
    pub min_delivery_ratio: f64,
}

/// `soak`: steady mixed traffic (chat, free gifts, viewers leaving and rejoining).
#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// Viewers (anonymous), spread round-robin over the rooms.
    #[arg(long, default_value_t = 5000)]
    pub conns: usize,
    /// Rooms: <room-prefix>-0 .. <room-prefix>-(R-1).
    #[arg(long, default_value_t = 50)]
    pub rooms: usize,
    /// Authenticated senders (distinct users), spread evenly over the rooms.
    #[arg(long, default_value_t = 100)]
    pub senders: usize,
    /// Total chats per second across all senders (keep rate/senders <= 1).
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Total free gifts per second across all senders (keep gift-rate/senders <= 10).
    #[arg(long, default_value_t = 20.0)]
    pub gift_rate: f64,
    /// The free gift senders send.
    #[arg(long, default_value = "rose")]
    pub gift: String,
    /// Share of viewers that keep leaving and rejoining (0..=1); they are left out of
    /// the delivery ratio.
    #[arg(long, default_value_t = 0.1)]
    pub churn: f64,
    /// Mean seconds between one churning viewer's departures (jittered ±50%).
    #[arg(long, default_value_t = 10.0)]
    pub churn_period: f64,
    /// Seconds a churning viewer stays away before it rejoins.
    #[arg(long, default_value_t = 1.0)]
    pub away: f64,
    /// Share of departures that close the connection and reconnect (the rest send
    /// `leave` and later `join` on the same connection).
    #[arg(long, default_value_t = 0.5)]
    pub reconnect_share: f64,
    /// Seconds of traffic.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Seconds between all joined and the first chat.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Seconds to keep receiving after the last chat was sent.
    #[arg(long, default_value_t = 3.0)]
    pub drain: f64,
    /// Room name prefix.
    #[arg(long, default_value = "lt-soak")]
    pub room_prefix: String,
    /// HS256 secret of the gateway's `auth.secret`, for minting user tokens.
    #[arg(long, default_value = "dev-secret-change-me")]
    pub secret: String,
    /// Fail (exit 1) when delivered / expected is below this (0 = never fail).
    #[arg(long, default_value_t = 0.0)]
    pub min_delivery_ratio: f64,
}

/// What one run of the engine does; built from any of the three argument sets.
#[derive(Debug, Clone)]
struct Plan {
    scenario: &'static str,
    conn: ConnArgs,
    corpus: CorpusArgs,
    conns: usize,
    rooms: usize,
    senders: usize,
    rate: f64,
    gift_rate: f64,
    gift: String,
    /// Viewers that churn (the first `churners` of them).
    churners: usize,
    churn_period: Duration,
    away: Duration,
    reconnect_share: f64,
    /// Reconnect connections the gateway dropped (soak); else they end.
    reconnect_lost: bool,
    duration: f64,
    warmup: f64,
    drain: f64,
    room_prefix: String,
    secret: String,
    min_delivery_ratio: f64,
}

impl Plan {
    fn chat_only(scenario: &'static str, a: FanoutArgs) -> Self {
        Self {
            scenario,
            conn: a.conn,
            corpus: a.corpus,
            conns: a.conns,
            rooms: a.rooms,
            senders: a.senders,
            rate: a.rate,
            gift_rate: 0.0,
            gift: String::new(),
            churners: 0,
            churn_period: Duration::MAX,
            away: Duration::ZERO,
            reconnect_share: 0.0,
            reconnect_lost: false,
            duration: a.duration,
            warmup: a.warmup,
            drain: a.drain,
            room_prefix: a.room_prefix,
            secret: a.secret,
            min_delivery_ratio: a.min_delivery_ratio,
        }
    }
}

impl From<RoomsArgs> for FanoutArgs {
    fn from(a: RoomsArgs) -> Self {
        FanoutArgs {
            conn: a.conn,
            corpus: a.corpus,
            conns: a.conns,
            rooms: a.rooms,
            senders: a.senders,
            rate: a.rate,
            duration: a.duration,
            warmup: a.warmup,
            drain: a.drain,
            room_prefix: a.room_prefix,
            secret: a.secret,
            min_delivery_ratio: a.min_delivery_ratio,
        }
    }
}

impl From<SoakArgs> for Plan {
    fn from(a: SoakArgs) -> Self {
        let churn = a.churn.clamp(0.0, 1.0);
        Self {
            scenario: "soak",
            conn: a.conn,
            corpus: a.corpus,
            conns: a.conns,
            rooms: a.rooms,
            senders: a.senders,
            rate: a.rate,
            gift_rate: a.gift_rate.max(0.0),
            gift: a.gift,
            churners: (a.conns as f64 * churn).round() as usize,
            churn_period: secs(a.churn_period).max(Duration::from_millis(100)),
            away: secs(a.away),
            reconnect_share: a.reconnect_share.clamp(0.0, 1.0),
            reconnect_lost: true,
            duration: a.duration,
            warmup: a.warmup,
            drain: a.drain,
            room_prefix: a.room_prefix,
            secret: a.secret,
            min_delivery_ratio: a.min_delivery_ratio,
        }
    }
}

/// Runs `fanout`.
///
/// # Errors
/// Setup errors only (bad URL, token signing); connection failures are in the report.
pub async fn run_fanout(args: FanoutArgs, nofile: u64) -> anyhow::Result<FanoutReport> {
    run(Plan::chat_only("fanout", args), nofile).await
}

/// Runs `rooms`.
///
/// # Errors
/// As [`run_fanout`].
pub async fn run_rooms(args: RoomsArgs, nofile: u64) -> anyhow::Result<FanoutReport> {
    run(Plan::chat_only("rooms", args.into()), nofile).await
}

/// Runs `soak`.
///
/// # Errors
/// As [`run_fanout`].
pub async fn run_soak(args: SoakArgs, nofile: u64) -> anyhow::Result<FanoutReport> {
    run(args.into(), nofile).await
}

/// Where the run is; every connection task follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Warmup,
    /// Sending: from the first instant (when the first chat is due) until the second.
    Sending(tokio::time::Instant, tokio::time::Instant),
    Draining,
    Stopped,
}

/// Counters of churning viewers and reconnections.
#[derive(Default)]
struct ChurnCounters {
    leaves: AtomicU64,
    rejoins: AtomicU64,
    /// Leave/join failures by `op: code` (or `op: timeout`).
    errors: Tally,
    rejoin_latency: ShardedHist,
    reconnects: AtomicU64,
    unplanned_reconnects: AtomicU64,
    reconnect_failures: Tally,
    reconnect_latency: ShardedHist,
    churner_deliveries: AtomicU64,
}

/// State shared by all connection tasks of a run.
struct Shared {
    plan: Plan,
    target: Target,
    tracker: ConnectTracker,
    stamp: ChatStamp,
    /// User ids of this run's senders start with this.
    user_prefix: String,
    rooms: Vec<String>,
    /// Stable members per room (senders and non-churning viewers), from the connect phase.
    members: Vec<AtomicU64>,
    /// Acked chats per room.
    acked: Vec<AtomicU64>,
    /// Acked gifts per room.
    gifts_acked: Vec<AtomicU64>,
    /// Pace of one sender's chats / gifts, and the offsets between senders' first ones.
    sender_period: Duration,
    sender_stagger: Duration,
    gift_period: Duration,
    gift_stagger: Duration,
    sent: AtomicU64,
    acks: AtomicU64,
    errors: Tally,
    gifts_sent: AtomicU64,
    gift_acks: AtomicU64,
    gift_errors: Tally,
    gift_delivered: AtomicU64,
    /// Joined connections lost during the run, by reason.
    lost: Tally,
    /// Connections that joined only after the connect phase was over (closed unused).
    late: AtomicU64,
    /// Connections open right now.
    open: AtomicI64,
    delivered: AtomicU64,
    frames: AtomicU64,
    batch_frames: AtomicU64,
    /// Batch frames that arrived compressed (RSV1), plain, or unknown (`--compress`).
    batch_compressed: AtomicU64,
    batch_plain: AtomicU64,
    batch_unknown: AtomicU64,
    batch_events: AtomicU64,
    foreign_chats: AtomicU64,
    garbage: AtomicU64,
    latency: ShardedHist,
    ack_latency: ShardedHist,
    /// Unix micros of the latest delivery.
    last_delivery_us: AtomicU64,
    churn: ChurnCounters,
}

/// Even pace of one sender for a total `rate` over `senders`: (period, stagger).
fn pace(rate: f64, senders: usize) -> (Duration, Duration) {
    if rate > 0.0 && senders > 0 {
        (
            Duration::from_secs_f64(senders as f64 / rate),
            Duration::from_secs_f64(1.0 / rate),
        )
    } else {
        (Duration::MAX, Duration::ZERO)
    }
}

/// The room of sender `j`: spread evenly when there are fewer senders than rooms
/// (sender j in room j·R/S), round-robin otherwise.
fn sender_room(j: usize, senders: usize, rooms: usize) -> usize {
    if senders >= rooms {
        j % rooms
    } else {
        j * rooms / senders
    }
}

async fn run(plan: Plan, nofile: u64) -> anyhow::Result<FanoutReport> {
    anyhow::ensure!(plan.rooms > 0, "--rooms must be at least 1");
    let scenario = plan.scenario;
    let total = plan.conns + plan.senders;
    plan.conn.check_capacity(total, nofile);
    warn_about_rates(&plan);
    let target = plan.conn.target().await?;
    let watch_usage = UsageWatch::start(plan.conn.pid);
    let run = run_id();
    eprintln!(
        "{scenario}: run {run}: {} viewers ({} churning) + {} senders -> {} ({}{}), {} rooms",
        plan.conns,
        plan.churners,
        plan.senders,
        target.describe(),
        plan.conn.format.as_str(),
        if target.compress() {
            ", permessage-deflate offered"
        } else {
            ""
        },
        plan.rooms
    );
    let minter = Minter::new(&plan.secret, 3600 + plan.duration as u64);
    let user_prefix = format!("lt-{run}-");
    let tokens = (0..plan.senders)
        .map(|j| minter.token(&format!("{user_prefix}s{j}"), &format!("lt sender {j}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (sender_period, sender_stagger) = pace(plan.rate.max(0.0), plan.senders);
    let (gift_period, gift_stagger) = pace(plan.gift_rate, plan.senders);
    let shards = 16;
    let rooms = plan.rooms;
    let counters = |n: usize| (0..n).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
    let sh = Arc::new(Shared {
        target,
        tracker: ConnectTracker::new(total, plan.conn.concurrency),
        stamp: ChatStamp::new(&run),
        user_prefix,
        rooms: (0..rooms)
            .map(|r| format!("{}-{r}", plan.room_prefix))
            .collect(),
        members: counters(rooms),
        acked: counters(rooms),
        gifts_acked: counters(rooms),
        sender_period,
        sender_stagger,
        gift_period,
        gift_stagger,
        sent: AtomicU64::new(0),
        acks: AtomicU64::new(0),
        errors: Tally::default(),
        gifts_sent: AtomicU64::new(0),
        gift_acks: AtomicU64::new(0),
        gift_errors: Tally::default(),
        gift_delivered: AtomicU64::new(0),
        lost: Tally::default(),
        late: AtomicU64::new(0),
        open: AtomicI64::new(0),
        delivered: AtomicU64::new(0),
        frames: AtomicU64::new(0),
        batch_frames: AtomicU64::new(0),
        batch_compressed: AtomicU64::new(0),
        batch_plain: AtomicU64::new(0),
        batch_unknown: AtomicU64::new(0),
        batch_events: AtomicU64::new(0),
        foreign_chats: AtomicU64::new(0),
        garbage: AtomicU64::new(0),
        latency: ShardedHist::new(shards),
        ack_latency: ShardedHist::new(shards),
        last_delivery_us: AtomicU64::new(0),
        churn: ChurnCounters::default(),
        plan,
    });

    // Connect: senders first (they are few), then viewers.
    let (phase_tx, _) = watch::channel(Phase::Connecting);
    let mut tasks = JoinSet::new();
    for (j, token) in tokens.into_iter().enumerate() {
        let member = Member {
            sh: Arc::clone(&sh),
            index: j,
            room: sender_room(j, sh.plan.senders, rooms),
            role: Role::Sender { j, token },
            phase: phase_tx.subscribe(),
        };
        tasks.spawn(member.run());
    }
    for i in 0..sh.plan.conns {
        let member = Member {
            sh: Arc::clone(&sh),
            index: sh.plan.senders + i,
            room: i % rooms,
            role: Role::Viewer {
                churner: i < sh.plan.churners,
            },
            phase: phase_tx.subscribe(),
        };
        tasks.spawn(member.run());
    }
    let progress = spawn_progress(Arc::clone(&sh), phase_tx.subscribe());

    sh.tracker
        .wait_settled(secs(sh.plan.conn.join_timeout))
        .await;
    sh.tracker.close();
    let connect = sh.tracker.summary();
    eprintln!(
        "{scenario}: connect phase over ({} joined, {} failed) after {} s; warming up {} s",
        connect.ok, connect.failed, connect.connect_phase_s, sh.plan.warmup
    );
    let mut interrupted = false;
    if connect.ok > 0 {
        phase_tx.send_replace(Phase::Warmup);
        interrupted = super::sleep_or_interrupt(secs(sh.plan.warmup)).await;
    }

    // Send.
    let members: Vec<u64> = sh.members.iter().map(|m| m.load(Relaxed)).collect();
    let send_start = Instant::now();
    let send_start_us = unix_micros();
    // The measured window: from the first chat to the end of the drain.
    let wire_start = sh.target.wire_bytes_in();
    if connect.ok > 0 && !interrupted {
        let now = tokio::time::Instant::now();
        phase_tx.send_replace(Phase::Sending(now, now + secs(sh.plan.duration)));
        super::sleep_or_interrupt(secs(sh.plan.duration)).await;
    }
    let sending_took = send_start.elapsed();
    phase_tx.send_replace(Phase::Draining);
    super::sleep_or_interrupt(secs(sh.plan.drain)).await;
    let window = Window {
        sending_took,
        send_start_us,
        wire_bytes_in: sh.target.wire_bytes_in().saturating_sub(wire_start),
        chat_events: sh.delivered.load(Relaxed) + sh.churn.churner_deliveries.load(Relaxed),
    };
    phase_tx.send_replace(Phase::Stopped);
    drop(progress);
    let aborted = join_all(&mut tasks, Duration::from_secs(10)).await;
    if aborted > 0 {
        eprintln!("{scenario}: {aborted} connection tasks did not close in time");
    }

    Ok(report(
        &sh,
        run,
        connect,
        &members,
        window,
        watch_usage.finish(),
    ))
}

/// The measured window: from the first chat to the end of the drain.
struct Window {
    /// How long the sending lasted.
    sending_took: Duration,
    /// Unix micros of the first chat.
    send_start_us: u64,
    /// Bytes all connections read from their sockets.
    wire_bytes_in: u64,
    /// Chat events delivered to this run's members (stable ones and churners) by then.
    chat_events: u64,
}

/// Warns about settings that cannot give a clean measurement.
fn warn_about_rates(plan: &Plan) {
    if plan.senders == 0 || plan.rate <= 0.0 {
        eprintln!("warning: no senders or no rate: no chats will be sent");
        return;
    }
    let per_sender = plan.rate / plan.senders as f64;
    if per_sender > 1.0 {
        eprintln!(
            "warning: {per_sender:.2} chats/s per sender exceeds the gateway's per-user chat \
             limit (1/s, burst 5): expect rate_limited errors; use --senders >= {}",
            plan.rate.ceil() as u64
        );
    }
    let gifts_per_sender = plan.gift_rate / plan.senders as f64;
    if gifts_per_sender > 10.0 {
        eprintln!(
            "warning: {gifts_per_sender:.2} gifts/s per sender exceeds the gateway's per-user \
             free-gift limit (10/s, burst 20): expect rate_limited errors"
        );
    }
    if plan.senders < plan.rooms {
        eprintln!(
            "note: {} senders for {} rooms: {} rooms get no chats (their members only \
             receive presence)",
            plan.senders,
            plan.rooms,
            plan.rooms - plan.senders
        );
    }
}

/// The once-a-second progress line.
fn spawn_progress(sh: Arc<Shared>, phase: watch::Receiver<Phase>) -> progress::Progress {
    let mut last = (0_u64, 0_u64, 0_u64, 0_u64, 0_u64);
    progress::spawn(move |elapsed| {
        let p = *phase.borrow();
        let scenario = sh.plan.scenario;
        if p == Phase::Connecting {
            return format!(
                "{scenario}: connecting: {} | {:.0} msgs/s",
                sh.tracker.progress(),
                per_sec(sh.frames.load(Relaxed) - last.4, elapsed)
            );
        }
        let now = (
            sh.sent.load(Relaxed),
            sh.acks.load(Relaxed),
            sh.delivered.load(Relaxed),
            sh.gift_acks.load(Relaxed),
            sh.frames.load(Relaxed),
        );
        let rate = |a: u64, b: u64| per_sec(a.saturating_sub(b), elapsed);
        let mut line = format!(
            "{scenario}: {:?} | conns {} (lost {}) | sent {:.0}/s acked {:.0}/s errors {} | \
             delivered {:.0}/s | {:.0} msgs/s | p99 {} ms",
            PhaseName(p),
            sh.open.load(Relaxed),
            sh.lost.snapshot().values().sum::<u64>(),
            rate(now.0, last.0),
            rate(now.1, last.1),
            sh.errors.snapshot().values().sum::<u64>(),
            rate(now.2, last.2),
            rate(now.4, last.4),
            LatencySummary::of(&sh.latency.snapshot()).p99_ms,
        );
        if sh.plan.gift_rate > 0.0 {
            line.push_str(&format!(" | gifts {:.0}/s", rate(now.3, last.3)));
        }
        if sh.plan.churners > 0 || sh.plan.reconnect_lost {
            let c = &sh.churn;
            line.push_str(&format!(
                " | rejoins {} reconnects {}",
                c.rejoins.load(Relaxed),
                c.reconnects.load(Relaxed) + c.unplanned_reconnects.load(Relaxed)
            ));
        }
        last = now;
        line
    })
}

/// A phase's display name in progress lines.
struct PhaseName(Phase);

impl std::fmt::Debug for PhaseName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Phase::Connecting => "connecting",
            Phase::Warmup => "warmup",
            Phase::Sending(..) => "sending",
            Phase::Draining => "draining",
            Phase::Stopped => "stopped",
        })
    }
}

/// What a connection is for.
enum Role {
    /// Sender number `j` (sends chats and gifts, receives too).
    Sender { j: usize, token: String },
    /// An anonymous viewer; a churner keeps leaving and coming back.
    Viewer { churner: bool },
}

/// One connection task.
struct Member {
    sh: Arc<Shared>,
    /// Connection number (endpoint and source round-robin, histogram shard).
    index: usize,
    room: usize,
    role: Role,
    phase: watch::Receiver<Phase>,
}

/// What a sent op awaits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Chat,
    Gift,
    Leave,
    Join,
}

/// Where a churning (or dropped) connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Churn {
    /// A member of its room.
    Present,
    /// Sent `leave` with this ref.
    Leaving(i64),
    /// Left the room; the connection is open.
    Left,
    /// Sent `join` with this ref at this instant.
    Rejoining(i64, Instant),
    /// No connection (closed on purpose, or dropped by the gateway).
    Closed { planned: bool },
}

/// The per-task state frame handling touches (apart from the connection and tickers).
struct Local {
    next_ref: i64,
    /// Sent ops awaiting `ack`/`joined`/`error`: ref → (what, when sent).
    pending: HashMap<i64, (Pending, Instant)>,
    churn: Churn,
    /// When the churn state machine acts next.
    timer: Option<tokio::time::Instant>,
    /// No chat or gift is sent from this instant on.
    until: Option<tokio::time::Instant>,
    rng: Rng,
    /// A sender's phrases (`--corpus mixed`).
    chatter: Option<Chatter>,
}

type WsResult = Option<Result<Message, tungstenite::Error>>;

impl Member {
    fn token(&self) -> Option<&str> {
        match &self.role {
            Role::Sender { token, .. } => Some(token),
            Role::Viewer { .. } => None,
        }
    }

    fn churner(&self) -> bool {
        matches!(self.role, Role::Viewer { churner: true })
    }

    fn sending(&self) -> bool {
        matches!(*self.phase.borrow(), Phase::Sending(..))
    }

    async fn run(mut self) {
        let sh = Arc::clone(&self.sh);
        let stable = !self.churner();
        let count_member = || {
            if stable {
                sh.members[self.room].fetch_add(1, Relaxed);
            }
        };
        let Some((first, _, in_time)) = sh
            .tracker
            .open_with(
                &sh.target,
                self.index,
                &sh.rooms[self.room],
                self.token(),
                count_member,
            )
            .await
        else {
            return;
        };
        if !in_time {
            // Too late to be counted as a member: measuring it would skew the ratio.
            sh.late.fetch_add(1, Relaxed);
            first.close(Duration::from_secs(1)).await;
            return;
        }
        sh.open.fetch_add(1, Relaxed);
        // The phase may have moved on while connecting: `changed()` reports it at once.
        let mut conn = Some(first);
        let mut chat_ticker: Option<Interval> = None;
        let mut gift_ticker: Option<Interval> = None;
        let mut loc = Local {
            next_ref: 1,
            pending: HashMap::new(),
            churn: Churn::Present,
            timer: None,
            until: None,
            rng: Rng::new(self.index as u64),
            chatter: match &self.role {
                Role::Sender { j, .. } => sh.plan.corpus.chatter(*j),
                Role::Viewer { .. } => None,
            },
        };
        loop {
            let timer_at = loc.timer.unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                msg = async { conn.as_mut().expect("guarded by is_some").recv().await },
                    if conn.is_some() =>
                {
                    let compressed = conn.as_ref().and_then(Conn::last_compressed);
                    if let Err(reason) = self.on_message(msg, compressed, &mut loc)
                        && !self.drop_conn(&mut conn, &mut loc, reason)
                    {
                        return;
                    }
                }
                changed = self.phase.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let phase = *self.phase.borrow_and_update();
                    match phase {
                        Phase::Sending(from, until) => {
                            chat_ticker = self.ticker(from, sh.sender_period, sh.sender_stagger, 0.0);
                            gift_ticker = self.ticker(from, sh.gift_period, sh.gift_stagger, 0.5);
                            loc.until = Some(until);
                            if self.churner() && loc.churn == Churn::Present {
                                let first = sh.plan.churn_period.mul_f64(loc.rng.unit());
                                loc.timer = Some(tokio::time::Instant::now() + first);
                            }
                        }
                        Phase::Draining => {
                            chat_ticker = None;
                            gift_ticker = None;
                            // Pending replies still time out; nobody leaves or comes back.
                            if !matches!(loc.churn, Churn::Leaving(_) | Churn::Rejoining(..)) {
                                loc.timer = None;
                            }
                        }
                        Phase::Stopped => break,
                        Phase::Connecting | Phase::Warmup => {}
                    }
                }
                tick = async { chat_ticker.as_mut().expect("guarded by is_some").tick().await },
                    if chat_ticker.is_some() =>
                {
                    if loc.until.is_some_and(|until| tick >= until) {
                        chat_ticker = None;
                        continue;
                    }
                    if let Some(c) = conn.as_mut()
                        && let Err(e) = self.send_chat(c, &mut loc).await
                        && !self.drop_conn(&mut conn, &mut loc, format!("send: {}", short_ws_error(&e)))
                    {
                        return;
                    }
                }
                tick = async { gift_ticker.as_mut().expect("guarded by is_some").tick().await },
                    if gift_ticker.is_some() =>
                {
                    if loc.until.is_some_and(|until| tick >= until) {
                        gift_ticker = None;
                        continue;
                    }
                    if let Some(c) = conn.as_mut()
                        && let Err(e) = self.send_gift(c, &mut loc).await
                        && !self.drop_conn(&mut conn, &mut loc, format!("send: {}", short_ws_error(&e)))
                    {
                        return;
                    }
                }
                () = tokio::time::sleep_until(timer_at), if loc.timer.is_some() => {
                    loc.timer = None;
                    self.on_timer(&mut conn, &mut loc).await;
                }
            }
        }
        if let Some(c) = conn {
            sh.open.fetch_sub(1, Relaxed);
            c.close(Duration::from_secs(1)).await;
        }
    }

    /// A sender's pace for one kind of op: first at `from` + its stagger (+ `offset`
    /// staggers, so two kinds of op do not go out at the same instant), then every
    /// `period`. `None` for viewers or without a rate.
    fn ticker(
        &self,
        from: tokio::time::Instant,
        period: Duration,
        stagger: Duration,
        offset: f64,
    ) -> Option<Interval> {
        let Role::Sender { j, .. } = &self.role else {
            return None;
        };
        if period == Duration::MAX {
            return None;
        }
        let first = from + stagger * (*j as u32) + stagger.mul_f64(offset);
        let mut ticker = tokio::time::interval_at(first, period);
        // A late tick is sent once, never as a burst that would trip the rate limit.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        Some(ticker)
    }

    /// Records a lost connection; in `soak` schedules its reconnection. False when the
    /// task should end.
    fn drop_conn(&self, conn: &mut Option<Conn>, loc: &mut Local, reason: String) -> bool {
        self.sh.lost.add(reason);
        if conn.take().is_some() {
            self.sh.open.fetch_sub(1, Relaxed);
        }
        loc.pending.clear();
        let active = matches!(*self.phase.borrow(), Phase::Warmup | Phase::Sending(..));
        if !self.sh.plan.reconnect_lost || !active {
            return false;
        }
        loc.churn = Churn::Closed { planned: false };
        loc.timer = Some(tokio::time::Instant::now() + RECONNECT_PAUSE);
        true
    }

    /// The next departure of a churner, if traffic is still on.
    fn schedule_churn(&self, loc: &mut Local) {
        if self.churner() && self.sending() {
            let next = loc.rng.jitter(self.sh.plan.churn_period, 0.5, 1.5);
            loc.timer = Some(tokio::time::Instant::now() + next);
        }
    }

    fn take_ref(loc: &mut Local, what: Pending) -> i64 {
        let r = loc.next_ref;
        loc.next_ref += 1;
        loc.pending.insert(r, (what, Instant::now()));
        r
    }

    /// The churn state machine's timer: depart, come back, or give up waiting.
    async fn on_timer(&self, conn: &mut Option<Conn>, loc: &mut Local) {
        let sh = &self.sh;
        let room = sh.rooms[self.room].as_str();
        let now = tokio::time::Instant::now();
        match loc.churn {
            Churn::Present => {
                if !self.sending() || conn.is_none() {
                    return;
                }
                if loc.rng.unit() < sh.plan.reconnect_share {
                    if let Some(c) = conn.take() {
                        sh.open.fetch_sub(1, Relaxed);
                        c.close(Duration::from_millis(500)).await;
                    }
                    loc.pending.clear();
                    loc.churn = Churn::Closed { planned: true };
                    loc.timer = Some(now + sh.plan.away);
                } else {
                    let reference = Self::take_ref(loc, Pending::Leave);
                    let msg = proto::encode(sh.target.format, &ClientOp::Leave { room, reference });
                    if let Some(c) = conn.as_mut()
                        && let Err(e) = c.send(msg).await
                    {
                        self.drop_conn(conn, loc, format!("send: {}", short_ws_error(&e)));
                        return;
                    }
                    sh.churn.leaves.fetch_add(1, Relaxed);
                    loc.churn = Churn::Leaving(reference);
                    loc.timer = Some(now + REPLY_TIMEOUT);
                }
            }
            Churn::Leaving(reference) => {
                loc.pending.remove(&reference);
                sh.churn.errors.add("leave: timeout");
                loc.churn = Churn::Present;
                self.schedule_churn(loc);
            }
            Churn::Left => {
                if conn.is_none() {
                    return;
                }
                let reference = Self::take_ref(loc, Pending::Join);
                let msg = proto::encode_join(sh.target.format, room, None, reference);
                if let Some(c) = conn.as_mut()
                    && let Err(e) = c.send(msg).await
                {
                    self.drop_conn(conn, loc, format!("send: {}", short_ws_error(&e)));
                    return;
                }
                loc.churn = Churn::Rejoining(reference, Instant::now());
                loc.timer = Some(now + REPLY_TIMEOUT);
            }
            Churn::Rejoining(reference, _) => {
                loc.pending.remove(&reference);
                sh.churn.errors.add("join: timeout");
                loc.churn = Churn::Left;
                if self.sending() {
                    loc.timer = Some(now + sh.plan.away);
                }
            }
            Churn::Closed { planned } => {
                if !matches!(*self.phase.borrow(), Phase::Warmup | Phase::Sending(..)) {
                    return;
                }
                let t0 = Instant::now();
                match sh.target.open(self.index, room, self.token()).await {
                    Ok((c, _)) => {
                        sh.churn
                            .reconnect_latency
                            .shard(self.index)
                            .saturating_record(t0.elapsed().as_micros() as u64);
                        let counter = if planned {
                            &sh.churn.reconnects
                        } else {
                            &sh.churn.unplanned_reconnects
                        };
                        counter.fetch_add(1, Relaxed);
                        sh.open.fetch_add(1, Relaxed);
                        *conn = Some(c);
                        loc.churn = Churn::Present;
                        self.schedule_churn(loc);
                    }
                    Err(failure) => {
                        sh.churn.reconnect_failures.add(failure.to_string());
                        loc.timer = Some(tokio::time::Instant::now() + RECONNECT_PAUSE);
                    }
                }
            }
        }
    }

    async fn send_chat(&self, conn: &mut Conn, loc: &mut Local) -> Result<(), tungstenite::Error> {
        let Role::Sender { j, .. } = &self.role else {
            return Ok(());
        };
        let reference = Self::take_ref(loc, Pending::Chat);
        let mut text = self.sh.stamp.text(*j, reference as u64, unix_micros());
        if let Some(chatter) = loc.chatter.as_mut() {
            corpus::append(&mut text, &chatter.next_text(), corpus::MAX_TEXT_CHARS);
        }
        let msg = proto::encode_chat(
            self.sh.target.format,
            &self.sh.rooms[self.room],
            &text,
            reference,
        );
        self.sh.sent.fetch_add(1, Relaxed);
        conn.send(msg).await
    }

    async fn send_gift(&self, conn: &mut Conn, loc: &mut Local) -> Result<(), tungstenite::Error> {
        let reference = Self::take_ref(loc, Pending::Gift);
        let msg = proto::encode(
            self.sh.target.format,
            &ClientOp::Gift {
                room: &self.sh.rooms[self.room],
                gift: &self.sh.plan.gift,
                count: 1,
                reference,
            },
        );
        self.sh.gifts_sent.fetch_add(1, Relaxed);
        conn.send(msg).await
    }

    /// Handles one read result (`compressed`: whether it arrived so, if known); `Err(reason)`
    /// when the connection is gone.
    fn on_message(
        &self,
        msg: WsResult,
        compressed: Option<bool>,
        loc: &mut Local,
    ) -> Result<(), String> {
        let sh = &self.sh;
        let msg = match msg {
            Some(Ok(msg)) => msg,
            Some(Err(e)) => return Err(format!("read: {}", short_ws_error(&e))),
            None => return Err("stream ended".into()),
        };
        match proto::decode(&msg) {
            Decoded::Frame(frame) => {
                sh.frames.fetch_add(1, Relaxed);
                self.on_frame(frame, compressed, loc);
            }
            Decoded::Garbage(why) => {
                sh.frames.fetch_add(1, Relaxed);
                if sh.garbage.fetch_add(1, Relaxed) == 0 {
                    eprintln!("warning: undecodable frame (reported once): {why}");
                }
            }
            Decoded::Control => {}
            Decoded::Close(code) => {
                let code = code.map_or_else(|| "-".to_string(), |c| c.to_string());
                return Err(format!("closed by server: {code}"));
            }
        }
        Ok(())
    }

    fn on_frame(&self, frame: ServerFrame<'_>, compressed: Option<bool>, loc: &mut Local) {
        let sh = &self.sh;
        match frame.op {
            "batch" => self.on_batch(&frame, compressed),
            "ack" | "joined" => {
                let Some((what, sent)) = frame.reference.and_then(|r| loc.pending.remove(&r))
                else {
                    return;
                };
                match what {
                    Pending::Chat => {
                        sh.acks.fetch_add(1, Relaxed);
                        sh.acked[self.room].fetch_add(1, Relaxed);
                        sh.ack_latency
                            .shard(self.index)
                            .saturating_record(sent.elapsed().as_micros() as u64);
                    }
                    Pending::Gift => {
                        sh.gift_acks.fetch_add(1, Relaxed);
                        sh.gifts_acked[self.room].fetch_add(1, Relaxed);
                    }
                    Pending::Leave => {
                        loc.churn = Churn::Left;
                        if self.sending() {
                            loc.timer = Some(tokio::time::Instant::now() + sh.plan.away);
                        } else {
                            loc.timer = None;
                        }
                    }
                    Pending::Join => {
                        sh.churn.rejoins.fetch_add(1, Relaxed);
                        sh.churn
                            .rejoin_latency
                            .shard(self.index)
                            .saturating_record(sent.elapsed().as_micros() as u64);
                        loc.churn = Churn::Present;
                        loc.timer = None;
                        self.schedule_churn(loc);
                    }
                }
            }
            "error" => {
                let code = frame.code.unwrap_or("?");
                let what = frame
                    .reference
                    .and_then(|r| loc.pending.remove(&r))
                    .map(|(what, _)| what);
                match what {
                    Some(Pending::Chat) | None => sh.errors.add(code),
                    Some(Pending::Gift) => sh.gift_errors.add(code),
                    Some(Pending::Leave) => {
                        sh.churn.errors.add(format!("leave: {code}"));
                        loc.churn = Churn::Present;
                        loc.timer = None;
                        self.schedule_churn(loc);
                    }
                    Some(Pending::Join) => {
                        sh.churn.errors.add(format!("join: {code}"));
                        loc.churn = Churn::Left;
                        loc.timer = self
                            .sending()
                            .then(|| tokio::time::Instant::now() + sh.plan.away);
                    }
                }
            }
            _ => {}
        }
    }

    fn on_batch(&self, frame: &ServerFrame<'_>, compressed: Option<bool>) {
        let sh = &self.sh;
        sh.batch_frames.fetch_add(1, Relaxed);
        if sh.target.compress() {
            match compressed {
                Some(true) => &sh.batch_compressed,
                Some(false) => &sh.batch_plain,
                None => &sh.batch_unknown,
            }
            .fetch_add(1, Relaxed);
        }
        sh.batch_events
            .fetch_add(frame.events.len() as u64, Relaxed);
        let stable = !self.churner();
        let mut now = None;
        let mut hist = None;
        let (mut ours, mut foreign, mut gifts) = (0, 0, 0);
        for ev in &frame.events {
            match ev.kind {
                "chat" => {
                    let sent = ev.text.as_ref().and_then(|t| sh.stamp.sent_at(&t.0));
                    let Some(sent) = sent else {
                        foreign += 1;
                        continue;
                    };
                    ours += 1;
                    if stable {
                        let now = *now.get_or_insert_with(unix_micros);
                        hist.get_or_insert_with(|| sh.latency.shard(self.index))
                            .saturating_record(now.saturating_sub(sent));
                    }
                }
                "gift" => {
                    let ours = ev
                        .user
                        .as_ref()
                        .is_some_and(|u| u.id.0.starts_with(sh.user_prefix.as_str()))
                        && ev.gift.as_ref().is_some_and(|g| g.0 == sh.plan.gift);
                    if ours {
                        gifts += ev.count.unwrap_or(1);
                    }
                }
                _ => {}
            }
        }
        drop(hist);
        if ours > 0 {
            if stable {
                sh.delivered.fetch_add(ours, Relaxed);
                sh.last_delivery_us
                    .fetch_max(now.unwrap_or_default(), Relaxed);
            } else {
                sh.churn.churner_deliveries.fetch_add(ours, Relaxed);
            }
        }
        if gifts > 0 && stable {
            sh.gift_delivered.fetch_add(gifts, Relaxed);
        }
        if foreign > 0 {
            sh.foreign_chats.fetch_add(foreign, Relaxed);
        }
    }
}

/// What the senders' chats got.
#[derive(Debug, Serialize)]
pub struct ChatStats {
    pub sent: u64,
    pub acked: u64,
    /// Errors by code.
    pub errors: BTreeMap<String, u64>,
    /// Neither acked nor refused by the end of the drain.
    pub unanswered: u64,
    /// Chats sent per second over the sending period.
    pub send_rate: f64,
}

/// Delivery of the acked chats to the rooms' stable members.
#[derive(Debug, Serialize)]
pub struct DeliveryStats {
    /// Σ over rooms of acked chats × stable members (senders included).
    pub expected: u64,
    pub delivered: u64,
    /// delivered / expected (0 when nothing was expected).
    pub ratio: f64,
    /// Deliveries per second, from the first chat to the last delivery.
    pub per_s: f64,
}

/// `--compress`: how the permessage-deflate offers went and how the `batch` frames
/// arrived (over the whole run, like `batch_frames`).
#[derive(Debug, Serialize)]
pub struct CompressionStats {
    #[serde(flatten)]
    pub negotiation: DeflateSummary,
    /// Batch frames whose first frame had RSV1 set (compressed by the gateway).
    pub batch_frames_compressed: u64,
    /// Batch frames sent plain (below the gateway's threshold, or not negotiated).
    pub batch_frames_plain: u64,
    /// Batch frames whose RSV1 bit could not be told (a connection that read more than
    /// 1024 messages ahead); normally 0.
    pub batch_frames_unknown: u64,
}

/// Free gifts (soak): sent, acked, and their counts delivered to stable members.
#[derive(Debug, Serialize)]
pub struct GiftStats {
    pub gift: String,
    pub rate: f64,
    pub sent: u64,
    pub acked: u64,
    pub errors: BTreeMap<String, u64>,
    /// Σ over rooms of acked gifts × stable members.
    pub expected: u64,
    /// Σ of the `count` of this run's gift events received by stable members.
    pub delivered: u64,
    pub ratio: f64,
}

/// Churning viewers and reconnections (soak).
#[derive(Debug, Serialize)]
pub struct ChurnStats {
    /// Viewers that kept leaving and rejoining (not in the delivery ratio).
    pub churners: usize,
    pub leaves: u64,
    pub rejoins: u64,
    /// `leave` sent to `joined` on the way back.
    pub rejoin_latency: LatencySummary,
    /// Planned reconnections (closed on purpose, reconnected and joined).
    pub reconnects: u64,
    /// Reconnections of connections the gateway dropped.
    pub unplanned_reconnects: u64,
    pub reconnect_failures: BTreeMap<String, u64>,
    /// Connect start to `joined`, for every reconnection.
    pub reconnect_latency: LatencySummary,
    /// Leave/join errors by `op: code`.
    pub errors: BTreeMap<String, u64>,
    /// This run's chats received by churning viewers.
    pub churner_deliveries: u64,
}

#[derive(Debug, Serialize)]
pub struct FanoutReport {
    /// `fanout`, `rooms` or `soak`.
    pub scenario: &'static str,
    pub url: String,
    pub format: Format,
    pub run_id: String,
    pub receivers: usize,
    pub senders: usize,
    pub rooms: usize,
    pub rate: f64,
    pub duration_s: f64,
    pub connect: ConnectSummary,
    /// Joined after the connect phase's deadline; closed without taking part.
    pub late_joined: u64,
    /// Joined connections lost during the run, by reason.
    pub lost: BTreeMap<String, u64>,
    pub chats: ChatStats,
    /// Chat sent to its `ack`.
    pub ack_latency: LatencySummary,
    pub deliveries: DeliveryStats,
    /// Chat sent (stamp in its text) to received in a `batch`, over all deliveries.
    pub latency: LatencySummary,
    pub frames_received: u64,
    pub batch_frames: u64,
    pub batch_events: u64,
    /// Chat events that were not this run's (other clients, earlier runs).
    pub foreign_chat_events: u64,
    pub undecodable_frames: u64,
    /// Chat texts: `stamp` alone, or stamp + a `mixed` corpus phrase.
    pub corpus: CorpusKind,
    /// Bytes all connections (viewers and senders) read from their TCP sockets from the
    /// first chat to the end of the drain: frames as on the wire (headers, control frames,
    /// compressed or not) of everything the gateway sent, acks and presence included.
    pub wire_bytes_in: u64,
    /// `wire_bytes_in` / this run's chat events delivered in that window (to stable
    /// members and churners): what one delivered chat cost on the wire; 0 if none.
    pub wire_bytes_per_delivered_event: f64,
    /// `--compress` only: the negotiation and how batch frames arrived.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<CompressionStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gifts: Option<GiftStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub churn: Option<ChurnStats>,
    pub min_delivery_ratio: f64,
    /// `delivery` is the chat delivery ratio, latencies the delivery latency.
    pub slo: Vec<SloCheck>,
    /// CPU and memory of the gateway (`--pid`) and of the tool over the run.
    pub usage: Usage,
    pub passed: bool,
}

fn ratio(num: u64, den: u64) -> f64 {
    if den > 0 {
        ((num as f64 / den as f64) * 1e6).round() / 1e6
    } else {
        0.0
    }
}

fn report(
    sh: &Shared,
    run_id: String,
    connect: ConnectSummary,
    members: &[u64],
    window: Window,
    usage: Usage,
) -> FanoutReport {
    let plan = &sh.plan;
    let expected_for = |acked: &[AtomicU64]| -> u64 {
        acked
            .iter()
            .zip(members)
            .map(|(acked, m)| acked.load(Relaxed) * m)
            .sum()
    };
    let expected = expected_for(&sh.acked);
    let delivered = sh.delivered.load(Relaxed);
    let delivery_ratio = ratio(delivered, expected);
    let last_us = sh.last_delivery_us.load(Relaxed);
    let delivering = Duration::from_micros(last_us.saturating_sub(window.send_start_us));
    let errors = sh.errors.snapshot();
    let sent = sh.sent.load(Relaxed);
    let acked = sh.acks.load(Relaxed);
    let refused: u64 = errors.values().sum();
    let latency = LatencySummary::of(&sh.latency.snapshot());
    let slo = plan
        .conn
        .slo
        .slo()
        .evaluate((expected > 0).then_some(delivery_ratio), &latency);
    let ratio_ok = plan.min_delivery_ratio <= 0.0
        || (expected > 0 && delivery_ratio >= plan.min_delivery_ratio);
    let gifts = (plan.gift_rate > 0.0).then(|| {
        let expected = expected_for(&sh.gifts_acked);
        let delivered = sh.gift_delivered.load(Relaxed);
        GiftStats {
            gift: plan.gift.clone(),
            rate: plan.gift_rate,
            sent: sh.gifts_sent.load(Relaxed),
            acked: sh.gift_acks.load(Relaxed),
            errors: sh.gift_errors.snapshot(),
            expected,
            delivered,
            ratio: ratio(delivered, expected),
        }
    });
    let churn = (plan.churners > 0 || plan.reconnect_lost).then(|| {
        let c = &sh.churn;
        ChurnStats {
            churners: plan.churners,
            leaves: c.leaves.load(Relaxed),
            rejoins: c.rejoins.load(Relaxed),
            rejoin_latency: LatencySummary::of(&c.rejoin_latency.snapshot()),
            reconnects: c.reconnects.load(Relaxed),
            unplanned_reconnects: c.unplanned_reconnects.load(Relaxed),
            reconnect_failures: c.reconnect_failures.snapshot(),
            reconnect_latency: LatencySummary::of(&c.reconnect_latency.snapshot()),
            errors: c.errors.snapshot(),
            churner_deliveries: c.churner_deliveries.load(Relaxed),
        }
    });
    let passed = ratio_ok && slo::all_met(&slo);
    let compression = sh
        .target
        .deflate_summary()
        .map(|negotiation| CompressionStats {
            negotiation,
            batch_frames_compressed: sh.batch_compressed.load(Relaxed),
            batch_frames_plain: sh.batch_plain.load(Relaxed),
            batch_frames_unknown: sh.batch_unknown.load(Relaxed),
        });
    FanoutReport {
        scenario: plan.scenario,
        url: plan.conn.url(),
        format: plan.conn.format,
        run_id,
        receivers: plan.conns,
        senders: plan.senders,
        rooms: plan.rooms,
        rate: plan.rate,
        duration_s: plan.duration,
        connect,
        late_joined: sh.late.load(Relaxed),
        lost: sh.lost.snapshot(),
        chats: ChatStats {
            sent,
            acked,
            unanswered: sent.saturating_sub(acked + refused),
            errors,
            send_rate: round3(per_sec(sent, window.sending_took)),
        },
        ack_latency: LatencySummary::of(&sh.ack_latency.snapshot()),
        deliveries: DeliveryStats {
            expected,
            delivered,
            ratio: delivery_ratio,
            per_s: round3(per_sec(delivered, delivering)),
        },
        latency,
        frames_received: sh.frames.load(Relaxed),
        batch_frames: sh.batch_frames.load(Relaxed),
        batch_events: sh.batch_events.load(Relaxed),
        foreign_chat_events: sh.foreign_chats.load(Relaxed),
        undecodable_frames: sh.garbage.load(Relaxed),
        corpus: plan.corpus.corpus,
        wire_bytes_in: window.wire_bytes_in,
        wire_bytes_per_delivered_event: if window.chat_events > 0 {
            round3(window.wire_bytes_in as f64 / window.chat_events as f64)
        } else {
            0.0
        },
        compression,
        gifts,
        churn,
        min_delivery_ratio: plan.min_delivery_ratio,
        slo,
        usage,
        passed,
    }
}

impl Report for FanoutReport {
    fn passed(&self) -> bool {
        self.passed
    }

    fn human(&self) -> String {
        let mut t = Table::default();
        let viewers = if self.scenario == "soak" {
            "viewers"
        } else {
            "receivers"
        };
        t.section(&format!(
            "{}: {} {viewers} + {} senders over {} rooms at {} ({}), {} chats/s for {} s",
            self.scenario,
            self.receivers,
            self.senders,
            self.rooms,
            self.url,
            self.format.as_str(),
            self.rate,
            self.duration_s
        ));
        t.section("connections");
        self.connect.rows(&mut t);
        t.row("late joined", self.late_joined)
            .tally("lost during run", &self.lost);
        t.section("chats");
        t.row("sent", self.chats.sent)
            .row("send rate", format!("{} /s", self.chats.send_rate))
            .row("acked", self.chats.acked)
            .row("unanswered", self.chats.unanswered)
            .tally("errors", &self.chats.errors)
            .row("ack latency", self.ack_latency.line());
        t.section(if self.churn.is_some() {
            "deliveries (stable members)"
        } else {
            "deliveries"
        });
        t.row("expected", self.deliveries.expected)
            .row("delivered", self.deliveries.delivered)
            .row("ratio", format!("{:.6}", self.deliveries.ratio))
            .row("deliveries/s", self.deliveries.per_s)
            .row("latency", self.latency.line())
            .row("frames received", self.frames_received)
            .row("batch frames", self.batch_frames)
            .row("batch events", self.batch_events)
            .row("foreign chat events", self.foreign_chat_events)
            .row("undecodable frames", self.undecodable_frames);
        t.section(&format!(
            "wire (first chat to end of drain; corpus {})",
            match self.corpus {
                CorpusKind::Stamp => "stamp",
                CorpusKind::Mixed => "mixed",
            }
        ));
        t.row("wire bytes in", self.wire_bytes_in).row(
            "wire bytes/delivered",
            format!("{} B per chat event", self.wire_bytes_per_delivered_event),
        );
        if let Some(c) = &self.compression {
            t.section("compression (permessage-deflate offered)");
            t.row(
                "negotiated",
                format!(
                    "{} of {} upgrades",
                    c.negotiation.negotiated, c.negotiation.offered
                ),
            )
            .row("agreed", c.negotiation.agreed.as_deref().unwrap_or("-"))
            .row("batch frames compressed", c.batch_frames_compressed)
            .row("batch frames plain", c.batch_frames_plain);
            if c.batch_frames_unknown > 0 {
                t.row("batch frames unknown", c.batch_frames_unknown);
            }
        }
        if let Some(g) = &self.gifts {
            t.section(&format!("gifts ({}, {} /s)", g.gift, g.rate));
            t.row("sent", g.sent)
                .row("acked", g.acked)
                .tally("errors", &g.errors)
                .row("expected (counts)", g.expected)
                .row("delivered (counts)", g.delivered)
                .row("ratio", format!("{:.6}", g.ratio));
        }
        if let Some(c) = &self.churn {
            t.section("churn and reconnects");
            t.row("churning viewers", c.churners)
                .row("leaves", c.leaves)
                .row("rejoins", c.rejoins)
                .row("rejoin latency", c.rejoin_latency.line())
                .row("reconnects (planned)", c.reconnects)
                .row("reconnects (dropped)", c.unplanned_reconnects)
                .tally("reconnect failures", &c.reconnect_failures)
                .row("reconnect latency", c.reconnect_latency.line())
                .tally("leave/join errors", &c.errors)
                .row("churner deliveries", c.churner_deliveries);
        }
        slo::rows(&mut t, &self.slo, "delivery ratio", "delivery latency");
        let mut verdict = if self.passed { "PASS" } else { "FAIL" }.to_string();
        if self.min_delivery_ratio > 0.0 {
            let cmp = if self.deliveries.ratio >= self.min_delivery_ratio {
                ">="
            } else {
                "<"
            };
            verdict.push_str(&format!(" (ratio {cmp} {})", self.min_delivery_ratio));
        } else if self.slo.is_empty() {
            verdict.push_str(" (no --min-delivery-ratio or --slo)");
        }
        self.usage.rows(&mut t);
        t.row("result", verdict);
        t.finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use clap::Parser;
    use futures_util::SinkExt;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use yawc::{OpCode, Options, Role};

    use super::*;
    use crate::client::read_response_head;

    /// What a mock member's outbox carries.
    type Outbox = UnboundedSender<String>;

    /// A gateway reduced to what `fanout` needs, on yawc's server side: the upgrade (agreeing
    /// permessage-deflate as the gateway does when offered, compressing frames of 100
    /// bytes and more), `hello`, `joined` into the URL's room, and for each `chat` an `ack`
    /// and a `batch` with the chat to every member of the room.
    async fn mock_gateway() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        let rooms: Arc<Mutex<HashMap<String, Vec<Outbox>>>> = Arc::default();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(mock_member(tcp, Arc::clone(&rooms)));
            }
        });
        url
    }

    async fn mock_member(
        mut tcp: tokio::net::TcpStream,
        rooms: Arc<Mutex<HashMap<String, Vec<Outbox>>>>,
    ) {
        let Ok((head, _)) = read_response_head(&mut tcp).await else {
            return;
        };
        let head = String::from_utf8_lossy(&head).into_owned();
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
        };
        let key = header("sec-websocket-key").unwrap_or_default();
        let agreed = header("sec-websocket-extensions")
            .filter(|e| e.starts_with("permessage-deflate"))
            .map(|_| "permessage-deflate; server_no_context_takeover; client_no_context_takeover");
        let room = head
            .split(['?', '&', ' '])
            .find_map(|p| p.strip_prefix("room="))
            .unwrap_or_default()
            .to_string();
        let mut answer = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n",
            derive_accept_key(key.as_bytes())
        );
        if let Some(a) = agreed {
            answer.push_str(&format!("Sec-WebSocket-Extensions: {a}\r\n"));
        }
        answer.push_str("\r\n");
        if tcp.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        let options = Options::default()
            .with_low_latency_compression()
            .with_compression_threshold(100);
        let Ok(mut ws) =
            yawc::WebSocket::from_stream_with_extensions(tcp, Role::Server, agreed, options)
        else {
            return;
        };
        let (tx, mut rx) = unbounded_channel();
        let online = {
            let mut rooms = rooms.lock().unwrap();
            let members = rooms.entry(room.clone()).or_default();
            members.push(tx.clone());
            members.len()
        };
        let _ = tx.send(r#"{"op":"hello","conn":"c","node":"n","user":null}"#.to_string());
        let _ = tx.send(format!(
            r#"{{"op":"joined","room":"{room}","online":{online},"history":[]}}"#
        ));
        loop {
            tokio::select! {
                out = rx.recv() => {
                    let Some(text) = out else { return };
                    if ws.send(yawc::Frame::text(text)).await.is_err() {
                        return;
                    }
                }
                frame = ws.next_frame() => {
                    let Ok(frame) = frame else { return };
                    if frame.opcode() != OpCode::Text {
                        continue;
                    }
                    let op: serde_json::Value =
                        serde_json::from_str(frame.as_str()).unwrap_or_default();
                    if op["op"] != "chat" {
                        continue;
                    }
                    let _ = tx.send(serde_json::json!({"op":"ack","ref":op["ref"]}).to_string());
                    let batch = serde_json::json!({"op":"batch","room":room,"events":[
                        {"id":"m-1","ts":1,"type":"chat","user":{"id":"u","name":"n"},
                         "text":op["text"]}]})
                    .to_string();
                    for member in rooms.lock().unwrap().get(&room).into_iter().flatten() {
                        let _ = member.send(batch.clone());
                    }
                }
            }
        }
    }

    #[derive(Parser)]
    struct FanoutCli {
        #[command(flatten)]
        args: FanoutArgs,
    }

    async fn fanout(url: &str, extra: &[&str]) -> FanoutReport {
        let mut argv = vec![
            "fanout",
            "--target",
            url,
            "--conns",
            "6",
            "--rooms",
            "2",
            "--senders",
            "2",
            "--rate",
            "2",
            "--duration",
            "1.5",
            "--warmup",
            "0.2",
            "--drain",
            "0.5",
            "--corpus",
            "mixed",
        ];
        argv.extend_from_slice(extra);
        let args = FanoutCli::try_parse_from(argv).unwrap().args;
        run_fanout(args, 1024).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compressed_fanout_reports_wire_bytes_and_compressed_batches() {
        let url = mock_gateway().await;
        let r = fanout(&url, &["--compress"]).await;
        assert!(r.connect.all_joined, "{:?}", r.connect.failures);
        assert!(r.deliveries.expected > 0);
        assert_eq!(r.deliveries.delivered, r.deliveries.expected);
        assert_eq!(r.corpus, CorpusKind::Mixed);
        assert!(r.wire_bytes_in > 0 && r.wire_bytes_per_delivered_event > 0.0);
        let c = r.compression.as_ref().unwrap();
        assert_eq!((c.negotiation.offered, c.negotiation.negotiated), (8, 8));
        // Every batch carries a ~150-byte chat event: all above the mock's threshold.
        assert_eq!(c.batch_frames_compressed, r.batch_frames);
        assert_eq!((c.batch_frames_plain, c.batch_frames_unknown), (0, 0));
        let json = serde_json::to_value(&r).unwrap();
        assert!(json["wire_bytes_in"].as_u64().unwrap() > 0);
        assert_eq!(json["compression"]["negotiated"], 8);
        let table = r.human();
        assert!(
            table.contains("wire bytes/delivered") && table.contains("batch frames compressed")
        );

        let plain = fanout(&url, &[]).await;
        assert_eq!(plain.deliveries.delivered, plain.deliveries.expected);
        assert!(plain.compression.is_none() && plain.wire_bytes_in > 0);
        let json = serde_json::to_value(&plain).unwrap();
        assert!(
            json.get("compression").is_none()
                && json["wire_bytes_per_delivered_event"].as_f64().unwrap() > 0.0
        );
    }

    #[test]
    fn senders_spread_over_rooms() {
        let rooms: Vec<usize> = (0..4).map(|j| sender_room(j, 4, 10)).collect();
        assert_eq!(rooms, [0, 2, 5, 7]);
        let rooms: Vec<usize> = (0..6).map(|j| sender_room(j, 6, 3)).collect();
        assert_eq!(rooms, [0, 1, 2, 0, 1, 2]);
        let (period, stagger) = pace(100.0, 100);
        assert_eq!(
            (period, stagger),
            (Duration::from_secs(1), Duration::from_millis(10))
        );
        assert_eq!(pace(0.0, 10).0, Duration::MAX);
    }
}
