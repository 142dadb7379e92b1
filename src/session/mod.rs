//! One client connection: its reader loop, its writes, heartbeats, and its rooms.
//!
//! A session is a single task. It `select!`s over the socket, its outbound queue (room
//! batches pushed by shards), the heartbeat and idle timers, the drain signal, and a
//! kill switch a shard pulls when the queue overflows with undroppable events. One task
//! rather than a reader and a writer keeps an idle connection small (one future, no
//! split lock); the price is that a reply waits behind a batch write, which is what we
//! want anyway (a client that does not read should not get its writes serviced).
//!
//! An op that waits (a grab's fsync or Redis script, a join's shard round trip, a
//! cluster rate-limit check) runs inside [`pump`], which keeps writing the outbound
//! queue meanwhile: otherwise a healthy client waiting on its grab in a red-packet rush
//! would see its queue fill with undroppable `grab` batches and be closed with 4010.
//! No further frame is read until the op is answered (ops of one connection stay in
//! order), and an op, once started, always runs to its end (a join or grab abandoned
//! halfway would leave a membership or an in-flight slot behind).
//!
//! Every write races the kill switch and a timeout (2 × heartbeat): a socket that
//! accepts nothing for that long is dead, whatever TCP thinks.
//!
//! What goes on the wire is complete frame bytes ([`crate::wire`]); [`socket`] writes
//! them without a per-connection copy and lets yawc validate (and inflate) what comes in.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::admission::Ticket;
use crate::hub::{Conn, JoinError, Push, Written};
use crate::metrics::{self, CloseReason};
use crate::moderation::Verdict;
use crate::protocol::{
    self, ClientOp, CloseCode, ErrorCode, Format, ProtoError, RoomId, ServerFrame, User,
};
use crate::ratelimit::{Action, Key};
use crate::shared::Shared;
use crate::stream::Status;
use crate::wire;

pub mod socket;

use socket::{Incoming, ReadError, Socket};

/// At most this many queued frames are written per flush, so replies are not starved.
const MAX_FRAMES_PER_FLUSH: usize = 64;

/// What the HTTP layer decided before the upgrade.
pub struct Params {
    /// `None` for an anonymous, read-only viewer.
    pub user: Option<User>,
    pub format: Format,
    /// `room=` of the URL: joined right after `hello`.
    pub room: Option<RoomId>,
    /// Holds this connection's place under the connection caps.
    pub ticket: Ticket,
    /// The client's address (per-IP budgets of anonymous viewers).
    pub ip: IpAddr,
}

/// Why the serve loop stopped.
enum End {
    /// Close the socket with this code.
    Close(CloseCode),
    /// The client closed or went away.
    Peer,
    /// Socket error or a write stuck past the timeout.
    Error,
}

struct Session {
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    user: Option<User>,
    /// Rooms this connection is in; a handful at most (`limits.rooms_per_conn`).
    rooms: Vec<RoomId>,
    /// Bad frames in a row; reset by a good one.
    bad_frames: u32,
    /// Last inbound frame of any kind (data, ping, pong).
    last_seen: Instant,
    heartbeat: Duration,
    /// Whose rate-limit budget this connection spends: the user's, shared by all their
    /// connections, or this connection's own when anonymous.
    rate_key: Key,
    ip: IpAddr,
}

/// Serves one upgraded connection until it ends; leaves its rooms on the way out.
///
/// A plain function returning an `async move` block rather than an `async fn`: an
/// `async fn` moves its arguments into locals of its own and keeps both copies in its
/// state, which would put the socket into every idle connection's task twice.
#[allow(clippy::manual_async_fn)]
pub fn run(
    mut ws: Socket,
    shared: Arc<Shared>,
    params: Params,
) -> impl Future<Output = ()> + Send + 'static {
    async move {
        let id = shared.next_conn_id();
        metrics::connection_deflate(ws.deflate());
        let conn = Conn::with_socket(
            id,
            params.format,
            ws.deflate(),
            shared.cfg.limits.outbound_queue,
            ws.inline_sink(),
        );
        // A ban closes every connection of the user (on every node): this one is found by
        // the registration until the session ends.
        let registration = params
            .user
            .as_ref()
            .map(|u| shared.moderation.register(&u.id, &conn));
        let hot = metrics::hot();
        hot.connections.increment(1.0);
        hot.connections_opened.increment(1);
        let heartbeat = Duration::from_millis(shared.cfg.server.heartbeat_ms);
        let rate_key = match &params.user {
            Some(u) => Key::User(Arc::from(u.id.as_str())),
            None => Key::Conn(id),
        };
        let mut session = Session {
            rate_key,
            ip: params.ip,
            shared,
            conn,
            user: params.user,
            rooms: Vec::new(),
            bad_frames: 0,
            last_seen: Instant::now(),
            heartbeat,
        };
        let end = match session.serve(&mut ws, params.room).await {
            Ok(()) => End::Peer,
            Err(end) => end,
        };
        // Boxed: the goodbye runs once, and inline its futures would count in every idle
        // connection's task.
        let reason = Box::pin(session.goodbye(&mut ws, end)).await;
        session.conn.close_queue();
        Box::pin(session.leave_all()).await;
        hot.connections.decrement(1.0);
        hot.closed(reason).increment(1);
        drop(registration);
        drop(params.ticket);
    }
}

impl Session {
    async fn serve(&mut self, ws: &mut Socket, room: Option<RoomId>) -> Result<(), End> {
        let conn_label = format!("{}:{}", self.shared.hub.node(), self.conn.id);
        let hello = wire::encode(
            &ServerFrame::Hello {
                conn: &conn_label,
                node: self.shared.hub.node(),
                user: self.user.as_ref(),
                heartbeat_ms: self.heartbeat.as_millis() as u64,
            },
            self.conn.format,
        );
        drop(conn_label);
        self.write(ws, hello).await?;
        let conn = Arc::clone(&self.conn);
        let out = Out {
            conn: &conn,
            heartbeat: self.heartbeat,
        };
        if let Some(room) = room {
            // Boxed: runs once; inline, its state would sit in every idle task.
            let reply = Box::pin(out.pump(ws, Box::pin(self.join(room, 0, None)))).await?;
            Box::pin(self.reply(ws, reply, None)).await?;
        }

        let drain = self.shared.drain.clone();
        let mut draining = false;
        // One timer for the connection's three deadlines (next ping, idle, the drain's
        // close), re-armed to the earliest whenever it fires: every idle connection
        // carries one timer entry, not three.
        let mut next_ping = Instant::now() + self.heartbeat;
        let mut drain_at: Option<Instant> = None;
        let timer = tokio::time::sleep_until(next_ping.min(self.last_seen + 2 * self.heartbeat));
        tokio::pin!(timer);

        loop {
            tokio::select! {
                biased;
                code = self.conn.killed() => return Err(End::Close(code)),
                _ = drain.cancelled(), if !draining => {
                    // Spread the closes over the drain window so reconnects do not
                    // stampede the remaining nodes.
                    draining = true;
                    let window = self.shared.cfg.server.drain_s * 1000;
                    let delay = rand::random_range(0..window.max(1));
                    let at = Instant::now() + Duration::from_millis(delay);
                    drain_at = Some(at);
                    if at < timer.deadline() {
                        timer.as_mut().reset(at);
                    }
                }
                msg = ws.recv() => {
                    self.last_seen = Instant::now();
                    match msg {
                        // Boxed, like the other rare paths below: their futures would
                        // otherwise sit in every idle connection's task.
                        Ok(Incoming::Text(t)) => {
                            Box::pin(self.on_frame(ws, &out, &t, false)).await?;
                        }
                        Ok(Incoming::Binary(b)) => Box::pin(self.on_frame(ws, &out, &b, true)).await?,
                        Ok(Incoming::Ping) => {
                            if let Some(pong) = ws.take_replies() {
                                self.write(ws, pong).await?;
                            }
                        }
                        Ok(Incoming::Pong) => {}
                        Ok(Incoming::Close) => return Ok(()),
                        Err(e) => return Err(read_error(e)),
                    }
                }
                // Only a member whose socket was full (or a TLS member) gets here.
                () = conn.queued() => Box::pin(out.write_queued(ws)).await?,
                () = &mut timer => {
                    let now = Instant::now();
                    if drain_at.is_some_and(|at| at <= now) {
                        return Err(End::Close(CloseCode::GoingAway));
                    }
                    let idle_at = self.last_seen + 2 * self.heartbeat;
                    if idle_at <= now {
                        return Err(End::Close(CloseCode::Idle));
                    }
                    if next_ping <= now {
                        self.write(ws, wire::ping()).await?;
                        next_ping = now + self.heartbeat;
                    }
                    let next = drain_at.map_or(next_ping.min(idle_at), |d| d.min(next_ping).min(idle_at));
                    timer.as_mut().reset(next);
                }
            }
        }
    }

    /// Sends the close frame `end` calls for (or the close reply the client is owed),
    /// best effort: a dead or stuck socket must not hold the task.
    async fn goodbye(&self, ws: &mut Socket, end: End) -> CloseReason {
        match end {
            End::Close(code) => {
                let send = write_one(ws, &self.conn, self.heartbeat, wire::close(code));
                let _ = tokio::time::timeout(Duration::from_secs(1), send).await;
                CloseReason::Code(code)
            }
            End::Peer => {
                if let Some(reply) = ws.take_replies() {
                    let send = write_one(ws, &self.conn, self.heartbeat, reply);
                    let _ = tokio::time::timeout(Duration::from_secs(1), send).await;
                }
                CloseReason::Peer
            }
            End::Error => CloseReason::Error,
        }
    }

    /// Decodes and answers one data frame.
    async fn on_frame(
        &mut self,
        ws: &mut Socket,
        out: &Out<'_>,
        data: &[u8],
        binary: bool,
    ) -> Result<(), End> {
        let hot = metrics::hot();
        hot.frames_in.increment(1);
        hot.bytes_in.increment(data.len() as u64);
        let frame = match protocol::decode(data, binary, self.shared.cfg.limits.max_text_chars) {
            Ok(f) => f,
            Err((reference, err)) => {
                self.bad_frames += 1;
                self.send_error(ws, reference, &err).await?;
                if self.bad_frames >= self.shared.cfg.limits.max_bad_frames {
                    return Err(End::Close(CloseCode::Policy));
                }
                return Ok(());
            }
        };
        self.bad_frames = 0;
        let reference = frame.reference;
        let reply = match frame.op {
            ClientOp::Ping => Ok(Reply::Pong),
            // Boxed: the op and the queue writes run side by side inside `pump`, and an
            // inline op would add its size to every idle connection's task.
            op => out.pump(ws, Box::pin(self.dispatch(op))).await?,
        };
        self.reply(ws, reply, reference).await
    }

    async fn dispatch(&mut self, op: ClientOp) -> Result<Reply, ProtoError> {
        match op {
            ClientOp::Join {
                room,
                history,
                since,
            } => self.join(room, history, since).await,
            ClientOp::Leave { room } => self.leave(room).await,
            ClientOp::Chat { room, text } => self.chat(room, text).await,
            ClientOp::Gift { room, gift, count } => self.gift(room, gift, count).await,
            ClientOp::Grab { room, packet } => self.grab(room, packet).await,
            ClientOp::Ping => Ok(Reply::Pong),
        }
    }

    async fn join(
        &mut self,
        room: RoomId,
        history: usize,
        since: Option<String>,
    ) -> Result<Reply, ProtoError> {
        self.limit(Action::Join).await?;
        let hub = &self.shared.hub;
        if self.rooms.contains(&room) {
            // Joining again answers `joined` and changes nothing.
            let (events, recovered) = match since {
                Some(since) => {
                    let answer = hub.recover(&room, &since, history).await;
                    (answer.events, Some(answer.recovered))
                }
                None => (hub.history(&room, history), None),
            };
            return Ok(Reply::Joined {
                online: hub.online(&room),
                history: events,
                recovered,
                asked: history,
                redpackets: self.open_packets(&room).await,
                room,
                held: false,
            });
        }
        if self.rooms.len() >= self.shared.cfg.limits.rooms_per_conn {
            return Err(ProtoError::new(
                ErrorCode::TooManyRooms,
                format!(
                    "at most {} rooms per connection",
                    self.shared.cfg.limits.rooms_per_conn
                ),
            ));
        }
        // Read before joining: once the hub has registered us, the room's batches may be
        // written, and nothing may wait between that and the `joined` reply.
        let redpackets = self.open_packets(&room).await;
        // From the shard's registration on, the room's batches may come; they wait
        // until `joined` is on its way (see `reply`).
        self.conn.hold();
        let joined = hub.join(&room, &self.conn, history, since).await;
        if joined.is_err() {
            self.conn.unhold();
        }
        match joined {
            Ok(joined) => {
                self.rooms.push(room.clone());
                Ok(Reply::Joined {
                    redpackets,
                    room,
                    online: joined.online,
                    history: joined.history,
                    recovered: joined.recovered,
                    asked: history,
                    held: true,
                })
            }
            Err(JoinError::RoomFull) => Err(ProtoError::new(ErrorCode::RoomFull, "room is full")),
            Err(JoinError::ShuttingDown) => Err(ProtoError::new(
                ErrorCode::Internal,
                "node is shutting down",
            )),
        }
    }

    async fn leave(&mut self, room: RoomId) -> Result<Reply, ProtoError> {
        let Some(i) = self.rooms.iter().position(|r| *r == room) else {
            return Err(not_joined(&room));
        };
        self.rooms.swap_remove(i);
        self.shared.hub.leave(&room, self.conn.id).await;
        Ok(Reply::Ack)
    }

    /// A chat passes, in protocol order: `unauthorized`, `not_joined` ([`Self::writer`]),
    /// `muted`, `rate_limited` (slow mode, then the user's budget), `filtered`.
    async fn chat(&mut self, room: RoomId, text: String) -> Result<Reply, ProtoError> {
        let user = self.writer(&room)?;
        let moderation = &self.shared.moderation;
        moderation.check_send(&room, &user.id)?;
        moderation.check_slow_mode(&room, &user.id)?;
        self.limit(Action::Chat).await?;
        let moderation = &self.shared.moderation;
        moderation.note_chat(&room, &user.id);
        let text = match moderation.filter(&text) {
            Verdict::Pass => text,
            Verdict::Masked(masked) => masked,
            Verdict::Blocked => {
                // Kept for moderation review: the stream's `filtered` record.
                self.shared.hub.unsent(
                    &room,
                    protocol::EventBody::Chat { user, text },
                    Status::Filtered,
                );
                return Err(ProtoError::new(
                    ErrorCode::Filtered,
                    "the message contains a blocked word",
                ));
            }
        };
        self.shared
            .hub
            .publish(&room, protocol::EventBody::Chat { user, text });
        Ok(Reply::Ack)
    }

    async fn gift(&mut self, room: RoomId, gift: String, count: u32) -> Result<Reply, ProtoError> {
        let Some(entry) = self.shared.gifts.get(&gift) else {
            return Err(ProtoError::bad_request(format!(
                "gift: unknown gift {gift:?}"
            )));
        };
        let free = entry.free;
        let user = self.writer(&room)?;
        if !free {
            return Err(ProtoError::new(
                ErrorCode::Forbidden,
                format!("gift {gift:?} is paid: it is sent by the backend after billing"),
            ));
        }
        self.shared.moderation.check_send(&room, &user.id)?;
        self.limit(Action::Gift).await?;
        let gift = protocol::EventBody::Gift {
            user,
            gift,
            count: u64::from(count),
        };
        match self.shared.hub.publish_client_gift(&room, gift) {
            Ok(_) => Ok(Reply::Ack),
            Err(retry_after_ms) => {
                metrics::rate_limited("gift");
                Err(ProtoError {
                    code: ErrorCode::RateLimited,
                    message: format!("room {room} has its fill of gifts for this moment"),
                    retry_after_ms: Some(retry_after_ms),
                })
            }
        }
    }

    async fn grab(&mut self, room: RoomId, packet: String) -> Result<Reply, ProtoError> {
        let user = self.writer(&room)?;
        self.limit(Action::Grab).await?;
        let amount = self.shared.redpackets.grab(&room, &packet, &user).await?;
        Ok(Reply::Grabbed(amount))
    }

    /// The checks every write shares, in protocol order: `unauthorized`, `not_joined`.
    fn writer(&self, room: &RoomId) -> Result<User, ProtoError> {
        let Some(user) = &self.user else {
            return Err(ProtoError::new(
                ErrorCode::Unauthorized,
                "anonymous viewers cannot send",
            ));
        };
        if !self.rooms.contains(room) {
            return Err(not_joined(room));
        }
        Ok(user.clone())
    }

    async fn limit(&self, action: Action) -> Result<(), ProtoError> {
        self.shared
            .ratelimits
            .check(action, &self.rate_key, self.ip)
            .await
    }

    /// The room's open red packets for `joined`; a store failure shows none rather than
    /// failing the join.
    async fn open_packets(&self, room: &RoomId) -> Vec<protocol::OpenPacket> {
        self.shared
            .redpackets
            .open_in(room)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "listing open red packets failed");
                Vec::new()
            })
    }

    async fn leave_all(&mut self) {
        for room in std::mem::take(&mut self.rooms) {
            self.shared.hub.leave(&room, self.conn.id).await;
        }
    }

    async fn reply(
        &mut self,
        ws: &mut Socket,
        reply: Result<Reply, ProtoError>,
        reference: Option<i64>,
    ) -> Result<(), End> {
        let format = self.conn.format;
        let msg = match reply {
            Ok(Reply::Joined {
                room,
                online,
                history,
                recovered,
                asked,
                redpackets,
                held,
            }) => {
                let msg = joined_within(
                    &JoinedParts {
                        room: &room,
                        online,
                        history: &history,
                        recovered,
                        asked,
                        redpackets: &redpackets,
                    },
                    reference,
                    format,
                    self.shared.cfg.limits.max_out_frame_bytes,
                );
                if held {
                    return write_joined(ws, &self.conn, self.heartbeat, msg).await;
                }
                msg
            }
            Ok(Reply::Grabbed(amount)) => wire::encode(
                &ServerFrame::Ack {
                    reference,
                    amount: Some(amount),
                },
                format,
            ),
            Ok(Reply::Ack) => wire::encode(
                &ServerFrame::Ack {
                    reference,
                    amount: None,
                },
                format,
            ),
            Ok(Reply::Pong) => wire::encode(&ServerFrame::Pong { reference }, format),
            Err(err) => return self.send_error(ws, reference, &err).await,
        };
        self.write(ws, msg).await
    }

    async fn send_error(
        &mut self,
        ws: &mut Socket,
        reference: Option<i64>,
        err: &ProtoError,
    ) -> Result<(), End> {
        metrics::hot().error(err.code).increment(1);
        let msg = wire::encode(&ServerFrame::error(reference, err), self.conn.format);
        self.write(ws, msg).await
    }

    /// Writes one frame, racing the kill switch and the write timeout.
    async fn write(&self, ws: &mut Socket, msg: Bytes) -> Result<(), End> {
        write_one(ws, &self.conn, self.heartbeat, msg).await
    }
}

/// What writing the outbound queue needs, apart from the session's own state, so an op
/// can hold `&mut Session` while the queue keeps flowing.
struct Out<'a> {
    conn: &'a Conn,
    heartbeat: Duration,
}

impl Out<'_> {
    /// Runs `op` to its end while writing whatever the shards queue meanwhile.
    ///
    /// # Errors
    /// The end the connection met while `op` ran (a kill, a failed write), reported
    /// only once `op` has finished: an op is never abandoned halfway.
    async fn pump<F: Future>(&self, ws: &mut Socket, op: F) -> Result<F::Output, End> {
        tokio::pin!(op);
        let end = loop {
            tokio::select! {
                biased;
                out = &mut op => return Ok(out),
                code = self.conn.killed() => break End::Close(code),
                () = self.conn.queued() => {
                    if let Err(end) = Box::pin(self.write_queued(ws)).await {
                        break end;
                    }
                }
            }
        };
        op.await;
        Err(end)
    }

    /// Writes `first` and whatever else is queued (up to a cap) with one flush, and
    /// observes the end-to-end latency of the oldest frame written (one observation per
    /// flush keeps the hot path cheap and errs on the slow side).
    async fn write_queued(&self, ws: &mut Socket) -> Result<(), End> {
        let mut total = Written::default();
        guarded(self.conn, self.heartbeat, async {
            loop {
                // The write happens inside one poll: no slice array or frame is held
                // across an await, so an idle connection's task stays small.
                let w = std::future::poll_fn(|cx| {
                    self.conn.write_front(|s| ws.poll_write_vectored(cx, s))
                })
                .await?;
                total.frames += w.frames;
                total.bytes += w.bytes;
                total.oldest = total.oldest.or(w.oldest);
                // A frame begun is finished before anything else is written.
                let budget_left = (total.frames as usize) < MAX_FRAMES_PER_FLUSH;
                if !(w.partial || w.more && budget_left) {
                    break;
                }
            }
            ws.flush().await
        })
        .await?;
        let hot = metrics::hot();
        hot.frames_out.increment(total.frames);
        hot.bytes_out.increment(total.bytes);
        if let Some(oldest) = total.oldest {
            hot.broadcast_latency.record(oldest.elapsed().as_secs_f64());
        }
        Ok(())
    }
}

/// Writes one of the session's own frames: at once when nothing is queued ahead (the
/// common case: no task, no timer), else behind the queue, which is then written
/// (racing the kill switch and the write timeout).
async fn write_one(
    ws: &mut Socket,
    conn: &Conn,
    heartbeat: Duration,
    msg: Bytes,
) -> Result<(), End> {
    let pushed = conn.push_reply(&msg);
    finish_write(ws, conn, heartbeat, msg.len(), pushed).await
}

/// Writes a held join's `joined` ahead of the batches queued meanwhile.
async fn write_joined(
    ws: &mut Socket,
    conn: &Conn,
    heartbeat: Duration,
    msg: Bytes,
) -> Result<(), End> {
    let pushed = conn.push_joined(&msg);
    finish_write(ws, conn, heartbeat, msg.len(), pushed).await
}

/// Counts a frame written at once, or writes the queue it joined.
async fn finish_write(
    ws: &mut Socket,
    conn: &Conn,
    heartbeat: Duration,
    len: usize,
    pushed: Push,
) -> Result<(), End> {
    match pushed {
        Push::Written => {
            let hot = metrics::hot();
            hot.frames_out.increment(1);
            hot.bytes_out.increment(len as u64);
            Ok(())
        }
        // Boxed: the catch-up is the slow path, and inline its future would sit in every
        // idle connection's task.
        Push::Queued => Box::pin(Out { conn, heartbeat }.write_queued(ws)).await,
        Push::Dropped | Push::Killed | Push::Gone => Err(End::Error),
    }
}

/// A write that gives up when the connection is killed or nothing moves for
/// 2 × heartbeat (a socket that accepts nothing that long is dead, whatever TCP thinks).
async fn guarded<F>(conn: &Conn, heartbeat: Duration, write: F) -> Result<(), End>
where
    F: Future<Output = std::io::Result<()>>,
{
    tokio::select! {
        res = tokio::time::timeout(2 * heartbeat, write) => match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(End::Error),
        },
        code = conn.killed() => Err(End::Close(code)),
    }
}

/// A successful op's answer, before encoding.
enum Reply {
    Joined {
        room: RoomId,
        online: u64,
        history: Vec<Arc<protocol::Event>>,
        /// With `since`: whether `history` is everything after it.
        recovered: Option<bool>,
        /// The `history` the join asked for.
        asked: usize,
        redpackets: Vec<protocol::OpenPacket>,
        /// The connection's writes were held for this join ([`Conn::hold`]).
        held: bool,
    },
    Ack,
    /// `ack` of a grab, with the amount won.
    Grabbed(u64),
    Pong,
}

fn not_joined(room: &RoomId) -> ProtoError {
    ProtoError::new(ErrorCode::NotJoined, format!("not in room {room}"))
}

/// What a `joined` frame says, before encoding.
struct JoinedParts<'a> {
    room: &'a RoomId,
    online: u64,
    history: &'a [Arc<protocol::Event>],
    recovered: Option<bool>,
    asked: usize,
    redpackets: &'a [protocol::OpenPacket],
}

/// The `joined` frame, its history trimmed from the oldest end until the frame is
/// within `max` bytes (PROTOCOL.md v1.1, outbound frame bound). A recovery that does not
/// fit is no recovery: it is answered `recovered: false` with the last `asked` events
/// (trimmed likewise), never as a cut list that would claim to be complete.
fn joined_within(
    parts: &JoinedParts<'_>,
    reference: Option<i64>,
    format: Format,
    max: usize,
) -> Bytes {
    let encode = |history: &[Arc<protocol::Event>], recovered: Option<bool>| {
        wire::encode(
            &ServerFrame::Joined {
                room: parts.room,
                online: parts.online,
                history,
                redpackets: parts.redpackets,
                recovered,
                reference,
            },
            format,
        )
    };
    let whole = encode(parts.history, parts.recovered);
    if whole.len() <= max {
        return whole;
    }
    let (history, recovered) = match parts.recovered {
        Some(true) => {
            // The log's tail is the room's last events whether or not it recovered.
            let skip = parts.history.len().saturating_sub(parts.asked);
            (&parts.history[skip..], Some(false))
        }
        other => (parts.history, other),
    };
    // Weigh each event once, drop the oldest until the rest fits, then check for real.
    let mut over = encode(history, recovered).len().saturating_sub(max);
    let mut skip = 0;
    while over > 0 && skip < history.len() {
        over = over.saturating_sub(wire::encoded_len(&*history[skip], format) + 1);
        skip += 1;
    }
    loop {
        let frame = encode(&history[skip..], recovered);
        if frame.len() <= max || skip == history.len() {
            return frame;
        }
        skip += 1;
    }
}

/// A read error: the client's close code where it broke the protocol
/// ([`socket::ReadError`]), the peer's end where it went away.
fn read_error(e: ReadError) -> End {
    match e {
        ReadError::Closed => End::Peer,
        ReadError::Refused { code, source } => {
            tracing::debug!(error = %source, "client frame refused");
            End::Close(code)
        }
        ReadError::Io(_) => End::Error,
    }
}
