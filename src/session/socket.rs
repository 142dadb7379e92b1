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
//! A plain TCP connection is taken back from hyper whole and split into owned halves
//! (no lock between them). Anything else (TLS) is split with `tokio::io::split`: it
//! encrypts per connection anyway.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
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
    Tcp(OwnedReadHalf),
    Io(tokio::io::ReadHalf<BoxIo>),
}

enum WriteSide {
    Tcp(OwnedWriteHalf),
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
                        let (r, w) = tcp.into_split();
                        (ReadHalf::Tcp(r), WriteSide::Tcp(w), bytes)
                    }
                    tls => {
                        let (r, w) = tokio::io::split(Box::new(tls) as BoxIo);
                        (ReadHalf::Io(r), WriteSide::Io(w), early.to_vec())
                    }
                }
            }
            Err(upgraded) => match upgraded.downcast::<TokioIo<TcpStream>>() {
                Ok(parts) => {
                    let (r, w) = parts.io.into_inner().into_split();
                    (ReadHalf::Tcp(r), WriteSide::Tcp(w), parts.read_buf.to_vec())
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

    /// Writes the replies tungstenite queued while reading (a pong, the close reply).
    ///
    /// # Errors
    /// The socket failed.
    pub async fn send_replies(&mut self) -> io::Result<()> {
        // Moves tungstenite's queued reply into the capture; it never waits.
        let _ = self.reader.flush().await;
        let replies = std::mem::take(&mut self.reader.get_mut().replies);
        if replies.is_empty() {
            return Ok(());
        }
        self.writer.write_all(&replies).await?;
        self.writer.flush().await
    }

    /// Writes one complete frame.
    ///
    /// # Errors
    /// The socket failed.
    pub async fn send(&mut self, frame: &Bytes) -> io::Result<()> {
        self.writer.write_all(frame).await?;
        self.writer.flush().await
    }

    /// One vectored write of `slices`, as far as the socket takes it now.
    pub fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.writer {
            WriteSide::Tcp(w) => Pin::new(w).poll_write_vectored(cx, slices),
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
            ReadHalf::Tcp(r) => Pin::new(r).poll_read(cx, buf),
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
    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            WriteSide::Tcp(w) => w.write_all(bytes).await,
            WriteSide::Io(w) => w.write_all(bytes).await,
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        match self {
            // A plain socket has nothing buffered in user space.
            WriteSide::Tcp(_) => Ok(()),
            WriteSide::Io(w) => w.flush().await,
        }
    }
}
