//! The browser side, embedded in the binary: the live demo page at `/` and the client
//! library it uses (`/danmaku-client.js`, `/msgpack.js`), with `/demo.js` and
//! `/demo.css`. The sources live in `web/` and are compiled in with `include_str!`, so
//! a deployed gateway needs no files beside it.
//!
//! With `[web] dev_tokens = true` (off by default) a few helpers make the page usable on
//! a laptop without a login service or a backend; all answer 404 when it is off:
//! - `GET /dev/token?name=Alice` → `{"token","user"}`: a JWT signed with `auth.secret`
//!   for a fresh `dev-<random>` user, valid for an hour.
//! - `POST /dev/redpacket?room=R` → 201 `{"packet"}`: a small red packet (1000 cents in
//!   10 shares) from a demo sponsor. The browser never sees the API token.
//! - The moderator panel's helpers, each a thin wrapper over the moderation API with the
//!   same checks: `POST /dev/mute?room=R&user=U[&duration_s=N]`,
//!   `POST /dev/unmute?room=R&user=U`, `POST /dev/recall?room=R&id=EVENT`, and
//!   `GET`/`POST /dev/settings?room=R[&chat=open|closed][&slow_mode_s=N]`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::http::HttpError;
use crate::http::moderation;
use crate::moderation::{Change, ChatState, MAX_DURATION_S, MAX_SLOW_MODE_S, Restriction};
use crate::protocol::{RoomId, User, now_ms};
use crate::redpacket::{CreateError, CreateRequest};
use crate::shared::Shared;

/// Embedded static files: path, content type, body.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("../web/index.html"),
    ),
    (
        "/danmaku-client.js",
        "text/javascript; charset=utf-8",
        include_str!("../web/danmaku-client.js"),
    ),
    (
        "/msgpack.js",
        "text/javascript; charset=utf-8",
        include_str!("../web/msgpack.js"),
    ),
    (
        "/demo.js",
        "text/javascript; charset=utf-8",
        include_str!("../web/demo.js"),
    ),
    (
        "/demo.css",
        "text/css; charset=utf-8",
        include_str!("../web/demo.css"),
    ),
];

/// The page talks only to its own origin (HTTP and WebSocket) and renders user text as
/// text; the policy makes an injected script inert all the same.
const CSP: &str = "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; \
                   style-src 'self'; script-src 'self'; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

/// Lifetime of a dev token.
const DEV_TOKEN_TTL_S: u64 = 3600;
/// Longest display name a dev token carries, in characters.
const DEV_NAME_MAX_CHARS: usize = 32;

/// The demo routes, merged into [`crate::http::router`].
pub fn routes() -> Router<Arc<Shared>> {
    let mut router = Router::new();
    for &(path, content_type, body) in ASSETS {
        router = router.route(path, get(move || async move { asset(content_type, body) }));
    }
    router
        .route("/dev/token", get(dev_token))
        .route("/dev/redpacket", post(dev_redpacket))
        .route("/dev/mute", post(dev_mute))
        .route("/dev/unmute", post(dev_unmute))
        .route("/dev/recall", post(dev_recall))
        .route("/dev/settings", get(dev_get_settings).post(dev_settings))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = (
        [
            (header::CONTENT_TYPE, content_type),
            // Embedded in the binary: a new build is a new page, so always revalidate.
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response();
    if content_type.starts_with("text/html") {
        resp.headers_mut().insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
    }
    resp
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({"code": code, "message": message.into()})),
    )
        .into_response()
}

/// What the router's fallback answers: dev helpers are invisible when off.
fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "no such route")
}

/// The query string as a map; the error is the 400 message.
fn query_params(query: Option<&str>) -> Result<HashMap<String, String>, String> {
    serde_urlencoded::from_str(query.unwrap_or("")).map_err(|e| format!("query: {e}"))
}

/// A display name from `?name=`: trimmed, control characters dropped, at most
/// [`DEV_NAME_MAX_CHARS`]; empty becomes `Guest`.
fn dev_name(raw: Option<&str>) -> String {
    let name: String = raw
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .collect::<String>()
        .trim()
        .chars()
        .take(DEV_NAME_MAX_CHARS)
        .collect();
    if name.is_empty() {
        "Guest".into()
    } else {
        name
    }
}

async fn dev_token(State(shared): State<Arc<Shared>>, RawQuery(query): RawQuery) -> Response {
    if !shared.cfg.web.dev_tokens {
        return not_found();
    }
    let params = match query_params(query.as_deref()) {
        Ok(p) => p,
        Err(m) => return error(StatusCode::BAD_REQUEST, "bad_request", m),
    };
    let name = dev_name(params.get("name").map(String::as_str));
    let sub = format!("dev-{:012x}", rand::random::<u64>() >> 16);
    let exp = now_ms() / 1000 + DEV_TOKEN_TTL_S;
    let token = crate::auth::sign(&shared.cfg.auth.secret, &sub, &name, exp);
    (
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(json!({"token": token, "user": {"id": sub, "name": name}, "exp": exp})),
    )
        .into_response()
}

async fn dev_redpacket(State(shared): State<Arc<Shared>>, RawQuery(query): RawQuery) -> Response {
    if !shared.cfg.web.dev_tokens {
        return not_found();
    }
    let params = match query_params(query.as_deref()) {
        Ok(p) => p,
        Err(m) => return error(StatusCode::BAD_REQUEST, "bad_request", m),
    };
    let Some(room) = params.get("room") else {
        return error(StatusCode::BAD_REQUEST, "bad_request", "room: required");
    };
    let room = match RoomId::parse(room) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e.message),
    };
    let req = CreateRequest {
        total: 1000,
        shares: 10,
        sender: User {
            id: "dev-sponsor".into(),
            name: "Demo sponsor".into(),
        },
        expires_in_s: None,
    };
    match shared.redpackets.create(&room, req).await {
        Ok(packet) => (StatusCode::CREATED, axum::Json(json!({"packet": packet}))).into_response(),
        Err(CreateError::Invalid(m)) => error(StatusCode::BAD_REQUEST, "bad_request", m),
        Err(CreateError::Store(e)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
    }
}

/// The query of a dev moderation helper and its `room`, or the answer to give.
fn dev_room_query(
    shared: &Shared,
    query: Option<&str>,
) -> Result<(HashMap<String, String>, RoomId), HttpError> {
    if !shared.cfg.web.dev_tokens {
        return Err(HttpError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such route",
        ));
    }
    let params = query_params(query).map_err(HttpError::bad_request)?;
    let room = params
        .get("room")
        .ok_or_else(|| HttpError::bad_request("room: required"))?;
    let room = RoomId::parse(room).map_err(|e| HttpError::bad_request(e.message))?;
    Ok((params, room))
}

fn required<'a>(params: &'a HashMap<String, String>, key: &str) -> Result<&'a str, HttpError> {
    params
        .get(key)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| HttpError::bad_request(format!("{key}: required")))
}

fn number<T: std::str::FromStr>(
    params: &HashMap<String, String>,
    key: &str,
) -> Result<Option<T>, HttpError> {
    params
        .get(key)
        .map(|v| {
            v.parse()
                .map_err(|_| HttpError::bad_request(format!("{key}: not a number")))
        })
        .transpose()
}

/// `POST /dev/mute?room=R&user=U[&duration_s=N]` → 204: the demo's moderator panel.
async fn dev_mute(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
) -> Result<Response, HttpError> {
    let (params, room) = dev_room_query(&shared, query.as_deref())?;
    let user = required(&params, "user")?.to_owned();
    let duration_s: Option<u64> = number(&params, "duration_s")?;
    if duration_s == Some(0) || duration_s.is_some_and(|d| d > MAX_DURATION_S) {
        return Err(HttpError::bad_request("duration_s: 1 up to ten years"));
    }
    let change = Change::Mute {
        room,
        user,
        restriction: Restriction {
            until: duration_s.map(|d| now_ms() + d * 1000),
            reason: Some("muted from the demo's moderator panel".into()),
        },
    };
    shared
        .moderation
        .apply(change)
        .await
        .map_err(moderation::store_error)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /dev/unmute?room=R&user=U` → 204, or 404 when not muted.
async fn dev_unmute(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
) -> Result<Response, HttpError> {
    let (params, room) = dev_room_query(&shared, query.as_deref())?;
    let user = required(&params, "user")?.to_owned();
    let applied = shared
        .moderation
        .apply(Change::Unmute { room, user })
        .await
        .map_err(moderation::store_error)?;
    moderation::done_or_404(applied, "mute")
}

/// `POST /dev/recall?room=R&id=EVENT` → 202 `{"id"}` (the recall event's id).
async fn dev_recall(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
) -> Result<Response, HttpError> {
    let (params, room) = dev_room_query(&shared, query.as_deref())?;
    let target = moderation::event_id_param(required(&params, "id")?.to_owned())?;
    let id = moderation::recall(&shared, &room, target);
    Ok((StatusCode::ACCEPTED, axum::Json(json!({"id": id}))).into_response())
}

/// `GET /dev/settings?room=R` → 200 with the room's settings.
async fn dev_get_settings(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
) -> Result<Response, HttpError> {
    let (_, room) = dev_room_query(&shared, query.as_deref())?;
    Ok(axum::Json(shared.moderation.settings(&room)).into_response())
}

/// `POST /dev/settings?room=R[&chat=open|closed][&slow_mode_s=N]` → 200 with the
/// room's settings after the change.
async fn dev_settings(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
) -> Result<Response, HttpError> {
    let (params, room) = dev_room_query(&shared, query.as_deref())?;
    let mut settings = shared.moderation.settings(&room);
    match params.get("chat").map(String::as_str) {
        None => {}
        Some("open") => settings.chat = ChatState::Open,
        Some("closed") => settings.chat = ChatState::Closed,
        Some(_) => return Err(HttpError::bad_request("chat: open or closed")),
    }
    if let Some(s) = number::<u32>(&params, "slow_mode_s")? {
        if s > MAX_SLOW_MODE_S {
            return Err(HttpError::bad_request("slow_mode_s: at most a day"));
        }
        settings.slow_mode_s = s;
    }
    moderation::apply_settings(&shared, room, settings).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_names_are_trimmed_and_bounded() {
        assert_eq!(dev_name(None), "Guest");
        assert_eq!(dev_name(Some("  \n ")), "Guest");
        assert_eq!(dev_name(Some(" Alice\u{7} ")), "Alice");
        assert_eq!(dev_name(Some(&"é".repeat(40))).chars().count(), 32);
    }

    #[test]
    fn every_asset_is_embedded_with_a_content_type() {
        for &(path, content_type, body) in ASSETS {
            assert!(!body.is_empty(), "{path} is empty");
            assert!(content_type.contains("charset=utf-8"), "{path}");
        }
        let index = ASSETS.iter().find(|a| a.0 == "/").unwrap().2;
        for script in ["/demo.js", "/demo.css"] {
            assert!(index.contains(script), "index.html does not load {script}");
        }
    }
}
