//! A client's socket after the upgrade, split into its two jobs.
//!
//! - **Reading** is yawc's: it parses and validates every client frame (masking,
//!   reserved bits, opcodes, control-frame rules, UTF-8, size limits), reassembles
//!   fragments and, where permessage-deflate was negotiated, inflates compressed messages
//!   with the inflated size bounded (`limits.max_frame_bytes`; beyond, close 1009). The
//!   inflate state is borrowed from a process-wide pool for one message at a time (we
//!   always negotiate `client_no_context_takeover`), so a connection owns none. yawc
//!   rather than tungstenite because tungstenite rejects every frame with RSV1 set, i.e.
//!   every compressed frame a browser sends.
//! - **Writing** is ours: every frame the gateway sends is already complete wire bytes
//!   ([`crate::wire`]), shared by every member it goes to. They are written straight to
//!   the socket from the member's queue ([`crate::hub::Conn::write_front`]), several at
//!   once with one vectored write, without being copied into a per-connection buffer. A
//!   member that stops reading therefore pins only references to shared frames (its
//!   queue), never a private copy of one. The replies the protocol owes (a pong, the
//!   close echo) are built here too ([`Socket::take_replies`]); what yawc would write on
//!   its own goes to a sink that drops it, so the reader never holds the socket's write
//!   half.
//!
//! A plain TCP connection is taken back from hyper whole and shared (`Arc<TcpStream>`):
//! the reader reads it, and writes go through the member's queue
//! ([`crate::hub::Conn`]), which the shards write inline. Anything else (TLS) is split
//! with `tokio::io::split`: it encrypts per connection anyway, so its session writes.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use yawc::{OpCode, Options, Role, WebSocket, WebSocketError};

use crate::edge::EdgeIo;
use crate::protocol::CloseCode;
use crate::wire;

/// The frame reader's own buffer between messages: none. yawc gives a buffer grown for a
/// message back once the message is read, down to this; what an idle connection then
/// holds is the few bytes the framing layer reserves to poll with.
const READ_BUFFER: usize = 0;
/// Bytes one socket read takes at most, into a scratch buffer on the stack: all of a
/// typical client message (a few hundred bytes) in one `read()`, whatever the reader's
/// buffer holds; what it cannot take yet waits in `ReadSide::early`.
const READ_SCRATCH: usize = 4096;
/// Idle inflaters kept for reuse: about the messages inflated at the same moment (one
/// per worker thread), not one per connection.
const INFLATE_POOL: usize = 64;
/// What `Sec-WebSocket-Extensions` we answered, and therefore what yawc reads under.
pub const DEFLATE_RESPONSE: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// Any other upgraded stream (TLS, or one hyper would not hand back).
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
type BoxIo = Box<dyn Io>;

/// How client frames are read.
#[derive(Debug, Clone, Copy)]
pub struct ReadConfig {
    /// `limits.max_frame_bytes`: the largest message, inflated, a client may send.
    pub max_message: usize,
    /// permessage-deflate was negotiated ([`DEFLATE_RESPONSE`]).
    pub deflate: bool,
}

/// One message from the client. Pings and closes are answered by the session with what
/// [`Socket::take_replies`] holds.
#[derive(Debug)]
pub enum Incoming {
    Text(Bytes),
    Binary(Bytes),
    Ping,
    Pong,
    Close,
}

/// Why reading from the client stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The client closed the TCP stream.
    #[error("the client closed the connection")]
    Closed,
    /// The client broke the protocol; the connection is closed with `code`.
    #[error("client frame refused ({code:?}): {source}")]
    Refused {
        code: CloseCode,
        #[source]
        source: WebSocketError,
    },
    /// The socket failed.
    #[error("socket error: {0}")]
    Io(#[source] WebSocketError),
}

/// An upgraded WebSocket connection, server side.
pub struct Socket {
    reader: WebSocket<ReadSide>,
    writer: WriteSide,
    deflate: bool,
    /// Replies owed to the client (a pong, the close echo), as frame bytes.
    replies: Option<Bytes>,
}

/// What the client sends: the socket's read half, after the bytes hyper read past the
/// request.
struct ReadSide {
    /// Bytes read but not yet taken by the frame reader: what hyper read past the
    /// request, then the rest of a read its small buffer could not hold. Empty (no
    /// allocation) while the connection is idle.
    early: Bytes,
    read: ReadHalf,
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
    pub async fn from_upgraded(upgraded: Upgraded, config: ReadConfig) -> Socket {
        let (read, writer, early) = match upgraded.downcast::<TokioIo<EdgeIo>>() {
            Ok(parts) => {
                let early = parts.read_buf;
                match parts.io.into_inner() {
                    EdgeIo::Plain(rewind) => {
                        let (tcp, replay) = rewind.into_parts();
                        let mut bytes = replay.to_vec();
                        bytes.extend_from_slice(&early);
                        let tcp = Arc::new(tcp);
                        let read = ReadHalf::Tcp(Arc::clone(&tcp));
                        (read, WriteSide::Tcp(tcp), Bytes::from(bytes))
                    }
                    tls => {
                        let (r, w) = tokio::io::split(Box::new(tls) as BoxIo);
                        (ReadHalf::Io(r), WriteSide::Io(w), early)
                    }
                }
            }
            Err(upgraded) => match upgraded.downcast::<TokioIo<TcpStream>>() {
                Ok(parts) => {
                    let tcp = Arc::new(parts.io.into_inner());
                    let read = ReadHalf::Tcp(Arc::clone(&tcp));
                    (read, WriteSide::Tcp(tcp), parts.read_buf)
                }
                Err(upgraded) => {
                    let io: BoxIo = Box::new(TokioIo::new(upgraded));
                    let (r, w) = tokio::io::split(io);
                    (ReadHalf::Io(r), WriteSide::Io(w), Bytes::new())
                }
            },
        };
        Socket::new(ReadSide { early, read }, writer, config)
    }

    fn new(side: ReadSide, writer: WriteSide, config: ReadConfig) -> Socket {
        // Both bounds are exclusive in yawc: one more than the largest message allowed.
        let limit = config.max_message + 1;
        let mut options = Options::default()
            .with_max_payload_read(limit)
            .with_max_read_buffer(limit)
            .with_read_buffer_capacity(READ_BUFFER)
            // yawc writes only replies we drop (see `ReadSide`'s `AsyncWrite`).
            .with_write_buffer_capacity(0)
            .with_utf8();
        if config.deflate {
            options = options
                .with_low_latency_compression()
                .server_no_context_takeover()
                .client_no_context_takeover()
                .with_deflate_pool(inflate_pool().clone());
        }
        let extensions = config.deflate.then_some(DEFLATE_RESPONSE);
        let reader =
            WebSocket::from_stream_with_extensions(side, Role::Server, extensions, options)
                .expect("compression is enabled in the options whenever the extension is");
        Socket {
            reader,
            writer,
            deflate: config.deflate,
            replies: None,
        }
    }

    /// The client negotiated permessage-deflate.
    pub fn deflate(&self) -> bool {
        self.deflate
    }

    /// The next message from the client.
    ///
    /// # Errors
    /// The stream ended, the client broke the protocol (with the close code it earns),
    /// or the socket failed.
    pub async fn recv(&mut self) -> Result<Incoming, ReadError> {
        loop {
            let frame = self.reader.next_frame().await.map_err(read_error)?;
            let (opcode, _, payload) = frame.into_parts();
            return Ok(match opcode {
                OpCode::Text => Incoming::Text(payload),
                OpCode::Binary => Incoming::Binary(payload),
                OpCode::Ping => {
                    self.replies = Some(wire::pong(&payload));
                    Incoming::Ping
                }
                OpCode::Pong => Incoming::Pong,
                // yawc has checked the code and the reason; the echo carries the code
                // back (RFC 6455 §5.5.1).
                OpCode::Close => {
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    self.replies = Some(wire::close_echo(code));
                    Incoming::Close
                }
                // yawc reassembles fragments; a continuation never surfaces alone.
                OpCode::Continuation => continue,
            });
        }
    }

    /// The plain socket, for the member's queue to write inline; `None` for TLS.
    pub fn inline_sink(&self) -> Option<Arc<TcpStream>> {
        match &self.writer {
            WriteSide::Tcp(tcp) => Some(Arc::clone(tcp)),
            WriteSide::Io(_) => None,
        }
    }

    /// The reply the last message read is owed (a pong, the close echo), as frame bytes
    /// for the member's queue.
    pub fn take_replies(&mut self) -> Option<Bytes> {
        self.replies.take()
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

/// The process's pool of inflate state, shared by every connection that negotiated
/// permessage-deflate.
fn inflate_pool() -> &'static yawc::DeflatePool {
    static POOL: OnceLock<yawc::DeflatePool> = OnceLock::new();
    POOL.get_or_init(|| yawc::DeflatePool::new(INFLATE_POOL))
}

/// A read error as the close code it earns: an over-long message (inflated or not)
/// 1009, text that is not UTF-8 or a compressed message that does not inflate 1007, a
/// frame that breaks RFC 6455 (or RSV1 without the extension) 1002.
fn read_error(e: WebSocketError) -> ReadError {
    use WebSocketError as E;
    let code = match &e {
        E::ConnectionClosed => return ReadError::Closed,
        E::FrameTooLarge => CloseCode::TooBig,
        E::InvalidUTF8 => CloseCode::InvalidPayload,
        E::ReservedBitsNotZero
        | E::ControlFrameFragmented
        | E::PingFrameTooLarge
        | E::InvalidFragment
        | E::InvalidCloseFrame
        | E::InvalidCloseCode
        | E::InvalidContinuationFrame
        | E::InvalidOpCode(_)
        | E::CompressionNotSupported => CloseCode::ProtocolError,
        // yawc reports a deflate stream that does not inflate as `InvalidInput`; a
        // socket never fails with that kind.
        E::IoError(io) if io.kind() == io::ErrorKind::InvalidInput => CloseCode::InvalidPayload,
        _ => return ReadError::Io(e),
    };
    ReadError::Refused { code, source: e }
}

/// Reads go through a stack scratch buffer: one `read()` takes what the client sent, the
/// frame reader gets what its buffer holds, and the rest waits in `early`, so no
/// connection keeps a read buffer while it is idle.
impl AsyncRead for ReadSide {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.early.is_empty() {
            let mut scratch = [0u8; READ_SCRATCH];
            let n = match &mut this.read {
                ReadHalf::Tcp(tcp) => loop {
                    std::task::ready!(tcp.poll_read_ready(cx))?;
                    match tcp.try_read(&mut scratch) {
                        Ok(n) => break n,
                        // The readiness was stale; `try_read` cleared it.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                },
                ReadHalf::Io(r) => {
                    let mut into = ReadBuf::new(&mut scratch);
                    std::task::ready!(Pin::new(r).poll_read(cx, &mut into))?;
                    into.filled().len()
                }
            };
            let now = n.min(buf.remaining());
            buf.put_slice(&scratch[..now]);
            if now < n {
                this.early = Bytes::copy_from_slice(&scratch[now..n]);
            }
            return Poll::Ready(Ok(()));
        }
        let n = this.early.len().min(buf.remaining());
        buf.put_slice(&this.early[..n]);
        this.early.advance(n);
        Poll::Ready(Ok(()))
    }
}

/// What yawc writes on its own (its pongs, its close replies) is dropped: the session
/// sends the replies the protocol owes itself, through the member's queue, so frames
/// never interleave on the socket.
impl AsyncWrite for ReadSide {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
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
