//! Bytes on the wire: the stream every client connection reads its socket through
//! ([`Wire`]), the run's counter of the bytes read ([`WireMeter`]), and, on connections
//! that offered permessage-deflate, a scan of the frame headers going by that notes which
//! data messages arrived compressed ([`Rsv1Queue`]).
//!
//! Why here and not in the WebSocket client: what compression saves is measured in raw
//! TCP bytes (frame headers, control frames and all), which neither tungstenite nor yawc
//! reports; and yawc inflates a frame before handing it over, clearing its RSV1 bit, so
//! the only place left to see that bit is the byte stream itself.
//!
//! Cost: one relaxed `fetch_add` per socket read into a shard picked by connection index
//! (no lock, and 16 cache lines shared by thousands of connections rather than one); the
//! scan touches only the 2-14 header bytes of each frame and skips payloads.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Shards of a [`WireMeter`].
const SHARDS: usize = 16;

/// One counter on its own cache line, so that shards do not share one.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Padded(AtomicU64);

/// Bytes read from the sockets of a run's connections. Monotonic: the bytes of a phase
/// are the difference of the totals read at its start and at its end.
#[derive(Debug, Default)]
pub struct WireMeter {
    shards: [Padded; SHARDS],
}

impl WireMeter {
    /// Counts `n` bytes read by the connection of index `conn`.
    pub fn add(&self, conn: usize, n: usize) {
        self.shards[conn % SHARDS].0.fetch_add(n as u64, Relaxed);
    }

    /// Bytes read so far, all connections together.
    pub fn total(&self) -> u64 {
        self.shards.iter().map(|s| s.0.load(Relaxed)).sum()
    }
}

/// A socket whose reads are counted into a [`WireMeter`]; writes go straight through.
///
/// It can also replay bytes read past an upgrade response (a hand-made handshake reads in
/// chunks, and the server's first frames may come in the same segment) and scan the frame
/// headers that go by ([`Wire::start_frames`]).
#[derive(Debug)]
pub struct Wire<S> {
    io: S,
    meter: Arc<WireMeter>,
    /// The connection's index (its meter shard).
    conn: usize,
    /// Bytes already read (and counted) that the reader has not had yet.
    replay: Bytes,
    scan: Option<FrameScan>,
}

impl<S> Wire<S> {
    /// Wraps connection number `conn`'s socket; its reads count into `meter`.
    pub fn new(io: S, meter: Arc<WireMeter>, conn: usize) -> Self {
        Self {
            io,
            meter,
            conn,
            replay: Bytes::new(),
            scan: None,
        }
    }

    /// From here on the stream carries WebSocket frames from the server: `leftover` (read
    /// with the upgrade response) is served first, and the RSV1 bit of every data
    /// message's first frame, these included, goes into `queue`.
    pub fn start_frames(&mut self, leftover: Bytes, queue: Arc<Rsv1Queue>) {
        let mut scan = FrameScan::new(queue);
        scan.feed(&leftover);
        self.scan = Some(scan);
        self.replay = leftover;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Wire<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.replay.is_empty() && buf.remaining() > 0 {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay[..n]);
            this.replay.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        let fresh = &buf.filled()[before..];
        if !fresh.is_empty() {
            this.meter.add(this.conn, fresh.len());
            if let Some(scan) = this.scan.as_mut() {
                scan.feed(fresh);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Wire<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Data messages a connection may have read ahead of the one being handled before their
/// bits are lost: far more than a 4 KiB read buffer holds (the smallest gateway frame is
/// ~15 bytes), and what a large frame grows the buffer to rarely leaves room for more.
const QUEUE_BITS: u64 = 1024;

/// The RSV1 bits of a connection's data messages, oldest first: the frame scan pushes one
/// per message as its first frame header goes by, the message layer pops one per text or
/// binary message it gets (both see messages in wire order).
///
/// Both sides run in the connection's own task, one after the other, never at once: the
/// atomics are only there to let the two share it, so relaxed ordering is enough (a task
/// moving between threads is synchronized by the runtime).
#[derive(Debug, Default)]
pub struct Rsv1Queue {
    words: [AtomicU64; (QUEUE_BITS / 64) as usize],
    pushed: AtomicU64,
    popped: AtomicU64,
    /// The reader got more than [`QUEUE_BITS`] messages ahead: bits from then on are
    /// unknown (a miscount is worse than no count).
    lost: AtomicBool,
}

impl Rsv1Queue {
    fn push(&self, compressed: bool) {
        if self.lost.load(Relaxed) {
            return;
        }
        let n = self.pushed.load(Relaxed);
        if n - self.popped.load(Relaxed) >= QUEUE_BITS {
            self.lost.store(true, Relaxed);
            return;
        }
        let (word, bit) = Self::slot(n);
        if compressed {
            self.words[word].fetch_or(bit, Relaxed);
        } else {
            self.words[word].fetch_and(!bit, Relaxed);
        }
        self.pushed.store(n + 1, Relaxed);
    }

    /// Whether the oldest data message not popped yet arrived compressed; `None` if the
    /// bits were lost (or no header was seen for it, which a sane stream never does).
    pub fn pop(&self) -> Option<bool> {
        if self.lost.load(Relaxed) {
            return None;
        }
        let n = self.popped.load(Relaxed);
        if n >= self.pushed.load(Relaxed) {
            return None;
        }
        let (word, bit) = Self::slot(n);
        self.popped.store(n + 1, Relaxed);
        Some(self.words[word].load(Relaxed) & bit != 0)
    }

    fn slot(n: u64) -> (usize, u64) {
        let i = n % QUEUE_BITS;
        ((i / 64) as usize, 1 << (i % 64))
    }
}

/// Follows the frame boundaries of a server-to-client byte stream (RFC 6455 §5.2):
/// collects each header (2-14 bytes), skips the payload it announces.
#[derive(Debug)]
struct FrameScan {
    head: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame still to skip.
    skip: u64,
    queue: Arc<Rsv1Queue>,
}

impl FrameScan {
    fn new(queue: Arc<Rsv1Queue>) -> Self {
        Self {
            head: [0; 14],
            have: 0,
            skip: 0,
            queue,
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = usize::try_from(self.skip)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                self.skip -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            self.head[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            let Some(len) = header_len(&self.head[..self.have]) else {
                continue;
            };
            if self.have < len {
                continue;
            }
            let head = &self.head[..len];
            // Text or binary: a message's first frame, the one RSV1 is set on
            // (continuations carry 0, control frames are not messages).
            if matches!(head[0] & 0x0f, 1 | 2) {
                self.queue.push(head[0] & 0x40 != 0);
            }
            self.skip = payload_len(head);
            self.have = 0;
        }
    }
}

/// The length of a frame header, from its first two bytes (`None` before the second).
fn header_len(head: &[u8]) -> Option<usize> {
    let b1 = *head.get(1)?;
    let extended = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    Some(2 + extended + mask)
}

/// The payload length a complete header announces.
fn payload_len(head: &[u8]) -> u64 {
    match head[1] & 0x7f {
        126 => u64::from(u16::from_be_bytes([head[2], head[3]])),
        127 => {
            let mut be = [0; 8];
            be.copy_from_slice(&head[2..10]);
            u64::from_be_bytes(be)
        }
        n => u64::from(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An unmasked server frame: FIN, `opcode`, RSV1 if `compressed`, `len` payload bytes.
    fn frame(opcode: u8, compressed: bool, len: usize) -> Vec<u8> {
        let mut f = vec![0x80 | opcode | if compressed { 0x40 } else { 0 }];
        match len {
            0..=125 => f.push(len as u8),
            126..=0xffff => {
                f.push(126);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                f.push(127);
                f.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        f.extend(std::iter::repeat_n(b'x', len));
        f
    }

    #[test]
    fn meter_sums_its_shards() {
        let m = WireMeter::default();
        for conn in 0..40 {
            m.add(conn, 10);
        }
        assert_eq!(m.total(), 400);
    }

    #[test]
    fn scan_notes_rsv1_of_data_messages_across_any_split() {
        let mut stream = Vec::new();
        stream.extend(frame(1, true, 300)); // compressed text, 16-bit length
        stream.extend(frame(9, false, 4)); // ping: not a message
        stream.extend(frame(1, false, 20)); // plain text
        stream.extend(frame(2, true, 70_000)); // compressed binary, 64-bit length
        // A fragmented message: first frame (no FIN) carries RSV1, continuation does not.
        stream.extend([0x41, 3, b'a', b'b', b'c', 0x80, 2, b'd', b'e']);
        stream.extend(frame(8, false, 2)); // close
        let want = [Some(true), Some(false), Some(true), Some(true), None];
        for chunk in [1, 2, 3, 7, 64, 4096, stream.len()] {
            let queue = Arc::new(Rsv1Queue::default());
            let mut scan = FrameScan::new(Arc::clone(&queue));
            for piece in stream.chunks(chunk) {
                scan.feed(piece);
            }
            let got: Vec<Option<bool>> = (0..want.len()).map(|_| queue.pop()).collect();
            assert_eq!(got, want, "read in chunks of {chunk}");
            assert_eq!((scan.have, scan.skip), (0, 0), "ends on a frame boundary");
        }
    }

    #[test]
    fn queue_gives_up_rather_than_miscount() {
        let q = Rsv1Queue::default();
        for i in 0..QUEUE_BITS {
            q.push(i % 3 == 0);
        }
        assert_eq!(q.pop(), Some(true));
        assert_eq!(q.pop(), Some(false));
        // Room for two more, then one too many.
        q.push(true);
        q.push(true);
        assert_eq!(q.pop(), Some(false));
        q.push(false);
        q.push(false);
        assert_eq!(q.pop(), None, "bits lost once the reader ran too far ahead");
    }

    #[tokio::test]
    async fn wire_counts_reads_and_replays_leftovers_first() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let meter = Arc::new(WireMeter::default());
        let mut wire = Wire::new(client, Arc::clone(&meter), 3);
        server.write_all(b"HTTP/1.1 101 ok\r\n\r\n").await.unwrap();
        let mut head = [0; 19];
        wire.read_exact(&mut head).await.unwrap();
        assert_eq!(meter.total(), 19);
        // As if the handshake had read the first frame with the response.
        let queue = Arc::new(Rsv1Queue::default());
        wire.start_frames(Bytes::from(frame(1, true, 5)), Arc::clone(&queue));
        server.write_all(&frame(1, false, 5)).await.unwrap();
        let mut got = [0; 14];
        wire.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..7], &frame(1, true, 5)[..]);
        assert_eq!(&got[7..], &frame(1, false, 5)[..]);
        assert_eq!(
            meter.total(),
            19 + 7,
            "replayed bytes are not counted twice"
        );
        assert_eq!((queue.pop(), queue.pop()), (Some(true), Some(false)));
        wire.write_all(b"ping").await.unwrap();
        let mut echo = [0; 4];
        server.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"ping");
    }
}
