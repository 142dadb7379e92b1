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
    /// tungstenite's read buffer per connection, bytes.
    pub read_buffer: usize,
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
        })
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
        *stage = Stage::Upgrade;
        let (ws, _response) = tokio_tungstenite::client_async_with_config(
            self.request_url(index, room, token),
            tcp,
            Some(ws_config(self.read_buffer)),
        )
        .await
        .map_err(Failure::from_ws)?;
        Ok(Conn { ws })
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
            conn.ws
                .send(join)
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

    /// Reads until the `joined` echoing `reference` (skipping anything else) and returns
    /// that message; an `error` echoing it is [`Failure::ErrorFrame`].
    async fn wait_reply(&mut self, reference: i64) -> Result<Message, Failure> {
        loop {
            let msg = match self.ws.next().await {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
