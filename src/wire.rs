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

use std::io;

use bytes::Bytes;
use serde::Serialize;

use crate::protocol::{CloseCode, Format, ServerFrame};

/// Opcodes of the frames the server sends.
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
/// FIN bit of the first header byte.
const FIN: u8 = 0x80;
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
    finish(buf, opcode)
}

/// The close frame for `code`, with its reason.
pub fn close(code: CloseCode) -> Bytes {
    let mut buf = vec![0; MAX_HEADER];
    buf.extend_from_slice(&code.code().to_be_bytes());
    buf.extend_from_slice(code.reason().as_bytes());
    finish(buf, OP_CLOSE)
}

/// An empty ping (the server's heartbeat).
pub fn ping() -> Bytes {
    Bytes::from_static(&[FIN | OP_PING, 0])
}

/// Writes the header for the payload after `buf[..MAX_HEADER]` and returns the frame.
fn finish(mut buf: Vec<u8>, opcode: u8) -> Bytes {
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
    buf[start] = FIN | opcode;
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
            let frame = finish(buf, OP_TEXT);
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
}
