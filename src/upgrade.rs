//! The WebSocket opening handshake (RFC 6455 §4.2) over hyper's HTTP/1.1 upgrade.
//!
//! Ours rather than axum's `WebSocketUpgrade` because the session needs the raw socket
//! back: axum hands over a tungstenite stream that copies every outgoing frame into a
//! per-connection write buffer, while the gateway writes shared, pre-encoded frames
//! straight to the socket ([`crate::session::socket`]). The checks are the same as
//! axum's; the reply is the standard 101 with `Sec-WebSocket-Accept`.
//!
//! It also reads the client's `Sec-WebSocket-Extensions` offers: permessage-deflate
//! (RFC 7692) is accepted when an offer of it has only parameters we can honour, always
//! answered with `server_no_context_takeover; client_no_context_takeover` so that no
//! connection keeps compression state ([`crate::wire::deflate`]).

use crate::session::socket::{DEFLATE_RESPONSE, ReadConfig, Socket};
use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::OnUpgrade;

/// Why a request is not a WebSocket upgrade we can take.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UpgradeError {
    #[error("the method must be GET")]
    MethodNotGet,
    #[error("HTTP/1.1 is required")]
    Version,
    #[error("no `Connection: upgrade` header")]
    Connection,
    #[error("no `Upgrade: websocket` header")]
    Upgrade,
    #[error("`Sec-WebSocket-Version` must be 13")]
    WebSocketVersion,
    #[error("no `Sec-WebSocket-Key` header")]
    Key,
    #[error("this connection cannot be upgraded")]
    NotUpgradable,
}

/// Only reached when a handler takes `WsUpgrade` bare; `/ws` takes the `Result` and
/// answers in its own order of checks.
impl IntoResponse for UpgradeError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "code": "bad_request",
            "message": format!("expected a WebSocket upgrade: {self}"),
        });
        (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
    }
}

/// A valid upgrade request, not yet answered.
pub struct WsUpgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
    /// One of the client's extension offers is permessage-deflate we can honour.
    deflate_offered: bool,
}

impl<S: Send + Sync> FromRequestParts<S> for WsUpgrade {
    type Rejection = UpgradeError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, UpgradeError> {
        if parts.method != Method::GET {
            return Err(UpgradeError::MethodNotGet);
        }
        if parts.version != Version::HTTP_11 {
            return Err(UpgradeError::Version);
        }
        if !header_has_token(&parts.headers, header::CONNECTION, "upgrade") {
            return Err(UpgradeError::Connection);
        }
        if !header_is(&parts.headers, header::UPGRADE, "websocket") {
            return Err(UpgradeError::Upgrade);
        }
        if !header_is(&parts.headers, header::SEC_WEBSOCKET_VERSION, "13") {
            return Err(UpgradeError::WebSocketVersion);
        }
        let key = parts
            .headers
            .get(header::SEC_WEBSOCKET_KEY)
            .ok_or(UpgradeError::Key)?
            .clone();
        let on_upgrade = parts
            .extensions
            .remove::<OnUpgrade>()
            .ok_or(UpgradeError::NotUpgradable)?;
        let deflate_offered = offers_deflate(&parts.headers);
        Ok(Self {
            key,
            on_upgrade,
            deflate_offered,
        })
    }
}

impl WsUpgrade {
    /// The client offered permessage-deflate with parameters we can honour.
    pub fn deflate_offered(&self) -> bool {
        self.deflate_offered
    }

    /// The 101 answer (naming `protocol` if given, and the permessage-deflate agreement
    /// when `config.deflate`), and the future to spawn: once hyper has switched
    /// protocols, it runs `serve` with the socket. Returned rather than spawned here so
    /// the caller spawns it as one task, without a boxed inner future.
    pub fn respond<F, Fut>(
        self,
        protocol: Option<&'static str>,
        config: ReadConfig,
        serve: F,
    ) -> (Response, impl Future<Output = ()> + Send + 'static)
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let on_upgrade = self.on_upgrade;
        let task = async move {
            // A client that goes away before the switch is nothing to report.
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            // Boxed: building the socket is a one-off whose future is larger than the
            // whole idle session; inline, every connection's task would keep its size.
            let socket = Box::pin(Socket::from_upgraded(upgraded, config)).await;
            serve(socket).await;
        };
        let accept = tungstenite::handshake::derive_accept_key(self.key.as_bytes());
        let mut response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_ACCEPT, accept);
        if let Some(p) = protocol {
            response = response.header(header::SEC_WEBSOCKET_PROTOCOL, p);
        }
        if config.deflate {
            response = response.header(header::SEC_WEBSOCKET_EXTENSIONS, DEFLATE_RESPONSE);
        }
        let response = response
            .body(Body::empty())
            .expect("static header values are valid");
        (response, task)
    }
}

fn header_is(headers: &HeaderMap, key: HeaderName, value: &str) -> bool {
    headers
        .get(&key)
        .is_some_and(|h| h.as_bytes().eq_ignore_ascii_case(value.as_bytes()))
}

/// Whether a comma-separated header lists `token` (`Connection: keep-alive, Upgrade`).
fn header_has_token(headers: &HeaderMap, key: HeaderName, token: &str) -> bool {
    headers.get_all(&key).iter().any(|h| {
        h.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// Whether any of the client's `Sec-WebSocket-Extensions` offers (in every such header,
/// comma-separated, RFC 6455 §9.1) is permessage-deflate that we can accept.
pub fn offers_deflate(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(deflate_offer_acceptable)
}

/// One offer (`permessage-deflate; client_max_window_bits`) is acceptable when it names
/// permessage-deflate and every parameter is known, given once and valid (RFC 7692
/// §7.1: a server declines an offer it cannot honour). `server_max_window_bits` below 15
/// cannot be honoured: the compressed frames are shared by every member, deflated with
/// a 32 KiB window. The no-context-takeover parameters are ours anyway, and a client's
/// `client_max_window_bits` only says it can use a smaller window, which our inflater
/// (always 32 KiB) reads.
fn deflate_offer_acceptable(offer: &str) -> bool {
    let mut parts = offer.split(';').map(str::trim);
    if !parts
        .next()
        .is_some_and(|name| name.eq_ignore_ascii_case("permessage-deflate"))
    {
        return false;
    }
    // server_no_context_takeover, client_no_context_takeover, server_max_window_bits,
    // client_max_window_bits: each at most once.
    let mut seen = [false; 4];
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (param, None),
        };
        let i = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" => 0,
            "client_no_context_takeover" => 1,
            "server_max_window_bits" => 2,
            "client_max_window_bits" => 3,
            _ => return false,
        };
        if std::mem::replace(&mut seen[i], true) {
            return false;
        }
        let ok = match i {
            0 | 1 => value.is_none(),
            2 => value.and_then(window_bits) == Some(15),
            _ => value.is_none_or(|v| window_bits(v).is_some()),
        };
        if !ok {
            return false;
        }
    }
    true
}

/// A window-bits value: 1*DIGIT from 8 to 15 (RFC 7692 §7.1.2).
fn window_bits(v: &str) -> Option<u8> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) || v.len() > 2 {
        return None;
    }
    v.parse().ok().filter(|b| (8..=15).contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offered(values: &[&str]) -> bool {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(header::SEC_WEBSOCKET_EXTENSIONS, v.parse().unwrap());
        }
        offers_deflate(&headers)
    }

    #[test]
    fn deflate_offers_we_can_honour_are_accepted() {
        assert!(offered(&["permessage-deflate"]));
        // What Chromium and Firefox send.
        assert!(offered(&["permessage-deflate; client_max_window_bits"]));
        assert!(offered(&[
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        ]));
        assert!(offered(&["permessage-deflate; client_max_window_bits=10"]));
        assert!(offered(&["permessage-deflate; server_max_window_bits=15"]));
        assert!(offered(&[
            "permessage-deflate; client_max_window_bits=\"12\""
        ]));
        assert!(offered(&["x-webkit-deflate-frame", "permessage-deflate"]));
        // A first offer we cannot honour, a fallback we can.
        assert!(offered(&[
            "permessage-deflate; server_max_window_bits=10, permessage-deflate"
        ]));
    }

    #[test]
    fn deflate_offers_we_cannot_honour_are_declined() {
        assert!(!offered(&[]));
        assert!(!offered(&["x-webkit-deflate-frame"]));
        assert!(!offered(&["permessage-deflate; server_max_window_bits=10"]));
        assert!(!offered(&["permessage-deflate; server_max_window_bits"]));
        assert!(!offered(&["permessage-deflate; client_max_window_bits=7"]));
        assert!(!offered(&["permessage-deflate; client_max_window_bits=+9"]));
        assert!(!offered(&["permessage-deflate; mystery"]));
        assert!(!offered(&[
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover"
        ]));
        assert!(!offered(&[
            "permessage-deflate; server_no_context_takeover=1"
        ]));
    }
}
