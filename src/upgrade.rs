//! The WebSocket opening handshake (RFC 6455 §4.2) over hyper's HTTP/1.1 upgrade.
//!
//! Ours rather than axum's `WebSocketUpgrade` because the session needs the raw socket
//! back: axum hands over a tungstenite stream that copies every outgoing frame into a
//! per-connection write buffer, while the gateway writes shared, pre-encoded frames
//! straight to the socket ([`crate::session::socket`]). The checks are the same as
//! axum's; the reply is the standard 101 with `Sec-WebSocket-Accept`.

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::OnUpgrade;
use tungstenite::protocol::WebSocketConfig;

use crate::session::socket::Socket;

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
        Ok(Self { key, on_upgrade })
    }
}

impl WsUpgrade {
    /// The 101 answer (naming `protocol` if given), and the future to spawn: once hyper
    /// has switched protocols, it runs `serve` with the socket. Returned rather than
    /// spawned here so the caller spawns it as one task, without a boxed inner future.
    pub fn respond<F, Fut>(
        self,
        protocol: Option<&'static str>,
        config: WebSocketConfig,
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
