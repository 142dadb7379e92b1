//! One client connection: TCP connect from a chosen source address, the WebSocket upgrade
//! with a small-footprint configuration, and the wait for `hello` + `joined`.
//!
//! Every scenario opens its connections through [`Target::open`], which either returns a
//! connection that is a member of its room or a [`Failure`] whose [`Failure::reason`] is a
//! short, low-cardinality label (the reports group failures by it).
//!
//! Footprint: tungstenite eagerly allocates (and zero-fills on reads) a 128 KiB read
//! buffer per socket by default; [`ws_config`] shrinks it to 4 KiB and writes frames
//! straight through, so 15k client connections cost tens of MiB, not gigabytes.
//!
//! Every socket is read through a [`Wire`], which counts the bytes into the target's
//! [`WireMeter`] (what a scenario reports as bytes on the wire).
//!
//! Compression (`--compress`): tungstenite has no permessage-deflate, so those connections
//! use yawc instead, behind the same [`Conn`] (messages are converted to tungstenite's
//! [`Message`], errors wrapped in a tungstenite error, so scenarios see no difference).
//! The upgrade is written here rather than by yawc: it offers
//! `permessage-deflate; client_max_window_bits` (what browsers send), learns whether the
//! gateway agreed (counted, see [`DeflateSummary`]) and maps a refused upgrade to
//! [`Failure::Http`] like the plain path; yawc then runs the agreed terms
//! (`from_stream_with_extensions`). Memory stays near the plain client's: the read buffer
//! is the same size, and since the gateway answers `server_no_context_takeover` the
//! inflater is borrowed from a pool shared by the run for one message at a time (a private
//! one, a 32 KiB window plus zlib state and an output buffer, would cost tens of KiB per
//! connection). The tool's own messages (chats, ~100-250 bytes) stay below the
//! compression threshold, as the gateway's small frames do.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes, http::Uri};
use yawc::{DeflatePool, OpCode, Options, Role, WebSocketError};

use crate::proto::{self, Decoded, Format};
use crate::sys;
use crate::wire::{Rsv1Queue, Wire, WireMeter};

/// The default read buffer per connection.
pub const READ_BUFFER: usize = 4096;

/// The WebSocket configuration of every client connection: a small read buffer
/// (`read_buffer` bytes, default [`READ_BUFFER`]), no write buffering (each frame goes
/// out when sent; latency matters more than syscalls here).
pub fn ws_config(read_buffer: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buffer.max(512))
        .write_buffer_size(0)
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20))
}

/// What a `--compress` connection offers in its upgrade request.
pub const DEFLATE_OFFER: &str = "permessage-deflate; client_max_window_bits";
/// Messages the tool sends below this size go uncompressed (the gateway's own threshold
/// for its frames): deflate does not shrink a chat op.
const DEFLATE_THRESHOLD: usize = 256;
/// Idle inflaters (and deflaters) kept for reuse: about the messages handled at once,
/// i.e. worker threads, not connections.
const DEFLATE_POOL: usize = 64;
/// Largest upgrade response head read (status line and headers).
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Largest message accepted, as [`ws_config`] does for tungstenite.
const MAX_MESSAGE: usize = 16 << 20;
/// yawc's write buffer per connection: one chat op fits; it grows for a larger frame
/// and shrinks back once written.
const DEFLATE_WRITE_BUFFER: usize = 512;

/// The `--compress` part of a [`Target`]: the options every such connection runs with and
/// how their upgrades went.
#[derive(Debug)]
struct Deflate {
    pool: DeflatePool,
    offered: AtomicU64,
    negotiated: AtomicU64,
    /// The first agreement seen (`Sec-WebSocket-Extensions` of a 101).
    agreed: OnceLock<String>,
}

/// How the permessage-deflate offers of a run went.
#[derive(Debug, Clone, Serialize)]
pub struct DeflateSummary {
    /// Upgrades that offered permessage-deflate (and got a 101).
    pub offered: u64,
    /// Of them, those the gateway answered with a permessage-deflate agreement; the rest
    /// run uncompressed.
    pub negotiated: u64,
    /// The agreement as the gateway wrote it (the first one seen).
    pub agreed: Option<String>,
}

/// One gateway endpoint: a `ws://` URL and the address it resolved to.
#[derive(Debug, Clone)]
struct Endpoint {
    /// `ws://host:port/path`, without query.
    base_url: String,
    /// The resolved server address.
    server: SocketAddr,
}

/// Where and how connections are made; shared by all connection tasks of a run.
#[derive(Debug, Clone)]
pub struct Target {
    /// Gateway endpoints; connection `i` goes to `endpoints[i % len]` (round-robin).
    endpoints: Vec<Endpoint>,
    /// Source addresses to bind, round-robin per endpoint; empty = kernel's choice.
    sources: Vec<IpAddr>,
    /// Wire format requested with `format=`.
    pub format: Format,
    /// Bound on TCP connect + upgrade + `joined`, per connection.
    pub connect_timeout: Duration,
    /// The read buffer per connection (tungstenite's or yawc's), bytes.
    pub read_buffer: usize,
    /// Bytes read from every connection's socket.
    meter: Arc<WireMeter>,
    /// Set with `--compress`: connections offer permessage-deflate (and use yawc).
    deflate: Option<Arc<Deflate>>,
}

/// Checks one `--target` URL: `ws://host[:port]/path`, no query.
///
/// # Errors
/// Another scheme, a query, or no host.
pub fn check_ws_url(url: &str) -> anyhow::Result<()> {
    let uri: Uri = url
        .parse()
        .with_context(|| format!("bad --target {url:?}"))?;
    if uri.scheme_str() != Some("ws") {
        bail!("--target must start with ws:// (got {url:?})");
    }
    if uri.query().is_some() {
        bail!("--target must not carry a query: the tool adds token, room and format");
    }
    uri.host()
        .with_context(|| format!("--target {url:?} has no host"))?;
    Ok(())
}

impl Target {
    /// Parses and resolves `urls` (`ws://` only: this tool measures the gateway, not
    /// TLS); connections are spread over them round-robin.
    ///
    /// # Errors
    /// No URL, a URL that is not `ws://host[:port]/path`, a host that does not resolve,
    /// or a source address of another family than a server's.
    pub async fn resolve(
        urls: &[String],
        sources: Vec<IpAddr>,
        format: Format,
        connect_timeout: Duration,
    ) -> anyhow::Result<Self> {
        if urls.is_empty() {
            bail!("no --target given");
        }
        if let Some(src) = sources.first()
            && sources.iter().any(|s| s.is_ipv4() != src.is_ipv4())
        {
            bail!("--sources mixes address families");
        }
        let mut endpoints = Vec::with_capacity(urls.len());
        for url in urls {
            check_ws_url(url)?;
            let (_, host, port, _) = crate::http::split_url(url)?;
            let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
                .await
                .with_context(|| format!("resolving {host}"))?
                .collect();
            if let Some(src) = sources.first() {
                addrs.retain(|a| a.is_ipv4() == src.is_ipv4());
            }
            let server = *addrs.first().with_context(|| {
                format!("{host} has no address usable with the --sources given")
            })?;
            endpoints.push(Endpoint {
                base_url: url.clone(),
                server,
            });
        }
        Ok(Self {
            endpoints,
            sources,
            format,
            connect_timeout,
            read_buffer: READ_BUFFER,
            meter: Arc::new(WireMeter::default()),
            deflate: None,
        })
    }

    /// Makes every connection from now on offer permessage-deflate (`--compress`).
    pub fn enable_deflate(&mut self) {
        self.deflate = Some(Arc::new(Deflate {
            pool: DeflatePool::new(DEFLATE_POOL),
            offered: AtomicU64::new(0),
            negotiated: AtomicU64::new(0),
            agreed: OnceLock::new(),
        }));
    }

    /// Whether connections offer permessage-deflate.
    pub fn compress(&self) -> bool {
        self.deflate.is_some()
    }

    /// How the permessage-deflate offers went so far; `None` without `--compress`.
    pub fn deflate_summary(&self) -> Option<DeflateSummary> {
        self.deflate.as_ref().map(|d| DeflateSummary {
            offered: d.offered.load(Relaxed),
            negotiated: d.negotiated.load(Relaxed),
            agreed: d.agreed.get().cloned(),
        })
    }

    /// Bytes read from all connections' sockets so far (a phase's bytes are the
    /// difference of two readings).
    pub fn wire_bytes_in(&self) -> u64 {
        self.meter.total()
    }

    /// The server addresses connections go to, for log lines.
    pub fn describe(&self) -> String {
        let addrs: Vec<String> = self
            .endpoints
            .iter()
            .map(|e| e.server.to_string())
            .collect();
        if addrs.len() == 1 {
            addrs[0].clone()
        } else {
            format!("{} (round-robin)", addrs.join(", "))
        }
    }

    /// The source addresses connections are bound to (empty: the kernel's choice).
    pub fn sources(&self) -> &[IpAddr] {
        &self.sources
    }

    /// With no source addresses given and every endpoint on IPv4 loopback, spreads
    /// connections over 127.0.0.1..=127.0.0.`n` (each reaches ~28k ports per endpoint:
    /// one alone runs out of ports for large silent or idle crowds). True if it did.
    pub fn spread_loopback_sources(&mut self, n: u8) -> bool {
        let loopback = self
            .endpoints
            .iter()
            .all(|e| e.server.is_ipv4() && e.server.ip().is_loopback());
        if !self.sources.is_empty() || !loopback || n == 0 {
            return false;
        }
        self.sources = (1..=n)
            .map(|i| IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, i)))
            .collect();
        true
    }

    fn endpoint(&self, index: usize) -> &Endpoint {
        &self.endpoints[index % self.endpoints.len()]
    }

    /// The source address for connection `index`: round-robin over the sources within
    /// each endpoint's share, so every endpoint gets every source's ports.
    fn source(&self, index: usize) -> Option<IpAddr> {
        if self.sources.is_empty() {
            return None;
        }
        let per_endpoint = index / self.endpoints.len();
        Some(self.sources[per_endpoint % self.sources.len()])
    }

    /// The upgrade URL for connection `index` (joining `room` at once, if given).
    fn request_url(&self, index: usize, room: Option<&str>, token: Option<&str>) -> String {
        let mut url = format!("{}?", self.endpoint(index).base_url);
        if let Some(room) = room {
            url.push_str("room=");
            url.push_str(room);
            url.push('&');
        }
        url.push_str("format=");
        url.push_str(self.format.as_str());
        if let Some(token) = token {
            url.push_str("&token=");
            url.push_str(token);
        }
        url
    }

    /// Opens connection number `index` into `room` (anonymous without `token`) and
    /// waits for `joined`, all within [`Target::connect_timeout`].
    ///
    /// # Errors
    /// A [`Failure`] saying at which stage and why.
    pub async fn open(
        &self,
        index: usize,
        room: &str,
        token: Option<&str>,
    ) -> Result<(Conn, Joined), Failure> {
        let mut stage = Stage::Tcp;
        match tokio::time::timeout(
            self.connect_timeout,
            self.open_inner(index, room, token, &mut stage),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(Failure::Timeout(stage)),
        }
    }

    async fn open_inner(
        &self,
        index: usize,
        room: &str,
        token: Option<&str>,
        stage: &mut Stage,
    ) -> Result<(Conn, Joined), Failure> {
        let mut conn = self.upgrade(index, Some(room), token, stage).await?;
        *stage = Stage::Joined;
        let joined = conn.wait_joined().await?;
        Ok((conn, joined))
    }

    /// TCP connect and WebSocket upgrade for connection `index`.
    async fn upgrade(
        &self,
        index: usize,
        room: Option<&str>,
        token: Option<&str>,
        stage: &mut Stage,
    ) -> Result<Conn, Failure> {
        let tcp = self.tcp_connect(index).await?;
        let wire = Wire::new(tcp, Arc::clone(&self.meter), index);
        *stage = Stage::Upgrade;
        let url = self.request_url(index, room, token);
        let Some(deflate) = &self.deflate else {
            let (ws, _response) = tokio_tungstenite::client_async_with_config(
                url,
                wire,
                Some(ws_config(self.read_buffer)),
            )
            .await
            .map_err(Failure::from_ws)?;
            return Ok(Conn { ws: Ws::Plain(ws) });
        };
        deflate_upgrade(deflate, wire, &url, self.read_buffer).await
    }

    /// Opens connection number `index` without a room, sends `join` (an encoded `join`
    /// op carrying `ref` `reference`, e.g. with `since`) and waits for the `joined` that
    /// echoes `reference`, all within `limit`. Returns the connection and that `joined`
    /// message, for the caller to decode (its `history` and `recovered`).
    ///
    /// # Errors
    /// A [`Failure`] saying at which stage and why (an `error` answering the `join` is
    /// [`Failure::ErrorFrame`] with its code).
    pub async fn open_join(
        &self,
        index: usize,
        token: Option<&str>,
        join: Message,
        reference: i64,
        limit: Duration,
    ) -> Result<(Conn, Message), Failure> {
        let mut stage = Stage::Tcp;
        let work = async {
            let mut conn = self.upgrade(index, None, token, &mut stage).await?;
            stage = Stage::Joined;
            conn.send(join)
                .await
                .map_err(|e| Failure::Stream(short_ws_error(&e)))?;
            let joined = conn.wait_reply(reference).await?;
            Ok((conn, joined))
        };
        match tokio::time::timeout(limit, work).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Timeout(stage)),
        }
    }

    /// TCP connect to connection `index`'s endpoint, from its source address if any.
    ///
    /// # Errors
    /// A [`Failure`] (socket, bind or connect) saying why.
    pub async fn tcp_connect(&self, index: usize) -> Result<TcpStream, Failure> {
        let server = self.endpoint(index).server;
        let stream = if let Some(source) = self.source(index) {
            let socket = if source.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }
            .map_err(|e| Failure::Socket(e.kind()))?;
            // Let connect() pick the port against the full 4-tuple (best effort).
            sys::bind_address_no_port(&socket);
            socket
                .bind(SocketAddr::new(source, 0))
                .map_err(|e| Failure::Bind(source, e.kind()))?;
            socket
                .connect(server)
                .await
                .map_err(|e| Failure::Tcp(e.kind()))?
        } else {
            TcpStream::connect(server)
                .await
                .map_err(|e| Failure::Tcp(e.kind()))?
        };
        // Chats are small and latency is what is measured.
        stream
            .set_nodelay(true)
            .map_err(|e| Failure::Socket(e.kind()))?;
        Ok(stream)
    }
}

/// The `--compress` upgrade of one connection over `wire`: request with the offer, the
/// response head checked, then yawc over the socket with what the gateway agreed (if it
/// agreed nothing, the connection runs uncompressed).
async fn deflate_upgrade(
    deflate: &Deflate,
    mut wire: Wire<TcpStream>,
    url: &str,
    read_buffer: usize,
) -> Result<Conn, Failure> {
    let key = generate_key();
    let request = upgrade_request(url, &key)?;
    let io_failure = |e: std::io::Error| Failure::Handshake(format!("io {:?}", e.kind()));
    wire.write_all(request.as_bytes())
        .await
        .map_err(io_failure)?;
    let (head, leftover) = read_response_head(&mut wire).await?;
    let agreed = check_upgrade_response(&head, &key)?;
    deflate.offered.fetch_add(1, Relaxed);
    if let Some(agreed) = &agreed {
        deflate.negotiated.fetch_add(1, Relaxed);
        let _ = deflate.agreed.set(agreed.clone());
    }
    let rsv1 = Arc::new(Rsv1Queue::default());
    wire.start_frames(leftover, Arc::clone(&rsv1));
    let options = Options::default()
        .with_low_latency_compression()
        .with_compression_threshold(DEFLATE_THRESHOLD)
        .with_deflate_pool(deflate.pool.clone())
        .with_limits(MAX_MESSAGE, MAX_MESSAGE)
        .with_read_buffer_capacity(read_buffer.max(512))
        .with_write_buffer_capacity(DEFLATE_WRITE_BUFFER);
    let ws = yawc::WebSocket::from_stream_with_extensions(
        wire,
        Role::Client,
        agreed.as_deref(),
        options,
    )
    .map_err(|e| Failure::Handshake(short_yawc_error(&e)))?;
    Ok(Conn {
        ws: Ws::Deflate(Box::new(DeflateWs {
            ws,
            rsv1,
            last_compressed: None,
        })),
    })
}

/// The HTTP/1.1 upgrade request for `url` (`ws://host[:port]/path?query`) with key `key`,
/// offering [`DEFLATE_OFFER`].
fn upgrade_request(url: &str, key: &str) -> Result<String, Failure> {
    let bad_url = || Failure::Handshake("bad url".into());
    let uri: Uri = url.parse().map_err(|_| bad_url())?;
    let host = uri.authority().ok_or_else(bad_url)?.as_str();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    Ok(format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\
         Sec-WebSocket-Extensions: {DEFLATE_OFFER}\r\n\r\n"
    ))
}

/// Reads an HTTP response head (through the blank line) and returns it with the bytes
/// read past it (the server's first frames, which may share a segment with the 101).
/// Reads a request head just as well (the in-process test gateways do).
pub(crate) async fn read_response_head<S: AsyncRead + Unpin>(
    io: &mut S,
) -> Result<(Vec<u8>, Bytes), Failure> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0_u8; 1024];
    loop {
        let n = io
            .read(&mut chunk)
            .await
            .map_err(|e| Failure::Handshake(format!("io {:?}", e.kind())))?;
        if n == 0 {
            return Err(Failure::Handshake(
                "connection closed during upgrade".into(),
            ));
        }
        // The blank line may straddle two reads.
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        if let Some(at) = head[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            let end = from + at + 4;
            let rest = Bytes::copy_from_slice(&head[end..]);
            head.truncate(end);
            return Ok((head, rest));
        }
        if head.len() > MAX_RESPONSE_HEAD {
            return Err(Failure::Handshake("response head too large".into()));
        }
    }
}

/// Checks an upgrade response head against RFC 6455 §4.1 (101, `Upgrade: websocket`,
/// `Connection: upgrade`, the accept key of `key`) and returns the agreed extensions, if
/// any: permessage-deflate only (the one offered), with parameters yawc understands.
fn check_upgrade_response(head: &[u8], key: &str) -> Result<Option<String>, Failure> {
    let fail = |why: &str| Failure::Handshake(why.to_string());
    let text = std::str::from_utf8(head).map_err(|_| fail("response head not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut words = status_line.split(' ');
    let status: u16 = match (words.next(), words.next().map(str::parse)) {
        (Some(version), Some(Ok(status))) if version.starts_with("HTTP/1.") => status,
        _ => return Err(fail("bad status line")),
    };
    if status != 101 {
        return Err(Failure::Http(status));
    }
    let accept = derive_accept_key(key.as_bytes());
    let (mut upgrade, mut connection, mut accepted) = (false, false, false);
    let mut extensions: Vec<&str> = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| fail("bad header line"))?;
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade = value.eq_ignore_ascii_case("websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection = value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        } else if name.eq_ignore_ascii_case("sec-websocket-accept") {
            accepted = value == accept;
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            extensions.extend(value.split(',').map(str::trim).filter(|e| !e.is_empty()));
        }
    }
    if !upgrade {
        return Err(fail("no upgrade: websocket"));
    }
    if !connection {
        return Err(fail("no connection: upgrade"));
    }
    if !accepted {
        return Err(fail("bad sec-websocket-accept"));
    }
    match extensions.as_slice() {
        [] => Ok(None),
        [one] if deflate_agreement_ok(one) => Ok(Some((*one).to_string())),
        _ => Err(fail("extensions not offered")),
    }
}

/// One agreed extension is permessage-deflate with known, valueless or numeric
/// parameters (RFC 7692 §7.1); anything else is not what was offered.
fn deflate_agreement_ok(agreed: &str) -> bool {
    let mut parts = agreed.split(';').map(str::trim);
    if !parts
        .next()
        .is_some_and(|n| n.eq_ignore_ascii_case("permessage-deflate"))
    {
        return false;
    }
    parts.all(|param| {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (param, None),
        };
        match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" | "client_no_context_takeover" => value.is_none(),
            "server_max_window_bits" | "client_max_window_bits" => {
                value.is_none_or(|v| v.parse::<u8>().is_ok_and(|b| (8..=15).contains(&b)))
            }
            _ => false,
        }
    })
}

/// What the server said in `joined`.
#[derive(Debug, Clone, Copy)]
pub struct Joined {
    /// The room's online count, this connection included.
    pub online: u64,
}

/// How far a connection attempt had got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Tcp,
    Upgrade,
    Joined,
}

/// Why a connection attempt failed. `Display` is the grouping label of the reports.
#[derive(Debug)]
pub enum Failure {
    /// Creating or configuring the socket failed (e.g. out of file descriptors).
    Socket(std::io::ErrorKind),
    /// Binding the source address failed (e.g. its ports are exhausted).
    Bind(IpAddr, std::io::ErrorKind),
    /// TCP connect failed (refused, reset, no ports left, ...).
    Tcp(std::io::ErrorKind),
    /// The upgrade was answered with this HTTP status (401, 429, 503, ...).
    Http(u16),
    /// The WebSocket handshake failed otherwise.
    Handshake(String),
    /// The server answered an `error` frame instead of `joined`.
    ErrorFrame(String),
    /// The server closed the connection (with this close code) before `joined`.
    Closed(Option<u16>),
    /// The connection failed while waiting for `joined`.
    Stream(String),
    /// Not done within the connect timeout; the stage it was in.
    Timeout(Stage),
}

impl Failure {
    fn from_ws(e: tungstenite::Error) -> Self {
        match e {
            tungstenite::Error::Http(resp) => Failure::Http(resp.status().as_u16()),
            tungstenite::Error::Io(io) => Failure::Handshake(format!("io {:?}", io.kind())),
            other => Failure::Handshake(short_ws_error(&other)),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Socket(kind) => write!(f, "socket: {kind:?}"),
            Failure::Bind(src, kind) => write!(f, "bind {src}: {kind:?}"),
            Failure::Tcp(kind) => write!(f, "tcp connect: {kind:?}"),
            Failure::Http(status) => write!(f, "http {status}"),
            Failure::Handshake(msg) => write!(f, "handshake: {msg}"),
            Failure::ErrorFrame(code) => write!(f, "error frame: {code}"),
            Failure::Closed(Some(code)) => write!(f, "closed before joined: {code}"),
            Failure::Closed(None) => write!(f, "closed before joined"),
            Failure::Stream(msg) => write!(f, "read before joined: {msg}"),
            Failure::Timeout(Stage::Tcp) => write!(f, "timeout: tcp connect"),
            Failure::Timeout(Stage::Upgrade) => write!(f, "timeout: upgrade"),
            Failure::Timeout(Stage::Joined) => write!(f, "timeout: waiting for joined"),
        }
    }
}

/// A low-cardinality label for a WebSocket error (used as a report key).
pub fn short_ws_error(e: &tungstenite::Error) -> String {
    match e {
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            "connection closed".into()
        }
        tungstenite::Error::Io(io) => {
            match io
                .get_ref()
                .and_then(|e| e.downcast_ref::<WebSocketError>())
            {
                Some(yawc) => short_yawc_error(yawc),
                None => format!("io {:?}", io.kind()),
            }
        }
        tungstenite::Error::Protocol(p) => format!("protocol: {p}"),
        tungstenite::Error::Capacity(c) => format!("capacity: {c}"),
        tungstenite::Error::Http(resp) => format!("http {}", resp.status().as_u16()),
        other => {
            let s = other.to_string();
            s.split(':').next().unwrap_or("error").to_string()
        }
    }
}

/// A low-cardinality label for a yawc error (a `--compress` connection's).
fn short_yawc_error(e: &WebSocketError) -> String {
    match e {
        WebSocketError::ConnectionClosed => "connection closed".into(),
        WebSocketError::IoError(io) => format!("io {:?}", io.kind()),
        WebSocketError::FrameTooLarge => "capacity: frame too large".into(),
        other => format!("protocol: {other}"),
    }
}

/// A yawc error as the tungstenite error the scenarios handle: closed and I/O errors map
/// to theirs (same labels as a plain connection's), the rest ride in an I/O error that
/// [`short_ws_error`] unwraps.
fn from_yawc(e: WebSocketError) -> tungstenite::Error {
    match e {
        WebSocketError::ConnectionClosed => tungstenite::Error::ConnectionClosed,
        WebSocketError::IoError(io) => tungstenite::Error::Io(io),
        other => tungstenite::Error::Io(std::io::Error::other(other)),
    }
}

/// An open WebSocket connection that has joined its room.
pub struct Conn {
    ws: Ws,
}

/// The client behind a [`Conn`].
// Plain connections (the default, by the thousand) keep their stream inline, as before
// `--compress` existed; the rarer yawc one is boxed.
#[allow(clippy::large_enum_variant)]
enum Ws {
    /// tungstenite, without compression (the default).
    Plain(WebSocketStream<Wire<TcpStream>>),
    /// yawc, after a permessage-deflate offer.
    Deflate(Box<DeflateWs>),
}

/// A `--compress` connection.
struct DeflateWs {
    ws: yawc::WebSocket<Wire<TcpStream>>,
    /// RSV1 of the data messages, from the frame headers the socket reader saw.
    rsv1: Arc<Rsv1Queue>,
    /// Whether the latest text or binary message arrived compressed (`None`: unknown).
    last_compressed: Option<bool>,
}

impl DeflateWs {
    /// As [`Conn::recv`]; cancel-safe too: yawc keeps a partial frame in its buffer, and
    /// nothing after the one await can be cut short.
    async fn recv(&mut self) -> Option<Result<Message, tungstenite::Error>> {
        let frame = match self.ws.next_frame().await {
            Ok(frame) => frame,
            Err(WebSocketError::ConnectionClosed) => return None,
            Err(e) => return Some(Err(from_yawc(e))),
        };
        let (opcode, _, payload) = frame.into_parts();
        Some(match opcode {
            OpCode::Text => {
                self.last_compressed = self.rsv1.pop();
                Utf8Bytes::try_from(payload)
                    .map(Message::Text)
                    .map_err(tungstenite::Error::from)
            }
            OpCode::Binary => {
                self.last_compressed = self.rsv1.pop();
                Ok(Message::Binary(payload))
            }
            OpCode::Ping => Ok(Message::Ping(payload)),
            OpCode::Pong => Ok(Message::Pong(payload)),
            OpCode::Close => Ok(Message::Close(close_frame(&payload))),
            // yawc hands over whole messages; a lone continuation cannot come out.
            OpCode::Continuation => Err(tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::UnexpectedContinueFrame,
            )),
        })
    }
}

/// A close frame's payload (code, UTF-8 reason) as tungstenite's; `None` if it has none.
fn close_frame(payload: &Bytes) -> Option<CloseFrame> {
    let code = u16::from_be_bytes([*payload.first()?, *payload.get(1)?]);
    let reason = Utf8Bytes::try_from(payload.slice(2..)).unwrap_or_default();
    Some(CloseFrame {
        code: WsCloseCode::from(code),
        reason,
    })
}

/// A message to send as a yawc frame.
fn to_frame(msg: Message) -> Result<yawc::Frame, tungstenite::Error> {
    Ok(match msg {
        Message::Text(t) => yawc::Frame::text(Bytes::from(t)),
        Message::Binary(b) => yawc::Frame::binary(b),
        Message::Ping(p) => yawc::Frame::ping(p),
        Message::Pong(p) => yawc::Frame::pong(p),
        Message::Close(c) => {
            let (code, reason) = c.map_or((1000, Utf8Bytes::default()), |c| {
                (u16::from(c.code), c.reason)
            });
            yawc::Frame::close(yawc::close::CloseCode::from(code), reason.as_bytes())
        }
        Message::Frame(_) => {
            return Err(tungstenite::Error::Io(std::io::Error::other(
                "raw frames are not sent",
            )));
        }
    })
}

impl Conn {
    /// Reads until `joined` (skipping `hello` and anything else).
    async fn wait_joined(&mut self) -> Result<Joined, Failure> {
        loop {
            let msg = match self.recv().await {
                Some(Ok(msg)) => msg,
                Some(Err(e)) => return Err(Failure::Stream(short_ws_error(&e))),
                None => return Err(Failure::Closed(None)),
            };
            match proto::decode(&msg) {
                Decoded::Frame(f) if f.op == "joined" => {
                    return Ok(Joined {
                        online: f.online.unwrap_or(0),
                    });
                }
                Decoded::Frame(f) if f.op == "error" => {
                    return Err(Failure::ErrorFrame(f.code.unwrap_or("?").to_string()));
                }
                Decoded::Close(code) => return Err(Failure::Closed(code)),
                Decoded::Frame(_) | Decoded::Garbage(_) | Decoded::Control => {}
            }
        }
    }

    /// Reads until the `joined` echoing `reference` (skipping anything else) and returns
    /// that message; an `error` echoing it is [`Failure::ErrorFrame`].
    async fn wait_reply(&mut self, reference: i64) -> Result<Message, Failure> {
        loop {
            let msg = match self.recv().await {
                Some(Ok(msg)) => msg,
                Some(Err(e)) => return Err(Failure::Stream(short_ws_error(&e))),
                None => return Err(Failure::Closed(None)),
            };
            let outcome = match proto::decode(&msg) {
                Decoded::Frame(f) if f.reference == Some(reference) && f.op == "joined" => Ok(()),
                Decoded::Frame(f) if f.reference == Some(reference) && f.op == "error" => {
                    Err(Failure::ErrorFrame(f.code.unwrap_or("?").to_string()))
                }
                Decoded::Close(code) => Err(Failure::Closed(code)),
                Decoded::Frame(_) | Decoded::Garbage(_) | Decoded::Control => continue,
            };
            return outcome.map(|()| msg);
        }
    }

    /// The next message; `None` once the stream has ended. Cancel-safe (for `select!`).
    /// Pings are answered by tungstenite (or yawc) while reading.
    pub async fn recv(&mut self) -> Option<Result<Message, tungstenite::Error>> {
        match &mut self.ws {
            Ws::Plain(ws) => ws.next().await,
            Ws::Deflate(ws) => ws.recv().await,
        }
    }

    /// Whether the latest text or binary message [`Conn::recv`] returned arrived
    /// compressed (RSV1 set); `None` on a connection that did not offer compression (or
    /// if it cannot be told, see [`Rsv1Queue`]).
    pub fn last_compressed(&self) -> Option<bool> {
        match &self.ws {
            Ws::Plain(_) => None,
            Ws::Deflate(ws) => ws.last_compressed,
        }
    }

    /// Sends one message.
    ///
    /// # Errors
    /// The connection is closed or broken.
    pub async fn send(&mut self, msg: Message) -> Result<(), tungstenite::Error> {
        match &mut self.ws {
            Ws::Plain(ws) => ws.send(msg).await,
            Ws::Deflate(ws) => ws.ws.send(to_frame(msg)?).await.map_err(from_yawc),
        }
    }

    /// Sends a close frame (best effort, bounded by `within`) and drops the connection.
    pub async fn close(self, within: Duration) {
        match self.ws {
            Ws::Plain(mut ws) => {
                let _ = tokio::time::timeout(within, ws.close(None)).await;
            }
            Ws::Deflate(mut ws) => {
                let _ = tokio::time::timeout(within, SinkExt::close(&mut ws.ws)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn checks_target_urls() {
        assert!(check_ws_url("ws://127.0.0.1:8080/ws").is_ok());
        assert!(check_ws_url("wss://h/ws").is_err());
        assert!(check_ws_url("http://h/ws").is_err());
        assert!(check_ws_url("ws://h/ws?room=a").is_err());
        assert!(check_ws_url("not a url").is_err());
    }

    #[tokio::test]
    async fn loopback_targets_spread_over_loopback_sources_unless_given() {
        let urls = ["ws://127.0.0.1:1/ws".to_string()];
        let mut t = Target::resolve(&urls, Vec::new(), Format::Json, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(t.spread_loopback_sources(3));
        let sources: Vec<String> = t.sources().iter().map(ToString::to_string).collect();
        assert_eq!(sources, ["127.0.0.1", "127.0.0.2", "127.0.0.3"]);
        assert!(!t.spread_loopback_sources(3), "sources already set");
        let given = vec!["127.0.0.9".parse().unwrap()];
        let mut t = Target::resolve(&urls, given, Format::Json, Duration::from_secs(1))
            .await
            .unwrap();
        assert!(!t.spread_loopback_sources(8));
        assert_eq!(t.sources().len(), 1);
    }

    #[tokio::test]
    async fn assigns_endpoints_and_sources_round_robin() {
        let urls = [
            "ws://127.0.0.1:1/ws".to_string(),
            "ws://127.0.0.1:2/ws".into(),
        ];
        let sources: Vec<IpAddr> = vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()];
        let t = Target::resolve(&urls, sources, Format::Json, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(t.describe(), "127.0.0.1:1, 127.0.0.1:2 (round-robin)");
        let ports: Vec<u16> = (0..4).map(|i| t.endpoint(i).server.port()).collect();
        assert_eq!(ports, [1, 2, 1, 2]);
        // Every endpoint gets every source.
        let pairs: Vec<(u16, String)> = (0..4)
            .map(|i| {
                (
                    t.endpoint(i).server.port(),
                    t.source(i).unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            pairs,
            [
                (1, "127.0.0.1".to_string()),
                (2, "127.0.0.1".to_string()),
                (1, "127.0.0.2".to_string()),
                (2, "127.0.0.2".to_string())
            ]
        );
        assert!(
            t.request_url(3, Some("r"), Some("tok"))
                .starts_with("ws://127.0.0.1:2/ws?room=r&format=json&token=tok")
        );
        assert_eq!(
            t.request_url(0, None, None),
            "ws://127.0.0.1:1/ws?format=json"
        );
        assert!(
            Target::resolve(&[], vec![], Format::Json, Duration::from_secs(1))
                .await
                .is_err()
        );
        let mixed: Vec<IpAddr> = vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
        assert!(
            Target::resolve(&urls, mixed, Format::Json, Duration::from_secs(1))
                .await
                .is_err()
        );
    }

    /// What the gateway answers a permessage-deflate offer with.
    const AGREED: &str =
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    fn response(key: &str, extensions: Option<&str>) -> String {
        let mut r = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n",
            derive_accept_key(key.as_bytes())
        );
        if let Some(e) = extensions {
            r.push_str(&format!("Sec-WebSocket-Extensions: {e}\r\n"));
        }
        r.push_str("\r\n");
        r
    }

    #[test]
    fn upgrade_request_offers_deflate_on_the_target_path() {
        let r = upgrade_request("ws://127.0.0.1:8080/ws?room=a&format=json", "k==").unwrap();
        assert!(r.starts_with("GET /ws?room=a&format=json HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
        assert!(r.contains("\r\nSec-WebSocket-Key: k==\r\n"));
        assert!(r.contains(
            "\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        ));
        assert!(r.ends_with("\r\n\r\n"));
        assert!(upgrade_request("not a url", "k").is_err());
    }

    #[test]
    fn upgrade_responses_are_checked() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = |ext: Option<&str>| check_upgrade_response(response(key, ext).as_bytes(), key);
        assert_eq!(ok(None).unwrap(), None);
        assert_eq!(ok(Some(AGREED)).unwrap().as_deref(), Some(AGREED));
        assert!(ok(Some("permessage-deflate; client_max_window_bits=12")).is_ok());
        for bad in [
            "x-webkit-deflate-frame",
            "permessage-deflate; mystery",
            "permessage-deflate; server_max_window_bits=99",
            "permessage-deflate, permessage-deflate",
        ] {
            assert!(ok(Some(bad)).is_err(), "{bad}");
        }
        let refused = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
        assert!(matches!(
            check_upgrade_response(refused, key),
            Err(Failure::Http(503))
        ));
        let wrong_key = response("b3RoZXIga2V5IDEyMzQ1Ng==", None);
        assert!(check_upgrade_response(wrong_key.as_bytes(), key).is_err());
        let no_upgrade = response(key, None).replace("Upgrade: websocket\r\n", "");
        assert!(check_upgrade_response(no_upgrade.as_bytes(), key).is_err());
        assert!(check_upgrade_response(b"garbage\r\n\r\n", key).is_err());
    }

    /// A minimal gateway on yawc's server side: answers the upgrade (with `agree` as the
    /// extension agreement, if any), with `hello` in the same write as the 101, then
    /// `joined`, a large `batch` and a small one; returns the first text it receives.
    async fn yawc_gateway(
        agree: Option<&'static str>,
    ) -> (String, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let (head, _) = read_response_head(&mut tcp)
                .await
                .map_err(|e| e.to_string())
                .unwrap();
            let head = String::from_utf8(head).unwrap();
            assert!(head.contains(&format!("Sec-WebSocket-Extensions: {DEFLATE_OFFER}\r\n")));
            let key = head
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap()
                .to_string();
            let hello =
                br#"{"op":"hello","conn":"c1","node":"n","user":null,"heartbeat_ms":25000}"#;
            let mut first = response(&key, agree).into_bytes();
            first.extend([0x81, hello.len() as u8]);
            first.extend_from_slice(hello);
            tcp.write_all(&first).await.unwrap();
            let options = Options::default()
                .with_low_latency_compression()
                .with_compression_threshold(DEFLATE_THRESHOLD);
            let mut ws =
                yawc::WebSocket::from_stream_with_extensions(tcp, Role::Server, agree, options)
                    .unwrap();
            let events: Vec<String> = (0..40)
                .map(|i| format!(r#"{{"id":"n-{i}","ts":1,"type":"chat","user":{{"id":"u","name":"n"}},"text":"lt:x:0:{i}:1 哈哈哈哈哈"}}"#))
                .collect();
            let big = format!(
                r#"{{"op":"batch","room":"r","events":[{}]}}"#,
                events.join(",")
            );
            for text in [
                r#"{"op":"joined","room":"r","online":1,"history":[]}"#.to_string(),
                big,
                r#"{"op":"batch","room":"r","events":[]}"#.to_string(),
            ] {
                ws.send(yawc::Frame::text(text)).await.unwrap();
            }
            loop {
                let frame = ws.next_frame().await.unwrap();
                if frame.opcode() == OpCode::Text {
                    return frame.as_str().to_string();
                }
            }
        });
        (url, server)
    }

    #[tokio::test]
    async fn compress_negotiates_inflates_and_tells_compressed_batches() {
        let (url, server) = yawc_gateway(Some(AGREED)).await;
        let mut target = Target::resolve(&[url], Vec::new(), Format::Json, Duration::from_secs(5))
            .await
            .unwrap();
        target.enable_deflate();
        let (mut conn, joined) = target
            .open(0, "r", None)
            .await
            .map_err(|e| e.to_string())
            .unwrap();
        assert_eq!(joined.online, 1);
        let before = target.wire_bytes_in();
        let Some(Ok(Message::Text(big))) = conn.recv().await else {
            panic!("no batch")
        };
        assert!(big.len() > 3000 && big.as_str().contains("lt:x:0:39:1 哈哈哈哈哈"));
        assert_eq!(conn.last_compressed(), Some(true));
        let on_wire = target.wire_bytes_in() - before;
        let Some(Ok(Message::Text(small))) = conn.recv().await else {
            panic!("no small batch")
        };
        assert_eq!(small.as_str(), r#"{"op":"batch","room":"r","events":[]}"#);
        assert_eq!(
            conn.last_compressed(),
            Some(false),
            "below the threshold: plain"
        );
        assert!(
            on_wire < big.len() as u64 / 4,
            "{on_wire} bytes read for a {}-byte batch",
            big.len()
        );
        conn.send(proto::encode_chat(Format::Json, "r", "lt:x:0:1:2 草", 1))
            .await
            .unwrap();
        assert_eq!(
            server.await.unwrap(),
            r#"{"op":"chat","room":"r","text":"lt:x:0:1:2 草","ref":1}"#
        );
        let summary = target.deflate_summary().unwrap();
        assert_eq!((summary.offered, summary.negotiated), (1, 1));
        assert_eq!(summary.agreed.as_deref(), Some(AGREED));
        conn.close(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn compress_without_agreement_runs_plain() {
        let (url, server) = yawc_gateway(None).await;
        let mut target = Target::resolve(&[url], Vec::new(), Format::Json, Duration::from_secs(5))
            .await
            .unwrap();
        target.enable_deflate();
        let (mut conn, _) = target
            .open(0, "r", None)
            .await
            .map_err(|e| e.to_string())
            .unwrap();
        let Some(Ok(Message::Text(big))) = conn.recv().await else {
            panic!("no batch")
        };
        assert!(big.len() > 3000);
        assert_eq!(conn.last_compressed(), Some(false));
        conn.send(proto::encode_chat(Format::Json, "r", "x", 1))
            .await
            .unwrap();
        assert!(server.await.unwrap().contains(r#""text":"x""#));
        let summary = target.deflate_summary().unwrap();
        assert_eq!(
            (summary.offered, summary.negotiated, summary.agreed),
            (1, 0, None)
        );
    }

    #[tokio::test]
    async fn compress_maps_a_refused_upgrade_to_its_status() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let _ = read_response_head(&mut tcp).await;
            let _ = tcp
                .write_all(b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\n\r\n")
                .await;
        });
        let mut target = Target::resolve(&[url], Vec::new(), Format::Json, Duration::from_secs(5))
            .await
            .unwrap();
        target.enable_deflate();
        let failure = target.open(0, "r", None).await.err().unwrap();
        assert_eq!(failure.to_string(), "http 429");
    }

    #[tokio::test]
    async fn plain_connections_count_wire_bytes_too() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/ws", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            ws.send(Message::text(r#"{"op":"joined","room":"r","online":3}"#))
                .await
                .unwrap();
            ws.send(Message::text("x".repeat(1000))).await.unwrap();
            let _ = ws.next().await;
        });
        let target = Target::resolve(&[url], Vec::new(), Format::Json, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(!target.compress() && target.deflate_summary().is_none());
        let before = target.wire_bytes_in();
        let (mut conn, joined) = target
            .open(0, "r", None)
            .await
            .map_err(|e| e.to_string())
            .unwrap();
        assert_eq!(joined.online, 3);
        let Some(Ok(Message::Text(t))) = conn.recv().await else {
            panic!("no message")
        };
        assert_eq!((t.len(), conn.last_compressed()), (1000, None));
        // The 101 response, `joined` (2 + 38 bytes) and this frame (4 + 1000 bytes).
        let read = target.wire_bytes_in() - before;
        assert!((1044..1400).contains(&read), "{read}");
        conn.close(Duration::from_secs(1)).await;
        let _ = server.await;
    }
}
