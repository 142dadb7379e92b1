//! A room's event log on this node: its recent events (every type but presence), oldest
//! first, in the order this node delivered them. `joined.history` reads its tail; a
//! `join` with `since` (v1.1 recovery) reads what follows an event in it.
//!
//! Why one log for both: the history is the log's last `room.history_len` events, so
//! keeping them apart would store every recent event twice. The log is bounded twice,
//! by count (`max(history_len, recovery_len)`) and by bytes (`room.recovery_max_bytes`,
//! each event weighed once as JSON when it is logged), so a room of large events keeps
//! fewer; only the oldest end is ever cut, so what remains after any event in it is
//! every event this node delivered after it, except those a recall took back.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use crate::protocol::{Event, EventBody, Format};
use crate::wire;

/// The bounds of one room's log.
#[derive(Debug, Clone, Copy)]
pub(super) struct LogBounds {
    /// `room.history_len`: the most `joined.history` answers without `since`.
    pub(super) history_len: usize,
    /// `room.recovery_len`: events kept for `since`.
    pub(super) recovery_len: usize,
    /// `room.recovery_max_bytes`.
    pub(super) max_bytes: usize,
}

impl LogBounds {
    fn max_len(&self) -> usize {
        self.history_len.max(self.recovery_len)
    }
}

struct Logged {
    event: Arc<Event>,
    /// Its JSON size, as counted against `max_bytes`.
    bytes: usize,
    /// The room's batch that delivered it here (0: read from the cluster log).
    batch: u64,
}

/// What [`EventLog::since`] answers.
pub struct Recovery {
    /// The events after `since` (recovered) or the last `history` ones (not).
    pub events: Vec<Arc<Event>>,
    pub recovered: bool,
}

pub(super) struct EventLog {
    entries: VecDeque<Logged>,
    bytes: usize,
    bounds: LogBounds,
}

impl EventLog {
    pub(super) fn new(bounds: LogBounds) -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
            bounds,
        }
    }

    /// Appends an event delivered by the room's batch number `batch`, cutting the oldest
    /// beyond either bound. A recall also takes its target out.
    pub(super) fn push(&mut self, event: Arc<Event>, batch: u64) {
        if let EventBody::Recall { target } = &event.body {
            self.recall(target);
        }
        if self.bounds.max_len() == 0 {
            return;
        }
        let bytes = wire::encoded_len(&*event, Format::Json);
        self.entries.push_back(Logged {
            event,
            bytes,
            batch,
        });
        self.bytes += bytes;
        self.trim();
    }

    fn trim(&mut self) {
        while self.entries.len() > self.bounds.max_len()
            || (self.bytes > self.bounds.max_bytes && self.entries.len() > 1)
        {
            let old = self.entries.pop_front().expect("non-empty");
            self.bytes -= old.bytes;
        }
    }

    /// Takes the recalled event `target` out (a moderator removed it).
    pub(super) fn recall(&mut self, target: &str) {
        if let Some(i) = self.entries.iter().rposition(|e| e.event.id == target) {
            let old = self.entries.remove(i).expect("index from rposition");
            self.bytes -= old.bytes;
        }
    }

    /// The last `n` events (at most `history_len`), oldest first.
    pub(super) fn recent(&self, n: usize) -> Vec<Arc<Event>> {
        let n = n.min(self.bounds.history_len);
        let skip = self.entries.len().saturating_sub(n);
        self.entries
            .iter()
            .skip(skip)
            .map(|e| Arc::clone(&e.event))
            .collect()
    }

    /// The events after `since`, when this log still holds it (so, everything after it
    /// too) and recovery is on; else the last `history` events and `recovered: false`.
    pub(super) fn since(&self, since: &str, history: usize) -> Recovery {
        let found = (self.bounds.recovery_len > 0)
            .then(|| self.entries.iter().rposition(|e| e.event.id == since))
            .flatten();
        match found {
            Some(i) => Recovery {
                events: self
                    .entries
                    .iter()
                    .skip(i + 1)
                    .map(|e| Arc::clone(&e.event))
                    .collect(),
                recovered: true,
            },
            None => Recovery {
                events: self.recent(history),
                recovered: false,
            },
        }
    }

    /// The events delivered by batches numbered after `batch`, oldest first.
    pub(super) fn after_batch(&self, batch: u64) -> Vec<Arc<Event>> {
        let start = self
            .entries
            .iter()
            .rposition(|e| e.batch <= batch)
            .map_or(0, |i| i + 1);
        self.entries
            .iter()
            .skip(start)
            .map(|e| Arc::clone(&e.event))
            .collect()
    }

    /// Whether an event with this id is logged.
    #[cfg(test)]
    pub(super) fn contains(&self, id: &str) -> bool {
        self.entries.iter().any(|e| e.event.id == id)
    }

    /// Ids of the logged events.
    pub(super) fn ids(&self) -> HashSet<String> {
        self.entries.iter().map(|e| e.event.id.clone()).collect()
    }

    /// Replaces the log by `events` (oldest first, each with the batch that delivered
    /// it here), within the bounds.
    pub(super) fn replace(&mut self, events: Vec<(Arc<Event>, u64)>) {
        self.entries.clear();
        self.bytes = 0;
        for (event, batch) in events {
            let bytes = wire::encoded_len(&*event, Format::Json);
            self.entries.push_back(Logged {
                event,
                bytes,
                batch,
            });
            self.bytes += bytes;
        }
        self.trim();
    }

    /// Takes every event out, oldest first, with the batch that delivered it here.
    pub(super) fn drain(&mut self) -> Vec<(Arc<Event>, u64)> {
        self.bytes = 0;
        self.entries.drain(..).map(|e| (e.event, e.batch)).collect()
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn system(id: &str, text_len: usize) -> Arc<Event> {
        Arc::new(Event {
            id: id.into(),
            ts: 1,
            body: EventBody::System {
                text: "x".repeat(text_len),
                data: None,
            },
        })
    }

    fn ids(events: &[Arc<Event>]) -> Vec<&str> {
        events.iter().map(|e| e.id.as_str()).collect()
    }

    fn bounds(history_len: usize, recovery_len: usize, max_bytes: usize) -> LogBounds {
        LogBounds {
            history_len,
            recovery_len,
            max_bytes,
        }
    }

    #[test]
    fn since_answers_what_followed_or_the_history_when_it_is_gone() {
        let mut log = EventLog::new(bounds(2, 4, 1 << 20));
        for id in ["a", "b", "c", "d", "e"] {
            log.push(system(id, 1), 1);
        }
        // "a" fell off the count bound: not recoverable.
        let r = log.since("a", 1);
        assert_eq!((ids(&r.events), r.recovered), (vec!["e"], false));
        let r = log.since("b", 1);
        assert_eq!((ids(&r.events), r.recovered), (vec!["c", "d", "e"], true));
        let r = log.since("e", 100);
        assert_eq!((r.events.len(), r.recovered), (0, true));
        // History is bounded by history_len, whatever is asked.
        assert_eq!(ids(&log.recent(100)), ["d", "e"]);
    }

    #[test]
    fn the_byte_bound_cuts_the_oldest_and_a_recall_takes_its_target_out() {
        let one = wire::encoded_len(&*system("a", 1000), Format::Json);
        let mut log = EventLog::new(bounds(100, 100, one * 3));
        for id in ["a", "b", "c", "d"] {
            log.push(system(id, 1000), 1);
        }
        assert_eq!((log.len(), log.bytes()), (3, one * 3));
        assert!(!log.since("a", 0).recovered);
        let recall = Arc::new(Event {
            id: "r".into(),
            ts: 2,
            body: EventBody::Recall { target: "c".into() },
        });
        log.push(recall, 1);
        let r = log.since("b", 0);
        assert_eq!((ids(&r.events), r.recovered), (vec!["d", "r"], true));
        assert!(!log.contains("c"));
        // An event larger than the bound alone is still kept (the newest always is).
        log.push(system("big", 10 * one), 1);
        assert_eq!(ids(&log.recent(10)), ["big"]);
    }

    #[test]
    fn after_batch_lists_what_later_batches_delivered() {
        let mut log = EventLog::new(bounds(10, 10, 1 << 20));
        log.push(system("a", 1), 1);
        log.push(system("b", 1), 2);
        log.push(system("c", 1), 2);
        log.push(system("d", 1), 3);
        assert_eq!(ids(&log.after_batch(1)), ["b", "c", "d"]);
        assert_eq!(ids(&log.after_batch(3)), Vec::<&str>::new());
        assert_eq!(ids(&log.after_batch(0)), ["a", "b", "c", "d"]);
    }

    #[test]
    fn recovery_off_never_recovers() {
        let mut log = EventLog::new(bounds(10, 0, 1 << 20));
        log.push(system("a", 1), 1);
        log.push(system("b", 1), 1);
        let r = log.since("a", 5);
        assert_eq!((ids(&r.events), r.recovered), (vec!["a", "b"], false));
    }
}
