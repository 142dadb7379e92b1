//! One room window, encoded: the frames every member of the room gets for it.
//!
//! A window is encoded lazily, at most once per format, into complete WebSocket frames
//! ([`crate::wire`]) that every shard and every member share. No frame is larger than
//! `limits.max_out_frame_bytes`: a window whose events encode to more is cut into several
//! consecutive `batch` frames, in order, each within the bound. Cutting weighs each event
//! by its encoded size (counted, not allocated) and packs greedily, so the common window
//! (far under the bound) costs exactly one encode. Each frame carries its own
//! droppability, so for a slow consumer the chat-only frames of a cut window may be
//! dropped while a frame holding a gift never is.
//!
//! Members that negotiated permessage-deflate get the same frames deflated
//! ([`wire::deflate`]): built from the plain frames at most once per format, the first
//! time such a member is written to, and shared like them. A frame under
//! `compression.min_bytes`, or one deflate would not shrink, is shared plain.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use tokio::time::Instant;

use crate::metrics;
use crate::protocol::{Event, Format, RoomId, ServerFrame};
use crate::wire;

/// One frame of a window.
pub struct Frame {
    pub bytes: Bytes,
    /// Every event in it may be dropped for a slow consumer (chat, presence).
    pub droppable: bool,
    /// RSV1 is set: the payload is deflated.
    pub compressed: bool,
}

/// How a room's windows are cut and compressed.
#[derive(Debug, Clone, Copy)]
pub struct Encoding {
    /// `limits.max_out_frame_bytes`.
    pub max_frame: usize,
    /// `compression.*`; `None` when compression is off (no member negotiates it).
    pub deflate: Option<wire::Deflate>,
}

impl Encoding {
    /// Frames within `max_frame`, never deflated.
    pub fn plain(max_frame: usize) -> Self {
        Self {
            max_frame,
            deflate: None,
        }
    }
}

/// One window of one room's events, encoded lazily once per format and shared.
pub struct Batch {
    pub room: RoomId,
    /// The room's batch number (1, 2, ...), against which joiners skip what their
    /// `joined.history` already holds.
    pub seq: u64,
    pub events: Vec<Arc<Event>>,
    /// When the window's first event was accepted on this node.
    pub accepted: Instant,
    encoding: Encoding,
    json: OnceLock<Vec<Frame>>,
    msgpack: OnceLock<Vec<Frame>>,
    json_deflated: OnceLock<Vec<Frame>>,
    msgpack_deflated: OnceLock<Vec<Frame>>,
}

impl Batch {
    pub fn new(
        room: RoomId,
        seq: u64,
        events: Vec<Arc<Event>>,
        accepted: Instant,
        encoding: Encoding,
    ) -> Self {
        Self {
            room,
            seq,
            events,
            accepted,
            encoding,
            json: OnceLock::new(),
            msgpack: OnceLock::new(),
            json_deflated: OnceLock::new(),
            msgpack_deflated: OnceLock::new(),
        }
    }

    /// The frames for `format`, deflated where `deflate` (the member negotiated
    /// permessage-deflate and compression is on), in order; the first caller encodes,
    /// everyone shares them.
    pub fn frames(&self, format: Format, deflate: bool) -> &[Frame] {
        let (plain, deflated) = match format {
            Format::Json => (&self.json, &self.json_deflated),
            Format::Msgpack => (&self.msgpack, &self.msgpack_deflated),
        };
        let plain =
            plain.get_or_init(|| split(&self.room, &self.events, format, self.encoding.max_frame));
        match self.encoding.deflate {
            Some(settings) if deflate => deflated.get_or_init(|| deflate_all(plain, settings)),
            _ => plain,
        }
    }
}

/// `frames` for members that negotiated permessage-deflate; the time it takes and what
/// it saves are counted once per window, not per member.
fn deflate_all(frames: &[Frame], settings: wire::Deflate) -> Vec<Frame> {
    let started = std::time::Instant::now();
    let (mut bytes_in, mut bytes_out, mut compressed) = (0u64, 0u64, 0u64);
    let out: Vec<Frame> = frames
        .iter()
        .map(|f| {
            bytes_in += f.bytes.len() as u64;
            let frame = match wire::deflate(&f.bytes, settings) {
                Some(bytes) => {
                    compressed += 1;
                    Frame {
                        bytes,
                        droppable: f.droppable,
                        compressed: true,
                    }
                }
                None => Frame {
                    bytes: f.bytes.clone(),
                    droppable: f.droppable,
                    compressed: false,
                },
            };
            bytes_out += frame.bytes.len() as u64;
            frame
        })
        .collect();
    let d = &metrics::hot().deflate;
    d.seconds.record(started.elapsed().as_secs_f64());
    d.compressed.increment(compressed);
    d.plain.increment(frames.len() as u64 - compressed);
    d.bytes_in.increment(bytes_in);
    d.bytes_out.increment(bytes_out);
    out
}

/// Slack for what weighing events one by one does not see: the frame header growing
/// from 2 to 10 bytes, the MessagePack array header from 1 to 5, rounding.
const SLACK: usize = 16;

/// `events` as `batch` frames of at most `max` bytes each (a single event that alone is
/// larger goes in a frame of its own: it cannot be cut, and it is never refused).
pub fn split(room: &RoomId, events: &[Arc<Event>], format: Format, max: usize) -> Vec<Frame> {
    let whole = wire::encode(&ServerFrame::Batch { room, events }, format);
    if whole.len() <= max || events.len() <= 1 {
        return vec![frame(whole, events)];
    }
    let empty = wire::encoded_len(&ServerFrame::Batch { room, events: &[] }, format);
    let budget = max.saturating_sub(empty + wire::MAX_HEADER + SLACK);
    let mut frames = Vec::new();
    let (mut start, mut used) = (0, 0);
    for (i, e) in events.iter().enumerate() {
        // +1: the separating comma in JSON (MessagePack needs none; the slack covers it).
        let size = wire::encoded_len(&**e, format) + 1;
        if i > start && used + size > budget {
            frames.extend(encode_within(room, &events[start..i], format, max));
            (start, used) = (i, 0);
        }
        used += size;
    }
    frames.extend(encode_within(room, &events[start..], format, max));
    frames
}

/// Encodes `events` as one frame, halving the run if it still comes out over `max` (it
/// does not, by the weighing above; this keeps the bound a guarantee, not an estimate).
fn encode_within(room: &RoomId, events: &[Arc<Event>], format: Format, max: usize) -> Vec<Frame> {
    let bytes = wire::encode(&ServerFrame::Batch { room, events }, format);
    if bytes.len() <= max || events.len() <= 1 {
        return vec![frame(bytes, events)];
    }
    let (a, b) = events.split_at(events.len() / 2);
    let mut frames = encode_within(room, a, format, max);
    frames.extend(encode_within(room, b, format, max));
    frames
}

fn frame(bytes: Bytes, events: &[Arc<Event>]) -> Frame {
    Frame {
        bytes,
        droppable: events.iter().all(|e| e.body.droppable()),
        compressed: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{EventBody, User};

    fn chat(n: usize, text: &str) -> Arc<Event> {
        Arc::new(Event {
            id: format!("n-{n}"),
            ts: n as u64,
            body: EventBody::Chat {
                user: User {
                    id: format!("u{n}"),
                    name: "name".into(),
                },
                text: text.into(),
            },
        })
    }

    /// The payload of a frame whose header is 2, 4 or 10 bytes long.
    fn payload(frame: &[u8]) -> &[u8] {
        match frame[1] & 0x7f {
            126 => &frame[4..],
            127 => &frame[10..],
            _ => &frame[2..],
        }
    }

    #[test]
    fn a_large_window_is_cut_in_order_within_the_bound() {
        let room = RoomId::parse("r").unwrap();
        let text = "😀".repeat(200);
        let events: Vec<_> = (0..1500).map(|n| chat(n, &text)).collect();
        for format in [Format::Json, Format::Msgpack] {
            let max = 131_072;
            let frames = split(&room, &events, format, max);
            assert!(frames.len() > 1, "{format:?}: cut");
            let mut ids = Vec::new();
            for f in &frames {
                assert!(f.bytes.len() <= max, "{format:?}: {} bytes", f.bytes.len());
                assert!(f.droppable);
                let v: serde_json::Value = match format {
                    Format::Json => serde_json::from_slice(payload(&f.bytes)).unwrap(),
                    Format::Msgpack => rmp_serde::from_slice(payload(&f.bytes)).unwrap(),
                };
                assert_eq!(v["op"], "batch");
                for e in v["events"].as_array().unwrap() {
                    ids.push(e["id"].as_str().unwrap().to_owned());
                }
            }
            let want: Vec<String> = (0..1500).map(|n| format!("n-{n}")).collect();
            assert_eq!(ids, want, "{format:?}: every event once, in order");
        }
    }

    #[test]
    fn a_small_window_is_one_frame() {
        let room = RoomId::parse("r").unwrap();
        let events = vec![chat(1, "hi"), chat(2, "there")];
        let frames = split(&room, &events, Format::Json, 131_072);
        assert_eq!(frames.len(), 1);
    }
}
