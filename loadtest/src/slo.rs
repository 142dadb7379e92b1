//! Service-level objectives a run must meet: `--slo delivery=0.999,p99_ms=100`, or the
//! separate flags `--slo-delivery` and `--slo-p99-ms` (which win over `--slo`).
//!
//! Every scenario maps the two kinds of objective onto its own measurements:
//! a *ratio* (`delivery`: delivered/expected chats in `fanout`/`rooms`/`soak`, successful
//! grabs/expected in `redpacket`, joined/attempted connections in `storm`/`idle`) and a
//! *latency* (delivery latency, grab latency, connect latency). A missed objective, or
//! one that cannot be judged because nothing was measured, fails the run (exit 1).

use std::fmt;
use std::str::FromStr;

use clap::Args;
use serde::Serialize;

use crate::report::{LatencySummary, Table};

/// Thresholds; `None` = not asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Slo {
    /// Lowest acceptable ratio, 0..=1.
    pub delivery: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

impl Slo {
    /// `other`'s thresholds where it has them, else ours.
    fn overlay(self, other: Slo) -> Slo {
        Slo {
            delivery: other.delivery.or(self.delivery),
            p50_ms: other.p50_ms.or(self.p50_ms),
            p90_ms: other.p90_ms.or(self.p90_ms),
            p99_ms: other.p99_ms.or(self.p99_ms),
            p999_ms: other.p999_ms.or(self.p999_ms),
            max_ms: other.max_ms.or(self.max_ms),
        }
    }

    /// Judges a run's ratio and latency against the thresholds set, in a fixed order.
    pub fn evaluate(&self, ratio: Option<f64>, latency: &LatencySummary) -> Vec<SloCheck> {
        let mut checks = Vec::new();
        if let Some(min) = self.delivery {
            checks.push(SloCheck::new("delivery", Bound::AtLeast, min, ratio));
        }
        let lat = |v: f64| (latency.count > 0).then_some(v);
        let latencies = [
            ("p50_ms", self.p50_ms, latency.p50_ms),
            ("p90_ms", self.p90_ms, latency.p90_ms),
            ("p99_ms", self.p99_ms, latency.p99_ms),
            ("p999_ms", self.p999_ms, latency.p999_ms),
            ("max_ms", self.max_ms, latency.max_ms),
        ];
        for (name, threshold, actual) in latencies {
            if let Some(max) = threshold {
                checks.push(SloCheck::new(name, Bound::AtMost, max, lat(actual)));
            }
        }
        checks
    }
}

/// Parses `key=value[,key=value...]`; keys: `delivery` (alias `ratio`), `p50_ms`,
/// `p90_ms`, `p99_ms`, `p999_ms`, `max_ms` (the `_ms` may be left out).
impl FromStr for Slo {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut slo = Slo::default();
        let mut any = false;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected key=value"))?;
            let key = key.trim().to_ascii_lowercase();
            let value = value.trim();
            let slot = match key.as_str() {
                "delivery" | "ratio" => {
                    slo.delivery = Some(parse_ratio(value)?);
                    any = true;
                    continue;
                }
                "p50_ms" | "p50" => &mut slo.p50_ms,
                "p90_ms" | "p90" => &mut slo.p90_ms,
                "p99_ms" | "p99" => &mut slo.p99_ms,
                "p999_ms" | "p999" | "p99.9" => &mut slo.p999_ms,
                "max_ms" | "max" => &mut slo.max_ms,
                other => {
                    return Err(format!(
                        "unknown SLO {other:?} (known: delivery, p50_ms, p90_ms, p99_ms, \
                         p999_ms, max_ms)"
                    ));
                }
            };
            *slot = Some(parse_ms(value)?);
            any = true;
        }
        if !any {
            return Err("empty SLO: expected e.g. delivery=0.999,p99_ms=100".into());
        }
        Ok(slo)
    }
}

/// A ratio in 0..=1.
pub fn parse_ratio(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: not a number"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{s}: a ratio must be within 0..=1"));
    }
    Ok(v)
}

/// A non-negative, finite number of milliseconds.
pub fn parse_ms(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: not a number"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s}: milliseconds must be a finite number >= 0"));
    }
    Ok(v)
}

/// The SLO options every scenario takes.
#[derive(Debug, Clone, Default, Args)]
pub struct SloArgs {
    /// Objectives, e.g. delivery=0.999,p99_ms=100 (keys: delivery, p50_ms, p90_ms,
    /// p99_ms, p999_ms, max_ms); exit 1 when one is missed. Repeatable.
    #[arg(long = "slo", value_name = "K=V,...", value_parser = Slo::from_str)]
    pub slo: Vec<Slo>,
    /// Lowest acceptable delivery ratio (same as --slo delivery=X).
    #[arg(long, value_name = "RATIO", value_parser = parse_ratio)]
    pub slo_delivery: Option<f64>,
    /// Highest acceptable p99 latency in ms (same as --slo p99_ms=X).
    #[arg(long, value_name = "MS", value_parser = parse_ms)]
    pub slo_p99_ms: Option<f64>,
}

impl SloArgs {
    /// All `--slo` values merged (later ones win), then the separate flags.
    pub fn slo(&self) -> Slo {
        let merged = self
            .slo
            .iter()
            .fold(Slo::default(), |acc, s| acc.overlay(*s));
        merged.overlay(Slo {
            delivery: self.slo_delivery,
            p99_ms: self.slo_p99_ms,
            ..Slo::default()
        })
    }
}

/// Which side of the threshold passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    AtLeast,
    AtMost,
}

/// One objective judged.
#[derive(Debug, Clone, Serialize)]
pub struct SloCheck {
    pub metric: &'static str,
    pub bound: Bound,
    pub threshold: f64,
    /// `None`: nothing was measured (which fails the objective).
    pub actual: Option<f64>,
    pub met: bool,
}

impl SloCheck {
    fn new(metric: &'static str, bound: Bound, threshold: f64, actual: Option<f64>) -> Self {
        let met = actual.is_some_and(|a| match bound {
            Bound::AtLeast => a >= threshold,
            Bound::AtMost => a <= threshold,
        });
        Self {
            metric,
            bound,
            threshold,
            actual,
            met,
        }
    }
}

impl fmt::Display for SloCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.bound {
            Bound::AtLeast => ">=",
            Bound::AtMost => "<=",
        };
        let actual = self
            .actual
            .map_or_else(|| "nothing measured".to_string(), |a| a.to_string());
        let verdict = if self.met { "met" } else { "MISSED" };
        write!(f, "{op} {}: {actual}  {verdict}", self.threshold)
    }
}

/// Whether every check was met (true when there are none).
pub fn all_met(checks: &[SloCheck]) -> bool {
    checks.iter().all(|c| c.met)
}

/// Appends an `slo` section to a human table (nothing when there are no checks).
pub fn rows(t: &mut Table, checks: &[SloCheck], ratio_name: &str, latency_name: &str) {
    if checks.is_empty() {
        return;
    }
    t.section("slo");
    for c in checks {
        let what = if c.metric == "delivery" {
            ratio_name.to_string()
        } else {
            format!("{latency_name} {}", c.metric)
        };
        t.row(&what, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{ShardedHist, new_hist};

    #[test]
    fn parses_lists_aliases_and_rejects_nonsense() {
        let s: Slo = "delivery=0.999,p99_ms=100".parse().unwrap();
        assert_eq!(s.delivery, Some(0.999));
        assert_eq!(s.p99_ms, Some(100.0));
        assert_eq!(s.p50_ms, None);
        let s: Slo = " ratio = 1 , p99.9=250.5,max=1000,p50=3 ,".parse().unwrap();
        assert_eq!(
            (s.delivery, s.p999_ms, s.max_ms, s.p50_ms),
            (Some(1.0), Some(250.5), Some(1000.0), Some(3.0))
        );
        for bad in [
            "",
            ",",
            "delivery",
            "delivery=1.5",
            "delivery=-0.1",
            "p99_ms=-1",
            "p99_ms=abc",
            "p99_ms=inf",
            "latency=3",
        ] {
            assert!(bad.parse::<Slo>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn separate_flags_win_and_repeats_merge() {
        let args = SloArgs {
            slo: vec![
                "delivery=0.9,p99_ms=50".parse().unwrap(),
                "p99_ms=80,max_ms=500".parse().unwrap(),
            ],
            slo_delivery: Some(0.99),
            slo_p99_ms: None,
        };
        let s = args.slo();
        assert_eq!(
            (s.delivery, s.p99_ms, s.max_ms),
            (Some(0.99), Some(80.0), Some(500.0))
        );
        assert_eq!(SloArgs::default().slo(), Slo::default());
    }

    #[test]
    fn evaluates_ratio_and_latency() {
        let h = ShardedHist::new(1);
        for ms in 1..=100_u64 {
            h.shard(0).saturating_record(ms * 1000);
        }
        let lat = LatencySummary::of(&h.snapshot());
        let slo: Slo = "delivery=0.999,p99_ms=100,p50_ms=10".parse().unwrap();
        let checks = slo.evaluate(Some(0.9995), &lat);
        assert_eq!(checks.len(), 3);
        assert!(checks[0].met, "{:?}", checks[0]);
        // Fixed order: delivery, p50, p90, p99, p999, max.
        assert!(!checks[1].met, "p50 ~50 ms > 10: {:?}", checks[1]);
        assert!(checks[2].met, "p99 {:?}", checks[2]);
        assert!(!all_met(&checks));
        // Nothing measured fails.
        let empty = LatencySummary::of(&new_hist());
        let checks = slo.evaluate(None, &empty);
        assert!(checks.iter().all(|c| !c.met && c.actual.is_none()));
        assert!(all_met(&Slo::default().evaluate(None, &empty)));
    }
}
