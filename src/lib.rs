//! # danmaku-gateway
//!
//! A real-time danmaku (bullet-comment) and live-chat WebSocket gateway. Browsers and
//! apps connect over WebSocket, join rooms (one per live stream), send chat; the gateway
//! gathers each room's events for a short window and sends every member one `batch`
//! frame per window, encoded once and shared. The wire contract is `PROTOCOL.md`.
//!
//! # Layout
//! Follow a chat message: [`edge`] accepts the connection (TLS, the client's address from
//! a PROXY header) → [`http`] upgrades the socket → [`session`] decodes the frame
//! ([`protocol`]) and checks it → [`hub`] queues it on the room → the room's flusher
//! batches the window, which [`hub::window`] encodes once per format into complete
//! WebSocket frames ([`wire`]) within the outbound frame bound → each shard holding
//! members writes the shared frames to their sockets itself, one non-blocking `write()`
//! each ([`hub::Conn::push`]); only what a full socket does not take is queued, and that
//! member's [`session`] finishes it when the socket is writable ([`session::socket`],
//! the socket taken back from hyper by [`upgrade`]).
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | `config.toml` + `GATEWAY_*` env → typed, validated [`config::Config`] |
//! | [`protocol`] | frames, events, error and close codes, JSON/MessagePack codecs |
//! | [`auth`] | HS256 JWT verification of client tokens |
//! | [`edge`] | accepting: the accept loop (deadline and cap until the first request), PROXY protocol, TLS (certificate reload), trusted proxies, `X-Forwarded-For` |
//! | [`admission`] | per-node and per-IP connection caps, checked before the upgrade |
//! | [`upgrade`] | the WebSocket opening handshake (and the permessage-deflate offer); hands the session the raw socket |
//! | [`session`] | one connection: reads (yawc validates and inflates; no reader while quiet), writes (shared frame bytes), heartbeats, its rooms |
//! | [`wire`] | server frames as complete WebSocket bytes, encoded once and shared; their permessage-deflate form |
//! | [`hub`] | rooms, flushers (batching, gift merging, chat budgets), event logs (history, recovery), encoded windows and shards (fan-out) |
//! | [`ratelimit`] | per-user GCRA budgets for chat, free gifts, grabs, joins |
//! | [`redpacket`] | red packets: split, exactly-once grabs, journal, expiry, events |
//! | [`backplane`] | joins nodes: trait, `Local` (single node), Redis pub/sub, the cluster log (recovery) + presence |
//! | [`redis_link`] | the supervised Redis command connection (single or cluster) |
//! | [`http`] | `/ws`, `/healthz`, `/readyz`, `/metrics`, `/api/v1/...` |
//! | [`metrics`] | every metric's name and description, hot-path handles |
//! | [`stream`] | the event stream for the backend: Redis Streams or daily JSON-lines files |
//! | [`shared`] | the state every handler and session shares |
//! | [`server`] | wiring, serving, graceful drain |
//! | [`shutdown`] | the signals that start a drain |
//! | [`web`] | the demo page at `/` and the browser client, embedded; dev-token helpers |
#![forbid(unsafe_code)]

pub mod admission;
pub mod auth;
pub mod backplane;
pub mod config;
pub mod edge;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod moderation;
pub mod protocol;
pub mod ratelimit;
pub mod redis_link;
pub mod redpacket;
pub mod server;
pub mod session;
pub mod shared;
pub mod shutdown;
pub mod stream;
pub mod upgrade;
pub mod web;
pub mod wire;
