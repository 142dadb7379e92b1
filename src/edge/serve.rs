//! The one accept loop every listener is served by (plain, PROXY protocol, TLS), and each
//! connection served by hyper from accept to close.
//!
//! Why it is shaped so. A connection that has not sent its first request head holds a
//! file descriptor and a task, and nothing else counts it: `limits.max_conns` counts
//! upgraded sessions. Left alone, silent sockets pile up until the process runs out of
//! descriptors, and then `/healthz` and every new client fail with it. So:
//!
//! - **Deadline.** From TCP accept until hyper calls the service with the first request
//!   head, a connection has `server.handshake_timeout_ms`, PROXY header and TLS
//!   included. The connection's task races its hyper connection against that instant;
//!   the service tells the task when the first head arrived (a oneshot), and past the
//!   deadline without one the task drops the connection, which closes it. After the
//!   first request, hyper's `header_read_timeout` (the same duration) closes a
//!   keep-alive connection that stays idle or sends a head too slowly.
//! - **Cap.** The same span holds one of `limits.max_handshakes` slots. The loop never
//!   waits for a slot: when a connection is accepted while all are held, the *oldest*
//!   waiting connection is closed at once and counted
//!   (`danmaku_edge_handshakes_total{outcome="shed"}`), and the new one takes its place.
//!   Shedding the oldest rather than the newest is what keeps the node serving under a
//!   slowloris flood: the attacker's sockets are the ones that have waited longest,
//!   while a real client (or a `/healthz` probe) sends its request at once and leaves
//!   the waiting set before it can be the oldest. The backlog keeps draining and the
//!   descriptors held by not-yet-served connections stay bounded.
//! - **Accept errors** (out of descriptors: EMFILE, ENFILE) back off exponentially,
//!   [`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`], reset by the next success: the
//!   connection that could not be accepted stays in the backlog, so retrying at once
//!   would spin, and a flat second would stall every client behind a momentary blip.
//!
//! hyper's HTTP/1 builder serves each connection directly, not `axum::serve` (it has no
//! hook at "first request head read" and no deadline before it) nor hyper-util's `auto`
//! builder (it wraps the IO): the IO given to hyper is exactly `TokioIo<EdgeIo>`, so the
//! WebSocket upgrade can downcast the upgraded connection back to the socket. Each
//! request carries `ConnectInfo<SocketAddr>`: the client's address as the edge found it.
//!
//! Drain: when `stop` is cancelled the loop stops accepting, connections still before
//! their first request are closed, the others get hyper's graceful shutdown (a request
//! in flight finishes, keep-alive ends), and [`Edge::serve`] returns once all are done.
//! Upgraded WebSocket sessions have left hyper by then; `Shared::sessions` tracks them.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ::metrics::{Counter, Gauge};
use axum::Router;
use axum::extract::ConnectInfo;
use axum::response::Response;
use axum::routing::future::RouteFuture;
use hyper::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Edge, EdgeIo, HandshakeError, report, warn_due};
use crate::metrics;

/// First pause after a failed `accept`.
pub const BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause between failed `accept`s.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What every connection task of one listener shares.
struct Ctx {
    edge: Edge,
    app: Router,
    http: http1::Builder,
    stop: CancellationToken,
    in_flight: Gauge,
}

impl Edge {
    /// Accepts on `listener` and serves `app` on every connection until `stop` is
    /// cancelled, then drains (see the module docs) and returns. At most
    /// `max_handshakes` connections wait for their first request head at once.
    pub async fn serve(
        self,
        listener: TcpListener,
        app: Router,
        max_handshakes: usize,
        stop: CancellationToken,
    ) {
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(self.timeout);
        let ctx = Arc::new(Ctx {
            edge: self,
            app,
            http,
            stop: stop.clone(),
            in_flight: metrics::edge_handshakes_in_flight(),
        });
        let waiting = Arc::new(Waiting::new(max_handshakes));
        let shed = metrics::edge_handshakes_shed();
        let conns = TaskTracker::new();
        let mut backoff = Backoff::default();
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => break,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let failed = backoff.succeed();
                    if failed > 0 {
                        tracing::info!(failed, "accepting again");
                    }
                    let (waiter, evicted) = waiting.admit();
                    if evicted {
                        shed_one(peer, &shed, max_handshakes);
                    }
                    let slot = Slot::new(waiter, Arc::clone(&waiting), &ctx.in_flight);
                    conns.spawn(connection(Arc::clone(&ctx), tcp, peer, slot));
                }
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    let delay = backoff.fail();
                    if backoff.failures == 1 || delay == BACKOFF_MAX {
                        tracing::error!(
                            error = %e,
                            retry_in = ?delay,
                            "accept failed (out of file descriptors? see `ulimit -n`, limits.max_conns, limits.max_handshakes)"
                        );
                    }
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        drop(listener);
        conns.close();
        conns.wait().await;
    }
}

/// Counts (and now and then logs) a waiting connection shed for a newer one.
fn shed_one(peer: SocketAddr, shed: &Counter, max_handshakes: usize) {
    static LAST_WARN: AtomicU64 = AtomicU64::new(0);
    shed.increment(1);
    if warn_due(&LAST_WARN) {
        tracing::warn!(
            %peer,
            max_handshakes,
            "connections shed: limits.max_handshakes connections are already waiting for their first request (silent or slow clients?); the oldest are closed, counted in danmaku_edge_handshakes_total{{outcome=\"shed\"}}"
        );
    } else {
        tracing::debug!(%peer, "waiting connection shed");
    }
}

/// A connection that died in the backlog: skipped, as axum's own listener does.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// The pause after each failed `accept` in a row: [`BACKOFF_MIN`], doubling, at most
/// [`BACKOFF_MAX`].
#[derive(Debug, Default)]
struct Backoff {
    /// Failed accepts since the last success.
    failures: u32,
}

impl Backoff {
    /// Records a failure; returns how long to pause.
    fn fail(&mut self) -> Duration {
        let delay = BACKOFF_MIN
            .saturating_mul(1 << self.failures.min(16))
            .min(BACKOFF_MAX);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Records a success; returns how many failures it ended.
    fn succeed(&mut self) -> u32 {
        std::mem::take(&mut self.failures)
    }
}

/// The connections waiting for their first request head, oldest first, so the oldest
/// can be shed when the cap is reached (see the module docs).
struct Waiting {
    /// Oldest first. Entries that left the waiting state are dropped lazily from the
    /// front; each waits at most the handshake timeout, so stale ones do not pile up.
    queue: Mutex<VecDeque<Arc<Waiter>>>,
    /// Connections waiting now (not counting stale entries).
    live: AtomicUsize,
    max: usize,
}

/// One waiting connection's place in [`Waiting`].
struct Waiter {
    /// Set once: it left the waiting state (head read, closed) or was shed.
    done: AtomicBool,
    /// Wakes the connection's task when it is shed.
    shed: Notify,
}

impl Waiting {
    fn new(max: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            live: AtomicUsize::new(0),
            max: max.max(1),
        }
    }

    /// A place for a newly accepted connection; sheds the oldest waiting one first when
    /// all `max` are taken (the `bool`).
    fn admit(&self) -> (Arc<Waiter>, bool) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        while queue
            .front()
            .is_some_and(|w| w.done.load(Ordering::Acquire))
        {
            queue.pop_front();
        }
        let mut evicted = false;
        if self.live.load(Ordering::Acquire) >= self.max {
            while let Some(oldest) = queue.pop_front() {
                if oldest.leave(&self.live) {
                    oldest.shed.notify_one();
                    evicted = true;
                    break;
                }
            }
        }
        let waiter = Arc::new(Waiter {
            done: AtomicBool::new(false),
            shed: Notify::new(),
        });
        self.live.fetch_add(1, Ordering::AcqRel);
        queue.push_back(Arc::clone(&waiter));
        (waiter, evicted)
    }
}

impl Waiter {
    /// Leaves the waiting state; `true` for the one call that did.
    fn leave(&self, live: &AtomicUsize) -> bool {
        let first = !self.done.swap(true, Ordering::AcqRel);
        if first {
            live.fetch_sub(1, Ordering::AcqRel);
        }
        first
    }
}

/// One handshake slot, held from accept to the first request head (or the end).
struct Slot {
    waiter: Arc<Waiter>,
    waiting: Arc<Waiting>,
    in_flight: Gauge,
}

impl Slot {
    fn new(waiter: Arc<Waiter>, waiting: Arc<Waiting>, in_flight: &Gauge) -> Self {
        in_flight.increment(1.0);
        Self {
            waiter,
            waiting,
            in_flight: in_flight.clone(),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.waiter.leave(&self.waiting.live);
        self.in_flight.decrement(1.0);
    }
}

/// One connection: handshake, then HTTP, all before the deadline until the first
/// request head; then HTTP until it closes, upgrades, or the drain ends it.
async fn connection(ctx: Arc<Ctx>, tcp: TcpStream, peer: SocketAddr, slot: Slot) {
    let accepted = Instant::now();
    let deadline = accepted + ctx.edge.timeout;
    let fail = |e: HandshakeError| {
        metrics::edge_handshake(e.label(), accepted.elapsed());
        report(peer, &e);
    };
    // Shed for a newer connection (the cap was reached and this one waited longest):
    // counted where it was shed; the connection is dropped, which closes it.
    let shed = Arc::clone(&slot.waiter);
    let handshake = tokio::select! {
        () = ctx.stop.cancelled() => return,
        () = shed.shed.notified() => return,
        r = tokio::time::timeout_at(deadline, ctx.edge.handshake(tcp, peer)) => {
            r.unwrap_or(Err(HandshakeError::Timeout))
        }
    };
    let (io, client) = match handshake {
        Ok(conn) => conn,
        Err(e) => return fail(e),
    };
    // A silent socket costs its task and nothing more: hyper (and its read buffer) starts
    // once the client has sent a byte.
    if let EdgeIo::Plain(rewind) = &io
        && rewind.replay.is_none()
    {
        tokio::select! {
            biased;
            r = rewind.inner.readable() => {
                if r.is_err() {
                    return fail(HandshakeError::Closed);
                }
            }
            () = tokio::time::sleep_until(deadline) => return fail(HandshakeError::Timeout),
            () = shed.shed.notified() => return,
            () = ctx.stop.cancelled() => return,
        }
    }
    // Boxed: the HTTP part is most of a connection task's size, and a silent socket
    // never gets this far (it costs a small task until the deadline).
    Box::pin(serve_http(ctx, io, client, peer, slot, accepted, deadline)).await;
}

/// A connection after its first byte: HTTP until it closes, upgrades, or the drain ends
/// it; within the deadline until the first request head.
async fn serve_http(
    ctx: Arc<Ctx>,
    io: EdgeIo,
    client: SocketAddr,
    peer: SocketAddr,
    slot: Slot,
    accepted: Instant,
    deadline: Instant,
) {
    let fail = |e: HandshakeError| {
        metrics::edge_handshake(e.label(), accepted.elapsed());
        report(peer, &e);
    };
    let shed = Arc::clone(&slot.waiter);
    let (head_tx, mut head_rx) = oneshot::channel();
    let service = Service {
        app: ctx.app.clone(),
        client,
        first_head: Mutex::new(Some(head_tx)),
    };
    let mut conn = pin!(
        ctx.http
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades()
    );
    let mut expiry = pin!(tokio::time::sleep_until(deadline));
    let mut slot = Some(slot);
    let mut draining = false;
    let result = loop {
        // Biased: a head read in the same poll that the deadline passed is a head in time.
        tokio::select! {
            biased;
            r = conn.as_mut() => break r,
            _ = &mut head_rx, if slot.is_some() => {
                // Sent by the first service call (dropped unsent only with the service,
                // as the connection ends): the head is in, the deadline lifted.
                metrics::edge_handshake("ok", accepted.elapsed());
                slot = None;
            }
            () = &mut expiry, if slot.is_some() => return fail(HandshakeError::Timeout),
            () = shed.shed.notified(), if slot.is_some() => return,
            () = ctx.stop.cancelled(), if !draining => {
                if slot.is_some() {
                    return;
                }
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    };
    // A request answered and closed within one poll (`Connection: close`, an upgrade)
    // ends the connection before the loop above saw its head.
    if slot.is_some() && head_rx.try_recv().is_ok() {
        metrics::edge_handshake("ok", accepted.elapsed());
        slot = None;
    }
    if slot.is_some() {
        fail(match result {
            Ok(()) => HandshakeError::Closed,
            Err(e) => HandshakeError::Http(e),
        });
    } else if let Err(e) = result {
        tracing::debug!(%client, error = %e, "HTTP connection ended with an error");
    }
}

/// The service hyper calls for each request of one connection: tells the connection
/// task about the first head, adds the client's address, and hands the request to the
/// router.
struct Service {
    app: Router,
    client: SocketAddr,
    /// Fired by the first request: the deadline is lifted and the slot released.
    first_head: Mutex<Option<oneshot::Sender<()>>>,
}

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response;
    type Error = Infallible;
    type Future = RouteFuture<Infallible>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let first = self
            .first_head
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(tx) = first {
            let _ = tx.send(());
        }
        req.extensions_mut().insert(ConnectInfo(self.client));
        // The router is always ready (axum's `poll_ready` returns `Ready` at once).
        tower_service::Service::call(&mut self.app.clone(), req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_waiting_connection_is_shed_for_a_new_one() {
        let waiting = Waiting::new(2);
        let (a, shed) = waiting.admit();
        assert!(!shed);
        let (b, shed) = waiting.admit();
        assert!(!shed);
        // Full: the third sheds the oldest (a), not itself.
        let (c, shed) = waiting.admit();
        assert!(shed);
        assert!(a.done.load(Ordering::Acquire));
        assert!(!b.done.load(Ordering::Acquire) && !c.done.load(Ordering::Acquire));
        // b leaves the waiting state (its head arrived): room for one more, nobody shed.
        assert!(b.leave(&waiting.live));
        assert!(!b.leave(&waiting.live), "leaving twice counts once");
        let (_d, shed) = waiting.admit();
        assert!(!shed);
        assert_eq!(waiting.live.load(Ordering::Acquire), 2);
        // Stale entries at the front are dropped as new ones come.
        assert!(waiting.queue.lock().unwrap().len() <= 3);
    }

    #[test]
    fn backoff_doubles_to_a_second_and_resets() {
        let mut b = Backoff::default();
        let delays: Vec<u64> = (0..10).map(|_| b.fail().as_millis() as u64).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        for _ in 0..100 {
            assert_eq!(b.fail(), BACKOFF_MAX);
        }
        assert_eq!(b.succeed(), 110);
        assert_eq!(b.fail(), BACKOFF_MIN);
    }

    #[test]
    fn connection_errors_are_skipped_resource_errors_are_not() {
        assert!(is_connection_error(&io::Error::from(
            io::ErrorKind::ConnectionAborted
        )));
        // EMFILE and ENFILE.
        assert!(!is_connection_error(&io::Error::from_raw_os_error(24)));
        assert!(!is_connection_error(&io::Error::from_raw_os_error(23)));
    }
}
