//! The client's side of the gateway's wire protocol v1 (`shared/PROTOCOL.md`), reduced to
//! what a load generator needs: encoding the ops it sends (`chat`), decoding the frames it
//! reads (`hello`, `joined`, `ack`, `error`, `batch`) in either wire format, and the chat
//! text convention that carries a send timestamp through the gateway.
//!
//! Decoding borrows from the received frame wherever it can (op names, codes and our own
//! chat texts never need unescaping), so a receiver parses a `batch` without copying the
//! event texts: with thousands of receivers this is the hot loop of the whole tool.

use std::borrow::Cow;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// Wire format of a connection (`format=` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// JSON in text frames.
    Json,
    /// MessagePack maps with named fields in binary frames.
    Msgpack,
}

impl Format {
    /// The value of the `format` query parameter.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Msgpack => "msgpack",
        }
    }
}

/// A `chat` op as sent by a client.
#[derive(Debug, Serialize)]
struct ChatOp<'a> {
    op: &'static str,
    room: &'a str,
    text: &'a str,
    #[serde(rename = "ref")]
    reference: i64,
}

/// Encodes `{"op":"chat","room":..,"text":..,"ref":..}` in `format`.
pub fn encode_chat(format: Format, room: &str, text: &str, reference: i64) -> Message {
    let op = ChatOp {
        op: "chat",
        room,
        text,
        reference,
    };
    match format {
        // Neither serializer can fail on a struct of strings and an integer.
        Format::Json => Message::text(serde_json::to_string(&op).expect("chat op serializes")),
        Format::Msgpack => Message::Binary(Bytes::from(
            rmp_serde::to_vec_named(&op).expect("chat op serializes"),
        )),
    }
}

/// Any server frame, with just the fields the load generator reads; the rest (`hello`'s
/// user, `joined`'s history and red packets, ...) is skipped without being materialized.
#[derive(Debug, Deserialize)]
pub struct ServerFrame<'a> {
    /// `hello`, `joined`, `ack`, `pong`, `error` or `batch`.
    #[serde(borrow)]
    pub op: &'a str,
    /// Echo of the op's `ref` (`ack`, `error`, `joined`).
    #[serde(rename = "ref", default)]
    pub reference: Option<i64>,
    /// `error` code.
    #[serde(default, borrow)]
    pub code: Option<&'a str>,
    /// Room's online count (`joined`).
    #[serde(default)]
    pub online: Option<u64>,
    /// Events of a `batch`.
    #[serde(default, borrow)]
    pub events: Vec<ServerEvent<'a>>,
}

/// One room event inside a `batch`.
#[derive(Debug, Deserialize)]
pub struct ServerEvent<'a> {
    /// `chat`, `presence`, `gift`, ...
    #[serde(rename = "type", borrow)]
    pub kind: &'a str,
    /// Chat or system text. Borrowed unless the JSON string had escapes.
    #[serde(default, borrow)]
    pub text: Option<CowStr<'a>>,
}

/// A string borrowed from the frame when possible (serde only borrows a `Cow` that is a
/// field's own type, so an `Option<Cow>` needs this wrapper).
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub struct CowStr<'a>(#[serde(borrow)] pub Cow<'a, str>);

/// What a received WebSocket message turned out to be.
#[derive(Debug)]
pub enum Decoded<'a> {
    /// A data frame that decoded as a server frame.
    Frame(ServerFrame<'a>),
    /// A data frame that did not decode (counted, otherwise ignored).
    Garbage(String),
    /// A control frame (ping/pong, handled by tungstenite) or a raw frame.
    Control,
    /// The server closed the connection with this close code (if it gave one).
    Close(Option<u16>),
}

/// Decodes one received message; JSON text and MessagePack binary are both accepted
/// whatever format was asked for, as the server may only ever send the one it agreed to.
pub fn decode(msg: &Message) -> Decoded<'_> {
    let result = match msg {
        Message::Text(text) => serde_json::from_str(text.as_str()).map_err(|e| e.to_string()),
        Message::Binary(bytes) => rmp_serde::from_slice(bytes).map_err(|e| e.to_string()),
        Message::Close(frame) => return Decoded::Close(frame.as_ref().map(|f| u16::from(f.code))),
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Decoded::Control,
    };
    match result {
        Ok(frame) => Decoded::Frame(frame),
        Err(e) => Decoded::Garbage(e),
    }
}

/// The timestamped chat text convention: `lt:<run>:<sender>:<seq>:<unix_micros>`.
///
/// The run id keeps chats of an earlier run (still in a room's history or in flight)
/// from being counted as this run's deliveries.
#[derive(Debug, Clone)]
pub struct ChatStamp {
    prefix: String,
}

impl ChatStamp {
    /// A stamp for run `run`.
    pub fn new(run: &str) -> Self {
        Self {
            prefix: format!("lt:{run}:"),
        }
    }

    /// The text for `sender`'s `seq`-th chat, sent at `unix_micros`.
    pub fn text(&self, sender: usize, seq: u64, unix_micros: u64) -> String {
        format!("{}{sender}:{seq}:{unix_micros}", self.prefix)
    }

    /// The send time of one of this run's chats, or `None` for any other text.
    pub fn sent_at(&self, text: &str) -> Option<u64> {
        let rest = text.strip_prefix(self.prefix.as_str())?;
        let (_, micros) = rest.rsplit_once(':')?;
        micros.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_roundtrip_and_foreign_texts() {
        let s = ChatStamp::new("ab12");
        let t = s.text(7, 3, 1_700_000_000_123_456);
        assert_eq!(t, "lt:ab12:7:3:1700000000123456");
        assert_eq!(s.sent_at(&t), Some(1_700_000_000_123_456));
        assert_eq!(s.sent_at("lt:other:7:3:1"), None);
        assert_eq!(s.sent_at("hello"), None);
        assert_eq!(s.sent_at("lt:ab12:x"), None);
    }

    #[test]
    fn decodes_json_batch_borrowing_texts() {
        let raw = r#"{"op":"batch","room":"r","events":[
            {"id":"n-1","ts":5,"type":"chat","user":{"id":"u","name":"\u5f39"},"text":"lt:a:1:2:3"},
            {"id":"n-2","ts":6,"type":"presence","online":3},
            {"id":"n-3","ts":6,"type":"chat","user":{"id":"u","name":"n"},"text":"esc\"aped"}]}"#;
        let msg = Message::text(raw);
        let Decoded::Frame(f) = decode(&msg) else {
            panic!("not a frame")
        };
        assert_eq!(f.op, "batch");
        assert_eq!(f.events.len(), 3);
        let t0 = f.events[0].text.as_ref().unwrap();
        assert!(matches!(t0.0, Cow::Borrowed("lt:a:1:2:3")));
        assert_eq!(f.events[1].kind, "presence");
        assert_eq!(f.events[2].text.as_ref().unwrap().0, "esc\"aped");
    }

    #[test]
    fn decodes_msgpack_error_and_encodes_chat() {
        #[derive(Serialize)]
        struct Err<'a> {
            op: &'a str,
            #[serde(rename = "ref")]
            r: i64,
            code: &'a str,
            message: &'a str,
            retry_after_ms: u64,
        }
        let bytes = rmp_serde::to_vec_named(&Err {
            op: "error",
            r: 4,
            code: "rate_limited",
            message: "slow down",
            retry_after_ms: 200,
        })
        .unwrap();
        let msg = Message::Binary(bytes.into());
        let Decoded::Frame(f) = decode(&msg) else {
            panic!("not a frame")
        };
        assert_eq!(
            (f.op, f.reference, f.code),
            ("error", Some(4), Some("rate_limited"))
        );

        let Message::Binary(b) = encode_chat(Format::Msgpack, "r", "hi", 9) else {
            panic!("not binary")
        };
        let v: serde_json::Value = rmp_serde::from_slice(&b).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op":"chat","room":"r","text":"hi","ref":9})
        );
        let Message::Text(t) = encode_chat(Format::Json, "r", "hi", 9) else {
            panic!("not text")
        };
        assert_eq!(
            t.as_str(),
            r#"{"op":"chat","room":"r","text":"hi","ref":9}"#
        );
    }

    #[test]
    fn hello_with_null_user_and_joined_with_history_decode() {
        let hello = Message::text(
            r#"{"op":"hello","conn":"c1","node":"n","user":null,"heartbeat_ms":25000}"#,
        );
        assert!(matches!(decode(&hello), Decoded::Frame(f) if f.op == "hello"));
        let joined = Message::text(
            r#"{"op":"joined","room":"r","online":12,"history":[{"id":"x","ts":1,"type":"chat","user":{"id":"a","name":"b"},"text":"t"}],"redpackets":[]}"#,
        );
        let Decoded::Frame(f) = decode(&joined) else {
            panic!("not a frame")
        };
        assert_eq!((f.op, f.online), ("joined", Some(12)));
    }
}
