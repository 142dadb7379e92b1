//! The Redis red-packet store under failure, on real `redis-server`s: grab slots that
//! free themselves when a grab never runs, packet codes answered before `busy`, keys that
//! all expire, a lost grab reply recovered with its amount, a create that is all or
//! nothing, and `redpacket_done` announced exactly once by any node — also when the node
//! that created the packet (or took its last share) is gone.
//!
//! Store-level tests reach Redis through [`Proxy`], a TCP proxy that can lose the reply
//! to one chosen request (forward it, let Redis run it, then cut the connection), truncate
//! one, and refuse reconnections for a while; gateway-level tests run real nodes.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use danmaku_gateway::config::{Config, RedisConfig};
use danmaku_gateway::protocol::{RoomId, User, now_ms};
use danmaku_gateway::redis_link::RedisLink;
use danmaku_gateway::redpacket::redis::{RedisStore, Timing};
use danmaku_gateway::redpacket::{GrabError, NewPacket, Store};
use futures_util::StreamExt;
use serde_json::{Value, json};
use support::{
    Client, Gateway, RedisCluster, RedisServer, redis_node, relax_rate_limits, wait_for,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

type Matcher = Box<dyn Fn(&[u8]) -> bool + Send + Sync>;

/// What the proxy does to the next request matching `when`.
struct Trap {
    when: Matcher,
    /// Forward all but the request's last bytes (Redis never sees it whole) instead of
    /// all of it.
    truncate: bool,
    /// After cutting, refuse new connections this long.
    refuse_for: Duration,
}

#[derive(Default)]
struct ProxyState {
    trap: Option<Trap>,
    refuse_until: Option<Instant>,
    /// Requests trapped so far.
    sprung: usize,
}

/// A TCP proxy in front of one Redis that loses a chosen reply.
struct Proxy {
    port: u16,
    state: Arc<Mutex<ProxyState>>,
}

impl Proxy {
    async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let st = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let refused = st
                    .lock()
                    .unwrap()
                    .refuse_until
                    .is_some_and(|t| Instant::now() < t);
                if refused {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                tokio::spawn(relay(client, server, Arc::clone(&st)));
            }
        });
        Proxy { port, state }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Loses the reply to the next request matching `when` (Redis runs it).
    fn lose_reply(&self, when: Matcher, refuse_for: Duration) {
        self.state.lock().unwrap().trap = Some(Trap {
            when,
            truncate: false,
            refuse_for,
        });
    }

    /// Cuts the next request matching `when` short (Redis never runs it).
    fn truncate(&self, when: Matcher, refuse_for: Duration) {
        self.state.lock().unwrap().trap = Some(Trap {
            when,
            truncate: true,
            refuse_for,
        });
    }

    fn sprung(&self) -> usize {
        self.state.lock().unwrap().sprung
    }
}

/// Relays one connection until either side closes or a trap springs.
async fn relay(client: TcpStream, server: TcpStream, st: Arc<Mutex<ProxyState>>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    // Set once a trap springs: replies from then on are swallowed.
    let cut = Arc::new(AtomicBool::new(false));
    let cut_up = Arc::clone(&cut);
    let up = async move {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            let trap = {
                let mut s = st.lock().unwrap();
                if s.trap.as_ref().is_some_and(|t| (t.when)(chunk)) {
                    s.sprung += 1;
                    s.trap.take()
                } else {
                    None
                }
            };
            let Some(trap) = trap else {
                if sw.write_all(chunk).await.is_err() {
                    return;
                }
                continue;
            };
            cut_up.store(true, Ordering::SeqCst);
            let send = if trap.truncate {
                &chunk[..chunk.len().saturating_sub(8)]
            } else {
                chunk
            };
            let _ = sw.write_all(send).await;
            // Let Redis run it, then refuse reconnections and drop both sides.
            tokio::time::sleep(Duration::from_millis(200)).await;
            st.lock().unwrap().refuse_until = Some(Instant::now() + trap.refuse_for);
            return;
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if cut.load(Ordering::SeqCst) {
                continue;
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// A request carrying `a` but not `b`.
fn with_but_not(a: &'static str, b: &'static str) -> Matcher {
    Box::new(move |c| contains(c, a) && !contains(c, b))
}

fn with(a: &'static str) -> Matcher {
    Box::new(move |c| contains(c, a))
}

fn user(id: &str, name: &str) -> User {
    User {
        id: id.into(),
        name: name.into(),
    }
}

fn room(r: &str) -> RoomId {
    RoomId::parse(r).unwrap()
}

/// A packet of `shares` shares of 100 cents each, expiring in `expires_in`.
fn new_packet(r: &str, shares: u32, expires_in: Duration) -> NewPacket {
    let now = now_ms();
    NewPacket {
        packet: RedisStore::packet_id("test"),
        room: room(r),
        sender: user("boss", "Boss"),
        total: u64::from(shares) * 100,
        shares,
        amounts: vec![100; shares as usize],
        created_at: now,
        expires_at: now + expires_in.as_millis() as u64,
    }
}

/// A store on `url`, its link up; dropping the token ends the link's supervisor.
async fn store(url: &str, cap: usize, timing: Timing) -> (RedisStore, CancellationToken) {
    let cancel = CancellationToken::new();
    let cfg = RedisConfig {
        url: url.into(),
        ..RedisConfig::default()
    };
    let link = RedisLink::start(cfg, &cancel, &TaskTracker::new());
    assert!(link.wait_up(Duration::from_secs(10)).await, "redis link");
    (RedisStore::new(link, cap, 3600).with_timing(timing), cancel)
}

/// Waits until the store reaches Redis again (after a cut).
async fn relinked(store: &RedisStore, packet: &str) {
    wait_for(
        Duration::from_secs(15),
        "the redis link to come back",
        || async { store.status(packet).await.is_ok() },
    )
    .await;
}

/// The hash tag of a packet id (`rp3-...` → `rp3`).
fn tag(packet: &str) -> &str {
    packet.split('-').next().unwrap()
}

/// PTTL of `key` (-2: missing, -1: no expiry).
fn pttl(redis: &RedisServer, key: &str) -> i64 {
    redis.cli(&["PTTL", key]).parse().unwrap()
}

/// Runs one admission whose reply is lost, so its grab never runs: a leaked slot.
async fn leak_slot(store: &RedisStore, proxy: &Proxy, packet: &str, id: &'static str) {
    let sprung = proxy.sprung();
    // The user's id is in the admission; its name (upper case) only in the grab.
    proxy.lose_reply(with_but_not(id, "LEAKER"), Duration::ZERO);
    let r = store.grab(&room("leak"), packet, &user(id, "LEAKER")).await;
    assert_eq!(r, Err(GrabError::Busy));
    assert_eq!(proxy.sprung(), sprung + 1);
    relinked(store, packet).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaked_grab_slots_free_themselves_one_by_one_under_steady_retries() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port).await;
    let ttl = Duration::from_secs(3);
    let timing = Timing {
        slot_ttl: ttl,
        ..Timing::default()
    };
    let (store, _link) = store(&proxy.url(), 2, timing).await;
    let p = new_packet("leak", 5, Duration::from_secs(60));
    let packet = p.packet.clone();
    store.create(p).await.unwrap();
    // Loads the scripts, so each trapped request is an admission itself.
    store
        .grab(&room("leak"), &packet, &user("warm", "Warm"))
        .await
        .unwrap();

    // Two admissions leak, a second apart: the cap (2) is taken.
    let first = Instant::now();
    leak_slot(&store, &proxy, &packet, "leaker1").await;
    tokio::time::sleep(Duration::from_secs(1).saturating_sub(first.elapsed())).await;
    let second = Instant::now();
    leak_slot(&store, &proxy, &packet, "leaker2").await;
    let (leak_room, patient) = (room("leak"), user("patient", "Patient"));
    let grab = || store.grab(&leak_room, &packet, &patient);
    assert_eq!(grab().await, Err(GrabError::Busy), "both leaked slots hold");

    // Steady retries: the first leak frees its slot at its own deadline, while the
    // second still holds (a per-packet TTL refreshed by each admission would keep both
    // until the last one's, or forever under load).
    let got = loop {
        match grab().await {
            Err(GrabError::Busy) => {
                assert!(
                    second.elapsed() < ttl - Duration::from_millis(400),
                    "the first leaked slot must free itself at its deadline"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => break other,
        }
    };
    assert_eq!(got.map(|g| g.amount), Ok(100));
    assert!(first.elapsed() >= ttl - Duration::from_millis(300));
    // The leakers never got a share.
    let status = store.status(&packet).await.unwrap().unwrap();
    assert_eq!(status.grabbed, 2);
    assert!(
        status
            .grabs
            .iter()
            .all(|g| !g.user.id.starts_with("leaker"))
    );
}

/// Fills every grab slot of `packet` with admissions that never grab (as nodes that died
/// after admission would).
fn fill_slots(redis: &RedisServer, packet: &str, cap: usize) {
    let key = format!("danmaku:{{{}}}:{packet}:grabbing", tag(packet));
    let deadline = (now_ms() + 60_000).to_string();
    for i in 0..cap {
        redis.cli(&["ZADD", &key, &deadline, &format!("dead-{i}")]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_slots_answer_packet_codes_before_busy() {
    let redis = RedisServer::start();
    let (store, _link) = store(&redis.url(), 2, Timing::default()).await;
    let r = room("codes");

    // Open packet: the grabber is told already_grabbed, a newcomer busy.
    let open = new_packet("codes", 3, Duration::from_secs(60));
    let open_id = open.packet.clone();
    store.create(open).await.unwrap();
    store.grab(&r, &open_id, &user("early", "E")).await.unwrap();
    fill_slots(&redis, &open_id, 2);
    assert_eq!(
        store.grab(&r, &open_id, &user("early", "E")).await,
        Err(GrabError::AlreadyGrabbed)
    );
    assert_eq!(
        store.grab(&r, &open_id, &user("new", "N")).await,
        Err(GrabError::Busy)
    );
    assert_eq!(
        store
            .grab(&room("elsewhere"), &open_id, &user("new", "N"))
            .await,
        Err(GrabError::NotFound)
    );

    // Emptied packet: packet_empty, and already_grabbed for its grabber.
    let empty = new_packet("codes", 1, Duration::from_secs(60));
    let empty_id = empty.packet.clone();
    store.create(empty).await.unwrap();
    store.grab(&r, &empty_id, &user("last", "L")).await.unwrap();
    fill_slots(&redis, &empty_id, 2);
    assert_eq!(
        store.grab(&r, &empty_id, &user("new", "N")).await,
        Err(GrabError::Empty)
    );
    assert_eq!(
        store.grab(&r, &empty_id, &user("last", "L")).await,
        Err(GrabError::AlreadyGrabbed)
    );

    // Expired packet: packet_expired, and already_grabbed (checked first) for a grabber.
    let expiring = new_packet("codes", 3, Duration::from_millis(400));
    let expiring_id = expiring.packet.clone();
    store.create(expiring).await.unwrap();
    store
        .grab(&r, &expiring_id, &user("quick", "Q"))
        .await
        .unwrap();
    fill_slots(&redis, &expiring_id, 2);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        store.grab(&r, &expiring_id, &user("new", "N")).await,
        Err(GrabError::Expired)
    );
    assert_eq!(
        store.grab(&r, &expiring_id, &user("quick", "Q")).await,
        Err(GrabError::AlreadyGrabbed)
    );
    // Unknown packet.
    assert_eq!(
        store
            .grab(&r, "rp3-x-0000000000000000", &user("new", "N"))
            .await,
        Err(GrabError::NotFound)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_of_a_packet_expires() {
    let redis = RedisServer::start();
    let (store, _link) = store(&redis.url(), 10, Timing::default()).await;
    let p = new_packet("ttl", 3, Duration::from_secs(60));
    let packet = p.packet.clone();
    store.create(p).await.unwrap();
    store
        .grab(&room("ttl"), &packet, &user("u1", "U1"))
        .await
        .unwrap();
    let key = |part: &str| format!("danmaku:{{{}}}:{packet}:{part}", tag(&packet));
    let meta = pttl(&redis, &key("meta"));
    assert!(meta > 0, "meta expires: {meta}");
    for part in ["amounts", "grabs"] {
        let t = pttl(&redis, &key(part));
        assert!(t > 0, "{part} must expire, PTTL {t}");
        assert!(t <= meta + 5, "{part} outlives meta: {t} > {meta}");
    }
    assert!(
        (meta - pttl(&redis, &key("grabs"))).abs() < 2_000,
        "grabs expire with the packet"
    );
    let listing = pttl(&redis, "danmaku:rp:room:ttl");
    assert!(listing > 0, "the room listing expires: {listing}");
    // And nothing else of it lingers forever.
    store
        .grab(&room("ttl"), &packet, &user("u2", "U2"))
        .await
        .unwrap();
    for key in redis
        .cli(&["--scan", "--pattern", &format!("*{packet}*")])
        .lines()
    {
        assert!(pttl(&redis, key) > 0, "{key} has no expiry");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_grab_reply_is_recovered_with_its_amount_and_done() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port).await;
    let (store, _link) = store(&proxy.url(), 10, Timing::default()).await;
    let r = room("lost");
    let p = new_packet("lost", 2, Duration::from_secs(60));
    let packet = p.packet.clone();
    store.create(p).await.unwrap();
    store
        .grab(&r, &packet, &user("warm", "Warm"))
        .await
        .unwrap();

    // The last share's grab runs in Redis; its reply is lost on the way back.
    proxy.lose_reply(with("LOST-NAME"), Duration::from_millis(300));
    let got = store.grab(&r, &packet, &user("lost", "LOST-NAME")).await;
    assert_eq!(proxy.sprung(), 1);
    let got = got.expect("a grab that landed is acknowledged, not busy");
    assert_eq!(got.amount, 100);
    let done = got
        .done
        .expect("it took the last share: this caller announces");
    assert_eq!(
        (done.grabbed, done.total_grabbed, done.expired),
        (2, 200, false)
    );

    let status = store.status(&packet).await.unwrap().unwrap();
    assert_eq!(status.grabbed, 2);
    assert!(status.grabs.iter().any(|g| g.user.id == "lost"));
    assert_eq!(
        redis.cli(&["XLEN", &format!("danmaku:settlement:{{{}}}", tag(&packet))]),
        "2",
        "one settlement entry per grab"
    );
    // Retries see the grab; nobody announces the packet a second time.
    assert_eq!(
        store.grab(&r, &packet, &user("lost", "LOST-NAME")).await,
        Err(GrabError::AlreadyGrabbed)
    );
    assert_eq!(store.expire(&packet).await, Ok(None));
    assert!(store.sweep().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_grab_nobody_announced_is_announced_by_a_sweep() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port).await;
    let timing = Timing {
        finish_grace: Duration::from_millis(500),
        recover_for: Duration::from_millis(300),
        ..Timing::default()
    };
    let (store, _link) = store(&proxy.url(), 10, timing).await;
    let r = room("orphan");
    let p = new_packet("orphan", 2, Duration::from_secs(60));
    let packet = p.packet.clone();
    store.create(p).await.unwrap();
    store
        .grab(&r, &packet, &user("warm", "Warm"))
        .await
        .unwrap();

    // The last grab runs, its reply is lost and Redis stays out of reach longer than
    // the grabber tries: it answers busy and cannot claim the announcement.
    proxy.lose_reply(with("GONE-NAME"), Duration::from_secs(2));
    let got = store.grab(&r, &packet, &user("gone", "GONE-NAME")).await;
    assert_eq!(got, Err(GrabError::Busy));
    relinked(&store, &packet).await;
    let status = store.status(&packet).await.unwrap().unwrap();
    assert_eq!(status.remaining, 0, "the grab did land");

    // A sweep (any node's) claims it once the grace is over, exactly once.
    let deadline = Instant::now() + Duration::from_secs(5);
    let finished = loop {
        let f = store.sweep().await;
        if !f.is_empty() {
            break f;
        }
        assert!(Instant::now() < deadline, "no sweep announced the packet");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0].packet, packet);
    assert_eq!(finished[0].room, r);
    let d = finished[0].done;
    assert_eq!((d.grabbed, d.total_grabbed, d.expired), (2, 200, false));
    assert!(store.sweep().await.is_empty());
    assert_eq!(store.expire(&packet).await, Ok(None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_claimed_once_among_racing_stores() {
    let redis = RedisServer::start();
    let mut stores = Vec::new();
    for _ in 0..3 {
        stores.push(store(&redis.url(), 10, Timing::default()).await);
    }
    let mut packets = Vec::new();
    for i in 0..20 {
        let p = new_packet("race", 3, Duration::from_millis(300));
        packets.push(p.packet.clone());
        stores[i % 3].0.create(p).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Three nodes sweep at once, and creators' timers fire too.
    let (a, b, c) = tokio::join!(stores[0].0.sweep(), stores[1].0.sweep(), async {
        let mut won = Vec::new();
        for p in &packets {
            if let Some(d) = stores[2].0.expire(p).await.unwrap() {
                won.push(d);
            }
        }
        won
    });
    let rest = stores[2].0.sweep().await;
    assert_eq!(
        a.len() + b.len() + c.len() + rest.len(),
        packets.len(),
        "every packet announced exactly once"
    );
    for f in a.iter().chain(&b).chain(&rest) {
        assert!(f.done.expired);
        assert_eq!(f.room, room("race"));
    }
    // The open indexes are empty again.
    for g in 0..16 {
        assert_eq!(
            redis.cli(&["ZCARD", &format!("danmaku:{{rp{g}}}:open")]),
            "0"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_cut_short_leaves_nothing_unexpiring() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.port).await;
    let timing = Timing {
        recover_for: Duration::from_millis(300),
        ..Timing::default()
    };
    let (store, _link) = store(&proxy.url(), 10, timing).await;
    let mut p = new_packet("cut", 50, Duration::from_secs(60));
    p.sender = user("boss", "CUT-SENDER");
    let packet = p.packet.clone();

    // The request carrying the packet's data reaches Redis only in part.
    proxy.truncate(with("CUT-SENDER"), Duration::from_secs(1));
    assert!(store.create(p.clone()).await.is_err());
    assert_eq!(proxy.sprung(), 1);
    relinked(&store, &packet).await;
    let keys = redis.cli(&["--scan", "--pattern", &format!("*{packet}*")]);
    for key in keys.lines().filter(|k| !k.is_empty()) {
        assert!(
            pttl(&redis, key) > 0,
            "{key} has no expiry after a failed create"
        );
    }
    assert!(store.status(&packet).await.unwrap().is_none());
    assert!(store.open_in(&room("cut")).await.unwrap().is_empty());

    // Created again: whole, listed, indexed for expiry.
    store.create(p).await.unwrap();
    let open = store.open_in(&room("cut")).await.unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].remaining, 50);
    let open_key = format!("danmaku:{{{}}}:open", tag(&packet));
    assert_ne!(redis.cli(&["ZSCORE", &open_key, &packet]), "");
    for key in redis
        .cli(&["--scan", "--pattern", &format!("*{packet}*")])
        .lines()
    {
        assert!(pttl(&redis, key) > 0, "{key} has no expiry");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn largest_packet_is_created_whole_by_one_script() {
    let redis = RedisServer::start();
    let (store, _link) = store(&redis.url(), 10, Timing::default()).await;
    let mut p = new_packet(
        "big",
        danmaku_gateway::redpacket::MAX_SHARES,
        Duration::from_secs(60),
    );
    p.amounts = (1..=u64::from(p.shares)).collect();
    p.total = p.amounts.iter().sum();
    let packet = p.packet.clone();
    store.create(p).await.unwrap();
    let status = store.status(&packet).await.unwrap().unwrap();
    assert_eq!(status.remaining, danmaku_gateway::redpacket::MAX_SHARES);
    // Pushed in order: the first share is the first amount.
    let g = store
        .grab(&room("big"), &packet, &user("first", "F"))
        .await
        .unwrap();
    assert_eq!(g.amount, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeps_on_a_cluster_announce_each_expiry_once() {
    // Redis's own cluster-node-timeout (no override).
    let cluster = RedisCluster::start_with(&[]);
    let url = cluster.url();
    let mut stores = Vec::new();
    for _ in 0..2 {
        let cancel = CancellationToken::new();
        let cfg = RedisConfig {
            url: url.clone(),
            cluster: true,
            ..RedisConfig::default()
        };
        let link = RedisLink::start(cfg, &cancel, &TaskTracker::new());
        assert!(link.wait_up(Duration::from_secs(10)).await, "cluster link");
        stores.push((RedisStore::new(link, 10, 3600), cancel));
    }
    // Enough packets to land in most of the 16 groups, so on every master.
    let mut packets = Vec::new();
    for _ in 0..40 {
        let p = new_packet("cl", 2, Duration::from_millis(500));
        packets.push(p.packet.clone());
        stores[0].0.create(p).await.unwrap();
    }
    let one = &packets[0];
    let g = stores[1]
        .0
        .grab(&room("cl"), one, &user("u", "U"))
        .await
        .unwrap();
    assert_eq!(g.amount, 100);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (a, b) = tokio::join!(stores[0].0.sweep(), stores[1].0.sweep());
    let mut announced: Vec<&str> = a.iter().chain(&b).map(|f| f.packet.as_str()).collect();
    announced.sort_unstable();
    let mut want: Vec<&str> = packets.iter().map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(announced, want, "each packet announced once");
    let done = a.iter().chain(&b).find(|f| &f.packet == one).unwrap().done;
    assert_eq!(
        (done.grabbed, done.total_grabbed, done.expired),
        (1, 100, true)
    );
    assert!(stores[0].0.sweep().await.is_empty());
    assert!(stores[0].0.open_in(&room("cl")).await.unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------
// Whole nodes.

fn relaxed(cfg: &mut Config) {
    relax_rate_limits(cfg);
}

/// Subscribers of `room`'s channel (one per gateway node with members there).
fn numsub(redis: &RedisServer, room: &str) -> u64 {
    let out = redis.cli(&["PUBSUB", "NUMSUB", &format!("danmaku:room:{room}")]);
    out.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected NUMSUB output {out:?}"))
}

async fn create_on(gw: &Gateway, room: &str, shares: u32, expires_in_s: u64) -> String {
    let (st, created) = gw
        .api(
            "POST",
            &format!("/api/v1/rooms/{room}/redpackets"),
            Some(&json!({"total": shares * 100, "shares": shares,
                "sender": {"id":"boss","name":"Boss"}, "expires_in_s": expires_in_s})),
        )
        .await;
    assert_eq!(st, 201, "{created}");
    created["packet"].as_str().unwrap().to_string()
}

/// Every event of `room` that `c` receives for `d`.
async fn events_for(c: &mut Client, room: &str, d: Duration) -> Vec<Value> {
    let until = tokio::time::Instant::now() + d;
    let mut events = Vec::new();
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(until, c.ws.next()).await {
        let Some(v) = c.decode(&msg) else { continue };
        if v["op"] == "batch" && v["room"] == room {
            events.extend(v["events"].as_array().unwrap().iter().cloned());
        }
    }
    events
}

fn dones<'a>(events: &'a [Value], packet: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["type"] == "redpacket_done" && e["packet"] == packet)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_announced_after_its_creator_is_gone() {
    let redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", |cfg| {
        relaxed(cfg);
        cfg.server.drain_s = 0;
    })
    .await;
    let b = redis_node(&redis.url(), "node-b", relaxed).await;
    let room = "orphaned";
    let mut watcher = b.user("watcher", "").await;
    watcher.join(room).await;
    wait_for(Duration::from_secs(10), "B subscribed", || async {
        numsub(&redis, room) == 1
    })
    .await;
    let created = Instant::now();
    let packet = create_on(&a, room, 3, 4).await;
    watcher
        .events_until(room, |ev| ev.iter().any(|e| e["type"] == "redpacket"))
        .await;
    // The creator goes away before the expiry its timer was armed for.
    a.stop().await;
    assert!(
        created.elapsed() < Duration::from_secs(4),
        "node A must be gone before the packet expires"
    );
    // Expiry at 4 s, then a sweep within 2 s (frames may be seconds apart meanwhile).
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut events = Vec::new();
    while dones(&events, &packet).is_empty() {
        let msg = tokio::time::timeout_at(until, watcher.ws.next())
            .await
            .expect("no redpacket_done after the creator left")
            .expect("stream ended")
            .expect("socket error");
        if let Some(v) = watcher.decode(&msg)
            && v["op"] == "batch"
            && v["room"] == room
        {
            events.extend(v["events"].as_array().unwrap().iter().cloned());
        }
    }
    let done = dones(&events, &packet)[0].clone();
    assert_eq!(done["expired"], true, "{done}");
    assert_eq!(done["grabbed"], 0, "{done}");
    assert!(created.elapsed() >= Duration::from_secs(4));
    let (_, status) = b
        .api("GET", &format!("/api/v1/redpackets/{packet}"), None)
        .await;
    assert_eq!(status["expired"], true, "{status}");
    // The room listing is cleaned up too.
    assert_eq!(
        redis.cli(&["SISMEMBER", &format!("danmaku:rp:room:{room}"), &packet]),
        "0"
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_redpacket_done_across_three_nodes() {
    let redis = RedisServer::start();
    let a = redis_node(&redis.url(), "node-a", relaxed).await;
    let b = redis_node(&redis.url(), "node-b", relaxed).await;
    let c = redis_node(&redis.url(), "node-c", relaxed).await;
    let room = "once";
    let mut viewers = Vec::new();
    for (gw, name) in [(&a, "va"), (&b, "vb"), (&c, "vc")] {
        let mut v = gw.user(name, "").await;
        v.join(room).await;
        viewers.push(v);
    }
    wait_for(Duration::from_secs(10), "all nodes subscribed", || async {
        numsub(&redis, room) == 3
    })
    .await;
    // One packet expires (A's timer and three sweeps race for it); one is emptied by a
    // grab on B (the grabber announces; sweeps must not repeat it).
    let expiring = create_on(&a, room, 3, 1).await;
    let emptied = create_on(&a, room, 1, 60).await;
    let grab = viewers[1]
        .call(json!({"op":"grab","room":room,"packet":emptied}), 1)
        .await;
    assert_eq!(grab["op"], "ack", "{grab}");
    // Expiry at 1 s; sweeps run every 1–2 s on each node: several rounds in 6 s.
    let per_viewer = futures_util::future::join_all(
        viewers
            .iter_mut()
            .map(|v| events_for(v, room, Duration::from_secs(6))),
    )
    .await;
    for (i, events) in per_viewer.iter().enumerate() {
        let e = dones(events, &expiring);
        assert_eq!(e.len(), 1, "viewer {i}: expiry announced once: {e:?}");
        assert_eq!(e[0]["expired"], true);
        let g = dones(events, &emptied);
        assert_eq!(
            g.len(),
            1,
            "viewer {i}: emptied packet announced once: {g:?}"
        );
        assert_eq!(g[0]["expired"], false);
        assert_eq!(g[0]["grabbed"], 1);
    }
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

/// `expired` in a packet's status means "ended by expiry": a packet emptied before its
/// deadline does not read as expired after it; one past it with shares left does, even
/// before a sweep has marked it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_expired_only_for_packets_that_ended_by_expiry() {
    let redis = RedisServer::start();
    let (store, _link) = store(&redis.url(), 10, Timing::default()).await;
    let r = room("exp");
    let emptied = new_packet("exp", 1, Duration::from_millis(300));
    let emptied_id = emptied.packet.clone();
    store.create(emptied).await.unwrap();
    store.grab(&r, &emptied_id, &user("a", "A")).await.unwrap();
    let left = new_packet("exp", 2, Duration::from_millis(300));
    let left_id = left.packet.clone();
    store.create(left).await.unwrap();
    store.grab(&r, &left_id, &user("a", "A")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = store.status(&emptied_id).await.unwrap().unwrap();
    assert_eq!((s.remaining, s.expired), (0, false), "{s:?}");
    let s = store.status(&left_id).await.unwrap().unwrap();
    assert_eq!((s.remaining, s.expired), (1, true), "{s:?}");
}
