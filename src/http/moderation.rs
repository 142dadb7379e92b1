//! The moderation endpoints of the backend API (PROTOCOL.md v1.1, *Moderation*): room
//! mutes, bans, room settings, recalls and the keyword filter lists.
//!
//! Handlers validate and translate; what a change means (stored, applied on every node,
//! connections closed) is [`crate::moderation`]'s. A change the store cannot take is a
//! 503 and changed nothing.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, put};
use serde::Deserialize;
use serde_json::json;

use super::{ApiPath, Body, HttpError, parse_body, room_param};
use crate::metrics;
use crate::moderation::{
    Applied, Change, ChatState, Lists, MAX_DURATION_S, MAX_FILTER_WORDS, MAX_REASON_CHARS,
    MAX_SLOW_MODE_S, MAX_USER_BYTES, MAX_WORD_CHARS, ModerationError, Restriction, RoomSettings,
};
use crate::protocol::{EventBody, RoomId, now_ms};
use crate::shared::Shared;

/// Longest event id a recall may name, in bytes (ids the gateway makes are ~40).
const MAX_EVENT_ID_BYTES: usize = 128;
/// Largest `PUT /api/v1/filters` body: 100,000 words of a few characters each.
pub const FILTERS_MAX_BODY: usize = 8 * 1024 * 1024;

/// The moderation routes (the caller adds the bearer-token check and body limits).
pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route(
            "/api/v1/rooms/{room}/mutes/{user}",
            put(put_mute).delete(delete_mute),
        )
        .route("/api/v1/rooms/{room}/mutes", get(get_mutes))
        .route(
            "/api/v1/bans/{user}",
            put(put_ban).delete(delete_ban).get(get_ban),
        )
        .route(
            "/api/v1/rooms/{room}/settings",
            put(put_settings).get(get_settings),
        )
        .route("/api/v1/rooms/{room}/events/{id}", delete(delete_event))
}

/// `PUT/GET /api/v1/filters`, apart for its larger body limit.
pub fn filter_routes() -> Router<Arc<Shared>> {
    Router::new().route("/api/v1/filters", put(put_filters).get(get_filters))
}

/// Two path parameters, rejected as our JSON 400.
struct Path2(String, String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Path2 {
    type Rejection = HttpError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, HttpError> {
        Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map(|Path((a, b))| Path2(a, b))
            .map_err(|e| HttpError::bad_request(format!("path: {}", e.body_text())))
    }
}

/// The body of a mute or a ban; an empty body is `{}`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RestrictionBody {
    #[serde(default)]
    duration_s: Option<u64>,
    #[serde(default)]
    reason: Option<String>,
}

impl RestrictionBody {
    fn parse(body: &[u8]) -> Result<Restriction, HttpError> {
        let b: RestrictionBody = if body.iter().all(u8::is_ascii_whitespace) {
            RestrictionBody::default()
        } else {
            parse_body(body)?
        };
        let until = match b.duration_s {
            None => None,
            Some(0) => return Err(HttpError::bad_request("duration_s: must be at least 1")),
            Some(d) if d > MAX_DURATION_S => {
                return Err(HttpError::bad_request(format!(
                    "duration_s: at most {MAX_DURATION_S} (ten years); leave it out for no end"
                )));
            }
            Some(d) => Some(now_ms() + d * 1000),
        };
        if let Some(r) = &b.reason
            && r.chars().count() > MAX_REASON_CHARS
        {
            return Err(HttpError::bad_request(format!(
                "reason: at most {MAX_REASON_CHARS} characters"
            )));
        }
        Ok(Restriction {
            until,
            reason: b.reason,
        })
    }
}

fn user_param(user: String) -> Result<String, HttpError> {
    if user.is_empty() || user.len() > MAX_USER_BYTES {
        return Err(HttpError::bad_request(format!(
            "user: must be 1-{MAX_USER_BYTES} bytes"
        )));
    }
    if user.chars().any(char::is_control) {
        return Err(HttpError::bad_request(
            "user: control characters not allowed",
        ));
    }
    Ok(user)
}

pub(crate) fn store_error(e: ModerationError) -> HttpError {
    match e {
        ModerationError::Filter(e) => HttpError::bad_request(e.to_string()),
        ModerationError::Store(e) => {
            tracing::warn!(error = %e, "moderation change not stored");
            HttpError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            )
        }
    }
}

pub(crate) fn done_or_404(applied: Applied, what: &str) -> Result<Response, HttpError> {
    match applied {
        Applied::Done => Ok(StatusCode::NO_CONTENT.into_response()),
        Applied::NotFound => Err(HttpError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not in force"),
        )),
    }
}

fn restriction_json(user: &str, r: &Restriction) -> serde_json::Value {
    json!({"user": user, "until": r.until, "reason": r.reason})
}

async fn put_mute(
    State(shared): State<Arc<Shared>>,
    Path2(room, user): Path2,
    Body(body): Body,
) -> Result<Response, HttpError> {
    let room = room_param(&room)?;
    let user = user_param(user)?;
    let restriction = RestrictionBody::parse(&body)?;
    let applied = shared
        .moderation
        .apply(Change::Mute {
            room,
            user,
            restriction,
        })
        .await
        .map_err(store_error)?;
    done_or_404(applied, "mute")
}

async fn delete_mute(
    State(shared): State<Arc<Shared>>,
    Path2(room, user): Path2,
) -> Result<Response, HttpError> {
    let room = room_param(&room)?;
    let user = user_param(user)?;
    let applied = shared
        .moderation
        .apply(Change::Unmute { room, user })
        .await
        .map_err(store_error)?;
    done_or_404(applied, "mute")
}

async fn get_mutes(
    State(shared): State<Arc<Shared>>,
    ApiPath(room): ApiPath,
) -> Result<Response, HttpError> {
    let room = room_param(&room)?;
    let mutes: Vec<serde_json::Value> = shared
        .moderation
        .mutes(&room)
        .iter()
        .map(|(u, r)| restriction_json(u, r))
        .collect();
    Ok(axum::Json(json!({"mutes": mutes})).into_response())
}

async fn put_ban(
    State(shared): State<Arc<Shared>>,
    ApiPath(user): ApiPath,
    Body(body): Body,
) -> Result<Response, HttpError> {
    let user = user_param(user)?;
    let restriction = RestrictionBody::parse(&body)?;
    let applied = shared
        .moderation
        .apply(Change::Ban { user, restriction })
        .await
        .map_err(store_error)?;
    done_or_404(applied, "ban")
}

async fn delete_ban(
    State(shared): State<Arc<Shared>>,
    ApiPath(user): ApiPath,
) -> Result<Response, HttpError> {
    let user = user_param(user)?;
    let applied = shared
        .moderation
        .apply(Change::Unban { user })
        .await
        .map_err(store_error)?;
    done_or_404(applied, "ban")
}

async fn get_ban(
    State(shared): State<Arc<Shared>>,
    ApiPath(user): ApiPath,
) -> Result<Response, HttpError> {
    let user = user_param(user)?;
    match shared.moderation.ban_of(&user) {
        Some(r) => Ok(axum::Json(restriction_json(&user, &r)).into_response()),
        None => Err(HttpError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "ban not in force",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsBody {
    #[serde(default)]
    chat: Option<ChatState>,
    #[serde(default)]
    slow_mode_s: Option<u32>,
}

async fn put_settings(
    State(shared): State<Arc<Shared>>,
    ApiPath(room): ApiPath,
    Body(body): Body,
) -> Result<Response, HttpError> {
    let room = room_param(&room)?;
    let b: SettingsBody = parse_body(&body)?;
    if b.slow_mode_s.is_some_and(|s| s > MAX_SLOW_MODE_S) {
        return Err(HttpError::bad_request(format!(
            "slow_mode_s: at most {MAX_SLOW_MODE_S} (a day)"
        )));
    }
    // Fields left out keep their value: merge with the settings in force.
    let mut settings = shared.moderation.settings(&room);
    if let Some(chat) = b.chat {
        settings.chat = chat;
    }
    if let Some(s) = b.slow_mode_s {
        settings.slow_mode_s = s;
    }
    apply_settings(&shared, room, settings).await
}

/// Puts `settings` in force for `room` and answers with the settings then in force (the
/// API's `PUT .../settings` and the demo's dev panel).
pub(crate) async fn apply_settings(
    shared: &Shared,
    room: RoomId,
    settings: RoomSettings,
) -> Result<Response, HttpError> {
    shared
        .moderation
        .apply(Change::Settings {
            room: room.clone(),
            settings,
        })
        .await
        .map_err(store_error)?;
    Ok(axum::Json(shared.moderation.settings(&room)).into_response())
}

async fn get_settings(
    State(shared): State<Arc<Shared>>,
    ApiPath(room): ApiPath,
) -> Result<Response, HttpError> {
    let room = room_param(&room)?;
    Ok(axum::Json(shared.moderation.settings(&room)).into_response())
}

/// `DELETE /api/v1/rooms/{room}/events/{id}`: the room gets a `recall` event. The id is
/// not looked up: the gateway's history is bounded, and a client may still show an
/// event the gateway has forgotten, so an unknown id is recalled all the same.
async fn delete_event(
    State(shared): State<Arc<Shared>>,
    Path2(room, id): Path2,
) -> Result<Response, HttpError> {
    let room = room_param(&room)?;
    let id = event_id_param(id)?;
    let recall = recall(&shared, &room, id);
    Ok((StatusCode::ACCEPTED, axum::Json(json!({"id": recall}))).into_response())
}

/// Publishes a `recall` of `target` in `room`; returns the recall event's id.
pub fn recall(shared: &Shared, room: &RoomId, target: String) -> String {
    ::metrics::counter!(metrics::MODERATION_ACTIONS, "action" => "recall").increment(1);
    shared.hub.publish(room, EventBody::Recall { target })
}

/// Validates an event id named by a recall.
pub fn event_id_param(id: String) -> Result<String, HttpError> {
    if id.is_empty() || id.len() > MAX_EVENT_ID_BYTES {
        return Err(HttpError::bad_request(format!(
            "id: must be 1-{MAX_EVENT_ID_BYTES} bytes"
        )));
    }
    if id.chars().any(char::is_control) {
        return Err(HttpError::bad_request("id: control characters not allowed"));
    }
    Ok(id)
}

async fn put_filters(
    State(shared): State<Arc<Shared>>,
    Body(body): Body,
) -> Result<Response, HttpError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct FiltersBody {
        block: Vec<String>,
        mask: Vec<String>,
    }
    let b: FiltersBody = parse_body(&body)?;
    for (name, list) in [("block", &b.block), ("mask", &b.mask)] {
        if list.len() > MAX_FILTER_WORDS {
            return Err(HttpError::bad_request(format!(
                "{name}: at most {MAX_FILTER_WORDS} words"
            )));
        }
        if let Some(i) = list
            .iter()
            .position(|w| w.trim().is_empty() || w.chars().count() > MAX_WORD_CHARS)
        {
            return Err(HttpError::bad_request(format!(
                "{name}[{i}]: a word is 1-{MAX_WORD_CHARS} characters, not only whitespace"
            )));
        }
    }
    let lists = Lists {
        block: b.block,
        mask: b.mask,
    };
    let counts = json!({"block": lists.block.len(), "mask": lists.mask.len()});
    shared
        .moderation
        .apply(Change::Filters(lists))
        .await
        .map_err(store_error)?;
    Ok(axum::Json(counts).into_response())
}

async fn get_filters(State(shared): State<Arc<Shared>>) -> Result<Response, HttpError> {
    let lists = shared.moderation.lists();
    Ok(axum::Json(json!({"block": lists.block, "mask": lists.mask})).into_response())
}
