//! HTTP surface: the `/ws` upgrade (with every check that must answer before it),
//! health and readiness, `/metrics`, and the backend API under `/api/v1`.
//!
//! Every error is JSON `{"code","message"}` with a fitting status. Request bodies are
//! parsed here, not by an extractor, so a bad body is always our 400 naming the field
//! (never a framework's 422 or plain-text rejection).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Path, RawQuery, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

pub mod moderation;

use crate::admission::Refused;
use crate::metrics;
use crate::protocol::{EventBody, Format, RoomId, User};
use crate::redpacket::{CreateError, CreateRequest};
use crate::session;
use crate::session::socket::ReadConfig;
use crate::shared::Shared;
use crate::upgrade::{UpgradeError, WsUpgrade};

/// Largest API request body. Events and red-packet requests are a few hundred bytes; a
/// client frame may be 64 KiB, and a backend's event need not be larger.
const API_MAX_BODY: usize = 64 * 1024;

/// An HTTP error answer: status plus `{"code","message"}`.
#[derive(Debug)]
pub struct HttpError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl HttpError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(json!({"code": self.code, "message": self.message})),
        )
            .into_response()
    }
}

/// A path parameter whose rejection is our JSON 400, not axum's plain text.
struct ApiPath(String);

impl<S: Send + Sync> FromRequestParts<S> for ApiPath {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, HttpError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(p)| ApiPath(p))
            .map_err(|e| HttpError::bad_request(format!("path: {}", e.body_text())))
    }
}

/// A request body whose rejections (too large: 413, unreadable: 400) are JSON.
struct Body(Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, HttpError> {
        Bytes::from_request(req, state)
            .await
            .map(Body)
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    HttpError::new(e.status(), "too_large", e.body_text())
                } else {
                    HttpError::bad_request(format!("body: {}", e.body_text()))
                }
            })
    }
}

pub fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route("/api/v1/rooms/{room}/events", post(post_event))
        .route("/api/v1/rooms/{room}", get(get_room))
        .route("/api/v1/rooms/{room}/redpackets", post(post_redpacket))
        .route("/api/v1/redpackets/{packet}", get(get_redpacket))
        .merge(moderation::routes())
        .layer(axum::extract::DefaultBodyLimit::max(API_MAX_BODY))
        .merge(
            moderation::filter_routes().layer(axum::extract::DefaultBodyLimit::max(
                moderation::FILTERS_MAX_BODY,
            )),
        )
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&shared),
            require_api_token,
        ));
    Router::new()
        .route("/ws", get(ws_upgrade))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .merge(api)
        .merge(crate::web::routes())
        .fallback(|| async { HttpError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|req: Request| async move {
            HttpError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{} is not allowed on {}", req.method(), req.uri().path()),
            )
        })
        .with_state(shared)
}

/// Everything checked before the upgrade, in the order PROTOCOL.md gives.
///
/// `peer` is the connection's client address (the edge has applied a trusted PROXY
/// header); a trusted peer's `X-Forwarded-For` then names the client.
async fn ws_upgrade(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    upgrade: Result<WsUpgrade, UpgradeError>,
) -> Result<Response, HttpError> {
    let client_ip = shared.trusted.client_ip(peer.ip(), &headers);
    if shared.drain.is_cancelled() {
        metrics::refused("draining");
        return Err(HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "node is draining",
        ));
    }
    // A list, not a map: a map keeps one of two `token`s silently, and which one a proxy
    // or the issuer meant cannot be known (PROTOCOL.md, protocol hygiene).
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
            .map_err(|e| HttpError::bad_request(format!("query: {e}")))?;
    if pairs.iter().filter(|(k, _)| k == "token").count() > 1 {
        return Err(HttpError::bad_request("token: given more than once"));
    }
    let params: HashMap<String, String> = pairs.into_iter().collect();
    let room = params
        .get("room")
        .map(|r| RoomId::parse(r))
        .transpose()
        .map_err(|e| HttpError::bad_request(e.message))?;
    let format_param = params
        .get("format")
        .map(|f| {
            Format::from_param(f)
                .ok_or_else(|| HttpError::bad_request("format: must be json or msgpack"))
        })
        .transpose()?;
    let user = match params.get("token") {
        Some(token) => Some(
            shared
                .auth
                .verify(token)
                .map_err(|e| HttpError::unauthorized(e.to_string()))?,
        ),
        None if shared.cfg.auth.allow_anonymous => None,
        None => return Err(HttpError::unauthorized("token required")),
    };
    if let Some(u) = &user
        && let Some(ban) = shared.moderation.ban_of(&u.id)
    {
        metrics::refused("banned");
        let until = ban.until.map_or_else(
            || "until lifted".to_string(),
            |t| format!("until {t} (unix ms)"),
        );
        return Err(HttpError::new(
            StatusCode::FORBIDDEN,
            "banned",
            format!("user is banned {until}"),
        ));
    }
    let ticket = shared.admission.admit(client_ip).map_err(|r| {
        let (status, reason) = match r {
            Refused::NodeFull => (StatusCode::SERVICE_UNAVAILABLE, "max_conns"),
            Refused::IpFull => (StatusCode::TOO_MANY_REQUESTS, "max_conns_per_ip"),
        };
        metrics::refused(reason);
        tracing::debug!(client = %client_ip, reason, "upgrade refused");
        HttpError::new(
            status,
            if status == StatusCode::SERVICE_UNAVAILABLE {
                "unavailable"
            } else {
                "rate_limited"
            },
            r.to_string(),
        )
    })?;
    let upgrade = upgrade
        .map_err(|e| HttpError::bad_request(format!("expected a WebSocket upgrade: {e}")))?;
    let (format, subprotocol) = negotiate_format(format_param, &headers)?;
    let config = ReadConfig {
        max_message: shared.cfg.limits.max_frame_bytes,
        deflate: shared.cfg.compression.enabled && upgrade.deflate_offered(),
    };
    let params = session::Params {
        user,
        format,
        room,
        ticket,
        ip: client_ip,
    };
    let sessions = shared.sessions.clone();
    let (response, session) = upgrade.respond(subprotocol, config, move |ws| {
        session::run(ws, shared, params)
    });
    sessions.spawn(session);
    Ok(response)
}

/// The frame format and the subprotocol to echo. The client's first `danmaku.v1.*`
/// subprotocol picks the format unless `format=` is given; the echoed subprotocol always
/// names the format actually spoken, so a `format=` the offered subprotocols contradict
/// is refused rather than answered under a misleading name.
///
/// # Errors
/// 400 when `format=` names a format none of the offered `danmaku.v1.*` subprotocols
/// speaks.
fn negotiate_format(
    param: Option<Format>,
    headers: &HeaderMap,
) -> Result<(Format, Option<&'static str>), HttpError> {
    let offered: Vec<Format> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|p| Format::from_subprotocol(p.trim()))
        .collect();
    let format = match (param, offered.first()) {
        (Some(f), Some(_)) if !offered.contains(&f) => {
            return Err(HttpError::bad_request(format!(
                "format: {} contradicts Sec-WebSocket-Protocol, which offers only {}",
                f.param(),
                offered[0].subprotocol()
            )));
        }
        (Some(f), _) => f,
        (None, Some(&f)) => f,
        (None, None) => Format::Json,
    };
    Ok((format, (!offered.is_empty()).then(|| format.subprotocol())))
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

/// 503 while draining, or while the backplane is down and `redis.required` says that
/// makes the node unready; the body always says how the backplane is.
async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.drain.is_cancelled() {
        return HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "node is draining",
        )
        .into_response();
    }
    let up = shared.backplane.is_up();
    let body = json!({
        "status": if up { "ready" } else { "degraded" },
        "backplane": {"kind": shared.backplane.kind(), "up": up},
    });
    if !up && shared.cfg.redis.required {
        let body = json!({
            "code": "unavailable",
            "message": "backplane is down",
            "backplane": body["backplane"],
        });
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    }
    axum::Json(body).into_response()
}

async fn metrics_text(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    metrics::collect_process();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared.prometheus.render(),
    )
}

/// `Authorization: Bearer <api.token>` on every `/api` route.
async fn require_api_token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            // The auth scheme is case-insensitive (RFC 9110 §11.1).
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    match presented {
        Some(t) if constant_time_eq(t.as_bytes(), shared.cfg.api.token.as_bytes()) => {
            next.run(req).await
        }
        Some(_) => HttpError::unauthorized("bad API token").into_response(),
        None => {
            HttpError::unauthorized("missing Authorization: Bearer <api.token>").into_response()
        }
    }
}

/// Compares without an early exit, so response timing does not leak the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn room_param(room: &str) -> Result<RoomId, HttpError> {
    RoomId::parse(room).map_err(|e| HttpError::bad_request(e.message))
}

/// Parses a JSON body; the error names the field that failed. The body must be exactly
/// one JSON value: anything but whitespace after it is refused (PROTOCOL.md, protocol
/// hygiene), rather than silently ignored as a bare `Deserializer` would.
fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, HttpError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            HttpError::bad_request(format!("body: {inner}"))
        } else {
            HttpError::bad_request(format!("{path}: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| HttpError::bad_request(format!("body: after the JSON value: {e}")))?;
    Ok(value)
}

/// An event a backend posts into a room.
enum ApiEvent {
    System {
        text: String,
        data: Option<serde_json::Value>,
    },
    Chat {
        user: User,
        text: String,
    },
    Gift {
        user: User,
        gift: String,
        count: Option<u32>,
    },
}

impl ApiEvent {
    /// Reads `type` first, then the variant's own struct, so an error names the field
    /// (an internally tagged enum would lose the path).
    fn parse(body: &[u8]) -> Result<Self, HttpError> {
        #[derive(Deserialize)]
        struct Tag {
            #[serde(rename = "type")]
            kind: String,
        }
        #[derive(Deserialize)]
        struct System {
            text: String,
            #[serde(default)]
            data: Option<serde_json::Value>,
        }
        #[derive(Deserialize)]
        struct Chat {
            user: User,
            text: String,
        }
        #[derive(Deserialize)]
        struct Gift {
            user: User,
            gift: String,
            #[serde(default)]
            count: Option<u32>,
        }
        Ok(match parse_body::<Tag>(body)?.kind.as_str() {
            "system" => {
                let e: System = parse_body(body)?;
                ApiEvent::System {
                    text: e.text,
                    data: e.data,
                }
            }
            "chat" => {
                let e: Chat = parse_body(body)?;
                ApiEvent::Chat {
                    user: e.user,
                    text: e.text,
                }
            }
            "gift" => {
                let e: Gift = parse_body(body)?;
                ApiEvent::Gift {
                    user: e.user,
                    gift: e.gift,
                    count: e.count,
                }
            }
            other => {
                return Err(HttpError::bad_request(format!(
                    "type: unknown event type {other:?} (expected system, chat or gift)"
                )));
            }
        })
    }
}

async fn post_event(
    State(shared): State<Arc<Shared>>,
    ApiPath(room): ApiPath,
    Body(body): Body,
) -> Result<Response, HttpError> {
    let room = room_param(&room)?;
    let body = match ApiEvent::parse(&body)? {
        ApiEvent::System { text, data } => {
            if text.is_empty() {
                return Err(HttpError::bad_request("text: must not be empty"));
            }
            EventBody::System { text, data }
        }
        ApiEvent::Chat { user, text } => {
            crate::protocol::check_text(&text, shared.cfg.limits.max_text_chars)
                .map_err(|e| HttpError::bad_request(e.message))?;
            if user.id.is_empty() {
                return Err(HttpError::bad_request("user.id: must not be empty"));
            }
            EventBody::Chat { user, text }
        }
        ApiEvent::Gift { user, gift, count } => {
            if !shared.gifts.contains_key(&gift) {
                return Err(HttpError::bad_request(format!(
                    "gift: unknown gift {gift:?}"
                )));
            }
            let count = count.unwrap_or(1);
            if !(1..=crate::protocol::MAX_GIFT_COUNT).contains(&count) {
                return Err(HttpError::bad_request("count: must be 1..=9999"));
            }
            if user.id.is_empty() {
                return Err(HttpError::bad_request("user.id: must not be empty"));
            }
            EventBody::Gift {
                user,
                gift,
                count: u64::from(count),
            }
        }
    };
    let id = shared.hub.publish(&room, body);
    Ok((StatusCode::ACCEPTED, axum::Json(json!({"id": id}))).into_response())
}

async fn get_room(
    State(shared): State<Arc<Shared>>,
    ApiPath(room): ApiPath,
) -> Result<Response, HttpError> {
    let room = room_param(&room)?;
    // Fresh from the backplane: this node may hold no members of the room.
    let online = shared.hub.local_online(&room) + shared.backplane.online_elsewhere(&room).await;
    Ok(axum::Json(json!({"room": room, "online": online})).into_response())
}

async fn post_redpacket(
    State(shared): State<Arc<Shared>>,
    ApiPath(room): ApiPath,
    Body(body): Body,
) -> Result<Response, HttpError> {
    let room = room_param(&room)?;
    let req = parse_body::<CreateRequest>(&body)?;
    match shared.redpackets.create(&room, req).await {
        Ok(packet) => {
            Ok((StatusCode::CREATED, axum::Json(json!({"packet": packet}))).into_response())
        }
        Err(CreateError::Invalid(m)) => Err(HttpError::bad_request(m)),
        Err(CreateError::Store(e)) => Err(HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        )),
    }
}

async fn get_redpacket(
    State(shared): State<Arc<Shared>>,
    ApiPath(packet): ApiPath,
) -> Result<Response, HttpError> {
    match shared.redpackets.status(&packet).await {
        Ok(Some(status)) => Ok(axum::Json(status).into_response()),
        Ok(None) => Err(HttpError::new(
            StatusCode::NOT_FOUND,
            "packet_not_found",
            "no such packet",
        )),
        Err(e) => Err(HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        )),
    }
}
