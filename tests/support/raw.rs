//! A WebSocket client written as raw bytes over a plain TCP socket, for what a client
//! library will not do: frames that break RFC 6455, compressed frames built by hand, and
//! seeing exactly which bytes (RSV1, close codes) the server sends.

use std::net::SocketAddr;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::WAIT;

/// What a raw client runs over: plain TCP, or a client TLS stream.
pub trait RawIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> RawIo for T {}

/// A WebSocket over a bare TCP (or TLS) stream, after a hand-written upgrade; bytes past
/// the 101 response are kept for the frame reader.
pub struct RawWs {
    tcp: Box<dyn RawIo>,
    buf: Vec<u8>,
}

/// One server frame as read off the wire.
#[derive(Debug)]
pub struct ServerFrame {
    pub fin: bool,
    /// permessage-deflate: the payload is deflated.
    pub rsv1: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
    /// Header and payload bytes the frame took on the wire.
    pub wire_len: usize,
}

impl ServerFrame {
    /// The payload, inflated when RSV1 is set (RFC 7692 §7.2.2: the sync-flush tail
    /// restored, no context from earlier messages).
    pub fn data(&self) -> Vec<u8> {
        if self.rsv1 {
            inflate(&self.payload)
        } else {
            self.payload.clone()
        }
    }

    /// The payload as JSON (inflated first when compressed).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.data()).unwrap()
    }
}

/// A permessage-deflate message body, inflated as a browser would.
pub fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut z = flate2::Decompress::new(false);
    let mut out = Vec::with_capacity(input.len() * 4 + 1024);
    loop {
        let done = z.total_in() as usize;
        z.decompress_vec(&input[done..], &mut out, flate2::FlushDecompress::Sync)
            .expect("a valid deflate stream");
        if z.total_in() as usize == input.len() && out.len() < out.capacity() {
            return out;
        }
        out.reserve(out.capacity());
    }
}

/// `data` deflated as a client's permessage-deflate message (tail removed).
pub fn deflate(data: &[u8]) -> Vec<u8> {
    let mut z = flate2::Compress::new(flate2::Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    z.compress_vec(data, &mut out, flate2::FlushCompress::Sync)
        .unwrap();
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]), "sync flush done");
    out.truncate(out.len() - 4);
    out
}

impl RawWs {
    /// Upgrades (no extension offered) and reads the server's `hello` frame.
    pub async fn connect(addr: SocketAddr, query: &str) -> Self {
        let (ws, head) = Self::connect_with(addr, query, &[]).await;
        assert!(
            !head
                .to_ascii_lowercase()
                .contains("sec-websocket-extensions"),
            "no extension was offered, none may be accepted: {head}"
        );
        ws
    }

    /// Upgrades with `extra` request headers and reads the server's `hello` frame;
    /// returns the 101 response head too.
    pub async fn connect_with(
        addr: SocketAddr,
        query: &str,
        extra: &[(&str, &str)],
    ) -> (Self, String) {
        let tcp = TcpStream::connect(addr).await.unwrap();
        Self::upgrade_over(Box::new(tcp), addr, query, extra).await
    }

    /// [`RawWs::connect_with`] over a stream already open to `addr` (TLS, say).
    pub async fn upgrade_over(
        mut tcp: Box<dyn RawIo>,
        addr: SocketAddr,
        query: &str,
        extra: &[(&str, &str)],
    ) -> (Self, String) {
        let mut req = format!(
            "GET /ws?{query} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        );
        for (k, v) in extra {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut ws = RawWs {
            tcp,
            buf: Vec::new(),
        };
        let end = loop {
            if let Some(i) = ws.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            ws.fill().await;
        };
        let head = String::from_utf8_lossy(&ws.buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        ws.buf.drain(..end);
        let hello = ws.next_data().await;
        let hello: Value = match hello.opcode {
            0x1 => hello.json(),
            0x2 => rmp_serde::from_slice(&hello.data()).unwrap(),
            _ => panic!("hello must be a data frame: {hello:?}"),
        };
        assert_eq!(hello["op"], "hello", "{hello}");
        (ws, head)
    }

    /// Reads more bytes; panics at EOF or after [`WAIT`].
    pub async fn fill(&mut self) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, self.tcp.read(&mut chunk))
            .await
            .expect("timed out reading from the server")
            .expect("read error");
        assert!(n > 0, "connection closed without a close frame");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    pub async fn need(&mut self, n: usize) {
        while self.buf.len() < n {
            self.fill().await;
        }
    }

    /// The next server frame; asserts it is unmasked (RFC 6455 §5.1).
    pub async fn next_frame(&mut self) -> ServerFrame {
        self.need(2).await;
        let (b0, b1) = (self.buf[0], self.buf[1]);
        assert_eq!(b1 & 0x80, 0, "server frames must not be masked");
        let (len, header) = match b1 & 0x7F {
            126 => {
                self.need(4).await;
                (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
            }
            127 => {
                self.need(10).await;
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.buf[2..10]);
                (u64::from_be_bytes(b) as usize, 10)
            }
            n => (n as usize, 2),
        };
        self.need(header + len).await;
        let payload = self.buf[header..header + len].to_vec();
        self.buf.drain(..header + len);
        ServerFrame {
            fin: b0 & 0x80 != 0,
            rsv1: b0 & 0x40 != 0,
            opcode: b0 & 0x0F,
            payload,
            wire_len: header + len,
        }
    }

    /// The next data frame, skipping the server's pings.
    pub async fn next_data(&mut self) -> ServerFrame {
        loop {
            let f = self.next_frame().await;
            if f.opcode != 0x9 && f.opcode != 0xA {
                return f;
            }
        }
    }

    /// Reads until the server's close frame and returns its code; panics if the
    /// connection ends without one.
    pub async fn close_code(&mut self) -> u16 {
        let read = async {
            loop {
                let f = self.next_frame().await;
                if f.opcode == 0x8 {
                    assert!(f.fin, "a close frame is never fragmented");
                    assert!(f.payload.len() >= 2, "close frame without a code: {f:?}");
                    return u16::from_be_bytes([f.payload[0], f.payload[1]]);
                }
            }
        };
        tokio::time::timeout(WAIT * 2, read)
            .await
            .expect("timed out waiting for a close frame")
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.unwrap();
    }
}

pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A client frame: first header byte `b0` (FIN, RSV and opcode bits as given), masked
/// with [`MASK`] when `masked`.
pub fn frame(b0: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut out = vec![b0];
    match payload.len() {
        n @ 0..=125 => out.push(mask_bit | n as u8),
        n @ 126..=0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

pub const FIN: u8 = 0x80;
pub const RSV1: u8 = 0x40;
pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_PING: u8 = 0x9;
