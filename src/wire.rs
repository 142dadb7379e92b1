//! WebSocket frames the server sends, as complete wire bytes.
//!
//! Server frames are never masked (RFC 6455 §5.1), so a frame's bytes are the same for
//! every member on a plain socket: a room window is encoded here once per format, header
//! included, and every member's write shares that one `Bytes` (a refcount, never a copy,
//! never a per-connection write buffer). Encoding reserves the longest header in front of
//! the payload and writes the real header right-aligned into it, so a frame is one
//! allocation and the payload is serialized in place.
//!
//! Frames the gateway sends are always final (FIN) and unfragmented; their size is bounded
//! by the callers ([`crate::hub`] splits windows, the session trims `joined.history`)
//! to `limits.max_out_frame_bytes`.
//!
//! [`deflate`] turns such a frame into its permessage-deflate form (RFC 7692): RSV1 set,
//! the payload deflated as one message with no context kept (we always negotiate
//! `server_no_context_takeover`), so the compressed frame too is the same bytes for
//! every member that negotiated the extension. Deflate state is one per worker thread,
//! reset per message: no member, room or window owns any.

use std::cell::RefCell;
use std::io;

use bytes::Bytes;
use serde::Serialize;

use crate::protocol::{CloseCode, Format, ServerFrame};

/// Opcodes of the frames the server sends.
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;
/// FIN bit of the first header byte.
const FIN: u8 = 0x80;
/// RSV1: the payload is deflated (permessage-deflate, RFC 7692 §6).
const RSV1: u8 = 0x40;
/// What a sync flush ends with; RFC 7692 §7.2.1 has the sender remove it.
const SYNC_TAIL: [u8; 4] = [0, 0, 0xff, 0xff];
/// Longest header of an unmasked frame: 2 bytes + 8 of extended length.
pub const MAX_HEADER: usize = 10;

/// `frame` encoded in `format` as one complete WebSocket frame (text for JSON, binary
/// for MessagePack).
pub fn encode(frame: &ServerFrame<'_>, format: Format) -> Bytes {
    let mut buf = Vec::with_capacity(128);
    buf.resize(MAX_HEADER, 0);
    match format {
        // Serializing these types cannot fail: every map key is a string and no value is
        // a non-finite float coming from us (system `data` came from JSON).
        Format::Json => {
            serde_json::to_writer(&mut buf, frame).expect("server frames serialize to JSON")
        }
        Format::Msgpack => rmp_serde::encode::write_named(&mut buf, frame)
            .expect("server frames serialize to MessagePack"),
    }
    let opcode = match format {
        Format::Json => OP_TEXT,
        Format::Msgpack => OP_BINARY,
    };
    finish(buf, FIN | opcode)
}

/// The close frame for `code`, with its reason.
pub fn close(code: CloseCode) -> Bytes {
    let mut buf = vec![0; MAX_HEADER];
    buf.extend_from_slice(&code.code().to_be_bytes());
    buf.extend_from_slice(code.reason().as_bytes());
    finish(buf, FIN | OP_CLOSE)
}

/// The close frame answering a client's close: its code echoed, or empty when it sent
/// none (RFC 6455 §5.5.1).
pub fn close_echo(code: Option<u16>) -> Bytes {
    let mut buf = vec![0; MAX_HEADER];
    if let Some(code) = code {
        buf.extend_from_slice(&code.to_be_bytes());
    }
    finish(buf, FIN | OP_CLOSE)
}

/// The pong answering a client's ping, with its payload (at most 125 bytes: the reader
/// refuses longer control frames).
pub fn pong(payload: &[u8]) -> Bytes {
    let mut buf = Vec::with_capacity(MAX_HEADER + payload.len());
    buf.resize(MAX_HEADER, 0);
    buf.extend_from_slice(payload);
    finish(buf, FIN | OP_PONG)
}

/// An empty ping (the server's heartbeat).
pub fn ping() -> Bytes {
    Bytes::from_static(&[FIN | OP_PING, 0])
}

/// How room batches are deflated for members that negotiated permessage-deflate
/// (`compression.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deflate {
    /// Frames smaller than this stay plain.
    pub min_bytes: usize,
    /// zlib level, 1 to 9.
    pub level: u32,
}

impl From<&crate::config::CompressionConfig> for Deflate {
    fn from(c: &crate::config::CompressionConfig) -> Self {
        Self {
            min_bytes: c.min_bytes,
            level: c.level,
        }
    }
}

thread_local! {
    /// This thread's deflater and its level: ~300 KiB of zlib state built once per worker
    /// thread, where one per window (or per member) would cost an allocation each time.
    static DEFLATER: RefCell<Option<(u32, flate2::Compress)>> = const { RefCell::new(None) };
}

/// `frame` (one complete, unfragmented, unmasked frame, as this module builds them) as
/// a permessage-deflate message: RSV1 set, the payload deflated on its own. `None` when
/// the frame is under `settings.min_bytes` or deflating would not make it smaller: it
/// then goes plain, which is also valid on a connection that negotiated the extension.
pub fn deflate(frame: &[u8], settings: Deflate) -> Option<Bytes> {
    if frame.len() < settings.min_bytes || frame.len() < 2 {
        return None;
    }
    let start = match frame[1] & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    let payload = &frame[start..];
    DEFLATER.with_borrow_mut(|slot| {
        let fresh = || flate2::Compress::new(flate2::Compression::new(settings.level), false);
        let (level, z) = slot.get_or_insert_with(|| (settings.level, fresh()));
        if *level != settings.level {
            (*level, *z) = (settings.level, fresh());
        }
        z.reset();
        let mut buf = Vec::with_capacity(MAX_HEADER + payload.len() / 2 + 64);
        buf.resize(MAX_HEADER, 0);
        loop {
            if buf.capacity() - buf.len() < 64 {
                buf.reserve(buf.capacity());
            }
            let consumed = z.total_in() as usize;
            // Errors are impossible here (a raw stream, valid flush, output space given);
            // if one came anyway the frame simply goes plain.
            z.compress_vec(&payload[consumed..], &mut buf, flate2::FlushCompress::Sync)
                .ok()?;
            // zlib's rule: a sync flush is complete once it returns with output space
            // left over and all input taken.
            if z.total_in() as usize == payload.len() && buf.len() < buf.capacity() {
                break;
            }
        }
        if !buf.ends_with(&SYNC_TAIL) {
            return None;
        }
        buf.truncate(buf.len() - SYNC_TAIL.len());
        if buf.len() >= frame.len() {
            return None;
        }
        Some(finish(buf, FIN | RSV1 | (frame[0] & 0x0f)))
    })
}

/// Writes the header for the payload after `buf[..MAX_HEADER]` (first byte `first`:
/// FIN, RSV1, opcode) and returns the frame.
fn finish(mut buf: Vec<u8>, first: u8) -> Bytes {
    let len = buf.len() - MAX_HEADER;
    let start = match len {
        0..=125 => {
            let s = MAX_HEADER - 2;
            buf[s + 1] = len as u8;
            s
        }
        126..=0xFFFF => {
            let s = MAX_HEADER - 4;
            buf[s + 1] = 126;
            buf[s + 2..MAX_HEADER].copy_from_slice(&(len as u16).to_be_bytes());
            s
        }
        _ => {
            buf[1] = 127;
            buf[2..MAX_HEADER].copy_from_slice(&(len as u64).to_be_bytes());
            0
        }
    };
    buf[start] = first;
    Bytes::from(buf).slice(start..)
}

/// Bytes `value` takes when encoded in `format`, counted without allocating: what the
/// window splitter and the `joined` trimmer weigh events with.
pub fn encoded_len<T: Serialize + ?Sized>(value: &T, format: Format) -> usize {
    let mut count = Count(0);
    let ok = match format {
        Format::Json => serde_json::to_writer(&mut count, value).is_ok(),
        Format::Msgpack => rmp_serde::encode::write_named(&mut count, value).is_ok(),
    };
    debug_assert!(ok, "server values always serialize");
    count.0
}

/// An `io::Write` that only counts.
struct Count(usize);

impl io::Write for Count {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::protocol::frame::FrameHeader;

    /// Parses what we wrote with tungstenite's own header parser.
    fn parse(frame: &[u8]) -> (FrameHeader, usize) {
        let mut cursor = io::Cursor::new(frame);
        let (header, len) = FrameHeader::parse(&mut cursor)
            .expect("valid header")
            .expect("complete header");
        assert_eq!(cursor.position() as usize + len as usize, frame.len());
        (header, len as usize)
    }

    #[test]
    fn headers_of_every_length_class_parse() {
        for len in [0usize, 125, 126, 65_535, 65_536, 300_000] {
            let mut buf = vec![0; MAX_HEADER];
            buf.resize(MAX_HEADER + len, b'x');
            let frame = finish(buf, FIN | OP_TEXT);
            let (header, parsed) = parse(&frame);
            assert_eq!(parsed, len);
            assert!(header.is_final);
            assert!(header.mask.is_none());
            assert!(!header.rsv1);
        }
    }

    #[test]
    fn a_frame_carries_the_encoded_payload() {
        let frame = encode(&ServerFrame::Pong { reference: Some(3) }, Format::Json);
        let (_, len) = parse(&frame);
        assert_eq!(&frame[frame.len() - len..], br#"{"op":"pong","ref":3}"#);
        assert_eq!(
            encoded_len(&ServerFrame::Pong { reference: Some(3) }, Format::Json),
            len
        );
        let close = close(CloseCode::SlowConsumer);
        assert_eq!(&close[2..4], &4010u16.to_be_bytes());
    }

    /// Inflates a permessage-deflate payload the way a browser does (tail restored).
    fn inflate(payload: &[u8]) -> Vec<u8> {
        let mut input = payload.to_vec();
        input.extend_from_slice(&SYNC_TAIL);
        let mut z = flate2::Decompress::new(false);
        let mut out = Vec::with_capacity(1 << 20);
        z.decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync)
            .expect("valid deflate");
        out
    }

    #[test]
    fn a_deflated_frame_sets_rsv1_and_inflates_to_the_payload() {
        let settings = Deflate {
            min_bytes: 256,
            level: 1,
        };
        for len in [300usize, 70_000] {
            let text: String = (0..len).map(|i| ["弹幕", "666", "😀"][i % 3]).collect();
            let mut buf = vec![0; MAX_HEADER];
            buf.extend_from_slice(text.as_bytes());
            let plain = finish(buf, FIN | OP_BINARY);
            let deflated = deflate(&plain, settings).expect("repetitive text shrinks");
            let (header, n) = parse(&deflated);
            assert!(header.rsv1 && header.is_final);
            assert_eq!(deflated[0] & 0x0f, OP_BINARY);
            assert!(
                deflated.len() < plain.len() / 4,
                "{} of {}",
                deflated.len(),
                plain.len()
            );
            let payload = &deflated[deflated.len() - n..];
            assert_eq!(inflate(payload), text.as_bytes());
        }
    }

    #[test]
    fn small_or_incompressible_frames_stay_plain() {
        let settings = Deflate {
            min_bytes: 256,
            level: 6,
        };
        let small = encode(&ServerFrame::Pong { reference: Some(3) }, Format::Json);
        assert!(deflate(&small, settings).is_none());
        // Bytes with no repeats (a xorshift sequence) grow when deflated.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut buf = vec![0; MAX_HEADER];
        for _ in 0..4096 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf.push(x as u8);
        }
        let noise = finish(buf, FIN | OP_BINARY);
        assert!(deflate(&noise, settings).is_none());
    }
}
