//! Wiring: builds the shared state ([`crate::shared`]), serves HTTP + WebSocket on a listener, and runs the
//! graceful drain when the shutdown future resolves.
//!
//! `run` takes the listener and the shutdown future (as mini-redis does) so tests bind
//! port 0 and trigger the drain themselves. Every listener, plain or with TLS or the
//! PROXY protocol, is served by [`crate::edge`]'s accept loop ([`Edge::serve`]), which
//! bounds connections that have not sent a request yet.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::Admission;
use crate::auth::Auth;
use crate::backplane::redis::RedisBackplane;
use crate::backplane::{Backplane, Local};
use crate::config::BackplaneKind;
use crate::config::Config;
use crate::edge::Edge;
use crate::hub::{Hub, Outlets};
use crate::moderation::{Moderation, ModerationError};
use crate::ratelimit::RateLimits;
use crate::redis_link::RedisLink;
use crate::redpacket::journal::JournalError;
use crate::redpacket::local::LocalStore;
use crate::redpacket::redis::RedisStore;
use crate::redpacket::{RedPackets, Store, StoreError};
use crate::shared::{ConnIds, Shared};
use crate::stream::EventStream;
use crate::{http, metrics, stream};

/// Grace after the drain window for the last closes to flush before tasks are stopped.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// What the server could not do.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("serving HTTP: {0}")]
    Serve(#[from] std::io::Error),
    #[error("opening the red-packet store (data.dir): {0}")]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("opening the moderation state (data.dir or redis): {0}")]
    Moderation(#[from] ModerationError),
    /// TLS files or the trust list: a configuration error naming its key.
    #[error(transparent)]
    Edge(#[from] crate::edge::EdgeError),
}

impl ServerError {
    /// A configuration error (the binary exits 2 on those, as for an invalid config).
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Edge(_))
    }
}

/// A node id for `hello.node` and event ids when the config leaves it empty. 64 random
/// bits: two nodes with the same id drop each other's events as their own, and with 24
/// bits a collision somewhere in a fleet's history is even odds after ~4,800 ids.
/// 19 characters, within `config::MAX_NODE_ID_LEN`.
pub(crate) fn generate_node_id() -> String {
    format!("gw-{:016x}", rand::random::<u64>())
}

/// Serves until `shutdown` resolves, then drains: `/readyz` 503 at once, sessions closed
/// with 1001 spread over `server.drain_s`, then everything stops and this returns.
///
/// # Errors
/// The listener failed, or the TLS files could not be loaded (checked first, before
/// anything starts).
pub async fn run(
    listener: TcpListener,
    cfg: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let edge = Edge::new(&cfg.server)?;
    let node: Arc<str> = if cfg.server.node_id.is_empty() {
        generate_node_id().into()
    } else {
        cfg.server.node_id.as_str().into()
    };
    let prometheus = metrics::install();
    metrics::hot();
    let tasks = TaskTracker::new();
    let stop = CancellationToken::new();
    // The Redis link and the event stream's writer stop last: the flushers' final
    // windows are recorded on the stream, which may need Redis to write them.
    let last_tasks = TaskTracker::new();
    let last = CancellationToken::new();
    let link = match cfg.backplane {
        BackplaneKind::Local => None,
        BackplaneKind::Redis => Some(RedisLink::start(cfg.redis.clone(), &last, &last_tasks)),
    };
    let (backplane, redis): (Arc<dyn Backplane>, Option<Arc<RedisBackplane>>) = match &link {
        None => (Arc::new(Local), None),
        Some(link) => {
            let bp = RedisBackplane::new(
                node.clone(),
                cfg.redis.clone(),
                cfg.presence.clone(),
                Arc::clone(link),
                cfg.room.history_len.max(cfg.room.recovery_len),
                cfg.room.recovery_len > 0,
                Duration::from_secs(cfg.room.idle_ttl_s.max(1)),
            );
            (bp.clone(), Some(bp))
        }
    };
    let stream = if cfg.stream.enabled {
        let sink: Box<dyn stream::Sink> = match &link {
            Some(link) => Box::new(stream::redis::RedisSink::new(
                Arc::clone(link),
                &node,
                cfg.stream.shards,
                cfg.stream.max_len,
            )),
            None => Box::new(stream::file::FileSink::new(
                cfg.data.dir.join("events"),
                &node,
                cfg.stream.max_file_mb,
            )),
        };
        EventStream::start(node.clone(), cfg.stream.queue, sink, &last, &last_tasks)
    } else {
        EventStream::disabled(node.clone())
    };
    let hub = Hub::start(
        node.clone(),
        cfg.room.clone(),
        crate::hub::Encoding {
            max_frame: cfg.limits.max_out_frame_bytes,
            deflate: cfg
                .compression
                .enabled
                .then(|| crate::wire::Deflate::from(&cfg.compression)),
        },
        cfg.shard_count(),
        Outlets {
            backplane: Arc::clone(&backplane),
            stream: Arc::clone(&stream),
        },
        &stop,
        &tasks,
    );
    if let Some(bp) = &redis {
        bp.start(hub.clone(), &stop, &tasks);
    }
    let store: Arc<dyn Store> = match &link {
        None => Arc::new(LocalStore::open(
            &cfg.data.dir,
            cfg.redpacket.max_concurrent_grabs,
            cfg.redpacket.retain_s,
        )?),
        Some(link) => {
            // Give a reachable Redis a moment, so open packets get their timers.
            link.wait_up(Duration::from_secs(2)).await;
            Arc::new(RedisStore::new(
                Arc::clone(link),
                cfg.redpacket.max_concurrent_grabs,
                cfg.redpacket.retain_s,
            ))
        }
    };
    let redpackets =
        RedPackets::start(store, hub.clone(), cfg.redpacket.clone(), &stop, &tasks).await?;
    let ratelimits = match (&link, &redis) {
        (Some(link), Some(bp)) => {
            let bp = Arc::clone(bp);
            RateLimits::clustered(
                &cfg.ratelimit,
                Arc::clone(link),
                Arc::new(move || bp.live_nodes()),
            )
        }
        _ => RateLimits::new(&cfg.ratelimit),
    };
    ratelimits.start_sweeper(&stop, &tasks);
    let moderation = match &link {
        None => {
            Moderation::open_local(
                node.clone(),
                &cfg.data.dir,
                Arc::clone(&stream),
                &stop,
                &tasks,
            )
            .await?
        }
        Some(link) => {
            Moderation::open_redis(
                node.clone(),
                Arc::clone(link),
                Arc::clone(&stream),
                &stop,
                &tasks,
            )
            .await?
        }
    };
    edge.watch_certificates(&stop, &tasks);
    let shared = Arc::new(Shared {
        trusted: edge.trusted().clone(),
        ratelimits,
        redpackets,
        moderation,
        gifts: cfg
            .gifts
            .iter()
            .map(|g| (g.id.clone(), g.clone()))
            .collect(),
        auth: Auth::new(&cfg.auth.secret),
        admission: Admission::new(cfg.limits.max_conns, cfg.limits.max_conns_per_ip),
        cfg: Arc::new(cfg),
        hub,
        backplane,
        drain: CancellationToken::new(),
        sessions: TaskTracker::new(),
        prometheus,
        conn_ids: ConnIds::default(),
        stream,
    });
    tracing::info!(
        addr = %listener.local_addr()?,
        node = %node,
        shards = shared.hub.shard_count(),
        tls = edge.tls_enabled(),
        proxy_protocol = ?shared.cfg.server.proxy_protocol,
        "serving"
    );

    // Stops accepting and drains HTTP connections (not upgraded sessions: see below).
    let stop_http = CancellationToken::new();
    let app = http::router(Arc::clone(&shared));
    let mut server = tokio::spawn(edge.serve(
        listener,
        app,
        shared.cfg.limits.max_handshakes,
        stop_http.clone(),
    ));

    tokio::select! {
        res = &mut server => {
            // The accept loop ended on its own (it only ends when stopped, so it died):
            // stop everything and report it.
            stop.cancel();
            last.cancel();
            let e = match res {
                Ok(()) => std::io::Error::other("the listener stopped accepting"),
                Err(e) => std::io::Error::other(e),
            };
            return Err(ServerError::Serve(e));
        }
        _ = shutdown => {}
    }

    let window = Duration::from_secs(shared.cfg.server.drain_s);
    tracing::info!(sessions = shared.admission.open(), ?window, "draining");
    shared.drain.cancel();
    shared.sessions.close();
    if tokio::time::timeout(window + DRAIN_GRACE, shared.sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = shared.sessions.len(),
            "drain window over with sessions still open"
        );
    }
    stop_http.cancel();
    if tokio::time::timeout(DRAIN_GRACE, &mut server)
        .await
        .is_err()
    {
        tracing::warn!("HTTP server did not stop in time");
        server.abort();
    }
    stop.cancel();
    tasks.close();
    if tokio::time::timeout(DRAIN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("hub tasks did not stop in time");
    }
    last.cancel();
    last_tasks.close();
    // The stream writer bounds its own drain (a few seconds), the link stops at once.
    if tokio::time::timeout(Duration::from_secs(10), last_tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("event stream did not finish in time");
    }
    tracing::info!("drained");
    Ok(())
}
