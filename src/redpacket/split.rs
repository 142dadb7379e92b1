//! Pre-splitting a packet's total into shares at creation ("double mean").
//!
//! Each share but the last is drawn uniformly from `1 ..= 2 × (remaining / shares left)`,
//! capped so every later share can still get a cent; the last takes what remains; then
//! the shares are shuffled so the order of grabbing does not bias the amounts. The sum
//! is exact by construction and every share is at least one cent.

use rand::RngExt;

/// Splits `total` cents into `shares` amounts, each ≥ 1, summing to `total`.
///
/// # Panics
/// If `shares == 0` or `shares > total` (callers validate first).
pub fn split(total: u64, shares: u32, rng: &mut impl rand::Rng) -> Vec<u64> {
    let n = u64::from(shares);
    assert!(n >= 1 && n <= total, "split needs 1 <= shares <= total");
    let mut out = Vec::with_capacity(shares as usize);
    let mut remaining = total;
    for left in (2..=n).rev() {
        // Leave at least one cent for each of the other `left - 1` shares.
        let cap = remaining - (left - 1);
        let double_mean = (2 * (remaining / left)).max(1);
        let amount = rng.random_range(1..=double_mean.min(cap));
        out.push(amount);
        remaining -= amount;
    }
    out.push(remaining);
    // Fisher-Yates, so the large last share lands anywhere.
    for i in (1..out.len()).rev() {
        let j = rng.random_range(0..=i);
        out.swap(i, j);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check(total: u64, shares: u32) {
        let v = split(total, shares, &mut rand::rng());
        assert_eq!(v.len(), shares as usize);
        assert!(v.iter().all(|&a| a >= 1));
        assert_eq!(v.iter().sum::<u64>(), total);
    }

    #[test]
    fn edge_cases() {
        check(1, 1);
        check(100, 100);
        check(100_000, 100_000);
        check(100_001, 100_000);
        check(10_000_000_000, 100_000);
        check(u64::MAX / 4, 7);
    }

    #[test]
    fn shares_equal_total_gives_one_cent_each() {
        assert!(split(500, 500, &mut rand::rng()).iter().all(|&a| a == 1));
    }

    proptest! {
        #[test]
        fn sums_exactly(total in 1u64..5_000_000, shares in 1u32..5_000) {
            prop_assume!(u64::from(shares) <= total);
            check(total, shares);
        }
    }
}
