//! The PROXY protocol header (HAProxy's; v1 text, v2 binary) that an L4 load balancer
//! puts in front of a connection's first byte to say who the client is.
//!
//! This module owns reading it off a fresh connection, bounded in size, and deciding what
//! it means; the caller owns the deadline and the trust decision's input (whether the
//! TCP peer is a trusted proxy). Framing (where the header ends) is done here, so reads
//! never go past a bound: v1 is at most 107 bytes, v2 at most 16 + [`V2_MAX_PAYLOAD`].
//! The content (addresses, command, family) is parsed by the `ppp` crate.
//!
//! Detection needs no peeking: bytes read past the header, or bytes that turned out not to
//! be a header at all, are handed back ([`Header::rest`]) for the caller to replay ahead of
//! the stream. A v1 header starts `PROXY `, a v2 header with a 12-byte signature; HTTP
//! and TLS (`0x16`) differ from both within their first two bytes, so a direct client is
//! told apart as soon as it sends anything.

use std::net::SocketAddr;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

/// How a v1 header starts.
pub const V1_PREFIX: &[u8] = b"PROXY ";
/// How a v2 header starts.
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, `\r\n` included (the specification's bound).
pub const V1_MAX: usize = 107;
/// Largest v2 payload (addresses + TLVs) accepted. Balancers send tens of bytes (AWS
/// NLB's VPC endpoint TLV, HAProxy's unique id); the format would allow 64 KiB.
pub const V2_MAX_PAYLOAD: usize = 4096;
/// The most bytes read before a decision.
const MAX_READ: usize = 16 + V2_MAX_PAYLOAD;

/// Why a connection's PROXY header was refused; the connection is then closed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("PROXY header from a peer not in server.trusted_proxies")]
    Untrusted,
    #[error("no PROXY header from a trusted proxy (server.proxy_protocol = \"required\")")]
    Missing,
    #[error("PROXY v1 header without its \\r\\n within {V1_MAX} bytes")]
    V1TooLong,
    #[error("PROXY v2 header announces {0} bytes, over the cap of {V2_MAX_PAYLOAD}")]
    V2TooLong(usize),
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    #[error("connection closed inside the PROXY header")]
    Truncated,
    #[error("connection closed before sending anything")]
    Closed,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

impl ProxyError {
    /// The `outcome` label of `danmaku_edge_handshakes_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Untrusted => "proxy_untrusted",
            Self::Missing => "proxy_missing",
            Self::V1TooLong | Self::V2TooLong(_) | Self::Malformed(_) | Self::Truncated => {
                "proxy_invalid"
            }
            Self::Closed => "closed",
            Self::Io(_) => "io_error",
        }
    }
}

/// Where the first bytes of a connection stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// Too few bytes to tell.
    NeedMore,
    /// Not a PROXY header: the bytes are the protocol itself (HTTP, TLS).
    Absent,
    /// A complete header of this many bytes.
    Header(usize),
}

/// Whether `buf` starts with a complete PROXY signature (v1 or v2).
pub fn has_signature(buf: &[u8]) -> bool {
    buf.starts_with(V1_PREFIX) || buf.starts_with(V2_SIGNATURE)
}

/// Frames the start of a connection.
///
/// # Errors
/// A header over its bound.
pub fn frame(buf: &[u8]) -> Result<Frame, ProxyError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        if buf.len() < 16 {
            return Ok(Frame::NeedMore);
        }
        let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if len > V2_MAX_PAYLOAD {
            return Err(ProxyError::V2TooLong(len));
        }
        return Ok(if buf.len() < 16 + len {
            Frame::NeedMore
        } else {
            Frame::Header(16 + len)
        });
    }
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] == V1_PREFIX[..n] {
        return match buf.iter().take(V1_MAX).position(|&b| b == b'\n') {
            Some(i) => Ok(Frame::Header(i + 1)),
            None if buf.len() >= V1_MAX => Err(ProxyError::V1TooLong),
            None => Ok(Frame::NeedMore),
        };
    }
    Ok(Frame::Absent)
}

/// The client address a complete header (exactly as [`frame`] delimited it) carries.
///
/// `None` for a header that carries none, where the specification says to use the
/// connection's own addresses: v2 `LOCAL` (a balancer's own health check), v1 `UNKNOWN`,
/// v2 with the `UNSPEC` or `UNIX` family. TLVs are allowed and ignored.
///
/// # Errors
/// [`ProxyError::Malformed`] for anything the specification does not allow.
pub fn parse(header: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    let malformed = |e: &dyn std::fmt::Display| ProxyError::Malformed(e.to_string());
    if header.starts_with(V2_SIGNATURE) {
        use ppp::v2::{Addresses, Command, Header};
        let h = Header::try_from(header).map_err(|e| malformed(&e))?;
        if h.as_bytes().len() != header.len() {
            return Err(ProxyError::Malformed("v2 length mismatch".into()));
        }
        if h.command == Command::Local {
            return Ok(None);
        }
        return Ok(match h.addresses {
            Addresses::IPv4(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
            Addresses::IPv6(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
            Addresses::Unspecified | Addresses::Unix(_) => None,
        });
    }
    use ppp::v1::{Addresses, Header};
    if !header.ends_with(b"\r\n") {
        return Err(ProxyError::Malformed("v1 header must end in \\r\\n".into()));
    }
    let h = Header::try_from(header).map_err(|e| malformed(&e))?;
    if h.header.len() != header.len() {
        return Err(ProxyError::Malformed("v1 header has a stray \\r".into()));
    }
    Ok(match h.addresses {
        Addresses::Tcp4(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        Addresses::Tcp6(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
        Addresses::Unknown => None,
    })
}

/// What the start of a connection said.
#[derive(Debug, PartialEq, Eq)]
pub struct Header {
    /// The client's address from a header; `None` without one (or one carrying none).
    pub client: Option<SocketAddr>,
    /// Bytes read past the header (or all bytes read, when there was none): the start of
    /// the HTTP or TLS stream, to be replayed.
    pub rest: Bytes,
}

/// Reads a fresh connection's PROXY header, if any.
///
/// `trusted`: the TCP peer is in `server.trusted_proxies`. A header from anyone else is
/// refused as soon as its signature is seen; `required` refuses a trusted peer without
/// one. The caller bounds the time.
///
/// # Errors
/// [`ProxyError`]: the connection must be closed.
pub async fn read_header<S: AsyncRead + Unpin>(
    io: &mut S,
    trusted: bool,
    required: bool,
) -> Result<Header, ProxyError> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        if !trusted && has_signature(&buf) {
            return Err(ProxyError::Untrusted);
        }
        match frame(&buf)? {
            Frame::Absent if trusted && required => return Err(ProxyError::Missing),
            Frame::Absent => {
                return Ok(Header {
                    client: None,
                    rest: Bytes::from(buf),
                });
            }
            Frame::Header(n) => {
                // `has_signature` above has refused an untrusted peer already.
                let client = parse(&buf[..n])?;
                return Ok(Header {
                    client,
                    rest: Bytes::from(buf).slice(n..),
                });
            }
            Frame::NeedMore => {
                // `frame` decides before MAX_READ, so there is always room here.
                let want = (MAX_READ - buf.len()).min(chunk.len());
                let n = io.read(&mut chunk[..want]).await?;
                if n == 0 {
                    return Err(if buf.is_empty() {
                        ProxyError::Closed
                    } else {
                        ProxyError::Truncated
                    });
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ppp::v2::{Builder, Command, Protocol, Type, Version};
    use proptest::prelude::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::ReadBuf;

    fn v2(src: SocketAddr, dst: SocketAddr, tlvs: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut b =
            Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (src, dst));
        for (t, v) in tlvs {
            b = b.write_tlv(*t, v).unwrap();
        }
        b.build().unwrap()
    }

    fn v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        let fam = if src.is_ipv4() { "TCP4" } else { "TCP6" };
        format!(
            "PROXY {fam} {} {} {} {}\r\n",
            src.ip(),
            dst.ip(),
            src.port(),
            dst.port()
        )
        .into_bytes()
    }

    fn whole(bytes: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
        match frame(bytes)? {
            Frame::Header(n) => parse(&bytes[..n]),
            other => panic!("not a whole header: {other:?}"),
        }
    }

    /// Hands out its bytes in the given chunk sizes, then EOF.
    struct Chunked {
        data: Vec<u8>,
        cuts: Vec<usize>,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let step = self.cuts.pop().unwrap_or(usize::MAX).max(1);
            let n = step.min(self.data.len()).min(buf.remaining());
            let head: Vec<u8> = self.data.drain(..n).collect();
            buf.put_slice(&head);
            Poll::Ready(Ok(()))
        }
    }

    fn read_all(
        data: &[u8],
        cuts: Vec<usize>,
        trusted: bool,
        required: bool,
    ) -> Result<Header, ProxyError> {
        read_split(data, cuts, trusted, required).map(|(h, _)| h)
    }

    /// The reader's answer, and what it left unread in the stream.
    fn read_split(
        data: &[u8],
        cuts: Vec<usize>,
        trusted: bool,
        required: bool,
    ) -> Result<(Header, Vec<u8>), ProxyError> {
        let mut io = Chunked {
            data: data.to_vec(),
            cuts,
        };
        let h = futures_util::FutureExt::now_or_never(read_header(&mut io, trusted, required))
            .expect("never pending")?;
        Ok((h, io.data))
    }

    #[test]
    fn v1_and_v2_carry_the_source() {
        let src: SocketAddr = "203.0.113.7:51000".parse().unwrap();
        let dst: SocketAddr = "10.0.0.1:443".parse().unwrap();
        assert_eq!(whole(&v1(src, dst)).unwrap(), Some(src));
        assert_eq!(whole(&v2(src, dst, &[])).unwrap(), Some(src));
        let src6: SocketAddr = "[2001:db8::7]:1234".parse().unwrap();
        let dst6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        assert_eq!(whole(&v1(src6, dst6)).unwrap(), Some(src6));
        assert_eq!(whole(&v2(src6, dst6, &[])).unwrap(), Some(src6));
        // TLVs (AWS NLB's VPC endpoint id is type 0xEA) are skipped.
        let h = v2(
            src,
            dst,
            &[
                (0xEA, b"\x01vpce-0123456789".to_vec()),
                (Type::NoOp as u8, vec![0; 9]),
            ],
        );
        assert_eq!(whole(&h).unwrap(), Some(src));
    }

    #[test]
    fn headers_without_an_address() {
        assert_eq!(whole(b"PROXY UNKNOWN\r\n").unwrap(), None);
        assert_eq!(
            whole(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").unwrap(),
            None
        );
        // v2 LOCAL: a balancer's health check; addresses (if any) ignored.
        let local = Builder::with_addresses(
            Version::Two | Command::Local,
            Protocol::Unspecified,
            ppp::v2::Addresses::Unspecified,
        )
        .build()
        .unwrap();
        assert_eq!(whole(&local).unwrap(), None);
        let mut local_v4 = v2(
            "1.2.3.4:5".parse().unwrap(),
            "6.7.8.9:10".parse().unwrap(),
            &[],
        );
        local_v4[12] = 0x20;
        assert_eq!(whole(&local_v4).unwrap(), None);
    }

    #[test]
    fn bounds_and_garbage() {
        // v1 without \r\n within 107 bytes.
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert!(matches!(frame(&long), Err(ProxyError::V1TooLong)));
        // v2 announcing more than the cap.
        let mut big = V2_SIGNATURE.to_vec();
        big.extend([0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(frame(&big), Err(ProxyError::V2TooLong(65535))));
        // Not a header at all.
        for direct in [
            &b"GET /ws HTTP/1.1\r\n"[..],
            b"POST /api",
            b"\x16\x03\x01\x02\x00",
            b"PROXZ",
        ] {
            assert_eq!(frame(direct).unwrap(), Frame::Absent, "{direct:?}");
        }
        // A wrong last signature byte is not v2.
        let mut sig = V2_SIGNATURE.to_vec();
        sig[11] = b'X';
        assert_eq!(frame(&sig).unwrap(), Frame::Absent);
        // Framed but malformed.
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
            b"PROXY TCP4 ::1 ::2 1 2\r\n",
            b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n",
            b"PROXY \xff\xfe\r\n",
        ] {
            assert!(
                matches!(whole(bad), Err(ProxyError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // v2: bad version, bad command, bad family, addresses longer than the length.
        let good = v2(
            "1.2.3.4:5".parse().unwrap(),
            "6.7.8.9:10".parse().unwrap(),
            &[],
        );
        for (i, byte) in [(12, 0x11), (12, 0x2f), (13, 0x41)] {
            let mut h = good.clone();
            h[i] = byte;
            assert!(
                matches!(whole(&h), Err(ProxyError::Malformed(_))),
                "{i} {byte:#x}"
            );
        }
        let mut short = good[..16].to_vec();
        short[15] = 4;
        short.extend([1, 2, 3, 4]);
        assert!(matches!(whole(&short), Err(ProxyError::Malformed(_))));
    }

    #[test]
    fn reader_decides_trust_and_keeps_the_rest() {
        let src: SocketAddr = "203.0.113.7:51000".parse().unwrap();
        let dst: SocketAddr = "10.0.0.1:443".parse().unwrap();
        let request = b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n";
        let with = [v2(src, dst, &[]).as_slice(), request].concat();
        // Trusted: the address, and the request intact.
        let h = read_all(&with, vec![], true, true).unwrap();
        assert_eq!(h.client, Some(src));
        assert_eq!(&h.rest[..], request);
        // Untrusted: refused, optional or not.
        assert!(matches!(
            read_all(&with, vec![], false, false),
            Err(ProxyError::Untrusted)
        ));
        assert!(matches!(
            read_all(&v1(src, dst), vec![], false, true),
            Err(ProxyError::Untrusted)
        ));
        // No header: replayed whole; refused only for a trusted peer in required mode.
        let h = read_all(request, vec![], true, false).unwrap();
        assert_eq!((h.client, &h.rest[..]), (None, &request[..]));
        let h = read_all(request, vec![], false, true).unwrap();
        assert_eq!(&h.rest[..], request);
        assert!(matches!(
            read_all(request, vec![], true, true),
            Err(ProxyError::Missing)
        ));
        // Closed early.
        assert!(matches!(
            read_all(b"", vec![], true, true),
            Err(ProxyError::Closed)
        ));
        assert!(matches!(
            read_all(b"PROXY TCP4 1.2", vec![], true, true),
            Err(ProxyError::Truncated)
        ));
        assert!(matches!(
            read_all(&with[..20], vec![], true, true),
            Err(ProxyError::Truncated)
        ));
        // An oversized v1 stops at the bound instead of reading on.
        let endless = [b"PROXY ".as_slice(), &[b'9'; 4000]].concat();
        assert!(matches!(
            read_all(&endless, vec![1; 200], true, true),
            Err(ProxyError::V1TooLong)
        ));
    }

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
            (any::<[u16; 8]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Anything at all: framing and parsing return, never panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(Frame::Header(n)) = frame(&bytes) {
                prop_assert!(n <= bytes.len());
                let _ = parse(&bytes[..n]);
            }
            let _ = read_all(&bytes, vec![], true, false);
        }

        /// A v2 signature followed by anything: exercises every field of the binary header.
        #[test]
        fn v2_signature_then_noise(
            ver_cmd in any::<u8>(),
            fam in any::<u8>(),
            len in 0u16..300,
            body in prop::collection::vec(any::<u8>(), 0..400),
        ) {
            let mut h = V2_SIGNATURE.to_vec();
            h.push(ver_cmd);
            h.push(fam);
            h.extend(len.to_be_bytes());
            h.extend(body);
            if let Ok(Frame::Header(n)) = frame(&h) {
                prop_assert_eq!(n, 16 + usize::from(len));
                let _ = parse(&h[..n]);
            }
        }

        /// `PROXY ` followed by printable noise.
        #[test]
        fn v1_prefix_then_noise(body in "[ -~\r\n]{0,150}") {
            let h = [V1_PREFIX, body.as_bytes()].concat();
            if let Ok(Frame::Header(n)) = frame(&h) {
                prop_assert!(n <= V1_MAX);
                let _ = parse(&h[..n]);
            }
        }

        /// Real headers (with TLVs for v2) round-trip; every strict prefix needs more;
        /// any split of the bytes over reads gives the same answer.
        #[test]
        fn real_headers_round_trip(
            src in addr(),
            dst in addr(),
            text in any::<bool>(),
            tlvs in prop::collection::vec((any::<u8>(), prop::collection::vec(any::<u8>(), 0..40)), 0..4),
            tail in prop::collection::vec(any::<u8>(), 0..64),
            cuts in prop::collection::vec(1usize..40, 0..20),
        ) {
            let dst = if dst.is_ipv4() == src.is_ipv4() { dst } else { src };
            let header = if text { v1(src, dst) } else { v2(src, dst, &tlvs) };
            for cut in 0..header.len() {
                prop_assert_eq!(frame(&header[..cut]).unwrap(), Frame::NeedMore);
            }
            let stream = [header.as_slice(), &tail].concat();
            prop_assert_eq!(frame(&stream).unwrap(), Frame::Header(header.len()));
            prop_assert_eq!(parse(&header).unwrap(), Some(src));
            let (got, unread) = read_split(&stream, cuts, true, true).unwrap();
            prop_assert_eq!(got.client, Some(src));
            // Nothing lost, nothing read past the header that is not handed back.
            prop_assert_eq!([&got.rest[..], &unread].concat(), tail);
        }

        /// A truncated real header is never believed.
        #[test]
        fn truncated_headers_are_refused(src in addr(), text in any::<bool>(), cut in 0usize..200) {
            let header = if text { v1(src, src) } else { v2(src, src, &[]) };
            let cut = cut % header.len();
            prop_assert!(read_all(&header[..cut], vec![], true, true).is_err());
        }
    }
}
