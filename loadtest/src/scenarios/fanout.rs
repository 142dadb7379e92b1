//! `fanout`: end-to-end chat delivery under load.
//!
//! N anonymous receivers spread over R rooms (`<prefix>-0 .. <prefix>-R-1`) plus S
//! authenticated senders, sender `j` a member of room `j % R`. Once everyone has joined
//! and a warm-up has passed, the senders send chats at a total `--rate`, each sender an
//! equal share at an even pace (the gateway limits a user to about 1 chat/s). Each chat's
//! text carries its send time (see [`ChatStamp`]); every member (senders too: a client
//! sees its own chat in the room's `batch`) records `now - sent` per delivered chat.
//!
//! After `--duration` the senders stop, the run waits `--drain` for the last batches,
//! and reports: expected deliveries (acked chats × members of their room), delivered,
//! the ratio, delivery latency percentiles, and the acks/errors the senders got.
//!
//! Timeline, driven by a `watch` channel every connection task follows:
//! `Connecting → Warmup → Sending → Draining → Stopped`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;

use super::{ConnArgs, ConnectSummary, ConnectTracker, join_all, run_id, secs};
use crate::auth::Minter;
use crate::client::{Conn, Target, short_ws_error};
use crate::progress::{self, per_sec};
use crate::proto::{self, ChatStamp, Decoded, Format, ServerFrame};
use crate::report::{LatencySummary, Report, ShardedHist, Table, Tally, round3, unix_micros};

#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Receivers (anonymous, read-only), spread round-robin over the rooms.
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// Rooms: <room-prefix>-0 .. <room-prefix>-(R-1).
    #[arg(long, default_value_t = 10)]
    pub rooms: usize,
    /// Authenticated senders (distinct users), sender j in room j % rooms.
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
    /// Fail (exit 1) when delivered / expected is below this (0 = never fail).
    #[arg(long, default_value_t = 0.0)]
    pub min_delivery_ratio: f64,
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

/// State shared by all connection tasks of a run.
struct Shared {
    target: Target,
    tracker: ConnectTracker,
    stamp: ChatStamp,
    rooms: Vec<String>,
    /// Joined members per room (receivers and senders).
    members: Vec<AtomicU64>,
    /// Acked chats per room.
    acked: Vec<AtomicU64>,
    /// Pace of one sender, and the offset between consecutive senders' first chats.
    sender_period: Duration,
    sender_stagger: Duration,
    sent: AtomicU64,
    acks: AtomicU64,
    errors: Tally,
    /// Joined connections lost during the run, by reason.
    lost: Tally,
    /// Connections that joined only after the connect phase was over (closed unused).
    late: AtomicU64,
    delivered: AtomicU64,
    frames: AtomicU64,
    batch_frames: AtomicU64,
    batch_events: AtomicU64,
    foreign_chats: AtomicU64,
    garbage: AtomicU64,
    latency: ShardedHist,
    ack_latency: ShardedHist,
    /// Unix micros of the latest delivery.
    last_delivery_us: AtomicU64,
}

/// Runs the scenario.
///
/// # Errors
/// Setup errors only (bad URL, token signing); connection failures are in the report.
pub async fn run(args: FanoutArgs, nofile: u64) -> anyhow::Result<FanoutReport> {
    anyhow::ensure!(args.rooms > 0, "--rooms must be at least 1");
    let total = args.conns + args.senders;
    args.conn.check_capacity(total, nofile);
    warn_about_rates(&args);
    let target = args.conn.target().await?;
    let run = run_id();
    eprintln!(
        "fanout: run {run}: {} receivers + {} senders -> {} ({}), {} rooms",
        args.conns,
        args.senders,
        target.server(),
        args.conn.format.as_str(),
        args.rooms
    );
    let minter = Minter::new(&args.secret, 3600);
    let tokens = (0..args.senders)
        .map(|j| minter.token(&format!("lt-{run}-s{j}"), &format!("lt sender {j}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rate = args.rate.max(0.0);
    let (sender_period, sender_stagger) = if rate > 0.0 {
        (
            Duration::from_secs_f64(args.senders.max(1) as f64 / rate),
            Duration::from_secs_f64(1.0 / rate),
        )
    } else {
        (Duration::MAX, Duration::ZERO)
    };
    let shards = 16;
    let sh = Arc::new(Shared {
        target,
        tracker: ConnectTracker::new(total, args.conn.concurrency),
        stamp: ChatStamp::new(&run),
        rooms: (0..args.rooms)
            .map(|r| format!("{}-{r}", args.room_prefix))
            .collect(),
        members: (0..args.rooms).map(|_| AtomicU64::new(0)).collect(),
        acked: (0..args.rooms).map(|_| AtomicU64::new(0)).collect(),
        sender_period,
        sender_stagger,
        sent: AtomicU64::new(0),
        acks: AtomicU64::new(0),
        errors: Tally::default(),
        lost: Tally::default(),
        late: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        frames: AtomicU64::new(0),
        batch_frames: AtomicU64::new(0),
        batch_events: AtomicU64::new(0),
        foreign_chats: AtomicU64::new(0),
        garbage: AtomicU64::new(0),
        latency: ShardedHist::new(shards),
        ack_latency: ShardedHist::new(shards),
        last_delivery_us: AtomicU64::new(0),
    });

    // Connect: senders first (they are few), then receivers.
    let (phase_tx, _) = watch::channel(Phase::Connecting);
    let mut tasks = JoinSet::new();
    for (j, token) in tokens.into_iter().enumerate() {
        let member = Member {
            sh: Arc::clone(&sh),
            index: j,
            room: j % args.rooms,
            sender: Some((j, token)),
            phase: phase_tx.subscribe(),
        };
        tasks.spawn(member.run());
    }
    for i in 0..args.conns {
        let member = Member {
            sh: Arc::clone(&sh),
            index: args.senders + i,
            room: i % args.rooms,
            sender: None,
            phase: phase_tx.subscribe(),
        };
        tasks.spawn(member.run());
    }
    let progress = spawn_progress(Arc::clone(&sh), phase_tx.subscribe());

    sh.tracker.wait_settled(secs(args.conn.join_timeout)).await;
    let connect = sh.tracker.summary();
    eprintln!(
        "fanout: connect phase over ({} joined, {} failed) after {} s; warming up {} s",
        connect.ok, connect.failed, connect.connect_phase_s, args.warmup
    );
    let mut interrupted = false;
    if connect.ok > 0 {
        phase_tx.send_replace(Phase::Warmup);
        interrupted = super::sleep_or_interrupt(secs(args.warmup)).await;
    }

    // Send.
    let members: Vec<u64> = sh.members.iter().map(|m| m.load(Relaxed)).collect();
    let send_start = Instant::now();
    let send_start_us = unix_micros();
    if connect.ok > 0 && !interrupted {
        let now = tokio::time::Instant::now();
        phase_tx.send_replace(Phase::Sending(now, now + secs(args.duration)));
        super::sleep_or_interrupt(secs(args.duration)).await;
    }
    let sending_took = send_start.elapsed();
    phase_tx.send_replace(Phase::Draining);
    super::sleep_or_interrupt(secs(args.drain)).await;
    phase_tx.send_replace(Phase::Stopped);
    drop(progress);
    let aborted = join_all(&mut tasks, Duration::from_secs(10)).await;
    if aborted > 0 {
        eprintln!("fanout: {aborted} connection tasks did not close in time");
    }

    Ok(report(
        &args,
        &sh,
        run,
        connect,
        &members,
        sending_took,
        send_start_us,
    ))
}

/// Warns about settings that cannot give a clean measurement.
fn warn_about_rates(args: &FanoutArgs) {
    if args.senders == 0 || args.rate <= 0.0 {
        eprintln!("warning: no senders or no rate: no chats will be sent");
        return;
    }
    let per_sender = args.rate / args.senders as f64;
    if per_sender > 1.0 {
        eprintln!(
            "warning: {per_sender:.2} chats/s per sender exceeds the gateway's per-user chat \
             limit (1/s, burst 5): expect rate_limited errors; use --senders >= {}",
            args.rate.ceil() as u64
        );
    }
    if args.senders < args.rooms {
        eprintln!(
            "warning: {} senders for {} rooms: {} rooms get no chats",
            args.senders,
            args.rooms,
            args.rooms - args.senders
        );
    }
}

/// The once-a-second progress line.
fn spawn_progress(sh: Arc<Shared>, phase: watch::Receiver<Phase>) -> progress::Progress {
    let mut last = (0_u64, 0_u64, 0_u64);
    progress::spawn(move |elapsed| {
        let p = *phase.borrow();
        if p == Phase::Connecting {
            return format!("fanout: connecting: {}", sh.tracker.progress());
        }
        let now = (
            sh.sent.load(Relaxed),
            sh.acks.load(Relaxed),
            sh.delivered.load(Relaxed),
        );
        let rate = |a: u64, b: u64| per_sec(a - b, elapsed);
        let line = format!(
            "fanout: {:?} | conns {} (lost {}) | sent {:.0}/s acked {:.0}/s errors {} | \
             delivered {:.0}/s | p99 {} ms",
            PhaseName(p),
            sh.tracker.joined(),
            sh.lost.snapshot().values().sum::<u64>(),
            rate(now.0, last.0),
            rate(now.1, last.1),
            sh.errors.snapshot().values().sum::<u64>(),
            rate(now.2, last.2),
            LatencySummary::of(&sh.latency.snapshot()).p99_ms,
        );
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

/// One connection: a receiver, or a sender (which receives too).
struct Member {
    sh: Arc<Shared>,
    /// Connection number (source address round-robin, histogram shard).
    index: usize,
    room: usize,
    /// For a sender: its number and token.
    sender: Option<(usize, String)>,
    phase: watch::Receiver<Phase>,
}

/// A sender's state while its connection lives.
#[derive(Default)]
struct Outbox {
    ticker: Option<Interval>,
    /// No chat is sent from this instant on.
    until: Option<tokio::time::Instant>,
    seq: u64,
    /// Sent chats awaiting `ack`/`error`: ref → when sent.
    pending: HashMap<i64, Instant>,
}

impl Member {
    async fn run(mut self) {
        let sh = Arc::clone(&self.sh);
        let token = self.sender.as_ref().map(|(_, t)| t.as_str());
        let Some((mut conn, _)) = sh
            .tracker
            .open(&sh.target, self.index, &sh.rooms[self.room], token)
            .await
        else {
            return;
        };
        if *self.phase.borrow_and_update() != Phase::Connecting {
            // Too late to be counted as a member: measuring it would skew the ratio.
            sh.late.fetch_add(1, Relaxed);
            conn.close(Duration::from_secs(1)).await;
            return;
        }
        sh.members[self.room].fetch_add(1, Relaxed);
        let mut out = Outbox::default();
        loop {
            tokio::select! {
                msg = conn.recv() => {
                    if !self.on_message(msg, &mut out) {
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
                            self.start_sending(from, &mut out);
                            out.until = Some(until);
                        }
                        Phase::Draining => out.ticker = None,
                        Phase::Stopped => break,
                        Phase::Connecting | Phase::Warmup => {}
                    }
                }
                tick = async { out.ticker.as_mut().expect("guarded by is_some").tick().await },
                    if out.ticker.is_some() =>
                {
                    if out.until.is_some_and(|until| tick >= until) {
                        out.ticker = None;
                        continue;
                    }
                    if let Err(e) = self.send_chat(&mut conn, &mut out).await {
                        sh.lost.add(format!("send: {}", short_ws_error(&e)));
                        return;
                    }
                }
            }
        }
        conn.close(Duration::from_secs(1)).await;
    }

    /// Starts this sender's pace: first chat at `at` + its stagger, then every period.
    fn start_sending(&self, at: tokio::time::Instant, out: &mut Outbox) {
        let Some((j, _)) = &self.sender else { return };
        if self.sh.sender_period == Duration::MAX {
            return;
        }
        let first = at + self.sh.sender_stagger * (*j as u32);
        let mut ticker = tokio::time::interval_at(first, self.sh.sender_period);
        // A late tick is sent once, never as a burst that would trip the rate limit.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        out.ticker = Some(ticker);
    }

    async fn send_chat(
        &self,
        conn: &mut Conn,
        out: &mut Outbox,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        let Some((j, _)) = &self.sender else {
            return Ok(());
        };
        out.seq += 1;
        let reference = out.seq as i64;
        let text = self.sh.stamp.text(*j, out.seq, unix_micros());
        let msg = proto::encode_chat(
            self.sh.target.format,
            &self.sh.rooms[self.room],
            &text,
            reference,
        );
        out.pending.insert(reference, Instant::now());
        self.sh.sent.fetch_add(1, Relaxed);
        conn.send(msg).await
    }

    /// Handles one read result; false when the connection is gone.
    fn on_message(
        &self,
        msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
        out: &mut Outbox,
    ) -> bool {
        let sh = &self.sh;
        let msg = match msg {
            Some(Ok(msg)) => msg,
            Some(Err(e)) => {
                sh.lost.add(format!("read: {}", short_ws_error(&e)));
                return false;
            }
            None => {
                sh.lost.add("stream ended");
                return false;
            }
        };
        match proto::decode(&msg) {
            Decoded::Frame(frame) => {
                sh.frames.fetch_add(1, Relaxed);
                self.on_frame(frame, out);
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
                sh.lost.add(format!("closed by server: {code}"));
                return false;
            }
        }
        true
    }

    fn on_frame(&self, frame: ServerFrame<'_>, out: &mut Outbox) {
        let sh = &self.sh;
        match frame.op {
            "batch" => {
                sh.batch_frames.fetch_add(1, Relaxed);
                sh.batch_events
                    .fetch_add(frame.events.len() as u64, Relaxed);
                let mut now = None;
                let mut hist = None;
                let (mut ours, mut foreign) = (0, 0);
                for ev in frame.events.iter().filter(|e| e.kind == "chat") {
                    let sent = ev.text.as_ref().and_then(|t| sh.stamp.sent_at(&t.0));
                    let Some(sent) = sent else {
                        foreign += 1;
                        continue;
                    };
                    let now = *now.get_or_insert_with(unix_micros);
                    hist.get_or_insert_with(|| sh.latency.shard(self.index))
                        .saturating_record(now.saturating_sub(sent));
                    ours += 1;
                }
                drop(hist);
                if ours > 0 {
                    sh.delivered.fetch_add(ours, Relaxed);
                    sh.last_delivery_us
                        .fetch_max(now.unwrap_or_default(), Relaxed);
                }
                if foreign > 0 {
                    sh.foreign_chats.fetch_add(foreign, Relaxed);
                }
            }
            "ack" => {
                if let Some(sent) = frame.reference.and_then(|r| out.pending.remove(&r)) {
                    sh.acks.fetch_add(1, Relaxed);
                    sh.acked[self.room].fetch_add(1, Relaxed);
                    sh.ack_latency
                        .shard(self.index)
                        .saturating_record(sent.elapsed().as_micros() as u64);
                }
            }
            "error" => {
                sh.errors.add(frame.code.unwrap_or("?"));
                if let Some(r) = frame.reference {
                    out.pending.remove(&r);
                }
            }
            _ => {}
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

/// Delivery of the acked chats to the rooms' members.
#[derive(Debug, Serialize)]
pub struct DeliveryStats {
    /// Σ over rooms of acked chats × members (senders included).
    pub expected: u64,
    pub delivered: u64,
    /// delivered / expected (0 when nothing was expected).
    pub ratio: f64,
    /// Deliveries per second, from the first chat to the last delivery.
    pub per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct FanoutReport {
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
    pub min_delivery_ratio: f64,
    pub passed: bool,
}

fn report(
    args: &FanoutArgs,
    sh: &Shared,
    run_id: String,
    connect: ConnectSummary,
    members: &[u64],
    sending_took: Duration,
    send_start_us: u64,
) -> FanoutReport {
    let expected: u64 = sh
        .acked
        .iter()
        .zip(members)
        .map(|(acked, m)| acked.load(Relaxed) * m)
        .sum();
    let delivered = sh.delivered.load(Relaxed);
    let ratio = if expected > 0 {
        delivered as f64 / expected as f64
    } else {
        0.0
    };
    let last_us = sh.last_delivery_us.load(Relaxed);
    let delivering = Duration::from_micros(last_us.saturating_sub(send_start_us));
    let errors = sh.errors.snapshot();
    let sent = sh.sent.load(Relaxed);
    let acked = sh.acks.load(Relaxed);
    let refused: u64 = errors.values().sum();
    let passed =
        args.min_delivery_ratio <= 0.0 || (expected > 0 && ratio >= args.min_delivery_ratio);
    FanoutReport {
        scenario: "fanout",
        url: args.conn.url.clone(),
        format: args.conn.format,
        run_id,
        receivers: args.conns,
        senders: args.senders,
        rooms: args.rooms,
        rate: args.rate,
        duration_s: args.duration,
        connect,
        late_joined: sh.late.load(Relaxed),
        lost: sh.lost.snapshot(),
        chats: ChatStats {
            sent,
            acked,
            unanswered: sent.saturating_sub(acked + refused),
            errors,
            send_rate: round3(per_sec(sent, sending_took)),
        },
        ack_latency: LatencySummary::of(&sh.ack_latency.snapshot()),
        deliveries: DeliveryStats {
            expected,
            delivered,
            ratio: (ratio * 1e6).round() / 1e6,
            per_s: round3(per_sec(delivered, delivering)),
        },
        latency: LatencySummary::of(&sh.latency.snapshot()),
        frames_received: sh.frames.load(Relaxed),
        batch_frames: sh.batch_frames.load(Relaxed),
        batch_events: sh.batch_events.load(Relaxed),
        foreign_chat_events: sh.foreign_chats.load(Relaxed),
        undecodable_frames: sh.garbage.load(Relaxed),
        min_delivery_ratio: args.min_delivery_ratio,
        passed,
    }
}

impl Report for FanoutReport {
    fn passed(&self) -> bool {
        self.passed
    }

    fn human(&self) -> String {
        let mut t = Table::default();
        t.section(&format!(
            "fanout: {} receivers + {} senders over {} rooms at {} ({}), {} chats/s for {} s",
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
        t.section("deliveries");
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
        let verdict = if self.min_delivery_ratio <= 0.0 {
            "PASS (no --min-delivery-ratio)".to_string()
        } else if self.passed {
            format!("PASS (ratio >= {})", self.min_delivery_ratio)
        } else {
            format!("FAIL (ratio < {})", self.min_delivery_ratio)
        };
        t.row("result", verdict);
        t.finish()
    }
}
