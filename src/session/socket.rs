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
//! - **An idle connection has no reader.** yawc's reader is about 900 bytes of state
//!   (codec, buffers, fragment assembly), most of an idle connection's footprint. A plain
//!   socket's session waits for the socket to turn readable with nothing but the socket;
//!   the reader is built when bytes arrive and dropped again once a message is read and
//!   nothing is left over. To know that, [`ReadSide`] hands the reader no byte past the
//!   end of the frame under way ([`Meter`]): once a frame is read, the reader's buffer is
//!   empty, and whatever the client sent after it waits in `ReadSide::early` (then the
//!   reader is kept until that is read too). Client messages are rare next to
//!   deliveries, so building a reader per message costs little; TLS connections keep
//!   theirs (their read state lives in rustls anyway).
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
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
    /// The frame reader: while a message is being read, or bytes wait past the last one
    /// read. Always there for TLS.
    reader: Option<Box<Reader>>,
    writer: WriteSide,
    config: ReadConfig,
    /// Replies owed to the client (a pong, the close echo), as frame bytes.
    replies: Option<Bytes>,
}

/// yawc's reader over one connection, and whether it may be dropped.
struct Reader {
    ws: WebSocket<ReadSide>,
    /// Set by its [`ReadSide`]: every byte handed out belongs to whole frames, no
    /// fragmented message is under way and nothing waits in `early`. The reader then
    /// holds no state worth keeping.
    spent: Arc<AtomicBool>,
}

/// What the client sends: the socket's read half, after the bytes hyper read past the
/// request.
struct ReadSide {
    /// Bytes read but not yet taken by the frame reader: what hyper read past the
    /// request, then the rest of a read the frame under way could not take. Empty (no
    /// allocation) while the connection is idle.
    early: Bytes,
    read: ReadHalf,
    meter: Meter,
    spent: Arc<AtomicBool>,
}

/// Where the bytes handed to the frame reader stand in the client's frame stream. Only
/// the frame lengths and the FIN and opcode bits are looked at, to hand out no byte past
/// the frame under way; yawc validates everything (a header it refuses ends the
/// connection before its payload is asked for).
#[derive(Debug, Default)]
struct Meter {
    /// The header of the frame under way, as far as handed out (at most 14 bytes).
    head: [u8; 14],
    seen: usize,
    /// Payload bytes of the frame under way still to hand out, once its header is.
    left: u64,
    in_payload: bool,
    /// A data message in fragments is under way (its first frame had FIN clear).
    fragmented: bool,
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
        Socket::new(read, early, writer, config)
    }

    fn new(read: ReadHalf, early: Bytes, writer: WriteSide, config: ReadConfig) -> Socket {
        let mut socket = Socket {
            reader: None,
            writer,
            config,
            replies: None,
        };
        // A reader now only if something must be read already: bytes the client sent
        // along with its request, or a stream without a readiness to wait on (TLS).
        if !early.is_empty() || socket.plain().is_none() {
            socket.reader = Some(Box::new(Reader::new(read, early, config)));
        }
        socket
    }

    /// The client negotiated permessage-deflate.
    pub fn deflate(&self) -> bool {
        self.config.deflate
    }

    /// The next message from the client.
    ///
    /// Cancel-safe: a quiet connection waits for readability without a reader, and a
    /// message half read stays in the reader.
    ///
    /// # Errors
    /// The stream ended, the client broke the protocol (with the close code it earns),
    /// or the socket failed.
    pub async fn recv(&mut self) -> Result<Incoming, ReadError> {
        loop {
            if self.reader.is_none() {
                let tcp = self
                    .plain()
                    .expect("only a plain socket is ever without a reader");
                // A peek rather than `readable()`: the readiness left over from the
                // upgrade request is stale, and would build a reader for nothing.
                std::future::poll_fn(|cx| {
                    let mut byte = [0u8; 1];
                    tcp.poll_peek(cx, &mut ReadBuf::new(&mut byte))
                })
                .await
                .map_err(|e| ReadError::Io(WebSocketError::IoError(e)))?;
                let read = ReadHalf::Tcp(Arc::clone(tcp));
                self.reader = Some(Box::new(Reader::new(read, Bytes::new(), self.config)));
            }
            let reader = self.reader.as_mut().expect("a reader was just made");
            let frame = reader.ws.next_frame().await.map_err(read_error)?;
            // A TLS reader is never dropped: there is no readiness to wait on without it.
            if reader.spent.load(Ordering::Relaxed) && self.plain().is_some() {
                self.reader = None;
            }
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

    /// The connection holds a frame reader now (tests of the idle footprint).
    #[cfg(test)]
    fn has_reader(&self) -> bool {
        self.reader.is_some()
    }

    /// The plain socket, for the member's queue to write inline; `None` for TLS.
    pub fn inline_sink(&self) -> Option<Arc<TcpStream>> {
        self.plain().map(Arc::clone)
    }

    /// The plain TCP socket (written inline, and waited on while the client is quiet);
    /// `None` for TLS.
    fn plain(&self) -> Option<&Arc<TcpStream>> {
        match &self.writer {
            WriteSide::Tcp(tcp) => Some(tcp),
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

impl Reader {
    /// yawc's reader over `read`, starting with the bytes in `early`.
    fn new(read: ReadHalf, early: Bytes, config: ReadConfig) -> Reader {
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
        let spent = Arc::new(AtomicBool::new(early.is_empty()));
        let side = ReadSide {
            early,
            read,
            meter: Meter::default(),
            spent: Arc::clone(&spent),
        };
        let extensions = config.deflate.then_some(DEFLATE_RESPONSE);
        let ws = WebSocket::from_stream_with_extensions(side, Role::Server, extensions, options)
            .expect("compression is enabled in the options whenever the extension is");
        Reader { ws, spent }
    }
}

impl Meter {
    /// How many of the next bytes belong to the frame under way (never 0).
    fn allowance(&self) -> u64 {
        if self.in_payload {
            self.left
        } else {
            (header_len(&self.head[..self.seen]) - self.seen) as u64
        }
    }

    /// Takes note of `bytes`, handed out to the reader; never more than
    /// [`Self::allowance`].
    fn advance(&mut self, bytes: &[u8]) {
        if self.in_payload {
            self.left -= bytes.len() as u64;
        } else {
            self.head[self.seen..self.seen + bytes.len()].copy_from_slice(bytes);
            self.seen += bytes.len();
            if self.seen < header_len(&self.head[..self.seen]) {
                return;
            }
            let (fin, opcode) = (self.head[0] & 0x80 != 0, self.head[0] & 0x0F);
            match (opcode, fin) {
                (0x1 | 0x2, false) => self.fragmented = true,
                (0x0, true) => self.fragmented = false,
                _ => {}
            }
            self.left = match self.head[1] & 0x7F {
                126 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
                127 => u64::from_be_bytes(self.head[2..10].try_into().expect("8 bytes")),
                n => u64::from(n),
            };
            self.in_payload = true;
        }
        if self.left == 0 {
            self.in_payload = false;
            self.seen = 0;
        }
    }

    /// The bytes handed out end on a frame boundary, outside a fragmented message.
    fn settled(&self) -> bool {
        !self.in_payload && self.seen == 0 && !self.fragmented
    }
}

/// The length of a frame header whose first bytes are `head`: 2, plus 2 or 8 for an
/// extended length, plus 4 for a mask; 2 until the second byte is known.
fn header_len(head: &[u8]) -> usize {
    let Some(&second) = head.get(1) else {
        return 2;
    };
    let extended = match second & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    2 + extended + mask
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
/// frame reader gets what its buffer holds and the frame under way needs ([`Meter`]),
/// and the rest waits in `early`, so no connection keeps a read buffer while it is idle.
impl AsyncRead for ReadSide {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let want = usize::try_from(this.meter.allowance())
            .unwrap_or(usize::MAX)
            .min(buf.remaining());
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
            let now = n.min(want);
            buf.put_slice(&scratch[..now]);
            this.meter.advance(&scratch[..now]);
            if now < n {
                this.early = Bytes::copy_from_slice(&scratch[now..n]);
            }
        } else {
            let taken = this.early.split_to(this.early.len().min(want));
            buf.put_slice(&taken);
            this.meter.advance(&taken);
        }
        this.note_spent();
        Poll::Ready(Ok(()))
    }
}

impl ReadSide {
    /// Tells the [`Reader`] whether it holds anything worth keeping.
    fn note_spent(&self) {
        let spent = self.meter.settled() && self.early.is_empty();
        self.spent.store(spent, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    const FIN: u8 = 0x80;

    /// A client frame: masked, with the shortest length encoding.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let key = [1u8, 2, 3, 4];
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        out
    }

    /// A plain server socket and the client's end of it, after the server has read
    /// (as hyper does) a request the client sent first: the socket's readiness is left
    /// set, with nothing to read.
    async fn pair() -> (Socket, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.write_all(b"GET /ws HTTP/1.1\r\n\r\n").await.unwrap();
        server.readable().await.unwrap();
        let mut request = [0u8; 64];
        assert_eq!(server.try_read(&mut request).unwrap(), 20);
        let tcp = Arc::new(server);
        let config = ReadConfig {
            max_message: 1 << 20,
            deflate: false,
        };
        let socket = Socket::new(
            ReadHalf::Tcp(Arc::clone(&tcp)),
            Bytes::new(),
            WriteSide::Tcp(tcp),
            config,
        );
        (socket, client)
    }

    fn text(m: Incoming) -> Bytes {
        match m {
            Incoming::Text(t) => t,
            other => panic!("expected text, got {other:?}"),
        }
    }

    #[test]
    fn the_meter_follows_frame_lengths_and_fragments() {
        for (payload, header) in [(5usize, 6usize), (126, 8), (70_000, 14)] {
            let f = frame(FIN | 0x1, &vec![b'a'; payload]);
            assert_eq!(f.len(), header + payload);
            let mut m = Meter::default();
            // Handed out in the pieces the meter allows, a byte at a time where it is
            // small: it never asks past the frame.
            let mut at = 0;
            while at < f.len() {
                let n = (m.allowance() as usize).min(7);
                assert!(n > 0 && at + n <= f.len(), "payload {payload}: {n} at {at}");
                m.advance(&f[at..at + n]);
                at += n;
                assert_eq!(m.settled(), at == f.len());
            }
        }
        // A data frame without FIN opens a fragmented message; a ping inside it does not
        // settle it; the final continuation does.
        let mut m = Meter::default();
        for (f, settled) in [
            (frame(0x1, b"ab"), false),
            (frame(FIN | 0x9, b""), false),
            (frame(FIN, b"cd"), true),
        ] {
            let mut at = 0;
            while at < f.len() {
                let n = m.allowance() as usize;
                m.advance(&f[at..at + n]);
                at += n;
            }
            assert_eq!(m.settled(), settled);
        }
    }

    #[tokio::test]
    async fn a_quiet_connection_holds_no_reader() {
        let (mut socket, mut client) = pair().await;
        assert!(!socket.has_reader(), "nothing read yet");
        // The readiness the request left is stale: waiting on it builds no reader.
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(50), socket.recv()).await;
        assert!(waited.is_err(), "nothing was sent");
        assert!(!socket.has_reader(), "a stale readiness built a reader");
        client.write_all(&frame(FIN | 0x1, b"one")).await.unwrap();
        assert_eq!(text(socket.recv().await.unwrap()), "one");
        assert!(!socket.has_reader(), "one message read, nothing left over");

        // Two messages in one write: the second waits past the first, so the reader
        // stays until it is read.
        let mut both = frame(FIN | 0x1, b"two");
        both.extend(frame(FIN | 0x1, &vec![b'x'; 300]));
        client.write_all(&both).await.unwrap();
        assert_eq!(text(socket.recv().await.unwrap()), "two");
        assert!(socket.has_reader(), "the next message is already here");
        assert_eq!(text(socket.recv().await.unwrap()).len(), 300);
        assert!(!socket.has_reader());

        // A ping inside a fragmented message keeps the half-assembled message.
        client.write_all(&frame(0x1, b"fr")).await.unwrap();
        client.write_all(&frame(FIN | 0x9, b"p")).await.unwrap();
        assert!(matches!(socket.recv().await.unwrap(), Incoming::Ping));
        assert!(socket.has_reader(), "a message is half read");
        client.write_all(&frame(FIN, b"ag")).await.unwrap();
        assert_eq!(text(socket.recv().await.unwrap()), "frag");
        assert!(!socket.has_reader());

        // A waiting recv that is dropped (the session's select took another branch)
        // leaves nothing behind and loses nothing.
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(50), socket.recv()).await;
        assert!(waited.is_err());
        assert!(!socket.has_reader());
        client.write_all(&frame(FIN | 0x1, b"after")).await.unwrap();
        assert_eq!(text(socket.recv().await.unwrap()), "after");
        drop(client);
        assert!(matches!(socket.recv().await, Err(ReadError::Closed)));
    }
}
