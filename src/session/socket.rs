//! A client's socket after the upgrade, split into its two jobs.
//!
//! - **Reading** is tungstenite's: it parses and validates every client frame (masking,
//!   reserved bits, opcodes, control-frame rules, UTF-8, size limits) and answers pings
//!   and closes. Its replies are not written by it: its write side is a small capture
//!   buffer that the session drains onto the socket right after the read that caused
//!   them, so the reader never holds the socket's write half.
//! - **Writing** is ours: every frame the gateway sends is already complete wire bytes
//!   ([`crate::wire`]), shared by every member it goes to. They are written straight to
//!   the socket from the member's queue ([`crate::hub::Conn::write_front`]), several at
//!   once with one vectored write, without being copied into a per-connection buffer. A member that stops reading therefore pins only references
//!   to shared frames (its queue), never a private copy of one.
//!
//! A plain TCP connection is taken back from hyper whole and shared (`Arc<TcpStream>`):
//! the reader reads it, and writes go through the member's queue
//! ([`crate::hub::Conn`]), which the shards write inline. Anything else (TLS) is split
//! with `tokio::io::split`: it encrypts per connection anyway, so its session writes.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tungstenite::Message;
use tungstenite::protocol::{Role, WebSocketConfig};

use crate::edge::EdgeIo;

/// Any other upgraded stream (TLS, or one hyper would not hand back).
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
type BoxIo = Box<dyn Io>;

/// An upgraded WebSocket connection, server side.
pub struct Socket {
    reader: WebSocketStream<ReadSide>,
    writer: WriteSide,
}

/// What the client sends: the socket's read half, and tungstenite's replies captured.
struct ReadSide {
    read: ReadHalf,
    /// Pongs and the close reply tungstenite wrote; drained by [`Socket::send_replies`].
    replies: Vec<u8>,
}

enum ReadHalf {
    Tcp(Arc<TcpStream>),
    Io(tokio::io::ReadHalf<BoxIo>),
}

enum WriteSide {
    Tcp(Arc<TcpStream>),
    Io(tokio::io::WriteHalf<BoxIo>),
}

impl Socket {
    /// Takes the connection back from hyper (with any bytes it read past the request)
    /// and starts the reader under `config`.
    pub async fn from_upgraded(upgraded: Upgraded, config: WebSocketConfig) -> Socket {
        let (read, writer, early) = match upgraded.downcast::<TokioIo<EdgeIo>>() {
            Ok(parts) => {
                let early = parts.read_buf;
                match parts.io.into_inner() {
                    EdgeIo::Plain(rewind) => {
                        let (tcp, replay) = rewind.into_parts();
                        let mut bytes = replay.to_vec();
                        bytes.extend_from_slice(&early);
                        let tcp = Arc::new(tcp);
                        (ReadHalf::Tcp(Arc::clone(&tcp)), WriteSide::Tcp(tcp), bytes)
                    }
                    tls => {
                        let (r, w) = tokio::io::split(Box::new(tls) as BoxIo);
                        (ReadHalf::Io(r), WriteSide::Io(w), early.to_vec())
                    }
                }
            }
            Err(upgraded) => match upgraded.downcast::<TokioIo<TcpStream>>() {
                Ok(parts) => {
                    let tcp = Arc::new(parts.io.into_inner());
                    let early = parts.read_buf.to_vec();
                    (ReadHalf::Tcp(Arc::clone(&tcp)), WriteSide::Tcp(tcp), early)
                }
                Err(upgraded) => {
                    let io: BoxIo = Box::new(TokioIo::new(upgraded));
                    let (r, w) = tokio::io::split(io);
                    (ReadHalf::Io(r), WriteSide::Io(w), Vec::new())
                }
            },
        };
        let side = ReadSide {
            read,
            replies: Vec::new(),
        };
        let reader = if early.is_empty() {
            WebSocketStream::from_raw_socket(side, Role::Server, Some(config)).await
        } else {
            WebSocketStream::from_partially_read(side, early, Role::Server, Some(config)).await
        };
        Socket { reader, writer }
    }

    /// The next message from the client; `None` once the stream has ended.
    pub async fn recv(&mut self) -> Option<Result<Message, tungstenite::Error>> {
        self.reader.next().await
    }

    /// The plain socket, for the member's queue to write inline; `None` for TLS.
    pub fn inline_sink(&self) -> Option<Arc<TcpStream>> {
        match &self.writer {
            WriteSide::Tcp(tcp) => Some(Arc::clone(tcp)),
            WriteSide::Io(_) => None,
        }
    }

    /// The replies tungstenite queued while reading (a pong, the close reply), as
    /// frame bytes for the member's queue.
    pub async fn take_replies(&mut self) -> Option<Bytes> {
        // Moves tungstenite's queued reply into the capture; it never waits.
        let _ = self.reader.flush().await;
        let replies = std::mem::take(&mut self.reader.get_mut().replies);
        (!replies.is_empty()).then(|| Bytes::from(replies))
    }

    /// One vectored write of `slices`, as far as the socket takes it now.
    pub fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.writer {
            WriteSide::Tcp(tcp) => loop {
                std::task::ready!(tcp.poll_write_ready(cx))?;
                match tcp.try_write_vectored(slices) {
                    // The readiness was stale; `try_write_vectored` cleared it.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    other => return Poll::Ready(other),
                }
            },
            WriteSide::Io(w) => Pin::new(w).poll_write_vectored(cx, slices),
        }
    }

    /// Pushes out what a TLS stream buffered (a plain socket buffers nothing).
    ///
    /// # Errors
    /// The socket failed.
    pub async fn flush(&mut self) -> io::Result<()> {
        self.writer.flush().await
    }
}

impl AsyncRead for ReadSide {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().read {
            ReadHalf::Tcp(tcp) => loop {
                std::task::ready!(tcp.poll_read_ready(cx))?;
                match tcp.try_read(buf.initialize_unfilled()) {
                    Ok(n) => {
                        buf.advance(n);
                        return Poll::Ready(Ok(()));
                    }
                    // The readiness was stale; `try_read` cleared it.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            },
            ReadHalf::Io(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

/// tungstenite's writes land in the capture; bounded because it writes only replies to
/// what it read (one pong or close at a time), and the session drains it after each read.
impl AsyncWrite for ReadSide {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().replies.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl WriteSide {
    async fn flush(&mut self) -> io::Result<()> {
        match self {
            // A plain socket has nothing buffered in user space.
            WriteSide::Tcp(_) => Ok(()),
            WriteSide::Io(w) => w.flush().await,
        }
    }
}
