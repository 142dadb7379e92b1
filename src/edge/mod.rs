//! The edge: everything between a TCP accept and the first HTTP byte, for a gateway
//! behind an L4 load balancer. It owns who the client is (the PROXY protocol header, and
//! the trust rule shared with `X-Forwarded-For` in [`trust`]) and TLS ([`tls`], with
//! certificates reloaded in place).
//!
//! [`Edge::listen`] gives axum a [`Listener`] whose `accept` only takes finished
//! connections off a queue: each connection's handshake (PROXY header, then TLS) runs in
//! its own task, at most [`MAX_HANDSHAKES`] at once, within `server.handshake_timeout_ms`,
//! so a slow or malicious client stalls nobody but itself. While the cap is reached the
//! acceptor stops accepting and new connections wait in the kernel's backlog. The address
//! handed to axum (and so `ConnectInfo`, per-IP limits and logs) is the client's: the one
//! a trusted PROXY header carried, else the TCP peer.
//!
//! With TLS off and `server.proxy_protocol = "off"` the edge is not used at all: the
//! server serves the plain `TcpListener` as it always has ([`Edge::is_plain`]).

pub mod proxy;
pub mod tls;
pub mod trust;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::serve::Listener;
use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use crate::config::{ProxyProtocol, ServerConfig};
use crate::metrics;
use proxy::ProxyError;
use tls::{CertStore, TlsError};
use trust::Trusted;

/// Handshakes (PROXY header + TLS) in flight at once; beyond, accepting pauses.
pub const MAX_HANDSHAKES: usize = 1024;
/// Finished connections waiting for axum's accept loop (which only spawns a task each).
const READY_QUEUE: usize = 256;

/// Why the edge could not be set up; the gateway does not start.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("invalid configuration: `server.trusted_proxies`: {0}")]
    Trusted(String),
}

/// Why one connection's handshake failed; it is closed, nothing else happens.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    #[error("handshake not done within server.handshake_timeout_ms")]
    Timeout,
}

impl HandshakeError {
    fn label(&self) -> &'static str {
        match self {
            Self::Proxy(e) => e.label(),
            Self::Tls(_) => "tls_error",
            Self::Timeout => "timeout",
        }
    }
}

/// How new connections are received, from `[server]`: built once at start.
#[derive(Clone)]
pub struct Edge {
    tls: Option<(TlsAcceptor, Arc<CertStore>)>,
    proxy: ProxyProtocol,
    trusted: Trusted,
    timeout: Duration,
}

impl Edge {
    /// Parses the trust list and loads the certificate, if any.
    ///
    /// # Errors
    /// A certificate or key that cannot be loaded, or a bad trust list; the message names
    /// the key.
    pub fn new(cfg: &ServerConfig) -> Result<Self, EdgeError> {
        let trusted = Trusted::parse(&cfg.trusted_proxies).map_err(EdgeError::Trusted)?;
        let tls = if cfg.tls.enabled() {
            let store = CertStore::open(&cfg.tls)?;
            let acceptor = TlsAcceptor::from(store.server_config()?);
            Some((acceptor, store))
        } else {
            None
        };
        Ok(Self {
            tls,
            proxy: cfg.proxy_protocol,
            trusted,
            timeout: Duration::from_millis(cfg.handshake_timeout_ms),
        })
    }

    /// Neither TLS nor PROXY protocol: the plain listener does.
    pub fn is_plain(&self) -> bool {
        self.tls.is_none() && self.proxy == ProxyProtocol::Off
    }

    pub fn tls_enabled(&self) -> bool {
        self.tls.is_some()
    }

    pub fn trusted(&self) -> &Trusted {
        &self.trusted
    }

    /// Starts reloading the certificate on file changes and SIGHUP (with TLS on).
    pub fn watch_certificates(&self, stop: &CancellationToken, tasks: &TaskTracker) {
        if let Some((_, store)) = &self.tls {
            store.watch(stop, tasks);
        }
    }

    /// Starts accepting on `listener`; handshakes run until the returned listener is
    /// dropped (axum drops it when it stops serving).
    pub fn listen(self, listener: TcpListener) -> io::Result<EdgeListener> {
        let local = listener.local_addr()?;
        let stop = CancellationToken::new();
        let (tx, rx) = mpsc::channel(READY_QUEUE);
        tokio::spawn(accept_loop(listener, Arc::new(self), tx, stop.clone()));
        Ok(EdgeListener {
            rx,
            local,
            _stop: stop.drop_guard(),
        })
    }

    /// One connection: PROXY header (if configured), then TLS (if configured).
    async fn handshake(
        &self,
        mut tcp: TcpStream,
        peer: SocketAddr,
    ) -> Result<(EdgeIo, SocketAddr), HandshakeError> {
        let (client, rest) = match self.proxy {
            ProxyProtocol::Off => (peer, Bytes::new()),
            mode => {
                let trusted = self.trusted.contains(peer.ip());
                let required = mode == ProxyProtocol::Required;
                let header = proxy::read_header(&mut tcp, trusted, required).await?;
                (header.client.unwrap_or(peer), header.rest)
            }
        };
        let io = Rewind::new(tcp, rest);
        let io = match &self.tls {
            None => EdgeIo::Plain(io),
            Some((acceptor, _)) => EdgeIo::Tls(Box::new(
                acceptor.accept(io).await.map_err(HandshakeError::Tls)?,
            )),
        };
        Ok((io, client))
    }
}

/// The [`Listener`] axum serves: finished connections, with the client's address.
pub struct EdgeListener {
    rx: mpsc::Receiver<(EdgeIo, SocketAddr)>,
    local: SocketAddr,
    /// Stops the acceptor and every handshake in flight when axum drops the listener.
    _stop: DropGuard,
}

impl Listener for EdgeListener {
    type Io = EdgeIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (EdgeIo, SocketAddr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The acceptor only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Accepts while a handshake slot is free, and hands each connection to its own task.
async fn accept_loop(
    listener: TcpListener,
    edge: Arc<Edge>,
    ready: mpsc::Sender<(EdgeIo, SocketAddr)>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let in_flight = metrics::edge_handshakes_in_flight();
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
        };
        let (edge, ready, stop, in_flight) = (
            Arc::clone(&edge),
            ready.clone(),
            stop.clone(),
            in_flight.clone(),
        );
        in_flight.increment(1.0);
        tokio::spawn(async move {
            let started = Instant::now();
            let result = tokio::select! {
                _ = stop.cancelled() => None,
                r = tokio::time::timeout(edge.timeout, edge.handshake(tcp, peer)) => {
                    Some(r.unwrap_or(Err(HandshakeError::Timeout)))
                }
            };
            in_flight.decrement(1.0);
            match result {
                None => {}
                Some(Ok(conn)) => {
                    metrics::edge_handshake("ok", started.elapsed());
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = ready.send(conn) => {}
                    }
                }
                Some(Err(e)) => {
                    metrics::edge_handshake(e.label(), started.elapsed());
                    report(peer, &e);
                }
            }
            drop(permit);
        });
    }
}

/// Logs a failed handshake: at debug level (scanners and dropped mobile connections are
/// routine), except a PROXY trust mismatch, which usually means `server.trusted_proxies`
/// or the balancer is misconfigured: warned at most every [`WARN_EVERY_S`].
fn report(peer: SocketAddr, e: &HandshakeError) {
    const WARN_EVERY_S: u64 = 10;
    static LAST_WARN: AtomicU64 = AtomicU64::new(0);
    let misconfigured = matches!(
        e,
        HandshakeError::Proxy(ProxyError::Untrusted | ProxyError::Missing)
    );
    if misconfigured {
        let now = crate::protocol::now_ms() / 1000;
        let last = LAST_WARN.load(Ordering::Relaxed);
        if now >= last + WARN_EVERY_S
            && LAST_WARN
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(%peer, error = %e, "connection refused (see server.trusted_proxies; counted in danmaku_edge_handshakes_total)");
            return;
        }
    }
    tracing::debug!(%peer, error = %e, "handshake failed");
}

/// As axum's own listener: a connection that died in the backlog is skipped; anything
/// else (out of file descriptors) is logged and accepting pauses a second.
async fn accept_error(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// A connection after its handshake.
pub enum EdgeIo {
    Plain(Rewind<TcpStream>),
    Tls(Box<TlsStream<Rewind<TcpStream>>>),
}

/// A stream that first replays bytes already read from it (what followed a PROXY header,
/// or what turned out not to be one).
pub struct Rewind<S> {
    replay: Option<Bytes>,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(inner: S, replay: Bytes) -> Self {
        Self {
            replay: (!replay.is_empty()).then_some(replay),
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(replay) = &mut self.replay {
            let n = replay.len().min(buf.remaining());
            buf.put_slice(&replay[..n]);
            replay.advance(n);
            if replay.is_empty() {
                self.replay = None;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl AsyncRead for EdgeIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for EdgeIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn rewind_replays_then_reads_on() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut r = Rewind::new(b, Bytes::from_static(b"hello "));
        a.write_all(b"world").await.unwrap();
        drop(a);
        let mut out = String::new();
        r.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    #[tokio::test]
    async fn rewind_replays_into_small_buffers() {
        let (_a, b) = tokio::io::duplex(64);
        let mut r = Rewind::new(b, Bytes::from_static(b"abcdef"));
        let mut two = [0u8; 2];
        for want in [b"ab", b"cd", b"ef"] {
            r.read_exact(&mut two).await.unwrap();
            assert_eq!(&two, want);
        }
        assert!(r.replay.is_none());
    }
}
