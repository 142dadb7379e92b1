//! A minimal HTTP/1.1 client for the gateway's backend API (`/api/v1/...`): one request
//! per TCP connection (`Connection: close`), JSON bodies, `Authorization: Bearer`, every
//! request bounded by a timeout. The tool needs only a handful of calls per run, so a
//! dependency-free client beats pulling a full HTTP stack into a load generator.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response body read (a packet's status lists every grab: ~100 B each).
const MAX_RESPONSE: usize = 64 << 20;

/// Where the API is: a resolved address plus the `Host` header value.
#[derive(Debug, Clone)]
pub struct Api {
    addr: SocketAddr,
    authority: String,
    token: String,
}

/// A response: status and body text.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// Splits `scheme://authority/...` into (scheme, host, port, authority); the port
/// defaults to 80. IPv6 hosts keep their brackets in `authority` only.
pub fn split_url(url: &str) -> anyhow::Result<(&str, &str, u16, &str)> {
    let (scheme, rest) = url
        .split_once("://")
        .with_context(|| format!("{url:?}: no scheme"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() {
        bail!("{url:?}: no host");
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .with_context(|| format!("{url:?}: unclosed ["))?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => p
            .parse()
            .with_context(|| format!("{url:?}: bad port {p:?}"))?,
        None => 80,
    };
    if host.is_empty() {
        bail!("{url:?}: no host");
    }
    Ok((scheme, host, port, authority))
}

impl Api {
    /// The API of the gateway at `url`: `http://host:port` as is, or derived from a
    /// WebSocket URL (`ws://host:port/ws` → `http://host:port`).
    ///
    /// # Errors
    /// Another scheme (https/wss: this tool speaks plain TCP), or a host that does not
    /// resolve.
    pub async fn resolve(url: &str, token: &str) -> anyhow::Result<Self> {
        let (scheme, host, port, authority) = split_url(url)?;
        if scheme != "http" && scheme != "ws" {
            bail!("{url:?}: the API must be reached over http:// (or derived from ws://)");
        }
        let addr = tokio::net::lookup_host((host, port))
            .await
            .with_context(|| format!("resolving {host}"))?
            .next()
            .with_context(|| format!("{host} has no address"))?;
        Ok(Self {
            addr,
            authority: authority.to_string(),
            token: token.to_string(),
        })
    }

    /// `http://authority`, for reports.
    pub fn base(&self) -> String {
        format!("http://{}", self.authority)
    }

    /// Sends one request, reads the whole response, all within `timeout`.
    ///
    /// # Errors
    /// Connect/IO failure, timeout, or a response that is not HTTP/1.x.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<Response> {
        let work = async {
            let mut tcp = TcpStream::connect(self.addr)
                .await
                .with_context(|| format!("connecting to {}", self.addr))?;
            let mut req = format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
                 Accept: application/json\r\nConnection: close\r\n",
                self.authority, self.token
            );
            if let Some(body) = body {
                req.push_str("Content-Type: application/json\r\n");
                req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
                req.push_str(body);
            } else {
                req.push_str("\r\n");
            }
            tcp.write_all(req.as_bytes()).await?;
            let mut raw = Vec::new();
            (&mut tcp)
                .take(MAX_RESPONSE as u64)
                .read_to_end(&mut raw)
                .await?;
            parse_response(&raw)
        };
        tokio::time::timeout(timeout, work)
            .await
            .with_context(|| format!("{method} {path}: no response within {timeout:?}"))?
            .with_context(|| format!("{method} {path}"))
    }
}

/// Parses a complete HTTP/1.x response: body by `Content-Length`, chunked, or to EOF.
///
/// # Errors
/// No status line, headers not terminated, or a malformed chunked body.
pub fn parse_response(raw: &[u8]) -> anyhow::Result<Response> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("response headers not terminated")?;
    let head = std::str::from_utf8(&raw[..head_end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1.x response: {status_line:?}");
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let (mut length, mut chunked) = (None, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let rest = &raw[head_end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        if rest.len() < n {
            bail!("body truncated: {} of {n} bytes", rest.len());
        }
        rest[..n].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut rest: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size line not terminated")?;
        let size_line = std::str::from_utf8(&rest[..eol]).context("chunk size not UTF-8")?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .with_context(|| format!("bad chunk size {size_hex:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size + 2 {
            bail!("chunk truncated");
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_urls() {
        assert_eq!(
            split_url("ws://127.0.0.1:18080/ws").unwrap(),
            ("ws", "127.0.0.1", 18080, "127.0.0.1:18080")
        );
        assert_eq!(
            split_url("http://gw.example").unwrap(),
            ("http", "gw.example", 80, "gw.example")
        );
        assert_eq!(
            split_url("ws://[::1]:9000/ws?x").unwrap(),
            ("ws", "::1", 9000, "[::1]:9000")
        );
        assert!(split_url("127.0.0.1:80").is_err());
        assert!(split_url("ws:///ws").is_err());
        assert!(split_url("ws://h:port/ws").is_err());
    }

    #[test]
    fn parses_length_chunked_and_eof_bodies() {
        let r = parse_response(
            b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: 14\r\n\r\n{\"packet\":\"p\"}",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (201, "{\"packet\":\"p\"}"));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3;x=y\r\n:1}\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "{\"a\":1}"));
        let r = parse_response(b"HTTP/1.0 404 Not Found\r\n\r\nnope").unwrap();
        assert_eq!((r.status, r.body.as_str()), (404, "nope"));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort").is_err());
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
