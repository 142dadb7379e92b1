//! Measurements and their presentation: latency histograms shared by thousands of
//! connection tasks, labelled tallies (failure reasons, error codes), the latency summary
//! every report uses, and printing a report as a human table or as one JSON object.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Microseconds since the Unix epoch (the clock chat stamps and latencies use).
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Largest latency a histogram tracks exactly: one hour, in microseconds; larger values
/// are clamped (a run never lasts that long).
const HIST_MAX_US: u64 = 3_600_000_000;

/// A new microsecond histogram with 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

/// A latency histogram split into shards, so thousands of tasks recording at once rarely
/// wait on each other: a task always records into shard `task index % shards`, and holds
/// the lock for one whole frame's worth of values.
pub struct ShardedHist {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl ShardedHist {
    pub fn new(shards: usize) -> Self {
        Self {
            shards: (0..shards.max(1)).map(|_| Mutex::new(new_hist())).collect(),
        }
    }

    /// The shard for task `index`; record with `saturating_record`.
    pub fn shard(&self, index: usize) -> MutexGuard<'_, Histogram<u64>> {
        lock(&self.shards[index % self.shards.len()])
    }

    /// All shards merged.
    pub fn snapshot(&self) -> Histogram<u64> {
        let mut all = new_hist();
        for shard in &self.shards {
            // Same bounds everywhere, so adding cannot fail.
            let _ = all.add(&*lock(shard));
        }
        all
    }
}

impl Default for ShardedHist {
    /// 16 shards.
    fn default() -> Self {
        Self::new(16)
    }
}

/// Locks a mutex, ignoring poisoning (a panicked task must not hide the measurements).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts by label (failure reasons, error codes, close codes).
#[derive(Default)]
pub struct Tally(Mutex<BTreeMap<String, u64>>);

impl Tally {
    pub fn add(&self, label: impl Into<String>) {
        *lock(&self.0).entry(label.into()).or_insert(0) += 1;
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        lock(&self.0).clone()
    }
}

/// Percentiles of a microsecond histogram, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| round3(us as f64 / 1000.0);
        if h.is_empty() {
            return Self {
                count: 0,
                mean_ms: 0.0,
                p50_ms: 0.0,
                p90_ms: 0.0,
                p99_ms: 0.0,
                p999_ms: 0.0,
                max_ms: 0.0,
            };
        }
        Self {
            count: h.len(),
            mean_ms: round3(h.mean() / 1000.0),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }

    /// `p50 1.2 | p90 .. | p99 .. | p99.9 .. | max .. ms (n=..)`
    pub fn line(&self) -> String {
        if self.count == 0 {
            return "no samples".into();
        }
        format!(
            "p50 {} | p90 {} | p99 {} | p99.9 {} | max {} ms  (mean {}, n={})",
            self.p50_ms,
            self.p90_ms,
            self.p99_ms,
            self.p999_ms,
            self.max_ms,
            self.mean_ms,
            self.count
        )
    }
}

/// Rounds to 3 decimals (microsecond resolution when the unit is ms).
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A scenario's final report.
pub trait Report: Serialize {
    /// Whether the run met its pass criteria (decides the exit code).
    fn passed(&self) -> bool;
    /// The report as a human-readable table.
    fn human(&self) -> String;
}

/// Prints `report` to stdout, as one JSON object when `json`, as a table otherwise.
pub fn emit<R: Report>(report: &R, json: bool) {
    if json {
        match serde_json::to_string(report) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("cannot serialize the report: {e}"),
        }
    } else {
        print!("{}", report.human());
    }
}

/// Builds the aligned two-column tables of the human reports.
#[derive(Default)]
pub struct Table {
    out: String,
}

impl Table {
    /// A section heading.
    pub fn section(&mut self, title: &str) -> &mut Self {
        let _ = writeln!(self.out, "{title}");
        self
    }

    /// One `key  value` row.
    pub fn row(&mut self, key: &str, value: impl std::fmt::Display) -> &mut Self {
        let _ = writeln!(self.out, "  {key:<24} {value}");
        self
    }

    /// One row per label of a tally, or `none` when it is empty.
    pub fn tally(&mut self, key: &str, tally: &BTreeMap<String, u64>) -> &mut Self {
        if tally.is_empty() {
            return self.row(key, "none");
        }
        for (i, (label, n)) in tally.iter().enumerate() {
            let k = if i == 0 { key } else { "" };
            self.row(k, format!("{n:>8}  {label}"));
        }
        self
    }

    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_in_ms() {
        let h = ShardedHist::new(4);
        for (i, us) in [1000_u64, 2000, 3000, 4000].into_iter().enumerate() {
            h.shard(i).saturating_record(us);
        }
        let s = LatencySummary::of(&h.snapshot());
        assert_eq!(s.count, 4);
        assert!((s.p50_ms - 2.0).abs() < 0.01, "{s:?}");
        assert!((s.max_ms - 4.0).abs() < 0.01, "{s:?}");
        assert_eq!(LatencySummary::of(&new_hist()).line(), "no samples");
    }

    #[test]
    fn tally_and_table() {
        let t = Tally::default();
        t.add("http 503");
        t.add("http 503");
        t.add("timeout: upgrade");
        let snap = t.snapshot();
        assert_eq!(snap["http 503"], 2);
        let text = Table::default()
            .section("s")
            .tally("failures", &snap)
            .finish();
        assert!(
            text.contains("failures") && text.contains("timeout: upgrade"),
            "{text}"
        );
    }
}
