//! Typed, validated configuration.
//!
//! Layers, later wins: the defaults compiled into this module (identical to the shipped
//! `config.toml`, which a test checks), then the TOML file (`--config PATH`, or
//! `./config.toml` when present), then environment variables `GATEWAY_<SECTION>__<KEY>`
//! (double underscore between section and key, e.g. `GATEWAY_ROOM__BATCH_MS=20`).
//! Layering is figment's job; this module owns the shape, the defaults and the checks
//! that serde cannot express (ranges, cross-field rules). Every error names the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Why a configuration could not be loaded. The message always names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value had the wrong type or a file did not parse.
    #[error("invalid configuration: {0}")]
    Parse(String),
    /// A value parsed but is out of its allowed range.
    #[error("invalid configuration: `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    /// `--config` named a file that does not exist.
    #[error("configuration file {0} not found")]
    Missing(PathBuf),
}

/// Longest `server.node_id`. The node id is part of every red-packet id, and those must
/// stay within the protocol's [`crate::protocol::MAX_ID_LEN`] (64): the longest form,
/// Redis's `rp{0..15}-{node}-{16 hex digits}`, adds 22 characters to the node id.
pub const MAX_NODE_ID_LEN: usize = 42;
/// Longest `redpacket.max_expires_in_s` (30 days): packet deadlines are kept in ms.
pub const MAX_EXPIRES_IN_S: u64 = 30 * 24 * 3600;
/// Longest `redpacket.retain_s` (a year).
pub const MAX_RETAIN_S: u64 = 365 * 24 * 3600;
/// Fastest accepted rate of a `ratelimit.*` budget (per second): one unit per µs.
pub const MAX_RATE: f64 = 1_000_000.0;
/// Lowest `limits.max_out_frame_bytes`: twice the largest API body (64 KiB), so any one
/// event fits in a frame of its own.
pub const MIN_OUT_FRAME_BYTES: usize = 131_072;

/// The whole gateway configuration, one section per `[table]` in `config.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `local` (one node, in-process) or `redis` (pub/sub across nodes).
    pub backplane: BackplaneKind,
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub api: ApiConfig,
    pub limits: LimitsConfig,
    pub room: RoomConfig,
    pub ratelimit: RateLimitConfig,
    pub redpacket: RedPacketConfig,
    pub data: DataConfig,
    pub redis: RedisConfig,
    pub presence: PresenceConfig,
    pub web: WebConfig,
    pub stream: StreamConfig,
    pub compression: CompressionConfig,
    /// The gift catalog: what clients may send (free) and what only the backend may (paid).
    pub gifts: Vec<GiftConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            backplane: BackplaneKind::Local,
            server: Default::default(),
            auth: Default::default(),
            api: Default::default(),
            limits: Default::default(),
            room: Default::default(),
            ratelimit: Default::default(),
            redpacket: Default::default(),
            data: Default::default(),
            redis: Default::default(),
            presence: Default::default(),
            web: Default::default(),
            stream: Default::default(),
            compression: Default::default(),
            gifts: vec![
                GiftConfig::new("rose", "Rose", true),
                GiftConfig::new("heart", "Heart", true),
                GiftConfig::new("rocket", "Rocket", false),
                GiftConfig::new("yacht", "Yacht", false),
            ],
        }
    }
}

/// Which backplane joins the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackplaneKind {
    /// A single node: rooms, presence, limits and red packets all in-process.
    Local,
    /// Nodes joined by Redis: pub/sub, presence hash, Lua limits and red packets.
    Redis,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db`; for a cluster, a comma-separated list of seed nodes.
    pub url: String,
    /// Redis Cluster: sharded pub/sub (SSUBSCRIBE/SPUBLISH, Redis >= 7).
    pub cluster: bool,
    /// Whether `/readyz` answers 503 while Redis is unreachable.
    pub required: bool,
    /// Envelopes buffered for publishing while Redis is slow or down; beyond, dropped
    /// (counted).
    pub publish_queue: usize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            cluster: false,
            required: false,
            publish_queue: 10_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    /// A node that has not refreshed its presence for this long is presumed dead and its
    /// viewers no longer counted.
    pub node_ttl_s: u64,
    /// How often a node publishes its per-room counts and reads the others'.
    pub sync_ms: u64,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            node_ttl_s: 10,
            sync_ms: 1000,
        }
    }
}

/// The browser demo page (always served at `/`) and its development helpers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    /// Lets anyone mint a client token (`GET /dev/token?name=`) and drop a red packet
    /// (`POST /dev/redpacket?room=`). For a laptop demo only; 404 when off.
    pub dev_tokens: bool,
}

/// A rate and a burst: `rate` units per second refill, at most `burst` at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub rate: f64,
    pub burst: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Chat per user.
    pub chat: Rate,
    /// Free gifts per user (paid gifts come from the backend, which bills first).
    pub gift: Rate,
    /// Red-packet grabs per user.
    pub grab: Rate,
    /// Joins per user (anonymous: per connection).
    pub join: Rate,
    /// Extra budget per IP for anonymous viewers; absent = off (carrier NAT).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anon_per_ip: Option<Rate>,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            chat: Rate {
                rate: 1.0,
                burst: 5,
            },
            gift: Rate {
                rate: 10.0,
                burst: 20,
            },
            grab: Rate {
                rate: 5.0,
                burst: 5,
            },
            join: Rate {
                rate: 5.0,
                burst: 10,
            },
            anon_per_ip: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedPacketConfig {
    /// Grabs of one packet in flight at once; beyond → `busy` (try again).
    pub max_concurrent_grabs: usize,
    /// Lifetime when the creator gives no `expires_in_s`.
    pub default_expires_in_s: u64,
    /// Longest `expires_in_s` accepted.
    pub max_expires_in_s: u64,
    /// A finished packet stays queryable this long, then is forgotten.
    pub retain_s: u64,
}

impl Default for RedPacketConfig {
    fn default() -> Self {
        Self {
            max_concurrent_grabs: 2000,
            default_expires_in_s: 300,
            max_expires_in_s: 86_400,
            retain_s: 86_400,
        }
    }
}

/// The event stream for the backend (PROTOCOL.md v1.1): every accepted room event and
/// moderation change, to Redis Streams (with the Redis backplane) or daily JSON-lines
/// files under `data.dir/events` (single node).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    /// Off by default: a platform that wants the records turns it on.
    pub enabled: bool,
    /// Records waiting to be written (Redis or the disk slow or down); beyond, new
    /// records are dropped and counted (`danmaku_stream_dropped_total`).
    pub queue: usize,
    /// Redis: each stream key is trimmed with `MAXLEN ~` this many entries.
    pub max_len: u64,
    /// Redis: stream keys, rooms spread over them by a hash of the room id (1: the one
    /// key `danmaku:events`; more: `danmaku:events:0`.. for Redis Cluster).
    pub shards: u32,
    /// Files: a day's file is continued in a new one (`events-DATE.N.jsonl`) past this
    /// many MiB.
    pub max_file_mb: u64,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            queue: 100_000,
            max_len: 1_000_000,
            shards: 1,
            max_file_mb: 256,
        }
    }
}

/// permessage-deflate (RFC 7692, PROTOCOL.md v1.1): room batches deflated once per
/// window and format, shared by every member that negotiated it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompressionConfig {
    /// Accept a client's `permessage-deflate` offer.
    pub enabled: bool,
    /// Frames smaller than this go plain (RSV1 clear): deflating them saves a few bytes
    /// for the CPU of a whole deflate.
    pub min_bytes: usize,
    /// zlib level, 1 (fastest) to 9 (smallest).
    pub level: u32,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            min_bytes: 256,
            level: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Directory of the red-packet journal and settlement log (created if missing).
    pub dir: PathBuf,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("data"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GiftConfig {
    pub id: String,
    pub name: String,
    /// Free gifts are sent by clients (rate limited); paid ones only via the HTTP API.
    pub free: bool,
}

impl GiftConfig {
    fn new(id: &str, name: &str, free: bool) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            free,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the HTTP + WebSocket listener binds.
    pub listen: SocketAddr,
    /// This node's id in `hello.node` and event ids; empty = generated at start.
    pub node_id: String,
    /// Room shards (actors); 0 = one per CPU core.
    pub shards: usize,
    /// Server pings every this many ms; a connection silent for twice this is closed 4000.
    pub heartbeat_ms: u64,
    /// On SIGTERM, connections are closed with 1001 spread over this many seconds.
    pub drain_s: u64,
    /// PROXY protocol (v1/v2) from an L4 load balancer: off, optional or required.
    pub proxy_protocol: ProxyProtocol,
    /// Addresses (CIDRs or single IPs) whose PROXY headers and `X-Forwarded-For` are
    /// believed; empty = nobody's.
    pub trusted_proxies: Vec<String>,
    /// From TCP accept to its first request head (PROXY header and TLS included, plain
    /// listeners too) a connection has this long, else it is closed; a keep-alive
    /// connection has as long for each next head.
    pub handshake_timeout_ms: u64,
    /// TLS on the listener; cert and key both empty = plain TCP.
    pub tls: TlsConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".parse().expect("literal address"),
            node_id: String::new(),
            shards: 0,
            heartbeat_ms: 25_000,
            drain_s: 10,
            proxy_protocol: ProxyProtocol::Off,
            trusted_proxies: Vec::new(),
            handshake_timeout_ms: 10_000,
            tls: TlsConfig::default(),
        }
    }
}

/// Whether connections start with a PROXY protocol header (HAProxy's, v1 text or v2
/// binary) carrying the client's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// Never read: the TCP peer is the client (bytes are HTTP or TLS from the start).
    Off,
    /// A trusted peer may send a header; one without is served as itself.
    Optional,
    /// A trusted peer must send a header, else it is closed.
    Required,
}

/// PEM files of the listener's certificate chain and private key, watched for changes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Private key of the leaf (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl TlsConfig {
    /// Whether TLS is on (both files named).
    pub fn enabled(&self) -> bool {
        !self.cert.as_os_str().is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 secret that signs client JWTs.
    pub secret: String,
    /// Whether a connection without a token may join rooms as a read-only viewer.
    pub allow_anonymous: bool,
}

/// The shipped secrets are for a laptop; `main` warns when they are still in use.
pub const DEV_SECRET: &str = "dev-secret-change-me";
pub const DEV_API_TOKEN: &str = "dev-api-token-change-me";

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            secret: DEV_SECRET.into(),
            allow_anonymous: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Bearer token backend services present on `/api/v1/...`.
    pub token: String,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            token: DEV_API_TOKEN.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Connections per node; beyond → HTTP 503 before the upgrade.
    pub max_conns: usize,
    /// Connections per client IP; 0 = off (carrier NAT puts thousands behind one address).
    pub max_conns_per_ip: usize,
    /// Rooms one connection may be in at once.
    pub rooms_per_conn: usize,
    /// Longest chat text, in characters.
    pub max_text_chars: usize,
    /// Largest inbound WebSocket message; larger → close 1009.
    pub max_frame_bytes: usize,
    /// Bad frames in a row before close 1008.
    pub max_bad_frames: u32,
    /// Frames a connection's outbound queue holds before the slow-consumer policy applies.
    pub outbound_queue: usize,
    /// Largest frame the gateway sends; a larger window is split into several `batch`
    /// frames and `joined.history` is trimmed to fit.
    pub max_out_frame_bytes: usize,
    /// Connections between TCP accept and a read request (or upgrade); more are closed
    /// at once, so silent sockets cannot exhaust the node's file descriptors.
    pub max_handshakes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_conns: 100_000,
            max_conns_per_ip: 0,
            rooms_per_conn: 8,
            max_text_chars: 200,
            max_frame_bytes: 65_536,
            max_bad_frames: 10,
            outbound_queue: 64,
            max_out_frame_bytes: 262_144,
            max_handshakes: 10_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoomConfig {
    /// A room's events are gathered this long and sent as one `batch` frame. Leading
    /// edge: the first event of a quiet room (nothing sent during the last `batch_ms`)
    /// goes at once, what follows within `batch_ms` together when it is up.
    pub batch_ms: u64,
    /// A `presence` event is sent this often when a room's online count changed.
    pub presence_ms: u64,
    /// Events kept per room for `join` with `history`.
    pub history_len: usize,
    /// Events kept per room for `join` with `since` (the recovery log, presence not
    /// kept); 0 turns recovery off (every `since` answers `recovered: false`).
    pub recovery_len: usize,
    /// Bytes (as JSON) the recovery log of one room may hold; the oldest events go
    /// first beyond it, so a room of large events keeps fewer than `recovery_len`.
    pub recovery_max_bytes: usize,
    /// Members per room on this node; 0 = unlimited. Beyond → `room_full`.
    pub max_members: usize,
    /// Events a room buffers inside one window; beyond, droppable events are dropped.
    pub max_pending: usize,
    /// An empty room's state (history) is forgotten after this many seconds.
    pub idle_ttl_s: u64,
    /// Chat broadcast per room per second; above it chat is acked but sampled out of
    /// the broadcast (counted). 0 = off.
    pub max_chat_per_s: u64,
    /// Chat bytes broadcast per room per second (text plus user, as encoded); above it
    /// chat is acked but sampled out of the broadcast (counted). Bounds what one member
    /// of the hottest room receives. 0 = off.
    pub max_chat_bytes_per_s: u64,
    /// `grab` events broadcast per room per window; the rest of a grab storm is counted
    /// but not broadcast (each grabber has its ack, the totals come in `redpacket_done`).
    /// 0 = unlimited.
    pub max_grab_events: u64,
    /// Distinct client gift events (free gifts, after merging a user's repeats) per room
    /// per window; beyond it a client's gift is refused with `rate_limited` until the
    /// next window. Gifts may not be dropped for a slow consumer, so without this cap a
    /// huge room spamming roses would send every member a multi-megabyte frame per
    /// window. Paid gifts from the HTTP API are never refused. 0 = unlimited.
    pub max_gift_events: u64,
}

impl Default for RoomConfig {
    fn default() -> Self {
        Self {
            batch_ms: 50,
            presence_ms: 1000,
            history_len: 100,
            recovery_len: 1000,
            recovery_max_bytes: 1 << 20,
            max_members: 0,
            max_pending: 10_000,
            idle_ttl_s: 300,
            max_chat_per_s: 0,
            max_chat_bytes_per_s: 262_144,
            max_grab_events: 10,
            max_gift_events: 200,
        }
    }
}

/// `Ok` if `ok`, else a [`ConfigError::Invalid`] naming `key`.
fn check(ok: bool, key: &'static str, message: &str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key,
            message: message.into(),
        })
    }
}

impl Config {
    /// Loads defaults, then `path` (or `./config.toml` if it exists), then `GATEWAY_*` env.
    ///
    /// # Errors
    /// A missing explicit file, a value of the wrong type, an unknown key, or a value
    /// out of range; the message names the key.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        match path {
            Some(p) if !p.exists() => return Err(ConfigError::Missing(p.to_path_buf())),
            Some(p) => fig = fig.merge(Toml::file(p)),
            None if Path::new("config.toml").exists() => fig = fig.merge(Toml::file("config.toml")),
            None => {}
        }
        Self::extract(fig.merge(Env::prefixed("GATEWAY_").split("__")))
    }

    /// Parses a TOML document over the defaults (no env): used by tests and `load`.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::extract(
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text)),
        )
    }

    fn extract(fig: Figment) -> Result<Self, ConfigError> {
        let cfg: Config = fig.extract().map_err(|e| {
            // figment's Display names the key ("for key `default.room.batch_ms`"); drop
            // the profile prefix so the message matches what the user wrote.
            ConfigError::Parse(e.to_string().replace("`default.", "`"))
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Range and cross-field checks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check(
            (1..=10_000_000).contains(&self.stream.queue),
            "stream.queue",
            "must be 1 to 10000000",
        )?;
        check(
            self.stream.max_len >= 1000,
            "stream.max_len",
            "must be at least 1000",
        )?;
        check(
            (1..=1024).contains(&self.stream.shards),
            "stream.shards",
            "must be 1 to 1024",
        )?;
        check(
            self.stream.max_file_mb >= 1,
            "stream.max_file_mb",
            "must be at least 1",
        )?;
        check(
            (1..=9).contains(&self.compression.level),
            "compression.level",
            "must be 1 to 9",
        )?;
        check(
            self.server.heartbeat_ms >= 100,
            "server.heartbeat_ms",
            "must be at least 100",
        )?;
        check(
            self.server.shards <= 1024,
            "server.shards",
            "must be at most 1024",
        )?;
        check(
            self.server.tls.cert.as_os_str().is_empty()
                == self.server.tls.key.as_os_str().is_empty(),
            "server.tls.key",
            "server.tls.cert and server.tls.key must be set together (or both left empty)",
        )?;
        if let Err(message) = crate::edge::trust::Trusted::parse(&self.server.trusted_proxies) {
            return Err(ConfigError::Invalid {
                key: "server.trusted_proxies",
                message,
            });
        }
        check(
            self.server.proxy_protocol == ProxyProtocol::Off
                || !self.server.trusted_proxies.is_empty(),
            "server.trusted_proxies",
            "must list the load balancers' addresses when server.proxy_protocol is not \"off\" \
             (a header from any other peer is refused)",
        )?;
        check(
            (100..=120_000).contains(&self.server.handshake_timeout_ms),
            "server.handshake_timeout_ms",
            "must be between 100 and 120000",
        )?;
        check(
            !self.auth.secret.is_empty(),
            "auth.secret",
            "must not be empty",
        )?;
        check(!self.api.token.is_empty(), "api.token", "must not be empty")?;
        check(
            self.limits.max_conns > 0,
            "limits.max_conns",
            "must be positive",
        )?;
        check(
            self.limits.rooms_per_conn > 0,
            "limits.rooms_per_conn",
            "must be positive",
        )?;
        check(
            self.limits.max_text_chars > 0,
            "limits.max_text_chars",
            "must be positive",
        )?;
        check(
            (256..=16 << 20).contains(&self.limits.max_frame_bytes),
            "limits.max_frame_bytes",
            "must be between 256 and 16777216",
        )?;
        check(
            (MIN_OUT_FRAME_BYTES..=16 << 20).contains(&self.limits.max_out_frame_bytes),
            "limits.max_out_frame_bytes",
            "must be between 131072 and 16777216 (one event may encode to a little over 64 KiB)",
        )?;
        check(
            self.limits.max_handshakes > 0,
            "limits.max_handshakes",
            "must be positive",
        )?;
        check(
            self.limits.max_bad_frames > 0,
            "limits.max_bad_frames",
            "must be positive",
        )?;
        check(
            self.limits.outbound_queue > 0,
            "limits.outbound_queue",
            "must be positive",
        )?;
        check(
            (1..=10_000).contains(&self.room.batch_ms),
            "room.batch_ms",
            "must be between 1 and 10000",
        )?;
        check(
            self.room.presence_ms >= 10,
            "room.presence_ms",
            "must be at least 10",
        )?;
        check(
            self.room.history_len <= 10_000,
            "room.history_len",
            "must be at most 10000",
        )?;
        check(
            self.room.recovery_len <= 100_000,
            "room.recovery_len",
            "must be at most 100000",
        )?;
        check(
            self.room.recovery_max_bytes >= 65_536 && self.room.recovery_max_bytes <= 1 << 30,
            "room.recovery_max_bytes",
            "must be 65536 (one event) to 1073741824",
        )?;
        check(
            self.room.max_pending > 0,
            "room.max_pending",
            "must be positive",
        )?;
        self.validate_durations()?;
        self.validate_node_id()?;
        self.validate_ratelimits()?;
        self.validate_redpackets()?;
        self.validate_gifts()?;
        check(
            self.redis.publish_queue > 0,
            "redis.publish_queue",
            "must be positive (0 would drop every room batch)",
        )?;
        Ok(())
    }

    /// Periods that become timers or are multiplied into ms: 0 would panic a timer (or
    /// spin), and a huge value would overflow an `Instant` or a ms deadline.
    fn validate_durations(&self) -> Result<(), ConfigError> {
        check(
            self.server.heartbeat_ms <= 3_600_000,
            "server.heartbeat_ms",
            "must be at most 3600000",
        )?;
        check(
            self.server.drain_s <= 3600,
            "server.drain_s",
            "must be at most 3600",
        )?;
        check(
            self.room.presence_ms <= 3_600_000,
            "room.presence_ms",
            "must be at most 3600000",
        )?;
        check(
            self.presence.sync_ms >= 1,
            "presence.sync_ms",
            "must be at least 1",
        )?;
        check(
            (1..=86_400).contains(&self.presence.node_ttl_s),
            "presence.node_ttl_s",
            "must be between 1 and 86400",
        )?;
        check(
            self.presence.node_ttl_s * 1000 > self.presence.sync_ms,
            "presence.node_ttl_s",
            "must be longer than presence.sync_ms, else live nodes are presumed dead between \
             two syncs",
        )
    }

    /// The node id appears in event and red-packet ids (which clients send back in
    /// `grab` and URLs), and a node drops envelopes carrying its own id.
    fn validate_node_id(&self) -> Result<(), ConfigError> {
        let id = &self.server.node_id;
        check(
            id.len() <= MAX_NODE_ID_LEN,
            "server.node_id",
            &format!("must be at most {MAX_NODE_ID_LEN} characters (it is part of packet ids)"),
        )?;
        check(
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-')),
            "server.node_id",
            "only [A-Za-z0-9_.:-] allowed (it is part of event and packet ids)",
        )
    }

    fn validate_ratelimits(&self) -> Result<(), ConfigError> {
        let rl = &self.ratelimit;
        let rates = [
            (
                "ratelimit.chat.rate",
                "ratelimit.chat.burst",
                Some(&rl.chat),
            ),
            (
                "ratelimit.gift.rate",
                "ratelimit.gift.burst",
                Some(&rl.gift),
            ),
            (
                "ratelimit.grab.rate",
                "ratelimit.grab.burst",
                Some(&rl.grab),
            ),
            (
                "ratelimit.join.rate",
                "ratelimit.join.burst",
                Some(&rl.join),
            ),
            (
                "ratelimit.anon_per_ip.rate",
                "ratelimit.anon_per_ip.burst",
                rl.anon_per_ip.as_ref(),
            ),
        ];
        for (rate_key, burst_key, r) in rates {
            let Some(r) = r else { continue };
            check(
                r.rate.is_finite() && r.rate > 0.0 && r.rate <= MAX_RATE,
                rate_key,
                &format!("must be a number above 0 and at most {MAX_RATE} (units per second)"),
            )?;
            check(r.burst >= 1, burst_key, "must be at least 1")?;
            let refill = crate::ratelimit::MAX_REFILL.as_secs();
            check(
                f64::from(r.burst) / r.rate <= refill as f64,
                rate_key,
                &format!(
                    "too slow: a full burst (burst / rate) must refill within {refill} seconds"
                ),
            )?;
        }
        Ok(())
    }

    fn validate_redpackets(&self) -> Result<(), ConfigError> {
        let rp = &self.redpacket;
        check(
            rp.max_concurrent_grabs >= 1,
            "redpacket.max_concurrent_grabs",
            "must be at least 1 (0 would answer every grab `busy`)",
        )?;
        check(
            (1..=MAX_EXPIRES_IN_S).contains(&rp.max_expires_in_s),
            "redpacket.max_expires_in_s",
            &format!("must be between 1 and {MAX_EXPIRES_IN_S}"),
        )?;
        check(
            (1..=rp.max_expires_in_s).contains(&rp.default_expires_in_s),
            "redpacket.default_expires_in_s",
            "must be between 1 and redpacket.max_expires_in_s",
        )?;
        check(
            rp.retain_s <= MAX_RETAIN_S,
            "redpacket.retain_s",
            &format!("must be at most {MAX_RETAIN_S}"),
        )
    }

    /// Gift ids follow the protocol's rule for the `gift` op (1-64 characters), so every
    /// catalog entry can be sent; and each id names one gift.
    fn validate_gifts(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for g in &self.gifts {
            check(
                (1..=crate::protocol::MAX_ID_LEN).contains(&g.id.len()),
                "gifts.id",
                &format!(
                    "gift id {:?} must be 1-{} characters",
                    g.id,
                    crate::protocol::MAX_ID_LEN
                ),
            )?;
            check(
                seen.insert(g.id.as_str()),
                "gifts.id",
                &format!("gift id {:?} appears more than once", g.id),
            )?;
        }
        Ok(())
    }

    /// Shard count with `0` resolved to the number of CPU cores.
    pub fn shard_count(&self) -> usize {
        match self.server.shards {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_equals_defaults() {
        let text = include_str!("../config.toml");
        assert_eq!(Config::from_toml(text).unwrap(), Config::default());
    }

    #[test]
    fn wrong_type_names_key() {
        let err = Config::from_toml("[room]\nbatch_ms = \"fast\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("room.batch_ms"), "{err}");
    }

    #[test]
    fn out_of_range_names_key() {
        let err = Config::from_toml("[room]\nbatch_ms = 0")
            .unwrap_err()
            .to_string();
        assert!(err.contains("room.batch_ms"), "{err}");
    }

    #[test]
    fn edge_keys_are_checked() {
        let err = Config::from_toml("[server.tls]\ncert = \"/c.pem\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.tls.key"), "{err}");
        let err = Config::from_toml("[server]\ntrusted_proxies = [\"10.0.0/8\"]")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("server.trusted_proxies") && err.contains("10.0.0/8"),
            "{err}"
        );
        let err = Config::from_toml("[server]\nproxy_protocol = \"required\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.trusted_proxies"), "{err}");
        let err = Config::from_toml("[server]\nproxy_protocol = \"sometimes\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.proxy_protocol"), "{err}");
        let cfg = Config::from_toml(
            "[server]\nproxy_protocol = \"optional\"\ntrusted_proxies = [\"10.0.0.0/8\", \"::1\"]\n\
             [server.tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\"",
        )
        .unwrap();
        assert_eq!(cfg.server.proxy_protocol, ProxyProtocol::Optional);
        assert!(cfg.server.tls.enabled());
    }

    /// Every value that would panic, overflow, deadlock or silently break something at
    /// run time is refused at load, naming its key.
    #[test]
    fn invalid_values_name_their_key() {
        let long_node = "n".repeat(MAX_NODE_ID_LEN + 1);
        let long_gift = "g".repeat(crate::protocol::MAX_ID_LEN + 1);
        let cases: Vec<(String, &str)> = vec![
            // One event (an API body is at most 64 KiB) must fit in a frame of its own.
            (
                "[limits]\nmax_out_frame_bytes = 131071".into(),
                "limits.max_out_frame_bytes",
            ),
            (
                "[limits]\nmax_handshakes = 0".into(),
                "limits.max_handshakes",
            ),
            ("[compression]\nlevel = 0".into(), "compression.level"),
            ("[compression]\nlevel = 10".into(), "compression.level"),
            // Rates: governor's quota needs a positive, finite period (1 / rate).
            (
                "[ratelimit]\nchat = { rate = 0.0, burst = 5 }".into(),
                "ratelimit.chat.rate",
            ),
            (
                "[ratelimit]\nchat = { rate = -1.0, burst = 5 }".into(),
                "ratelimit.chat.rate",
            ),
            (
                "[ratelimit]\ngift = { rate = nan, burst = 5 }".into(),
                "ratelimit.gift.rate",
            ),
            (
                "[ratelimit]\ngrab = { rate = inf, burst = 5 }".into(),
                "ratelimit.grab.rate",
            ),
            (
                "[ratelimit]\njoin = { rate = 1e7, burst = 5 }".into(),
                "ratelimit.join.rate",
            ),
            (
                "[ratelimit]\nchat = { rate = 1e-9, burst = 1 }".into(),
                "ratelimit.chat.rate",
            ),
            (
                "[ratelimit]\ngift = { rate = 1.0, burst = 0 }".into(),
                "ratelimit.gift.burst",
            ),
            (
                "[ratelimit]\nanon_per_ip = { rate = 0.0, burst = 5 }".into(),
                "ratelimit.anon_per_ip.rate",
            ),
            (
                "[ratelimit]\nanon_per_ip = { rate = 1.0, burst = 0 }".into(),
                "ratelimit.anon_per_ip.burst",
            ),
            // Red packets.
            (
                "[redpacket]\nmax_concurrent_grabs = 0".into(),
                "redpacket.max_concurrent_grabs",
            ),
            (
                "[redpacket]\ndefault_expires_in_s = 600\nmax_expires_in_s = 300".into(),
                "redpacket.default_expires_in_s",
            ),
            (
                "[redpacket]\ndefault_expires_in_s = 0".into(),
                "redpacket.default_expires_in_s",
            ),
            (
                "[redpacket]\nmax_expires_in_s = 9223372036854775807".into(),
                "redpacket.max_expires_in_s",
            ),
            (
                "[redpacket]\nretain_s = 9223372036854775807".into(),
                "redpacket.retain_s",
            ),
            // Gifts.
            (
                "[[gifts]]\nid = \"rose\"\nname = \"A\"\nfree = true\n\
                 [[gifts]]\nid = \"rose\"\nname = \"B\"\nfree = false"
                    .into(),
                "gifts.id",
            ),
            (
                "[[gifts]]\nid = \"\"\nname = \"Nothing\"\nfree = true".into(),
                "gifts.id",
            ),
            (
                format!("[[gifts]]\nid = \"{long_gift}\"\nname = \"Long\"\nfree = true"),
                "gifts.id",
            ),
            // The node id is part of packet ids.
            (
                format!("[server]\nnode_id = \"{long_node}\""),
                "server.node_id",
            ),
            ("[server]\nnode_id = \"gw/1\"".into(), "server.node_id"),
            // Timers and ms arithmetic.
            ("[presence]\nsync_ms = 0".into(), "presence.sync_ms"),
            ("[presence]\nnode_ttl_s = 0".into(), "presence.node_ttl_s"),
            (
                "[presence]\nnode_ttl_s = 1\nsync_ms = 1000".into(),
                "presence.node_ttl_s",
            ),
            (
                "[presence]\nnode_ttl_s = 9223372036854775807".into(),
                "presence.node_ttl_s",
            ),
            ("[redis]\npublish_queue = 0".into(), "redis.publish_queue"),
            ("[room]\nbatch_ms = 0".into(), "room.batch_ms"),
            ("[room]\npresence_ms = 0".into(), "room.presence_ms"),
            (
                "[room]\npresence_ms = 9223372036854775807".into(),
                "room.presence_ms",
            ),
            (
                "[limits]\noutbound_queue = 0".into(),
                "limits.outbound_queue",
            ),
            ("[server]\nshards = 100000".into(), "server.shards"),
            ("[server]\nheartbeat_ms = 0".into(), "server.heartbeat_ms"),
            (
                "[server]\nheartbeat_ms = 9223372036854775807".into(),
                "server.heartbeat_ms",
            ),
            (
                "[server]\ndrain_s = 9223372036854775807".into(),
                "server.drain_s",
            ),
        ];
        for (toml, key) in cases {
            let err = Config::from_toml(&toml)
                .map(|_| ())
                .expect_err(&format!("accepted: {toml}"));
            let msg = err.to_string();
            assert!(
                matches!(&err, ConfigError::Invalid { key: k, .. } if *k == key),
                "{toml}: expected `{key}`, got {msg}"
            );
            assert!(msg.contains(key), "{msg}");
        }
    }

    #[test]
    fn limits_at_their_bounds_are_accepted() {
        let node = "n".repeat(MAX_NODE_ID_LEN);
        let gift = "g".repeat(crate::protocol::MAX_ID_LEN);
        let cfg = Config::from_toml(&format!(
            "[server]\nnode_id = \"{node}\"\n\
             [ratelimit]\nchat = {{ rate = 1000000.0, burst = 1 }}\n\
             anon_per_ip = {{ rate = 0.01, burst = 50 }}\n\
             [redpacket]\nmax_concurrent_grabs = 1\ndefault_expires_in_s = 2592000\n\
             max_expires_in_s = 2592000\nretain_s = 31536000\n\
             [presence]\nnode_ttl_s = 2\nsync_ms = 1999\n\
             [redis]\npublish_queue = 1\n\
             [limits]\nmax_out_frame_bytes = 131072\nmax_handshakes = 1\n\
             [[gifts]]\nid = \"{gift}\"\nname = \"Long\"\nfree = true"
        ))
        .unwrap();
        // The rate limiter is built from them without panicking.
        crate::ratelimit::RateLimits::new(&cfg.ratelimit);
    }

    /// The longest node id keeps the longest packet id (a Redis store's) within the
    /// protocol's id limit, so its packets can be grabbed.
    #[test]
    fn longest_node_id_keeps_packet_ids_within_the_protocol() {
        let node = "n".repeat(MAX_NODE_ID_LEN);
        for _ in 0..200 {
            let id = crate::redpacket::redis::RedisStore::packet_id(&node);
            assert!(id.len() <= crate::protocol::MAX_ID_LEN, "{id}");
        }
        // The default (local store) form is shorter.
        assert!(format!("rp-{node}-{:016x}", u64::MAX).len() <= crate::protocol::MAX_ID_LEN);
    }

    /// A generated node id is a valid one, and random enough that a fleet's ids do not
    /// collide (24 bits collided about a dozen times in 20,000 draws).
    #[test]
    fn generated_node_ids_are_valid_and_do_not_collide() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20_000 {
            let id = crate::server::generate_node_id();
            let mut cfg = Config::default();
            cfg.server.node_id = id.clone();
            cfg.validate().unwrap();
            assert!(seen.insert(id.clone()), "{id} drawn twice");
        }
    }

    #[test]
    fn unknown_key_is_refused() {
        let err = Config::from_toml("[room]\nbatchms = 3")
            .unwrap_err()
            .to_string();
        assert!(err.contains("batchms"), "{err}");
    }
}
