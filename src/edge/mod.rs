//! The edge: everything between a TCP accept and the first HTTP request, for a gateway
//! behind an L4 load balancer. It owns who the client is (the PROXY protocol header, and
//! the trust rule shared with `X-Forwarded-For` in [`trust`]), TLS ([`tls`], with
//! certificates reloaded in place), and the accept loop that serves every listener
//! ([`serve`]).
//!
//! Every listener goes through the edge, plain ones included: a connection that has not
//! yet sent a request head costs a descriptor and a task and is counted nowhere else
//! (`limits.max_conns` counts upgraded sessions only), so the edge is where such
//! connections are bounded. From TCP accept to its first request head a connection holds
//! one of `limits.max_handshakes` slots and has `server.handshake_timeout_ms`, PROXY
//! header and TLS included ([`serve`] says how). Each handshake runs in the connection's
//! own task, so a slow or malicious client stalls nobody but itself. The address handed
//! to the router (`ConnectInfo`, and so per-IP limits and logs) is the client's: the one a
//! trusted PROXY header carried, else the TCP peer.
//!
//! This file holds the parts every connection goes through in order: [`Edge`] (the
//! configuration, and `Edge::handshake`: PROXY header, then TLS), and the IO types the
//! router's upgrade gets back ([`EdgeIo`], [`Rewind`]).

pub mod proxy;
pub mod serve;
pub mod tls;
pub mod trust;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ProxyProtocol, ServerConfig};
use proxy::ProxyError;
use tls::{CertStore, TlsError};
use trust::Trusted;

/// Why the edge could not be set up; the gateway does not start.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("invalid configuration: `server.trusted_proxies`: {0}")]
    Trusted(String),
}

/// Why a connection ended before its first request head; it is closed, nothing else
/// happens.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    #[error("no request head within server.handshake_timeout_ms of accept")]
    Timeout,
    #[error("closed before sending a request")]
    Closed,
    #[error("before the first request: {0}")]
    Http(hyper::Error),
}

impl HandshakeError {
    /// The `outcome` label of `danmaku_edge_handshakes_total`.
    fn label(&self) -> &'static str {
        match self {
            Self::Proxy(e) => e.label(),
            Self::Tls(_) => "tls_error",
            Self::Timeout => "timeout",
            Self::Closed => "closed",
            Self::Http(e) if e.is_timeout() => "timeout",
            Self::Http(e) if e.is_incomplete_message() => "closed",
            Self::Http(e) if e.is_parse() || e.is_parse_too_large() => "bad_request",
            Self::Http(_) => "io_error",
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

    /// Neither TLS nor the PROXY protocol: a connection's handshake is its request head
    /// alone (it still goes through [`Edge::serve`], deadline and cap included).
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

/// Warnings about hostile or misconfigured traffic are logged at most this often each.
const WARN_EVERY_S: u64 = 10;

/// Logs a connection that ended before its first request: at debug level (scanners,
/// TCP health checks and dropped mobile connections are routine), except a PROXY trust
/// mismatch, which usually means `server.trusted_proxies` or the balancer is
/// misconfigured: warned at most every [`WARN_EVERY_S`].
fn report(peer: SocketAddr, e: &HandshakeError) {
    static LAST_WARN: AtomicU64 = AtomicU64::new(0);
    let misconfigured = matches!(
        e,
        HandshakeError::Proxy(ProxyError::Untrusted | ProxyError::Missing)
    );
    if misconfigured && warn_due(&LAST_WARN) {
        tracing::warn!(%peer, error = %e, "connection refused (see server.trusted_proxies; counted in danmaku_edge_handshakes_total)");
        return;
    }
    tracing::debug!(%peer, error = %e, "handshake failed");
}

/// Whether a warning guarded by `last` (seconds since the epoch of the last one) may be
/// logged now: at most one every [`WARN_EVERY_S`], so an attack cannot flood the log.
fn warn_due(last: &AtomicU64) -> bool {
    let now = crate::protocol::now_ms() / 1000;
    let seen = last.load(Ordering::Relaxed);
    now >= seen + WARN_EVERY_S
        && last
            .compare_exchange(seen, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
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

    /// The inner stream and the bytes not yet replayed from it (empty if none): those
    /// read past a PROXY header (or while looking for one) that no reader has had yet.
    pub fn into_parts(self) -> (S, Bytes) {
        (self.inner, self.replay.unwrap_or_default())
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

    #[tokio::test]
    async fn rewind_into_parts_gives_back_what_was_not_replayed() {
        let (_a, b) = tokio::io::duplex(64);
        let mut r = Rewind::new(b, Bytes::from_static(b"abcdef"));
        let mut two = [0u8; 2];
        r.read_exact(&mut two).await.unwrap();
        let (_inner, rest) = r.into_parts();
        assert_eq!(&rest[..], b"cdef");
        let (_a, b) = tokio::io::duplex(64);
        let (_inner, rest) = Rewind::new(b, Bytes::new()).into_parts();
        assert!(rest.is_empty());
    }
}
