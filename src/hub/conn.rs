//! A connection as the hub sees it: its format, its bounded queue of outbound frames
//! (shared bytes, with the slow-consumer policy applied when full), and the switch a
//! shard pulls to have its session close it.
//!
//! **Inline writes.** A plain TCP member is written by whoever delivers to it: the shard
//! fanning out a window calls [`Conn::push`], which, when nothing is queued ahead, writes
//! the shared frame with one non-blocking `write()` right there. No task is woken, no
//! timer armed, nothing copied: that is the whole cost of a delivered frame in the common
//! case. Only what the socket does not take (its buffer is full) is queued, and the
//! session is woken to finish it when the socket is writable; the slow-consumer policy
//! applies to that queue. Every write to the socket (the shard's, the session's replies,
//! the session's catch-up) happens under the queue lock, so frames never interleave, and
//! a frame begun is always finished first. TLS members cannot share ciphertext: for them
//! every frame is queued and their session encrypts and writes it.
//!
//! The queue is a `VecDeque` under a std mutex plus a `Notify`, not a channel: a
//! channel's async receive allocates a waker hook each time it waits, i.e. once per
//! delivered frame, while a `Notified` future lives in the session's own task. An idle
//! connection's queue holds no allocation at all. Frames leave the queue only as they are
//! written ([`Conn::write_front`]), so a partly written frame stays first in line and a
//! member that stops reading holds references to shared frames, never copies.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::protocol::{CloseCode, Format};

/// Connection ids are unique per node and never reused while the process lives.
pub type ConnId = u64;

/// The part of a connection that shards need: its format, its bounded outbound queue,
/// and a way to ask its session to close. Shared by the session and every shard it is a
/// member on.
///
/// The queue is a `VecDeque` under a std mutex plus a `Notify`, not a channel: a
/// channel's async receive allocates a waker hook each time it waits, i.e. once per
/// delivered frame, while a `Notified` future lives in the session's own task. An idle
/// connection's queue holds no allocation at all.
pub struct Conn {
    pub id: ConnId,
    pub format: Format,
    /// The client negotiated permessage-deflate: it gets the deflated window frames.
    pub deflate: bool,
    /// Bounded by `cap`: the slow-consumer policy applies when it is full.
    queue: Mutex<OutQueue>,
    cap: usize,
    /// Wakes the session when a frame is queued; `notify_one` keeps a permit, so a push
    /// that lands before the session waits is not lost.
    queued: Notify,
    /// Close code requested by a shard (0 = none); the session reads it when notified.
    close: AtomicU16,
    /// Wakes the session when `close` is set; `notify_one` keeps a permit, so a kill that
    /// lands before the session waits is not lost.
    notify: Notify,
}

/// A connection's pending frames; `closed` once its session has ended.
#[derive(Default)]
struct OutQueue {
    frames: VecDeque<Outbound>,
    /// Bytes of the front frame already on the wire (a partial write).
    written: usize,
    closed: bool,
    /// Set while a `join` is in flight: the member may already be registered with a
    /// shard, but its `joined` reply must go out before the room's batches, so nothing
    /// is written inline until [`Conn::push_joined`] (or [`Conn::unhold`]).
    hold: bool,
    /// The plain socket deliveries write to inline; `None` for TLS members (their
    /// session writes everything) and once closed (so the descriptor goes with the
    /// session, whatever shard still holds this `Conn`).
    tcp: Option<Arc<TcpStream>>,
}

/// What one [`Conn::write_front`] took off the queue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Frames written whole.
    pub frames: u64,
    pub bytes: u64,
    /// When the oldest event of the first frame finished was accepted.
    pub oldest: Option<Instant>,
    /// The front frame is only partly written: more must be written before anything
    /// else goes on this socket.
    pub partial: bool,
    /// Frames are still queued.
    pub more: bool,
}

/// One frame in a member's outbound queue.
struct Outbound {
    /// A complete WebSocket frame, shared with every other member it goes to.
    pub frame: Bytes,
    /// When the oldest event in it was accepted, for the end-to-end latency histogram.
    pub accepted: Instant,
}

/// What is being queued: a room's delivery (the cap applies), the session's own reply,
/// or a held join's `joined` (which goes first and ends the hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Delivery { droppable: bool },
    Reply,
    Joined,
}

/// Outcome of queueing one frame to a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Written to the socket at once, whole.
    Written,
    /// Queued (or begun): the session finishes it when the socket is writable.
    Queued,
    Dropped,
    Killed,
    Gone,
}

impl Conn {
    /// A connection whose outbound queue holds at most `queue` frames.
    pub fn new(id: ConnId, format: Format, queue: usize) -> Arc<Conn> {
        Self::with_socket(id, format, false, queue, None)
    }

    /// A connection whose deliveries are written inline to `tcp` when nothing is queued.
    pub fn with_socket(
        id: ConnId,
        format: Format,
        deflate: bool,
        queue: usize,
        tcp: Option<Arc<TcpStream>>,
    ) -> Arc<Conn> {
        Arc::new(Conn {
            id,
            format,
            deflate,
            queue: Mutex::new(OutQueue {
                tcp,
                ..OutQueue::default()
            }),
            cap: queue.max(1),
            queued: Notify::new(),
            close: AtomicU16::new(0),
            notify: Notify::new(),
        })
    }

    /// Queues `msg` without waiting; applies the slow-consumer policy when full.
    pub fn push(&self, frame: &Bytes, accepted: Instant, droppable: bool) -> Push {
        self.offer_as(frame, accepted, Kind::Delivery { droppable })
    }

    /// Sends one of the session's own frames (a reply, a ping, the close): written at
    /// once when nothing is queued ahead, else queued behind what is, whatever the cap
    /// (the session then waits for the queue to drain before it reads on, which bounds
    /// it).
    pub fn push_reply(&self, frame: &Bytes) -> Push {
        self.offer_as(frame, Instant::now(), Kind::Reply)
    }

    /// Holds inline writes while a `join` is in flight (see `OutQueue::hold`).
    pub fn hold(&self) {
        self.queue.lock().expect("outbound lock").hold = true;
    }

    /// Ends a hold without a `joined` (the join failed): what was queued meanwhile goes.
    pub fn unhold(&self) {
        let more = {
            let mut q = self.queue.lock().expect("outbound lock");
            q.hold = false;
            !q.frames.is_empty()
        };
        if more {
            self.queued.notify_one();
        }
    }

    /// Sends the `joined` reply ahead of every batch queued while the join was held
    /// (behind only a frame already begun on the wire), and ends the hold, in one step:
    /// no batch can slip onto the socket in between.
    pub fn push_joined(&self, frame: &Bytes) -> Push {
        self.offer_as(frame, Instant::now(), Kind::Joined)
    }

    /// Writes `frame` at once when nothing is queued (and no join holds the socket),
    /// else queues it; a delivery over the cap meets the slow-consumer policy.
    fn offer_as(&self, frame: &Bytes, accepted: Instant, kind: Kind) -> Push {
        {
            let mut q = self.queue.lock().expect("outbound lock");
            if q.closed {
                return Push::Gone;
            }
            if kind == Kind::Joined {
                q.hold = false;
                if !q.frames.is_empty() {
                    // Ahead of the held batches, behind a frame begun on the wire.
                    let at = usize::from(q.written > 0);
                    q.frames.insert(
                        at,
                        Outbound {
                            frame: frame.clone(),
                            accepted,
                        },
                    );
                    drop(q);
                    self.queued.notify_one();
                    return Push::Queued;
                }
            }
            let mut written = 0;
            if q.frames.is_empty()
                && !q.hold
                && let Some(tcp) = &q.tcp
            {
                // Any error but "full" is left for the session: its own write of the
                // queued frame meets it and ends the connection.
                if let Ok(n) = tcp.try_write(frame) {
                    if n == frame.len() {
                        return Push::Written;
                    }
                    written = n;
                }
            }
            // A partly written frame only happens on an empty queue, never over the cap.
            if let Kind::Delivery { droppable } = kind
                && q.frames.len() >= self.cap
            {
                drop(q);
                if droppable {
                    return Push::Dropped;
                }
                self.kill(CloseCode::SlowConsumer);
                return Push::Killed;
            }
            q.frames.push_back(Outbound {
                frame: frame.clone(),
                accepted,
            });
            if written > 0 {
                q.written = written;
            }
        }
        self.queued.notify_one();
        Push::Queued
    }

    /// The oldest queued frame, if any.
    #[cfg(test)]
    fn try_next(&self) -> Option<Outbound> {
        let mut q = self.queue.lock().expect("outbound lock");
        q.written = 0;
        q.frames.pop_front()
    }

    /// Resolves once a frame is queued (it stays queued). Only the session calls it.
    pub async fn queued(&self) {
        loop {
            if !self.queue.lock().expect("outbound lock").frames.is_empty() {
                return;
            }
            self.queued.notified().await;
        }
    }

    /// Offers the unwritten bytes of up to 16 queued frames to `write` (one vectored
    /// write) and takes off the queue what it wrote. The queue lock is held for this
    /// one call, never across an await; the frames stay shared (nothing is copied), so a
    /// member that stops reading holds references, not bytes.
    ///
    /// # Errors
    /// `write`'s error.
    pub fn write_front(
        &self,
        write: impl FnOnce(&[std::io::IoSlice<'_>]) -> std::task::Poll<std::io::Result<usize>>,
    ) -> std::task::Poll<std::io::Result<Written>> {
        use std::io::IoSlice;
        use std::task::Poll;
        const MAX: usize = 16;
        let mut q = self.queue.lock().expect("outbound lock");
        let n = q.frames.len().min(MAX);
        if n == 0 {
            return Poll::Ready(Ok(Written::default()));
        }
        let mut slices = [IoSlice::new(&[]); MAX];
        for (i, out) in q.frames.iter().take(n).enumerate() {
            let skip = if i == 0 { q.written } else { 0 };
            slices[i] = IoSlice::new(&out.frame[skip..]);
        }
        let mut left = match write(&slices[..n]) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(k)) => k,
        };
        let mut done = Written {
            bytes: left as u64,
            ..Written::default()
        };
        while left > 0 {
            let Some(front) = q.frames.front() else {
                break;
            };
            let rest = front.frame.len() - q.written;
            if left >= rest {
                left -= rest;
                let out = q.frames.pop_front().expect("front exists");
                q.written = 0;
                done.frames += 1;
                done.oldest.get_or_insert(out.accepted);
            } else {
                q.written += left;
                left = 0;
            }
        }
        done.partial = q.written > 0;
        done.more = !q.frames.is_empty();
        Poll::Ready(Ok(done))
    }

    /// The session has ended: refuse further frames and free the queued ones.
    pub fn close_queue(&self) {
        let mut q = self.queue.lock().expect("outbound lock");
        q.closed = true;
        q.written = 0;
        q.frames = VecDeque::new();
        q.tcp = None;
    }

    /// Asks the session to close with `code`; the first request wins.
    pub fn kill(&self, code: CloseCode) {
        if self
            .close
            .compare_exchange(0, code.code(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.notify.notify_one();
        }
    }

    /// Resolves once a close was requested, with its code.
    pub async fn killed(&self) -> CloseCode {
        loop {
            self.notify.notified().await;
            let code = self.close.load(Ordering::Acquire);
            if let Some(c) = CloseCode::ALL.into_iter().find(|c| c.code() == code) {
                return c;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn msg(n: u8) -> Bytes {
        Bytes::from(vec![n])
    }

    fn payload(o: &Outbound) -> u8 {
        o.frame[0]
    }

    #[tokio::test]
    async fn a_full_queue_drops_droppable_frames_and_kills_for_the_rest() {
        let conn = Conn::new(1, Format::Msgpack, 2);
        let now = Instant::now();
        assert_eq!(conn.push(&msg(1), now, false), Push::Queued);
        assert_eq!(conn.push(&msg(2), now, true), Push::Queued);
        assert_eq!(conn.push(&msg(3), now, true), Push::Dropped);
        assert_eq!(conn.push(&msg(4), now, false), Push::Killed);
        let code = tokio::time::timeout(Duration::from_secs(1), conn.killed())
            .await
            .expect("killed resolves");
        assert_eq!(code, CloseCode::SlowConsumer);
        // What was queued before the overflow is still there, in order.
        conn.queued().await;
        assert_eq!(payload(&conn.try_next().unwrap()), 1);
        assert_eq!(payload(&conn.try_next().unwrap()), 2);
        assert!(conn.try_next().is_none());
    }

    /// A partial write keeps the rest of the front frame first in line; whole frames
    /// leave the queue; nothing is copied or reordered.
    #[test]
    fn write_front_resumes_a_partly_written_frame() {
        use std::task::Poll;
        let conn = Conn::new(3, Format::Json, 8);
        let now = Instant::now();
        for f in [&b"abcd"[..], b"ef", b"ghi"] {
            assert_eq!(
                conn.push(&Bytes::copy_from_slice(f), now, false),
                Push::Queued
            );
        }
        let mut wire = Vec::new();
        let mut take = |budget: usize| {
            let Poll::Ready(Ok(w)) = conn.write_front(|slices| {
                let mut n = 0;
                for s in slices {
                    let k = s.len().min(budget - n);
                    wire.extend_from_slice(&s[..k]);
                    n += k;
                }
                Poll::Ready(Ok(n))
            }) else {
                panic!("ready");
            };
            w
        };
        let w = take(3);
        assert_eq!((w.frames, w.bytes, w.partial, w.more), (0, 3, true, true));
        let w = take(4);
        assert_eq!((w.frames, w.bytes, w.partial, w.more), (2, 4, true, true));
        let w = take(10);
        assert_eq!((w.frames, w.bytes, w.partial, w.more), (1, 2, false, false));
        assert_eq!(wire, b"abcdefghi");
    }

    #[tokio::test]
    async fn next_waits_for_a_push_and_a_closed_queue_refuses() {
        let conn = Conn::new(2, Format::Json, 4);
        let waiter = {
            let conn = Arc::clone(&conn);
            tokio::spawn(async move {
                conn.queued().await;
                payload(&conn.try_next().unwrap())
            })
        };
        tokio::task::yield_now().await;
        assert_eq!(conn.push(&msg(7), Instant::now(), true), Push::Queued);
        let got = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(got, 7);
        // A push before anyone waits is not lost either (the permit is kept).
        assert_eq!(conn.push(&msg(8), Instant::now(), true), Push::Queued);
        conn.queued().await;
        assert_eq!(payload(&conn.try_next().unwrap()), 8);
        conn.close_queue();
        assert_eq!(conn.push(&msg(9), Instant::now(), false), Push::Gone);
        assert!(conn.try_next().is_none());
    }
}
