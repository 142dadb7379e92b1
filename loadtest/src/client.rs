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

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message, http::Uri};

use crate::proto::{self, Decoded, Format};
use crate::sys;

/// The WebSocket configuration of every client connection: 4 KiB read buffer, no write
/// buffering (each frame goes out when sent; latency matters more than syscalls here).
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20))
}

/// Where and how connections are made; shared by all connection tasks of a run.
#[derive(Debug, Clone)]
pub struct Target {
    /// `ws://host:port/path`, without query.
    base_url: String,
    /// The resolved server address.
    server: SocketAddr,
    /// Source addresses to bind, round-robin by connection index; empty = kernel's choice.
    sources: Vec<IpAddr>,
    /// Wire format requested with `format=`.
    pub format: Format,
    /// Bound on TCP connect + upgrade + `joined`, per connection.
    pub connect_timeout: Duration,
}

impl Target {
    /// Parses and resolves `url` (`ws://` only: this tool measures the gateway, not TLS).
    ///
    /// # Errors
    /// A URL that is not `ws://host[:port]/path`, a host that does not resolve, or a
    /// source address of another family than the server's.
    pub async fn resolve(
        url: &str,
        sources: Vec<IpAddr>,
        format: Format,
        connect_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let uri: Uri = url.parse().with_context(|| format!("bad --url {url:?}"))?;
        if uri.scheme_str() != Some("ws") {
            bail!("--url must start with ws:// (got {url:?})");
        }
        if uri.query().is_some() {
            bail!("--url must not carry a query: the tool adds token, room and format");
        }
        let host = uri.host().context("--url has no host")?;
        let port = uri.port_u16().unwrap_or(80);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .with_context(|| format!("resolving {host}"))?
            .collect();
        if let Some(src) = sources.first() {
            addrs.retain(|a| a.is_ipv4() == src.is_ipv4());
        }
        let server = *addrs
            .first()
            .with_context(|| format!("{host} has no address usable with the --sources given"))?;
        if sources.iter().any(|s| s.is_ipv4() != server.is_ipv4()) {
            bail!("--sources mixes address families");
        }
        let base_url = url.to_string();
        Ok(Self {
            base_url,
            server,
            sources,
            format,
            connect_timeout,
        })
    }

    /// The server address connections go to.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// The upgrade URL for one connection.
    fn request_url(&self, room: &str, token: Option<&str>) -> String {
        let mut url = format!(
            "{}?room={room}&format={}",
            self.base_url,
            self.format.as_str()
        );
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
        let tcp = self.tcp_connect(index).await?;
        *stage = Stage::Upgrade;
        let (ws, _response) = tokio_tungstenite::client_async_with_config(
            self.request_url(room, token),
            tcp,
            Some(ws_config()),
        )
        .await
        .map_err(Failure::from_ws)?;
        *stage = Stage::Joined;
        let mut conn = Conn { ws };
        let joined = conn.wait_joined().await?;
        Ok((conn, joined))
    }

    /// TCP connect, from `sources[index % len]` when sources were given.
    async fn tcp_connect(&self, index: usize) -> Result<TcpStream, Failure> {
        let stream = if self.sources.is_empty() {
            TcpStream::connect(self.server)
                .await
                .map_err(|e| Failure::Tcp(e.kind()))?
        } else {
            let source = self.sources[index % self.sources.len()];
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
                .connect(self.server)
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
        tungstenite::Error::Io(io) => format!("io {:?}", io.kind()),
        tungstenite::Error::Protocol(p) => format!("protocol: {p}"),
        tungstenite::Error::Capacity(c) => format!("capacity: {c}"),
        tungstenite::Error::Http(resp) => format!("http {}", resp.status().as_u16()),
        other => {
            let s = other.to_string();
            s.split(':').next().unwrap_or("error").to_string()
        }
    }
}

/// An open WebSocket connection that has joined its room.
pub struct Conn {
    ws: WebSocketStream<TcpStream>,
}

impl Conn {
    /// Reads until `joined` (skipping `hello` and anything else).
    async fn wait_joined(&mut self) -> Result<Joined, Failure> {
        loop {
            let msg = match self.ws.next().await {
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

    /// The next message; `None` once the stream has ended. Cancel-safe (for `select!`).
    /// Pings are answered by tungstenite while reading.
    pub async fn recv(&mut self) -> Option<Result<Message, tungstenite::Error>> {
        self.ws.next().await
    }

    /// Sends one message.
    ///
    /// # Errors
    /// The connection is closed or broken.
    pub async fn send(&mut self, msg: Message) -> Result<(), tungstenite::Error> {
        self.ws.send(msg).await
    }

    /// Sends a close frame (best effort, bounded by `within`) and drops the connection.
    pub async fn close(mut self, within: Duration) {
        let _ = tokio::time::timeout(within, self.ws.close(None)).await;
    }
}
