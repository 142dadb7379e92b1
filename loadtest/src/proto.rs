//! The client's side of the gateway's wire protocol v1 (`shared/PROTOCOL.md`), reduced to
//! what a load generator needs: encoding the ops it sends (`chat`, `gift`, `grab`, `join`
//! with an optional `since`, `leave`), decoding the frames it reads (`hello`, `joined` with
//! its `history` and `recovered`, `ack`, `error`, `batch`) in
//! either wire format, and the chat text convention that carries a send timestamp
//! through the gateway.
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

/// The ops the load generator sends, each with a `ref` so its reply can be matched.
#[derive(Debug, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum ClientOp<'a> {
    Chat {
        room: &'a str,
        text: &'a str,
        #[serde(rename = "ref")]
        reference: i64,
    },
    Gift {
        room: &'a str,
        gift: &'a str,
        count: u32,
        #[serde(rename = "ref")]
        reference: i64,
    },
    Grab {
        room: &'a str,
        packet: &'a str,
        #[serde(rename = "ref")]
        reference: i64,
    },
    /// `join`; `since` (the id of the last event received in the room) asks the gateway
    /// to recover what followed it (`joined.recovered`, `joined.history`).
    Join {
        room: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        since: Option<&'a str>,
        #[serde(rename = "ref")]
        reference: i64,
    },
    Leave {
        room: &'a str,
        #[serde(rename = "ref")]
        reference: i64,
    },
}

/// Encodes one op in `format` (JSON text or MessagePack binary with named fields).
pub fn encode(format: Format, op: &ClientOp<'_>) -> Message {
    match format {
        // Neither serializer can fail on a struct of strings and integers.
        Format::Json => Message::text(serde_json::to_string(op).expect("client ops serialize")),
        Format::Msgpack => Message::Binary(Bytes::from(
            rmp_serde::to_vec_named(op).expect("client ops serialize"),
        )),
    }
}

/// Encodes `{"op":"chat","room":..,"text":..,"ref":..}` in `format`.
pub fn encode_chat(format: Format, room: &str, text: &str, reference: i64) -> Message {
    encode(
        format,
        &ClientOp::Chat {
            room,
            text,
            reference,
        },
    )
}

/// Whether a message is a `batch` frame, judged from its first bytes only (the gateway
/// writes `op` first in both formats). Lets a client that only counts room traffic skip
/// decoding it.
pub fn is_batch(msg: &Message) -> bool {
    const JSON: &[u8] = br#"{"op":"batch""#;
    // fixstr "op", fixstr "batch".
    const MSGPACK: &[u8] = b"\xa2op\xa5batch";
    match msg {
        Message::Text(t) => t.as_bytes().starts_with(JSON),
        Message::Binary(b) => {
            let skip = match b.first() {
                Some(0x80..=0x8f) => 1,
                Some(0xde) => 3,
                Some(0xdf) => 5,
                _ => return false,
            };
            b.get(skip..).is_some_and(|rest| rest.starts_with(MSGPACK))
        }
        _ => false,
    }
}

/// Whether `haystack` contains `needle` (for spotting an event type in a raw frame).
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    let mut from = 0;
    while let Some(i) = haystack[from..].iter().position(|&b| b == first) {
        let at = from + i + 1;
        if haystack[at..].starts_with(rest) {
            return true;
        }
        from = at;
    }
    false
}

/// Whether a received message's payload contains `needle`.
pub fn message_contains(msg: &Message, needle: &str) -> bool {
    match msg {
        Message::Text(t) => t.as_str().contains(needle),
        Message::Binary(b) => contains(b, needle.as_bytes()),
        _ => false,
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
    /// Whether `history` holds exactly the events after the `join`'s `since` (`joined`
    /// of a join that gave `since`; absent otherwise, or from a gateway without it).
    #[serde(default)]
    pub recovered: Option<bool>,
    /// The room's recent events, oldest first (`joined`).
    #[serde(default, borrow)]
    pub history: Vec<ServerEvent<'a>>,
    /// Amount won (`ack` of a `grab`).
    #[serde(default)]
    pub amount: Option<u64>,
    /// When to retry (`error` `rate_limited`).
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
    /// Events of a `batch`.
    #[serde(default, borrow)]
    pub events: Vec<ServerEvent<'a>>,
}

/// One room event inside a `batch`.
#[derive(Debug, Deserialize)]
pub struct ServerEvent<'a> {
    /// The event's id (what a reconnecting client gives as `since`).
    #[serde(default, borrow)]
    pub id: Option<CowStr<'a>>,
    /// `chat`, `presence`, `gift`, ...
    #[serde(rename = "type", borrow)]
    pub kind: &'a str,
    /// Chat or system text. Borrowed unless the JSON string had escapes.
    #[serde(default, borrow)]
    pub text: Option<CowStr<'a>>,
    /// Who sent it (`chat`, `gift`, `grab`, ...).
    #[serde(default, borrow)]
    pub user: Option<EventUser<'a>>,
    /// Gift id (`gift`).
    #[serde(default, borrow)]
    pub gift: Option<CowStr<'a>>,
    /// Gift count (`gift`; a user's same gift within a window is merged, counts summed).
    #[serde(default)]
    pub count: Option<u64>,
}

/// An event's `user`; only the id is read.
#[derive(Debug, Deserialize)]
pub struct EventUser<'a> {
    #[serde(borrow)]
    pub id: CowStr<'a>,
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

/// The timestamped chat text convention: `lt:<run>:<sender>:<seq>:<unix_micros>`,
/// optionally followed by a space and anything (a `--corpus` phrase): the stamp is read
/// up to the first space.
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
        let rest = stamp_of(text).strip_prefix(self.prefix.as_str())?;
        let (_, micros) = rest.rsplit_once(':')?;
        micros.parse().ok()
    }

    /// Sender, sequence number and send time of one of this run's chats, or `None` for
    /// any other text.
    pub fn parse(&self, text: &str) -> Option<Stamped> {
        let rest = stamp_of(text).strip_prefix(self.prefix.as_str())?;
        let mut parts = rest.splitn(3, ':');
        let sender = parts.next()?.parse().ok()?;
        let seq = parts.next()?.parse().ok()?;
        let sent_us = parts.next()?.parse().ok()?;
        Some(Stamped {
            sender,
            seq,
            sent_us,
        })
    }
}

/// The stamp of a chat text: all of it up to the first space (none in a stamp).
fn stamp_of(text: &str) -> &str {
    text.split_once(' ').map_or(text, |(stamp, _)| stamp)
}

/// What a stamped chat text says (see [`ChatStamp::text`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamped {
    pub sender: usize,
    pub seq: u64,
    pub sent_us: u64,
}

/// Encodes `{"op":"join","room":..,"since":..,"ref":..}` (`since` left out when `None`).
pub fn encode_join(format: Format, room: &str, since: Option<&str>, reference: i64) -> Message {
    encode(
        format,
        &ClientOp::Join {
            room,
            since,
            reference,
        },
    )
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
        assert_eq!(
            s.parse(&t),
            Some(Stamped {
                sender: 7,
                seq: 3,
                sent_us: 1_700_000_000_123_456
            })
        );
        assert_eq!(s.parse("lt:other:7:3:1"), None);
        assert_eq!(s.parse("lt:ab12:7:3"), None);
        assert_eq!(s.parse("lt:ab12:x:3:1"), None);
        assert_eq!(s.parse("lt:ab12:7:3:1:9"), None);
        // A corpus phrase after the stamp, colons and spaces included.
        let with_phrase = format!("{t} 前方高能 a:b 9:99");
        assert_eq!(s.sent_at(&with_phrase), Some(1_700_000_000_123_456));
        assert_eq!(s.parse(&with_phrase).map(|p| p.seq), Some(3));
        assert_eq!(s.sent_at(" lt:ab12:7:3:1"), None);
    }

    #[test]
    fn join_with_since_and_joined_with_recovered() {
        let Message::Text(t) = encode_join(Format::Json, "r", Some("n1-7"), 3) else {
            panic!("not text")
        };
        assert_eq!(
            t.as_str(),
            r#"{"op":"join","room":"r","since":"n1-7","ref":3}"#
        );
        let Message::Text(t) = encode_join(Format::Json, "r", None, 3) else {
            panic!("not text")
        };
        assert_eq!(t.as_str(), r#"{"op":"join","room":"r","ref":3}"#);
        let Message::Binary(b) = encode_join(Format::Msgpack, "r", Some("n1-7"), 3) else {
            panic!("not binary")
        };
        let v: serde_json::Value = rmp_serde::from_slice(&b).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op":"join","room":"r","since":"n1-7","ref":3})
        );

        let joined = serde_json::json!({"op":"joined","room":"r","ref":3,"online":2,
            "recovered":true,"redpackets":[],"history":[
                {"id":"n1-8","ts":1,"type":"chat","user":{"id":"u","name":"n"},"text":"lt:a:0:1:2"},
                {"id":"n1-9","ts":2,"type":"system","text":"hi"}]});
        for msg in [
            Message::text(joined.to_string()),
            Message::Binary(rmp_serde::to_vec_named(&joined).unwrap().into()),
        ] {
            let Decoded::Frame(f) = decode(&msg) else {
                panic!("not a frame")
            };
            assert_eq!(
                (f.op, f.reference, f.recovered),
                ("joined", Some(3), Some(true))
            );
            let ids: Vec<&str> = f
                .history
                .iter()
                .map(|e| e.id.as_ref().unwrap().0.as_ref())
                .collect();
            assert_eq!(ids, ["n1-8", "n1-9"]);
            assert_eq!(f.history[0].text.as_ref().unwrap().0, "lt:a:0:1:2");
        }
        let old = Message::text(
            r#"{"op":"joined","room":"r","online":1,"history":[],"recovered":false}"#,
        );
        assert!(matches!(decode(&old), Decoded::Frame(f) if f.recovered == Some(false)));
        let plain = Message::text(r#"{"op":"joined","room":"r","online":1,"history":[]}"#);
        assert!(matches!(decode(&plain), Decoded::Frame(f) if f.recovered.is_none()));
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
    fn encodes_every_op_with_op_first() {
        let ops = [
            (
                ClientOp::Gift {
                    room: "r",
                    gift: "rose",
                    count: 1,
                    reference: 2,
                },
                r#"{"op":"gift","room":"r","gift":"rose","count":1,"ref":2}"#,
            ),
            (
                ClientOp::Grab {
                    room: "r",
                    packet: "p1",
                    reference: 3,
                },
                r#"{"op":"grab","room":"r","packet":"p1","ref":3}"#,
            ),
            (
                ClientOp::Join {
                    room: "r",
                    since: None,
                    reference: 4,
                },
                r#"{"op":"join","room":"r","ref":4}"#,
            ),
            (
                ClientOp::Leave {
                    room: "r",
                    reference: 5,
                },
                r#"{"op":"leave","room":"r","ref":5}"#,
            ),
        ];
        for (op, want) in ops {
            let Message::Text(t) = encode(Format::Json, &op) else {
                panic!("not text")
            };
            assert_eq!(t.as_str(), want);
            let Message::Binary(b) = encode(Format::Msgpack, &op) else {
                panic!("not binary")
            };
            let v: serde_json::Value = rmp_serde::from_slice(&b).unwrap();
            assert_eq!(v, serde_json::from_str::<serde_json::Value>(want).unwrap());
        }
    }

    #[test]
    fn spots_batches_without_decoding() {
        // The gateway writes `op` first (serde's internally tagged enum), in both formats.
        #[derive(Serialize)]
        struct Batch {
            op: &'static str,
            room: &'static str,
            events: Vec<serde_json::Value>,
        }
        let batch = Batch {
            op: "batch",
            room: "r",
            events: vec![serde_json::json!({"id":"a","ts":1,"type":"redpacket_done",
                "packet":"p","grabbed":1,"total_grabbed":5,"expired":false})],
        };
        let text = Message::text(serde_json::to_string(&batch).unwrap());
        let bin = Message::Binary(rmp_serde::to_vec_named(&batch).unwrap().into());
        assert!(is_batch(&text) && is_batch(&bin));
        assert!(
            message_contains(&text, "redpacket_done") && message_contains(&bin, "redpacket_done")
        );
        assert!(!message_contains(&bin, "redpacket_gone"));
        let ack = serde_json::json!({"op":"ack","ref":1,"amount":7});
        assert!(!is_batch(&Message::text(ack.to_string())));
        assert!(!is_batch(&Message::Binary(
            rmp_serde::to_vec_named(&ack).unwrap().into()
        )));
        let ack_msg = Message::text(ack.to_string());
        let Decoded::Frame(f) = decode(&ack_msg) else {
            panic!("not a frame")
        };
        assert_eq!((f.op, f.reference, f.amount), ("ack", Some(1), Some(7)));
        assert!(contains(b"aab", b"ab") && !contains(b"a", b"ab") && contains(b"x", b""));
    }

    #[test]
    fn decodes_gift_events_with_user_and_count() {
        let raw = r#"{"op":"batch","room":"r","events":[
            {"id":"n-1","ts":5,"type":"gift","user":{"id":"lt-1-s0","name":"n"},"gift":"rose","count":3}]}"#;
        let msg = Message::text(raw);
        let Decoded::Frame(f) = decode(&msg) else {
            panic!("not a frame")
        };
        let ev = &f.events[0];
        assert_eq!(ev.kind, "gift");
        assert_eq!(ev.user.as_ref().unwrap().id.0, "lt-1-s0");
        assert_eq!(ev.gift.as_ref().unwrap().0, "rose");
        assert_eq!(ev.count, Some(3));
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
