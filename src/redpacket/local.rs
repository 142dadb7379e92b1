//! The embedded red-packet store: packets in memory, every create and grab in the
//! fsynced journal before it is acknowledged, state rebuilt from the journal at start.
//!
//! A grab reserves its share under the lock (the user is marked, an amount popped, the
//! in-flight count raised), releases the lock, and hands its record to the journal with
//! a [`Settle`]. The journal writer settles it at the commit point, under the lock again:
//! on success the grab is recorded, on a journal failure the reservation is undone; and
//! either way, if nothing is left to happen to the packet, it is finished. So two
//! connections of one user racing each other see the mark of the first, and no lock is
//! held across the fsync.
//!
//! Grabs and `redpacket_done` are announced under the lock, where they commit (an expiry
//! too), so a room sees a packet's events in commit order and `redpacket_done` last. And
//! a grab whose caller stops waiting (its connection closed) is settled all the same,
//! exactly once: by the writer if its record was queued, else by the `Settle` being
//! dropped unwritten, which undoes it. Never both: a reservation undone although its
//! record reached the journal would hand its share out twice.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::oneshot;

use super::journal::{Commit, Journal, JournalError, Record};
use super::{
    Announce, Done, GrabError, GrabRecord, Grabbed, NewPacket, PacketStatus, Store, StoreError,
};
use crate::protocol::{OpenPacket, RoomId, User, now_ms};

struct Packet {
    room: RoomId,
    sender: User,
    total: u64,
    shares: u32,
    /// Shares not yet handed out (popped from the end).
    remaining: Vec<u64>,
    /// Users holding a share, including grabs still being journaled.
    holders: HashSet<String>,
    /// Recorded (durable) grabs, in order.
    grabs: Vec<GrabRecord>,
    in_flight: usize,
    expires_at: u64,
    /// The deadline has passed (its expiry ran, or it had passed at replay): no new grabs.
    expired: bool,
    /// Set once `redpacket_done` is due (last share recorded, or expiry).
    finished: bool,
}

impl Packet {
    fn new(
        room: RoomId,
        sender: User,
        total: u64,
        shares: u32,
        amounts: Vec<u64>,
        expires_at: u64,
    ) -> Self {
        Packet {
            room,
            sender,
            total,
            shares,
            remaining: amounts,
            holders: HashSet::new(),
            grabs: Vec::new(),
            in_flight: 0,
            expires_at,
            expired: false,
            finished: false,
        }
    }

    fn is_expired(&self, now: u64) -> bool {
        self.expired || now >= self.expires_at
    }

    /// Whether the packet ended by expiry: past its deadline with shares left. One that
    /// handed out every share ended emptied, however late it is asked.
    fn ended_by_expiry(&self, now: u64) -> bool {
        self.is_expired(now) && !self.remaining.is_empty()
    }

    fn done(&self) -> Done {
        Done {
            grabbed: self.grabs.len() as u32,
            total_grabbed: self.grabs.iter().map(|g| g.amount).sum(),
            // A grab in flight at the deadline may still take the last share.
            expired: self.expired && !self.remaining.is_empty(),
        }
    }

    /// Finishes the packet if nothing is left to happen to it; returns how it ended.
    fn try_finish(&mut self) -> Option<Done> {
        if !self.finished && self.in_flight == 0 && (self.remaining.is_empty() || self.expired) {
            self.finished = true;
            return Some(self.done());
        }
        None
    }
}

#[derive(Default)]
struct State {
    packets: HashMap<String, Packet>,
}

type Shared = Arc<Mutex<State>>;

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().expect("store lock")
}

/// Announces nothing: for the [`Store`] methods that take no [`Announce`].
struct Silent;

impl Announce for Silent {
    fn grab(&self, _: &RoomId, _: &str, _: &User, _: u64) {}
    fn done(&self, _: &RoomId, _: &str, _: Done) {}
}

pub struct LocalStore {
    journal: Journal,
    state: Shared,
    max_concurrent: usize,
    retain_ms: u64,
}

impl LocalStore {
    /// Opens the journal under `dir` and replays it.
    ///
    /// # Errors
    /// The journal cannot be opened, read or repaired, or is corrupt.
    pub fn open(dir: &Path, max_concurrent: usize, retain_s: u64) -> Result<Self, JournalError> {
        // Packets past retention are forgotten by the replay anyway; dropping their
        // records keeps every start's replay to one retention period's worth.
        let (journal, records) = Journal::open_compacted(dir, retain_s * 1000, now_ms())?;
        Ok(Self::with_journal(
            journal,
            records,
            max_concurrent,
            retain_s,
        ))
    }

    fn with_journal(
        journal: Journal,
        records: Vec<Record>,
        max_concurrent: usize,
        retain_s: u64,
    ) -> Self {
        let store = Self {
            journal,
            state: Shared::default(),
            max_concurrent,
            retain_ms: retain_s * 1000,
        };
        store.replay(records);
        store
    }

    fn replay(&self, records: Vec<Record>) {
        let now = now_ms();
        let mut st = lock(&self.state);
        // Packets whose expiry ran before the restart (and was announced then).
        let mut expiry_ran = HashSet::new();
        for record in records {
            match record {
                Record::Create {
                    packet,
                    room,
                    sender,
                    total,
                    shares,
                    amounts,
                    expires_at,
                    ..
                } => {
                    let Ok(room) = RoomId::parse(&room) else {
                        continue;
                    };
                    st.packets.insert(
                        packet,
                        Packet::new(room, sender, total, shares, amounts, expires_at),
                    );
                }
                Record::Grab {
                    packet,
                    user,
                    amount,
                    ..
                } => {
                    let Some(p) = st.packets.get_mut(&packet) else {
                        continue;
                    };
                    // Grabs name their amount, so replay order does not matter.
                    if let Some(i) = p.remaining.iter().position(|&a| a == amount)
                        && p.holders.insert(user.id.clone())
                    {
                        p.remaining.swap_remove(i);
                        p.grabs.push(GrabRecord { user, amount });
                    }
                }
                Record::Expired { packet, .. } => {
                    expiry_ran.insert(packet);
                }
            }
        }
        let retain = self.retain_ms;
        st.packets.retain(|_, p| p.expires_at + retain > now);
        for (id, p) in &mut st.packets {
            let ran = expiry_ran.contains(id);
            if ran || p.is_expired(now) {
                p.expired = true;
            }
            // Done events of the past were announced before the restart: at the last
            // share, or by the expiry. A packet that expired while the gateway was down
            // stays unfinished, so its timer, armed at start, fires at once and
            // announces its end to the room.
            p.finished = p.remaining.is_empty() || ran;
        }
    }

    /// Forgets finished packets past their retention.
    fn prune(st: &mut State, retain_ms: u64, now: u64) {
        st.packets
            .retain(|_, p| !p.finished || p.expires_at + retain_ms > now);
    }

    /// Takes a share of `packet` for `user` under the lock, pending the journal.
    fn reserve(
        &self,
        room: &RoomId,
        packet: &str,
        user: &User,
        now: u64,
    ) -> Result<u64, GrabError> {
        let mut st = lock(&self.state);
        let p = match st.packets.get_mut(packet) {
            Some(p) if p.room == *room => p,
            _ => return Err(GrabError::NotFound),
        };
        if p.holders.contains(&user.id) {
            return Err(GrabError::AlreadyGrabbed);
        }
        if p.is_expired(now) {
            return Err(GrabError::Expired);
        }
        if p.remaining.is_empty() {
            return Err(GrabError::Empty);
        }
        if p.in_flight >= self.max_concurrent {
            return Err(GrabError::Busy);
        }
        let Some(amount) = p.remaining.pop() else {
            return Err(GrabError::Empty);
        };
        p.holders.insert(user.id.clone());
        p.in_flight += 1;
        Ok(amount)
    }
}

/// A reserved share on its way through the journal, settled exactly once: by the
/// journal writer at the commit point ([`Commit`]), or, if its record never reached the
/// writer, undone when dropped.
struct Settle {
    state: Shared,
    room: RoomId,
    packet: String,
    user: User,
    amount: u64,
    announce: Arc<dyn Announce>,
    reply: Option<oneshot::Sender<Result<Grabbed, GrabError>>>,
    settled: bool,
}

impl Settle {
    /// Records the grab (`durable`) or puts the share back, and finishes the packet if
    /// that was the last thing pending; announces both in commit order.
    fn settle(&mut self, durable: bool) -> Option<Done> {
        self.settled = true;
        let mut st = lock(&self.state);
        // A packet with a grab in flight is never finished, so never pruned.
        let Some(p) = st.packets.get_mut(&self.packet) else {
            tracing::error!(packet = %self.packet, "settling a grab of a packet that is gone");
            return None;
        };
        p.in_flight -= 1;
        if durable {
            p.grabs.push(GrabRecord {
                user: self.user.clone(),
                amount: self.amount,
            });
            self.announce
                .grab(&self.room, &self.packet, &self.user, self.amount);
        } else {
            p.remaining.push(self.amount);
            p.holders.remove(&self.user.id);
        }
        // An expiry that came while this grab was in flight left the finish to it.
        let done = p.try_finish();
        if let Some(d) = done {
            self.announce.done(&self.room, &self.packet, d);
        }
        done
    }
}

impl Commit for Settle {
    fn commit(mut self: Box<Self>, result: Result<(), JournalError>) {
        let answer = match result {
            Ok(()) => {
                let done = self.settle(true);
                Ok(Grabbed {
                    amount: self.amount,
                    done,
                })
            }
            Err(e) => {
                // Not durable, so not granted: the share goes back.
                self.settle(false);
                Err(GrabError::Store(e.to_string()))
            }
        };
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(answer);
        }
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        // Unwinding, it is unknown whether the record was written: keep the share
        // reserved (the packet then never finishes) rather than risk handing it out twice.
        if !self.settled && !std::thread::panicking() {
            self.settle(false);
        }
    }
}

#[async_trait]
impl Store for LocalStore {
    async fn create(&self, p: NewPacket) -> Result<(), StoreError> {
        self.journal
            .append(Record::Create {
                packet: p.packet.clone(),
                room: p.room.to_string(),
                sender: p.sender.clone(),
                total: p.total,
                shares: p.shares,
                amounts: p.amounts.clone(),
                created_at: p.created_at,
                expires_at: p.expires_at,
            })
            .await
            .map_err(|e| StoreError(e.to_string()))?;
        let mut st = lock(&self.state);
        Self::prune(&mut st, self.retain_ms, now_ms());
        st.packets.insert(
            p.packet,
            Packet::new(p.room, p.sender, p.total, p.shares, p.amounts, p.expires_at),
        );
        Ok(())
    }

    /// Announces nothing: see [`Store::grab_announced`].
    async fn grab(&self, room: &RoomId, packet: &str, user: &User) -> Result<Grabbed, GrabError> {
        self.grab_announced(room, packet, user, Arc::new(Silent))
            .await
    }

    async fn grab_announced(
        &self,
        room: &RoomId,
        packet: &str,
        user: &User,
        announce: Arc<dyn Announce>,
    ) -> Result<Grabbed, GrabError> {
        let now = now_ms();
        let amount = self.reserve(room, packet, user, now)?;
        let (reply, answer) = oneshot::channel();
        let settle = Settle {
            state: Arc::clone(&self.state),
            room: room.clone(),
            packet: packet.to_string(),
            user: user.clone(),
            amount,
            announce,
            reply: Some(reply),
            settled: false,
        };
        let record = Record::Grab {
            packet: packet.to_string(),
            room: room.to_string(),
            user: user.clone(),
            amount,
            ts: now,
        };
        // From here the journal owns the reservation: if this future is dropped, the
        // writer (or the dropped `Settle`) still settles it.
        self.journal
            .submit(record, Box::new(settle))
            .await
            .map_err(|e| GrabError::Store(e.to_string()))?;
        answer
            .await
            .unwrap_or_else(|_| Err(GrabError::Store(JournalError::Stopped.to_string())))
    }

    /// Announces nothing: see [`Store::expire_announced`].
    async fn expire(&self, packet: &str) -> Result<Option<Done>, StoreError> {
        self.expire_announced(packet, Arc::new(Silent)).await
    }

    async fn expire_announced(
        &self,
        packet: &str,
        announce: Arc<dyn Announce>,
    ) -> Result<Option<Done>, StoreError> {
        let done = {
            let mut st = lock(&self.state);
            let Some(p) = st.packets.get_mut(packet) else {
                return Ok(None);
            };
            if p.finished {
                return Ok(None);
            }
            p.expired = true;
            // With grabs in flight, the last of them finishes (and announces) it.
            let done = p.try_finish();
            if let Some(d) = done {
                announce.done(&p.room, packet, d);
            }
            done
        };
        // So a restart knows the end was announced. Only when this call announced it:
        // with grabs in flight the last of them does, and should the process die before
        // that grab is journaled, a replay that had read "expired" here would mark the
        // packet finished with nobody ever announcing it. Without the record, a restart
        // finds it past expiry and unfinished, and announces it (perhaps again, which
        // beats never). The same holds if this append fails.
        if done.is_some() {
            let record = Record::Expired {
                packet: packet.to_string(),
                ts: now_ms(),
            };
            if let Err(e) = self.journal.append(record).await {
                tracing::warn!(packet, error = %e, "journaling an expiry failed");
            }
        }
        Ok(done)
    }

    async fn status(&self, packet: &str) -> Result<Option<PacketStatus>, StoreError> {
        let now = now_ms();
        let st = lock(&self.state);
        Ok(st.packets.get(packet).map(|p| {
            let done = p.done();
            PacketStatus {
                packet: packet.to_string(),
                room: p.room.to_string(),
                total: p.total,
                shares: p.shares,
                grabbed: done.grabbed,
                total_grabbed: done.total_grabbed,
                remaining: p.shares - done.grabbed,
                remaining_amount: p.total - done.total_grabbed,
                expired: p.ended_by_expiry(now),
                expires_at: p.expires_at,
                grabs: p.grabs.clone(),
            }
        }))
    }

    async fn open_in(&self, room: &RoomId) -> Result<Vec<OpenPacket>, StoreError> {
        let now = now_ms();
        let st = lock(&self.state);
        let mut open: Vec<OpenPacket> = st
            .packets
            .iter()
            .filter(|(_, p)| p.room == *room && !p.remaining.is_empty() && !p.is_expired(now))
            .map(|(id, p)| OpenPacket {
                packet: id.clone(),
                user: p.sender.clone(),
                total: p.total,
                shares: p.shares,
                expires_at: p.expires_at,
                remaining: p.remaining.len() as u32,
            })
            .collect();
        open.sort_by_key(|p| p.expires_at);
        Ok(open)
    }

    async fn open_packets(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let st = lock(&self.state);
        Ok(st
            .packets
            .iter()
            .filter(|(_, p)| !p.finished)
            .map(|(id, p)| (id.clone(), p.expires_at))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::journal::faults::{Faults, scratch};
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    enum Event {
        Grab(String, u64),
        Done(Done),
    }

    /// Records announcements in the order they are made.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<Event>>);

    impl Recorder {
        fn events(&self) -> Vec<Event> {
            self.0.lock().unwrap().clone()
        }
    }

    impl Announce for Recorder {
        fn grab(&self, _: &RoomId, _: &str, user: &User, amount: u64) {
            self.0
                .lock()
                .unwrap()
                .push(Event::Grab(user.id.clone(), amount));
        }

        fn done(&self, _: &RoomId, _: &str, done: Done) {
            self.0.lock().unwrap().push(Event::Done(done));
        }
    }

    fn room() -> RoomId {
        RoomId::parse("r").unwrap()
    }

    fn user(id: &str) -> User {
        User {
            id: id.into(),
            name: id.into(),
        }
    }

    fn open(dir: &Path, faults: &Arc<Faults>) -> LocalStore {
        let (journal, records) = Journal::open_faulty(dir, faults).unwrap();
        LocalStore::with_journal(journal, records, 1000, 3600)
    }

    async fn create(store: &LocalStore, packet: &str, amounts: Vec<u64>, expires_at: u64) {
        store
            .create(NewPacket {
                packet: packet.into(),
                room: room(),
                sender: user("boss"),
                total: amounts.iter().sum(),
                shares: amounts.len() as u32,
                amounts,
                created_at: now_ms(),
                expires_at,
            })
            .await
            .unwrap();
    }

    fn with<R>(store: &LocalStore, packet: &str, f: impl FnOnce(&mut Packet) -> R) -> R {
        f(lock(&store.state).packets.get_mut(packet).unwrap())
    }

    /// Waits until `cond` holds of the packet.
    async fn until(store: &LocalStore, packet: &str, cond: impl Fn(&Packet) -> bool) {
        for _ in 0..2000 {
            if with(store, packet, |p| cond(p)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("condition never held");
    }

    fn grab_of(
        store: &Arc<LocalStore>,
        id: &str,
        rec: &Arc<Recorder>,
    ) -> tokio::task::JoinHandle<Result<Grabbed, GrabError>> {
        let (store, rec, id) = (Arc::clone(store), Arc::clone(rec), id.to_string());
        tokio::spawn(async move { store.grab_announced(&room(), "p", &user(&id), rec).await })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_expiry_during_a_failing_grab_still_finishes_the_packet() {
        let dir = scratch("expire-fail");
        let faults = Arc::new(Faults::default());
        let store = Arc::new(open(&dir, &faults));
        create(&store, "p", vec![5, 5], now_ms() + 60_000).await;
        let rec = Arc::new(Recorder::default());
        let gate = faults.hold();
        faults.journal().fail_sync = true;
        let grab = grab_of(&store, "a", &rec);
        until(&store, "p", |p| p.in_flight == 1).await;
        let (s, r) = (Arc::clone(&store), Arc::clone(&rec));
        let expiry = tokio::spawn(async move { s.expire_announced("p", r).await });
        until(&store, "p", |p| p.expired).await;
        drop(gate);
        assert!(matches!(grab.await.unwrap(), Err(GrabError::Store(_))));
        // The expiry found a grab in flight and left the finish to it; its failure
        // finishes the packet, and announces it.
        assert_eq!(expiry.await.unwrap().unwrap(), None);
        let done = Done {
            grabbed: 0,
            total_grabbed: 0,
            expired: true,
        };
        assert_eq!(rec.events(), vec![Event::Done(done)]);
        assert!(store.open_packets().await.unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_grab_whose_caller_stops_waiting_is_still_settled() {
        let dir = scratch("dropped");
        let faults = Arc::new(Faults::default());
        let store = open(&dir, &faults);
        create(&store, "p", vec![3, 4], now_ms() + 60_000).await;
        let rec = Arc::new(Recorder::default());
        let (r, a, b) = (room(), user("a"), user("b"));
        store
            .grab_announced(&r, "p", &a, rec.clone())
            .await
            .unwrap();
        // b takes the last share, but its connection closes while the journal syncs.
        let gate = faults.hold();
        let b = store.grab_announced(&r, "p", &b, rec.clone());
        assert!(
            tokio::time::timeout(Duration::from_millis(50), b)
                .await
                .is_err()
        );
        assert_eq!(with(&store, "p", |p| p.in_flight), 1);
        drop(gate);
        until(&store, "p", |p| p.in_flight == 0).await;
        // Its record was queued, so the writer committed it: recorded, announced, and
        // the packet finished.
        let st = store.status("p").await.unwrap().unwrap();
        assert_eq!(st.grabbed, 2);
        let events = rec.events();
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(matches!(&events[1], Event::Grab(u, _) if u == "b"));
        assert_eq!(
            events[2],
            Event::Done(Done {
                grabbed: 2,
                total_grabbed: 7,
                expired: false
            })
        );
        drop(store);
        // And the journal agrees.
        let store = open(&dir, &faults);
        assert_eq!(store.status("p").await.unwrap().unwrap().grabbed, 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_reservation_dropped_unwritten_is_undone_and_finishes_an_expired_packet() {
        let dir = scratch("unwritten");
        let faults = Arc::new(Faults::default());
        let store = open(&dir, &faults);
        create(&store, "p", vec![3, 4], now_ms() + 60_000).await;
        let amount = store.reserve(&room(), "p", &user("a"), now_ms()).unwrap();
        store.expire("p").await.unwrap();
        let rec = Arc::new(Recorder::default());
        drop(Settle {
            state: Arc::clone(&store.state),
            room: room(),
            packet: "p".into(),
            user: user("a"),
            amount,
            announce: rec.clone(),
            reply: None,
            settled: false,
        });
        with(&store, "p", |p| {
            assert_eq!((p.in_flight, p.remaining.len(), p.finished), (0, 2, true));
            assert!(p.holders.is_empty());
        });
        assert_eq!(
            rec.events(),
            vec![Event::Done(Done {
                grabbed: 0,
                total_grabbed: 0,
                expired: true
            })]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn grabs_and_done_are_announced_in_commit_order() {
        let dir = scratch("order");
        let faults = Arc::new(Faults::default());
        let store = Arc::new(open(&dir, &faults));
        for round in 0..20 {
            let packet = format!("p{round}");
            create(&store, &packet, vec![1; 30], now_ms() + 60_000).await;
            let rec = Arc::new(Recorder::default());
            let mut tasks = Vec::new();
            for i in 0..60 {
                let (s, r, p) = (Arc::clone(&store), Arc::clone(&rec), packet.clone());
                tasks.push(tokio::spawn(async move {
                    let u = user(&format!("u{i}"));
                    s.grab_announced(&room(), &p, &u, r).await
                }));
                if i == 40 {
                    let (s, r, p) = (Arc::clone(&store), Arc::clone(&rec), packet.clone());
                    tasks.push(tokio::spawn(async move {
                        s.expire_announced(&p, r).await.unwrap();
                        Err(GrabError::Busy)
                    }));
                }
            }
            let won = futures_util::future::join_all(tasks)
                .await
                .into_iter()
                .filter(|r| matches!(r, Ok(Ok(_))))
                .count();
            let events = rec.events();
            let Some(Event::Done(done)) = events.last() else {
                panic!("redpacket_done is not last: {events:?}");
            };
            assert_eq!(done.grabbed as usize, won, "{events:?}");
            assert_eq!(
                events.len(),
                won + 1,
                "one grab per winner, one done: {events:?}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn expired_is_reported_only_for_packets_that_ended_by_expiry() {
        let dir = scratch("status");
        let faults = Arc::new(Faults::default());
        let store = Arc::new(open(&dir, &faults));
        let rec = Arc::new(Recorder::default());
        // Emptied before its deadline: not expired, then or later.
        create(&store, "p", vec![2], now_ms() + 60_000).await;
        store
            .grab_announced(&room(), "p", &user("a"), rec.clone())
            .await
            .unwrap();
        with(&store, "p", |p| p.expires_at = now_ms() - 1);
        assert!(!store.status("p").await.unwrap().unwrap().expired);
        assert_eq!(store.expire("p").await.unwrap(), None);
        assert!(!store.status("p").await.unwrap().unwrap().expired);
        // Past its deadline with shares left: expired, even before its timer fires.
        create(&store, "q", vec![1, 1], now_ms() + 60_000).await;
        with(&store, "q", |p| p.expires_at = now_ms() - 1);
        assert!(store.status("q").await.unwrap().unwrap().expired);
        // A grab of the last share in flight at the deadline empties the packet: its
        // `redpacket_done` says not expired, as its status does.
        create(&store, "r", vec![7], now_ms() + 60_000).await;
        let gate = faults.hold();
        let (s, r) = (Arc::clone(&store), Arc::clone(&rec));
        let grab = tokio::spawn(async move { s.grab_announced(&room(), "r", &user("a"), r).await });
        until(&store, "r", |p| p.in_flight == 1).await;
        let (s, r) = (Arc::clone(&store), Arc::clone(&rec));
        let expiry = tokio::spawn(async move { s.expire_announced("r", r).await });
        until(&store, "r", |p| p.expired).await;
        drop(gate);
        let g = grab.await.unwrap().unwrap();
        assert_eq!(expiry.await.unwrap().unwrap(), None);
        let done = Done {
            grabbed: 1,
            total_grabbed: 7,
            expired: false,
        };
        assert_eq!(g.done, Some(done));
        assert!(!store.status("r").await.unwrap().unwrap().expired);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_packet_that_expired_while_down_is_announced_after_the_restart() {
        let dir = scratch("down");
        let faults = Arc::new(Faults::default());
        let store = open(&dir, &faults);
        create(&store, "gone", vec![1, 2], now_ms() + 60_000).await;
        create(&store, "announced", vec![1, 2], now_ms() + 60_000).await;
        store.grab(&room(), "gone", &user("a")).await.unwrap();
        store.expire("announced").await.unwrap();
        drop(store);
        // Down past the deadline: "gone" expired, but nobody announced it.
        let (journal, mut records) = Journal::open_faulty(&dir, &faults).unwrap();
        for r in &mut records {
            if let Record::Create { expires_at, .. } = r {
                *expires_at = now_ms() - 1;
            }
        }
        let store = LocalStore::with_journal(journal, records, 1000, 3600);
        let open_packets = store.open_packets().await.unwrap();
        assert_eq!(open_packets.len(), 1, "{open_packets:?}");
        assert_eq!(open_packets[0].0, "gone");
        // Its timer fires at once after the start, and announces its end.
        let rec = Arc::new(Recorder::default());
        let done = store.expire_announced("gone", rec.clone()).await.unwrap();
        let d = store.status("gone").await.unwrap().unwrap();
        assert_eq!((d.grabbed, d.expired), (1, true));
        assert_eq!(rec.events(), vec![Event::Done(done.unwrap())]);
        assert!(done.unwrap().expired);
        drop(store);
        // Announced once: not again after another restart.
        let store = open(&dir, &faults);
        assert!(store.open_packets().await.unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
