//! Every metric the gateway exports, named and described in one place.
//!
//! Prometheus conventions: `_total` counters, base units, labels of low cardinality only
//! (close codes, error codes, event types — never a room or user id). Hot paths use
//! [`hot()`], handles resolved once, so counting a frame is an atomic add and not a
//! registry lookup. The recorder is process-global (the `metrics` facade allows one), so
//! several gateways in one test process share it; [`install`] is idempotent.

use std::sync::OnceLock;

use metrics::{
    Counter, Gauge, Histogram, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::protocol::{CloseCode, ErrorCode};

pub const CONNECTIONS: &str = "danmaku_connections";
pub const CONNECTIONS_OPENED: &str = "danmaku_connections_opened_total";
pub const CONNECTIONS_CLOSED: &str = "danmaku_connections_closed_total";
pub const CONNECTIONS_REFUSED: &str = "danmaku_connections_refused_total";
pub const ROOMS: &str = "danmaku_rooms";
pub const ROOM_MEMBERS: &str = "danmaku_room_members";
pub const FRAMES_IN: &str = "danmaku_frames_in_total";
pub const FRAMES_OUT: &str = "danmaku_frames_out_total";
pub const BYTES_IN: &str = "danmaku_bytes_in_total";
pub const BYTES_OUT: &str = "danmaku_bytes_out_total";
pub const EVENTS: &str = "danmaku_events_total";
pub const EVENTS_DROPPED: &str = "danmaku_events_dropped_total";
pub const BATCHES: &str = "danmaku_batches_total";
pub const BATCH_EVENTS: &str = "danmaku_batch_events";
pub const DELIVERIES: &str = "danmaku_deliveries_total";
pub const BROADCAST_LATENCY: &str = "danmaku_broadcast_latency_seconds";
pub const OUTBOUND_DROPPED: &str = "danmaku_outbound_dropped_total";
pub const ERRORS: &str = "danmaku_errors_total";
pub const RATE_LIMITED: &str = "danmaku_rate_limited_total";
pub const CHAT_SAMPLED_OUT: &str = "danmaku_chat_sampled_out_total";
pub const GIFTS_MERGED: &str = "danmaku_gifts_merged_total";
pub const GRAB_EVENTS_SAMPLED_OUT: &str = "danmaku_grab_events_sampled_out_total";
pub const REDPACKETS_CREATED: &str = "danmaku_redpackets_created_total";
pub const REDPACKET_GRABS: &str = "danmaku_redpacket_grabs_total";
pub const REDPACKET_GRAB_SECONDS: &str = "danmaku_redpacket_grab_seconds";
pub const JOURNAL_SYNCS: &str = "danmaku_journal_syncs_total";
pub const SETTLEMENT_FAILURES: &str = "danmaku_settlement_write_failures_total";
pub const EDGE_HANDSHAKES: &str = "danmaku_edge_handshakes_total";
pub const EDGE_HANDSHAKE_SECONDS: &str = "danmaku_edge_handshake_seconds";
pub const EDGE_HANDSHAKES_IN_FLIGHT: &str = "danmaku_edge_handshakes_in_flight";
pub const TLS_CERT_RELOADS: &str = "danmaku_tls_cert_reloads_total";
pub const MODERATION_ACTIONS: &str = "danmaku_moderation_actions_total";
pub const MODERATION_REFUSED: &str = "danmaku_moderation_refused_total";
pub const MODERATION_FILTERED: &str = "danmaku_moderation_filtered_total";
pub const MODERATION_ACTIVE_BANS: &str = "danmaku_moderation_active_bans";
pub const MODERATION_ACTIVE_MUTES: &str = "danmaku_moderation_active_mutes";
pub const RECOVERIES: &str = "danmaku_recoveries_total";
pub const STREAM_RECORDS: &str = "danmaku_stream_records_total";
pub const STREAM_DROPPED: &str = "danmaku_stream_dropped_total";
pub const STREAM_ERRORS: &str = "danmaku_stream_errors_total";
pub const STREAM_LAG: &str = "danmaku_stream_lag_seconds";
pub const STREAM_QUEUED: &str = "danmaku_stream_queued";
pub const DEFLATE_SECONDS: &str = "danmaku_deflate_seconds";
pub const DEFLATE_FRAMES: &str = "danmaku_deflate_frames_total";
pub const DEFLATE_BYTES: &str = "danmaku_deflate_bytes_total";
pub const DELIVERIES_DEFLATED: &str = "danmaku_deliveries_deflated_total";
pub const CONNECTIONS_DEFLATE: &str = "danmaku_connections_deflate_total";

/// Every `action` of [`MODERATION_ACTIONS`].
pub const MODERATION_ACTION_LABELS: [&str; 7] = [
    "mute", "unmute", "ban", "unban", "settings", "filters", "recall",
];

/// Every `outcome` of [`EDGE_HANDSHAKES`]: `ok` (a first request head read), the ways a
/// connection ends before one, and `shed` (accepted while `limits.max_handshakes`
/// connections were already waiting for theirs: closed at once).
const EDGE_OUTCOMES: [&str; 10] = [
    "ok",
    "closed",
    "proxy_untrusted",
    "proxy_missing",
    "proxy_invalid",
    "tls_error",
    "timeout",
    "bad_request",
    "io_error",
    "shed",
];

/// Why a connection ended, as the `code` label of [`CONNECTIONS_CLOSED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The gateway closed with this code.
    Code(CloseCode),
    /// The client closed or vanished.
    Peer,
    /// A socket error or a stuck write.
    Error,
}

/// Series of [`CONNECTIONS_CLOSED`]: every gateway close code, plus `peer` and `error`.
const CLOSED_LABELS: usize = CloseCode::ALL.len() + 2;

/// Handles for everything counted per frame or per delivery.
pub struct Hot {
    pub connections: Gauge,
    pub connections_opened: Counter,
    pub room_members: Gauge,
    pub rooms: Gauge,
    pub frames_in: Counter,
    pub frames_out: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub batches: Counter,
    pub batch_events: Histogram,
    pub deliveries: Counter,
    /// Event accepted → frame written (oldest frame of each flush).
    pub broadcast_latency: Histogram,
    pub outbound_dropped: Counter,
    pub events_dropped: Counter,
    /// Batch frames queued to members that negotiated permessage-deflate, deflated.
    pub deliveries_deflated: Counter,
    pub deflate: DeflateHandles,
    /// One per [`CloseCode::ALL`] (same order), then `peer`, then `error`.
    closed: [Counter; CLOSED_LABELS],
    errors: [Counter; ErrorCode::ALL.len()],
}

/// Counted once per window and format deflated (never per member).
pub struct DeflateHandles {
    /// Seconds to deflate one window's frames in one format.
    pub seconds: Histogram,
    pub compressed: Counter,
    /// Frames shared plain with deflate members (small, or no gain).
    pub plain: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
}

impl Hot {
    pub fn closed(&self, reason: CloseReason) -> &Counter {
        let i = match reason {
            CloseReason::Code(c) => CloseCode::ALL.iter().position(|x| *x == c).unwrap_or(0),
            CloseReason::Peer => CloseCode::ALL.len(),
            CloseReason::Error => CloseCode::ALL.len() + 1,
        };
        &self.closed[i]
    }

    pub fn error(&self, code: ErrorCode) -> &Counter {
        &self.errors[ErrorCode::ALL.iter().position(|x| *x == code).unwrap_or(0)]
    }
}

/// Counts one broadcast event of `kind` (a low-cardinality event type).
pub fn event(kind: &'static str) {
    counter!(EVENTS, "type" => kind).increment(1);
}

/// Counts a `join` with `since` by whether it recovered everything after it.
pub fn recovery(recovered: bool) {
    let result = if recovered { "recovered" } else { "missed" };
    counter!(RECOVERIES, "result" => result).increment(1);
}

/// Counts an action refused by a rate limit.
/// A connection opened, by whether it negotiated permessage-deflate.
pub fn connection_deflate(deflate: bool) {
    counter!(CONNECTIONS_DEFLATE, "deflate" => if deflate { "yes" } else { "no" }).increment(1);
}

pub fn rate_limited(action: &'static str) {
    counter!(RATE_LIMITED, "action" => action).increment(1);
}

/// Counts a red-packet grab by outcome (`ok` or an error code).
pub fn grab(outcome: &'static str) {
    counter!(REDPACKET_GRABS, "outcome" => outcome).increment(1);
}

/// Counts a connection refused before the upgrade.
pub fn refused(reason: &'static str) {
    counter!(CONNECTIONS_REFUSED, "reason" => reason).increment(1);
}

/// Counts a finished edge handshake (accept to first request head: PROXY header, TLS,
/// the head itself) by outcome, and its time.
pub fn edge_handshake(outcome: &'static str, took: std::time::Duration) {
    counter!(EDGE_HANDSHAKES, "outcome" => outcome).increment(1);
    histogram!(EDGE_HANDSHAKE_SECONDS).record(took.as_secs_f64());
}

/// Connections waiting for their first request head right now (handshake slots held).
pub fn edge_handshakes_in_flight() -> Gauge {
    gauge!(EDGE_HANDSHAKES_IN_FLIGHT)
}

/// The counter of connections shed (closed at accept: every handshake slot held);
/// resolved once by the accept loop, which may count thousands a second under attack.
pub fn edge_handshakes_shed() -> Counter {
    counter!(EDGE_HANDSHAKES, "outcome" => "shed")
}

/// Counts a TLS certificate reload attempt (`ok` or `error`).
pub fn tls_cert_reload(result: &'static str) {
    counter!(TLS_CERT_RELOADS, "result" => result).increment(1);
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
static PROCESS: OnceLock<metrics_process::Collector> = OnceLock::new();

/// Refreshes the process metrics (CPU seconds, resident memory, open fds, threads);
/// called on every scrape, so they are as fresh as the scrape.
pub fn collect_process() {
    PROCESS
        .get_or_init(|| {
            let c = metrics_process::Collector::default();
            c.describe();
            c
        })
        .collect();
}
static HOT: OnceLock<Hot> = OnceLock::new();

/// Installs the Prometheus recorder (once per process) and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(BATCH_EVENTS.into()),
                    &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0],
                )
                .and_then(|b| {
                    // A window deflates in microseconds; the generic buckets start at 1 ms.
                    b.set_buckets_for_metric(
                        Matcher::Full(DEFLATE_SECONDS.into()),
                        &[
                            0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5,
                            0.001, 0.0025, 0.01,
                        ],
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Suffix("_seconds".into()),
                        &[
                            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        ],
                    )
                })
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding application);
            // then we render an empty registry rather than fail.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            preregister();
            handle
        })
        .clone()
}

/// Hot-path handles; call after [`install`] (earlier handles would be no-ops).
pub fn hot() -> &'static Hot {
    HOT.get_or_init(|| {
        // Labels derive from `CloseCode::ALL`, so a new close code gets its series.
        let closed_label = |i: usize| {
            let label = match CloseCode::ALL.get(i) {
                Some(c) => c.code().to_string(),
                None if i == CloseCode::ALL.len() => "peer".to_string(),
                None => "error".to_string(),
            };
            counter!(CONNECTIONS_CLOSED, "code" => label)
        };
        Hot {
            connections: gauge!(CONNECTIONS),
            connections_opened: counter!(CONNECTIONS_OPENED),
            room_members: gauge!(ROOM_MEMBERS),
            rooms: gauge!(ROOMS),
            frames_in: counter!(FRAMES_IN),
            frames_out: counter!(FRAMES_OUT),
            bytes_in: counter!(BYTES_IN),
            bytes_out: counter!(BYTES_OUT),
            batches: counter!(BATCHES),
            batch_events: histogram!(BATCH_EVENTS),
            deliveries: counter!(DELIVERIES),
            broadcast_latency: histogram!(BROADCAST_LATENCY),
            outbound_dropped: counter!(OUTBOUND_DROPPED),
            events_dropped: counter!(EVENTS_DROPPED),
            deliveries_deflated: counter!(DELIVERIES_DEFLATED),
            deflate: DeflateHandles {
                seconds: histogram!(DEFLATE_SECONDS),
                compressed: counter!(DEFLATE_FRAMES, "result" => "compressed"),
                plain: counter!(DEFLATE_FRAMES, "result" => "plain"),
                bytes_in: counter!(DEFLATE_BYTES, "stage" => "in"),
                bytes_out: counter!(DEFLATE_BYTES, "stage" => "out"),
            },
            closed: std::array::from_fn(closed_label),
            errors: ErrorCode::ALL.map(|c| counter!(ERRORS, "code" => c.as_str())),
        }
    })
}

/// Creates the failure and rarely-moving series at 0, so a dashboard's `rate()` sees the
/// first increment (a series born at 1 has no earlier point to compute a rate from).
fn preregister() {
    use crate::backplane as bp;
    for deflate in ["yes", "no"] {
        counter!(CONNECTIONS_DEFLATE, "deflate" => deflate).increment(0);
    }
    for reason in ["draining", "max_conns", "max_conns_per_ip", "banned"] {
        counter!(CONNECTIONS_REFUSED, "reason" => reason).increment(0);
    }
    for outcome in EDGE_OUTCOMES {
        counter!(EDGE_HANDSHAKES, "outcome" => outcome).increment(0);
    }
    for result in ["ok", "error"] {
        counter!(TLS_CERT_RELOADS, "result" => result).increment(0);
    }
    gauge!(EDGE_HANDSHAKES_IN_FLIGHT).increment(0.0);
    // Registered (rendered with empty buckets) so a dashboard sees the series from the start.
    let _ = histogram!(EDGE_HANDSHAKE_SECONDS);
    for action in ["chat", "gift", "grab", "join"] {
        counter!(RATE_LIMITED, "action" => action).increment(0);
    }
    for kind in [
        "chat",
        "gift",
        "redpacket",
        "grab",
        "redpacket_done",
        "presence",
        "system",
        "recall",
    ] {
        counter!(EVENTS, "type" => kind).increment(0);
    }
    for action in MODERATION_ACTION_LABELS {
        counter!(MODERATION_ACTIONS, "action" => action).increment(0);
    }
    for reason in ["muted", "chat_closed", "slow_mode"] {
        counter!(MODERATION_REFUSED, "reason" => reason).increment(0);
    }
    for list in ["block", "mask"] {
        counter!(MODERATION_FILTERED, "list" => list).increment(0);
    }
    gauge!(MODERATION_ACTIVE_BANS).set(0.0);
    gauge!(MODERATION_ACTIVE_MUTES).set(0.0);
    for result in ["recovered", "missed"] {
        counter!(RECOVERIES, "result" => result).increment(0);
    }
    for status in crate::stream::Status::ALL {
        counter!(STREAM_RECORDS, "status" => status.as_str()).increment(0);
    }
    counter!(STREAM_DROPPED).increment(0);
    counter!(STREAM_ERRORS).increment(0);
    gauge!(STREAM_LAG).set(0.0);
    gauge!(STREAM_QUEUED).set(0.0);
    counter!(REDPACKET_GRABS, "outcome" => "ok").increment(0);
    for code in ErrorCode::ALL {
        counter!(REDPACKET_GRABS, "outcome" => code.as_str()).increment(0);
    }
    for name in [
        CHAT_SAMPLED_OUT,
        GRAB_EVENTS_SAMPLED_OUT,
        GIFTS_MERGED,
        REDPACKETS_CREATED,
        bp::PUBLISHED,
        bp::RECEIVED,
        bp::DROPPED,
    ] {
        counter!(name).increment(0);
    }
    for op in ["publish", "subscribe", "decode", "presence"] {
        counter!(bp::ERRORS, "op" => op).increment(0);
    }
    for conn in ["command", "subscriber"] {
        counter!(crate::redis_link::RECONNECTS, "conn" => conn).increment(0);
    }
}

fn describe() {
    describe_gauge!(CONNECTIONS, "Open WebSocket connections on this node.");
    describe_counter!(CONNECTIONS_OPENED, "WebSocket connections accepted.");
    describe_counter!(
        CONNECTIONS_CLOSED,
        "WebSocket connections ended, by close code (or peer/error)."
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Upgrade requests refused before the upgrade, by reason."
    );
    describe_counter!(
        EDGE_HANDSHAKES,
        "Accepted connections by how their handshake (to the first request head) ended; all but ok are closed, shed ones at once."
    );
    describe_histogram!(
        EDGE_HANDSHAKE_SECONDS,
        "Seconds from TCP accept to the first request head read (PROXY header and TLS included; failed ones too)."
    );
    describe_gauge!(
        EDGE_HANDSHAKES_IN_FLIGHT,
        "Connections accepted and not yet past their first request head (more than limits.max_handshakes are shed)."
    );
    describe_counter!(
        TLS_CERT_RELOADS,
        "TLS certificate reloads (file change or SIGHUP), by result; on error the old one stays."
    );
    describe_gauge!(ROOMS, "Rooms with state on this node.");
    describe_gauge!(
        ROOM_MEMBERS,
        "Room memberships (connection x room) on this node."
    );
    describe_counter!(FRAMES_IN, "WebSocket data frames received from clients.");
    describe_counter!(FRAMES_OUT, "WebSocket data frames written to clients.");
    describe_counter!(BYTES_IN, "Payload bytes received from clients.");
    describe_counter!(BYTES_OUT, "Payload bytes written to clients.");
    describe_counter!(EVENTS, "Room events accepted for broadcast, by type.");
    describe_counter!(
        EVENTS_DROPPED,
        "Droppable events discarded because a room's window was full."
    );
    describe_counter!(BATCHES, "Batches flushed (one per room per window).");
    describe_histogram!(BATCH_EVENTS, "Events per flushed batch.");
    describe_counter!(DELIVERIES, "Batch frames queued to members.");
    describe_counter!(
        DELIVERIES_DEFLATED,
        "Batch frames queued to members that negotiated permessage-deflate, sent deflated (RSV1)."
    );
    describe_histogram!(
        DEFLATE_SECONDS,
        "Seconds to deflate one room window's frames in one format (once per window, shared by every member that negotiated permessage-deflate)."
    );
    describe_counter!(
        DEFLATE_FRAMES,
        "Window frames prepared for permessage-deflate members: compressed, or plain (under compression.min_bytes, or no gain)."
    );
    describe_counter!(
        DEFLATE_BYTES,
        "Bytes of window frames before (stage=in) and after (stage=out) deflating, once per window."
    );
    describe_counter!(
        CONNECTIONS_DEFLATE,
        "Connections opened, by whether they negotiated permessage-deflate (deflate=yes|no)."
    );
    describe_histogram!(
        BROADCAST_LATENCY,
        "Seconds from an event accepted (first of its window) to its frame written to a member."
    );
    describe_counter!(
        OUTBOUND_DROPPED,
        "Batch frames dropped for slow consumers (chat/presence only)."
    );
    describe_counter!(ERRORS, "Error frames sent to clients, by code.");
    describe_counter!(RATE_LIMITED, "Actions refused by a rate limit, by action.");
    describe_counter!(
        CHAT_SAMPLED_OUT,
        "Chat acked but left out of the broadcast by room.max_chat_per_s."
    );
    describe_counter!(
        GRAB_EVENTS_SAMPLED_OUT,
        "Grabs recorded but not broadcast (room.max_grab_events per window)."
    );
    describe_counter!(
        GIFTS_MERGED,
        "Gift events merged into an earlier one of the same window."
    );
    describe_counter!(REDPACKETS_CREATED, "Red packets created.");
    describe_counter!(
        MODERATION_ACTIONS,
        "Moderation changes made through this node's API (mute, unmute, ban, unban, settings, filters, recall)."
    );
    describe_counter!(
        MODERATION_REFUSED,
        "Client chat/gift refused by moderation, by reason (muted, chat_closed, slow_mode)."
    );
    describe_counter!(
        MODERATION_FILTERED,
        "Client chat caught by a keyword filter, by list (block: refused, mask: sent masked)."
    );
    describe_gauge!(
        MODERATION_ACTIVE_BANS,
        "Bans in force (cluster-wide state as this node knows it)."
    );
    describe_gauge!(
        MODERATION_ACTIVE_MUTES,
        "Room mutes in force (cluster-wide state as this node knows it)."
    );
    describe_counter!(
        RECOVERIES,
        "Joins with `since`, by result: recovered (everything after it answered) or missed (recovered: false)."
    );
    describe_counter!(
        STREAM_RECORDS,
        "Event stream records written (Redis Streams or files), by status."
    );
    describe_counter!(
        STREAM_DROPPED,
        "Event stream records dropped: the queue (stream.queue) was full, or left at drain."
    );
    describe_counter!(
        STREAM_ERRORS,
        "Event stream writes that failed (retried with backoff)."
    );
    describe_gauge!(
        STREAM_LAG,
        "Age of the oldest event stream record not yet written, as of the last write attempt."
    );
    describe_gauge!(STREAM_QUEUED, "Event stream records waiting to be written.");
    describe_counter!(REDPACKET_GRABS, "Red-packet grab attempts, by outcome.");
    describe_histogram!(
        REDPACKET_GRAB_SECONDS,
        "Time from grab received to durable record."
    );
    describe_counter!(JOURNAL_SYNCS, "Journal group commits (one fsync each).");
    describe_counter!(
        SETTLEMENT_FAILURES,
        "Settlement-log writes that failed after the journal committed (retried; reconciled at start)."
    );
}
