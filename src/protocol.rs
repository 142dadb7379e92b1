//! The wire contract of `PROTOCOL.md` v1: client ops, server frames, room events, error
//! and close codes, and the two codecs (JSON text frames, MessagePack binary frames with
//! named fields).
//!
//! Decoding validates everything a frame can be checked for on its own (types, room ids,
//! ranges, text length), so the session only sees well-formed ops. Server frames are
//! `Serialize`; [`crate::wire`] turns them into complete WebSocket frame bytes, once per
//! format, shared by every member.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Wire format of one connection, chosen by `format=` or the subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Json,
    Msgpack,
}

impl Format {
    pub const SUBPROTOCOL_JSON: &'static str = "danmaku.v1.json";
    pub const SUBPROTOCOL_MSGPACK: &'static str = "danmaku.v1.msgpack";

    /// Parses the `format` query parameter.
    pub fn from_param(s: &str) -> Option<Self> {
        match s {
            "json" => Some(Format::Json),
            "msgpack" => Some(Format::Msgpack),
            _ => None,
        }
    }

    /// The `format` query parameter's value for this format.
    pub fn param(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Msgpack => "msgpack",
        }
    }

    pub fn subprotocol(self) -> &'static str {
        match self {
            Format::Json => Self::SUBPROTOCOL_JSON,
            Format::Msgpack => Self::SUBPROTOCOL_MSGPACK,
        }
    }

    pub fn from_subprotocol(s: &str) -> Option<Self> {
        match s {
            Self::SUBPROTOCOL_JSON => Some(Format::Json),
            Self::SUBPROTOCOL_MSGPACK => Some(Format::Msgpack),
            _ => None,
        }
    }
}

/// A validated room id: 1–64 chars of `[A-Za-z0-9_.:-]`. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct RoomId(Arc<str>);

impl RoomId {
    pub const MAX_LEN: usize = 64;

    /// # Errors
    /// [`ProtoError`] `bad_request` naming the rule the id breaks.
    pub fn parse(s: &str) -> Result<Self, ProtoError> {
        if s.is_empty() || s.len() > Self::MAX_LEN {
            return Err(ProtoError::bad_request("room: must be 1-64 characters"));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
        {
            return Err(ProtoError::bad_request(
                "room: only [A-Za-z0-9_.:-] allowed",
            ));
        }
        Ok(RoomId(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Deserializes with the same validation as [`RoomId::parse`] (ids read back from the
/// moderation store or from another node).
impl<'de> Deserialize<'de> for RoomId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        RoomId::parse(&s).map_err(|e| serde::de::Error::custom(e.message))
    }
}

impl fmt::Debug for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A user as clients see it, in events and `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: String,
    pub name: String,
}

/// Error codes of `PROTOCOL.md`, in the order checks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadRequest,
    TooLarge,
    Unauthorized,
    NotJoined,
    Forbidden,
    /// Muted in this room, or the room's chat is closed (v1.1 moderation).
    Muted,
    RateLimited,
    /// The chat text matched a blocked word; nothing was broadcast (v1.1 moderation).
    Filtered,
    RoomFull,
    TooManyRooms,
    PacketNotFound,
    PacketEmpty,
    PacketExpired,
    AlreadyGrabbed,
    Busy,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 16] = [
        ErrorCode::BadRequest,
        ErrorCode::TooLarge,
        ErrorCode::Unauthorized,
        ErrorCode::NotJoined,
        ErrorCode::Forbidden,
        ErrorCode::Muted,
        ErrorCode::RateLimited,
        ErrorCode::Filtered,
        ErrorCode::RoomFull,
        ErrorCode::TooManyRooms,
        ErrorCode::PacketNotFound,
        ErrorCode::PacketEmpty,
        ErrorCode::PacketExpired,
        ErrorCode::AlreadyGrabbed,
        ErrorCode::Busy,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Muted => "muted",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Filtered => "filtered",
            ErrorCode::RoomFull => "room_full",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::PacketNotFound => "packet_not_found",
            ErrorCode::PacketEmpty => "packet_empty",
            ErrorCode::PacketExpired => "packet_expired",
            ErrorCode::AlreadyGrabbed => "already_grabbed",
            ErrorCode::Busy => "busy",
            ErrorCode::Internal => "internal",
        }
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal of one op: becomes an `error` frame; the connection lives on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ProtoError {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: Option<u64>,
}

impl ProtoError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
}

/// WebSocket close codes the gateway sends, with their meaning to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1001: node draining; reconnect, another node takes you.
    GoingAway,
    /// 1008: too many bad frames in a row.
    Policy,
    /// 1009: frame larger than `limits.max_frame_bytes`.
    TooBig,
    /// 4000: no frame or pong for 2 × heartbeat.
    Idle,
    /// 4010: outbound queue overflowed with events that may not be dropped.
    SlowConsumer,
    /// 1007: a text frame that is not UTF-8. RFC 6455 (§8.1) makes the endpoint fail
    /// the connection, so this is the one malformed frame that cannot get an `error`.
    InvalidPayload,
    /// 1002: a frame that breaks RFC 6455 (reserved bits without an extension, an
    /// unmasked client frame, an unknown opcode, a long or fragmented control frame, a
    /// stray continuation). The framing is lost, so no `error` frame can follow.
    ProtocolError,
    /// 4030: the user is banned (v1.1 moderation); reconnecting is refused until the
    /// ban ends.
    Banned,
}

impl CloseCode {
    pub const ALL: [CloseCode; 8] = [
        CloseCode::GoingAway,
        CloseCode::Policy,
        CloseCode::TooBig,
        CloseCode::Idle,
        CloseCode::SlowConsumer,
        CloseCode::InvalidPayload,
        CloseCode::ProtocolError,
        CloseCode::Banned,
    ];

    pub fn code(self) -> u16 {
        match self {
            CloseCode::GoingAway => 1001,
            CloseCode::Policy => 1008,
            CloseCode::TooBig => 1009,
            CloseCode::Idle => 4000,
            CloseCode::SlowConsumer => 4010,
            CloseCode::InvalidPayload => 1007,
            CloseCode::ProtocolError => 1002,
            CloseCode::Banned => 4030,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::GoingAway => "node draining",
            CloseCode::Policy => "too many bad frames",
            CloseCode::TooBig => "frame too large",
            CloseCode::Idle => "idle",
            CloseCode::SlowConsumer => "slow consumer",
            CloseCode::InvalidPayload => "text frame is not UTF-8",
            CloseCode::ProtocolError => "protocol error",
            CloseCode::Banned => "banned",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Client → server

/// One validated client op.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientFrame {
    pub reference: Option<i64>,
    pub op: ClientOp,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClientOp {
    Join {
        room: RoomId,
        history: usize,
        /// The last event the client received in the room (v1.1 recovery).
        since: Option<String>,
    },
    Leave {
        room: RoomId,
    },
    Chat {
        room: RoomId,
        text: String,
    },
    Gift {
        room: RoomId,
        gift: String,
        count: u32,
    },
    Grab {
        room: RoomId,
        packet: String,
    },
    Ping,
}

/// Largest `count` of one `gift` op.
pub const MAX_GIFT_COUNT: u32 = 9999;
/// Longest gift or packet id.
pub const MAX_ID_LEN: usize = 64;

/// Raw shape as serde sees it; [`decode`] turns it into a [`ClientFrame`] or an error.
#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum RawOp {
    Join {
        room: String,
        #[serde(default)]
        history: Option<u32>,
        #[serde(default)]
        since: Option<String>,
        #[serde(rename = "ref", default)]
        reference: Option<i64>,
    },
    Leave {
        room: String,
        #[serde(rename = "ref", default)]
        reference: Option<i64>,
    },
    Chat {
        room: String,
        text: String,
        #[serde(rename = "ref", default)]
        reference: Option<i64>,
    },
    Gift {
        room: String,
        gift: String,
        #[serde(default)]
        count: Option<u32>,
        #[serde(rename = "ref", default)]
        reference: Option<i64>,
    },
    Grab {
        room: String,
        packet: String,
        #[serde(rename = "ref", default)]
        reference: Option<i64>,
    },
    Ping {
        #[serde(rename = "ref", default)]
        reference: Option<i64>,
    },
}

/// Just the `ref` of a frame that failed to decode, so its `error` can still echo it.
#[derive(Deserialize)]
struct RefOnly {
    #[serde(rename = "ref", default)]
    reference: Option<i64>,
}

/// Largest `history` a join may ask for.
pub const MAX_HISTORY: u32 = 100;
/// Longest `since` a join may name: event ids are far shorter (node id, start, count).
pub const MAX_SINCE_BYTES: usize = 128;

/// Decodes one inbound data frame (`text` = JSON, binary = MessagePack).
///
/// # Errors
/// `bad_request` for anything unparsable or invalid, `too_large` for an over-long text;
/// the error carries the frame's `ref` when one could be read.
pub fn decode(
    data: &[u8],
    binary: bool,
    max_text_chars: usize,
) -> Result<ClientFrame, (Option<i64>, ProtoError)> {
    let raw: Result<RawOp, String> = if binary {
        rmp_serde::from_slice(data).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice(data).map_err(|e| e.to_string())
    };
    let raw = raw.map_err(|msg| {
        let reference = if binary {
            rmp_serde::from_slice::<RefOnly>(data).ok()
        } else {
            serde_json::from_slice::<RefOnly>(data).ok()
        }
        .and_then(|r| r.reference);
        (reference, ProtoError::bad_request(msg))
    })?;
    let (reference, op) = match raw {
        RawOp::Join {
            room,
            history,
            since,
            reference,
        } => {
            let history = history.unwrap_or(0);
            if history > MAX_HISTORY {
                return Err((
                    reference,
                    ProtoError::bad_request("history: must be 0..=100"),
                ));
            }
            if since
                .as_ref()
                .is_some_and(|s| s.is_empty() || s.len() > MAX_SINCE_BYTES)
            {
                return Err((
                    reference,
                    ProtoError::bad_request(format!("since: must be 1-{MAX_SINCE_BYTES} bytes")),
                ));
            }
            let room = RoomId::parse(&room).map_err(|e| (reference, e))?;
            (
                reference,
                ClientOp::Join {
                    room,
                    history: history as usize,
                    since,
                },
            )
        }
        RawOp::Leave { room, reference } => {
            let room = RoomId::parse(&room).map_err(|e| (reference, e))?;
            (reference, ClientOp::Leave { room })
        }
        RawOp::Chat {
            room,
            text,
            reference,
        } => {
            let room = RoomId::parse(&room).map_err(|e| (reference, e))?;
            check_text(&text, max_text_chars).map_err(|e| (reference, e))?;
            (reference, ClientOp::Chat { room, text })
        }
        RawOp::Gift {
            room,
            gift,
            count,
            reference,
        } => {
            let room = RoomId::parse(&room).map_err(|e| (reference, e))?;
            let count = count.unwrap_or(1);
            if !(1..=MAX_GIFT_COUNT).contains(&count) {
                return Err((
                    reference,
                    ProtoError::bad_request("count: must be 1..=9999"),
                ));
            }
            check_id("gift", &gift).map_err(|e| (reference, e))?;
            (reference, ClientOp::Gift { room, gift, count })
        }
        RawOp::Grab {
            room,
            packet,
            reference,
        } => {
            let room = RoomId::parse(&room).map_err(|e| (reference, e))?;
            check_id("packet", &packet).map_err(|e| (reference, e))?;
            (reference, ClientOp::Grab { room, packet })
        }
        RawOp::Ping { reference } => (reference, ClientOp::Ping),
    };
    Ok(ClientFrame { reference, op })
}

/// Gift and packet ids: 1–64 characters.
fn check_id(field: &str, id: &str) -> Result<(), ProtoError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(ProtoError::bad_request(format!(
            "{field}: must be 1-64 characters"
        )));
    }
    Ok(())
}

/// Invisible characters that `char::is_whitespace` does not count as whitespace: zero
/// width space, non-joiner and joiner (U+200B..U+200D), word joiner (U+2060) and the
/// zero-width no-break space / BOM (U+FEFF). A text of only these looks empty on screen.
fn is_zero_width(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}')
}

/// Chat text: at most `max` characters (not bytes), and not blank: something must remain
/// once whitespace and zero-width characters are removed (PROTOCOL.md, protocol hygiene).
///
/// # Errors
/// `bad_request` for a blank text, `too_large` for an over-long one.
pub fn check_text(text: &str, max: usize) -> Result<(), ProtoError> {
    if text.chars().all(|c| c.is_whitespace() || is_zero_width(c)) {
        return Err(ProtoError::bad_request(
            "text: must not be empty (whitespace and zero-width characters do not count)",
        ));
    }
    let chars = text.chars().count();
    if chars > max {
        return Err(ProtoError::new(
            ErrorCode::TooLarge,
            format!("text: {chars} characters, at most {max} allowed"),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Events

/// One room event as every member sees it (and as the backplane carries it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique across the cluster: `<node>-<sequence>`.
    pub id: String,
    /// Unix milliseconds when the gateway accepted it.
    pub ts: u64,
    #[serde(flatten)]
    pub body: EventBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    Chat {
        user: User,
        text: String,
    },
    Gift {
        user: User,
        gift: String,
        count: u64,
    },
    Redpacket {
        packet: String,
        user: User,
        total: u64,
        shares: u32,
        expires_at: u64,
    },
    Grab {
        packet: String,
        user: User,
        amount: u64,
    },
    RedpacketDone {
        packet: String,
        grabbed: u32,
        total_grabbed: u64,
        expired: bool,
    },
    Presence {
        online: u64,
    },
    System {
        text: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<serde_json::Value>,
    },
    /// A moderator took back the event `target`: clients remove it from view, rooms
    /// from their history (v1.1 moderation).
    Recall {
        target: String,
    },
}

impl EventBody {
    /// Whether a slow consumer may miss this event (PROTOCOL.md: chat and presence only).
    pub fn droppable(&self) -> bool {
        matches!(self, EventBody::Chat { .. } | EventBody::Presence { .. })
    }

    /// Presence is not kept in history.
    pub fn in_history(&self) -> bool {
        !matches!(self, EventBody::Presence { .. })
    }

    /// Low-cardinality label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::Chat { .. } => "chat",
            EventBody::Gift { .. } => "gift",
            EventBody::Redpacket { .. } => "redpacket",
            EventBody::Grab { .. } => "grab",
            EventBody::RedpacketDone { .. } => "redpacket_done",
            EventBody::Presence { .. } => "presence",
            EventBody::System { .. } => "system",
            EventBody::Recall { .. } => "recall",
        }
    }
}

/// An open red packet as `joined.redpackets` lists it: the `redpacket` event's fields
/// plus the shares still available.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpenPacket {
    pub packet: String,
    pub user: User,
    pub total: u64,
    pub shares: u32,
    pub expires_at: u64,
    pub remaining: u32,
}

// ---------------------------------------------------------------------------------------
// Server → client

/// Every frame the server sends. Borrowing variants keep encoding allocation-free
/// beyond the output buffer.
#[derive(Debug, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum ServerFrame<'a> {
    Hello {
        conn: &'a str,
        node: &'a str,
        user: Option<&'a User>,
        heartbeat_ms: u64,
    },
    Joined {
        room: &'a RoomId,
        online: u64,
        history: &'a [Arc<Event>],
        redpackets: &'a [OpenPacket],
        /// Present when the join named `since` (v1.1 recovery).
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<i64>,
    },
    Ack {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<i64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        amount: Option<u64>,
    },
    Pong {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<i64>,
    },
    Error {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<i64>,
        code: ErrorCode,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    Batch {
        room: &'a RoomId,
        events: &'a [Arc<Event>],
    },
}

impl ServerFrame<'_> {
    pub fn error(reference: Option<i64>, err: &ProtoError) -> ServerFrame<'_> {
        ServerFrame::Error {
            reference,
            code: err.code,
            message: &err.message,
            retry_after_ms: err.retry_after_ms,
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(s: &str) -> Result<ClientFrame, (Option<i64>, ProtoError)> {
        decode(s.as_bytes(), false, 200)
    }

    #[test]
    fn room_ids() {
        assert!(RoomId::parse("a").is_ok());
        assert!(RoomId::parse("Live_1.a:b-c").is_ok());
        assert!(RoomId::parse(&"x".repeat(64)).is_ok());
        assert!(RoomId::parse(&"x".repeat(65)).is_err());
        assert!(RoomId::parse("").is_err());
        assert!(RoomId::parse("a b").is_err());
        assert!(RoomId::parse("房间").is_err());
    }

    #[test]
    fn decodes_ops_and_refs() {
        let f = json(r#"{"op":"join","room":"r1","history":5,"ref":7}"#).unwrap();
        assert_eq!(f.reference, Some(7));
        assert_eq!(
            f.op,
            ClientOp::Join {
                room: RoomId::parse("r1").unwrap(),
                history: 5,
                since: None,
            }
        );
        let f = json(r#"{"op":"join","room":"r1","since":"n-1-7"}"#).unwrap();
        assert_eq!(
            f.op,
            ClientOp::Join {
                room: RoomId::parse("r1").unwrap(),
                history: 0,
                since: Some("n-1-7".into()),
            }
        );
        let f = json(r#"{"op":"ping"}"#).unwrap();
        assert_eq!((f.reference, f.op), (None, ClientOp::Ping));
    }

    #[test]
    fn bad_frames_keep_their_ref() {
        let (r, e) = json(r#"{"op":"dance","ref":3}"#).unwrap_err();
        assert_eq!((r, e.code), (Some(3), ErrorCode::BadRequest));
        let (r, e) = json(r#"{"op":"join","room":"bad room","ref":4}"#).unwrap_err();
        assert_eq!((r, e.code), (Some(4), ErrorCode::BadRequest));
        let (r, e) = json("{not json").unwrap_err();
        assert_eq!((r, e.code), (None, ErrorCode::BadRequest));
        let (_, e) = json(r#"{"op":"join","room":"r","history":101}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        let (r, e) = json(r#"{"op":"join","room":"r","since":"","ref":5}"#).unwrap_err();
        assert_eq!((r, e.code), (Some(5), ErrorCode::BadRequest));
        let long = format!(
            r#"{{"op":"join","room":"r","since":"{}"}}"#,
            "x".repeat(129)
        );
        assert_eq!(json(&long).unwrap_err().1.code, ErrorCode::BadRequest);
        let (_, e) = json(r#"{"op":"chat","room":7,"text":"x"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
    }

    #[test]
    fn blank_text_is_refused() {
        for blank in [
            "",
            "   ",
            "\u{200B}",
            " \u{200C}\u{200D}\t",
            "\u{2060}\u{FEFF}\n",
        ] {
            let e = check_text(blank, 200).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{blank:?}");
        }
        assert!(check_text("\u{200B} hi", 200).is_ok());
        assert!(check_text("\u{FEFF}弹", 200).is_ok());
    }

    #[test]
    fn text_length_counts_characters() {
        let ok = format!(
            r#"{{"op":"chat","room":"r","text":"{}"}}"#,
            "弹".repeat(200)
        );
        assert!(json(&ok).is_ok());
        let long = format!(
            r#"{{"op":"chat","room":"r","text":"{}","ref":1}}"#,
            "弹".repeat(201)
        );
        let (r, e) = json(&long).unwrap_err();
        assert_eq!((r, e.code), (Some(1), ErrorCode::TooLarge));
    }

    #[test]
    fn msgpack_roundtrip_of_client_op() {
        #[derive(Serialize)]
        struct Op<'a> {
            op: &'a str,
            room: &'a str,
            text: &'a str,
            #[serde(rename = "ref")]
            r: i64,
        }
        let bytes = rmp_serde::to_vec_named(&Op {
            op: "chat",
            room: "r",
            text: "hi",
            r: 9,
        })
        .unwrap();
        let f = decode(&bytes, true, 200).unwrap();
        assert_eq!(f.reference, Some(9));
        assert!(matches!(f.op, ClientOp::Chat { .. }));
    }

    #[test]
    fn frames_encode_with_op_tag() {
        let t = serde_json::to_string(&ServerFrame::Ack {
            reference: Some(1),
            amount: None,
        })
        .unwrap();
        assert_eq!(t, r#"{"op":"ack","ref":1}"#);
        let ev = Arc::new(Event {
            id: "n-1".into(),
            ts: 5,
            body: EventBody::Presence { online: 3 },
        });
        let room = RoomId::parse("r").unwrap();
        let t = serde_json::to_string(&ServerFrame::Batch {
            room: &room,
            events: &[ev],
        })
        .unwrap();
        assert_eq!(
            t,
            r#"{"op":"batch","room":"r","events":[{"id":"n-1","ts":5,"type":"presence","online":3}]}"#
        );
    }
}
