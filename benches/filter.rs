//! `Filter::check` on a 200-character chat mixing CJK, emoji and Latin, against 10,000
//! block words (mixed CJK, Latin and emoji, 2–8 characters): the hot-path budget is
//! 2 µs per check (`check/block_10k_pass`). Also: the same with 1,000 mask words, passing
//! and with one mask word in the text; the text in full-width forms (rewritten by NFKC);
//! the empty filter; and building the 11,000-word filter.
//!
//! Run: `cargo bench --bench filter` (`-- --warm-up-time 1 --measurement-time 3` for a
//! shorter run).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use danmaku_gateway::moderation::filter::{Filter, Verdict};

/// Deterministic data: the same words and text on every run, no `rand` API to track.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn char_in(&mut self, from: u32, to: u32) -> char {
        let c = from + self.below(u64::from(to - from + 1)) as u32;
        char::from_u32(c).expect("the ranges below are all scalar values")
    }
}

/// CJK unified ideographs.
const CJK: (u32, u32) = (0x4E00, 0x9FA5);
/// Emoticons (😀..🙏) for the words; the text's emoji come from another block
/// (🌀..🏿), so they match no word.
const WORD_EMOJI: (u32, u32) = (0x1F600, 0x1F64F);
const TEXT_EMOJI: (u32, u32) = (0x1F300, 0x1F3FF);

/// `n` words of 2–8 characters: 60% CJK, 30% Latin (letters `a`–`t`), 10% emoji (some
/// with CJK around them).
fn words(rng: &mut XorShift, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let len = 2 + rng.below(7) as usize;
            let kind = rng.below(10);
            (0..len)
                .map(|i| match kind {
                    0..=5 => rng.char_in(CJK.0, CJK.1),
                    6..=8 => rng.char_in('a' as u32, 't' as u32),
                    _ if i % 2 == 0 => rng.char_in(WORD_EMOJI.0, WORD_EMOJI.1),
                    _ => rng.char_in(CJK.0, CJK.1),
                })
                .collect()
        })
        .collect()
}

/// A 200-character chat: runs of CJK, emoji, and Latin words (`u`–`z`, some upper case,
/// so matching has to fold) with spaces and digits.
fn chat(rng: &mut XorShift) -> String {
    let mut out = Vec::with_capacity(200);
    while out.len() < 200 {
        match rng.below(4) {
            0 | 1 => out.extend((0..3 + rng.below(8)).map(|_| rng.char_in(CJK.0, CJK.1))),
            2 => out.extend((0..1 + rng.below(3)).map(|_| rng.char_in(TEXT_EMOJI.0, TEXT_EMOJI.1))),
            _ => {
                out.push(' ');
                let upper = rng.below(3) == 0;
                out.extend((0..2 + rng.below(5)).map(|_| {
                    let c = rng.char_in('u' as u32, 'z' as u32);
                    if upper { c.to_ascii_uppercase() } else { c }
                }));
                out.push(if rng.below(2) == 0 { ' ' } else { '6' });
            }
        }
    }
    out.truncate(200);
    out.into_iter().collect()
}

fn bench(c: &mut Criterion) {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let block = words(&mut rng, 10_000);
    let mask = words(&mut rng, 1_000);
    let blocking = Filter::new(&block, &[]).expect("10,000 words build");
    let masking = Filter::new(&block, &mask).expect("11,000 words build");
    // Regenerated until it matches no word (a CJK pair may happen to be one).
    let text = loop {
        let text = chat(&mut rng);
        if blocking.check(&text) == Verdict::Pass && masking.check(&text) == Verdict::Pass {
            break text;
        }
    };
    assert_eq!(text.chars().count(), 200);
    // The same text with one mask word in the middle (still 200 characters).
    let word: Vec<char> = mask[0].chars().collect();
    let mut chars: Vec<char> = text.chars().collect();
    chars.splice(100..100 + word.len(), word);
    let masked_text: String = chars.into_iter().collect();
    assert!(matches!(masking.check(&masked_text), Verdict::Masked(_)));
    // Chinese chat punctuates with full-width marks (NFKC turns `，` into `,`), and some
    // clients type Latin full-width: such a text is rewritten character by character
    // rather than taking the plain path.
    let rewritten: String = text
        .chars()
        .enumerate()
        .map(|(i, c)| match (i % 20, c) {
            (0, _) => '，',
            (_, 'u'..='z') => char::from_u32(u32::from(c) - 0x61 + 0xFF41).unwrap_or(c),
            _ => c,
        })
        .collect();
    assert_eq!(blocking.check(&rewritten), Verdict::Pass);
    let empty = Filter::empty();

    let mut g = c.benchmark_group("check");
    g.bench_function("block_10k_pass", |b| {
        b.iter(|| blocking.check(black_box(&text)))
    });
    g.bench_function("block_10k_pass_fullwidth", |b| {
        b.iter(|| blocking.check(black_box(&rewritten)))
    });
    g.bench_function("block_10k_mask_1k_pass", |b| {
        b.iter(|| masking.check(black_box(&text)))
    });
    g.bench_function("block_10k_mask_1k_masked", |b| {
        b.iter(|| masking.check(black_box(&masked_text)))
    });
    g.bench_function("empty", |b| b.iter(|| empty.check(black_box(&text))));
    g.finish();

    c.bench_function("build_block_10k_mask_1k", |b| {
        b.iter(|| Filter::new(black_box(&block), black_box(&mask)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
