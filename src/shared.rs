//! The state every request handler and session shares, built once by [`crate::server`].
//!
//! Its own module so that `http`, `session` and `web` depend on what they use (the
//! shared parts), not on the wiring that assembles them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admission::Admission;
use crate::auth::Auth;
use crate::backplane::Backplane;
use crate::config::{Config, GiftConfig};
use crate::edge::trust::Trusted;
use crate::hub::{ConnId, Hub};
use crate::moderation::Moderation;
use crate::ratelimit::RateLimits;
use crate::redpacket::RedPackets;

/// State every request handler and session shares.
pub struct Shared {
    pub cfg: Arc<Config>,
    pub hub: Hub,
    pub backplane: Arc<dyn Backplane>,
    pub auth: Auth,
    pub admission: Arc<Admission>,
    pub ratelimits: Arc<RateLimits>,
    pub redpackets: Arc<RedPackets>,
    /// Mutes, bans, room settings and keyword filters (local copy of the cluster's).
    pub moderation: Arc<Moderation>,
    /// The gift catalog by id.
    pub gifts: HashMap<String, GiftConfig>,
    /// `server.trusted_proxies`: whose `X-Forwarded-For` is believed.
    pub trusted: Trusted,
    /// Cancelled when the drain starts: `/readyz` turns 503, sessions schedule their close.
    pub drain: CancellationToken,
    /// Session tasks, so the drain can wait for them.
    pub sessions: TaskTracker,
    pub prometheus: PrometheusHandle,
    pub conn_ids: ConnIds,
    /// The event stream for the backend (records nothing when off).
    pub stream: Arc<crate::stream::EventStream>,
}

impl Shared {
    pub fn next_conn_id(&self) -> ConnId {
        self.conn_ids.next()
    }
}

/// Connection ids of this process: 1, 2, ... never reused.
pub struct ConnIds(AtomicU64);

impl Default for ConnIds {
    fn default() -> Self {
        Self(AtomicU64::new(1))
    }
}

impl ConnIds {
    fn next(&self) -> ConnId {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}
