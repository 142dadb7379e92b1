//! `redpacket`: a grab storm. N authenticated connections (distinct users) join one room;
//! the tool creates a red packet through the HTTP API (`POST /api/v1/rooms/{room}/
//! redpackets`), then every connection sends `grab` at once. `busy` and `rate_limited`
//! answers are retried (after `retry_after_ms`, or a jittered exponential backoff) up to
//! `--max-attempts`; any other answer is final.
//!
//! The report gives successes, failures by code, the grab latency (first send → final
//! `ack`) and the per-attempt latency (each send → its reply), the sum of the amounts
//! won against the packet's total, the gateway's own view of the packet
//! (`GET /api/v1/redpackets/{packet}`: `grabbed` == successes, `total_grabbed` == sum)
//! and, with `--journal DIR`, the embedded store's settlement log (`DIR/settlement.jsonl`:
//! one line per grab of this packet, amounts summing to the total). Any failure or
//! mismatch fails the run (exit 1).
//!
//! Every member receives the room's `grab` events (never dropped by the gateway); the
//! tool reads them without decoding (see [`proto::is_batch`]) so N clients keep up, and
//! counts the connections that saw `redpacket_done`.
//!
//! Timeline: `Connecting → (warm-up, create) → Grabbing → Draining → Stopped`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::{self, Message};

use super::{
    ConnArgs, ConnectSummary, ConnectTracker, Rng, Usage, UsageWatch, join_all, run_id, secs,
};
use crate::auth::Minter;
use crate::client::{Conn, Target, short_ws_error};
use crate::http::Api;
use crate::progress::{self, per_sec};
use crate::proto::{self, ClientOp, Decoded};
use crate::report::{LatencySummary, Report, ShardedHist, Table, Tally, round3};
use crate::slo::{self, SloCheck};

const SCENARIO: &str = "redpacket";
/// Bound on each HTTP API call.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Args)]
pub struct RedpacketArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Connections, each a distinct authenticated user, all in one room.
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
    /// Shares of the packet (default: --conns).
    #[arg(long)]
    pub shares: Option<u32>,
    /// Total of the packet in cents (default: 100 × shares).
    #[arg(long)]
    pub total: Option<u64>,
    /// Room (default: lt-rp-<run id>, fresh for every run).
    #[arg(long)]
    pub room: Option<String>,
    /// Bearer token of the gateway's HTTP API (`api.token`).
    #[arg(long, default_value = "dev-api-token-change-me")]
    pub api_token: String,
    /// HTTP API base URL (default: derived from the first --target, ws://h:p/ws →
    /// http://h:p).
    #[arg(long)]
    pub api_url: Option<String>,
    /// HS256 secret of the gateway's `auth.secret`, for minting user tokens.
    #[arg(long, default_value = "dev-secret-change-me")]
    pub secret: String,
    /// Packet lifetime in seconds (`expires_in_s`).
    #[arg(long, default_value_t = 300)]
    pub expires_in: u64,
    /// Grab attempts per connection at most (retries on `busy` / `rate_limited`).
    #[arg(long, default_value_t = 20)]
    pub max_attempts: u32,
    /// First retry backoff in ms when no `retry_after_ms` is given; doubles per attempt,
    /// jittered to 50-100%.
    #[arg(long, default_value_t = 10)]
    pub backoff_ms: u64,
    /// Largest retry backoff in ms.
    #[arg(long, default_value_t = 250)]
    pub max_backoff_ms: u64,
    /// Seconds between all joined and the packet's creation.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Bound on the grab phase in seconds: a grab not answered by then fails (timeout).
    #[arg(long, default_value_t = 60.0)]
    pub grab_timeout: f64,
    /// Seconds to keep reading after the last grab (for `redpacket_done`).
    #[arg(long, default_value_t = 2.0)]
    pub drain: f64,
    /// The gateway's data dir (embedded store): verify DIR/settlement.jsonl afterwards.
    #[arg(long, value_name = "DIR")]
    pub journal: Option<PathBuf>,
}

/// Where the run is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Connecting,
    Waiting,
    /// Grab this packet; give up at the instant.
    Grabbing(Arc<str>, tokio::time::Instant),
    Draining,
    Stopped,
}

/// State shared by all connection tasks.
struct Shared {
    target: Target,
    tracker: ConnectTracker,
    room: String,
    max_attempts: u32,
    backoff: Duration,
    max_backoff: Duration,
    late: AtomicU64,
    /// Connections that joined within the connect phase.
    in_time: AtomicU64,
    /// Connections that take part in the grab (joined in the connect phase).
    participants: AtomicU64,
    /// Participants done grabbing (success or final failure).
    finished: AtomicU64,
    all_finished: Notify,
    successes: AtomicU64,
    sum: AtomicU64,
    min_amount: AtomicU64,
    attempts: AtomicU64,
    /// Final failures by code (`timeout`, `connection lost`, server codes).
    failures: Tally,
    /// Retried answers by code.
    retried: Tally,
    grab_latency: ShardedHist,
    attempt_latency: ShardedHist,
    /// Microseconds after `go` of the last successful ack.
    last_ack_us: AtomicU64,
    go: std::sync::OnceLock<Instant>,
    lost: Tally,
    frames: AtomicU64,
    bytes: AtomicU64,
    batch_frames: AtomicU64,
    done_seen: AtomicU64,
    garbage: AtomicU64,
}

impl Shared {
    fn finish_one(&self) {
        let n = self.finished.fetch_add(1, Relaxed) + 1;
        if n >= self.participants.load(Relaxed) {
            self.all_finished.notify_one();
        }
    }
}

/// What the packet looked like when created.
#[derive(Debug, Clone, Serialize)]
pub struct PacketInfo {
    pub packet: Option<String>,
    pub room: String,
    pub shares: u32,
    pub total: u64,
    /// HTTP status of the create call (0 if it never answered).
    pub create_status: u16,
    pub create_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub create_error: Option<String>,
}

/// The grabs as the clients saw them.
#[derive(Debug, Clone, Serialize)]
pub struct GrabStats {
    pub participants: u64,
    /// min(conns, shares): the grabs that must succeed.
    pub expected_successes: u64,
    pub successes: u64,
    pub failures: u64,
    /// Final failures by code.
    pub failures_by_code: BTreeMap<String, u64>,
    /// Failures that were not the expected `packet_empty` of a packet with fewer shares
    /// than connections.
    pub unexpected_failures: u64,
    pub attempts: u64,
    /// Answers that were retried, by code (`busy`, `rate_limited`).
    pub retried: BTreeMap<String, u64>,
    /// First send to the final `ack`, successful grabs.
    pub latency: LatencySummary,
    /// Each send to its reply, every attempt.
    pub attempt_latency: LatencySummary,
    /// From the go signal to the last successful ack.
    pub time_to_last_ack_ms: f64,
    pub grabs_per_s: f64,
    pub sum: u64,
    /// Whether the amounts won add up to the packet's total (required when every share
    /// could be taken, i.e. shares <= conns).
    pub sum_equals_total: bool,
    pub min_amount: u64,
}

/// `GET /api/v1/redpackets/{packet}` compared with the clients' view.
#[derive(Debug, Clone, Serialize)]
pub struct ServerCheck {
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub grabbed: Option<u64>,
    pub total_grabbed: Option<u64>,
    pub remaining: Option<u64>,
    pub listed_grabs: Option<u64>,
    /// grabbed == successes and total_grabbed == sum.
    pub matches: bool,
}

/// The settlement log compared with the clients' view.
#[derive(Debug, Clone, Serialize)]
pub struct JournalCheck {
    pub file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Lines of this packet.
    pub lines: u64,
    pub sum: u64,
    /// Users with more than one line for this packet.
    pub duplicate_users: u64,
    /// lines == successes, sum == the clients' sum (== total when all shares went),
    /// no duplicates.
    pub matches: bool,
}

#[derive(Debug, Serialize)]
pub struct RedpacketReport {
    pub scenario: &'static str,
    pub url: String,
    pub api: String,
    pub run_id: String,
    pub conns: usize,
    pub connect: ConnectSummary,
    pub late_joined: u64,
    pub lost: BTreeMap<String, u64>,
    pub packet: PacketInfo,
    pub grabs: GrabStats,
    pub server: Option<ServerCheck>,
    pub journal: Option<JournalCheck>,
    /// Connections that received `redpacket_done`.
    pub done_seen: u64,
    pub frames_received: u64,
    pub bytes_received: u64,
    pub batch_frames: u64,
    pub undecodable_frames: u64,
    /// `delivery` is successes / expected successes, latencies the grab latency.
    pub slo: Vec<SloCheck>,
    /// CPU and memory of the gateway (`--pid`) and of the tool over the run.
    pub usage: Usage,
    pub passed: bool,
}

/// Runs the scenario.
///
/// # Errors
/// Setup errors only (bad URL, token signing); everything else is in the report.
pub async fn run(args: RedpacketArgs, nofile: u64) -> anyhow::Result<RedpacketReport> {
    anyhow::ensure!(args.conns > 0, "--conns must be at least 1");
    args.conn.check_capacity(args.conns, nofile);
    let shares = args.shares.unwrap_or(args.conns as u32);
    anyhow::ensure!(shares > 0, "--shares must be at least 1");
    let total = args.total.unwrap_or(100 * u64::from(shares));
    anyhow::ensure!(
        total >= u64::from(shares),
        "--total must be at least --shares cents"
    );
    let target = args.conn.target().await?;
    let api_url = args
        .api_url
        .clone()
        .unwrap_or_else(|| args.conn.targets[0].clone());
    let api = Api::resolve(&api_url, &args.api_token).await?;
    let watch_usage = UsageWatch::start(args.conn.pid);
    let run = run_id();
    let room = args.room.clone().unwrap_or_else(|| format!("lt-rp-{run}"));
    eprintln!(
        "{SCENARIO}: run {run}: {} users -> {} ({}) room {room}; packet {shares} shares, \
         {total} cents via {}",
        args.conns,
        target.describe(),
        args.conn.format.as_str(),
        api.base()
    );
    let minter = Minter::new(&args.secret, 3600);
    let tokens = (0..args.conns)
        .map(|i| minter.token(&format!("lt-{run}-g{i}"), &format!("lt grabber {i}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let sh = Arc::new(Shared {
        target,
        tracker: ConnectTracker::new(args.conns, args.conn.concurrency),
        room: room.clone(),
        max_attempts: args.max_attempts.max(1),
        backoff: Duration::from_millis(args.backoff_ms),
        max_backoff: Duration::from_millis(args.max_backoff_ms.max(args.backoff_ms)),
        late: AtomicU64::new(0),
        in_time: AtomicU64::new(0),
        participants: AtomicU64::new(u64::MAX),
        finished: AtomicU64::new(0),
        all_finished: Notify::new(),
        successes: AtomicU64::new(0),
        sum: AtomicU64::new(0),
        min_amount: AtomicU64::new(u64::MAX),
        attempts: AtomicU64::new(0),
        failures: Tally::default(),
        retried: Tally::default(),
        grab_latency: ShardedHist::new(16),
        attempt_latency: ShardedHist::new(16),
        last_ack_us: AtomicU64::new(0),
        go: std::sync::OnceLock::new(),
        lost: Tally::default(),
        frames: AtomicU64::new(0),
        bytes: AtomicU64::new(0),
        batch_frames: AtomicU64::new(0),
        done_seen: AtomicU64::new(0),
        garbage: AtomicU64::new(0),
    });

    let (phase_tx, _) = watch::channel(Phase::Connecting);
    let mut tasks = JoinSet::new();
    for (index, token) in tokens.into_iter().enumerate() {
        let grabber = Grabber {
            sh: Arc::clone(&sh),
            index,
            token,
            phase: phase_tx.subscribe(),
        };
        tasks.spawn(grabber.run());
    }
    let progress = spawn_progress(Arc::clone(&sh), phase_tx.subscribe());

    sh.tracker.wait_settled(secs(args.conn.join_timeout)).await;
    sh.tracker.close();
    let connect = sh.tracker.summary();
    phase_tx.send_replace(Phase::Waiting);
    eprintln!(
        "{SCENARIO}: connect phase over ({} joined, {} failed) after {} s",
        connect.ok, connect.failed, connect.connect_phase_s
    );
    let participants = sh.in_time.load(Relaxed);
    let mut interrupted = super::sleep_or_interrupt(secs(args.warmup)).await;

    // Create the packet.
    let mut packet = PacketInfo {
        packet: None,
        room: room.clone(),
        shares,
        total,
        create_status: 0,
        create_ms: 0.0,
        create_error: None,
    };
    if participants > 0 && !interrupted {
        let body = serde_json::json!({
            "total": total,
            "shares": shares,
            "sender": {"id": format!("lt-{run}-sender"), "name": "loadtest"},
            "expires_in_s": args.expires_in,
        })
        .to_string();
        let t0 = Instant::now();
        let path = format!("/api/v1/rooms/{room}/redpackets");
        match api.request("POST", &path, Some(&body), HTTP_TIMEOUT).await {
            Ok(resp) => {
                packet.create_status = resp.status;
                #[derive(Deserialize)]
                struct Created {
                    packet: String,
                }
                match serde_json::from_str::<Created>(&resp.body) {
                    Ok(c) if resp.status == 201 => packet.packet = Some(c.packet),
                    _ => packet.create_error = Some(resp.body.trim().to_string()),
                }
            }
            Err(e) => packet.create_error = Some(format!("{e:#}")),
        }
        packet.create_ms = round3(t0.elapsed().as_secs_f64() * 1000.0);
        match (&packet.packet, &packet.create_error) {
            (Some(id), _) => eprintln!(
                "{SCENARIO}: created {id} in {} ms; {participants} grabbing",
                packet.create_ms
            ),
            (None, Some(e)) => eprintln!(
                "{SCENARIO}: creating the packet failed (HTTP {}): {e}",
                packet.create_status
            ),
            (None, None) => {}
        }
    } else if participants == 0 {
        packet.create_error = Some("no connection joined: packet not created".into());
    }

    // Grab.
    if let Some(id) = &packet.packet {
        sh.participants.store(participants, Relaxed);
        let deadline = tokio::time::Instant::now() + secs(args.grab_timeout);
        let _ = sh.go.set(Instant::now());
        phase_tx.send_replace(Phase::Grabbing(Arc::from(id.as_str()), deadline));
        let wait_all = async {
            if sh.finished.load(Relaxed) < participants {
                sh.all_finished.notified().await;
            }
        };
        tokio::select! {
            () = wait_all => {}
            () = tokio::time::sleep_until(deadline + Duration::from_secs(1)) => {
                eprintln!("{SCENARIO}: grab phase deadline passed");
            }
            () = super::interrupted() => interrupted = true,
        }
        if !interrupted {
            super::sleep_or_interrupt(secs(args.drain)).await;
        }
    }
    phase_tx.send_replace(Phase::Draining);
    phase_tx.send_replace(Phase::Stopped);
    drop(progress);
    let aborted = join_all(&mut tasks, Duration::from_secs(10)).await;
    if aborted > 0 {
        eprintln!("{SCENARIO}: {aborted} connection tasks did not close in time");
    }

    let usage = watch_usage.finish();
    let grabs = grab_stats(&sh, participants, args.conns, shares, total);
    let server = match &packet.packet {
        Some(id) => Some(server_check(&api, id, &grabs).await),
        None => None,
    };
    let journal = match (&packet.packet, &args.journal) {
        (Some(id), Some(dir)) => Some(journal_check(dir, id, &grabs).await),
        _ => None,
    };
    let ratio = (grabs.expected_successes > 0)
        .then(|| grabs.successes as f64 / grabs.expected_successes as f64);
    let slo = args.conn.slo.slo().evaluate(ratio, &grabs.latency);
    let passed = packet.packet.is_some()
        && grabs.successes == grabs.expected_successes
        && grabs.unexpected_failures == 0
        && (grabs.sum_equals_total || u64::from(shares) > args.conns as u64)
        && server.as_ref().is_some_and(|s| s.matches)
        && journal.as_ref().is_none_or(|j| j.matches)
        && slo::all_met(&slo);
    Ok(RedpacketReport {
        scenario: SCENARIO,
        url: args.conn.url(),
        api: api.base(),
        run_id: run,
        conns: args.conns,
        connect,
        late_joined: sh.late.load(Relaxed),
        lost: sh.lost.snapshot(),
        packet,
        grabs,
        server,
        journal,
        done_seen: sh.done_seen.load(Relaxed),
        frames_received: sh.frames.load(Relaxed),
        bytes_received: sh.bytes.load(Relaxed),
        batch_frames: sh.batch_frames.load(Relaxed),
        undecodable_frames: sh.garbage.load(Relaxed),
        slo,
        usage,
        passed,
    })
}

fn grab_stats(sh: &Shared, participants: u64, conns: usize, shares: u32, total: u64) -> GrabStats {
    let successes = sh.successes.load(Relaxed);
    let failures_by_code = sh.failures.snapshot();
    let failures: u64 = failures_by_code.values().sum();
    let conns = conns as u64;
    let shares = u64::from(shares);
    let expected_empty = if shares < conns {
        failures_by_code.get("packet_empty").copied().unwrap_or(0)
    } else {
        0
    };
    let sum = sh.sum.load(Relaxed);
    let last_ack = Duration::from_micros(sh.last_ack_us.load(Relaxed));
    let min_amount = sh.min_amount.load(Relaxed);
    GrabStats {
        participants,
        expected_successes: conns.min(shares),
        successes,
        failures,
        unexpected_failures: failures - expected_empty,
        failures_by_code,
        attempts: sh.attempts.load(Relaxed),
        retried: sh.retried.snapshot(),
        latency: LatencySummary::of(&sh.grab_latency.snapshot()),
        attempt_latency: LatencySummary::of(&sh.attempt_latency.snapshot()),
        time_to_last_ack_ms: round3(last_ack.as_secs_f64() * 1000.0),
        grabs_per_s: round3(per_sec(successes, last_ack)),
        sum,
        sum_equals_total: sum == total,
        min_amount: if min_amount == u64::MAX {
            0
        } else {
            min_amount
        },
    }
}

/// The packet as the gateway reports it.
#[derive(Debug, Deserialize)]
struct PacketStatus {
    grabbed: u64,
    total_grabbed: u64,
    #[serde(default)]
    remaining: Option<u64>,
    #[serde(default)]
    grabs: Option<Vec<serde_json::Value>>,
}

async fn server_check(api: &Api, packet: &str, grabs: &GrabStats) -> ServerCheck {
    let mut check = ServerCheck {
        status: 0,
        error: None,
        grabbed: None,
        total_grabbed: None,
        remaining: None,
        listed_grabs: None,
        matches: false,
    };
    let path = format!("/api/v1/redpackets/{packet}");
    match api.request("GET", &path, None, HTTP_TIMEOUT).await {
        Ok(resp) => {
            check.status = resp.status;
            match serde_json::from_str::<PacketStatus>(&resp.body) {
                Ok(s) if resp.status == 200 => {
                    check.matches = s.grabbed == grabs.successes && s.total_grabbed == grabs.sum;
                    check.grabbed = Some(s.grabbed);
                    check.total_grabbed = Some(s.total_grabbed);
                    check.remaining = s.remaining;
                    check.listed_grabs = s.grabs.map(|g| g.len() as u64);
                }
                Ok(_) | Err(_) => check.error = Some(resp.body.trim().chars().take(300).collect()),
            }
        }
        Err(e) => check.error = Some(format!("{e:#}")),
    }
    check
}

/// One settlement line; only what is checked.
#[derive(Debug, Deserialize)]
struct Settlement {
    packet: String,
    amount: u64,
    #[serde(default)]
    user: Option<SettlementUser>,
}

#[derive(Debug, Deserialize)]
struct SettlementUser {
    id: String,
}

/// Reads `dir/settlement.jsonl` (bounded in time) and compares this packet's lines.
async fn journal_check(dir: &Path, packet: &str, grabs: &GrabStats) -> JournalCheck {
    let file = dir.join("settlement.jsonl");
    let path = file.clone();
    let id = packet.to_string();
    let read = tokio::task::spawn_blocking(move || scan_settlement(&path, &id));
    let result = match tokio::time::timeout(Duration::from_secs(60), read).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(anyhow::anyhow!("reader panicked: {e}")),
        Err(_) => Err(anyhow::anyhow!("not read within 60 s")),
    };
    let mut check = JournalCheck {
        file: file.display().to_string(),
        error: None,
        lines: 0,
        sum: 0,
        duplicate_users: 0,
        matches: false,
    };
    match result {
        Ok(scan) => {
            check.lines = scan.lines;
            check.sum = scan.sum;
            check.duplicate_users = scan.duplicate_users;
            check.matches =
                scan.lines == grabs.successes && scan.sum == grabs.sum && scan.duplicate_users == 0;
        }
        Err(e) => check.error = Some(format!("{e:#}")),
    }
    check
}

/// What the settlement log holds for one packet.
#[derive(Debug, Default, PartialEq)]
pub struct SettlementScan {
    pub lines: u64,
    pub sum: u64,
    pub duplicate_users: u64,
}

/// Counts `packet`'s lines of a settlement log and sums their amounts.
///
/// # Errors
/// The file cannot be read, or a line of this packet does not parse.
pub fn scan_settlement(path: &Path, packet: &str) -> anyhow::Result<SettlementScan> {
    use std::io::BufRead;
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut scan = SettlementScan::default();
    let mut users = HashSet::new();
    for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        // Cheap pre-filter: the log holds every packet ever grabbed.
        if !line.contains(packet) {
            continue;
        }
        let s: Settlement = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not a settlement line", path.display(), n + 1))?;
        if s.packet != packet {
            continue;
        }
        scan.lines += 1;
        scan.sum += s.amount;
        if let Some(u) = s.user
            && !users.insert(u.id)
        {
            scan.duplicate_users += 1;
        }
    }
    Ok(scan)
}

/// The once-a-second progress line.
fn spawn_progress(sh: Arc<Shared>, phase: watch::Receiver<Phase>) -> progress::Progress {
    let mut last = (0_u64, 0_u64, 0_u64);
    progress::spawn(move |elapsed| {
        let now = (
            sh.successes.load(Relaxed),
            sh.frames.load(Relaxed),
            sh.bytes.load(Relaxed),
        );
        let rate = |a: u64, b: u64| per_sec(a.saturating_sub(b), elapsed);
        let p = match &*phase.borrow() {
            Phase::Connecting => "connecting",
            Phase::Waiting => "creating",
            Phase::Grabbing(..) => "grabbing",
            Phase::Draining | Phase::Stopped => "draining",
        };
        let line = format!(
            "{SCENARIO}: {p} | {} (lost {}) | grabbed {} ({:.0}/s) failed {} retried {} | \
             {:.0} msgs/s {:.1} MB/s | grab p99 {} ms",
            sh.tracker.progress(),
            sh.lost.snapshot().values().sum::<u64>(),
            now.0,
            rate(now.0, last.0),
            sh.failures.snapshot().values().sum::<u64>(),
            sh.retried.snapshot().values().sum::<u64>(),
            rate(now.1, last.1),
            rate(now.2, last.2) / 1e6,
            LatencySummary::of(&sh.grab_latency.snapshot()).p99_ms,
        );
        last = now;
        line
    })
}

type WsResult = Option<Result<Message, tungstenite::Error>>;

/// One grabbing connection.
struct Grabber {
    sh: Arc<Shared>,
    index: usize,
    token: String,
    phase: watch::Receiver<Phase>,
}

/// What one read brought.
enum Read {
    /// Nothing of interest (batch, hello, pong, ...).
    Other,
    /// `ack` with this ref and amount.
    Ack(i64, Option<u64>),
    /// `error` with this ref, code and retry hint.
    Error(Option<i64>, String, Option<u64>),
    /// The connection is gone (reason).
    Gone(String),
}

impl Grabber {
    async fn run(mut self) {
        let sh = Arc::clone(&self.sh);
        let count = || {
            sh.in_time.fetch_add(1, Relaxed);
        };
        let Some((mut conn, _, in_time)) = sh
            .tracker
            .open_with(&sh.target, self.index, &sh.room, Some(&self.token), count)
            .await
        else {
            return;
        };
        if !in_time {
            sh.late.fetch_add(1, Relaxed);
            conn.close(Duration::from_secs(1)).await;
            return;
        }
        let mut seen_done = false;
        // Wait for the packet, reading whatever comes.
        let (packet, deadline) = loop {
            tokio::select! {
                msg = conn.recv() => {
                    if let Read::Gone(reason) = self.read(msg, &mut seen_done) {
                        sh.lost.add(reason);
                        return;
                    }
                }
                changed = self.phase.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let phase = self.phase.borrow_and_update().clone();
                    match phase {
                        Phase::Grabbing(packet, deadline) => break (packet, deadline),
                        Phase::Draining | Phase::Stopped => {
                            conn.close(Duration::from_secs(1)).await;
                            return;
                        }
                        Phase::Connecting | Phase::Waiting => {}
                    }
                }
            }
        };
        let alive = self
            .grab(&mut conn, &packet, deadline, &mut seen_done)
            .await;
        sh.finish_one();
        if !alive {
            return;
        }
        // Keep reading (the room's grab events, `redpacket_done`) until told to stop.
        loop {
            tokio::select! {
                msg = conn.recv() => {
                    if let Read::Gone(reason) = self.read(msg, &mut seen_done) {
                        sh.lost.add(reason);
                        return;
                    }
                }
                changed = self.phase.changed() => {
                    if changed.is_err() || *self.phase.borrow_and_update() == Phase::Stopped {
                        break;
                    }
                }
            }
        }
        conn.close(Duration::from_secs(1)).await;
    }

    /// Grabs until an `ack`, a final error, the attempts run out or the deadline passes;
    /// records the outcome. False if the connection was lost.
    async fn grab(
        &self,
        conn: &mut Conn,
        packet: &str,
        deadline: tokio::time::Instant,
        seen_done: &mut bool,
    ) -> bool {
        let sh = &self.sh;
        let mut rng = Rng::new(self.index as u64);
        let first = Instant::now();
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let reference = i64::from(attempt);
            let msg = proto::encode(
                sh.target.format,
                &ClientOp::Grab {
                    room: &sh.room,
                    packet,
                    reference,
                },
            );
            let sent = Instant::now();
            sh.attempts.fetch_add(1, Relaxed);
            if let Err(e) = conn.send(msg).await {
                let reason = format!("send: {}", short_ws_error(&e));
                sh.failures.add("connection lost");
                sh.lost.add(reason);
                return false;
            }
            // Wait for this attempt's reply.
            let reply = loop {
                let read = tokio::select! {
                    msg = conn.recv() => self.read(msg, seen_done),
                    () = tokio::time::sleep_until(deadline) => {
                        sh.failures.add("timeout");
                        return true;
                    }
                };
                match read {
                    Read::Other => {}
                    Read::Ack(r, amount) if r == reference => break Ok(amount),
                    Read::Error(Some(r), code, retry) if r == reference => {
                        break Err((code, retry));
                    }
                    Read::Ack(..) | Read::Error(..) => {}
                    Read::Gone(reason) => {
                        sh.failures.add("connection lost");
                        sh.lost.add(reason);
                        return false;
                    }
                }
            };
            sh.attempt_latency
                .shard(self.index)
                .saturating_record(sent.elapsed().as_micros() as u64);
            match reply {
                Ok(amount) => {
                    let amount = amount.unwrap_or(0);
                    sh.grab_latency
                        .shard(self.index)
                        .saturating_record(first.elapsed().as_micros() as u64);
                    sh.successes.fetch_add(1, Relaxed);
                    sh.sum.fetch_add(amount, Relaxed);
                    sh.min_amount.fetch_min(amount, Relaxed);
                    if let Some(go) = sh.go.get() {
                        sh.last_ack_us
                            .fetch_max(go.elapsed().as_micros() as u64, Relaxed);
                    }
                    return true;
                }
                Err((code, retry_after)) => {
                    let retryable = code == "busy" || code == "rate_limited";
                    if !retryable {
                        sh.failures.add(code);
                        return true;
                    }
                    sh.retried.add(code.as_str());
                    if attempt >= sh.max_attempts {
                        sh.failures
                            .add(format!("{code} (gave up after {attempt} attempts)"));
                        return true;
                    }
                    let wait = match retry_after {
                        Some(ms) => rng.jitter(Duration::from_millis(ms), 1.0, 1.2),
                        None => {
                            let exp = sh
                                .backoff
                                .saturating_mul(1 << (attempt - 1).min(16))
                                .min(sh.max_backoff);
                            rng.jitter(exp, 0.5, 1.0)
                        }
                    };
                    // Keep reading while waiting: the room's events must not pile up.
                    let until = tokio::time::Instant::now() + wait;
                    loop {
                        tokio::select! {
                            msg = conn.recv() => {
                                if let Read::Gone(reason) = self.read(msg, seen_done) {
                                    sh.failures.add("connection lost");
                                    sh.lost.add(reason);
                                    return false;
                                }
                            }
                            () = tokio::time::sleep_until(until) => break,
                        }
                    }
                    if tokio::time::Instant::now() >= deadline {
                        sh.failures.add("timeout");
                        return true;
                    }
                }
            }
        }
    }

    /// Classifies one read; batches are counted without decoding.
    fn read(&self, msg: WsResult, seen_done: &mut bool) -> Read {
        let sh = &self.sh;
        let msg = match msg {
            Some(Ok(msg)) => msg,
            Some(Err(e)) => return Read::Gone(format!("read: {}", short_ws_error(&e))),
            None => return Read::Gone("stream ended".into()),
        };
        sh.bytes.fetch_add(msg.len() as u64, Relaxed);
        if proto::is_batch(&msg) {
            sh.frames.fetch_add(1, Relaxed);
            sh.batch_frames.fetch_add(1, Relaxed);
            if !*seen_done && proto::message_contains(&msg, "redpacket_done") {
                *seen_done = true;
                sh.done_seen.fetch_add(1, Relaxed);
            }
            return Read::Other;
        }
        match proto::decode(&msg) {
            Decoded::Frame(f) => {
                sh.frames.fetch_add(1, Relaxed);
                match (f.op, f.reference) {
                    ("ack", Some(r)) => Read::Ack(r, f.amount),
                    ("error", r) => {
                        Read::Error(r, f.code.unwrap_or("?").to_string(), f.retry_after_ms)
                    }
                    _ => Read::Other,
                }
            }
            Decoded::Garbage(why) => {
                sh.frames.fetch_add(1, Relaxed);
                if sh.garbage.fetch_add(1, Relaxed) == 0 {
                    eprintln!("warning: undecodable frame (reported once): {why}");
                }
                Read::Other
            }
            Decoded::Control => Read::Other,
            Decoded::Close(code) => Read::Gone(format!(
                "closed by server: {}",
                code.map_or_else(|| "-".to_string(), |c| c.to_string())
            )),
        }
    }
}

impl Report for RedpacketReport {
    fn passed(&self) -> bool {
        self.passed
    }

    fn human(&self) -> String {
        let mut t = Table::default();
        let p = &self.packet;
        let g = &self.grabs;
        t.section(&format!(
            "redpacket: {} users in {} at {}, packet of {} shares / {} cents",
            self.conns, p.room, self.url, p.shares, p.total
        ));
        t.section("connections");
        self.connect.rows(&mut t);
        t.row("late joined", self.late_joined)
            .tally("lost during run", &self.lost);
        t.section("packet");
        t.row("id", p.packet.as_deref().unwrap_or("(not created)"))
            .row(
                "create",
                format!(
                    "HTTP {} in {} ms via {}",
                    p.create_status, p.create_ms, self.api
                ),
            );
        if let Some(e) = &p.create_error {
            t.row("create error", e);
        }
        t.section("grabs");
        t.row("participants", g.participants)
            .row("expected successes", g.expected_successes)
            .row("successes", g.successes)
            .row("failures", g.failures)
            .tally("failures by code", &g.failures_by_code)
            .row("unexpected failures", g.unexpected_failures)
            .row("attempts", g.attempts)
            .tally("retried", &g.retried)
            .row("grab latency", g.latency.line())
            .row("attempt latency", g.attempt_latency.line())
            .row("last ack after", format!("{} ms", g.time_to_last_ack_ms))
            .row("grabs/s", g.grabs_per_s)
            .row(
                "sum of amounts",
                format!(
                    "{} of {} cents: {}",
                    g.sum,
                    p.total,
                    if g.sum_equals_total {
                        "exact"
                    } else {
                        "MISMATCH"
                    }
                ),
            )
            .row("smallest amount", g.min_amount)
            .row("redpacket_done seen", format!("{} conns", self.done_seen))
            .row("frames received", self.frames_received)
            .row(
                "bytes received",
                format!("{:.1} MB", self.bytes_received as f64 / 1e6),
            );
        if let Some(s) = &self.server {
            t.section("gateway's view (GET /api/v1/redpackets/{packet})");
            let opt = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
            t.row("http status", s.status)
                .row("grabbed", opt(s.grabbed))
                .row("total_grabbed", opt(s.total_grabbed))
                .row("remaining", opt(s.remaining))
                .row("grabs listed", opt(s.listed_grabs));
            if let Some(e) = &s.error {
                t.row("error", e);
            }
            t.row("matches clients", if s.matches { "yes" } else { "NO" });
        }
        if let Some(j) = &self.journal {
            t.section("settlement log");
            t.row("file", &j.file)
                .row("lines of this packet", j.lines)
                .row("sum", j.sum)
                .row("duplicate users", j.duplicate_users);
            if let Some(e) = &j.error {
                t.row("error", e);
            }
            t.row("matches clients", if j.matches { "yes" } else { "NO" });
        }
        slo::rows(&mut t, &self.slo, "grab success ratio", "grab latency");
        self.usage.rows(&mut t);
        t.row("result", if self.passed { "PASS" } else { "FAIL" });
        t.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_only_this_packets_settlements() {
        let dir = std::env::temp_dir().join(format!("lt-settle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("settlement.jsonl");
        let line = |p: &str, u: &str, a: u64| {
            format!(
                r#"{{"packet":"{p}","room":"r","user":{{"id":"{u}","name":"n"}},"amount":{a},"ts":1}}"#
            )
        };
        let text = [
            line("rp-a", "u1", 5),
            line("rp-b", "u1", 7),
            line("rp-a", "u2", 10),
            line("rp-ab", "u3", 1),
            line("rp-a", "u2", 1),
        ]
        .join("\n");
        std::fs::write(&path, text).unwrap();
        let scan = scan_settlement(&path, "rp-a").unwrap();
        assert_eq!(
            scan,
            SettlementScan {
                lines: 3,
                sum: 16,
                duplicate_users: 1
            }
        );
        assert!(scan_settlement(&dir.join("missing.jsonl"), "rp-a").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
